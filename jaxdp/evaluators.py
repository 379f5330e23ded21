"""Evaluators: what the trainer computes from a checkpointed state at each evaluation and
releases (as big_vision's `evaluators/`): each has `run(params, frozen, step) -> metrics`.

`LossEvaluator` gives the held-out loss, perplexity and accuracy; `SampleEvaluator` writes
continuations of the sample prompts into samples.jsonl. Both compute from public data and the
(released) model only.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

import numpy as np

from jaxdp import data, randomness, sampling
from jaxdp.batches import put_rows
from jaxdp.generate import generate
from jaxdp.release import RunRelease
from jaxdp.settings import TrainSettings

log = logging.getLogger("jaxdp")


class Evaluator(Protocol):
    def run(self, params, frozen, step: int) -> dict[str, Any]:
        """Metrics to release at `step` (may be empty), computed from the model alone."""


def evaluate(
    eval_step, params, frozen, rows: data.UnitRows, batch_size: int, mesh
) -> dict[str, float]:
    """Token-weighted loss, perplexity and accuracy on held-out rows (public data)."""
    if len(rows.lengths) == 0:
        return {}
    sums = {"loss_sum": 0.0, "num_tokens": 0.0, "num_correct": 0.0}
    for r, is_padding in sampling.pad_batches(np.arange(len(rows.lengths)), batch_size):
        out = eval_step(params, put_rows(rows, r, is_padding, mesh), frozen)
        for k in sums:
            sums[k] += float(out[k])
    loss = sums["loss_sum"] / sums["num_tokens"]
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 700.0)),
        "eval_accuracy": sums["num_correct"] / sums["num_tokens"],
    }


class LossEvaluator:
    """Held-out loss, perplexity and accuracy (`evaluate`)."""

    def __init__(self, eval_step, rows: data.UnitRows, batch_size: int, mesh):
        self.eval_step, self.rows, self.batch_size, self.mesh = eval_step, rows, batch_size, mesh

    def run(self, params, frozen, step: int) -> dict[str, Any]:
        return evaluate(self.eval_step, params, frozen, self.rows, self.batch_size, self.mesh)


class SampleEvaluator:
    """Continuations of `train.sample_prompts` at each eval, released into samples.jsonl (the
    model is post-processed with public randomness)."""

    def __init__(self, release: RunRelease, t: TrainSettings, tokenizer, graphdef, lead):
        self.release = release
        self.prompts, self.max_new_tokens = tuple(t.sample_prompts), t.sample_max_new_tokens
        self.top_k, self.seed = t.sample_top_k, t.seed
        self.tokenizer, self.graphdef, self.lead = tokenizer, graphdef, lead

    def run(self, params, frozen, step: int) -> dict[str, Any]:
        for i, prompt in enumerate(self.prompts):
            out = generate(
                self.graphdef,
                (params, frozen),
                data.tokenize(self.tokenizer, prompt),
                max_new_tokens=self.max_new_tokens,
                top_k=self.top_k,
                key=randomness.generation_key(self.seed, i),
            )
            if self.lead:
                text = self.tokenizer.decode(out.tolist())
                self.release.sample(step, prompt, text)
                log.info("Sample at step %d: %s|%s", step, prompt, text)
        return {}
