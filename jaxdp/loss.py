"""Language-modelling losses. The privacy unit is one example: one block of `block_size` tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxdp.params import merge


def next_token_losses(
    logits: jax.Array, tokens: jax.Array, token_mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-position cross-entropy of predicting `tokens[..., 1:]` from `logits[..., :-1, :]`.

    Returns (losses [..., T-1], weights [..., T-1]); a prediction counts if its target token is
    not padding (`token_mask[..., 1:]`).
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits[..., :-1, :].astype(jnp.float32), tokens[..., 1:]
    )  # [..., T-1]
    if token_mask is None:
        weights = jnp.ones_like(losses)
    else:
        weights = token_mask[..., 1:].astype(losses.dtype)
    return losses, weights


def example_loss(
    logits: jax.Array, tokens: jax.Array, token_mask: jax.Array | None = None
) -> jax.Array:
    """Mean next-token cross-entropy over one example's (unmasked) predictions.

    logits [..., T, V], tokens [..., T] -> [...] (a scalar for one example). An example with no
    unmasked prediction has loss 0.
    """
    losses, weights = next_token_losses(logits, tokens, token_mask)
    return jnp.sum(losses * weights, -1) / jnp.maximum(jnp.sum(weights, -1), 1.0)


def token_accuracy(
    logits: jax.Array, tokens: jax.Array, token_mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(number of correct greedy next-token predictions, number of predictions)."""
    _, weights = next_token_losses(logits, tokens, token_mask)
    correct = (jnp.argmax(logits[..., :-1, :], axis=-1) == tokens[..., 1:]).astype(weights.dtype)
    return jnp.sum(correct * weights), jnp.sum(weights)


def model_example_loss(graphdef: nnx.GraphDef, frozen: Any = None) -> Callable[..., jax.Array]:
    """loss(params, example, key) of a jaxdp GPT-2 on ONE example {"tokens": [T], optional
    "token_mask": [T]} (the privacy unit): `example_loss` of its logits; `key` drives dropout."""

    def loss(params, example, key):
        model = merge(graphdef, params, frozen)
        tokens = example["tokens"]
        logits = model(tokens[None], dropout_key=key)[0]  # [T, V]
        return example_loss(logits, tokens, example.get("token_mask"))

    return loss
