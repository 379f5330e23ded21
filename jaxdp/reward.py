"""A differentially private reward model, and policies derived from it by post-processing.

After "Privacy-Preserving RLHF via Decoupled Reward Modeling" (Cho & Sun, 2026): DP is imposed on
reward learning only; a policy computed from the private reward model and public components (the
reference model, public prompts) is post-processing and costs no further privacy.

Privacy unit: one preference tuple (prompt x, chosen a_w, rejected a_l); neighbouring datasets
differ by adding or removing one tuple. The reward model is

    r(x, a) = w . phi(x, a),   phi = ln_f output of a FROZEN GPT-2 at the last real token of
                                     x + a, divided by its L2 norm (so ||phi|| = 1),

trained with DP-SGD (`jaxdp.make_private`: Poisson sampling, per-example clipping, Gaussian
noise, the PLD accountant) on the Bradley-Terry loss

    l(w; x, a_w, a_l) = -log sigmoid(r(x, a_w) - r(x, a_l)) = softplus(-w . (phi_w - phi_l)).

Per-example gradient bound: grad_w l = -sigmoid(-w . d) d with d = phi_w - phi_l, so
||grad_w l|| <= ||d|| <= ||phi_w|| + ||phi_l|| = 2 whatever w is: a clip norm C >= 2 never
clips, and the sensitivity of the clipped sum is min(C, 2). (A constant bias cancels in the
difference: the model has none.) The features are a deterministic function of each tuple alone
(the base model is public and frozen), so computing them first is part of the per-example
gradient and changes nothing in the guarantee.

Optionally (`lora_rank > 0`) the base's attention projections get LoRA adapters trained jointly
with w (the same engines; per-example gradients of the adapters are unbounded, clipping bounds
them).

Data: Anthropic HH-RLHF (`chosen` / `rejected` strings, each a whole dialogue: the prompt is
everything up to and including the last "\\n\\nAssistant:", the response the rest), from a local
JSONL file or the Hub; and `synthetic_preferences`, a generator with a known reward for offline
tests and demos.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdp import data
from jaxdp.hf import HubUnavailableError
from jaxdp.params import merge

ASSISTANT = "\n\nAssistant:"
# The synthetic task's lexicon: single GPT-2 tokens (with their leading space).
POSITIVE = tuple(
    "good great excellent happy love wonderful nice best fine perfect amazing glad kind fresh "
    "clean bright".split()
)
NEGATIVE = tuple(
    "bad awful terrible sad hate poor worst ugly wrong broken dirty angry rude cold dark "
    "slow".split()
)
TOPICS = ("the food", "the hotel", "the movie", "the service", "the book", "the weather")


@dataclasses.dataclass(frozen=True)
class Preference:
    """One privacy unit: a prompt and two responses, the first preferred."""

    prompt: str
    chosen: str
    rejected: str


# ---------------------------------------------------------------------------------- data ---


def split_dialogue(text: str) -> tuple[str, str]:
    """HH-RLHF: (prompt up to and including the last "\\n\\nAssistant:", the response)."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise ValueError(f"No {ASSISTANT!r} in an HH-RLHF dialogue: {text[:80]!r}...")
    cut = i + len(ASSISTANT)
    return text[:cut], text[cut:]


def from_hh(chosen: str, rejected: str) -> Preference:
    """An HH-RLHF row as a Preference (the prompt taken from the chosen dialogue; rows whose two
    dialogues have different prompts are refused)."""
    prompt, a_w = split_dialogue(chosen)
    prompt_l, a_l = split_dialogue(rejected)
    if prompt != prompt_l:
        raise ValueError("The chosen and rejected dialogues have different prompts.")
    return Preference(prompt, a_w, a_l)


def load_preferences(
    source: str, *, split: str = "train", limit: int | None = None
) -> list[Preference]:
    """Preferences from a JSONL file (rows with `chosen` and `rejected`, and optionally
    `prompt`, else HH-RLHF dialogues) or a Hugging Face dataset id (e.g. Anthropic/hh-rlhf)."""
    path = Path(source).expanduser()
    if path.is_file():
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not JSON ({e}).") from None
    else:
        try:
            import datasets  # noqa: PLC0415 (the hf extra)

            rows = datasets.load_dataset(source, split=split)
        except Exception as e:
            raise HubUnavailableError(
                f"Could not load preference dataset {source!r} split {split!r} "
                f"({type(e).__name__}: {e}). Offline, give a local JSONL file with 'chosen' and "
                f"'rejected' fields (or use the synthetic task)."
            ) from e
    out = []
    for n, row in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        if "chosen" not in row or "rejected" not in row:
            raise ValueError(f"Row {n} of {source} has no 'chosen' and 'rejected' fields.")
        if row.get("prompt") is not None:
            out.append(Preference(row["prompt"], row["chosen"], row["rejected"]))
        else:
            out.append(from_hh(row["chosen"], row["rejected"]))
    if not out:
        raise ValueError(f"{source} holds no preference pairs.")
    return out


def synthetic_reward(text: str) -> float:
    """The synthetic task's true reward: (positive - negative lexicon words) / words, in
    [-1, 1]."""
    words = text.split()
    if not words:
        return 0.0
    return (sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)) / len(words)


def synthetic_response(rng: np.random.Generator, length: int = 8) -> str:
    p = rng.uniform()  # this response's share of positive words
    return " " + " ".join(
        str(rng.choice(POSITIVE if rng.uniform() < p else NEGATIVE)) for _ in range(length)
    )


def synthetic_preferences(
    n: int, seed: int = 0, *, length: int = 8, beta: float = 10.0
) -> list[Preference]:
    """`n` tuples with a known reward (`synthetic_reward`): a prompt about a topic and two
    responses of lexicon words; the first is preferred with the Bradley-Terry probability
    sigmoid(beta (r1 - r2)) of the true rewards."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = f"Human: How was {rng.choice(TOPICS)}?{ASSISTANT}"
        a, b = synthetic_response(rng, length), synthetic_response(rng, length)
        p_a = 1.0 / (1.0 + math.exp(-beta * (synthetic_reward(a) - synthetic_reward(b))))
        out.append(Preference(prompt, a, b) if rng.uniform() < p_a else Preference(prompt, b, a))
    return out


# ------------------------------------------------------------------------------ features ---


def encode(tokenizer: Any, prompt: str, response: str, max_length: int) -> tuple[np.ndarray, int]:
    """Tokens of prompt + response, the last `max_length` kept (the response's end matters
    most), padded to `max_length`; and the index of the last real token."""
    ids = data.tokenize(tokenizer, prompt + response)[-max_length:]
    if len(ids) == 0:
        raise ValueError("An empty prompt and response.")
    out = np.zeros(max_length, np.int32)
    out[: len(ids)] = ids
    return out, len(ids) - 1


def encode_pairs(
    tokenizer: Any, prefs: Sequence[Preference], max_length: int
) -> dict[str, np.ndarray]:
    """{"chosen", "rejected": [n, T] tokens, "chosen_last", "rejected_last": [n]}."""
    cols: dict[str, list] = {"chosen": [], "rejected": [], "chosen_last": [], "rejected_last": []}
    for p in prefs:
        for side, text in (("chosen", p.chosen), ("rejected", p.rejected)):
            ids, last = encode(tokenizer, p.prompt, text, max_length)
            cols[side].append(ids)
            cols[f"{side}_last"].append(last)
    return {k: np.asarray(v, np.int32) for k, v in cols.items()}


def features_of(model, tokens: jax.Array, last: jax.Array) -> jax.Array:
    """phi [n, D]: the unit-norm ln_f output at each sequence's last real token."""
    h = model.hidden_states(tokens)  # [n, T, D], without the output layer's logits
    h = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [n, D]
    return h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)


def merged(graphdef: nnx.GraphDef, params):
    """The model from one State or a tuple of States (adapters, frozen base)."""
    return (
        nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)
    )


def compute_features(
    graphdef: nnx.GraphDef, params, tokens: np.ndarray, last: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """`features_of` over many sequences, in batches (the base model frozen)."""
    fn = jax.jit(lambda p, t, i: features_of(merged(graphdef, p), t, i))
    out = []
    for s in range(0, len(tokens), batch_size):
        t, i = tokens[s : s + batch_size], last[s : s + batch_size]
        pad = batch_size - len(t)  # one compiled shape
        t = np.concatenate([t, np.zeros((pad, t.shape[1]), t.dtype)])
        i = np.concatenate([i, np.zeros(pad, i.dtype)])
        out.append(np.asarray(fn(params, t, i))[: batch_size - pad])
    return np.concatenate(out)


# ---------------------------------------------------------------------------------- loss ---


def bt_loss(w: jax.Array, phi_w: jax.Array, phi_l: jax.Array) -> jax.Array:
    """Bradley-Terry loss of one tuple: softplus(-(r_w - r_l))."""
    return jax.nn.softplus(-(jnp.dot(phi_w, w) - jnp.dot(phi_l, w)))


def linear_example_loss(params, example, key) -> jax.Array:
    """`make_private`'s per-example loss of the linear reward model on precomputed features."""
    del key
    return bt_loss(params["w"], example["phi_w"], example["phi_l"])


def lora_example_loss(graphdef: nnx.GraphDef, frozen) -> Callable[..., jax.Array]:
    """Per-example loss of a LoRA reward model: params {"lora": adapters, "w": head}, example
    {"chosen", "rejected" [T], "chosen_last", "rejected_last"}."""

    def loss(params, example, key):
        del key
        model = merge(graphdef, params["lora"], frozen)
        tokens = jnp.stack([example["chosen"], example["rejected"]])
        last = jnp.stack([example["chosen_last"], example["rejected_last"]])
        phi = features_of(model, tokens, last)
        return bt_loss(params["w"], phi[0], phi[1])

    return loss


def accuracy(w: np.ndarray, phi_w: np.ndarray, phi_l: np.ndarray) -> float:
    """Fraction of pairs whose chosen response gets the higher reward."""
    return float(np.mean(phi_w @ np.asarray(w) > phi_l @ np.asarray(w)))


# ------------------------------------------------------------------------------ policies ---


def best_of_n(candidates: Sequence[Any], rewards: Sequence[float]) -> int:
    """Index of the best of N candidates by reward (ties: the first)."""
    return int(np.argmax(np.asarray(rewards)))


def gibbs_policy(
    reference_logprobs: Sequence[float], rewards: Sequence[float], eta: float
) -> np.ndarray:
    """The exact policy pi(y) = pi0(y) exp(eta r(y)) / Z on a finite candidate set, from the
    reference model's log-probabilities log pi0(y) (renormalised over the set)."""
    logits = np.asarray(reference_logprobs, np.float64) + eta * np.asarray(rewards, np.float64)
    logits -= logits.max()
    p = np.exp(logits)
    return p / p.sum()


def sequence_logprob(model, prompt_ids: np.ndarray, response_ids: np.ndarray) -> float:
    """log pi0(response | prompt) under a language model."""
    ids = np.concatenate([prompt_ids, response_ids]).astype(np.int32)
    logits = model(jnp.asarray(ids[None]))[0]  # [L, V]
    logp = jax.nn.log_softmax(logits[:-1], axis=-1)
    targets = ids[1:]
    start = len(prompt_ids) - 1
    picked = logp[jnp.arange(start, len(ids) - 1), targets[start:]]
    return float(jnp.sum(picked))
