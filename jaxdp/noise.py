"""Gaussian noise for DP-SGD as an optax transform.

`add_gaussian_noise(l2_clip_norm, noise_multiplier, expected_batch_size, key)` expects as its input
`updates` the SUM over the drawn examples of per-example gradients clipped to L2 norm
`l2_clip_norm` (`jaxdp.clipping`), whose sensitivity to adding or removing one example is
`l2_clip_norm`. It outputs

    (clipped_sum + N(0, (noise_multiplier * l2_clip_norm)^2 I)) / expected_batch_size,

the Gaussian mechanism at the noise multiplier that `jaxdp.accounting` accounts for. Dividing by
the fixed expected batch size (not the random drawn size, which would itself leak) is
post-processing. Apply it once per logical step, after summing the clipped gradients of all
physical batches of that step.

The noise is only as private as its key. `key` must be secret (`jaxdp.randomness.Secrets`: drawn
from the operating system's cryptographic randomness): anyone who knows it can regenerate every
step's noise and subtract it. The key lives in the transform's STATE (as raw key data), not in the
compiled program, so it is saved with the optimizer state in checkpoints and never baked into a
compilation cache. Update number `count` draws its noise as one stream of standard normals over
all leaves (in tree order), in chunks of up to 2^20 values, chunk c from
`fold_in(fold_in(fold_in(key, count), 0), c)` (`noise_keys`, `tree_noise`), so a run resumed
from a checkpoint draws exactly the noise the uninterrupted run would have drawn.

`key` may be one key or a 1-D array of K independent keys (`jaxdp.randomness.Secrets.noise_key`
gives K = 2 threefry2x32 keys: 128 bits of secret). Every noise value's random bits are then the
XOR of one word from each key's stream (`_normal`), turned into N(0, 1): unpredictable without
every key, and no key can be guessed on its own. It costs K draws of bits per value.

`secure=True` draws each noise coordinate as the sum of four independent normals divided by two
(the same distribution), as Opacus's `secure_mode` does after
Holohan & Braghin (2021), which makes floating-point attacks on the Gaussian sampler (Mironov
2012; Jin et al. 2022) harder. It costs four noise draws per step instead of one.

The sum, the noise and the noisy mean are float32 whatever the parameters' dtype; the output is
rounded to the parameters' dtype only after the noise is added (post-processing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdp import fused
from jaxdp.adaptive import AdaptiveClipping, initial_thresholds, update_thresholds


class GaussianNoiseState(NamedTuple):
    key: jax.Array  # uint32 key data of the (secret) noise key
    count: jax.Array  # int32 scalar: noisy updates emitted so far
    # Released with noise, so public (covered by epsilon):
    # Adaptive clipping only (None otherwise: the engines use the fixed clip norm):
    clip_norms: jax.Array | None = None  # [K_c] the next step's thresholds
    noisy_fraction: jax.Array | None = None  # [K_c] the last released b~
    noisy_sq_norm: jax.Array | None = None  # ||noisy sum||^2 of the last step (set by init)


# Values of the gradient noise per key: one sampler (one random-number subgraph in the compiled
# step, whatever the number of leaves) draws every chunk.
NOISE_CHUNK = 1 << 20


def _per_stream(f: Callable[[jax.Array], jax.Array], key: jax.Array) -> jax.Array:
    """f of a single key, or of each of a wide key's K keys (results stacked on the LAST axis)."""
    return f(key) if key.ndim == 0 else jax.vmap(f, out_axes=-1)(key)


def _step_key(key: jax.Array, count: jax.Array | int, purpose: int) -> jax.Array:
    """Update `count`'s key(s) for the gradient noise (purpose 0) or the count noise (1)."""
    return _per_stream(lambda k: jax.random.fold_in(jax.random.fold_in(k, count), purpose), key)


def noise_keys(key: jax.Array, count: jax.Array | int, num_chunks: int) -> jax.Array:
    """The keys [num_chunks] (a wide key's: [num_chunks, K]) of update number `count`'s
    gradient-noise chunks."""

    def chunks(k):
        step = jax.random.fold_in(jax.random.fold_in(k, count), 0)
        return jax.vmap(lambda c: jax.random.fold_in(step, c))(jnp.arange(num_chunks))

    return _per_stream(chunks, key)


def count_noise_key(key: jax.Array, count: jax.Array | int) -> jax.Array:
    """The key(s) of update number `count`'s noise on the adaptive-clipping counts."""
    return _step_key(key, count, 1)


def _normal(key: jax.Array, shape, secure: bool) -> jax.Array:
    """Standard normal float32 values of `shape` from a key, or from all K keys of a wide key.

    A wide key's keys are combined BEFORE the values are formed: each draw's 32 random bits are
    the XOR of one word from every key's stream, then turned into a normal by the inverse error
    function (as `jax.random.normal` does). The XOR of independent words is uniform if any one
    of them is, so a guess of some of the keys tells nothing about the output: predicting it
    needs all of them (2 keys: 128 bits). (Adding normals drawn per key instead would let an
    adversary test one 64-bit key at a time against a release.) secure: four such normals,
    summed and halved."""
    draws = 4 if secure else 1
    if key.ndim == 0:
        key = key[None]
    bits = jax.random.bits(key[0], (draws, *shape), jnp.uint32)
    for k in range(1, key.shape[0]):
        bits = bits ^ jax.random.bits(key[k], (draws, *shape), jnp.uint32)
    z = _normal_from_bits(bits)
    return z[0] if not secure else jnp.sum(z, axis=0) / 2.0  # N(0, 1): four variances, halved


def _normal_from_bits(bits: jax.Array) -> jax.Array:
    """uint32 bits -> standard normal float32: 23 bits make a uniform in [-1, 1) (never -1),
    and sqrt(2) erfinv(u) is N(0, 1), as in `jax.random.normal`."""
    floats = jax.lax.bitcast_convert_type(
        (bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000), jnp.float32
    )  # [1, 2)
    lo = jnp.nextafter(jnp.float32(-1.0), jnp.float32(0.0))
    u = jnp.maximum(lo, (floats - 1.0) * (1.0 - lo) + lo)
    return jnp.sqrt(jnp.float32(2.0)) * jax.lax.erf_inv(u)


def chunk_layout(sizes: list[int]) -> tuple[int, int]:
    """(values per chunk, number of chunks) for leaves of `sizes` values in all."""
    total = max(sum(sizes), 1)
    chunk = min(NOISE_CHUNK, total)
    return chunk, -(-total // chunk)


def tree_noise(
    key: jax.Array, count: jax.Array | int, shapes: list[tuple[int, ...]], secure: bool = False
) -> list[jax.Array]:
    """Independent standard normal noise (float32) of each shape in `shapes`, for update `count`.

    The noise is one stream: chunk c (`chunk_layout`) is `_normal` of `noise_keys(...)[c]`, and
    the chunks, concatenated, are laid over the leaves in order. One sampler draws all chunks
    (`lax.map`, 16 chunks at a time), so the compiled step holds one random-number subgraph
    instead of one per leaf, which was most of a DP update step's compile time."""
    sizes = [math.prod(s) for s in shapes]
    chunk, num_chunks = chunk_layout(sizes)
    keys = noise_keys(key, count, num_chunks)
    draws = jax.lax.map(
        lambda k: _normal(k, (chunk,), secure), keys, batch_size=min(num_chunks, 16)
    )
    flat = draws.reshape(-1)  # [num_chunks * chunk]
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


def add_gaussian_noise(
    l2_clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    key: jax.Array,
    *,
    secure: bool = False,
    adaptive: AdaptiveClipping | None = None,
    clipping: str = "flat",
    group_names: Callable[[Any], list[str]] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Optax transform: clipped-gradient sum -> noisy mean gradient (see module docstring).

    `key` is a JAX PRNG key (e.g. `jaxdp.randomness.Secrets.generate().noise_key()`).

    With `adaptive` (`jaxdp.adaptive`), `noise_multiplier` is the GRADIENT's share sigma_D, the
    state holds the clipping thresholds (`clip_norms`: [C_t] flat, or one per group named by
    `group_names(params)` per layer), `update` needs the extra argument `below` [K_c] (the
    clipped engines' `ClipStats.below`), and each update adds N(0, (sigma_D C_t)^2) to the sum
    (C fixed per layer), releases the counts with noise sigma_b (sigma_b sqrt(K) per layer)
    drawn from its own key (`count_noise_key`, distinct from the gradient noise's),
    and moves the thresholds (`jaxdp.adaptive.update_thresholds`)."""
    if l2_clip_norm <= 0:
        raise ValueError(f"l2_clip_norm must be positive, got {l2_clip_norm}.")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size}.")
    if not (isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError("key must be a JAX PRNG key (jax.random.key / jaxdp.randomness).")
    if key.ndim > 1:
        raise ValueError(f"key must be one key or a 1-D array of keys, got shape {key.shape}.")
    stddev = noise_multiplier * l2_clip_norm
    # Only the key's data (state) and implementation (threefry2x32 for jaxdp's keys) are kept.
    key_data, impl = jax.random.key_data(key), jax.random.key_impl(key)

    if adaptive is not None and clipping != "flat" and group_names is None:
        raise ValueError("Per-layer adaptive clipping needs group_names (the clipping groups).")
    names_of = group_names or (lambda params: [])

    def init_fn(params):
        state = GaussianNoiseState(
            key=key_data, count=jnp.zeros((), jnp.int32), noisy_sq_norm=jnp.zeros((), jnp.float32)
        )
        if adaptive is None:
            return state
        thresholds = initial_thresholds(l2_clip_norm, clipping, names_of(params))
        return state._replace(clip_norms=thresholds, noisy_fraction=jnp.zeros_like(thresholds))

    def update_fn(updates, state, params=None, *, below=None, thresholds=None, **extra_args):
        del extra_args
        leaves, treedef = jax.tree.flatten(updates)
        key = jax.random.wrap_key_data(state.key, impl=impl)
        std = stddev
        if adaptive is not None:
            if below is None or thresholds is None:
                raise ValueError(
                    "Adaptive clipping: pass update(..., below=ClipStats.below, thresholds=the "
                    "thresholds the sum was clipped with)."
                )
            # The gradient's noise scales with the sensitivity of the sum it is added to: that
            # of the thresholds it was clipped with, never less than this state's (which they
            # equal when the caller follows `steps`; larger ones would need more noise).
            names = names_of(params)
            if clipping == "flat":
                c = jnp.maximum(thresholds[0], state.clip_norms[0])
            else:
                c = jnp.maximum(fused.sensitivity(thresholds, names), l2_clip_norm)
            std = noise_multiplier * c
        noise = tree_noise(key, state.count, [g.shape for g in leaves], secure)
        # The sum, the noise and the noisy mean in float32 whatever the parameters' dtype: a
        # bf16 sum or noise would put the release on a coarse lattice that tells a zero
        # gradient from a nonzero one. Rounding to the parameters' dtype comes only after the
        # noise (post-processing).
        noisy = [
            (g.astype(jnp.float32) + std * z) / expected_batch_size
            for g, z in zip(leaves, noise, strict=True)
        ]
        sq = sum(jnp.sum(jnp.square(g * expected_batch_size)) for g in noisy)
        if params is not None:
            dtypes = [p.dtype for p in jax.tree.leaves(params)]
            noisy = [g.astype(dtype) for g, dtype in zip(noisy, dtypes, strict=True)]
        new_state = state._replace(count=state.count + 1, noisy_sq_norm=jnp.asarray(sq))
        if adaptive is not None:
            k = state.clip_norms.shape[0]
            count_key = count_noise_key(key, state.count)
            count_std = adaptive.count_noise_multiplier * math.sqrt(k)
            noisy_count = below + count_std * _normal(count_key, (k,), secure)
            fraction = noisy_count / expected_batch_size + 0.5
            new_thresholds = update_thresholds(
                state.clip_norms, fraction, adaptive, clipping, l2_clip_norm, names
            )
            new_state = new_state._replace(clip_norms=new_thresholds, noisy_fraction=fraction)
        return jax.tree.unflatten(treedef, noisy), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
