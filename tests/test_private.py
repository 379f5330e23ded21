"""make_private: the README's custom loop runs, and one step equals a brute-force reference."""

import math
import re

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, SAFE

import jaxdp
from jaxdp.randomness import Secrets


def _readme_library_snippet() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Library") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_library_loop_trains_privately():
    namespace: dict = {}
    exec(compile(_readme_library_snippet(), "README.md", "exec"), namespace)
    private = namespace["private"]
    assert private.epsilon() <= 3.0
    assert private.plan.num_steps == 200 and private.plan.sampling == "poisson"
    assert namespace["accuracy"] > 0.8  # it learned, under DP
    assert str(private.secrets.noise) not in repr(private)


def _loss(params, example, key):
    del key
    return jnp.sum((example["x"] @ params["w"] - example["y"]) ** 2)


def test_one_step_with_every_example_and_no_noise_is_the_clipped_mean():
    """q = 1, sigma = 0, SGD lr 1: the update is exactly -(1/B) sum_i clip(g_i, C)."""
    rng = np.random.default_rng(0)
    N, C = 7, 0.5
    data = {"x": rng.normal(size=(N, 3)).astype(np.float32), "y": rng.normal(size=N)}
    params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
    private = jaxdp.make_private(
        _loss, params, optax.sgd(1.0), num_examples=N, expected_batch_size=N, steps=1,
        noise_multiplier=0.0, l2_clip_norm=C, physical_batch_size=4, secrets=Secrets.from_seed(1),
    )  # fmt: skip
    state, metrics = private.step(private.initial_state, 0, data)  # two physical batches
    expected = np.zeros(3)
    for i in range(N):  # brute force: one example at a time, clipped in NumPy
        g = np.asarray(jax.grad(_loss)(params, {k: v[i] for k, v in data.items()}, None)["w"])
        expected += g * min(1.0, C * SAFE / np.linalg.norm(g))
    np.testing.assert_allclose(
        np.asarray(state.params["w"]), np.asarray(params["w"]) - expected / N, rtol=1e-5
    )
    assert float(metrics["batch_size"]) == N


def test_noise_and_accounting_of_make_private():
    sigma, C, B, N = 3.0, 1.0, 20, 400
    private = jaxdp.make_private(
        _loss, {"w": jnp.zeros(5000)}, optax.sgd(1.0), num_examples=N, expected_batch_size=B,
        steps=10, noise_multiplier=sigma, l2_clip_norm=C,
    )  # fmt: skip
    empty = {"x": np.zeros((N, 5000), np.float32), "y": np.zeros(N)}  # zero gradients
    state, _ = private.step(private.initial_state, 0, empty)
    # The update is pure noise of std sigma C / B.
    assert np.std(np.asarray(state.params["w"])) == pytest.approx(sigma * C / B, rel=0.05)
    # Accounting: dp-accounting's PLD accountant on the Poisson-subsampled Gaussian, directly.
    event = dp_accounting.PoissonSampledDpEvent(B / N, dp_accounting.GaussianDpEvent(sigma))
    direct = dp_accounting.pld.PLDAccountant().compose(event, 10).get_epsilon(1e-5)
    assert private.get_epsilon(1e-5) == pytest.approx(direct, rel=1e-9)
    assert math.isfinite(private.epsilon()) and private.plan.target_delta == 1 / (10 * N)
    with pytest.raises(ValueError, match="examples"):
        next(private.batches(0, {"x": np.zeros((3, 1))}))
