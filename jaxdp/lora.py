"""LoRA adapters for the NNX GPT-2: add, merge, export in PEFT format.

`apply_lora(model, rank, alpha, targets)` replaces each target `nnx.Linear` (by default the
attention projections `attn.c_attn` and `attn.c_proj` of every block) with a `LoRALinear`:

    y = x W + b + (x A) B * alpha / rank,   A: [in, rank] ~ N(0, 1/in), B: [rank, out] = 0

so the adapted model starts equal to the base model. Parameter paths keep their HF names
(`h.0.attn.c_attn.kernel`) and gain `h.0.attn.c_attn.lora_a` / `lora_b`. `merge_lora(model)`
folds the adapters into the kernels (W + A B alpha / rank) and returns a plain GPT-2 that
`jaxdp.hf.save_pretrained` exports as an ordinary `GPT2LMHeadModel`.

With DP-SGD only the trainable parameters (`jaxdp.params.trainable_filter`; with LoRA usually
`LORA_PATTERN`) are clipped, noised and updated; frozen parameters get no weight gradients.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxdp.gpt2 import GPT2LMHeadModel
from jaxdp.hf import set_default_mode
from jaxdp.randomness import Stream, stream_key

DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj")
LORA_PATTERN = r".*\.lora_[ab]"


class LoRALinear(nnx.Module):
    """A dense layer W, b (frozen or not) plus a low-rank update A B scaled by alpha / rank."""

    def __init__(self, base: nnx.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        d_in, d_out = base.kernel.get_value().shape
        self.kernel = base.kernel
        self.bias = base.bias
        init = nnx.initializers.normal(1.0 / d_in**0.5)
        self.lora_a = nnx.Param(init(rngs.params(), (d_in, rank), jnp.float32))
        self.lora_b = nnx.Param(jnp.zeros((rank, d_out), jnp.float32))
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype  # the compute dtype (parameters are float32)
        kernel, bias = self.kernel.get_value().astype(dt), self.bias.get_value().astype(dt)
        a, b = self.lora_a.get_value().astype(dt), self.lora_b.get_value().astype(dt)
        y = x @ kernel + bias  # [..., out]
        return y + (x @ a) @ b * self.scale

    def merged_kernel(self) -> jax.Array:
        return (
            self.kernel.get_value() + self.lora_a.get_value() @ self.lora_b.get_value() * self.scale
        )


def _targets(model: GPT2LMHeadModel, targets: Sequence[str]):
    for block in model.h:
        for target in targets:
            *parents, leaf = target.split(".")
            parent = block
            for p in parents:
                parent = getattr(parent, p)
            if not hasattr(parent, leaf):
                raise ValueError(f"No layer {target!r} in a GPT-2 block (e.g. 'attn.c_attn').")
            yield parent, leaf


def apply_lora(
    model: GPT2LMHeadModel,
    rank: int,
    alpha: float,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> GPT2LMHeadModel:
    """Wraps the target layers of every block with LoRA adapters (in place; returns the model).

    The A matrices come from the `LORA_INIT` stream of `seed` (`jaxdp.randomness`)."""
    rngs = nnx.Rngs(params=stream_key(seed, Stream.LORA_INIT))
    for parent, leaf in _targets(model, targets):
        layer = getattr(parent, leaf)
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{leaf} already has a LoRA adapter.")
        setattr(parent, leaf, LoRALinear(layer, rank, alpha, rngs=rngs))
    return model


def merge_lora(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """A copy of `model` with every LoRA adapter folded into its kernel (plain nnx.Linear)."""
    model = nnx.clone(model)
    for block in model.h:
        for parent in (block.attn, block.mlp):
            for name in ("c_attn", "c_proj", "c_fc"):
                layer = getattr(parent, name, None)
                if isinstance(layer, LoRALinear):
                    d_in, d_out = layer.kernel.get_value().shape
                    plain = nnx.Linear(d_in, d_out, rngs=nnx.Rngs(0))
                    plain.kernel.set_value(layer.merged_kernel())
                    plain.bias.set_value(layer.bias.get_value())
                    setattr(parent, name, plain)
    return model


def has_lora(model: GPT2LMHeadModel) -> bool:
    return any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model))


def save_peft_adapter(
    model: GPT2LMHeadModel, out_dir, *, base_model_name_or_path: str | None = None
):
    """Writes the adapters as a PEFT LoRA directory (`peft.PeftModel.from_pretrained` loads it
    on top of the base `GPT2LMHeadModel`). GPT-2's Conv1D layers store [in, out] weights, hence
    `fan_in_fan_out=True`; PEFT's lora_A is [rank, in] = A^T and lora_B is [out, rank] = B^T."""
    tensors, names, ranks, scales = {}, set(), set(), set()
    for i, block in enumerate(model.h):
        for parent_name in ("attn", "mlp"):
            parent = getattr(block, parent_name)
            for name in ("c_attn", "c_proj", "c_fc"):
                layer = getattr(parent, name, None)
                if not isinstance(layer, LoRALinear):
                    continue
                prefix = f"base_model.model.transformer.h.{i}.{parent_name}.{name}"
                a = np.asarray(jax.device_get(layer.lora_a.get_value()), np.float32)
                b = np.asarray(jax.device_get(layer.lora_b.get_value()), np.float32)
                tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.T)  # [r, in]
                tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.T)  # [out, r]
                names.add(f"{parent_name}.{name}")
                ranks.add(a.shape[1])
                scales.add(layer.scale)
    if not tensors:
        raise ValueError("The model has no LoRA adapters to save.")
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError("PEFT export needs one rank and one alpha for all adapters.")
    rank, scale = ranks.pop(), scales.pop()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": True,
        # A regex (full match on module names) so that attn.c_proj does not also catch mlp.c_proj.
        "target_modules": r".*\.h\.\d+\.("
        + "|".join(sorted(n.replace(".", r"\.") for n in names))
        + ")",
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    set_default_mode(out / "adapter_model.safetensors")
    return out
