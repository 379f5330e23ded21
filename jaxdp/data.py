"""Text sources -> fixed-size token blocks (the privacy unit: one block = one example).

Each source is tokenized as one string per file (or per split), without special tokens,
concatenated in order and cut into non-overlapping blocks of `block_size` tokens; the remainder
that does not fill a block is dropped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdp.hf import HubUnavailableError


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """A `transformers` tokenizer from a local directory or a Hub id.

    A directory with only `vocab.json` + `merges.txt` (+ `tokenizer.json`), such as OpenAI's GPT-2
    release, is read as a GPT-2 byte-level BPE tokenizer with `<|endoftext|>` as EOS.
    """
    import transformers

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "tokenizer_config.json").is_file():
            return transformers.AutoTokenizer.from_pretrained(path)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return transformers.GPT2Tokenizer.from_pretrained(path)
        raise FileNotFoundError(
            f"{path} has neither tokenizer_config.json nor vocab.json + merges.txt."
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as e:
        raise HubUnavailableError(
            f"Could not load tokenizer {str(name_or_path)!r} ({e}). Offline, point "
            f"`data.tokenizer` at a local directory with vocab.json and merges.txt (e.g. "
            f"../shared/data/gpt2-tokenizer)."
        ) from e


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of `text` as one string, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def to_blocks(token_ids: np.ndarray, block_size: int) -> np.ndarray:
    """Non-overlapping blocks [num_blocks, block_size]; the incomplete tail is dropped."""
    if block_size < 2:
        raise ValueError(
            f"block_size must be >= 2 (one prediction needs two tokens), got {block_size}."
        )
    n = len(token_ids) // block_size
    return np.asarray(token_ids[: n * block_size], dtype=np.int32).reshape(n, block_size)


def text_file_blocks(
    files: Sequence[str | os.PathLike], tokenizer: Any, block_size: int
) -> np.ndarray:
    """Reads each file whole, tokenizes it, concatenates in order and cuts into blocks."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise ValueError("No text files given.")
    pieces = []
    for f in files:
        path = Path(f).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Text file not found: {path}")
        pieces.append(tokenize(tokenizer, path.read_text(encoding="utf-8")))
    return to_blocks(np.concatenate(pieces), block_size)


def hf_dataset_blocks(
    name: str, config: str | None, split: str, text_field: str, tokenizer: Any, block_size: int
) -> np.ndarray:
    """A `datasets` split's text rows joined into one string, tokenized and cut into blocks."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown dataset, missing split, ...
        raise HubUnavailableError(
            f"Could not load dataset {name!r} ({config}) split {split!r} "
            f"({type(e).__name__}: {e}). Offline, use local text instead: "
            f"--config.data.source=text_files --config.data.train_files=path/to/train.txt "
            f"(e.g. ../shared/data/wikitext-2/valid.txt)."
        ) from e
    if text_field not in ds.column_names:
        raise ValueError(f"Dataset {name!r} has no column {text_field!r}: {ds.column_names}.")
    return to_blocks(tokenize(tokenizer, join_rows(ds[text_field])), block_size)


def join_rows(rows: Sequence[str]) -> str:
    """A split's text rows as one string: as they are if they keep their line breaks (WikiText
    on the Hub does), else one row per line."""
    rows = list(rows)
    if any(r.endswith("\n") for r in rows):
        return "".join(rows)
    return "".join(r + "\n" for r in rows)


def tfds_blocks(
    name: str, split: str, text_field: str, tokenizer: Any, block_size: int
) -> np.ndarray:
    """A TensorFlow Datasets split, treated like `hf_dataset_blocks` (needs the `tfds` extra)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "data.source='tfds' needs TensorFlow Datasets: pip install 'jaxdp[tfds]'."
        ) from e
    rows = [
        ex[text_field].decode("utf-8") if isinstance(ex[text_field], bytes) else str(ex[text_field])
        for ex in tfds.as_numpy(tfds.load(name, split=split))
    ]
    return to_blocks(tokenize(tokenizer, join_rows(rows)), block_size)
