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
compilation cache. Update number `count` uses `fold_in(key, count)`, leaf j of the tree
`fold_in(that, j)`, so a run resumed from a checkpoint draws exactly the noise the uninterrupted
run would have drawn.

`secure=True` draws each noise coordinate as the sum of four independent normals divided by two
(the same distribution), as Opacus's `secure_mode` does after Holohan & Braghin (2021), which
makes floating-point attacks on the Gaussian sampler (Mironov 2012; Jin et al. 2022) harder. It
costs four noise draws per step instead of one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class GaussianNoiseState(NamedTuple):
    key: jax.Array  # uint32 key data of the (secret) noise key
    count: jax.Array  # int32 scalar: noisy updates emitted so far


def leaf_keys(key: jax.Array, count: jax.Array | int, num_leaves: int) -> list[jax.Array]:
    """The keys of the noise added to each of `num_leaves` leaves at update number `count`."""
    step = jax.random.fold_in(key, count)
    return [jax.random.fold_in(step, j) for j in range(num_leaves)]


def _normal(key: jax.Array, shape, secure: bool) -> jax.Array:
    if not secure:
        return jax.random.normal(key, shape, jnp.float32)
    draws = jax.random.normal(key, (4, *shape), jnp.float32)
    return jnp.sum(draws, axis=0) / 2.0  # N(0, 1): four unit variances, halved


def add_gaussian_noise(
    l2_clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    key: jax.Array,
    *,
    secure: bool = False,
) -> optax.GradientTransformation:
    """Optax transform: clipped-gradient sum -> noisy mean gradient (see module docstring).

    `key` is a JAX PRNG key (e.g. `jaxdp.randomness.Secrets.generate().noise_key()`)."""
    if l2_clip_norm <= 0:
        raise ValueError(f"l2_clip_norm must be positive, got {l2_clip_norm}.")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size}.")
    if not (isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError("key must be a JAX PRNG key (jax.random.key / jaxdp.randomness).")
    stddev = noise_multiplier * l2_clip_norm
    # Only the key's data (state) and implementation (threefry2x32 for jaxdp's keys) are kept.
    key_data, impl = jax.random.key_data(key), jax.random.key_impl(key)

    def init_fn(params):
        del params
        return GaussianNoiseState(key=key_data, count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        key = jax.random.wrap_key_data(state.key, impl=impl)
        keys = leaf_keys(key, state.count, len(leaves))
        noisy = [
            (g + stddev * _normal(k, g.shape, secure).astype(g.dtype)) / expected_batch_size
            for g, k in zip(leaves, keys, strict=True)
        ]
        new_state = GaussianNoiseState(key=state.key, count=state.count + 1)
        return jax.tree.unflatten(treedef, noisy), new_state

    return optax.GradientTransformation(init_fn, update_fn)
