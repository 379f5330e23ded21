"""Export any model source (HF dir or id, jaxdp run directory) to a HF PyTorch directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jaxdp import checkpoint, hf
from jaxdp.data import load_tokenizer
from jaxdp.workdir import Workdir


def _tokenizer_for(src: Path | None, tokenizer: str | os.PathLike | None) -> Any | None:
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if src is not None and (
        (src / "tokenizer_config.json").is_file() or (src / "vocab.json").is_file()
    ):
        return load_tokenizer(src)
    return None


def export_to_hf(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Writes `out_dir` (config.json, tied model.safetensors, tokenizer files when known)."""
    path = Path(src).expanduser()
    if path.is_dir() and Workdir(path).checkpoints.is_dir():
        model, run_tokenizer = checkpoint.load_model_from_workdir(path)
        tok = _tokenizer_for(None, tokenizer or run_tokenizer)
        return hf.save_pretrained(model, out_dir, tokenizer=tok)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is neither a jaxdp run directory (no private/checkpoints) nor a Hugging Face "
            f"model directory (no config.json)."
        )
    model_dir = hf.resolve_model_dir(src)
    model = hf.from_pretrained(model_dir)
    return hf.save_pretrained(model, out_dir, tokenizer=_tokenizer_for(model_dir, tokenizer))
