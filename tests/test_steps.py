"""Full DP-SGD steps against brute-force references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import SAFE, dp_plan

from jaxdp import steps
from jaxdp.gpt2 import init_model
from jaxdp.loss import model_example_loss


def _batch(tokens, is_padding):
    return {"tokens": jnp.asarray(tokens, jnp.int32), "is_padding": jnp.asarray(is_padding)}


def _run_step(tiny_config, plan, tx_base, physical_batches, microbatch_size=None):
    model = init_model(tiny_config, seed=1)
    tx = tx_base if plan is None else plan.optimizer(tx_base, jax.random.key(0))
    graphdef, state = steps.init_state(model, tx)
    engine = steps.Engine(microbatch_size=microbatch_size)
    grad_step = jax.jit(steps.make_grad_step(plan, engine, graphdef=graphdef))
    update_step = jax.jit(steps.make_update_step(tx, plan))
    acc = steps.zero_accum(state.params)
    for j, batch in enumerate(physical_batches):
        acc = grad_step(state.params, batch, jax.random.key(j), acc)
    return graphdef, state, *update_step(state, acc)


def _per_example_grads(graphdef, params, tokens):
    loss = model_example_loss(graphdef)
    grad = jax.jit(jax.grad(loss), static_argnums=2)
    return [grad(params, {"tokens": jnp.asarray(t)}, None) for t in tokens]


def test_q1_sigma0_sgd_step_equals_brute_force(tiny_config):
    """With every example drawn (q = 1) and no noise, one DP-SGD step is deterministic."""
    N, C, lr = 5, 0.3, 0.5
    tokens = np.random.default_rng(0).integers(0, 61, size=(N, 7))
    dp = dp_plan(C, 0.0, N)
    # Physical batch 4 (< N): the drawn batch needs two padded physical batches.
    batches = [
        _batch(np.concatenate([tokens[:4]]), [False] * 4),
        _batch(np.concatenate([tokens[4:], tokens[:3]]), [False, True, True, True]),
    ]
    graphdef, state0, state1, metrics = _run_step(tiny_config, dp, optax.sgd(lr), batches, 2)

    expected = jax.tree.map(np.asarray, state0.params)
    grads = _per_example_grads(graphdef, state0.params, tokens)
    for g in grads:
        norm = math.sqrt(
            sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(g))
        )
        expected = jax.tree.map(
            lambda p, x, n=norm: p - lr * np.asarray(x) * min(1, C * SAFE / n) / N, expected, g
        )
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-7)
    assert float(metrics["batch_size"]) == N
    assert int(state1.step) == 1


def test_nonprivate_step_is_the_mean_gradient(tiny_config):
    N, lr = 3, 0.1
    tokens = np.random.default_rng(2).integers(0, 61, size=(N, 7))
    batches = [_batch(np.concatenate([tokens, tokens[:1]]), [False, False, False, True])]
    graphdef, state0, state1, metrics = _run_step(tiny_config, None, optax.sgd(lr), batches)
    grads = _per_example_grads(graphdef, state0.params, tokens)
    mean = jax.tree.map(lambda *g: sum(np.asarray(x) for x in g) / N, *grads)
    expected = jax.tree.map(lambda p, g: np.asarray(p) - lr * g, state0.params, mean)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-7)
    assert float(metrics["batch_size"]) == N


def test_accumulation_over_physical_batches_adds_noise_once(tiny_config):
    """One physical batch or three padded ones: the same drawn examples, the same update."""
    tokens = np.random.default_rng(3).integers(0, 61, size=(4, 7))
    dp = dp_plan(0.2, 1.1, 4.0)
    one = [_batch(tokens, [False] * 4)]
    three = [
        _batch(tokens[:2], [False, False]),
        _batch(tokens[2:], [False, False]),
        _batch(tokens[:2], [True, True]),
    ]
    _, _, s1, m1 = _run_step(tiny_config, dp, optax.sgd(1.0), one)
    _, _, s3, m3 = _run_step(tiny_config, dp, optax.sgd(1.0), three)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s3.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(m1["clip_fraction"]) == float(m3["clip_fraction"])


def test_noisy_update_std_matches_sigma_C_over_B(tiny_config):
    """With lr=1 SGD and an all-padding batch, the update is pure noise of std sigma*C/B."""
    sigma, C, B = 2.0, 0.5, 8.0
    dp = dp_plan(C, sigma, B)
    tokens = np.zeros((2, 7), np.int64)
    _, s0, s1, _ = _run_step(tiny_config, dp, optax.sgd(1.0), [_batch(tokens, [True, True])])
    delta = np.concatenate(
        [
            np.ravel(np.asarray(a) - np.asarray(b))
            for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params), strict=True)
        ]
    )
    assert np.std(delta) == pytest.approx(sigma * C / B, rel=0.02)  # n ~ 25k: 5 sd is ~2.2%
