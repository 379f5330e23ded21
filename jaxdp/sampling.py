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
checkpoint at step ``t`` draws exactly the batches the uninterrupted run would have drawn.

``ShuffleSampler`` is the ordinary shuffled fixed-size-batch alternative. It is NOT Poisson
sampling; any epsilon reported for it is approximate (see ``accounting.describe_guarantee``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def _rng(seed: int, counter: int) -> np.random.Generator:
    """A generator keyed by (seed, counter) only: no state carried between draws."""
    return np.random.default_rng([seed, counter])


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
    seed: int

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
    seed: int

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
    indices: np.ndarray, physical_batch_size: int, is_padding: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Splits drawn indices into fixed-shape chunks of ``physical_batch_size`` rows.

    Returns ``ceil(n / P)`` chunks (one fully padded chunk when ``n == 0``), each a pair
    ``(indices [P] int64, is_padding [P] bool)``. Padding rows hold index 0 (a valid example, so
    gathers stay in bounds) and are flagged ``True``; the caller must mask them out of the
    gradient sum. Every input index appears exactly once, in order, across the chunks.
    ``is_padding`` marks rows of ``indices`` that are padding already (``group_layout``).
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
    padding = np.ones(num_chunks * physical_batch_size, bool)
    padding[:n] = False if is_padding is None else np.asarray(is_padding, bool)
    is_padding = padding
    return [
        (padded[i : i + physical_batch_size], is_padding[i : i + physical_batch_size])
        for i in range(0, num_chunks * physical_batch_size, physical_batch_size)
    ]


def default_physical_batch_size(
    expected_batch_size: float, num_examples: int, microbatch_size: int = 1
) -> int:
    """A physical batch size that holds a Poisson draw in one chunk with high probability.

    ``ceil(mean + 4 * std)`` of ``Binomial(num_examples, q)`` with ``q = expected_batch_size /
    num_examples``, rounded up to a multiple of ``microbatch_size`` and capped at ``num_examples``
    (also rounded up). By a normal approximation a draw exceeds it with probability about 3e-5
    per step; such a draw is split into more chunks by ``pad_batches``, never truncated, so this
    choice affects speed only, not privacy.
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
    std = math.sqrt(num_examples * q * (1 - q))
    size = min(math.ceil(expected_batch_size + 4 * std), num_examples)
    return max(1, math.ceil(size / microbatch_size)) * microbatch_size


def group_layout(indices: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lays drawn examples out in groups of ``group_size`` slots for micro-batch (group) clipping.

    Groups are fixed cells of the dataset: example ``i`` belongs to cell ``i // group_size``,
    whatever else was drawn. Each cell with at least one drawn example gets ``group_size``
    consecutive slots holding its drawn members followed by padding. Because membership does not
    depend on the other drawn examples, adding or removing one example changes exactly one
    group's clipped contribution (by at most 2 C), never shifts others into new groups.

    Returns (slot indices [G * group_size] int64, is_padding [G * group_size] bool).
    """
    if not (isinstance(group_size, (int, np.integer)) and group_size >= 1):
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}.")
    indices = np.sort(np.asarray(indices, np.int64))
    cells, first = np.unique(indices // group_size, return_index=True)
    slots = np.zeros(len(cells) * group_size, np.int64)
    is_padding = np.ones(len(cells) * group_size, bool)
    offset_in_cell = np.arange(len(indices)) - np.repeat(
        first, np.diff(np.append(first, len(indices)))
    )
    positions = np.searchsorted(cells, indices // group_size) * group_size + offset_in_cell
    slots[positions] = indices
    is_padding[positions] = False
    return slots, is_padding
