"""The jitted train and eval steps of DP-SGD (and of its non-private twin).

One logical DP-SGD step t is:

    acc = zero_accum(params)
    for each physical batch j of the examples drawn at step t:            # fixed shape [P, ...]
        acc = grad_step(params, batch_j, fold_in(dropout_key_t, j), acc)  # += sum_u clip(g_u, C)
    state, metrics = update_step(state, acc)                             # + noise once, / B, optax

so the noise is added once per logical step however many physical batches the drawn batch
needed (gradient accumulation with DP semantics), and padding rows contribute exactly zero.
With a non-private plan (or none) the same loop computes the plain mean gradient over the drawn
examples. `grad_step` and `update_step` are pure functions of their arguments; `shard_and_jit`
jits them over a device mesh.

The privacy settings (clip norm, clipping mode, noise) come from a `jaxdp.plan.PrivacyPlan`; how
the clipped sum is computed is an `Engine` (vmap or ghost, microbatch size): a performance
choice that never changes the result beyond float rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxdp import clipping, fused, ghost, sharding
from jaxdp.clipping import NORM_BINS, ClipStats
from jaxdp.loss import example_loss, model_example_loss, next_token_losses, token_accuracy
from jaxdp.noise import GaussianNoiseState
from jaxdp.params import PyTree, merge, split
from jaxdp.plan import PrivacyPlan

# Per-example clipping engines (jaxdp.clipping, jaxdp.ghost, jaxdp.fused).
ENGINES = ("vmap", "ghost", "fused")
# {"tokens": [P, T] int32, "is_padding": [P] bool, optional "segment_ids": [P] int32}
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Engine:
    """How the clipped per-example gradient sum is computed: a speed/memory choice only.

    name: "vmap" (per-example gradients by `jax.vmap`, `jaxdp.clipping`), "ghost" (norms from
      layer inputs and output gradients, book-kept sums, `jaxdp.ghost`; GPT-2 models only) or
      "fused" (per-layer clipping inside backpropagation, `jaxdp.fused`; GPT-2 models,
      per-layer clipping, one row per unit).
    ghost_strategy: the ghost engine's per-layer choice, "auto" | "ghost" | "instantiate" for
      every layer, or a per-layer plan ((layer, strategy), ...) (`jaxdp.clipping_plan`).
    microbatch_size: examples per DEVICE in one vectorised chunk (None: the whole batch).
    diagnostics: the noise-free gradient diagnostics of `make_update_step` (norm quantiles,
      signal to noise, and with the vmap and ghost engines m-coherence, for which the UNCLIPPED
      gradient sum is accumulated too: a parameter-sized accumulator and, for ghost, a second
      book-keeping sum). The fused engine has no m-coherence: it never forms a whole
      per-example gradient (the tied embedding's two sides are clipped apart).
    """

    name: str = "vmap"
    ghost_strategy: str | tuple[tuple[str, str], ...] = "auto"
    microbatch_size: int | None = None
    diagnostics: bool = False

    def __post_init__(self):
        if self.name not in ENGINES:
            raise ValueError(f"Unknown clipping engine {self.name!r}; use one of {ENGINES}.")
        ghost.check_strategy(self.ghost_strategy)
        if self.microbatch_size is not None and not (
            isinstance(self.microbatch_size, int) and self.microbatch_size >= 1
        ):
            raise ValueError(f"microbatch_size must be >= 1, got {self.microbatch_size!r}.")

    def per_step_microbatch(self, num_devices: int) -> int | None:
        """Examples per chunk over the whole mesh (what the scan over chunks sees)."""
        return None if self.microbatch_size is None else self.microbatch_size * num_devices


class TrainState(struct.PyTreeNode):
    step: jax.Array  # logical steps taken
    params: PyTree  # the trainable parameters: clipped, noised, updated
    opt_state: PyTree
    frozen: PyTree = None  # parameters that are not trained (an empty State if all are)


class GradAccum(struct.PyTreeNode):
    grad_sum: PyTree  # DP: sum of clipped per-unit grads; else sum of per-example grads
    stats: ClipStats
    # This step's clipping thresholds [K_c] (adaptive clipping); empty: the plan's fixed norm.
    thresholds: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((0,)))
    raw_sum: PyTree = None  # the UNCLIPPED sum (Engine.diagnostics), else None


def _dp(plan: PrivacyPlan | None) -> bool:
    return plan is not None and plan.enabled


def _raw_sum(plan: PrivacyPlan | None, engine: Engine) -> bool:
    return _dp(plan) and engine.diagnostics and engine.name != "fused"


def init_state(
    model: nnx.Module, tx: optax.GradientTransformation, trainable: Sequence[str] = ()
) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, TrainState): the parameters whose paths match `trainable` (regexes, see
    `jaxdp.params`; all if empty) are trained, the rest is kept frozen."""
    graphdef, params, frozen = split(model, trainable)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), frozen=frozen
    )
    return graphdef, state


def _noise_states(opt_state: PyTree) -> list[GaussianNoiseState]:
    """The noise transform's states in an optimizer state (one under `PrivacyPlan.optimizer`)."""
    is_noise = lambda x: isinstance(x, GaussianNoiseState)
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_noise) if is_noise(x)]


def noise_key_matches(state: TrainState, key: jax.Array) -> bool:
    """Whether the noise transform's state in `state.opt_state` holds `key` (collective under
    multi-host sharding: call it on every process)."""
    found = _noise_states(state.opt_state)
    if len(found) != 1:
        return False
    stored = sharding.to_host(found[0].key)
    return bool(np.array_equal(stored, np.asarray(jax.random.key_data(key))))


def zero_accum(
    params: PyTree,
    thresholds: jax.Array | None = None,
    raw_sum: bool = False,
    num_groups: int = 1,
    num_thresholds: int = 1,
) -> GradAccum:
    """An empty accumulator for one logical step. `thresholds`: the step's clipping thresholds
    (`clip_thresholds(state)`; needed with adaptive clipping); `raw_sum`: Engine.diagnostics;
    the stats' sizes (`make_zero_accum` knows them; else they grow on the first `grad_step`).

    The sums are float32 whatever the parameters' dtype: the clipped sum (and the noise added to
    it) is never rounded to a lower precision before the noise is added."""
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return GradAccum(
        grad_sum=zeros(),
        stats=ClipStats.zeros(num_thresholds, num_groups),
        thresholds=jnp.zeros((0,), jnp.float32) if thresholds is None else thresholds,
        raw_sum=zeros() if raw_sum else None,
    )


def make_zero_accum(plan: PrivacyPlan | None, engine: Engine = Engine()):
    """zero_accum(params, thresholds=None) with the stats' sizes of `plan` and `engine`."""

    def fn(params: PyTree, thresholds: jax.Array | None = None) -> GradAccum:
        if not _dp(plan):
            return zero_accum(params)
        k = len(group_names(engine)(params))
        return zero_accum(
            params,
            thresholds,
            raw_sum=_raw_sum(plan, engine),
            num_groups=k,
            num_thresholds=k if plan.clipping == "per_layer" else 1,
        )

    return fn


def clip_thresholds(state: TrainState) -> jax.Array:
    """The clipping thresholds the next step uses: adaptive clipping keeps them in the noise
    transform's state ([C_t], or one per group); empty when the clip norm is fixed."""
    found = _noise_states(state.opt_state)
    if not found or found[0].clip_norms is None:
        return jnp.zeros((0,), jnp.float32)
    return found[0].clip_norms


def group_names(engine: Engine) -> Callable[[PyTree], list[str]]:
    """params -> the names of the engine's per-layer clipping groups (`jaxdp.fused.groups` for
    the fused engine, one per parameter tensor otherwise)."""
    if engine.name == "fused":
        return fused.groups
    return lambda params: [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
    ]


def make_grad_step(
    plan: PrivacyPlan | None,
    engine: Engine = Engine(),
    *,
    graphdef: nnx.GraphDef | None = None,
    loss_fn: Callable[..., jax.Array] | None = None,
    num_devices: int = 1,
) -> Callable[..., GradAccum]:
    """grad_step(params, batch, key, acc, frozen=None) -> acc + this physical batch's gradient sum.

    The model is either a jaxdp GPT-2 (`graphdef`; the loss is `loss.model_example_loss`, and
    the ghost engine and frozen parameters are available) or any per-example loss
    `loss_fn(params, example, key)` of ONE example (vmap engine). Gradients are taken with
    respect to `params` only. Under DP each clipping unit (an example, or the rows sharing a
    `segment_ids` value) contributes at most `plan.l2_clip_norm`."""
    if (graphdef is None) == (loss_fn is None):
        raise ValueError("Give the model's graphdef or a per-example loss_fn (one of them).")
    if engine.name in ("ghost", "fused") and graphdef is None:
        raise ValueError(
            f"The {engine.name} engine needs a jaxdp GPT-2 model (graphdef), not a loss_fn."
        )
    if _dp(plan) and engine.name == "fused" and plan.clipping != "per_layer":
        raise ValueError("The fused engine clips per layer: use clipping='per_layer'.")
    microbatch = engine.per_step_microbatch(num_devices)
    raw = _raw_sum(plan, engine)

    def example_loss_fn(frozen):
        return loss_fn if loss_fn is not None else model_example_loss(graphdef, frozen)

    def grad_step(params, batch: Batch, key, acc: GradAccum, frozen=None) -> GradAccum:
        if _dp(plan) and engine.name in ("ghost", "fused"):
            _check_float32(params, engine.name)
        is_padding, segment_ids = batch["is_padding"], batch.get("segment_ids")
        examples = {k: v for k, v in batch.items() if k not in ("is_padding", "segment_ids")}
        thresholds = acc.thresholds if acc.thresholds.shape[0] else None
        if _dp(plan) and plan.adaptive is not None and thresholds is None:
            raise ValueError(
                "Adaptive clipping: start each step's accumulator with the state's thresholds, "
                "zero_accum(params, clip_thresholds(state)) (make_zero_accum)."
            )
        if _dp(plan):
            if engine.name == "ghost":
                clipped = ghost.ghost_clipped_grad(
                    graphdef,
                    plan.l2_clip_norm,
                    microbatch_size=microbatch,
                    frozen=frozen,
                    strategy=engine.ghost_strategy,
                    clipping=plan.clipping,
                    with_raw_sum=raw,
                )
            elif engine.name == "fused":
                clipped = fused.fused_clipped_grad(
                    graphdef, plan.l2_clip_norm, microbatch_size=microbatch, frozen=frozen
                )
            else:
                clipped = clipping.clipped_grad(
                    example_loss_fn(frozen),
                    plan.l2_clip_norm,
                    microbatch_size=microbatch,
                    clipping=plan.clipping,
                    with_raw_sum=raw,
                )
            sums, stats = clipped(params, examples, is_padding, key, segment_ids, thresholds)
            grad_sum, raw_sum = sums if raw else (sums, None)
        else:
            grad_sum, stats = _summed_grad(graphdef, example_loss_fn(frozen), frozen)(
                params, examples, is_padding, key
            )
            raw_sum = None
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return acc.replace(
            grad_sum=add(acc.grad_sum, grad_sum),
            stats=jax.tree.map(jnp.add, acc.stats, stats),
            raw_sum=None if raw_sum is None else add(acc.raw_sum, raw_sum),
        )

    return grad_step


def _check_float32(params: PyTree, engine: str) -> None:
    """The ghost and fused engines return their clipped sums in the parameters' dtype (a
    custom_vjp's cotangent has its primal's dtype): refuse trainable parameters that are not
    float32, whose rounding could let one unit contribute more than C."""
    low = sorted({str(x.dtype) for x in jax.tree.leaves(params) if x.dtype != jnp.float32})
    if low:
        raise ValueError(
            f"The {engine} engine needs float32 trainable parameters, got {', '.join(low)}: "
            f"keep the parameters float32 and compute in bf16 (train.dtype / "
            f"GPT2Config.compute_dtype), or use the vmap engine, whose clipped sums and noise "
            f"stay float32 for any parameter dtype."
        )


def _summed_grad(graphdef, loss_fn, frozen):
    """Non-private: the gradient of the summed loss over the real rows (one batched pass)."""

    def summed_loss(params, examples, real, key):
        if graphdef is not None:  # the whole batch through the model at once
            model = merge(graphdef, params, frozen)
            logits = model(examples["tokens"], dropout_key=key)  # [P, T, V]
            per_example = example_loss(logits, examples["tokens"], examples.get("token_mask"))
        else:
            P = real.shape[0]
            keys = jax.random.split(key, P) if key is not None else None
            in_axes = (None, 0, None if keys is None else 0)
            per_example = jax.vmap(loss_fn, in_axes=in_axes)(params, examples, keys)
        return jnp.sum(per_example * real)

    def fn(params, examples, is_padding, key):
        real = (~is_padding).astype(jnp.float32)
        loss_sum, grad_sum = jax.value_and_grad(summed_loss)(params, examples, real, key)
        stats = ClipStats.zeros()._replace(loss_sum=loss_sum, num_examples=jnp.sum(real))
        return grad_sum, stats

    return fn


def make_update_step(
    tx: optax.GradientTransformation, plan: PrivacyPlan | None, engine: Engine = Engine()
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """update_step(state, acc) -> (state, metrics): noise (DP) or mean (non-DP), then optax.

    Under DP, `tx` must be `plan.optimizer(base, noise_key)`: its first transform adds the noise
    to the clipped sum and divides by the EXPECTED batch size. `metrics` are noise-free
    statistics of the drawn batch (private diagnostics), except `metrics["public"]` (DP runs):
    quantities computed from the noisy release only, covered by epsilon:

      noise_to_batch   sigma / B (the plan's constants)
      snr_estimate     sqrt(max(||noisy sum||^2 - d (sigma C)^2, 0)) / (sigma C sqrt(d)): the
                       signal to noise ratio estimated from the noisy sum (d trainable values)
      clip_norm / clip_thresholds, fraction_below   adaptive clipping: the thresholds this step
                       used and the released fraction of units below them

    With `engine.diagnostics` the private metrics also hold (raw gradients, NOT covered):
    norm_p50/p90/p99 (per-unit norms, to within a histogram bin, a factor 1.12), snr
    (||clipped sum|| / (sigma C sqrt(d))), and with the vmap and ghost engines m_coherence
    (||sum_u g_u||^2 / sum_u ||g_u||^2 over the drawn units: m for m identical gradients, 1 for
    orthogonal ones; exact over microbatches and physical batches) and m_coherence_per_group."""

    def update_step(state: TrainState, acc: GradAccum):
        n = acc.stats.num_examples
        extra = {}
        if _dp(plan):
            grads = acc.grad_sum  # the noise transform adds N(0, s^2 C^2) and divides by B
            if plan.adaptive is not None:
                # The noise transform scales its noise to the thresholds the sums were clipped
                # with (and checks them against its own).
                extra["below"], extra["thresholds"] = acc.stats.below, acc.thresholds
        else:  # (the float32 mean, in the parameters' dtype)
            grads = jax.tree.map(
                lambda g, p: (g / jnp.maximum(n, 1.0)).astype(p.dtype), acc.grad_sum, state.params
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.maximum(n - acc.stats.num_nonfinite, 1.0)
        metrics = {  # noise-free statistics of the drawn examples: private diagnostics
            "train_loss": acc.stats.loss_sum / finite,
            "batch_size": n,
            "clip_fraction": acc.stats.num_clipped / jnp.maximum(n, 1.0),
            "num_nonfinite": acc.stats.num_nonfinite,
            "grad_norm_mean": acc.stats.norm_sum / finite,
        }
        if _dp(plan) and plan.private:
            metrics.update(_dp_metrics(plan, engine, state, opt_state, acc))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return update_step


def _dp_metrics(plan, engine, state, opt_state, acc) -> dict[str, Any]:
    (noise,) = _noise_states(opt_state)
    d = sum(x.size for x in jax.tree.leaves(state.params))
    total_c = plan.l2_clip_norm
    public: dict[str, Any] = {"noise_to_batch": plan.noise_multiplier / plan.expected_batch_size}
    if plan.adaptive is not None:
        if plan.clipping == "flat":
            total_c = acc.thresholds[0]
            public["clip_norm"] = acc.thresholds[0]
            public["fraction_below"] = noise.noisy_fraction[0]
        else:
            public["clip_thresholds"] = acc.thresholds
            public["fraction_below"] = noise.noisy_fraction
    noise_std = plan.gradient_noise_multiplier * total_c
    signal_sq = jnp.maximum(noise.noisy_sq_norm - d * noise_std**2, 0.0)
    public["snr_estimate"] = jnp.sqrt(signal_sq) / (noise_std * math.sqrt(d))
    out: dict[str, Any] = {"public": public}
    if not engine.diagnostics:
        return out
    clipped_sq = sum(
        jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(acc.grad_sum)
    )
    out["snr"] = jnp.sqrt(clipped_sq) / (noise_std * math.sqrt(d))
    for q in (50, 90, 99):
        out[f"norm_p{q}"] = _hist_quantile(acc.stats.norm_hist, q / 100)
    if acc.raw_sum is not None:
        per_group = jnp.stack(
            [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(acc.raw_sum)]
        )
        denominators = acc.stats.group_sq_norms
        out["m_coherence"] = jnp.sum(per_group) / jnp.maximum(jnp.sum(denominators), 1e-30)
        out["m_coherence_per_group"] = per_group / jnp.maximum(denominators, 1e-30)
    return out


def _hist_quantile(hist: jax.Array, q: float) -> jax.Array:
    """The q-quantile of the values counted in `hist` (bins of clipping.NORM_BINS), as the
    geometric middle of its bin."""
    edges = jnp.asarray(NORM_BINS, jnp.float32)
    cum = jnp.cumsum(hist)
    j = jnp.argmax(cum >= q * cum[-1])  # first bin reaching the quantile
    lower = edges[jnp.clip(j - 1, 0, len(NORM_BINS) - 1)]
    upper = edges[jnp.clip(j, 0, len(NORM_BINS) - 1)]
    return jnp.sqrt(lower * upper)


def make_eval_step(graphdef: nnx.GraphDef) -> Callable[..., dict[str, jax.Array]]:
    """eval_step(params, batch, frozen=None) -> token sums: loss_sum, num_tokens, num_correct."""

    def eval_step(params, batch: Batch, frozen=None):
        model = merge(graphdef, params, frozen)
        tokens = batch["tokens"]
        logits = model(tokens)  # [P, T, V]
        real = ~batch["is_padding"][:, None]  # [P, 1]
        mask = batch.get("token_mask", jnp.ones_like(tokens, dtype=bool)) & real
        losses, weights = next_token_losses(logits, tokens, mask)
        correct, count = token_accuracy(logits, tokens, mask)
        return {"loss_sum": jnp.sum(losses * weights), "num_tokens": count, "num_correct": correct}

    return eval_step


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """The jitted steps of one run, with their shardings over a mesh."""

    zero_accum: Callable[..., GradAccum]  # (params, thresholds=None)
    grad_step: Callable[..., GradAccum]
    update_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[..., dict[str, jax.Array]] | None


def shard_and_jit(
    tx: optax.GradientTransformation,
    plan: PrivacyPlan | None,
    engine: Engine,
    state: TrainState,
    mesh: jax.sharding.Mesh,
    *,
    graphdef: nnx.GraphDef | None = None,
    loss_fn: Callable[..., jax.Array] | None = None,
    min_sharded_size: int | None = None,
) -> tuple[TrainState, CompiledSteps]:
    """Places `state` on `mesh` (replicated, or FSDP-sharded with an `fsdp` axis) and jits the
    steps with matching shardings. Batches go in sharded by example (`sharding.global_batch`);
    the clipped sums are reduced across devices by XLA and the noise, drawn from one shared key
    with JAX's sharding-invariant PRNG, is the same as on one device. `engine.microbatch_size`
    is per device.

    An abstract `state` (`jax.ShapeDtypeStruct` leaves, e.g. from `jax.eval_shape`) comes back
    abstract with its shardings attached, for ahead-of-time lowering without allocating it."""
    min_size = sharding.MIN_SHARDED_SIZE if min_sharded_size is None else min_sharded_size
    state_sh = sharding.state_shardings(state, mesh, min_size)
    rep = sharding.replicated(mesh)
    acc_sh = GradAccum(
        grad_sum=state_sh.params,
        stats=rep,
        thresholds=rep,
        raw_sum=state_sh.params if _raw_sum(plan, engine) else None,
    )
    grad_step = make_grad_step(
        plan, engine, graphdef=graphdef, loss_fn=loss_fn, num_devices=mesh.size
    )
    steps = CompiledSteps(
        zero_accum=jax.jit(make_zero_accum(plan, engine), out_shardings=acc_sh),
        grad_step=jax.jit(grad_step, donate_argnums=(3,), out_shardings=acc_sh),
        update_step=jax.jit(
            make_update_step(tx, plan, engine),
            donate_argnums=(0,),
            out_shardings=(state_sh, rep),
        ),
        eval_step=None
        if graphdef is None
        else jax.jit(make_eval_step(graphdef), out_shardings=rep),
    )
    leaves = jax.tree.leaves(state)
    if leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return jax.tree.map(with_sharding, state, state_sh), steps
    return jax.device_put(state, state_sh), steps
