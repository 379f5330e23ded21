"""Clipped per-example gradient sums against a brute-force loop over examples."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdp import clipping
from jaxdp.gpt2 import init_model
from jaxdp.train import init_state, make_example_loss


def _setup(tiny_config, batch=6, seq=7, seed=0):
    model = init_model(tiny_config, seed=seed)
    graphdef, state = init_state(model, optax.sgd(0.1))
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 61, size=(batch, seq)), jnp.int32)
    return graphdef, state.params, tokens


def _brute_force(graphdef, params, tokens, is_padding, C, mode):
    """Loop over examples: plain jax.grad on a batch of one, clip in NumPy, sum."""
    grad = jax.jit(jax.grad(make_example_loss(graphdef)), static_argnums=2)
    total = None
    norms = []
    for i in range(tokens.shape[0]):
        g = grad(params, {"tokens": tokens[i]}, None)
        leaves, treedef = jax.tree.flatten(g)
        leaves = [np.asarray(x, np.float64) for x in leaves]
        norm = math.sqrt(sum(float(np.sum(x**2)) for x in leaves))
        norms.append(norm)
        if mode == "flat":
            leaves = [x * min(1.0, C / norm) for x in leaves]
        else:
            ck = C / math.sqrt(len(leaves))
            leaves = [x * min(1.0, ck / math.sqrt(float(np.sum(x**2)))) for x in leaves]
        if is_padding[i]:
            continue
        total = leaves if total is None else [a + b for a, b in zip(total, leaves, strict=True)]
    return jax.tree.unflatten(treedef, total), np.array(norms)


@pytest.mark.parametrize("mode", ["flat", "per_layer"])
@pytest.mark.parametrize("microbatch_size", [1, 3, 6])
def test_clipped_sum_equals_loop_over_examples(tiny_config, mode, microbatch_size):
    graphdef, params, tokens = _setup(tiny_config)
    is_padding = np.array([False, False, True, False, False, True])
    loss = make_example_loss(graphdef)
    _, norms = _brute_force(graphdef, params, tokens, is_padding, 1.0, mode)
    C = float(np.median(norms))  # some examples clipped, some not
    expected, _ = _brute_force(graphdef, params, tokens, is_padding, C, mode)
    fn = jax.jit(clipping.clipped_grad(loss, C, microbatch_size=microbatch_size, clipping=mode))
    got, stats = fn(params, {"tokens": tokens}, jnp.asarray(is_padding))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
    real = ~is_padding
    assert float(stats.num_examples) == real.sum()
    if mode == "flat":
        assert float(stats.num_clipped) == np.sum((norms > C) & real)
        np.testing.assert_allclose(float(stats.norm_sum), norms[real].sum(), rtol=1e-5)


def test_padding_rows_change_nothing(tiny_config):
    graphdef, params, tokens = _setup(tiny_config)
    loss = make_example_loss(graphdef)
    fn = jax.jit(clipping.clipped_grad(loss, 0.5, microbatch_size=2))
    is_padding = jnp.array([False, True, False, True, False, True])
    a, _ = fn(params, {"tokens": tokens}, is_padding)
    other = tokens.at[jnp.array([1, 3, 5])].set(7)  # different content in the padding rows
    b, _ = fn(params, {"tokens": other}, is_padding)
    only_real, _ = jax.jit(clipping.clipped_grad(loss, 0.5))(
        params, {"tokens": tokens[jnp.array([0, 2, 4])]}, jnp.zeros(3, bool)
    )
    for x, y, z in zip(
        jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(only_real), strict=True
    ):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(x, z, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["flat", "per_layer"])
def test_each_clipped_contribution_has_norm_at_most_C(mode):
    rng = np.random.default_rng(0)
    C = 0.7
    grads = {
        "a": jnp.asarray(rng.normal(size=(9, 5, 3)) * rng.uniform(0, 3, size=(9, 1, 1))),
        "b": jnp.asarray(rng.normal(size=(9, 4))),
    }
    for i in range(9):
        one = jax.tree.map(lambda g, i=i: g[i : i + 1], grads)
        summed, _ = clipping.clip_and_sum(one, C, clipping=mode)
        norm = float(optax.tree.norm(summed))
        assert norm <= C * (1 + 1e-6)
        raw = float(optax.tree.norm(one))
        if raw <= C / math.sqrt(2):  # no leaf can exceed its budget: unchanged
            assert norm == pytest.approx(raw, rel=1e-6)


def test_nonfinite_examples_are_zeroed_and_counted():
    g = np.ones((4, 3), np.float32)
    g[1, 0] = np.nan
    g[2, 2] = np.inf
    summed, info = clipping.clip_and_sum({"w": jnp.asarray(g)}, 10.0)
    np.testing.assert_array_equal(summed["w"], 2 * np.ones(3))
    np.testing.assert_array_equal(info["finite"], [True, False, False, True])


def test_optax_clip_transform_matches_function():
    rng = np.random.default_rng(1)
    grads = {"w": jnp.asarray(rng.normal(size=(5, 3)))}
    pad = jnp.array([False, False, True, False, False])
    tx = clipping.clip_per_example(1.0)
    out, _ = tx.update(grads, tx.init(None), is_padding=pad)
    expected = sum(
        g * min(1.0, 1.0 / np.linalg.norm(g))
        for g, p in zip(np.asarray(grads["w"]), pad, strict=True)
        if not p
    )
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="clipping"):
        clipping.clipped_grad(lambda p, e, k: 0.0, 1.0, clipping="per_sample")
    with pytest.raises(ValueError, match="l2_clip_norm"):
        clipping.clip_and_sum({"w": jnp.ones((2, 2))}, 0.0)


def _np_group_clip_sum(g, pad, C, k):
    """Reference: zero padding rows, sum each group of k rows, clip each group sum, add up."""
    total = np.zeros(g.shape[1:])
    for j in range(0, len(g), k):
        s = sum(g[i] for i in range(j, j + k) if not pad[i])
        if isinstance(s, int):  # all padding
            continue
        total += s * min(1.0, C / np.linalg.norm(s))
    return total


@pytest.mark.parametrize("k", [1, 2, 3])
def test_group_clipping_matches_reference(k):
    rng = np.random.default_rng(k)
    g = rng.normal(size=(6, 4)) * rng.uniform(0.1, 2, size=(6, 1))
    pad = np.array([False, True, False, False, False, True])
    summed, info = clipping.clip_and_sum({"w": jnp.asarray(g)}, 1.0, jnp.asarray(pad), group_size=k)
    np.testing.assert_allclose(summed["w"], _np_group_clip_sum(g, pad, 1.0, k), rtol=1e-5)
    np.testing.assert_allclose(info["norms"], np.linalg.norm(g, axis=1), rtol=1e-5)


@pytest.mark.parametrize("microbatch_size", [2, 6])
def test_group_clipping_in_clipped_grad_equals_loop(tiny_config, microbatch_size):
    graphdef, params, tokens = _setup(tiny_config)
    is_padding = np.array([False, False, True, False, False, False])
    grad = jax.jit(jax.grad(make_example_loss(graphdef)), static_argnums=2)
    per_ex = [jax.tree.leaves(grad(params, {"tokens": t}, None)) for t in tokens]
    flat = np.stack([np.concatenate([np.ravel(x) for x in leaves]) for leaves in per_ex])
    loss = make_example_loss(graphdef)
    with pytest.raises(ValueError, match="group_size"):
        clipping.clipped_grad(loss, 0.05, microbatch_size=3, group_size=2)(
            params, {"tokens": tokens}, jnp.asarray(is_padding)
        )
    fn = jax.jit(clipping.clipped_grad(loss, 0.05, microbatch_size=microbatch_size, group_size=2))
    got, stats = fn(params, {"tokens": tokens}, jnp.asarray(is_padding))
    total = np.concatenate([np.ravel(x) for x in jax.tree.leaves(got)])
    # Groups are rows (0, 1), (2, 3), (4, 5), whatever the microbatch size.
    expected = _np_group_clip_sum(flat, is_padding, 0.05, 2)
    np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-7)
    assert float(stats.num_examples) == 5


@pytest.mark.parametrize("k", [1, 3])
def test_sensitivity_of_clipped_sum_under_add_remove(k):
    """Adding one example to a Poisson draw moves the clipped sum by <= C (k=1) or <= 2C (k>1)."""
    from jaxdp.sampling import group_layout

    rng = np.random.default_rng(7)
    N, C = 40, 1.0
    grads = rng.normal(size=(N, 5)) * 3  # most norms exceed C
    worst = 0.0
    for _ in range(30):
        drawn = np.flatnonzero(rng.random(N) < 0.3)
        x = rng.choice(np.setdiff1d(np.arange(N), drawn))

        def clipped_sum(idx):
            slots, pad = group_layout(idx, k)
            if len(slots) == 0:
                return np.zeros(5)
            out, _ = clipping.clip_and_sum(
                {"w": jnp.asarray(grads[slots])}, C, jnp.asarray(pad), group_size=k
            )
            return np.asarray(out["w"], np.float64)

        diff = np.linalg.norm(clipped_sum(np.sort(np.append(drawn, x))) - clipped_sum(drawn))
        worst = max(worst, diff)
    bound = C if k == 1 else 2 * C
    assert worst <= bound * (1 + 1e-5)
    # Not vacuous: per example the bound is attained (a clipped vector appears); in groups the
    # change exceeds C, which is why group clipping is accounted at sensitivity 2C.
    assert worst > (0.99 * C if k == 1 else 1.2 * C)


def test_group_layout_keeps_cells_together():
    from jaxdp.sampling import group_layout

    slots, pad = group_layout(np.array([0, 2, 3, 9, 10, 11]), 4)
    assert slots.reshape(-1, 4)[~pad.reshape(-1, 4)].tolist() == [0, 2, 3, 9, 10, 11]
    groups = [set(s[~p]) for s, p in zip(slots.reshape(-1, 4), pad.reshape(-1, 4), strict=True)]
    assert groups == [{0, 2, 3}, {9, 10, 11}]
    # Adding example 5 (cell 1) adds one group and leaves the others untouched.
    slots2, pad2 = group_layout(np.array([0, 2, 3, 5, 9, 10, 11]), 4)
    groups2 = [set(s[~p]) for s, p in zip(slots2.reshape(-1, 4), pad2.reshape(-1, 4), strict=True)]
    assert groups2 == [{0, 2, 3}, {5}, {9, 10, 11}]
