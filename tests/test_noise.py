import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdp.noise import add_gaussian_noise


def _check_standard_normal(x: np.ndarray, scale: float) -> None:
    """x / scale is an i.i.d. N(0, 1) sample: variance, mean and shape, each at p > 1e-4."""
    n = x.size
    p_var = stats.chi2.sf(np.var(x, ddof=1) * (n - 1) / scale**2, n - 1)
    assert 1e-4 < p_var < 1 - 1e-4, (np.std(x), scale)
    assert abs(np.mean(x)) < 5 * scale / np.sqrt(n)
    assert stats.kstest(x / scale, "norm").pvalue > 1e-4


@pytest.mark.parametrize("secure", [False, True])
def test_noise_std_is_sigma_C_over_B(secure):
    sigma, C, B = 1.3, 0.7, 50.0
    tx = add_gaussian_noise(C, sigma, B, jax.random.key(0), secure=secure)
    zeros = {"a": jnp.zeros((300, 200)), "b": jnp.zeros((1000,))}
    out, state = tx.update(zeros, tx.init(zeros))
    x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(out)]).astype(np.float64)
    _check_standard_normal(x, sigma * C / B)
    assert int(state.count) == 1


def test_secure_noise_differs_from_plain_noise_of_the_same_key():
    g = {"w": jnp.zeros(1000)}
    plain = add_gaussian_noise(1.0, 1.0, 1.0, jax.random.key(3))
    secure = add_gaussian_noise(1.0, 1.0, 1.0, jax.random.key(3), secure=True)
    a, _ = plain.update(g, plain.init(g))
    b, _ = secure.update(g, secure.init(g))
    assert np.corrcoef(a["w"], b["w"])[0, 1] < 0.9  # a sum of four draws, not one rescaled


def test_noise_is_added_to_the_sum_then_divided_by_B():
    tx = add_gaussian_noise(1.0, 0.0, 4.0, jax.random.key(0))
    g = {"w": jnp.arange(6.0)}
    out, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(out["w"], np.arange(6.0) / 4.0)


def test_noise_depends_only_on_the_key_in_the_state_and_the_count():
    key = jax.random.key(7)
    tx = add_gaussian_noise(1.0, 1.0, 1.0, key)
    g = {"w": jnp.zeros(64)}
    s0 = tx.init(g)
    # The key is state (saved with the optimizer state), not baked into the transform.
    np.testing.assert_array_equal(s0.key, jax.random.key_data(key))
    a1, s1 = tx.update(g, s0)
    a2, _ = tx.update(g, s1)
    # A transform built with another key, given the saved state, draws the saved key's noise:
    # what a run resumed from a checkpoint does.
    resumed = add_gaussian_noise(1.0, 1.0, 1.0, jax.random.key(8))
    b1, _ = resumed.update(g, s0)
    c1, _ = resumed.update(g, resumed.init(g))
    np.testing.assert_array_equal(a1["w"], b1["w"])
    assert not np.allclose(a1["w"], a2["w"]) and not np.allclose(a1["w"], c1["w"])
    # Leaves get independent noise even when identical in shape.
    two, _ = tx.update({"u": jnp.zeros(64), "v": jnp.zeros(64)}, s0)
    assert not np.allclose(two["u"], two["v"])


def test_update_under_jit_reads_the_key_from_the_state():
    tx = add_gaussian_noise(1.0, 1.0, 1.0, jax.random.key(1))
    g = {"w": jnp.zeros(16)}
    s0 = tx.init(g)
    other = s0._replace(key=jax.random.key_data(jax.random.key(2)))
    update = jax.jit(tx.update)
    assert not np.allclose(update(g, s0)[0]["w"], update(g, other)[0]["w"])


def test_bad_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        add_gaussian_noise(1.0, -1.0, 1.0, key)
    with pytest.raises(ValueError, match="expected_batch_size"):
        add_gaussian_noise(1.0, 1.0, 0.0, key)
    with pytest.raises(TypeError, match="PRNG key"):
        add_gaussian_noise(1.0, 1.0, 1.0, 0)


@pytest.mark.parametrize("secure", [False, True])
def test_tree_noise_is_the_chunk_stream_laid_over_the_leaves(secure, monkeypatch):
    """Brute force: draw each chunk from its own key in a loop, concatenate, cut into leaves."""
    from jaxdp import noise

    monkeypatch.setattr(noise, "NOISE_CHUNK", 16)  # several chunks, leaves across boundaries
    key = jax.random.key(11)
    shapes = [(3, 5), (7,), (3, 5), (), (2, 2, 3)]
    got = jax.jit(lambda c: noise.tree_noise(key, c, shapes, secure))(4)
    total = sum(int(np.prod(s)) for s in shapes)  # 50 values: 4 chunks of 16
    step = jax.random.fold_in(jax.random.fold_in(key, 4), 0)
    stream = np.concatenate(
        [noise._normal(jax.random.fold_in(step, c), (16,), secure) for c in range(4)]
    )
    start = 0
    for leaf, shape in zip(got, shapes, strict=True):
        size = int(np.prod(shape))
        assert leaf.shape == shape and leaf.dtype == jnp.float32
        np.testing.assert_array_equal(np.ravel(leaf), stream[start : start + size])
        start += size
    assert start == total
    # Another update count is another stream.
    other = jax.jit(lambda c: noise.tree_noise(key, c, shapes, secure))(5)
    assert not np.array_equal(got[0], other[0])
