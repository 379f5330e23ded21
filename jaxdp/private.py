"""`make_private`: DP-SGD for your own training loop, in the spirit of Opacus's
`PrivacyEngine.make_private_with_epsilon` (and jax_privacy's execution plan).

    private = jaxdp.make_private(loss_fn, params, optax.adam(1e-3), num_examples=len(x),
                                 expected_batch_size=64, steps=500, target_epsilon=3.0)
    state = private.initial_state
    for t in range(private.plan.num_steps):
        grads = private.zero_grads(state)
        for batch in private.batches(t, data):        # the step's Poisson draw, fixed shapes
            grads = private.accumulate(state, batch, grads, step=t)   # clipped sum, jitted
        state, metrics = private.update(state, grads)  # noise once, / B, your optimizer, jitted
    private.epsilon()

`loss_fn(params, example, key)` is the loss of ONE example (a dict of arrays without a batch
axis; `key` is a dropout key, or None). Everything that the guarantee rests on comes from the
library: the plan (`jaxdp.plan.PrivacyPlan`: calibration, accounting), Poisson sampling, per-example
clipping (`jaxdp.clipping`), the noise transform keyed by secrets from the operating system's
randomness (`jaxdp.randomness`). Keep `private.secrets` private (and store it, to resume a run:
`Secrets.to_json`); never publish it with the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax

from jaxdp import accounting, randomness, sampling
from jaxdp import steps as steps_lib
from jaxdp.adaptive import AdaptiveClipping
from jaxdp.params import PyTree
from jaxdp.plan import PrivacyPlan
from jaxdp.randomness import Secrets
from jaxdp.release import mechanism_record


@dataclasses.dataclass(frozen=True, repr=False)
class PrivateTraining:
    """What `make_private` returns: the plan, the sampler, the noisy optimizer and the jitted
    DP-SGD functions, bound to one run's secrets."""

    plan: PrivacyPlan
    secrets: Secrets
    optimizer: optax.GradientTransformation  # the noise transform, then yours
    sampler: sampling.PoissonSampler | sampling.ShuffleSampler
    engine: steps_lib.Engine
    physical_batch_size: int
    initial_state: steps_lib.TrainState
    zero_accum: Callable[..., steps_lib.GradAccum]  # jitted (params, thresholds) -> acc
    grad_step: Callable[..., steps_lib.GradAccum]  # jitted (params, batch, key, acc) -> acc
    update_step: Callable[..., tuple[steps_lib.TrainState, dict]]  # jitted (state, acc)

    def __repr__(self) -> str:
        return f"PrivateTraining({self.plan!r})"

    def batches(self, step: int, data: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        """The examples drawn at `step` (Poisson sampling with the secret seed) as padded
        batches of `physical_batch_size` rows: `data`'s arrays indexed by the draw, plus an
        `is_padding` mask. Usually one batch; a large draw takes more, never fewer examples."""
        n = len(next(iter(data.values())))
        if n != self.plan.num_examples:
            raise ValueError(
                f"data has {n} examples; the plan was made for {self.plan.num_examples}."
            )
        idx = self.sampler.sample(step)
        for rows, is_padding in sampling.pad_batches(idx, self.physical_batch_size):
            yield {**{k: np.asarray(v)[rows] for k, v in data.items()}, "is_padding": is_padding}

    def zero_grads(self, state: steps_lib.TrainState) -> steps_lib.GradAccum:
        return self.zero_accum(state.params, steps_lib.clip_thresholds(state))

    def accumulate(
        self,
        state: steps_lib.TrainState,
        batch: dict[str, Any],
        grads: steps_lib.GradAccum,
        *,
        step: int,
        index: int = 0,
    ) -> steps_lib.GradAccum:
        """`grads` plus the clipped per-example gradient sum of one physical batch (`index`:
        which batch of the step, for its dropout keys)."""
        key = randomness.dropout_step_key(self.secrets.dropout_key(), step)
        return self.grad_step(state.params, batch, jax.random.fold_in(key, index), grads)

    def update(
        self, state: steps_lib.TrainState, grads: steps_lib.GradAccum
    ) -> tuple[steps_lib.TrainState, dict[str, Any]]:
        """Adds the noise once, divides by the expected batch size, applies your optimizer.
        The metrics are noise-free statistics of the drawn batch: private diagnostics."""
        return self.update_step(state, grads)

    def step(self, state: steps_lib.TrainState, step: int, data: dict[str, np.ndarray]):
        """One whole logical step: draw, clip and sum, noise, update."""
        grads = self.zero_grads(state)
        for j, batch in enumerate(self.batches(step, data)):
            grads = self.accumulate(state, batch, grads, step=step, index=j)
        return self.update(state, grads)

    def record(self, steps_taken: int | None = None) -> dict[str, Any]:
        """The publishable privacy statement after `steps_taken` steps (default: all planned),
        through the release boundary (`jaxdp.release.mechanism_record`): settings, documented
        public values (N, q, delta, epsilon) and nothing computed from the data."""
        return mechanism_record(self.plan, steps_taken, randomness=self.secrets.label)

    def epsilon(self, steps_taken: int | None = None) -> float:
        """Epsilon at the plan's delta after `steps_taken` steps (default: all planned)."""
        return self.plan.epsilon(steps_taken)

    def get_epsilon(self, delta: float, steps_taken: int | None = None) -> float:
        """Epsilon at another `delta` (Opacus's name)."""
        steps_taken = self.plan.num_steps if steps_taken is None else steps_taken
        return accounting.compute_epsilon(
            self.plan.accounting_noise_multiplier,
            self.plan.sampling_prob,
            steps_taken,
            delta,
            accountant=self.plan.accountant,
        )


def make_private(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    optimizer: optax.GradientTransformation,
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
    clipping: str = "flat",
    microbatch_size: int | None = None,
    physical_batch_size: int | None = None,
    secure_noise: bool = False,
    adaptive: AdaptiveClipping | None = None,
    diagnostics: bool = False,
    secrets: Secrets | None = None,
) -> PrivateTraining:
    """DP-SGD for a per-example `loss_fn(params, example, key)` and an optax `optimizer`.

    Give `noise_multiplier`, or `target_epsilon` to calibrate it (both: a budget that ends the
    run early); `steps` or `epochs`; `target_delta` defaults to 1 / (10 num_examples). The
    privacy unit is one example (one row of the arrays you pass to `batches`); the neighbouring
    relation is add-or-remove-one example. `adaptive` (`jaxdp.adaptive.AdaptiveClipping`):
    the clip norm (or per-layer thresholds) follow a quantile of the gradient norms;
    `diagnostics`: noise-free gradient diagnostics in the metrics (`steps.make_update_step`).
    `secrets` default to fresh OS randomness."""
    return _make_private(
        loss_fn,
        params,
        optimizer,
        PrivacyPlan.create(
            num_examples=num_examples,
            expected_batch_size=expected_batch_size,
            steps=steps,
            epochs=epochs,
            l2_clip_norm=l2_clip_norm,
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            accountant=accountant,
            clipping=clipping,
            secure_noise=secure_noise,
            adaptive=adaptive,
        ),
        steps_lib.Engine("vmap", microbatch_size=microbatch_size, diagnostics=diagnostics),
        physical_batch_size,
        Secrets.generate() if secrets is None else secrets,
    )


def _make_private(loss_fn, params, optimizer, plan, engine, physical_batch_size, secrets):
    tx = plan.optimizer(optimizer, secrets.noise_key(), steps_lib.group_names(engine))
    micro = engine.microbatch_size or 1
    size = physical_batch_size or sampling.default_physical_batch_size(
        plan.expected_batch_size, plan.num_examples, micro
    )
    size = -(-size // micro) * micro  # whole microbatches
    state = steps_lib.TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params)
    )
    return PrivateTraining(
        plan=plan,
        secrets=secrets,
        optimizer=tx,
        sampler=plan.sampler(secrets.sampling),
        engine=engine,
        physical_batch_size=size,
        initial_state=state,
        zero_accum=jax.jit(steps_lib.make_zero_accum(plan, engine)),
        grad_step=jax.jit(
            steps_lib.make_grad_step(plan, engine, loss_fn=loss_fn), donate_argnums=(3,)
        ),
        update_step=jax.jit(steps_lib.make_update_step(tx, plan, engine)),
    )
