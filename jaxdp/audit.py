"""Privacy auditing: canaries, exposure, and a one-run empirical epsilon lower bound.

Canaries are secret-sharer style sequences ("My secret code is 482915.") with random digits.
Each canary becomes its own training example (one block: the canary's tokens repeated to fill
`block_size`), so a canary inserted once is exactly one unit of privacy; inserted k times it is a
group of k examples, whose guarantee is the group-privacy bound (`group_privacy`).

- Exposure (Carlini et al. 2019, "The Secret Sharer"): the canary's rank by model loss among
  itself and m random candidates of the same format; exposure = log2(m + 1) - log2(rank).
- One-run lower bound (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training
  Run", Theorem/Algorithm for (eps, delta)-DP): every canary is included independently with
  probability 1/2; the auditor guesses "in" for the k_pos lowest-loss canaries and "out" for the
  k_neg highest, chosen before looking at the outcome. If the training run were (eps, delta)-DP,
  the number of correct guesses would exceed v only with the probability `one_run_p_value`; the
  largest eps rejected at the given confidence is a lower bound on the run's true epsilon.
  Implemented here with SciPy's binomial distribution (dp-accounting and jax_privacy do not ship
  this test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats

TEMPLATE = "My secret code is {}."


def random_secrets(n: int, rng: np.random.Generator, digits: int = 6) -> list[str]:
    return ["".join(str(d) for d in rng.integers(0, 10, size=digits)) for _ in range(n)]


def canary_block(tokenizer, text: str, block_size: int) -> np.ndarray:
    """One training example: the canary's tokens (with a leading space) repeated to fill a block."""
    from jaxdp.data import tokenize

    ids = tokenize(tokenizer, " " + text)
    reps = math.ceil(block_size / len(ids))
    return np.tile(ids, reps)[:block_size].astype(np.int32)


def exposure(canary_loss: float, candidate_losses: Sequence[float]) -> tuple[int, float]:
    """(rank, exposure in bits) of a canary among itself and the candidates (lower loss first)."""
    candidate_losses = np.asarray(candidate_losses)
    rank = 1 + int(np.sum(candidate_losses < canary_loss))
    return rank, math.log2(len(candidate_losses) + 1) - math.log2(rank)


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] bound for an (eps, delta)-DP run with m canaries.

    Steinke, Nasr & Jagielski (2023): beta + 2 m delta alpha, where beta = P[Bin(r, q) >= v] with
    q = e^eps / (1 + e^eps), and alpha = max_{i=1..v} P[v > Bin(r, q) >= v - i] / i.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"Need 0 <= v <= r <= m, got v={v}, r={r}, m={m}.")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = scipy.stats.binom.sf(v - 1, r, q)
    alpha, cumulative = 0.0, 0.0
    for i in range(1, v + 1):
        cumulative += scipy.stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, cumulative / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, confidence: float = 0.95
) -> float:
    """Largest eps such that an (eps, delta)-DP run would give >= v correct guesses with
    probability < 1 - confidence (0 if none): with that confidence the run is not
    (eps, delta)-DP for any smaller eps."""
    p = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if one_run_p_value(m, r, v, mid, delta) < p else (lo, mid)
    return lo


def guesses(losses: np.ndarray, included: np.ndarray, k_pos: int, k_neg: int) -> tuple[int, int]:
    """(r, v): guess "in" for the k_pos lowest losses and "out" for the k_neg highest."""
    losses, included = np.asarray(losses), np.asarray(included, bool)
    if k_pos + k_neg > len(losses):
        raise ValueError("k_pos + k_neg exceeds the number of canaries.")
    order = np.argsort(losses, kind="stable")
    correct = int(np.sum(included[order[:k_pos]])) + int(
        np.sum(~included[order[len(losses) - k_neg :]])
    )
    return k_pos + k_neg, correct


def group_privacy(eps: float, delta: float, k: int) -> tuple[float, float]:
    """(eps, delta)-DP for one example implies (k eps, k e^{(k-1) eps} delta) for k examples."""
    return k * eps, k * math.exp((k - 1) * eps) * delta


def example_losses(model, blocks: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Per-example mean next-token loss [N] of int token blocks [N, T] under `model`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdp.loss import example_loss

    graphdef, state = nnx.split(model)

    @jax.jit
    def batch_losses(state, tokens):
        return example_loss(nnx.merge(graphdef, state)(tokens), tokens)

    out = []
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i : i + batch_size]
        pad = batch_size - len(chunk)
        tokens = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)]) if pad else chunk
        out.append(np.asarray(batch_losses(state, jnp.asarray(tokens)))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
