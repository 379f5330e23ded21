"""Privacy accounting for DP-SGD: DP events, epsilon, noise calibration (host side).

Thin wrappers over Google's ``dp_accounting`` library. Everything here is plain Python/NumPy and
runs on the host, once per run or per logging step, never inside ``jax.jit``.

The guarantee accounted for is the one DP-SGD gives when it is run as specified:

* Neighbouring relation: add-or-remove-one example (``NeighboringRelation.ADD_OR_REMOVE_ONE``).
  Two datasets are neighbours if one is the other with a single example added or removed.
* Sampling: at every step each of the ``num_examples`` examples is included in the batch
  independently with probability ``sampling_prob`` (Poisson sampling; see
  ``jaxdp.sampling.PoissonSampler``), so the batch size is random with mean
  ``expected_batch_size = sampling_prob * num_examples``.
* Mechanism: each per-example gradient is clipped to l2 norm ``l2_clip_norm``, the clipped
  gradients are summed (l2 sensitivity ``l2_clip_norm`` under add/remove-one) and Gaussian noise
  with standard deviation ``noise_multiplier * l2_clip_norm`` is added to the sum. One step is the
  Poisson-subsampled Gaussian mechanism with noise multiplier ``noise_multiplier``; ``steps``
  steps are its ``steps``-fold adaptive composition.
* Output: the training run is ``(epsilon, target_delta)``-DP, with ``epsilon`` as reported here
  for the given ``target_delta``. The PLD accountant's epsilon is a numerically pessimistic
  upper bound (its discretization rounds privacy loss up); the RDP accountant's is a looser,
  also valid, upper bound.

Sampling modes (``sampling=``):

* ``"poisson"``: the formal guarantee above.
* ``"truncated_poisson"``: Poisson sampling whose draw is truncated to at most
  ``truncated_batch_size`` examples by keeping a uniformly random subset
  (``TruncatedSubsampledGaussianDpEvent``, arXiv:2508.15089). Formal, PLD accountant only.
* ``"shuffle"`` / ``"fixed"``: batches were *not* Poisson-sampled (shuffled fixed-size batches,
  as in ordinary training). The epsilon returned is computed *as if* the batches had been
  Poisson-sampled with the same ``sampling_prob``; it is NOT a formal guarantee for what was run.
  Callers must label such numbers as approximate, e.g. with ``describe_guarantee(sampling)``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import dp_accounting
from dp_accounting import pld, rdp

ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
SAMPLINGS: tuple[str, ...] = ("poisson", "truncated_poisson", "shuffle", "fixed")
APPROXIMATE_SAMPLINGS: tuple[str, ...] = ("shuffle", "fixed")

# Bounds of the noise-multiplier search in `calibrate_noise_multiplier`.
MAX_NOISE_MULTIPLIER: float = 1e4
MIN_NOISE_MULTIPLIER: float = 1e-3


def make_accountant(
    accountant: str = "pld", *, pld_discretization: float = 1e-4
) -> dp_accounting.PrivacyAccountant:
    """Returns a fresh (empty) accountant for the add-or-remove-one neighbouring relation.

    Args:
      accountant: ``"pld"`` (privacy loss distributions; tight, ~0.3 s per DP-SGD evaluation at
        the default discretization) or ``"rdp"`` (Renyi DP; looser, ~20 ms).
      pld_discretization: value discretization interval of the PLD accountant. Larger is faster
        and still a valid (more pessimistic) upper bound. Ignored for ``"rdp"``.
    """
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if accountant == "pld":
        if not pld_discretization > 0:
            raise ValueError(f"pld_discretization must be > 0, got {pld_discretization}.")
        return pld.PLDAccountant(
            neighboring_relation=relation, value_discretization_interval=pld_discretization
        )
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    raise ValueError(f"Unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}.")


def describe_guarantee(sampling: str = "poisson") -> str:
    """A human-readable label for the guarantee an epsilon computed for ``sampling`` carries.

    For ``"shuffle"`` / ``"fixed"`` the label starts with ``"APPROXIMATE"``: the number was
    computed as if batches were Poisson-sampled, which they were not.
    """
    _check_sampling(sampling)
    if sampling == "poisson":
        return "Poisson-subsampled Gaussian (add/remove-one)"
    if sampling == "truncated_poisson":
        return "truncated-Poisson-subsampled Gaussian (add/remove-one)"
    return (
        "APPROXIMATE: computed as if Poisson-sampled; batches were "
        f"{'shuffled' if sampling == 'shuffle' else 'fixed-size'}, not Poisson-sampled - "
        "this is not a formal guarantee"
    )


def dpsgd_event(
    noise_multiplier: float,
    sampling_prob: float,
    steps: int,
    *,
    sampling: str = "poisson",
    num_examples: int | None = None,
    truncated_batch_size: int | None = None,
) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of ``steps`` DP-SGD steps (see the module docstring for the guarantee).

    Args:
      noise_multiplier: noise std divided by ``l2_clip_norm``; ``>= 0``. Zero gives a
        ``NonPrivateDpEvent`` (epsilon is infinite) unless ``steps == 0``.
      sampling_prob: per-example inclusion probability ``q`` of each step, ``0 < q <= 1``.
      steps: number of noisy gradient steps, ``>= 0``. Zero gives ``NoOpDpEvent`` (epsilon 0).
      sampling: one of ``SAMPLINGS``. ``"shuffle"``/``"fixed"`` return the Poisson event (an
        approximation; see the module docstring).
      num_examples: dataset size; required for ``"truncated_poisson"``.
      truncated_batch_size: maximum batch size after truncation; required for
        ``"truncated_poisson"``.
    """
    noise_multiplier = _check_noise_multiplier(noise_multiplier)
    sampling_prob = _check_sampling_prob(sampling_prob)
    steps = _check_steps(steps)
    _check_sampling(sampling)
    if sampling == "truncated_poisson":
        if num_examples is None or truncated_batch_size is None:
            raise ValueError(
                "sampling='truncated_poisson' needs num_examples and truncated_batch_size."
            )
        num_examples = _check_positive_int("num_examples", num_examples)
        truncated_batch_size = _check_positive_int("truncated_batch_size", truncated_batch_size)
    if steps == 0:
        return dp_accounting.NoOpDpEvent()
    if noise_multiplier == 0:
        return dp_accounting.NonPrivateDpEvent()
    if sampling == "truncated_poisson":
        step_event: dp_accounting.DpEvent = dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=num_examples,
            sampling_probability=sampling_prob,
            truncated_batch_size=truncated_batch_size,
            noise_multiplier=noise_multiplier,
        )
    else:
        step_event = dp_accounting.PoissonSampledDpEvent(
            sampling_probability=sampling_prob,
            event=dp_accounting.GaussianDpEvent(noise_multiplier=noise_multiplier),
        )
    return dp_accounting.SelfComposedDpEvent(event=step_event, count=steps)


def compute_epsilon(
    noise_multiplier: float,
    sampling_prob: float,
    steps: int,
    target_delta: float,
    *,
    accountant: str = "pld",
    sampling: str = "poisson",
    num_examples: int | None = None,
    truncated_batch_size: int | None = None,
    pld_discretization: float = 1e-4,
) -> float:
    """Epsilon such that ``steps`` DP-SGD steps are ``(epsilon, target_delta)``-DP.

    Add-or-remove-one neighbours; see the module docstring. For ``sampling`` in
    ``("shuffle", "fixed")`` this is the Poisson number, which is only an approximation: label it
    with ``describe_guarantee(sampling)``. Returns ``math.inf`` if ``noise_multiplier == 0`` and
    ``steps > 0``; ``0.0`` if ``steps == 0``.
    """
    target_delta = _check_delta(target_delta)
    acc = _composed_accountant(
        noise_multiplier,
        sampling_prob,
        steps,
        accountant,
        sampling,
        num_examples,
        truncated_batch_size,
        pld_discretization,
    )
    return float(acc.get_epsilon(target_delta))


def compute_delta(
    noise_multiplier: float,
    sampling_prob: float,
    steps: int,
    target_epsilon: float,
    *,
    accountant: str = "pld",
    sampling: str = "poisson",
    num_examples: int | None = None,
    truncated_batch_size: int | None = None,
    pld_discretization: float = 1e-4,
) -> float:
    """Delta such that ``steps`` DP-SGD steps are ``(target_epsilon, delta)``-DP.

    Same setting and caveats as ``compute_epsilon``.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon >= 0):
        raise ValueError(f"target_epsilon must be finite and >= 0, got {target_epsilon}.")
    acc = _composed_accountant(
        noise_multiplier,
        sampling_prob,
        steps,
        accountant,
        sampling,
        num_examples,
        truncated_batch_size,
        pld_discretization,
    )
    return float(acc.get_delta(target_epsilon))


def _composed_accountant(
    noise_multiplier,
    sampling_prob,
    steps,
    accountant,
    sampling,
    num_examples,
    truncated_batch_size,
    pld_discretization,
) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant that has composed `steps` DP-SGD steps."""
    event = dpsgd_event(
        noise_multiplier,
        sampling_prob,
        steps,
        sampling=sampling,
        num_examples=num_examples,
        truncated_batch_size=truncated_batch_size,
    )
    return _compose(make_accountant(accountant, pld_discretization=pld_discretization), event)


def calibrate_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sampling_prob: float,
    steps: int,
    *,
    accountant: str = "pld",
    sampling: str = "poisson",
    num_examples: int | None = None,
    truncated_batch_size: int | None = None,
    pld_discretization: float = 1e-4,
    tol: float = 1e-4,
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """Smallest noise multiplier (within ``tol``) for which ``steps`` steps are
    ``(target_epsilon, target_delta)``-DP.

    The result ``sigma`` satisfies ``compute_epsilon(sigma, ...) <= target_epsilon`` with the same
    accountant and arguments (guaranteed by ``dp_accounting.calibrate_dp_mechanism``), and
    ``sigma - tol`` does not (up to the accountant's numerics). Search: an RDP calibration (cheap)
    supplies a guess, which is bracketed with the chosen accountant and refined with
    ``calibrate_dp_mechanism`` (Brent's method).

    Raises:
      ValueError: if the target is invalid (``target_epsilon <= 0``, ``target_delta`` outside
        ``(0, 1)``, ``steps == 0``) or unreachable with ``noise_multiplier <=
        max_noise_multiplier``, with a message saying what to change.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(
            f"target_epsilon must be finite and > 0, got {target_epsilon}; "
            "no finite noise multiplier gives epsilon <= 0."
        )
    target_delta = _check_delta(target_delta)
    sampling_prob = _check_sampling_prob(sampling_prob)
    steps = _check_steps(steps)
    if steps == 0:
        raise ValueError("steps must be >= 1 to calibrate: zero steps is private at any noise.")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}.")

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        return dpsgd_event(
            sigma,
            sampling_prob,
            steps,
            sampling=sampling,
            num_examples=num_examples,
            truncated_batch_size=truncated_batch_size,
        )

    def make_fresh() -> dp_accounting.PrivacyAccountant:
        return make_accountant(accountant, pld_discretization=pld_discretization)

    def poisson_event(sigma: float) -> dp_accounting.DpEvent:
        return dpsgd_event(sigma, sampling_prob, steps)

    _check_supported(make_fresh(), make_event(1.0))  # Fail early, before any search.
    unreachable = (
        f"target_epsilon={target_epsilon} at target_delta={target_delta} needs a noise multiplier "
        f"above {max_noise_multiplier} for {steps} steps at sampling_prob={sampling_prob}; use "
        "fewer steps, a smaller sampling_prob (larger dataset or smaller expected batch size), "
        "or a larger target_epsilon / target_delta."
    )
    too_loose = (
        f"target_epsilon={target_epsilon} is so large that a noise multiplier below "
        f"{MIN_NOISE_MULTIPLIER} already meets it; choose a smaller target_epsilon."
    )

    def search(fresh, event_fn, guess: float, factor: float, tol_: float) -> float:
        eps = lambda sigma: fresh().compose(event_fn(sigma)).get_epsilon(target_delta)
        lo, hi = _bracket(eps, target_epsilon, guess, factor, max_noise_multiplier, unreachable)
        if lo is None:
            raise ValueError(too_loose)
        return _calibrate(fresh, event_fn, target_epsilon, target_delta, lo, hi, tol_)

    if accountant == "rdp":
        return search(make_fresh, make_event, 1.0, 2.0, tol)
    # PLD evaluations are slow (seconds for small sigma), so bracket around a cheap RDP guess of
    # the Poisson event (RDP does not support truncated Poisson; a guess is all that is needed).
    try:
        guess = search(_make_rdp, poisson_event, 1.0, 2.0, 1e-3)
    except _UnreachableError:
        guess = max_noise_multiplier  # RDP is looser; let the real accountant decide.
    return search(make_fresh, make_event, guess, 1.1, tol)


def max_steps_within_budget(
    noise_multiplier: float,
    sampling_prob: float,
    target_epsilon: float,
    target_delta: float,
    *,
    accountant: str = "pld",
    sampling: str = "poisson",
    num_examples: int | None = None,
    truncated_batch_size: int | None = None,
    pld_discretization: float = 1e-4,
    upper: int = 1_000_000,
) -> int:
    """Largest ``k <= upper`` with ``compute_epsilon(noise_multiplier, ..., k) <= target_epsilon``.

    Returns 0 if even one step exceeds the budget (e.g. ``noise_multiplier == 0``) and ``upper``
    if ``upper`` steps fit. Epsilon is nondecreasing in the number of steps, so this is a
    galloping + binary search, ``O(log k)`` accountant evaluations (PLD: ~0.3 s each), started
    from a cheap RDP estimate.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon >= 0):
        raise ValueError(f"target_epsilon must be finite and >= 0, got {target_epsilon}.")
    target_delta = _check_delta(target_delta)
    upper = _check_positive_int("upper", upper)
    kwargs = dict(
        accountant=accountant,
        sampling=sampling,
        num_examples=num_examples,
        truncated_batch_size=truncated_batch_size,
        pld_discretization=pld_discretization,
    )

    def fits(k: int, **overrides) -> bool:
        args = kwargs | overrides
        return compute_epsilon(noise_multiplier, sampling_prob, k, target_delta, **args) <= (
            target_epsilon
        )

    start = 1
    if accountant != "rdp":
        # RDP is looser, so its answer is usually a slight underestimate: a good starting point.
        rdp_only = dict(accountant="rdp", sampling="poisson")
        start = max(1, _max_steps(lambda k: fits(k, **rdp_only), 1, upper))
    return _max_steps(fits, start, upper)


# --------------------------------------------------------------------------------------------
# Internals.


def _max_steps(fits: Callable[[int], bool], start: int, upper: int) -> int:
    """Largest k in [0, upper] with fits(k), assuming fits is monotone (True then False)."""
    start = min(start, upper)
    if fits(start):
        lo, hi = start, None  # fits(lo); hi is the first known failure.
        while hi is None:
            if lo == upper:
                return upper
            nxt = min(2 * lo, upper)
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
    else:
        hi, lo = start, None
        while lo is None:
            if hi == 1:
                return 0
            nxt = hi // 2
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


class _UnreachableError(ValueError):
    """The target epsilon needs more noise than the search allows."""


def _bracket(
    eps_fn: Callable[[float], float],
    target: float,
    guess: float,
    factor: float,
    max_sigma: float,
    unreachable: str,
) -> tuple[float | None, float]:
    """Finds lo < hi with finite eps(lo) > target >= eps(hi), growing/shrinking by ``factor``.

    Returns ``(None, hi)`` if even ``MIN_NOISE_MULTIPLIER`` meets the target.
    """
    cache: dict[float, float] = {}

    def eps(sigma: float) -> float:
        if sigma not in cache:
            cache[sigma] = eps_fn(sigma)
        return cache[sigma]

    guess = min(max(guess, MIN_NOISE_MULTIPLIER), max_sigma)
    if eps(guess) <= target:
        hi = guess
        while True:
            if hi <= MIN_NOISE_MULTIPLIER:
                return None, hi
            lo = max(hi / factor, MIN_NOISE_MULTIPLIER)
            if eps(lo) > target:
                break
            hi = lo
    else:
        lo = guess
        while True:
            if lo >= max_sigma:
                raise _UnreachableError(unreachable)
            hi = min(lo * factor, max_sigma)
            if eps(hi) <= target:
                break
            lo = hi
    # Brent's method needs a finite value at the lower end: bisect (geometrically) while inf.
    while not math.isfinite(eps(lo)):
        mid = math.sqrt(lo * hi)
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return lo, hi


def _calibrate(
    make_fresh: Callable[[], dp_accounting.PrivacyAccountant],
    make_event: Callable[[float], dp_accounting.DpEvent],
    target_epsilon: float,
    target_delta: float,
    lo: float,
    hi: float,
    tol: float,
) -> float:
    try:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                make_fresh,
                make_event,
                target_epsilon,
                target_delta,
                bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
                tol=tol,
            )
        )
    except (ValueError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError) as e:
        raise ValueError(f"Noise calibration failed: {e}") from e


def _make_rdp() -> dp_accounting.PrivacyAccountant:
    """The RDP accountant for PLD calibration's initial guess: integer orders only, whose
    subsampled-Gaussian bounds are closed-form (fractional orders near 1 can fail to converge
    and fill the log with warnings; a guess does not need them)."""
    return rdp.RdpAccountant(
        orders=[float(a) for a in range(2, 257)],
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def _compose(
    acc: dp_accounting.PrivacyAccountant, event: dp_accounting.DpEvent
) -> dp_accounting.PrivacyAccountant:
    _check_supported(acc, event)
    return acc.compose(event)


def _check_supported(acc: dp_accounting.PrivacyAccountant, event: dp_accounting.DpEvent) -> None:
    if not acc.supports(event):
        name = "pld" if isinstance(acc, pld.PLDAccountant) else "rdp"
        raise ValueError(
            f"The {name!r} accountant does not support {event}; use accountant='pld' for "
            "sampling='truncated_poisson'."
        )


def _check_sampling(sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise ValueError(f"Unknown sampling {sampling!r}; choose one of {SAMPLINGS}.")


def _check_noise_multiplier(noise_multiplier: float) -> float:
    noise_multiplier = float(noise_multiplier)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}.")
    return noise_multiplier


def _check_sampling_prob(sampling_prob: float) -> float:
    sampling_prob = float(sampling_prob)
    if not 0 < sampling_prob <= 1:
        raise ValueError(
            f"sampling_prob must be in (0, 1], got {sampling_prob} "
            "(sampling_prob = expected_batch_size / num_examples)."
        )
    return sampling_prob


def _check_steps(steps: int) -> int:
    try:
        steps = operator.index(steps)
    except TypeError:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}.") from None
    if steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}.")
    return steps


def _check_positive_int(name: str, value: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}.")
    return value


def _check_delta(target_delta: float) -> float:
    target_delta = float(target_delta)
    if not 0 < target_delta < 1:
        raise ValueError(
            f"target_delta must be in (0, 1), got {target_delta}; "
            "a common choice is below 1 / num_examples."
        )
    return target_delta


class EpsilonCurve:
    """epsilon(steps) of Poisson-sampled DP-SGD at fixed (noise_multiplier, sampling_prob, delta).

    The same numbers as `compute_epsilon`, but the one-step privacy loss distribution (the costly
    part of PLD accounting, seconds at small noise multipliers) is built once and self-composed
    per query, and answers are memoised: cheap enough to report epsilon after every logged step.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling_prob: float,
        target_delta: float,
        *,
        accountant: str = "pld",
        pld_discretization: float = 1e-4,
    ):
        self.noise_multiplier = noise_multiplier
        self.sampling_prob = sampling_prob
        self.target_delta = _check_delta(target_delta)
        self.accountant = accountant
        self.pld_discretization = pld_discretization
        self._one_step = None
        self._cache: dict[int, float] = {}
        make_accountant(accountant)  # validates the name

    def __call__(self, steps: int) -> float:
        if steps not in self._cache:
            self._cache[steps] = self._epsilon(steps)
        return self._cache[steps]

    def _epsilon(self, steps: int) -> float:
        if steps == 0 or self.noise_multiplier == 0 or self.accountant != "pld":
            return compute_epsilon(
                self.noise_multiplier,
                self.sampling_prob,
                steps,
                self.target_delta,
                accountant=self.accountant,
                pld_discretization=self.pld_discretization,
            )
        if self._one_step is None:
            from dp_accounting.pld import privacy_loss_distribution as pld_lib

            # Exactly what PLDAccountant composes for a PoissonSampledDpEvent(GaussianDpEvent).
            self._one_step = pld_lib.from_gaussian_mechanism(
                standard_deviation=self.noise_multiplier,
                value_discretization_interval=self.pld_discretization,
                sampling_prob=self.sampling_prob,
                neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            )
        pld = self._one_step.self_compose(steps)
        return float(pld.get_epsilon_for_delta(self.target_delta))
