"""Per-example gradients, per-example clipping and the clipped sum.

`clipped_grad(loss_fn, l2_clip_norm)` mirrors `jax.grad`: it returns a function that computes, for
a batch, the sum over real (non-padding) examples of clip(g_i, C), where g_i is the gradient of
`loss_fn` on example i alone and

    flat clipping:       clip(g, C) = g * min(1, C / ||g||_2)   (norm over all trainable params)
    per-layer clipping:  each parameter tensor (leaf) k is clipped to its own threshold C_k,
                         C_k = C / sqrt(K) by default, or any thresholds with
                         sqrt(sum_k C_k^2) = C (`jaxdp.adaptive` tracks them privately)

so in both cases every example's clipped contribution has L2 norm <= C (the parts clipped
separately live on disjoint coordinates, so their squared norms add). Adding or removing one
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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.params import PyTree

CLIPPING_MODES = ("flat", "per_layer")


# Log-spaced bins of per-unit gradient norms (`ClipStats.norm_hist`), from 1e-6 to 1e6: a
# quantile read from them is exact to within one bin (a factor 10^(12 / 240) = 1.12).
NORM_BINS = np.logspace(-6, 6, 241)


class ClipStats(NamedTuple):
    """Sums over the real examples (or clipping units) of one call (add them across calls).

    All of it is computed from the private data WITHOUT noise: private diagnostics, except
    `below`, which `jaxdp.noise` releases only with its own Gaussian noise (adaptive clipping)."""

    loss_sum: jax.Array  # sum of per-example losses (finite ones)
    num_examples: jax.Array  # real (non-padding) examples
    num_clipped: jax.Array  # examples whose gradient was scaled down
    num_nonfinite: jax.Array  # examples whose gradient was not finite (zeroed)
    norm_sum: jax.Array  # sum of (finite) pre-clipping per-example gradient norms
    # (Build them with `zeros()` / `chunk_stats`; the None defaults only keep JAX from starting
    # at import.)
    # [K_c] per clipping threshold (1 flat, K per layer): sum over real units of
    # (1[||g_u|| <= C] - 1/2) (non-finite units count as above): sensitivity 1/2 per entry.
    below: jax.Array | None = None
    # [K] per parameter group: sum over real units of ||g_uk||^2 before clipping.
    group_sq_norms: jax.Array | None = None
    # [len(NORM_BINS) + 1] counts of real units' pre-clipping norms per bin.
    norm_hist: jax.Array | None = None

    @classmethod
    def zeros(cls, num_thresholds: int = 1, num_groups: int = 1) -> ClipStats:
        scalars = [jnp.zeros((), jnp.float32) for _ in range(5)]
        return cls(
            *scalars,
            below=jnp.zeros((num_thresholds,), jnp.float32),
            group_sq_norms=jnp.zeros((num_groups,), jnp.float32),
            norm_hist=jnp.zeros((len(NORM_BINS) + 1,), jnp.float32),
        )

    def __add__(self, other: ClipStats) -> ClipStats:  # type: ignore[override]
        return ClipStats(*(a + b for a, b in zip(self, other, strict=True)))


def _check_mode(clipping: str) -> None:
    if clipping not in CLIPPING_MODES:
        raise ValueError(f"Unknown clipping {clipping!r}; choose one of {CLIPPING_MODES}.")


def default_thresholds(l2_clip_norm: float, clipping: str, num_groups: int) -> jax.Array:
    """The clipping thresholds [K_c] of a fixed clip norm C: [C] (flat) or K equal per-layer
    thresholds C / sqrt(K), whose root sum of squares is C."""
    _check_mode(clipping)
    if clipping == "flat":
        return jnp.full((1,), l2_clip_norm, jnp.float32)
    # (1 - 1e-6): the float32 thresholds' root sum of squares never rounds above C.
    c = l2_clip_norm / math.sqrt(num_groups) * (1 - 1e-6)
    return jnp.full((num_groups,), c, jnp.float32)


# Factors clip to (1 - ROUNDING_MARGIN) of a threshold, so that the float32 rounding of a norm and
# of the scaled gradient (relative errors far below this) never lets a contribution exceed it.
ROUNDING_MARGIN = 1e-5


def clip_factor(norm: jax.Array, threshold: jax.Array) -> jax.Array:
    """min(1, C' / norm) with C' = (1 - ROUNDING_MARGIN) C: every engine's clip factor."""
    safe = threshold * (1.0 - ROUNDING_MARGIN)
    return safe / jnp.maximum(norm, safe)


def weighted_sum(v: jax.Array, w: jax.Array) -> jax.Array:
    """sum_i w_i v_i over the leading axis, in full float32 precision: the clipped sum of
    per-example values (a GPU's default TF32 would round them by 2^-11, more than the margin)."""
    return jnp.einsum("b...,b->...", v, w, precision=jax.lax.Precision.HIGHEST)


def clip_factors(
    sq_norms: list[jax.Array],
    l2_clip_norm: float,
    clipping: str = "flat",
    thresholds: jax.Array | None = None,
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """Per-tensor clipping factors from per-unit squared norms (K tensors x [units]).

    flat: min(1, C / ||g||) for every tensor, ||g|| over all K; per_layer: min(1, C_k / ||g_k||),
    so the clipped gradient's norm is <= sqrt(sum_k C_k^2) = C either way. `thresholds` [K_c]
    (traced, e.g. adaptive) replaces `default_thresholds(l2_clip_norm, ...)`. Returns (K factor
    arrays [units], [units] bool: the unit was scaled down, [units, K_c] bool: its norm was at
    most the threshold)."""
    _check_mode(clipping)
    if thresholds is None:
        thresholds = default_thresholds(l2_clip_norm, clipping, len(sq_norms))
    if clipping == "flat":
        c = thresholds[0]
        norms = jnp.sqrt(jnp.maximum(sum(sq_norms), 0.0))
        return [clip_factor(norms, c)] * len(sq_norms), norms > c, (norms <= c)[:, None]
    norms = [jnp.sqrt(jnp.maximum(s, 0.0)) for s in sq_norms]
    factors = [clip_factor(n, thresholds[k]) for k, n in enumerate(norms)]
    below = jnp.stack([n <= thresholds[k] for k, n in enumerate(norms)], axis=1)
    return factors, ~jnp.all(below, axis=1), below


def clip_and_sum(
    grads: PyTree,
    l2_clip_norm: float,
    is_padding: jax.Array | None = None,
    *,
    clipping: str = "flat",
    segment_ids: jax.Array | None = None,
    thresholds: jax.Array | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Sum over clipping units of clipped gradients (leaves with a leading batch axis B).

    Without `segment_ids` every row is its own unit (per-example clipping). With `segment_ids`
    [B] (integers in [0, B)), the rows with equal ids form one unit: their gradients are summed
    first and the unit's sum is clipped, so each unit contributes at most C however many rows it
    has (records, users, micro-batch clipping cells). `thresholds` [K_c]: see `clip_factors`.

    The clipped sum is float32 whatever the gradients' dtype (bf16 parameters give bf16
    gradients): the norms are taken of the float32 values that are summed, and the sum is never
    rounded back to a lower precision, which would let one unit contribute more than C.

    Returns (clipped sum, info): per row "norms" [B] (the row's own gradient norm), "clipped"
    [B] bool (its unit was scaled down), "finite", "real"; and the per-unit `UnitStats`
    ("units")."""
    _check_mode(clipping)
    if l2_clip_norm <= 0:
        raise ValueError(f"l2_clip_norm must be positive, got {l2_clip_norm}.")
    leaves, treedef = jax.tree.flatten(grads)
    batch = leaves[0].shape[0]
    real = jnp.ones((batch,), bool) if is_padding is None else ~is_padding
    norms = jnp.sqrt(sum(_sq_norms(leaves)))  # [B]
    finite = jnp.isfinite(norms)
    keep = real & finite
    # where() rather than multiplying by 0: NaN * 0 would still be NaN.
    leaves = [jnp.where(_bcast(keep, g), g, 0).astype(jnp.float32) for g in leaves]
    if segment_ids is not None:
        unit_sum = lambda x: jax.ops.segment_sum(x, segment_ids, num_segments=batch)
        leaves = [unit_sum(g) for g in leaves]  # [U = B, ...]: row u holds unit u's sum
        unit_keep = unit_sum(keep.astype(jnp.int32)) > 0
        unit_real = unit_sum(real.astype(jnp.int32)) > 0
    else:
        unit_keep, unit_real = keep, real
    sq = _sq_norms(leaves)
    factors, unit_clipped, below = clip_factors(sq, l2_clip_norm, clipping, thresholds)
    summed = [
        weighted_sum(g, jnp.where(unit_keep, f, 0.0)) for g, f in zip(leaves, factors, strict=True)
    ]
    units = UnitStats.of(sq, below & unit_keep[:, None], unit_real)
    clipped = unit_clipped & unit_keep
    if segment_ids is not None:  # (ids outside [0, B) belong to no unit: dropped, not clipped)
        valid = (segment_ids >= 0) & (segment_ids < batch)
        clipped = valid & clipped[jnp.clip(segment_ids, 0, batch - 1)]
    info = {"norms": norms, "clipped": clipped & keep, "finite": finite, "real": real}
    return jax.tree.unflatten(treedef, summed), info | {"units": units}


class UnitStats(NamedTuple):
    """Sums over the real clipping units of one chunk (the unit-level fields of ClipStats)."""

    below: jax.Array  # [K_c]
    group_sq_norms: jax.Array  # [K]
    norm_hist: jax.Array  # [len(NORM_BINS) + 1]

    @classmethod
    def of(cls, sq: list[jax.Array], below: jax.Array, unit_real: jax.Array) -> UnitStats:
        """From per-unit squared norms (K x [U]), below-threshold flags [U, K_c] and [U] real."""
        sq = jnp.stack(sq, axis=1)  # [U, K]
        finite = jnp.all(jnp.isfinite(sq), axis=1)
        ok = unit_real & finite
        centred = jnp.where(unit_real[:, None], below.astype(jnp.float32) - 0.5, 0.0)
        norms = jnp.sqrt(jnp.sum(jnp.where(ok[:, None], sq, 0.0), axis=1))
        bins = jnp.searchsorted(jnp.asarray(NORM_BINS, jnp.float32), norms, side="right")
        hist = jnp.zeros((len(NORM_BINS) + 1,), jnp.float32).at[bins].add(ok.astype(jnp.float32))
        return cls(
            below=jnp.sum(centred, axis=0),
            group_sq_norms=jnp.sum(jnp.where(ok[:, None], sq, 0.0), axis=0),
            norm_hist=hist,
        )


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

    def call(xs):
        chunk, pad, ks, seg, j = xs
        # Ids are j * m + position (sampling.pack_units): local ids in [0, m). Ids packed for
        # another microbatch size fall outside and their rows are dropped, never merged.
        local = None if segment_ids is None else seg - j * m
        return chunk_fn(params, chunk, pad, ks if use_key else None, local)

    def body(carry, xs):
        return jax.tree.map(jnp.add, carry, call(xs)), None

    chunked = tuple(jax.tree.map(to_chunks, x) for x in (batch, is_padding, keys, segments))
    xs = (*chunked, jnp.arange(n, dtype=jnp.int32))
    # The sums' shapes (the gradient tree(s), the stats' threshold and group counts) from an
    # abstract trace of one chunk.
    shapes = jax.eval_shape(call, jax.tree.map(lambda x: x[0], xs))
    init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    (total, stats), _ = jax.lax.scan(body, init, xs)
    return total, stats


def chunk_stats(
    losses: jax.Array,
    norms: jax.Array,
    real: jax.Array,
    finite: jax.Array,
    clipped: jax.Array,
    units: UnitStats,
) -> ClipStats:
    """ClipStats of one chunk from per-example [m] arrays and its units' sums."""
    ok = real & finite
    total = lambda x: jnp.sum(x.astype(jnp.float32))
    return ClipStats(
        loss_sum=total(jnp.where(ok, losses, 0.0)),
        num_examples=total(real),
        num_clipped=total(clipped),
        num_nonfinite=total(real & ~finite),
        norm_sum=total(jnp.where(ok, norms, 0.0)),
        below=units.below,
        group_sq_norms=units.group_sq_norms,
        norm_hist=units.norm_hist,
    )


def clipped_grad(
    loss_fn: Callable[..., jax.Array],
    l2_clip_norm: float,
    *,
    microbatch_size: int | None = None,
    clipping: str = "flat",
    with_raw_sum: bool = False,
) -> Callable[..., tuple[PyTree, ClipStats]]:
    """Like `jax.grad`, but returns the sum of clipped per-example gradients.

    `loss_fn(params, example, key)` is the loss of ONE example (no batch axis; `key` is a PRNG key
    for dropout, or None). The returned function is

        fn(params, batch, is_padding, key=None, segment_ids=None, thresholds=None)
            -> (clipped_sum, ClipStats)

    where `batch` is a pytree with a leading axis B, `is_padding` a [B] bool mask, and `key` (if
    given) is split into one independent key per example. B must be divisible by
    `microbatch_size` (default: B, i.e. one vmap over the whole batch). `segment_ids` [B] make
    clipping units of several rows (see `clip_and_sum`); the rows of a unit must fall in one
    microbatch (`jaxdp.sampling.pack_units` lays them out so). `thresholds` [K_c]: the step's
    clipping thresholds (see `clip_factors`; default from `l2_clip_norm`). With `with_raw_sum`
    the first output is (clipped_sum, raw_sum), raw_sum the UNCLIPPED sum of the units'
    gradients (for diagnostics; not private).
    """
    _check_mode(clipping)

    def make_chunk_fn(thresholds):
        def chunk_fn(params, chunk, pad, keys, segment_ids):
            if keys is None:
                per_example = lambda p, e: loss_fn(p, e, None)
                vg = jax.vmap(jax.value_and_grad(per_example), (None, 0))
                losses, grads = vg(params, chunk)
            else:
                vg = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0))
                losses, grads = vg(params, chunk, keys)  # [m], [m, ...]
            summed, info = clip_and_sum(
                grads,
                l2_clip_norm,
                pad,
                clipping=clipping,
                segment_ids=segment_ids,
                thresholds=thresholds,
            )
            stats = chunk_stats(
                losses, info["norms"], info["real"], info["finite"], info["clipped"], info["units"]
            )
            if with_raw_sum:
                keep = info["real"] & info["finite"]
                raw = jax.tree.map(
                    lambda g: jnp.einsum(
                        "u...,u->...", jnp.where(_bcast(keep, g), g, 0), 1.0 * keep
                    ),
                    grads,
                )
                return (summed, raw), stats
            return summed, stats

        return chunk_fn

    def fn(
        params: PyTree,
        batch: PyTree,
        is_padding: jax.Array,
        key: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        thresholds: jax.Array | None = None,
    ):
        return scan_microbatches(
            make_chunk_fn(thresholds), params, batch, is_padding, key, microbatch_size, segment_ids
        )

    return fn
