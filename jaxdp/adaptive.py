"""Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, "Differentially Private
Learning with Adaptive Clipping"), flat or per layer (He et al., ICLR 2023).

Flat: the clip norm C_t follows a target quantile gamma of the per-unit gradient norms. At step t,
with the drawn units' norms ||g_u|| and b_u = 1[||g_u|| <= C_t],

    released count    b~ = ( sum_u (b_u - 1/2) + N(0, sigma_b^2) ) / B + 1/2      (B: EXPECTED
                                                                                   batch size)
    update            C_{t+1} = clip( C_t * exp(-eta (b~ - gamma)), min_clip_norm, max_clip_norm )

Centring b_u at 1/2 makes the count's sensitivity 1/2 (adding or removing one unit moves it by
+-1/2), and dividing by the expected batch size B, a public constant, not by the drawn size
(which is private; Opacus divides by the drawn one), keeps the release a post-processing of the
noisy count. The gradient sum gets noise of standard deviation sigma_D * C_t with

    sigma_D = (sigma^-2 - (2 sigma_b)^-2)^(-1/2),

so that the pair (clipped sum / C_t with sensitivity 1, count with sensitivity 1/2) is one
Gaussian mechanism on the concatenated vector with noise multiplier sigma: its privacy loss is
that of noise multiplier sigma (1/sigma^2 = 1/sigma_D^2 + (1/2)^2/sigma_b^2), and the accountant
is given sigma. It needs sigma < 2 sigma_b (otherwise no sigma_D exists): refused.

Per layer: every clipping group k (a parameter tensor; `jaxdp.fused` for the tied embedding) has
its own threshold C_k, tracked the same way from its own count of units with ||g_uk|| <= C_k,
and the thresholds are then rescaled so that the clipped sum's sensitivity stays C:
C_k <- C_k * C / S(C_1..C_K) (S = sqrt(sum_k C_k^2), or `jaxdp.fused.sensitivity` with the tied
embedding). The K counts are released together: a unit moves each by +-1/2, the vector by at most
sqrt(K)/2, so each gets noise sigma_b sqrt(K) and the ratio of sensitivity to noise (what the
pair's accounting uses) is again 1/(2 sigma_b). The gradient noise is sigma_D * C.

The thresholds, the released fractions b~ and everything computed from them are covered by the
run's epsilon (they are functions of the noisy counts); they are logged publicly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxdp import fused
from jaxdp.clipping import default_thresholds


@dataclasses.dataclass(frozen=True)
class AdaptiveClipping:
    """Settings of adaptive clipping (module docstring). `count_noise_multiplier` is sigma_b;
    Andrew et al. suggest about expected_batch_size / 20."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float = 10.0
    min_clip_norm: float = 1e-3
    max_clip_norm: float = 1e3

    def __post_init__(self):
        if not 0.0 < self.target_quantile < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if not (math.isfinite(self.count_noise_multiplier) and self.count_noise_multiplier > 0):
            raise ValueError(
                f"count_noise_multiplier must be positive, got {self.count_noise_multiplier}."
            )
        if not 0 < self.min_clip_norm <= self.max_clip_norm:
            raise ValueError(
                f"Need 0 < min_clip_norm <= max_clip_norm, got {self.min_clip_norm}, "
                f"{self.max_clip_norm}."
            )


def gradient_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """sigma_D = (sigma^-2 - (2 sigma_b)^-2)^(-1/2): the gradient's share of noise multiplier
    sigma when the count is released with sigma_b. Raises ValueError if sigma >= 2 sigma_b."""
    s, sb = float(noise_multiplier), float(count_noise_multiplier)
    if not s > 0:
        raise ValueError("Adaptive clipping needs noise (noise_multiplier > 0).")
    if s >= 2 * sb:
        raise ValueError(
            f"Adaptive clipping needs noise_multiplier < 2 * count_noise_multiplier; got "
            f"{s:.4g} >= 2 * {sb:.4g}. Raise dp.adaptive.count_noise_multiplier above "
            f"{s / 2:.4g} (the count then costs less of the budget)."
        )
    return (s**-2 - (2 * sb) ** -2) ** -0.5


def initial_thresholds(l2_clip_norm: float, clipping: str, names: list[str]) -> jax.Array:
    """[C] (flat) or equal per-group thresholds with sensitivity C (per layer)."""
    if clipping == "flat":
        return default_thresholds(l2_clip_norm, "flat", 1)
    return fused.default_thresholds(l2_clip_norm, names)


def update_thresholds(
    thresholds: jax.Array,
    noisy_fraction: jax.Array,
    config: AdaptiveClipping,
    clipping: str,
    l2_clip_norm: float,
    names: list[str],
) -> jax.Array:
    """The geometric update of the module docstring, from the released fractions b~ [K_c]."""
    new = thresholds * jnp.exp(-config.learning_rate * (noisy_fraction - config.target_quantile))
    if clipping == "flat":
        return jnp.clip(new, config.min_clip_norm, config.max_clip_norm)
    new = jnp.clip(new, config.min_clip_norm, config.max_clip_norm)
    # (1 - 1e-6): float32 rounding never takes the sensitivity above C.
    return new * (l2_clip_norm * (1 - 1e-6) / fused.sensitivity(new, names))
