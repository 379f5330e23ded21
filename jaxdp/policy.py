"""Policies from a DP reward model by post-processing: best-of-N and the Gibbs policy.

A policy that only samples from a public reference model and scores the samples with the
private reward model is a function of the reward model and public inputs, so it costs no
privacy beyond the reward model's (Cho & Sun, 2026). The generation randomness is public (the
`generation` stream of a public seed): it protects nothing and makes samples reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdp import data, hf, randomness, reward
from jaxdp.generate import generate_samples
from jaxdp.params import split
from jaxdp.reward_run import RewardModel, default_config, load_base


def reference_model(rm: RewardModel, reference: str | None = None):
    """(graphdef, params) of the reference policy pi0: `reference` (an HF GPT-2 directory or
    Hub id), else the reward model's base WITHOUT its LoRA adapters."""
    if reference is not None:
        graphdef, params, _ = split(hf.from_pretrained(reference), ())
        return graphdef, params
    cfg = default_config()
    cfg.model.name_or_path = rm.meta["base_model"]
    cfg.model.init = rm.meta["init"]
    cfg.model.seed = rm.meta["seed"]
    graphdef, _, params = load_base(cfg)
    return graphdef, params


def sample_candidates(
    graphdef, params, tokenizer, prompt: str, n: int, *, key, temperature, top_p, max_new_tokens
) -> list[str]:
    """N continuations of `prompt` sampled from the reference model (one batched program;
    candidate j uses fold_in(key, j))."""
    ids = data.tokenize(tokenizer, prompt)
    keys = jnp.stack([jax.random.fold_in(key, j) for j in range(n)])
    new = generate_samples(
        graphdef,
        params,
        ids,
        keys,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
    )
    return [tokenizer.decode(row.tolist()) for row in new]


def best_of_n_responses(
    reward_dir: str | Path,
    prompts: list[str],
    *,
    n: int = 8,
    temperature: float = 1.0,
    top_p: float | None = 0.95,
    max_new_tokens: int = 16,
    gibbs_eta: float | None = None,
    seed: int = 0,
    reference: str | None = None,
) -> list[dict[str, Any]]:
    """For each prompt: N candidates from pi0, their rewards, and the chosen response (the best,
    or one drawn from the Gibbs policy pi0 exp(eta r) / Z over the candidates)."""
    rm = RewardModel(reward_dir)
    graphdef, params = reference_model(rm, reference)
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(seed)
    results = []
    for i, prompt in enumerate(prompts):
        key = randomness.generation_key(seed, i)
        candidates = sample_candidates(
            graphdef,
            params,
            rm.tokenizer,
            prompt,
            n,
            key=key,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
        )
        rewards = rm(prompt, candidates)
        if gibbs_eta is None:
            chosen = reward.best_of_n(candidates, rewards)
            probs = None
        else:
            prompt_ids = data.tokenize(rm.tokenizer, prompt)
            logp0 = [
                reward.sequence_logprob(model, prompt_ids, data.tokenize(rm.tokenizer, c))
                for c in candidates
            ]
            probs = reward.gibbs_policy(logp0, rewards, gibbs_eta)
            chosen = int(rng.choice(n, p=probs))
        results.append(
            {
                "prompt": prompt,
                "candidates": candidates,
                "rewards": [float(r) for r in rewards],
                "chosen": chosen,
                "response": candidates[chosen],
                "reward": float(rewards[chosen]),
                **({"gibbs_probs": probs.tolist()} if probs is not None else {}),
            }
        )
    return results
