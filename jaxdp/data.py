"""Text sources -> token streams -> fixed-size token blocks (one block = one example = the unit).

A `TextSource` is a list of text files, a `datasets` dataset split (a Hub id or a local
directory) or a TensorFlow Datasets split. Its text is tokenized LINE BY LINE (each line of a
file with its line break; each dataset row, ending in a line break), in batches, without special
tokens; the token streams are concatenated in order and cut into non-overlapping blocks of
`block_size` tokens; the remainder that does not fill a block is dropped. (For GPT-2's
tokenizer this equals tokenizing a file whole except where a line starts with two or more
whitespace characters.)

`load_blocks(..., cache_dir=...)` tokenizes a source once into a uint16 file (uint32 for
vocabularies of more than 65,536 tokens) that later runs, and every host of a multi-host run,
memory-map: a large corpus is neither tokenized again nor held as int32 arrays in memory. The
run keeps this cache in its private directory: it is the training data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdp.hf import HubUnavailableError

SOURCES = ("text_files", "hf", "tfds")
_CACHE_VERSION = 1
_LINES_PER_BATCH = 4096


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """A fast (Rust, `tokenizers`-backed) `transformers` tokenizer from a directory or Hub id.

    A directory with `tokenizer.json`, or only OpenAI's `vocab.json` + `merges.txt`, is read as
    GPT-2's byte-level BPE tokenizer with `<|endoftext|>` as EOS.
    """
    # transformers (the `hf` extra) is imported by the functions that need it only.
    import transformers

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "tokenizer_config.json").is_file():
            return transformers.AutoTokenizer.from_pretrained(path)
        has_bpe = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
        if (path / "tokenizer.json").is_file() or has_bpe:
            return transformers.GPT2TokenizerFast.from_pretrained(path)
        raise FileNotFoundError(
            f"{path} has no tokenizer: neither tokenizer_config.json, tokenizer.json nor "
            f"vocab.json + merges.txt."
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as e:
        raise HubUnavailableError(
            f"Could not load tokenizer {str(name_or_path)!r} ({e}). Offline, point "
            f"`data.tokenizer` at a local directory with tokenizer.json or vocab.json and "
            f"merges.txt (e.g. ../shared/data/gpt2-tokenizer), and set HF_HUB_OFFLINE=1 to skip "
            f"the Hub's retries."
        ) from e


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of `text` as one string, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def to_blocks(token_ids: np.ndarray, block_size: int) -> np.ndarray:
    """Non-overlapping blocks [num_blocks, block_size] (a view: a memory map stays one); the
    incomplete tail is dropped."""
    check_block_size(block_size)
    n = len(token_ids) // block_size
    return np.asarray(token_ids[: n * block_size]).reshape(n, block_size)


def check_block_size(block_size: int) -> None:
    if not (isinstance(block_size, int) and block_size >= 2):
        raise ValueError(
            f"block_size must be an integer >= 2 (one prediction needs two tokens), got "
            f"{block_size!r}."
        )


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Where one split's text comes from (`kind` in SOURCES)."""

    kind: str
    files: tuple[str, ...] = ()
    dataset: str | None = None  # hf: a Hub id or local dataset directory; tfds: a name
    config: str | None = None  # hf: the dataset's configuration name, if it has several
    split: str | None = None
    text_field: str = "text"

    def __post_init__(self):
        if self.kind not in SOURCES:
            raise ValueError(f"Unknown data source {self.kind!r}; use one of {SOURCES}.")
        if self.kind == "text_files" and not self.files:
            raise ValueError("A text_files source needs at least one file.")
        if self.kind != "text_files" and not (self.dataset and self.split):
            raise ValueError(f"A {self.kind} source needs a dataset name and a split.")

    def check(self) -> None:
        """Cheap checks before any slow work: the files exist and are readable text."""
        for f in self.files:
            path = Path(f).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"Text file not found: {path}")

    def lines(self) -> Iterator[list[str]]:
        """The source's text in batches of lines (each ending in a line break)."""
        if self.kind == "text_files":
            yield from _file_lines(self.files)
        elif self.kind == "hf":
            yield from _rows_as_lines(_hf_batches(self))
        else:
            yield from _rows_as_lines(_tfds_batches(self))

    def identity(self) -> dict[str, Any]:
        """What the source is, for the token cache: files by path, size and modification time;
        datasets by name, configuration, split and field."""
        d = dataclasses.asdict(self)
        if self.kind == "text_files":
            stats = [Path(f).expanduser().resolve().stat() for f in self.files]
            d["files"] = [
                [str(Path(f).expanduser().resolve()), s.st_size, s.st_mtime_ns]
                for f, s in zip(self.files, stats, strict=True)
            ]
        return d


def _file_lines(files: Sequence[str]) -> Iterator[list[str]]:
    for f in files:
        path = Path(f).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Text file not found: {path}")
        try:
            with path.open(encoding="utf-8") as fh:  # universal newlines: \r\n reads as \n
                batch = []
                for line in fh:
                    batch.append(line)
                    if len(batch) == _LINES_PER_BATCH:
                        yield batch
                        batch = []
                if batch:
                    yield batch
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e}).") from e


def _rows_as_lines(batches: Iterator[list[str]]) -> Iterator[list[str]]:
    """Rows as lines: as they are if they end in a line break (WikiText on the Hub does),
    else with one appended."""
    for rows in batches:
        yield [r if r.endswith("\n") else r + "\n" for r in rows]


def _hf_batches(source: TextSource) -> Iterator[list[str]]:
    # datasets (the `hf` extra) is imported by the source that needs it only.
    import datasets

    try:
        ds = datasets.load_dataset(source.dataset, source.config, split=source.split)
    except Exception as e:  # offline, unknown dataset, missing split or config, ...
        raise HubUnavailableError(
            f"Could not load dataset {source.dataset!r} (config {source.config!r}) split "
            f"{source.split!r} ({type(e).__name__}: {e}). Offline, use local text instead "
            f"(--config.data.source=text_files --config.data.train_files=path/to/train.txt, e.g. "
            f"../shared/data/wikitext-2/valid.txt) and set HF_HUB_OFFLINE=1."
        ) from e
    if source.text_field not in ds.column_names:
        raise ValueError(
            f"Dataset {source.dataset!r} has no column {source.text_field!r} (data.hf_text_field);"
            f" its columns are {ds.column_names}."
        )
    # Batches straight from the Arrow table: no second copy of the data on disk.
    for batch in ds.iter(batch_size=_LINES_PER_BATCH):
        yield [str(r) for r in batch[source.text_field]]


def _tfds_batches(source: TextSource) -> Iterator[list[str]]:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "data.source='tfds' needs TensorFlow Datasets: pip install 'jaxdp[tfds]'."
        ) from e
    batch = []
    for ex in tfds.as_numpy(tfds.load(source.dataset, split=source.split)):
        value = ex[source.text_field]
        batch.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        if len(batch) == _LINES_PER_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def token_stream(source: TextSource, tokenizer: Any) -> Iterator[np.ndarray]:
    """The source's token ids, one array per batch of lines (tokenized at once)."""
    for lines in source.lines():
        ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
        yield np.fromiter(itertools.chain.from_iterable(ids), np.int64)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def load_tokens(
    source: TextSource, tokenizer: Any, *, cache_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """All token ids of `source` (uint16/uint32). With `cache_dir`, tokenized once into a file
    there and memory-mapped (read-only) by every later call."""
    dtype = token_dtype(len(tokenizer))
    if cache_dir is None:
        chunks = list(token_stream(source, tokenizer))
        return np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)
    key = hashlib.sha256(
        json.dumps(
            {
                "version": _CACHE_VERSION,
                "source": source.identity(),
                "tokenizer": _tokenizer_identity(tokenizer),
                "dtype": dtype.str,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:32]
    path = Path(cache_dir) / f"tokens-{key}.bin"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            for ids in token_stream(source, tokenizer):
                ids.astype(dtype).tofile(f)
        os.replace(tmp, path)  # atomic: a killed tokenization leaves no half cache behind
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def load_blocks(
    source: TextSource,
    tokenizer: Any,
    block_size: int,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """The source's blocks [N, block_size] (see the module docstring)."""
    check_block_size(block_size)
    return to_blocks(load_tokens(source, tokenizer, cache_dir=cache_dir), block_size)


def blocks_sha256(blocks: np.ndarray) -> str:
    """A hash of token blocks' values (independent of their integer dtype), chunk by chunk."""
    h = hashlib.sha256()
    h.update(repr(tuple(blocks.shape)).encode())
    step = max(1, (1 << 24) // max(1, blocks.shape[-1] if blocks.ndim else 1))
    for i in range(0, len(blocks), step):
        h.update(np.ascontiguousarray(blocks[i : i + step], dtype=np.int64).tobytes())
    return h.hexdigest()
