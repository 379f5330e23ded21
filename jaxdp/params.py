"""Trainable and frozen parameters of an NNX model: naming, selecting, splitting and merging.

Parameter paths are dotted HF-style names such as `h.3.attn.c_attn.kernel`, `ln_f.scale`,
`wte.embedding` (and, with LoRA adapters, `h.3.attn.c_attn.lora_a`). A run trains the parameters
whose path fully matches one of its `trainable` regexes (all of them when there are none) and
keeps the rest frozen: only the trainable ones are clipped, noised, updated and accounted for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from flax import nnx

PyTree = Any  # the one alias of the package: a pytree of arrays


def path_name(path: Sequence[Any]) -> str:
    """('h', 0, 'attn', 'c_attn', 'kernel') -> 'h.0.attn.c_attn.kernel'."""
    return ".".join(str(p) for p in path)


def trainable_filter(patterns: Sequence[str]):
    """An NNX filter selecting the parameters whose dotted path fully matches any pattern
    (all parameters when `patterns` is empty)."""
    compiled = [re.compile(p) for p in patterns]

    def is_trainable(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        return not compiled or any(c.fullmatch(path_name(path)) for c in compiled)

    return is_trainable


def split(model: nnx.Module, trainable: Sequence[str] = ()) -> tuple[nnx.GraphDef, PyTree, PyTree]:
    """(graphdef, trainable parameters, everything else) of `model`."""
    graphdef, params, frozen = nnx.split(model, trainable_filter(trainable), ...)
    if not nnx.to_flat_state(params):
        raise ValueError(f"No parameter matches model.trainable={list(trainable)}.")
    return graphdef, params, frozen


def merge(graphdef: nnx.GraphDef, params: PyTree, frozen: PyTree = None) -> nnx.Module:
    """The model from its trainable and frozen parameters."""
    return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
