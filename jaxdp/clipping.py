"""Per-example gradients, per-example clipping and the clipped sum.

`clipped_grad(loss_fn, l2_clip_norm)` mirrors `jax.grad`: it returns a function that computes, for
a batch, the sum over real (non-padding) examples of clip(g_i, C), where g_i is the gradient of
`loss_fn` on example i alone and

    flat clipping:       clip(g, C) = g * min(1, C / ||g||_2)   (norm over all trainable params)
    per-layer clipping:  each parameter tensor (leaf) k is clipped to C_k = C / sqrt(K)

so in both cases every example's clipped contribution has L2 norm <= C. Adding or removing one
example therefore changes the clipped sum by at most C in L2 norm: the sensitivity that
`jaxdp.noise.add_gaussian_noise` calibrates its noise to. Padding rows contribute exactly zero;
examples whose gradient is not finite (NaN/inf) are zeroed (contributing nothing, which keeps the
bound) and counted.

Per-example gradients are computed with `jax.vmap(jax.grad(...))` over chunks of
`microbatch_size` examples inside a `lax.scan`, so only one chunk of per-example gradients is
materialised at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
CLIPPING_MODES = ("flat", "per_layer")


class ClipStats(NamedTuple):
    """Sums over the real examples of one call (add them across calls)."""

    loss_sum: jax.Array  # sum of per-example losses (finite ones)
    num_examples: jax.Array  # real (non-padding) examples
    num_clipped: jax.Array  # examples whose gradient was scaled down
    num_nonfinite: jax.Array  # examples whose gradient was not finite (zeroed)
    norm_sum: jax.Array  # sum of (finite) pre-clipping per-example gradient norms

    @classmethod
    def zeros(cls) -> ClipStats:
        return cls(*(jnp.zeros((), jnp.float32) for _ in cls._fields))

    def __add__(self, other: ClipStats) -> ClipStats:  # type: ignore[override]
        return ClipStats(*(a + b for a, b in zip(self, other, strict=True)))


def _check_mode(clipping: str) -> None:
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"Unknown clipping {clipping!r}; choose one of {CLIPPING_MODES}.")


def per_example_norms(grads: PyTree) -> jax.Array:
    """L2 norm of each example's gradient over the whole tree: [B, ...] leaves -> [B]."""
    return jnp.sqrt(sum(_sq_norms(jax.tree.leaves(grads))))


def clip_factors(
    sq_norms: list[jax.Array], l2_clip_norm: float, clipping: str = "flat"
) -> tuple[list[jax.Array], jax.Array]:
    """Per-tensor clipping factors from per-unit squared norms (K tensors x [units]).

    flat: min(1, C / ||g||) for every tensor, ||g|| over all K; per_layer: min(1, C_k / ||g_k||)
    with C_k = C / sqrt(K), so the clipped gradient's norm is <= C either way. Returns (K factor
    arrays [units], [units] bool: the unit was scaled down)."""
    _check_mode(clipping)
    if clipping == "flat":
        norms = jnp.sqrt(jnp.maximum(sum(sq_norms), 0.0))
        factor = l2_clip_norm / jnp.maximum(norms, l2_clip_norm)
        return [factor] * len(sq_norms), norms > l2_clip_norm
    c_k = l2_clip_norm / math.sqrt(len(sq_norms))
    norms = [jnp.sqrt(jnp.maximum(s, 0.0)) for s in sq_norms]
    factors = [c_k / jnp.maximum(n, c_k) for n in norms]
    return factors, jnp.any(jnp.stack([n > c_k for n in norms]), axis=0)


def clip_and_sum(
    grads: PyTree,
    l2_clip_norm: float,
    is_padding: jax.Array | None = None,
    *,
    clipping: str = "flat",
    segment_ids: jax.Array | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Sum over clipping units of clipped gradients (leaves with a leading batch axis B).

    Without `segment_ids` every row is its own unit (per-example clipping). With `segment_ids`
    [B] (integers in [0, B)), the rows with equal ids form one unit: their gradients are summed
    first and the unit's sum is clipped, so each unit contributes at most C however many rows it
    has (micro-batch clipping of `jaxdp.sampling.content_cells`; later, records and users).

    Returns (clipped sum, {"norms" [B], "clipped" [B] bool, "finite" [B] bool, "real" [B] bool}),
    all per row ("norms": the row's own gradient norm; "clipped": its unit was scaled down).
    """
    _check_mode(clipping)
    if l2_clip_norm <= 0:
        raise ValueError(f"l2_clip_norm must be positive, got {l2_clip_norm}.")
    leaves, treedef = jax.tree.flatten(grads)
    batch = leaves[0].shape[0]
    real = jnp.ones((batch,), bool) if is_padding is None else ~is_padding
    norms = jnp.sqrt(sum(_sq_norms(leaves)))  # [B]
    finite = jnp.isfinite(norms)
    keep = real & finite
    dtypes = [g.dtype for g in leaves]
    # where() rather than multiplying by 0: NaN * 0 would still be NaN.
    leaves = [jnp.where(_bcast(keep, g), g, 0).astype(jnp.float32) for g in leaves]
    if segment_ids is not None:
        unit_sum = lambda x: jax.ops.segment_sum(x, segment_ids, num_segments=batch)
        leaves = [unit_sum(g) for g in leaves]  # [U = B, ...]: row u holds unit u's sum
        unit_keep = unit_sum(keep.astype(jnp.int32)) > 0
    else:
        unit_keep = keep
    factors, unit_clipped = clip_factors(_sq_norms(leaves), l2_clip_norm, clipping)
    summed = [
        jnp.einsum("u...,u->...", g, jnp.where(unit_keep, f, 0.0)).astype(dtype)
        for g, f, dtype in zip(leaves, factors, dtypes, strict=True)
    ]
    clipped = unit_clipped & unit_keep
    if segment_ids is not None:  # (ids outside [0, B) belong to no unit: dropped, not clipped)
        valid = (segment_ids >= 0) & (segment_ids < batch)
        clipped = valid & clipped[jnp.clip(segment_ids, 0, batch - 1)]
    info = {"norms": norms, "clipped": clipped & keep, "finite": finite, "real": real}
    return jax.tree.unflatten(treedef, summed), info


def _sq_norms(leaves: list[jax.Array]) -> list[jax.Array]:
    """Per-row squared L2 norm of each leaf: K x [B]."""
    return [
        jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim))) for g in leaves
    ]


def _bcast(mask: jax.Array, like: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def scan_microbatches(
    chunk_fn: Callable[..., tuple[PyTree, ClipStats]],
    params: PyTree,
    batch: PyTree,
    is_padding: jax.Array,
    key: jax.Array | None,
    microbatch_size: int | None,
    segment_ids: jax.Array | None = None,
) -> tuple[PyTree, ClipStats]:
    """Sums `chunk_fn(params, chunk, chunk_is_padding, chunk_keys, chunk_segment_ids)` over
    microbatches.

    `chunk_keys` holds one independent dropout key per example (None without `key`). Chunk j
    holds the rows a*n + j (n = B / microbatch_size): the stride keeps every chunk spread evenly
    over the devices when B is sharded (the vmap axis stays sharded; the scan axis needs no
    communication). `jaxdp.sampling.pack_units` writes clipping units in this order, so the rows
    of one unit (equal `segment_ids`) fall in one chunk.
    """
    size = is_padding.shape[0]
    m = microbatch_size or size
    if size % m:
        raise ValueError(f"Batch size {size} must be divisible by microbatch_size {m}.")
    n = size // m
    use_key = key is not None
    keys = jax.random.split(key, size) if use_key else jnp.zeros((size,), jnp.uint32)
    segments = jnp.zeros((size,), jnp.int32) if segment_ids is None else segment_ids

    def to_chunks(x):  # [B, ...] -> [n, m, ...]; chunk j holds rows a * n + j
        return jnp.swapaxes(x.reshape((m, n) + x.shape[1:]), 0, 1)

    def body(carry, xs):
        acc, stats = carry
        chunk, pad, ks, seg, j = xs
        # Ids are j * m + position (sampling.pack_units): local ids in [0, m). Ids packed for
        # another microbatch size fall outside and their rows are dropped, never merged.
        local = None if segment_ids is None else seg - j * m
        summed, chunk_stats = chunk_fn(params, chunk, pad, ks if use_key else None, local)
        return (jax.tree.map(jnp.add, acc, summed), stats + chunk_stats), None

    chunked = tuple(jax.tree.map(to_chunks, x) for x in (batch, is_padding, keys, segments))
    xs = (*chunked, jnp.arange(n, dtype=jnp.int32))
    init = (jax.tree.map(jnp.zeros_like, params), ClipStats.zeros())
    (total, stats), _ = jax.lax.scan(body, init, xs)
    return total, stats


def chunk_stats(
    losses: jax.Array, norms: jax.Array, real: jax.Array, finite: jax.Array, clipped: jax.Array
) -> ClipStats:
    """ClipStats of one chunk from per-example [m] arrays."""
    ok = real & finite
    total = lambda x: jnp.sum(x.astype(jnp.float32))
    return ClipStats(
        loss_sum=total(jnp.where(ok, losses, 0.0)),
        num_examples=total(real),
        num_clipped=total(clipped),
        num_nonfinite=total(real & ~finite),
        norm_sum=total(jnp.where(ok, norms, 0.0)),
    )


def clipped_grad(
    loss_fn: Callable[..., jax.Array],
    l2_clip_norm: float,
    *,
    microbatch_size: int | None = None,
    clipping: str = "flat",
) -> Callable[..., tuple[PyTree, ClipStats]]:
    """Like `jax.grad`, but returns the sum of clipped per-example gradients.

    `loss_fn(params, example, key)` is the loss of ONE example (no batch axis; `key` is a PRNG key
    for dropout, or None). The returned function is

        fn(params, batch, is_padding, key=None, segment_ids=None) -> (clipped_sum, ClipStats)

    where `batch` is a pytree with a leading axis B, `is_padding` a [B] bool mask, and `key` (if
    given) is split into one independent key per example. B must be divisible by
    `microbatch_size` (default: B, i.e. one vmap over the whole batch). `segment_ids` [B] make
    clipping units of several rows (see `clip_and_sum`); the rows of a unit must fall in one
    microbatch (`jaxdp.sampling.pack_units` lays them out so).
    """
    _check_mode(clipping)

    def chunk_fn(params, chunk, pad, keys, segment_ids):
        if keys is None:
            per_example = lambda p, e: loss_fn(p, e, None)
            losses, grads = jax.vmap(jax.value_and_grad(per_example), (None, 0))(params, chunk)
        else:
            vg = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0))
            losses, grads = vg(params, chunk, keys)  # [m], [m, ...]
        summed, info = clip_and_sum(
            grads, l2_clip_norm, pad, clipping=clipping, segment_ids=segment_ids
        )
        stats = chunk_stats(losses, info["norms"], info["real"], info["finite"], info["clipped"])
        return summed, stats

    def fn(
        params: PyTree,
        batch: PyTree,
        is_padding: jax.Array,
        key: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ):
        return scan_microbatches(
            chunk_fn, params, batch, is_padding, key, microbatch_size, segment_ids
        )

    return fn


def clip_per_example(
    l2_clip_norm: float, *, clipping: str = "flat"
) -> optax.GradientTransformationExtraArgs:
    """Optax transform: per-example gradients (leading batch axis) -> their clipped sum.

    For users who already hold per-example gradients; pass `is_padding=[B] bool` as an extra
    argument to `update` to exclude padding rows. Chain it with `jaxdp.noise.add_gaussian_noise`.
    Sensitivity of the output: l2_clip_norm (add/remove one example).
    """
    _check_mode(clipping)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, is_padding=None, **extra_args):
        del params, extra_args
        summed, _ = clip_and_sum(updates, l2_clip_norm, is_padding, clipping=clipping)
        return summed, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
