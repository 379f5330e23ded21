"""Batch selection for DP-SGD: Poisson sampling into fixed-shape padded batches (host side).

The privacy guarantee in ``jaxdp.accounting`` assumes Poisson sampling: at every step each of the
``num_examples`` examples is included independently with probability ``sampling_prob``, so the
batch size is ``Binomial(num_examples, sampling_prob)`` and varies from step to step.
``PoissonSampler`` draws exactly that. Because XLA wants static shapes, ``pad_batches`` splits a
drawn batch into chunks of a fixed ``physical_batch_size`` and pads the last one, returning an
``is_padding`` mask; padded rows must contribute zero to the clipped-gradient sum. No drawn
example is ever dropped (dropping would change the sampling distribution and void the
guarantee); a large draw just takes more chunks.

Draws are stateless: the batch of step ``t`` depends only on ``(seed, t)``, so a run resumed from a
checkpoint at step ``t`` draws exactly the batches the uninterrupted run would have drawn. The
seed must be SECRET (``jaxdp.randomness.Secrets.sampling``): amplification by subsampling assumes
that nobody knows which examples a step used.

``ShuffleSampler`` is the ordinary shuffled fixed-size-batch alternative. It is NOT Poisson
sampling; any epsilon reported for it is approximate (see ``accounting.describe_guarantee``).

Micro-batch (group) clipping sums the drawn members of a cell before clipping. ``content_cells``
assigns each example to a cell by a hash of its CONTENT, so adding or removing one example moves
no other example to another cell; ``pack_units`` lays out the drawn examples so that the members
of a cell share one microbatch, with ``segment_ids`` saying which rows form one clipping unit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxdp.randomness import Stream, seed_sequence


def _rng(seed: int, counter: int) -> np.random.Generator:
    """A generator keyed by (seed, counter) only: no state carried between draws."""
    return np.random.default_rng(seed_sequence(seed, Stream.SAMPLING, counter))


def _check_non_negative(name: str, value: int) -> None:
    if not (isinstance(value, (int, np.integer)) and value >= 0):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class PoissonSampler:
    """Poisson sampling: each example is in the step-``t`` batch independently w.p. ``q``.

    This is the sampling scheme the ``jaxdp.accounting`` guarantee (Poisson-subsampled Gaussian,
    add-or-remove-one neighbours) is stated for.

    Attributes:
      num_examples: dataset size ``N >= 1``; examples are indexed ``0 .. N - 1``.
      sampling_prob: inclusion probability ``q``, ``0 < q <= 1``.
      seed: non-negative integer; the step-``t`` draw depends only on ``(seed, t)``.
    """

    num_examples: int
    sampling_prob: float
    seed: int = dataclasses.field(repr=False)  # secret: never shown

    def __post_init__(self):
        if not (isinstance(self.num_examples, (int, np.integer)) and self.num_examples >= 1):
            raise ValueError(f"num_examples must be an integer >= 1, got {self.num_examples!r}.")
        if not 0 < self.sampling_prob <= 1:
            raise ValueError(f"sampling_prob must be in (0, 1], got {self.sampling_prob}.")
        _check_non_negative("seed", self.seed)

    @property
    def expected_batch_size(self) -> float:
        """Mean batch size ``sampling_prob * num_examples``."""
        return self.sampling_prob * self.num_examples

    def sample(self, step: int) -> np.ndarray:
        """Sorted int64 indices of the examples in the batch of ``step`` (may be empty)."""
        _check_non_negative("step", step)
        uniforms = _rng(self.seed, step).random(self.num_examples)  # [N]
        return np.flatnonzero(uniforms < self.sampling_prob).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class ShuffleSampler:
    """Shuffled fixed-size batches: NOT Poisson sampling, NOT covered by a formal DP guarantee.

    Each epoch is a fresh permutation of the dataset (keyed by ``(seed, epoch)``) cut into
    ``steps_per_epoch = ceil(num_examples / batch_size)`` consecutive batches; every example
    appears exactly once per epoch, and the last batch of an epoch holds the remainder
    (``num_examples % batch_size`` examples, when nonzero). An epsilon computed for training with
    this sampler via the Poisson accountant is an APPROXIMATION, not a guarantee; label it with
    ``accounting.describe_guarantee("shuffle")``.

    Attributes:
      num_examples: dataset size ``N >= 1``.
      batch_size: examples per batch, ``1 <= batch_size <= N``.
      seed: non-negative integer; the step-``t`` batch depends only on ``(seed, t)``.
    """

    num_examples: int
    batch_size: int
    seed: int = dataclasses.field(repr=False)  # secret: never shown

    def __post_init__(self):
        if not (isinstance(self.num_examples, (int, np.integer)) and self.num_examples >= 1):
            raise ValueError(f"num_examples must be an integer >= 1, got {self.num_examples!r}.")
        if not (
            isinstance(self.batch_size, (int, np.integer))
            and 1 <= self.batch_size <= self.num_examples
        ):
            raise ValueError(
                f"batch_size must be an integer in [1, num_examples={self.num_examples}], "
                f"got {self.batch_size!r}."
            )
        _check_non_negative("seed", self.seed)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def sample(self, step: int) -> np.ndarray:
        """Sorted int64 indices of the batch of ``step``."""
        _check_non_negative("step", step)
        epoch, position = divmod(step, self.steps_per_epoch)
        permutation = _rng(self.seed, epoch).permutation(self.num_examples)  # [N]
        start = position * self.batch_size
        return np.sort(permutation[start : start + self.batch_size]).astype(np.int64)


def pad_batches(
    indices: np.ndarray, physical_batch_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Splits drawn indices into fixed-shape chunks of ``physical_batch_size`` rows.

    Returns ``ceil(n / P)`` chunks (one fully padded chunk when ``n == 0``), each a pair
    ``(indices [P] int64, is_padding [P] bool)``. Padding rows hold index 0 (a valid example, so
    gathers stay in bounds) and are flagged ``True``; the caller must mask them out of the
    gradient sum. Every input index appears exactly once, in order, across the chunks.
    """
    if not (isinstance(physical_batch_size, (int, np.integer)) and physical_batch_size >= 1):
        raise ValueError(
            f"physical_batch_size must be an integer >= 1, got {physical_batch_size!r}."
        )
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {indices.shape}.")
    if indices.size and not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {indices.dtype}.")
    n = indices.shape[0]
    num_chunks = max(1, math.ceil(n / physical_batch_size))
    padded = np.zeros(num_chunks * physical_batch_size, np.int64)
    padded[:n] = indices
    is_padding = np.ones(num_chunks * physical_batch_size, bool)
    is_padding[:n] = False
    return [
        (padded[i : i + physical_batch_size], is_padding[i : i + physical_batch_size])
        for i in range(0, num_chunks * physical_batch_size, physical_batch_size)
    ]


def default_physical_batch_size(
    expected_batch_size: float,
    num_examples: int,
    microbatch_size: int = 1,
    rows_per_unit: np.ndarray | None = None,
) -> int:
    """A physical batch size (rows) that holds a Poisson draw in one chunk with high probability.

    ``ceil(mean + 4 * std)`` of the number of rows drawn: ``Binomial(num_examples, q)`` with
    ``q = expected_batch_size / num_examples`` when every unit is one row, else the sum over the
    units drawn of their ``rows_per_unit`` (mean ``q * sum(c)``, variance
    ``q (1 - q) * sum(c^2)``); rounded up to a multiple of ``microbatch_size`` and capped at all
    the rows (also rounded up). By a normal approximation a draw exceeds it with probability
    about 3e-5 per step; such a draw is split into more chunks, never truncated, so this choice
    affects speed only, not privacy.
    """
    if not (isinstance(num_examples, (int, np.integer)) and num_examples >= 1):
        raise ValueError(f"num_examples must be an integer >= 1, got {num_examples!r}.")
    if not 0 < expected_batch_size <= num_examples:
        raise ValueError(
            f"expected_batch_size must be in (0, num_examples={num_examples}], "
            f"got {expected_batch_size}."
        )
    if not (isinstance(microbatch_size, (int, np.integer)) and microbatch_size >= 1):
        raise ValueError(f"microbatch_size must be an integer >= 1, got {microbatch_size!r}.")
    q = expected_batch_size / num_examples
    c = np.ones(num_examples) if rows_per_unit is None else np.asarray(rows_per_unit, float)
    mean, var = q * c.sum(), q * (1 - q) * np.square(c).sum()
    size = min(math.ceil(mean + 4 * math.sqrt(var)), int(c.sum()))
    return max(1, math.ceil(size / microbatch_size)) * microbatch_size


def content_cells(blocks: np.ndarray, num_cells: int) -> np.ndarray:
    """Cell of each example [N] in ``[0, num_cells)``: a hash of the example's own tokens.

    The cell of an example depends on nothing but its content (and the number of cells, a public
    parameter computed from the public dataset size), so adding or removing one example leaves
    every other example in its cell: the property micro-batch clipping's 2C sensitivity needs.
    Identical examples share a cell. (A cell defined by POSITION, ``i // k``, would not do:
    removing one example would shift every later one into another cell.)
    """
    if not (isinstance(num_cells, (int, np.integer)) and num_cells >= 1):
        raise ValueError(f"num_cells must be an integer >= 1, got {num_cells!r}.")
    blocks = np.ascontiguousarray(np.asarray(blocks, np.int64))
    if blocks.ndim != 2:
        raise ValueError(f"blocks must be [N, T], got shape {blocks.shape}.")
    # A 64-bit polynomial hash of the tokens, then splitmix64's finaliser to mix the bits.
    with np.errstate(over="ignore"):
        h = np.full(len(blocks), 0x9E3779B97F4A7C15, np.uint64)
        for t in range(blocks.shape[1]):
            h = h * np.uint64(0x100000001B3) + blocks[:, t].astype(np.uint64)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h % np.uint64(num_cells)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """One physical batch of clipping units (see ``pack_units``); all arrays are [P]."""

    rows: np.ndarray  # int64 example index of each row (0 for padding rows)
    is_padding: np.ndarray  # bool
    segment_ids: np.ndarray  # int32: rows of one microbatch with equal ids form one unit


def pack_units(
    indices: np.ndarray, units: np.ndarray, physical_batch_size: int, microbatch_size: int
) -> tuple[list[PackedBatch], int]:
    """Lays drawn examples out so that the members of each clipping unit share a microbatch.

    ``indices`` [n] are the drawn examples and ``units`` [n] the unit (e.g. cell) of each.
    The units are packed into microbatches of ``microbatch_size`` rows (largest first, then
    first fit), ``physical_batch_size // microbatch_size`` microbatches per physical batch.
    Microbatch j of a physical batch holds the rows ``a * n + j`` (``n`` microbatches per
    physical batch), the strided order in which ``jaxdp.clipping.scan_microbatches`` reads them.
    ``segment_ids`` name the units: ``j * microbatch_size + p`` for a unit whose first row is at
    position p of microbatch j (padding rows get ids of their own), so that the ids say which
    microbatch they were packed for: read with another microbatch size, rows fall out of every
    unit (they are dropped, never merged with another unit).

    A unit with more drawn members than ``microbatch_size`` keeps its first ``microbatch_size``
    (by example index) and the rest are dropped: the change stays within that unit, so the
    sensitivity bound still holds. Returns (physical batches, number of dropped examples).
    """
    P, m = physical_batch_size, microbatch_size
    if not (isinstance(m, (int, np.integer)) and m >= 1 and P % m == 0 and P >= m):
        raise ValueError(
            f"physical_batch_size ({P}) must be a positive multiple of microbatch_size ({m})."
        )
    indices, units = np.asarray(indices, np.int64), np.asarray(units, np.int64)
    if indices.shape != units.shape or indices.ndim != 1:
        raise ValueError("indices and units must be 1-D arrays of the same length.")
    order = np.lexsort((indices, units))  # by unit, then by example index
    indices, units = indices[order], units[order]
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]]) if len(units) else []
    members = np.split(indices, starts[1:]) if len(units) else []
    dropped = sum(max(0, len(u) - m) for u in members)
    members = sorted((u[:m] for u in members), key=lambda u: (-len(u), int(u[0])))
    chunks: list[list[np.ndarray]] = []  # units per microbatch
    fill: list[int] = []
    first_open = 0  # every microbatch before this one is full
    for unit in members:
        j = first_open
        while j < len(chunks) and fill[j] + len(unit) > m:
            j += 1
        if j == len(chunks):
            chunks.append([])
            fill.append(0)
        chunks[j].append(unit)
        fill[j] += len(unit)
        while first_open < len(chunks) and fill[first_open] == m:
            first_open += 1
    n = P // m
    num_chunks = max(1, math.ceil(len(chunks) / n)) * n
    rows = np.zeros((num_chunks, m), np.int64)
    is_padding = np.ones((num_chunks, m), bool)
    # Ids j * m + position within the physical batch's microbatch j (padding: its own position).
    segment_ids = np.tile(np.arange(n * m, dtype=np.int32).reshape(n, m), (num_chunks // n, 1))
    for j, units_j in enumerate(chunks):
        pos = 0
        for u in units_j:
            rows[j, pos : pos + len(u)] = u
            is_padding[j, pos : pos + len(u)] = False
            segment_ids[j, pos : pos + len(u)] = (j % n) * m + pos  # the unit's first row
            pos += len(u)
    batches = []
    for b in range(0, num_chunks, n):
        # Physical row a * n + j holds position a of microbatch j.
        strided = lambda x, b=b: np.ascontiguousarray(x[b : b + n].T).reshape(-1)
        batches.append(PackedBatch(strided(rows), strided(is_padding), strided(segment_ids)))
    return batches, dropped
