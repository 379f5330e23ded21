"""Text generation: greedy, top-k or nucleus (top-p) sampling, one compiled program per length."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdp.sharding import to_host


def generate(
    graphdef: nnx.GraphDef,
    params,
    prompt_ids: np.ndarray,
    *,
    max_new_tokens: int,
    top_k: int = 0,
    temperature: float = 1.0,
    top_p: float | None = None,
    key: jax.Array | None = None,
) -> np.ndarray:
    """Continues `prompt_ids` [P] by `max_new_tokens` tokens: greedy when top_k == 0 and top_p
    is None; else sampled at `temperature` from the `top_k` most likely tokens (0: all) and,
    with `top_p`, from the smallest set of them whose probability reaches top_p (nucleus).

    `params` is the model's State, or a tuple of States (e.g. trainable and frozen parameters).

    The model is causal, so a fixed-length buffer whose future positions hold placeholders gives
    the same logits at the current position as the unpadded prefix: one compilation serves every
    step. No KV cache: meant for short samples during evaluation.
    """
    prompt, total = _prepare(graphdef, params, prompt_ids, max_new_tokens, temperature, top_p)
    if key is None:
        key = jax.random.key(0)
    out = _generate(graphdef, params, jnp.asarray(prompt), key, total, top_k, temperature, top_p)
    return to_host(out)[len(prompt) :]


def generate_samples(
    graphdef: nnx.GraphDef,
    params,
    prompt_ids: np.ndarray,
    keys: jax.Array,
    *,
    max_new_tokens: int,
    top_k: int = 0,
    temperature: float = 1.0,
    top_p: float | None = None,
) -> np.ndarray:
    """`generate` once per key of `keys` [N], as one batched program: [N, max_new_tokens]."""
    prompt, total = _prepare(graphdef, params, prompt_ids, max_new_tokens, temperature, top_p)
    out = _generate_many(
        graphdef, params, jnp.asarray(prompt), keys, total, top_k, temperature, top_p
    )
    return to_host(out)[:, len(prompt) :]


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate_many(graphdef, params, prompt, keys, total, top_k, temperature, top_p):
    one = lambda k: _generate(graphdef, params, prompt, k, total, top_k, temperature, top_p)
    return jax.vmap(one)(keys)


def _prepare(graphdef, params, prompt_ids, max_new_tokens, temperature, top_p):
    """(the prompt, cut from the left to leave room for the new tokens within n_positions, the
    buffer length), after checking the sampling settings."""
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    prompt = np.asarray(prompt_ids, np.int32)
    n_positions = _merge(graphdef, params).config.n_positions
    if len(prompt) + max_new_tokens > n_positions:
        prompt = prompt[-(n_positions - max_new_tokens) :]
    return prompt, len(prompt) + max_new_tokens


def _merge(graphdef, params):
    """`params` is one State or a tuple of States (trainable, frozen)."""
    return (
        nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)
    )


def _nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """`logits` with every token outside the top-p nucleus set to -inf."""
    order = jnp.argsort(-logits)
    probs = jax.nn.softmax(logits[order])
    before = jnp.cumsum(probs) - probs  # probability of the more likely tokens
    keep_sorted = before < top_p  # (the most likely token is always kept)
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, params, prompt, key, total, top_k, temperature, top_p=None):
    model = _merge(graphdef, params)
    buf = jnp.zeros((total,), jnp.int32).at[: prompt.shape[0]].set(prompt)  # [L]

    def body(t, buf):
        logits = model(buf[None])[0, t - 1]  # [V], prediction for position t
        k = jax.random.fold_in(key, t)
        if top_k > 0:
            vals, idx = jax.lax.top_k(logits / temperature, top_k)
            if top_p is not None:
                vals = _nucleus(vals, top_p)
            nxt = idx[jax.random.categorical(k, vals)]
        elif top_p is not None:
            nxt = jax.random.categorical(k, _nucleus(logits / temperature, top_p))
        else:
            nxt = jnp.argmax(logits)
        return buf.at[t].set(nxt.astype(jnp.int32))

    return jax.lax.fori_loop(prompt.shape[0], total, body, buf)
