import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdp.noise import add_gaussian_noise


def test_noise_std_is_sigma_C_over_B():
    sigma, C, B = 1.3, 0.7, 50.0
    tx = add_gaussian_noise(C, sigma, B, seed=0)
    zeros = {"a": jnp.zeros((300, 200)), "b": jnp.zeros((1000,))}
    out, state = tx.update(zeros, tx.init(zeros))
    x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(out)]).astype(np.float64)
    n = x.size
    target = sigma * C / B
    # Sample variance * (n-1) / target^2 ~ chi2(n-1); two-sided test at 1e-4.
    p_var = stats.chi2.sf(np.var(x, ddof=1) * (n - 1) / target**2, n - 1)
    assert 1e-4 < p_var < 1 - 1e-4, (np.std(x), target)
    assert abs(np.mean(x)) < 5 * target / np.sqrt(n)
    assert stats.kstest(x / target, "norm").pvalue > 1e-4
    assert int(state.count) == 1


def test_noise_is_added_to_the_sum_then_divided_by_B():
    tx = add_gaussian_noise(1.0, 0.0, 4.0, seed=0)
    g = {"w": jnp.arange(6.0)}
    out, _ = tx.update(g, tx.init(g))
    np.testing.assert_allclose(out["w"], np.arange(6.0) / 4.0)


def test_noise_depends_only_on_seed_and_count():
    tx = add_gaussian_noise(1.0, 1.0, 1.0, seed=7)
    g = {"w": jnp.zeros(64)}
    s0 = tx.init(g)
    a1, s1 = tx.update(g, s0)
    a2, _ = tx.update(g, s1)
    b1, _ = add_gaussian_noise(1.0, 1.0, 1.0, seed=7).update(g, s0)  # "resumed" transform
    c1, _ = add_gaussian_noise(1.0, 1.0, 1.0, seed=8).update(g, s0)
    np.testing.assert_array_equal(a1["w"], b1["w"])
    assert not np.allclose(a1["w"], a2["w"]) and not np.allclose(a1["w"], c1["w"])
    # Leaves get independent noise even when identical in shape.
    two, _ = tx.update({"u": jnp.zeros(64), "v": jnp.zeros(64)}, s0)
    assert not np.allclose(two["u"], two["v"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="noise_multiplier"):
        add_gaussian_noise(1.0, -1.0, 1.0, 0)
    with pytest.raises(ValueError, match="expected_batch_size"):
        add_gaussian_noise(1.0, 1.0, 0.0, 0)
