"""GPT-2 in Flax NNX: configuration presets and the forward pass (no loss, no training logic).

Attribute names mirror Hugging Face's `GPT2LMHeadModel` (`wte`, `wpe`, `h[i].ln_1`,
`h[i].attn.c_attn`, `h[i].attn.c_proj`, `h[i].ln_2`, `h[i].mlp.c_fc`, `h[i].mlp.c_proj`, `ln_f`) so
that `jaxdp.hf` can map parameters by name. HF's `Conv1D` stores weights as [in, out], the same
layout as an `nnx.Linear` kernel, so no transposes are needed. The output projection is tied to
the token embedding (`logits = h @ wte.T`), as in GPT-2.

Dropout is applied functionally from a key passed at call time (no RNG state is stored on the
module), so the model can be used under `jax.vmap` for per-example gradients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdp.randomness import Stream, stream_key

PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
    # A small model for tests, quickstarts and CPU benchmarks (not an OpenAI release).
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
}

COMPUTE_DTYPES = ("float32", "bfloat16")

# HF config keys that change the architecture in ways this implementation does not support.
_UNSUPPORTED_HF_OPTIONS = {
    "add_cross_attention": False,
    "reorder_and_upcast_attn": False,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 model; field names follow `transformers.GPT2Config`."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # Not an architecture field (never written to or read from a Hugging Face config.json): the
    # dtype of activations and matmuls. "bfloat16" is mixed precision: parameters (and so
    # optimizer state, gradients and the DP-SGD clipping and noise) stay float32.
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}."
            )
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}).")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"Unsupported activation_function {self.activation_function!r}; "
                f"choose one of {sorted(_ACTIVATIONS)}."
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}.")

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype as a JAX dtype."""
        return jnp.dtype(self.compute_dtype)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """A named size (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `tiny`) plus overrides."""
        key = name.split("/")[-1]  # accept "openai-community/gpt2" too
        if key not in PRESETS:
            raise ValueError(f"Unknown GPT-2 preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> GPT2Config:
        """Builds a config from a Hugging Face `config.json` dictionary."""
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"Expected a GPT-2 config (model_type 'gpt2'), got {model_type!r}.")
        for key, supported in _UNSUPPORTED_HF_OPTIONS.items():
            if hf.get(key, supported) != supported:
                raise NotImplementedError(f"HF GPT-2 option {key}={hf[key]!r} is not supported.")
        if hf.get("tie_word_embeddings", True) is False:
            raise NotImplementedError("Untied GPT-2 output embeddings are not supported.")
        names = {f.name for f in dataclasses.fields(cls)} - {"compute_dtype"}
        kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
        if hf.get("n_inner") is not None:
            kwargs["n_inner"] = hf["n_inner"]
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` fields of an equivalent `transformers.GPT2Config`."""
        d = dataclasses.asdict(self)
        del d["compute_dtype"]
        d.update(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            tie_word_embeddings=True,
            n_ctx=self.n_positions,
        )
        return d


_ACTIVATIONS = {
    # GPT-2's "gelu_new" is the tanh approximation, which is jax.nn.gelu's default.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `key` is None (evaluation) or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _split(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


class Tape:
    """Instrumentation for ghost clipping (`jaxdp.ghost`); the model runs unchanged without it.

    For each parametrised layer (named by its HF path, e.g. `h.0.attn.c_attn`, plus `embed` for
    wte(ids) + wpe(positions) and `lm_head` for the tied output layer) it records the layer's input
    and adds `perturbations[name]` (zeros) to the output: the gradient of the loss with respect to
    that perturbation is the layer's output gradient.
    """

    def __init__(self, perturbations: dict[str, jax.Array] | None = None):
        self.perturbations = dict(perturbations or {})
        self.inputs: dict[str, jax.Array] = {}
        self.outputs: dict[str, jax.ShapeDtypeStruct] = {}

    def __call__(self, name: str, layer, x: jax.Array) -> jax.Array:
        self.inputs[name] = x
        y = layer(x)
        self.outputs[name] = jax.ShapeDtypeStruct(y.shape, y.dtype)
        perturbation = self.perturbations.get(name)
        return y if perturbation is None else y + perturbation


def _call(tape: Tape | None, name: str, layer, x: jax.Array) -> jax.Array:
    return layer(x) if tape is None else tape(name, layer, x)


class Attention(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        # GPT-2 scales the residual projections' init by 1/sqrt(2 * n_layer).
        proj_init = nnx.initializers.normal(
            config.initializer_range / math.sqrt(2 * config.n_layer)
        )
        d, dt = config.n_embd, config.dtype
        self.c_attn = nnx.Linear(d, 3 * d, kernel_init=init, dtype=dt, rngs=rngs)
        self.c_proj = nnx.Linear(d, d, kernel_init=proj_init, dtype=dt, rngs=rngs)
        self.n_head = config.n_head
        self.attn_pdrop = config.attn_pdrop
        self.resid_pdrop = config.resid_pdrop
        scale = 1.0 / math.sqrt(config.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.scale = scale

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None, tape: Tape | None = None, name: str = ""
    ) -> jax.Array:
        B, T, D = x.shape
        attn_key, resid_key = _split(key, 2)
        qkv = _call(tape, f"{name}.c_attn", self.c_attn, x)  # [B, T, 3D]
        q, k, v = jnp.split(qkv, 3, axis=-1)  # 3 x [B, T, D]
        q, k, v = (
            t.reshape(B, T, self.n_head, D // self.n_head) for t in (q, k, v)
        )  # [B, T, N, H]
        if attn_key is None or self.attn_pdrop == 0.0:
            y = jax.nn.dot_product_attention(q, k, v, scale=self.scale, is_causal=True)
        else:
            # dot_product_attention has no dropout on the probabilities; spell it out.
            logits = jnp.einsum("btnh,bsnh->bnts", q, k) * self.scale  # [B, N, T, T]
            causal = jnp.tril(jnp.ones((T, T), dtype=bool))
            logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
            probs = dropout(probs, self.attn_pdrop, attn_key)
            y = jnp.einsum("bnts,bsnh->btnh", probs, v)  # [B, T, N, H]
        y = y.reshape(B, T, D)  # [B, T, D]
        return dropout(_call(tape, f"{name}.c_proj", self.c_proj, y), self.resid_pdrop, resid_key)


class MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        proj_init = nnx.initializers.normal(
            config.initializer_range / math.sqrt(2 * config.n_layer)
        )
        d, h, dt = config.n_embd, config.mlp_dim, config.dtype
        self.c_fc = nnx.Linear(d, h, kernel_init=init, dtype=dt, rngs=rngs)
        self.c_proj = nnx.Linear(h, d, kernel_init=proj_init, dtype=dt, rngs=rngs)
        self.act = _ACTIVATIONS[config.activation_function]
        self.resid_pdrop = config.resid_pdrop

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None, tape: Tape | None = None, name: str = ""
    ) -> jax.Array:
        h = self.act(_call(tape, f"{name}.c_fc", self.c_fc, x))  # [B, T, 4D]
        return dropout(_call(tape, f"{name}.c_proj", self.c_proj, h), self.resid_pdrop, key)


class Block(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        eps, dt = config.layer_norm_epsilon, config.dtype
        self.ln_1 = nnx.LayerNorm(config.n_embd, epsilon=eps, dtype=dt, rngs=rngs)
        self.attn = Attention(config, layer_idx, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(config.n_embd, epsilon=eps, dtype=dt, rngs=rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.name = f"h.{layer_idx}"

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None, tape: Tape | None = None
    ) -> jax.Array:
        attn_key, mlp_key = _split(key, 2)
        n = self.name
        x = x + self.attn(_call(tape, f"{n}.ln_1", self.ln_1, x), attn_key, tape, f"{n}.attn")
        return x + self.mlp(_call(tape, f"{n}.ln_2", self.ln_2, x), mlp_key, tape, f"{n}.mlp")


class GPT2LMHeadModel(nnx.Module):
    """GPT-2 with a language-modelling head tied to the token embedding.

    `model(input_ids)` maps int tokens [B, T] to float32 logits [B, T, vocab_size] (computed in
    `config.compute_dtype`, parameters float32 either way). Pass
    `dropout_key` to train with the config's dropout rates; without it the model is deterministic.
    """

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(config.initializer_range)
        d, dt = config.n_embd, config.dtype
        self.wte = nnx.Embed(config.vocab_size, d, embedding_init=init, dtype=dt, rngs=rngs)
        self.wpe = nnx.Embed(config.n_positions, d, embedding_init=init, dtype=dt, rngs=rngs)
        self.h = nnx.List([Block(config, i, rngs=rngs) for i in range(config.n_layer)])
        eps = config.layer_norm_epsilon
        self.ln_f = nnx.LayerNorm(d, epsilon=eps, dtype=dt, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
        tape: Tape | None = None,
    ) -> jax.Array:
        x = self.hidden_states(input_ids, dropout_key=dropout_key, tape=tape)
        return _call(tape, "lm_head", self.wte.attend, x).astype(jnp.float32)  # [B, T, V]

    def hidden_states(
        self,
        input_ids: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
        tape: Tape | None = None,
    ) -> jax.Array:
        """The final layer norm's output [B, T, D]: the features the output layer reads."""
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(
                f"Sequence length {T} exceeds the model's n_positions={self.config.n_positions}."
            )
        keys = _split(dropout_key, self.config.n_layer + 1)
        positions = jnp.arange(T)[None, :]  # [1, T]
        embed = lambda ids: self.wte(ids) + self.wpe(positions)
        x = _call(tape, "embed", embed, input_ids)  # [B, T, D]
        x = dropout(x, self.config.embd_pdrop, keys[0])
        for block, key in zip(self.h, keys[1:], strict=True):
            x = block(x, key, tape)
        return _call(tape, "ln_f", self.ln_f, x)  # [B, T, D]


def init_model(config: GPT2Config, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised model with GPT-2's initialisation scheme.

    The weights come from the `INIT` stream of `seed` (`jaxdp.randomness`): public randomness,
    separate from every other purpose's."""
    key = stream_key(seed, Stream.INIT)
    return GPT2LMHeadModel(config, rngs=nnx.Rngs(params=key))
