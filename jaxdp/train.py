"""Jitted train and eval steps (pure functions of (state, batch)).

One logical DP-SGD step t is:

    acc = zeros
    for each physical batch j of the examples Poisson-drawn at step t:   # fixed shape [P, T]
        acc = grad_step(params, batch_j, fold_in(dropout_key_t, j), acc)  # += sum_u clip(g_u, C)
    state, metrics = update_step(state, acc)                             # + noise once, / B, optax

so the noise is added once per logical step however many physical batches the drawn batch
needed (gradient accumulation with DP semantics), and padding rows contribute exactly zero.
Without DP (`dp=None`) the same loop computes the plain mean gradient over the drawn examples.
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

from jaxdp import clipping as clipping_lib
from jaxdp.clipping import ClipStats
from jaxdp.gpt2 import GPT2LMHeadModel
from jaxdp.loss import example_loss, next_token_losses, token_accuracy
from jaxdp.noise import GaussianNoiseState, add_gaussian_noise

PyTree = Any
ENGINES = ("vmap", "ghost")  # per-example clipping engines (jaxdp.clipping, jaxdp.ghost)
# {"tokens": [P, T] int32, "is_padding": [P] bool, optional "segment_ids": [P] int32}
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DPSGDConfig:
    """DP-SGD hyper-parameters (see jaxdp.clipping / jaxdp.noise for the exact semantics)."""

    l2_clip_norm: float
    noise_multiplier: float
    expected_batch_size: float
    microbatch_size: int | None = None
    clipping: str = "flat"
    engine: str = "vmap"  # "vmap": materialise per-example grads | "ghost": ghost norms
    ghost_strategy: str = "auto"  # ghost engine, dense layers: "auto" | "ghost" | "instantiate"
    secure_noise: bool = False  # noise as a sum of four normals (see jaxdp.noise)


class TrainState(struct.PyTreeNode):
    step: jax.Array  # logical steps taken
    params: PyTree  # the trainable parameters: clipped, noised, updated
    opt_state: PyTree
    frozen: PyTree = None  # parameters that are not trained (an empty State if all are)


class GradAccum(struct.PyTreeNode):
    grad_sum: PyTree  # DP: sum of clipped per-example grads; else sum of per-example grads
    stats: ClipStats


def make_optimizer(
    base: optax.GradientTransformation,
    dp: DPSGDConfig | None,
    noise_key: jax.Array | None = None,
) -> optax.GradientTransformation:
    """`base` preceded, under DP, by the Gaussian noise transform (which also divides by B).

    `noise_key` (required with DP) must be secret: `jaxdp.randomness.Secrets.noise_key()`."""
    if dp is None:
        return base
    if noise_key is None:
        raise ValueError("DP-SGD needs a noise_key (jaxdp.randomness.Secrets.noise_key()).")
    noise = add_gaussian_noise(
        dp.l2_clip_norm,
        dp.noise_multiplier,
        dp.expected_batch_size,
        noise_key,
        secure=dp.secure_noise,
    )
    return optax.chain(noise, base)


def noise_key_matches(state: TrainState, key: jax.Array) -> bool:
    """Whether the noise transform's state in `state.opt_state` holds `key` (collective under
    multi-host sharding: call it on every process)."""
    from jaxdp.sharding import to_host

    is_noise = lambda x: isinstance(x, GaussianNoiseState)
    found = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_noise) if is_noise(x)]
    if len(found) != 1:
        return False
    return bool(np.array_equal(to_host(found[0].key), np.asarray(jax.random.key_data(key))))


def init_state(
    model: GPT2LMHeadModel, tx: optax.GradientTransformation, trainable: Sequence[str] = ()
):
    """(graphdef, TrainState): the parameters whose paths match `trainable` (regexes, see
    `jaxdp.lora.trainable_filter`; all if empty) are trained, the rest is kept frozen."""
    from jaxdp.lora import trainable_filter

    graphdef, params, frozen = nnx.split(model, trainable_filter(trainable), ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"No parameter matches model.trainable={list(trainable)}.")
    return graphdef, TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), frozen=frozen
    )


def merge(graphdef: nnx.GraphDef, params: PyTree, frozen: PyTree = None) -> GPT2LMHeadModel:
    """The model from its trainable and frozen parameters."""
    return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def zero_accum(params: PyTree) -> GradAccum:
    return GradAccum(grad_sum=jax.tree.map(jnp.zeros_like, params), stats=ClipStats.zeros())


def make_example_loss(graphdef: nnx.GraphDef, frozen: PyTree = None) -> Callable[..., jax.Array]:
    """loss(params, example, key) for ONE example {"tokens": [T]} (the privacy unit)."""

    def loss(params, example, key):
        model = merge(graphdef, params, frozen)
        tokens = example["tokens"]
        logits = model(tokens[None], dropout_key=key)[0]  # [T, V]
        return example_loss(logits, tokens, example.get("token_mask"))

    return loss


def make_grad_step(graphdef: nnx.GraphDef, dp: DPSGDConfig | None) -> Callable[..., GradAccum]:
    """grad_step(params, batch, key, acc, frozen=None) -> acc + this physical batch's gradient sum.

    Gradients are taken with respect to `params` (the trainable parameters) only."""
    if dp is not None and dp.engine not in ENGINES:
        raise ValueError(f"Unknown clipping engine {dp.engine!r}; use one of {ENGINES}.")

    def grad_step(params, batch: Batch, key, acc: GradAccum, frozen=None) -> GradAccum:
        is_padding, segment_ids = batch["is_padding"], batch.get("segment_ids")
        examples = {k: v for k, v in batch.items() if k not in ("is_padding", "segment_ids")}
        if dp is not None and dp.engine == "ghost":
            from jaxdp import ghost

            clipped = ghost.ghost_clipped_grad(
                graphdef,
                dp.l2_clip_norm,
                microbatch_size=dp.microbatch_size,
                frozen=frozen,
                strategy=dp.ghost_strategy,
                clipping=dp.clipping,
            )
            grad_sum, stats = clipped(params, examples, is_padding, key, segment_ids)
        elif dp is not None:
            clipped = clipping_lib.clipped_grad(
                make_example_loss(graphdef, frozen),
                dp.l2_clip_norm,
                microbatch_size=dp.microbatch_size,
                clipping=dp.clipping,
            )
            grad_sum, stats = clipped(params, examples, is_padding, key, segment_ids)
        else:
            real = (~is_padding).astype(jnp.float32)

            def summed_loss(p):
                model = merge(graphdef, p, frozen)
                logits = model(examples["tokens"], dropout_key=key)  # [P, T, V]
                per_example = example_loss(logits, examples["tokens"], examples.get("token_mask"))
                return jnp.sum(per_example * real)

            loss_sum, grad_sum = jax.value_and_grad(summed_loss)(params)
            zero = jnp.zeros((), jnp.float32)
            stats = ClipStats(
                loss_sum=loss_sum,
                num_examples=jnp.sum(real),
                num_clipped=zero,
                num_nonfinite=zero,
                norm_sum=zero,
            )
        return GradAccum(
            grad_sum=jax.tree.map(jnp.add, acc.grad_sum, grad_sum), stats=acc.stats + stats
        )

    return grad_step


def make_update_step(
    tx: optax.GradientTransformation, dp: DPSGDConfig | None
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """update_step(state, acc) -> (state, metrics): noise (DP) or mean (non-DP), then optax."""

    def update_step(state: TrainState, acc: GradAccum):
        n = acc.stats.num_examples
        if dp is not None:
            grads = acc.grad_sum  # the noise transform adds N(0, s^2 C^2) and divides by B
        else:
            grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), acc.grad_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.maximum(n - acc.stats.num_nonfinite, 1.0)
        metrics = {
            "train_loss": acc.stats.loss_sum / finite,
            "batch_size": n,
            "clip_fraction": acc.stats.num_clipped / jnp.maximum(n, 1.0),
            "num_nonfinite": acc.stats.num_nonfinite,
            "grad_norm_mean": acc.stats.norm_sum / finite,
            "update_norm": optax.tree.norm(updates),
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
    eval_step: Callable[..., dict[str, jax.Array]]


def shard_and_jit(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    dp: DPSGDConfig | None,
    state: TrainState,
    mesh: jax.sharding.Mesh,
    *,
    min_sharded_size: int | None = None,
) -> tuple[TrainState, CompiledSteps]:
    """Places `state` on `mesh` (replicated, or FSDP-sharded with an `fsdp` axis) and jits the
    steps with matching shardings. Batches go in sharded by example (`sharding.global_batch`);
    the clipped sums are reduced across devices by XLA and the noise, drawn from one shared key
    with JAX's sharding-invariant PRNG, is the same as on one device.

    An abstract `state` (`jax.ShapeDtypeStruct` leaves, e.g. from `jax.eval_shape`) comes back
    abstract with its shardings attached, for ahead-of-time lowering without allocating it."""
    from jaxdp import sharding

    min_size = sharding.MIN_SHARDED_SIZE if min_sharded_size is None else min_sharded_size
    state_sh = sharding.state_shardings(state, mesh, min_size)
    rep = sharding.replicated(mesh)
    acc_sh = GradAccum(grad_sum=state_sh.params, stats=rep)
    steps = CompiledSteps(
        zero_accum=jax.jit(zero_accum, out_shardings=acc_sh),
        grad_step=jax.jit(make_grad_step(graphdef, dp), donate_argnums=(3,), out_shardings=acc_sh),
        update_step=jax.jit(
            make_update_step(tx, dp), donate_argnums=(0,), out_shardings=(state_sh, rep)
        ),
        eval_step=jax.jit(make_eval_step(graphdef), out_shardings=rep),
    )
    leaves = jax.tree.leaves(state)
    if leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return jax.tree.map(with_sharding, state, state_sh), steps
    return jax.device_put(state, state_sh), steps
