"""Text generation for eval-time samples: greedy or top-k, one compiled program per length."""

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
    key: jax.Array | None = None,
) -> np.ndarray:
    """Continues `prompt_ids` [P] by `max_new_tokens` tokens (greedy when top_k == 0).

    `params` is the model's State, or a tuple of States (e.g. trainable and frozen parameters).

    The model is causal, so a fixed-length buffer whose future positions hold placeholders gives
    the same logits at the current position as the unpadded prefix: one compilation serves every
    step. No KV cache: meant for short samples during evaluation.
    """
    prompt = np.asarray(prompt_ids, np.int32)
    total = len(prompt) + max_new_tokens
    n_positions = _merge(graphdef, params).config.n_positions
    if total > n_positions:
        prompt = prompt[-(n_positions - max_new_tokens) :]
        total = n_positions
    if key is None:
        key = jax.random.key(0)
    out = _generate(graphdef, params, jnp.asarray(prompt), key, total, top_k, temperature)
    return to_host(out)[len(prompt) :]


def _merge(graphdef, params):
    """`params` is one State or a tuple of States (trainable, frozen)."""
    return (
        nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)
    )


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(graphdef, params, prompt, key, total, top_k, temperature):
    model = _merge(graphdef, params)
    buf = jnp.zeros((total,), jnp.int32).at[: prompt.shape[0]].set(prompt)  # [L]

    def body(t, buf):
        logits = model(buf[None])[0, t - 1]  # [V], prediction for position t
        if top_k > 0:
            vals, idx = jax.lax.top_k(logits / temperature, top_k)
            nxt = idx[jax.random.categorical(jax.random.fold_in(key, t), vals)]
        else:
            nxt = jnp.argmax(logits)
        return buf.at[t].set(nxt.astype(jnp.int32))

    return jax.lax.fori_loop(prompt.shape[0], total, body, buf)
