"""Privacy auditing: canaries, exposure, and a one-run empirical epsilon lower bound.

Canaries are secret-sharer style sequences ("My secret code is 482915.") with random digits.
Each canary becomes its own training example (one block: the canary's tokens repeated to fill
`block_size`), so a canary inserted once is exactly one unit of privacy; inserted k times it is a
group of k examples, whose guarantee is the group-privacy bound (`group_privacy`).

- Exposure (Carlini et al. 2019, "The Secret Sharer"): the canary's rank by model loss among
  itself and m random candidates of the same format; exposure = log2(m + 1) - log2(rank).
- One-run lower bound (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training
  Run"), computed by jax_privacy's `auditing.CanaryScoreAuditor.epsilon_one_run`: every canary is
  included independently with probability 1/2 and scored by its loss; if the run were
  (eps, delta)-DP, guessing membership from the scores could not beat the randomized-response
  accuracy e^eps / (1 + e^eps) except with small probability, so the largest eps this rejects
  at the given confidence is a lower bound on the run's true epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdp.data import tokenize
from jaxdp.loss import example_loss

TEMPLATE = "My secret code is {}."


def random_secrets(n: int, rng: np.random.Generator, digits: int = 6) -> list[str]:
    return ["".join(str(d) for d in rng.integers(0, 10, size=digits)) for _ in range(n)]


def canary_block(tokenizer, text: str, block_size: int) -> np.ndarray:
    """One training example: the canary's tokens (with a leading space) repeated to fill a block."""
    ids = tokenize(tokenizer, " " + text)
    reps = math.ceil(block_size / len(ids))
    return np.tile(ids, reps)[:block_size].astype(np.int32)


def exposure(canary_loss: float, candidate_losses: Sequence[float]) -> tuple[int, float]:
    """(rank, exposure in bits) of a canary among itself and the candidates (lower loss first)."""
    candidate_losses = np.asarray(candidate_losses)
    rank = 1 + int(np.sum(candidate_losses < canary_loss))
    return rank, math.log2(len(candidate_losses) + 1) - math.log2(rank)


def one_run_epsilon_lower_bound(
    in_losses: Sequence[float],
    out_losses: Sequence[float],
    delta: float,
    confidence: float = 0.95,
) -> dict[str, float]:
    """The one-run lower bound on epsilon from jax_privacy's `CanaryScoreAuditor`.

    `in_losses` / `out_losses`: per-canary losses of canaries that were / were not trained on
    (lower loss = more likely "in"; the auditor wants higher scores for "in", so losses are
    negated). Steinke, Nasr & Jagielski (2023), one-sided, with jax_privacy's default Bonferroni
    correction over the thresholds it tries. With probability >= `confidence` the run is not
    (eps, delta)-DP for any eps below the returned "epsilon_lower_bound".
    """
    # jax_privacy is the `audit` extra: imported only by the audit that needs it.
    from jax_privacy.auditing import CanaryScoreAuditor  # noqa: PLC0415 (the audit extra)

    auditor = CanaryScoreAuditor(-np.asarray(in_losses), -np.asarray(out_losses))
    return {
        "epsilon_lower_bound": float(auditor.epsilon_one_run(1.0 - confidence, delta)),
        "auroc": float(auditor.attack_auroc()),
    }


def group_privacy(eps: float, delta: float, k: int) -> tuple[float, float]:
    """(eps, delta)-DP for one example implies (k eps, k e^{(k-1) eps} delta) for k examples."""
    return k * eps, k * math.exp((k - 1) * eps) * delta


def example_losses(model, blocks: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Per-example mean next-token loss [N] of int token blocks [N, T] under `model`."""
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
