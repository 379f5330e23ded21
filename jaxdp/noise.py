"""Gaussian noise for DP-SGD as an optax transform.

`add_gaussian_noise(l2_clip_norm, noise_multiplier, expected_batch_size, seed)` expects as its
input `updates` the SUM over the drawn examples of per-example gradients clipped to L2 norm
`l2_clip_norm` (`jaxdp.clipping`), whose sensitivity to adding or removing one example is
`l2_clip_norm`. It outputs

    (clipped_sum + N(0, (noise_multiplier * l2_clip_norm)^2 I)) / expected_batch_size,

the Gaussian mechanism at the noise multiplier that `jaxdp.accounting` accounts for. Dividing by
the fixed expected batch size (not the random drawn size, which would itself leak) is
post-processing. The noise key is `fold_in(key(seed), count)` where `count` (the number of noisy
updates so far) lives in the optimizer state, so a run resumed from a checkpoint draws exactly
the noise the uninterrupted run would have drawn. Apply it once per logical step, after summing
the clipped gradients of all physical batches of that step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class GaussianNoiseState(NamedTuple):
    count: jax.Array  # int32 scalar: noisy updates emitted so far


def noise_key(seed: int, count: jax.Array | int) -> jax.Array:
    """The PRNG key of the noise added at update number `count`."""
    return jax.random.fold_in(jax.random.key(seed), count)


def add_gaussian_noise(
    l2_clip_norm: float, noise_multiplier: float, expected_batch_size: float, seed: int
) -> optax.GradientTransformation:
    """Optax transform: clipped-gradient sum -> noisy mean gradient (see module docstring)."""
    if l2_clip_norm <= 0:
        raise ValueError(f"l2_clip_norm must be positive, got {l2_clip_norm}.")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size}.")
    stddev = noise_multiplier * l2_clip_norm

    def init_fn(params):
        del params
        return GaussianNoiseState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(noise_key(seed, state.count), len(leaves))
        noisy = [
            (g + stddev * jax.random.normal(k, g.shape, jnp.float32).astype(g.dtype))
            / expected_batch_size
            for g, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(treedef, noisy), GaussianNoiseState(count=state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)
