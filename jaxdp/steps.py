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
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from jaxdp import clipping, ghost, sharding
from jaxdp.clipping import ClipStats
from jaxdp.loss import example_loss, model_example_loss, next_token_losses, token_accuracy
from jaxdp.noise import GaussianNoiseState
from jaxdp.params import merge, split
from jaxdp.plan import PrivacyPlan

PyTree = Any
ENGINES = ("vmap", "ghost")  # per-example clipping engines (jaxdp.clipping, jaxdp.ghost)
# {"tokens": [P, T] int32, "is_padding": [P] bool, optional "segment_ids": [P] int32}
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Engine:
    """How the clipped per-example gradient sum is computed: a speed/memory choice only.

    name: "vmap" (per-example gradients by `jax.vmap`, `jaxdp.clipping`) or "ghost" (norms from
      layer inputs and output gradients, book-kept sums, `jaxdp.ghost`; GPT-2 models only).
    ghost_strategy: the ghost engine's per-layer choice, "auto" | "ghost" | "instantiate".
    microbatch_size: examples per DEVICE in one vectorised chunk (None: the whole batch).
    """

    name: str = "vmap"
    ghost_strategy: str = "auto"
    microbatch_size: int | None = None

    def __post_init__(self):
        if self.name not in ENGINES:
            raise ValueError(f"Unknown clipping engine {self.name!r}; use one of {ENGINES}.")
        if self.ghost_strategy not in ghost.STRATEGIES:
            raise ValueError(
                f"Unknown ghost strategy {self.ghost_strategy!r}; use one of {ghost.STRATEGIES}."
            )
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


def _dp(plan: PrivacyPlan | None) -> bool:
    return plan is not None and plan.enabled


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


def noise_key_matches(state: TrainState, key: jax.Array) -> bool:
    """Whether the noise transform's state in `state.opt_state` holds `key` (collective under
    multi-host sharding: call it on every process)."""
    is_noise = lambda x: isinstance(x, GaussianNoiseState)
    found = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_noise) if is_noise(x)]
    if len(found) != 1:
        return False
    stored = sharding.to_host(found[0].key)
    return bool(np.array_equal(stored, np.asarray(jax.random.key_data(key))))


def zero_accum(params: PyTree) -> GradAccum:
    return GradAccum(grad_sum=jax.tree.map(jnp.zeros_like, params), stats=ClipStats.zeros())


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
    if engine.name == "ghost" and graphdef is None:
        raise ValueError("The ghost engine needs a jaxdp GPT-2 model (graphdef), not a loss_fn.")
    microbatch = engine.per_step_microbatch(num_devices)

    def example_loss_fn(frozen):
        return loss_fn if loss_fn is not None else model_example_loss(graphdef, frozen)

    def grad_step(params, batch: Batch, key, acc: GradAccum, frozen=None) -> GradAccum:
        is_padding, segment_ids = batch["is_padding"], batch.get("segment_ids")
        examples = {k: v for k, v in batch.items() if k not in ("is_padding", "segment_ids")}
        if _dp(plan) and engine.name == "ghost":
            clipped = ghost.ghost_clipped_grad(
                graphdef,
                plan.l2_clip_norm,
                microbatch_size=microbatch,
                frozen=frozen,
                strategy=engine.ghost_strategy,
                clipping=plan.clipping,
            )
            grad_sum, stats = clipped(params, examples, is_padding, key, segment_ids)
        elif _dp(plan):
            clipped = clipping.clipped_grad(
                example_loss_fn(frozen),
                plan.l2_clip_norm,
                microbatch_size=microbatch,
                clipping=plan.clipping,
            )
            grad_sum, stats = clipped(params, examples, is_padding, key, segment_ids)
        else:
            grad_sum, stats = _summed_grad(graphdef, example_loss_fn(frozen), frozen)(
                params, examples, is_padding, key
            )
        return GradAccum(
            grad_sum=jax.tree.map(jnp.add, acc.grad_sum, grad_sum), stats=acc.stats + stats
        )

    return grad_step


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
        zero = jnp.zeros((), jnp.float32)
        stats = ClipStats(
            loss_sum=loss_sum,
            num_examples=jnp.sum(real),
            num_clipped=zero,
            num_nonfinite=zero,
            norm_sum=zero,
        )
        return grad_sum, stats

    return fn


def make_update_step(
    tx: optax.GradientTransformation, plan: PrivacyPlan | None
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """update_step(state, acc) -> (state, metrics): noise (DP) or mean (non-DP), then optax.

    Under DP, `tx` must be `plan.optimizer(base, noise_key)`: its first transform adds the noise
    to the clipped sum and divides by the EXPECTED batch size."""

    def update_step(state: TrainState, acc: GradAccum):
        n = acc.stats.num_examples
        if _dp(plan):
            grads = acc.grad_sum  # the noise transform adds N(0, s^2 C^2) and divides by B
        else:
            grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), acc.grad_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.maximum(n - acc.stats.num_nonfinite, 1.0)
        metrics = {  # noise-free statistics of the drawn examples: private diagnostics
            "train_loss": acc.stats.loss_sum / finite,
            "batch_size": n,
            "clip_fraction": acc.stats.num_clipped / jnp.maximum(n, 1.0),
            "num_nonfinite": acc.stats.num_nonfinite,
            "grad_norm_mean": acc.stats.norm_sum / finite,
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return update_step


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

    zero_accum: Callable[..., GradAccum]
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
    acc_sh = GradAccum(grad_sum=state_sh.params, stats=rep)
    grad_step = make_grad_step(
        plan, engine, graphdef=graphdef, loss_fn=loss_fn, num_devices=mesh.size
    )
    steps = CompiledSteps(
        zero_accum=jax.jit(zero_accum, out_shardings=acc_sh),
        grad_step=jax.jit(grad_step, donate_argnums=(3,), out_shardings=acc_sh),
        update_step=jax.jit(
            make_update_step(tx, plan), donate_argnums=(0,), out_shardings=(state_sh, rep)
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
