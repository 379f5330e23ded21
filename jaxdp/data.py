"""Text sources -> token streams or records -> training rows of fixed size, with their privacy unit.

Sources (`TextSource`): plain text files, JSONL or CSV files (a text column and optionally a
user column), a `datasets` dataset split (a Hub id or a local directory) or a TensorFlow Datasets
split. Three privacy units (`UNITS`):

- "block": the source's text is tokenized LINE BY LINE (each line of a file with its line
  break; each record's text followed by a line break), in batches, without special tokens; the
  token streams are concatenated in order and cut into non-overlapping blocks of `block_size`
  tokens (the remainder is dropped). One block is one unit: a person whose text spans several
  blocks is protected only by group privacy. (For GPT-2's tokenizer, line-by-line tokenization
  equals tokenizing a file whole except where a line starts with two or more spaces.)
- "record": one record is one unit: a line or a paragraph (blank-line separated) of a text
  file, a JSONL/CSV row, a dataset row. Its text is tokenized and ended with the tokenizer's
  end-of-text token; it becomes up to `max_blocks_per_unit` rows of `block_size` tokens (the
  first ones; the rest of a longer record is not used), the last one padded with a token mask.
  Records of fewer than two tokens (nothing to predict) are left out.
- "user": all records with the same user id form one unit: the rows of all a user's records,
  in the order they appear, of which the first `max_blocks_per_unit` are kept (the documented
  cap: a user's contribution never depends on other users).

A unit's rows are summed before clipping (`jaxdp.sampling.pack_units`, segment ids), so each
unit contributes at most C however many rows it has. `load_tokens`/`load_records` can cache the
tokenized text in a directory (the run keeps it in its private directory: it is the training
data): a uint16 file (uint32 for vocabularies over 65,536 tokens) that later runs, and every
host of a multi-host run, memory-map instead of tokenizing again.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdp.hf import HubUnavailableError

SOURCES = ("text_files", "jsonl", "csv", "hf", "tfds")
UNITS = ("block", "record", "user")
SEPARATORS = ("line", "paragraph")
_CACHE_VERSION = 3  # 3: users told apart by value and type
_BATCH = 4096  # lines or records tokenized at once


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """A fast (Rust, `tokenizers`-backed) `transformers` tokenizer from a directory or Hub id.

    A directory with `tokenizer.json`, or only OpenAI's `vocab.json` + `merges.txt`, is read as
    GPT-2's byte-level BPE tokenizer with `<|endoftext|>` as EOS.
    """
    # transformers (the `hf` extra) is imported by the functions that need it only.
    import transformers  # noqa: PLC0415 (the hf extra)

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


# ---- Sources ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Where one split's text comes from (`kind` in SOURCES).

    files: text_files / jsonl / csv. dataset, config, split: hf (a Hub id or a local dataset
    directory; config None for datasets without configurations) and tfds. text_field,
    user_field: the columns of jsonl, csv, hf and tfds records. record_separator: how a text
    file is cut into records, "line" or "paragraph" (blank-line separated)."""

    kind: str
    files: tuple[str, ...] = ()
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    text_field: str = "text"
    user_field: str | None = None
    record_separator: str = "line"

    def __post_init__(self):
        if self.kind not in SOURCES:
            raise ValueError(f"Unknown data source {self.kind!r}; use one of {SOURCES}.")
        if self.kind in ("text_files", "jsonl", "csv") and not self.files:
            raise ValueError(f"A {self.kind} source needs at least one file.")
        if self.kind in ("hf", "tfds") and not (self.dataset and self.split):
            raise ValueError(f"A {self.kind} source needs a dataset name and a split.")
        if self.record_separator not in SEPARATORS:
            raise ValueError(
                f"Unknown record separator {self.record_separator!r}; use one of {SEPARATORS}."
            )
        if self.kind == "text_files" and self.user_field is not None:
            raise ValueError("Plain text files have no user column; use JSONL or CSV for users.")

    def check(self) -> None:
        """Cheap checks before any slow work: the files exist."""
        for f in self.files:
            path = Path(f).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"Text file not found: {path}")

    def records(self) -> Iterator[list[tuple[str, Any]]]:
        """Batches of (text, user or None) records (see the module docstring)."""
        if self.kind == "text_files":
            for lines in _file_records(self.files, self.record_separator):
                yield [(text, None) for text in lines]
        elif self.kind == "jsonl":
            yield from _jsonl_records(self)
        elif self.kind == "csv":
            yield from _csv_records(self)
        elif self.kind == "hf":
            yield from _hf_records(self)
        else:
            yield from _tfds_records(self)

    def lines(self) -> Iterator[list[str]]:
        """The source's text as lines, in batches (block units: a continuous stream)."""
        if self.kind == "text_files":
            yield from _file_lines(self.files)
            return
        for batch in self.records():
            yield [t if t.endswith("\n") else t + "\n" for t, _ in batch]

    def identity(self) -> dict[str, Any]:
        """What the source is, for the token cache: files by path, size and modification time;
        datasets by name, configuration, split and fields."""
        d = dataclasses.asdict(self)
        if self.files:
            stats = [Path(f).expanduser().resolve().stat() for f in self.files]
            d["files"] = [
                [str(Path(f).expanduser().resolve()), s.st_size, s.st_mtime_ns]
                for f, s in zip(self.files, stats, strict=True)
            ]
        return d


def _open_text(f: str):
    path = Path(f).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Text file not found: {path}")
    return path, path.open(encoding="utf-8")  # universal newlines: \r\n reads as \n


def _batched(items: Iterator[Any], size: int = _BATCH) -> Iterator[list[Any]]:
    while batch := list(itertools.islice(items, size)):
        yield batch


def _decode_errors(path: Path, lines: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from lines
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}).") from e


def _file_lines(files: Sequence[str]) -> Iterator[list[str]]:
    for f in files:
        path, fh = _open_text(f)
        with fh:
            yield from _batched(_decode_errors(path, iter(fh)))


def _file_records(files: Sequence[str], separator: str) -> Iterator[list[str]]:
    def records():
        for f in files:
            path, fh = _open_text(f)
            with fh:
                lines = _decode_errors(path, iter(fh))
                if separator == "line":
                    yield from (line.rstrip("\n") for line in lines if line.strip())
                    continue
                paragraph: list[str] = []
                for line in lines:
                    if line.strip():
                        paragraph.append(line)
                    elif paragraph:
                        yield "".join(paragraph).rstrip("\n")
                        paragraph = []
                if paragraph:
                    yield "".join(paragraph).rstrip("\n")

    yield from _batched(records())


def _field(record: dict, name: str, where: str) -> Any:
    if name not in record:
        raise ValueError(f"{where} has no field {name!r}; its fields are {sorted(record)}.")
    return record[name]


def _from_rows(rows: Iterator[dict], source: TextSource, where) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(rows):
        text = _field(row, source.text_field, where(i))
        user = None if source.user_field is None else _field(row, source.user_field, where(i))
        if not isinstance(text, str):
            raise ValueError(f"{where(i)}: field {source.text_field!r} is not text: {text!r}.")
        if source.user_field is not None and user is None:
            raise ValueError(
                f"{where(i)}: field {source.user_field!r} is null: every record needs its user's "
                f"id (records without one cannot be given to a user)."
            )
        yield text, user


def _jsonl_records(source: TextSource) -> Iterator[list[tuple[str, Any]]]:
    def rows(path, fh):
        for n, line in enumerate(_decode_errors(path, iter(fh)), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not JSON ({e}).") from e

    def records():
        for f in source.files:
            path, fh = _open_text(f)
            with fh:
                yield from _from_rows(rows(path, fh), source, lambda i, p=path: f"{p} record {i}")

    yield from _batched(records())


def _csv_records(source: TextSource) -> Iterator[list[tuple[str, Any]]]:
    def records():
        for f in source.files:
            path = Path(f).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"Text file not found: {path}")
            with path.open(encoding="utf-8", newline="") as fh:
                rows = _decode_errors(path, csv.DictReader(fh))
                yield from _from_rows(rows, source, lambda i, p=path: f"{p} row {i + 2}")

    yield from _batched(records())


def _hf_records(source: TextSource) -> Iterator[list[tuple[str, Any]]]:
    # datasets (the `hf` extra) is imported by the source that needs it only.
    import datasets  # noqa: PLC0415 (the hf extra)

    try:
        ds = datasets.load_dataset(source.dataset, source.config, split=source.split)
    except Exception as e:  # offline, unknown dataset, missing split or config, ...
        raise HubUnavailableError(
            f"Could not load dataset {source.dataset!r} (config {source.config!r}) split "
            f"{source.split!r} ({type(e).__name__}: {e}). Offline, use local text instead "
            f"(--config.data.source=text_files --config.data.train_files=path/to/train.txt, e.g. "
            f"../shared/data/wikitext-2/valid.txt) and set HF_HUB_OFFLINE=1."
        ) from e
    for name in (source.text_field, source.user_field):
        if name is not None and name not in ds.column_names:
            raise ValueError(
                f"Dataset {source.dataset!r} has no column {name!r} (data.text_field / "
                f"data.user_field); its columns are {ds.column_names}."
            )
    # Batches straight from the Arrow table: no second copy of the data on disk.
    for batch in ds.iter(batch_size=_BATCH):
        texts = [str(t) for t in batch[source.text_field]]
        users = batch[source.user_field] if source.user_field else [None] * len(texts)
        yield list(zip(texts, users, strict=True))


def _tfds_records(source: TextSource) -> Iterator[list[tuple[str, Any]]]:
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 (the tfds extra)
    except ImportError as e:
        raise ImportError(
            "data.source='tfds' needs TensorFlow Datasets: pip install 'jaxdp[tfds]'."
        ) from e

    def decoded(value):
        return value.decode("utf-8") if isinstance(value, bytes) else value

    def records():
        for ex in tfds.as_numpy(tfds.load(source.dataset, split=source.split)):
            user = None if source.user_field is None else decoded(ex[source.user_field])
            yield str(decoded(ex[source.text_field])), user

    yield from _batched(records())


# ---- Tokenizing, with a cache ----------------------------------------------------------------


def token_stream(source: TextSource, tokenizer: Any) -> Iterator[np.ndarray]:
    """The source's token ids as one stream, one array per batch of lines."""
    for lines in source.lines():
        ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
        yield np.fromiter(itertools.chain.from_iterable(ids), np.int64)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _cache_key(kind: str, source: TextSource, tokenizer: Any) -> str:
    payload = {
        "version": _CACHE_VERSION,
        "kind": kind,
        "source": source.identity(),
        "tokenizer": _tokenizer_identity(tokenizer),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _tokenizer_identity(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_atomic(path: Path, write) -> None:
    """Writes through a temporary file: a killed tokenization leaves no half file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        write(f)
    os.replace(tmp, path)


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def load_tokens(
    source: TextSource, tokenizer: Any, *, cache_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """All token ids of `source` as one stream (uint16/uint32). With `cache_dir`, tokenized
    once into a file there and memory-mapped (read-only) by every later call."""
    dtype = token_dtype(len(tokenizer))
    if cache_dir is None:
        chunks = list(token_stream(source, tokenizer))
        return np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)
    path = Path(cache_dir) / f"tokens-{_cache_key('stream', source, tokenizer)}.bin"
    if not path.exists():
        _write_atomic(
            path,
            lambda f: [ids.astype(dtype).tofile(f) for ids in token_stream(source, tokenizer)],
        )
    return _memmap(path, dtype)


@dataclasses.dataclass(frozen=True)
class Records:
    """Tokenized records: record r is tokens[offsets[r]:offsets[r + 1]] (ending in the
    end-of-text token), of user users[r] (an index; None without a user column)."""

    tokens: np.ndarray  # [num_tokens] uint16/uint32
    offsets: np.ndarray  # [R + 1] int64
    users: np.ndarray | None  # [R] int64

    @property
    def num_records(self) -> int:
        return len(self.offsets) - 1


def _tokenize_records(source: TextSource, tokenizer: Any):
    """(token arrays per batch, record lengths, user ids as given) of `source`."""
    eos = tokenizer.eos_token_id
    for batch in source.records():
        ids = tokenizer([t for t, _ in batch], add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids = [x + [eos] for x in ids]
        yield ids, [u for _, u in batch]


def user_key(user: Any) -> str:
    """The identity of a user id: its exact JSON value AND type, so that ids which merely
    compare equal in Python (JSON `1`, `1.0` and `true`; the string "1") are different users."""
    if isinstance(user, np.generic):  # dataset columns: NumPy scalars, as their Python value
        user = user.item()
    if isinstance(user, bytes):
        return "bytes:" + user.hex()
    if isinstance(user, float) and not math.isfinite(user):
        raise ValueError(
            f"A user id is {user}: every NaN (a missing value in a float column) would be one "
            f"user. Give every record a real id."
        )
    try:
        return json.dumps(user, sort_keys=True)
    except (TypeError, ValueError):
        return f"{type(user).__module__}.{type(user).__qualname__}:{user!r}"


def _check_unambiguous(user: Any, key: str, seen: dict[Any, str]) -> None:
    """Refuses a user column holding two different ids that compare equal in Python (JSON 1,
    1.0 and true; a NumPy 1 and 1.0): keyed apart they would split one person into two units,
    merged they could join two people; either breaks the per-user guarantee, so the ids must be
    made consistent first."""
    value = user.item() if isinstance(user, np.generic) else user
    try:
        first = seen.setdefault(value, key)
    except TypeError:  # unhashable (a list or an object): compared by its JSON text alone
        return
    if first != key:
        raise ValueError(
            f"The user column holds ids {first} and {key}, which compare equal but are not the "
            f"same id: one person split in two, or two merged? Make the ids consistent (all "
            f"strings, say) and run again."
        )


def load_records(
    source: TextSource, tokenizer: Any, *, cache_dir: str | os.PathLike | None = None
) -> Records:
    """The source's records, tokenized (optionally cached like `load_tokens`). User ids are
    numbered in order of first appearance, told apart by `user_key` (value and type)."""
    dtype = token_dtype(len(tokenizer))
    user_index: dict[str, int] = {}
    equal_ids: dict[Any, str] = {}  # Python value -> the first id's key (see _check_unambiguous)
    cache = None
    if cache_dir is not None:
        key = _cache_key("records", source, tokenizer)
        cache = [Path(cache_dir) / f"{name}-{key}.{ext}" for name, ext in
                 (("records", "bin"), ("offsets", "npy"), ("users", "npy"))]  # fmt: skip
        if all(p.exists() for p in cache):
            users = np.load(cache[2])
            return Records(
                _memmap(cache[0], dtype), np.load(cache[1]), users if users.size else None
            )
    lengths: list[int] = []
    users: list[int] = []
    chunks: list[np.ndarray] = []
    for ids, batch_users in _tokenize_records(source, tokenizer):
        chunks.append(np.fromiter(itertools.chain.from_iterable(ids), dtype))
        lengths += [len(x) for x in ids]
        if source.user_field is not None:
            for u in batch_users:
                key = user_key(u)
                _check_unambiguous(u, key, equal_ids)
                users.append(user_index.setdefault(key, len(user_index)))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    user_array = np.asarray(users, np.int64) if source.user_field is not None else None
    if cache is not None:
        _write_atomic(cache[1], lambda f: np.save(f, offsets))
        _write_atomic(cache[2], lambda f: np.save(f, user_array if users else np.zeros(0)))
        _write_atomic(cache[0], lambda f: tokens.tofile(f))  # last: its presence means complete
        return Records(_memmap(cache[0], dtype), offsets, user_array)
    return Records(tokens, offsets, user_array)


# ---- Rows of one privacy unit each, or several --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UnitRows:
    """Training rows and the privacy unit of each (see the module docstring).

    Rows of one unit are contiguous: unit u owns rows starts[u] .. starts[u] + counts[u] - 1."""

    tokens: np.ndarray  # [M, T]
    lengths: np.ndarray  # [M] real tokens in each row (T for full rows)
    starts: np.ndarray  # [N] first row of each unit
    counts: np.ndarray  # [N] rows of each unit
    kind: str  # one of UNITS
    # The configured cap on a unit's rows (max_blocks_per_unit; 1 for blocks). Everything that
    # shapes the computation or is published reads this setting, never the data's own maximum.
    cap: int = 1

    @property
    def num_units(self) -> int:
        return len(self.starts)

    @property
    def block_size(self) -> int:
        return self.tokens.shape[1]

    @property
    def max_rows_per_unit(self) -> int:
        return int(self.counts.max()) if len(self.counts) else 0

    @property
    def padded(self) -> bool:
        """Whether rows may be shorter than the block (records and users: a setting, not a
        property of the data, so the compiled step is the same on neighbouring datasets)."""
        return self.kind != "block"

    @property
    def several_rows(self) -> bool:
        """Whether a unit may have several rows (by the configured cap)."""
        return self.kind != "block" and self.cap > 1

    @property
    def unit_of_row(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_units), self.counts)

    def rows_of(self, units: np.ndarray) -> np.ndarray:
        """The rows of `units`, unit by unit."""
        units = np.asarray(units, np.int64)
        if not len(units):
            return np.zeros(0, np.int64)
        counts = self.counts[units]
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(self.starts[units], counts) + within

    def token_mask(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), T] bool: True at the real tokens of each row."""
        return np.arange(self.block_size)[None, :] < self.lengths[rows][:, None]

    def first_rows(self, k: int | None) -> UnitRows:
        """The units of the first `k` rows (evaluation subsets); all with k None."""
        if k is None or k >= len(self.lengths):
            return self
        units = int(np.searchsorted(self.starts, k, side="left"))
        end = int(self.starts[units]) if units < self.num_units else len(self.lengths)
        return UnitRows(
            tokens=self.tokens[:end],
            lengths=self.lengths[:end],
            starts=self.starts[:units],
            counts=self.counts[:units],
            kind=self.kind,
            cap=self.cap,
        )

    def describe(self) -> str:
        """The privacy unit in words, from the settings alone (`describe_unit`)."""
        return describe_unit(self.kind, self.block_size, self.cap)

    def append_blocks(self, blocks: np.ndarray) -> UnitRows:
        """These rows plus full `blocks`, each a unit of its own (audit canaries)."""
        blocks = np.asarray(blocks, self.tokens.dtype)
        n, M = len(blocks), len(self.tokens)
        return UnitRows(
            tokens=np.concatenate([np.asarray(self.tokens), blocks]),
            lengths=np.concatenate([self.lengths, np.full(n, self.block_size, np.int64)]),
            starts=np.concatenate([self.starts, M + np.arange(n)]),
            counts=np.concatenate([self.counts, np.ones(n, np.int64)]),
            kind=self.kind,
            cap=self.cap,
        )

    def sha256(self) -> str:
        """A hash of the rows' values and their units (kept private: it identifies the data)."""
        h = hashlib.sha256(blocks_sha256(self.tokens).encode())
        for array in (self.lengths, self.starts, self.counts):
            h.update(np.ascontiguousarray(array, np.int64).tobytes())
        return h.hexdigest()


def describe_unit(kind: str, block_size: int, max_blocks_per_unit: int = 1) -> str:
    """The privacy unit in words: a function of the SETTINGS only (the unit kind, the block size
    and the configured cap), never of the data (the longest unit present, say, would tell a
    dataset from its neighbour with one long record more)."""
    if kind not in UNITS:
        raise ValueError(f"Unknown privacy unit {kind!r}; use one of {UNITS}.")
    T, cap = block_size, max_blocks_per_unit
    if kind == "block":
        return f"example (one block of {T} tokens)"
    rows = f"up to {cap} blocks of {T} tokens" if cap > 1 else f"its first {T} tokens"
    what = "record" if kind == "record" else "user (all records with the same user id)"
    return f"{what}, {rows}"


def block_rows(tokens: np.ndarray, block_size: int) -> UnitRows:
    """One unit per block of a token stream."""
    blocks = to_blocks(tokens, block_size)
    n = len(blocks)
    return UnitRows(
        tokens=blocks,
        lengths=np.full(n, block_size, np.int64),
        starts=np.arange(n, dtype=np.int64),
        counts=np.ones(n, np.int64),
        kind="block",
    )


def record_rows(
    records: Records, block_size: int, *, unit: str = "record", max_blocks_per_unit: int = 1
) -> UnitRows:
    """Rows of `block_size` tokens for record or user units (see the module docstring)."""
    check_block_size(block_size)
    if unit not in ("record", "user"):
        raise ValueError(f"record_rows makes record or user units, not {unit!r}.")
    if unit == "user" and records.users is None:
        raise ValueError("User units need a user column (data.user_field).")
    if not (isinstance(max_blocks_per_unit, int) and max_blocks_per_unit >= 1):
        raise ValueError(f"max_blocks_per_unit must be >= 1, got {max_blocks_per_unit!r}.")
    T, K = block_size, max_blocks_per_unit
    lengths_of = np.diff(records.offsets)
    keep = lengths_of >= 2  # a record of one token predicts nothing
    owners = np.arange(records.num_records) if unit == "record" else records.users
    units: dict[int, list[tuple[int, int]]] = {}  # unit -> [(start, length)] of its rows
    for r in np.flatnonzero(keep):
        rows = units.setdefault(int(owners[r]), [])
        start, length = int(records.offsets[r]), int(lengths_of[r])
        for off in range(0, length, T):
            if len(rows) == K or (off and length - off < 2):
                break  # the cap, or a last piece with nothing to predict
            rows.append((start + off, min(T, length - off)))
    order = list(units)  # records (or users, by first appearance) in data order
    counts = np.asarray([len(units[u]) for u in order], np.int64)
    spans = [span for u in order for span in units[u]]
    tokens = np.zeros((len(spans), T), records.tokens.dtype)
    lengths = np.zeros(len(spans), np.int64)
    for i, (start, length) in enumerate(spans):
        tokens[i, :length] = records.tokens[start : start + length]
        lengths[i] = length
    starts = (
        np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts
    )
    return UnitRows(tokens=tokens, lengths=lengths, starts=starts, counts=counts, kind=unit, cap=K)


def load_rows(
    source: TextSource,
    tokenizer: Any,
    block_size: int,
    *,
    unit: str = "block",
    max_blocks_per_unit: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> UnitRows:
    """The source's training rows for privacy `unit` (see the module docstring)."""
    if unit not in UNITS:
        raise ValueError(f"Unknown privacy unit {unit!r}; use one of {UNITS}.")
    if unit == "block":
        return block_rows(load_tokens(source, tokenizer, cache_dir=cache_dir), block_size)
    records = load_records(source, tokenizer, cache_dir=cache_dir)
    return record_rows(records, block_size, unit=unit, max_blocks_per_unit=max_blocks_per_unit)


def blocks_sha256(blocks: np.ndarray) -> str:
    """A hash of token blocks' values (independent of their integer dtype), chunk by chunk."""
    h = hashlib.sha256()
    h.update(repr(tuple(blocks.shape)).encode())
    step = max(1, (1 << 24) // max(1, blocks.shape[-1] if blocks.ndim else 1))
    for i in range(0, len(blocks), step):
        h.update(np.ascontiguousarray(blocks[i : i + step], dtype=np.int64).tobytes())
    return h.hexdigest()
