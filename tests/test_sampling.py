"""Tests for jaxdp.sampling: Poisson draws have the right law; padding never drops examples."""

import math

import numpy as np
import pytest
from scipy import stats

from jaxdp import sampling

N, Q, SEED, STEPS = 997, 0.05, 1234, 3000


@pytest.fixture(scope="module")
def draws():
    sampler = sampling.PoissonSampler(num_examples=N, sampling_prob=Q, seed=SEED)
    return [sampler.sample(t) for t in range(STEPS)]


def test_sample_is_stateless_and_reproducible():
    a = sampling.PoissonSampler(N, Q, SEED)
    batches = [a.sample(t) for t in range(10)]
    # A resumed run (fresh sampler, jumping straight to step 7) draws the identical batch.
    resumed = sampling.PoissonSampler(N, Q, SEED)
    np.testing.assert_array_equal(resumed.sample(7), batches[7])
    np.testing.assert_array_equal(a.sample(3), batches[3])
    assert not any(np.array_equal(batches[i], batches[i + 1]) for i in range(9))
    assert not np.array_equal(sampling.PoissonSampler(N, Q, SEED + 1).sample(3), batches[3])


def test_sample_format(draws):
    for idx in draws[:50]:
        assert idx.dtype == np.int64 and idx.ndim == 1
        assert np.all(np.diff(idx) > 0)  # Sorted, no duplicates.
        assert idx.size == 0 or (idx[0] >= 0 and idx[-1] < N)
    full = sampling.PoissonSampler(13, 1.0, 0).sample(5)
    np.testing.assert_array_equal(full, np.arange(13))


def test_batch_size_is_binomial(draws):
    sizes = np.array([idx.size for idx in draws])
    mean, var = N * Q, N * Q * (1 - Q)
    # Mean and variance within a few standard errors.
    assert abs(sizes.mean() - mean) < 4 * math.sqrt(var / STEPS)
    kurt = (1 - 6 * Q * (1 - Q)) / var  # Excess kurtosis of Binomial(N, Q).
    var_se = var * math.sqrt(2 / (STEPS - 1) + kurt / STEPS)
    assert abs(sizes.var(ddof=1) - var) < 4 * var_se
    # Chi-square goodness of fit against the Binomial pmf; tails merged so every bin expects >= 5.
    lo, hi = int(stats.binom.ppf(0.01, N, Q)), int(stats.binom.ppf(0.99, N, Q))
    edges = np.arange(lo, hi + 1)
    observed = [np.sum(sizes < lo)] + [np.sum(sizes == k) for k in edges] + [np.sum(sizes > hi)]
    probs = np.concatenate(
        [[stats.binom.cdf(lo - 1, N, Q)], stats.binom.pmf(edges, N, Q), [stats.binom.sf(hi, N, Q)]]
    )
    assert np.all(probs * STEPS >= 5)
    assert stats.chisquare(observed, probs * STEPS).pvalue > 1e-3
    # Successive steps are independent: no lag-1 correlation of batch sizes.
    assert abs(np.corrcoef(sizes[:-1], sizes[1:])[0, 1]) < 4 / math.sqrt(STEPS)


def test_each_example_included_with_probability_q(draws):
    counts = np.bincount(np.concatenate(draws), minlength=N)
    # Each count is Binomial(STEPS, Q), independently across examples.
    z = (counts - STEPS * Q) / math.sqrt(STEPS * Q * (1 - Q))
    assert np.all(np.abs(z) < 5), np.abs(z).max()
    assert stats.chi2.sf(np.sum(z**2), df=N) > 1e-3
    assert stats.chi2.cdf(np.sum(z**2), df=N) > 1e-3  # Not suspiciously uniform either.


def test_poisson_sampler_validates():
    for args in [(0, 0.1, 0), (10, 0.0, 0), (10, 1.5, 0), (10, 0.1, -1), (10.0, 0.1, 0)]:
        with pytest.raises(ValueError):
            sampling.PoissonSampler(*args)
    with pytest.raises(ValueError, match="step"):
        sampling.PoissonSampler(10, 0.1, 0).sample(-1)
    assert sampling.PoissonSampler(200, 0.05, 0).expected_batch_size == pytest.approx(10.0)


@pytest.mark.parametrize("physical", [1, 7, 50, 64, 200])
def test_pad_batches_keeps_every_index_once(draws, physical):
    for idx in draws[:20]:
        chunks = sampling.pad_batches(idx, physical)
        assert len(chunks) == max(1, math.ceil(idx.size / physical))
        for chunk_idx, is_padding in chunks:
            assert chunk_idx.shape == (physical,) and chunk_idx.dtype == np.int64
            assert is_padding.shape == (physical,) and is_padding.dtype == np.bool_
            assert np.all((chunk_idx >= 0) & (chunk_idx < N))  # Padding rows are gatherable.
        real = np.concatenate([c[~p] for c, p in chunks])
        np.testing.assert_array_equal(real, idx)
        flags = np.concatenate([p for _, p in chunks])
        assert flags.sum() == len(chunks) * physical - idx.size
        assert not flags[: idx.size].any() and flags[idx.size :].all()


def test_pad_batches_empty_and_invalid():
    chunks = sampling.pad_batches(np.array([], np.int64), 5)
    assert len(chunks) == 1
    assert chunks[0][0].shape == (5,) and chunks[0][1].all()
    with pytest.raises(ValueError):
        sampling.pad_batches(np.arange(3), 0)
    with pytest.raises(ValueError):
        sampling.pad_batches(np.arange(6).reshape(2, 3), 4)


def test_shuffle_sampler_covers_each_example_once_per_epoch():
    s = sampling.ShuffleSampler(num_examples=103, batch_size=10, seed=5)
    assert s.steps_per_epoch == 11
    epochs = []
    for epoch in range(3):
        batches = [s.sample(epoch * 11 + i) for i in range(11)]
        assert [b.size for b in batches] == [10] * 10 + [3]
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(103))
        epochs.append(np.concatenate(batches))
    assert not np.array_equal(epochs[0], epochs[1])  # A fresh permutation per epoch.
    np.testing.assert_array_equal(
        sampling.ShuffleSampler(103, 10, 5).sample(15), s.sample(15)
    )  # Stateless in the step.
    with pytest.raises(ValueError):
        sampling.ShuffleSampler(10, 11, 0)


@pytest.mark.parametrize(
    "expected, n, micro", [(50.0, 1000, 1), (50.0, 1000, 8), (3.0, 10, 4), (1000, 1000, 3)]
)
def test_default_physical_batch_size(expected, n, micro):
    size = sampling.default_physical_batch_size(expected, n, micro)
    assert size % micro == 0 and size >= expected
    assert size <= math.ceil(n / micro) * micro
    q = expected / n
    # A draw overflows one chunk with small probability (or never, when capped at n).
    assert stats.binom.sf(size, n, q) < 1e-4
    assert size - micro < expected + 4 * math.sqrt(n * q * (1 - q)) + 1  # Not wastefully big.


def test_content_cells_depend_on_content_only():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 50257, size=(200, 9))
    blocks[17] = blocks[3]  # a duplicate
    cells = sampling.content_cells(blocks, 50)
    assert cells.shape == (200,) and cells.min() >= 0 and cells.max() < 50
    assert cells[17] == cells[3]
    # Removing or adding an example (anywhere) leaves every other example in its cell.
    removed = sampling.content_cells(np.delete(blocks, 5, axis=0), 50)
    np.testing.assert_array_equal(removed, np.delete(cells, 5))
    added = sampling.content_cells(np.insert(blocks, 0, rng.integers(0, 9, 9), axis=0), 50)
    np.testing.assert_array_equal(added[1:], cells)
    # Content, not position: a permutation permutes the cells.
    perm = rng.permutation(200)
    np.testing.assert_array_equal(sampling.content_cells(blocks[perm], 50), cells[perm])
    # Spread evenly over the cells (chi-square against uniform).
    many = sampling.content_cells(rng.integers(0, 50257, size=(20000, 9)), 50)
    assert stats.chisquare(np.bincount(many, minlength=50)).pvalue > 1e-4
    with pytest.raises(ValueError):
        sampling.content_cells(blocks, 0)


@pytest.mark.parametrize("P, m", [(8, 4), (12, 3), (6, 6)])
def test_pack_units_keeps_each_unit_in_one_microbatch(P, m):
    rng = np.random.default_rng(P * m)
    for _ in range(30):
        idx = np.sort(rng.choice(100, size=rng.integers(0, 40), replace=False))
        units = rng.integers(0, 15, size=len(idx))
        batches, dropped = sampling.pack_units(idx, units, P, m)
        n = P // m
        seen, total_dropped = [], 0
        for b in batches:
            assert b.rows.shape == b.is_padding.shape == b.segment_ids.shape == (P,)
            chunk_of_row = np.arange(P) % n  # row a * n + j belongs to microbatch j
            real = ~b.is_padding
            for j in range(n):
                rows = np.flatnonzero((chunk_of_row == j) & real)
                ids = b.segment_ids[rows]
                # Rows of one segment are one unit; no two units share a segment.
                for sid in np.unique(ids):
                    members = b.rows[rows[ids == sid]]
                    unit_of = {units[np.searchsorted(idx, r)] for r in members}
                    assert len(unit_of) == 1
                pad_rows = np.flatnonzero((chunk_of_row == j) & b.is_padding)
                assert not set(b.segment_ids[pad_rows]) & set(ids)
            seen.extend(b.rows[real].tolist())
        # Each unit's members are together: the rows of one unit are in one (batch, chunk).
        for u in np.unique(units):
            where = set()
            for bi, b in enumerate(batches):
                for r in np.flatnonzero(~b.is_padding):
                    if units[np.searchsorted(idx, b.rows[r])] == u:
                        where.add((bi, r % n))
            assert len(where) == 1
            total_dropped += max(0, int(np.sum(units == u)) - m)
        assert dropped == total_dropped
        assert len(seen) == len(set(seen)) == len(idx) - dropped


def test_pack_units_drops_only_the_excess_of_an_oversized_unit():
    idx = np.arange(10)
    units = np.array([0] * 7 + [1, 2, 2])
    batches, dropped = sampling.pack_units(idx, units, 8, 4)
    assert dropped == 3
    kept = np.concatenate([b.rows[~b.is_padding] for b in batches])
    assert sorted(kept.tolist()) == [0, 1, 2, 3, 7, 8, 9]  # unit 0 keeps its first four
    with pytest.raises(ValueError, match="multiple"):
        sampling.pack_units(idx, units, 6, 4)
    empty, dropped = sampling.pack_units(np.array([], np.int64), np.array([], np.int64), 4, 2)
    assert len(empty) == 1 and empty[0].is_padding.all() and dropped == 0
