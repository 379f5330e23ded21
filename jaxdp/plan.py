"""The privacy plan of a DP-SGD run: one object owning every privacy setting and its consequences.

`PrivacyPlan.create(...)` takes the run's privacy settings (dataset size, expected batch size,
steps or epochs, clip norm, a noise multiplier or a target epsilon, delta, accountant, sampling,
clipping, group size) and resolves them: it calibrates the noise multiplier to a target epsilon,
or shortens the run to what a budget allows. The plan then owns, for everyone who needs them,

- the batch sampler (`sampler(seed)`: Poisson, or shuffled batches labelled approximate),
- the DP event and the epsilon spent after any number of steps (`dp_event`, `epsilon`),
- the Gaussian noise transform that matches its sensitivity (`noise_transform`, `optimizer`),
- and `record(steps)`: THE description of the guarantee, from which privacy.json, the checkpoint
  ledger, the public metrics (`metrics(steps)`) and the run fingerprint (`fingerprint()`) are
  all derived, so no privacy setting is written out twice.

The guarantee (see `jaxdp.accounting` for the accountant): every step includes each of the
`num_examples` examples independently with probability `sampling_prob = expected_batch_size /
num_examples`; each example's gradient is clipped to L2 norm `l2_clip_norm` (flat, or per layer
with budgets C / sqrt(K)); with `group_size` k > 1 the drawn members of each content-hash cell
(`jaxdp.sampling.content_cells`; `num_cells`, a public setting fixed before training and never
computed from the data) are summed and clipped together;
Gaussian noise of standard deviation `noise_multiplier * l2_clip_norm` is added to the clipped
sum once per step. Adding or removing one example changes the clipped sum by at most C (by 2C
with cells), so each step is the Poisson-subsampled Gaussian mechanism with noise multiplier
sigma (sigma / 2 with cells), and the run is its `num_steps`-fold composition, for neighbouring
datasets under the fixed public parameters q and delta (N is treated as public) and the cell
map (the content hash and num_cells, which do not depend on the data).

delta: `target_delta` must lie in (0, 1); a delta above 1 / N is allowed but warned about (a
mechanism that publishes one random unit in the clear is (0, 1/N)-DP: *How to DP-fy ML*, Ponomareva
et al. 2023, recommend delta much smaller than 1 / N), and the record states delta * N.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import dp_accounting
import optax

from jaxdp import accounting, sampling
from jaxdp.adaptive import AdaptiveClipping, gradient_noise_multiplier
from jaxdp.clipping import CLIPPING_MODES
from jaxdp.noise import add_gaussian_noise

log = logging.getLogger("jaxdp")

SAMPLINGS = accounting.SAMPLINGS  # "poisson" | "shuffle"
DEFAULT_UNIT = "example"
COVERED = (
    "the trained parameters at every step and everything outside W/private computed from them "
    "and public data alone: hf/, peft/, metrics.jsonl (epsilon, eval metrics on held-out data), "
    "samples.jsonl, report.png"
)
NOT_COVERED = (
    "W/private: its noise-free training diagnostics (train loss, batch sizes, examples seen, "
    "clip fraction, gradient norms, throughput) are computed from the private data without "
    "noise, and its run.json and checkpoints hold the secret noise key; never publish W/private"
)
GROUP_PRIVACY = (
    "the unit is one block of tokens cut from the concatenated text: a person whose data spans "
    "k blocks is protected only by group privacy, (k epsilon, k e^((k-1) epsilon) delta); use "
    "data.privacy_unit='record' or 'user' for an epsilon per record or per user"
)
PUBLIC_PARAMETERS = (
    "num_examples (N) is treated as public, as in the DP-SGD literature, and with it "
    "sampling_prob = expected_batch_size / N, the default target_delta = 1 / (10 N), epsilon "
    "and delta * N: the guarantee is for neighbouring datasets under these fixed parameters; "
    "micro-batch clipping's num_cells is a setting, never computed from the data"
)
ADAPTIVE_NOTE = {
    "flat": "the clip norm follows the target quantile of the per-unit gradient norms, from a "
    "count released with Gaussian noise (count_noise_multiplier); gradient and count together "
    "are one Gaussian mechanism with noise_multiplier, which the accountant uses; the clip "
    "norm's trajectory is in metrics.jsonl",
    "per_layer": "every parameter group's threshold follows the target quantile of that group's "
    "per-unit gradient norms (counts released with noise count_noise_multiplier * sqrt(K)), "
    "rescaled so the clipped sum's sensitivity stays l2_clip_norm; the accountant uses "
    "noise_multiplier",
}


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """A resolved DP-SGD privacy plan (build it with `PrivacyPlan.create`).

    `unit` describes one privacy unit in words (e.g. "one block of 128 tokens"); the neighbouring
    relation is add-or-remove-one unit."""

    num_examples: int
    expected_batch_size: float
    num_steps: int  # steps this run will take (may be fewer than asked: budget)
    l2_clip_norm: float
    noise_multiplier: float
    target_delta: float
    target_epsilon: float | None = None
    accountant: str = "pld"
    sampling: str = "poisson"  # "poisson" | "shuffle"
    clipping: str = "flat"  # "flat" | "per_layer"
    group_size: int = 1
    num_cells: int | None = None  # micro-batch clipping's cells: a public setting
    secure_noise: bool = False
    unit: str = DEFAULT_UNIT
    unit_kind: str = "example"  # "example" | "block" | "record" | "user": what epsilon is per
    enabled: bool = True
    adaptive: AdaptiveClipping | None = None  # adaptive clipping (jaxdp.adaptive)

    # ------------------------------------------------------------------------------ create ---

    @classmethod
    def create(
        cls,
        *,
        num_examples: int,
        expected_batch_size: float,
        steps: int | None = None,
        epochs: float | None = None,
        l2_clip_norm: float = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        accountant: str = "pld",
        sampling: str = "poisson",
        clipping: str = "flat",
        group_size: int = 1,
        num_cells: int | None = None,
        secure_noise: bool = False,
        unit: str = DEFAULT_UNIT,
        unit_kind: str = "example",
        adaptive: AdaptiveClipping | None = None,
    ) -> PrivacyPlan:
        """Validates the settings and resolves them into a plan.

        Give `noise_multiplier`, or `target_epsilon` to calibrate it (the smallest noise
        multiplier whose epsilon after the planned steps is at most the target), or both: then
        the run stops before the target would be exceeded (`num_steps` is shortened). `steps`
        or `epochs` (epochs / sampling_prob steps). `target_delta` defaults to 1 / (10 N); one
        above 1 / N is warned about. With `group_size` k > 1 (micro-batch clipping) give
        `num_cells`, a number fixed from public information before training (e.g. the N you
        expect / k): computed from the data, a removal that changed it would move every example
        to another cell.
        With `adaptive`, the noise multiplier is that of the pair (gradient, count) and is
        what the accountant uses; the gradient gets `gradient_noise_multiplier`.
        Raises ValueError with a message naming the setting to change.
        """
        N, B, q, steps, delta = _check_common(
            num_examples, expected_batch_size, steps, epochs, target_delta
        )
        _check_mechanism(
            l2_clip_norm, sampling, clipping, accountant, group_size, num_cells,
            noise_multiplier, target_epsilon,
        )  # fmt: skip
        factor = _sensitivity_factor(group_size)
        sigma = noise_multiplier
        if sigma is None:
            if target_epsilon is None:
                raise ValueError("Set a noise multiplier or a target epsilon (or both).")
            sigma = factor * accounting.calibrate_noise_multiplier(
                target_epsilon, delta, q, steps, accountant=accountant
            )
        elif target_epsilon is not None:
            affordable = accounting.max_steps_within_budget(
                sigma / factor, q, target_epsilon, delta, accountant=accountant, upper=steps
            )
            if affordable < 1:
                one_step = accounting.compute_epsilon(
                    sigma / factor, q, 1, delta, accountant=accountant
                )
                raise ValueError(
                    f"Even one step at noise_multiplier={sigma} and q={q:.4g} exceeds "
                    f"target_epsilon={target_epsilon} at delta={delta:.3g} (one step costs "
                    f"epsilon={one_step:.4g}); raise the noise multiplier, lower the batch size, "
                    f"or raise the target."
                )
            if affordable < steps:
                log.warning(
                    "The epsilon budget allows %d of the %d requested steps; training will stop "
                    "there.",
                    affordable,
                    steps,
                )
                steps = affordable
        plan = cls(
            num_examples=N,
            expected_batch_size=B,
            num_steps=steps,
            l2_clip_norm=float(l2_clip_norm),
            noise_multiplier=float(sigma),
            target_delta=delta,
            target_epsilon=target_epsilon,
            accountant=accountant,
            sampling=sampling,
            clipping=clipping,
            group_size=group_size,
            num_cells=num_cells,
            secure_noise=secure_noise,
            unit=unit,
            unit_kind=unit_kind,
            adaptive=adaptive,
        )
        if adaptive is not None:
            if group_size > 1:
                raise ValueError("Adaptive clipping needs group_size=1.")
            gradient_noise_multiplier(sigma, adaptive.count_noise_multiplier)  # sigma < 2 sigma_b
        # The epsilon the run reports (`epsilon`, a cached PLD self-composition) can differ from
        # the accountant call the search used in the last digits: make the reported one meet
        # the target too.
        while target_epsilon is not None and plan.epsilon() > target_epsilon:
            if noise_multiplier is None:
                plan = dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier * 1.000001)
            elif plan.num_steps > 1:
                plan = dataclasses.replace(plan, num_steps=plan.num_steps - 1)
            else:
                raise ValueError(f"Even one step exceeds target_epsilon={target_epsilon}.")
        return plan

    @classmethod
    def non_private(
        cls,
        *,
        num_examples: int,
        batch_size: float,
        steps: int | None = None,
        epochs: float | None = None,
        unit: str = DEFAULT_UNIT,
        unit_kind: str = "example",
    ) -> PrivacyPlan:
        """The plan of a non-private baseline: shuffled batches, no clipping, no noise."""
        N, B, _, steps, _ = _check_common(num_examples, batch_size, steps, epochs, None)
        return cls(
            num_examples=N,
            expected_batch_size=B,
            num_steps=steps,
            l2_clip_norm=math.inf,
            noise_multiplier=0.0,
            target_delta=1.0 / (10 * N),
            sampling="shuffle",
            unit=unit,
            unit_kind=unit_kind,
            enabled=False,
        )

    # --------------------------------------------------------------------------- derived ---

    @property
    def sampling_prob(self) -> float:
        return self.expected_batch_size / self.num_examples

    @property
    def accounting_noise_multiplier(self) -> float:
        """sigma relative to the sensitivity: C per example, 2C per cell (group clipping)."""
        return self.noise_multiplier / _sensitivity_factor(self.group_size)

    @property
    def gradient_noise_multiplier(self) -> float:
        """The gradient's noise multiplier: sigma, or sigma_D < sigma with adaptive clipping (the
        count takes the rest; `jaxdp.adaptive`)."""
        if self.adaptive is None or not self.private:
            return self.noise_multiplier
        return gradient_noise_multiplier(
            self.noise_multiplier, self.adaptive.count_noise_multiplier
        )

    @property
    def approximate(self) -> bool:
        """True when epsilon is computed as if batches were Poisson-sampled, but they were not."""
        return self.enabled and self.sampling != "poisson"

    @property
    def private(self) -> bool:
        """Whether the run has a finite epsilon (DP on, with noise)."""
        return self.enabled and self.noise_multiplier > 0

    @functools.cached_property
    def _curve(self) -> accounting.EpsilonCurve:
        return accounting.epsilon_curve(
            self.accounting_noise_multiplier,
            self.sampling_prob,
            self.target_delta,
            self.accountant,
        )

    def epsilon(self, steps: int | None = None) -> float:
        """Epsilon after `steps` steps (default: the planned number); inf without DP."""
        steps = self.num_steps if steps is None else steps
        return self._curve(steps) if self.enabled else math.inf

    def dp_event(self, steps: int | None = None) -> dp_accounting.DpEvent:
        """The DpEvent of `steps` steps, at the accounting noise multiplier."""
        steps = self.num_steps if steps is None else steps
        if not self.enabled:
            return dp_accounting.NonPrivateDpEvent()
        return accounting.dpsgd_event(self.accounting_noise_multiplier, self.sampling_prob, steps)

    def sampler(self, seed: int) -> sampling.PoissonSampler | sampling.ShuffleSampler:
        """The batch sampler of the plan (`seed` must be secret: `Secrets.sampling`)."""
        if self.enabled and self.sampling == "poisson":
            return sampling.PoissonSampler(self.num_examples, self.sampling_prob, seed)
        batch = min(self.num_examples, max(1, int(round(self.expected_batch_size))))
        return sampling.ShuffleSampler(self.num_examples, batch, seed)

    def noise_transform(self, key, group_names=None) -> optax.GradientTransformation:
        """clipped sum -> (sum + N(0, sigma^2 C^2)) / B, keyed by the SECRET `key` (with
        adaptive clipping also the count release and the thresholds' update; `group_names`
        (params -> clipping groups) for per-layer adaptive clipping)."""
        if not self.enabled:
            raise ValueError("A non-private plan adds no noise.")
        return add_gaussian_noise(
            self.l2_clip_norm,
            self.gradient_noise_multiplier,
            self.expected_batch_size,
            key,
            secure=self.secure_noise,
            adaptive=self.adaptive,
            clipping=self.clipping,
            group_names=group_names,
        )

    def optimizer(self, base: optax.GradientTransformation, noise_key=None, group_names=None):
        """`base` preceded, under DP, by the noise transform (which also divides by B)."""
        if not self.enabled:
            return base
        if noise_key is None:
            raise ValueError("DP-SGD needs a secret noise key (jaxdp.randomness.Secrets).")
        return optax.chain(self.noise_transform(noise_key, group_names), base)

    # ------------------------------------------------------------------------- describing ---

    def describe(self) -> str:
        if not self.enabled:
            return "non-private (no DP guarantee)"
        if self.noise_multiplier == 0:
            return "no privacy: noise_multiplier is 0, epsilon is infinite"
        return accounting.describe_guarantee(self.sampling)

    def neighbouring_relation(self) -> str:
        relation = f"add-or-remove-one {self.unit}"
        if self.group_size == 1:
            return relation
        return (
            f"{relation}; micro-batch clipping: each example belongs to one of {self.num_cells} "
            f"cells (a setting, not computed from the data) by a hash of its content, the drawn "
            f"members of a cell are clipped together, so adding or removing one example changes "
            f"one cell's clipped sum by at most 2C and leaves every other cell as it was"
        )

    def record(self, steps: int | None = None, *, randomness: str | None = None) -> dict:
        """THE privacy statement after `steps` steps: privacy.json, the checkpoint ledger and
        the public metrics all come from here. `randomness` says how the noise was keyed."""
        steps = self.num_steps if steps is None else steps
        if not self.private:  # no DP, or no noise: no guarantee to describe
            return {
                "epsilon": None,
                "epsilon_is_approximate": False,
                "guarantee": self.describe(),
                "steps": steps,
                "expected_batch_size": self.expected_batch_size,
                "num_examples": self.num_examples,
                "privacy_unit": self.unit,
                "noise_multiplier": self.noise_multiplier,
                "sampling_method": self.sampling if self.enabled else "shuffle (non-private)",
                "covers": "nothing: the run is not differentially private",
            }
        eps = self.epsilon(steps)
        return {
            "epsilon": eps if math.isfinite(eps) else None,
            "delta": self.target_delta,
            "delta_times_num_examples": self.target_delta * self.num_examples,
            "epsilon_is_approximate": self.approximate,
            "guarantee": self.describe(),
            "randomness": randomness,
            "accountant": self.accountant,
            "steps": steps,
            "sampling_prob": self.sampling_prob,
            "expected_batch_size": self.expected_batch_size,
            "num_examples": self.num_examples,
            "privacy_unit": self.unit,
            "epsilon_per": self.unit_kind,
            "noise_multiplier": self.noise_multiplier,
            "accounting_noise_multiplier": self.accounting_noise_multiplier,
            "l2_clip_norm": self.l2_clip_norm,
            "clipping": self.clipping,
            "group_size": self.group_size,
            "num_cells": self.num_cells,
            "secure_noise": self.secure_noise,
            "adaptive_clipping": None
            if self.adaptive is None
            else {
                **dataclasses.asdict(self.adaptive),
                "gradient_noise_multiplier": self.gradient_noise_multiplier,
                "initial_l2_clip_norm": self.l2_clip_norm,
                "note": ADAPTIVE_NOTE[self.clipping],
            },
            "target_epsilon": self.target_epsilon,
            "sampling_method": self.sampling,
            "neighbouring_relation": self.neighbouring_relation(),
            "public_parameters": PUBLIC_PARAMETERS,
            "covers": COVERED,
            "not_covered": NOT_COVERED,
            **({"group_privacy": GROUP_PRIVACY} if self.unit_kind == "block" else {}),
        }

    METRIC_KEYS = (
        "epsilon",
        "epsilon_is_approximate",
        "delta",
        "noise_multiplier",
        "sampling_prob",
    )

    def metrics(self, steps: int) -> dict:
        """The privacy fields of one public metrics record (a subset of `record`)."""
        record = self.record(steps)
        return {k: record.get(k) for k in self.METRIC_KEYS}

    FINGERPRINT_KEYS = (
        "num_examples",
        "expected_batch_size",
        "privacy_unit",
        "epsilon_per",
        "noise_multiplier",
        "l2_clip_norm",
        "clipping",
        "group_size",
        "num_cells",
        "secure_noise",
        "adaptive_clipping",
        "sampling_method",
    )

    def fingerprint(self) -> dict[str, Any]:
        """What of the plan shapes the computation (not the accounting): a run resumed with a
        different fingerprint would add the same noise to different gradients."""
        record = self.record(0)
        return {k: record.get(k) for k in self.FINGERPRINT_KEYS}


def _check_mechanism(
    l2_clip_norm, sampling, clipping, accountant, group_size, num_cells, noise_multiplier,
    target_epsilon,
) -> None:  # fmt: skip
    """`PrivacyPlan.create`'s checks of the mechanism's settings (ValueError naming the fix)."""
    if not (math.isfinite(l2_clip_norm) and l2_clip_norm > 0):
        raise ValueError(f"l2_clip_norm must be a positive number, got {l2_clip_norm}.")
    if sampling not in SAMPLINGS:
        raise ValueError(f"Unknown sampling {sampling!r}; use one of {SAMPLINGS}.")
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"Unknown clipping {clipping!r}; use one of {CLIPPING_MODES}.")
    if accountant not in accounting.ACCOUNTANTS:
        raise ValueError(f"Unknown accountant {accountant!r}; use {accounting.ACCOUNTANTS}.")
    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}.")
    if group_size > 1 and sampling != "poisson":
        raise ValueError("group_size > 1 needs sampling='poisson'.")
    if group_size > 1 and not (
        isinstance(num_cells, int) and not isinstance(num_cells, bool) and num_cells >= 1
    ):
        raise ValueError(
            f"group_size={group_size} (micro-batch clipping) needs num_cells, an integer >= 1 "
            f"fixed from public information before training (e.g. the number of units you "
            f"expect divided by the group size), got {num_cells!r}: a cell count computed "
            f"from the data would change when a unit is added or removed and move every "
            f"example to another cell."
        )
    if group_size == 1 and num_cells is not None:
        raise ValueError("num_cells is micro-batch clipping's: it needs group_size > 1.")
    if noise_multiplier is not None and not (
        math.isfinite(noise_multiplier) and noise_multiplier >= 0
    ):
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
    if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a positive number, got {target_epsilon}.")


def _sensitivity_factor(group_size: int) -> float:
    """Sensitivity of the clipped sum in units of C under add/remove-one.

    Per-example clipping: adding or removing an example adds or removes one vector of norm <= C.
    Group clipping (cells by content hash, `sampling.content_cells`, so no other example changes
    cell): it changes one cell's clipped sum from one vector of norm <= C to another, a change of
    norm <= 2C. The accountant is then given noise_multiplier / 2 (the Poisson-subsampled
    Gaussian with sensitivity 2C).
    """
    return 1.0 if group_size == 1 else 2.0


def _check_common(num_examples, expected_batch_size, steps, epochs, target_delta):
    if not (isinstance(num_examples, int) and num_examples >= 1):
        raise ValueError(f"num_examples must be an integer >= 1, got {num_examples!r}.")
    B = float(expected_batch_size)
    if not B >= 1:
        raise ValueError(f"expected_batch_size must be >= 1, got {expected_batch_size}.")
    if B > num_examples:
        raise ValueError(
            f"expected_batch_size={B:g} exceeds the number of training examples "
            f"({num_examples}); use a smaller batch or more data."
        )
    q = B / num_examples
    if (steps is None) == (epochs is None):
        raise ValueError("Give the number of steps or of epochs (one of them).")
    if epochs is not None:
        if not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"epochs must be a positive number, got {epochs}.")
        steps = math.ceil(epochs / q)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"The number of steps must be an integer >= 1, got {steps!r}.")
    delta = 1.0 / (10 * num_examples) if target_delta is None else float(target_delta)
    if not 0 < delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}.")
    if delta > 1 / num_examples:
        log.warning(
            "target_delta=%.3g exceeds 1/N = %.3g: a mechanism that publishes one random unit "
            "in the clear meets delta = 1/N. Use delta well below 1/N (How to DP-fy ML); "
            "privacy.json states delta * N = %.3g.",
            delta,
            1 / num_examples,
            delta * num_examples,
        )
    return num_examples, B, q, steps, delta
