"""The ghost-clipping engine against the vmap reference (fp32, <= 1e-5 relative)."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dp_plan, per_example_norms

from jaxdp import clipping, ghost, steps
from jaxdp.gpt2 import init_model
from jaxdp.loss import model_example_loss

RTOL = 1e-5


def _rel(a, b) -> float:
    """||a - b|| / ||b|| over a whole tensor (elementwise ratios are ill-posed near zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _setup(config, batch=6, seq=7, seed=0):
    graphdef, state = steps.init_state(init_model(config, seed=seed), optax.sgd(0.1))
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(batch, seq))
    tokens[0, 4] = tokens[0, 1]  # a repeated token: the embedding rows overlap
    tokens[1, :] = tokens[1, 0]  # an example of a single repeated token
    return graphdef, state.params, jnp.asarray(tokens, jnp.int32)


def _per_example_grads(graphdef, params, tokens):
    loss = model_example_loss(graphdef)
    return jax.vmap(jax.grad(lambda p, e: loss(p, e, None)), (None, 0))(params, {"tokens": tokens})


def _vmap_norms(graphdef, params, tokens):
    return np.asarray(per_example_norms(_per_example_grads(graphdef, params, tokens)))


@pytest.mark.parametrize("vocab_size", [61, 50257])
def test_ghost_norms_equal_per_example_gradient_norms(tiny_config, vocab_size):
    config = dataclasses.replace(tiny_config, vocab_size=vocab_size)
    graphdef, params, tokens = _setup(config)
    norms, losses = jax.jit(lambda p, t: ghost.ghost_norms(graphdef, p, {"tokens": t}))(
        params, tokens
    )
    np.testing.assert_allclose(np.asarray(norms), _vmap_norms(graphdef, params, tokens), rtol=RTOL)
    loss = model_example_loss(graphdef)
    expected = [float(loss(params, {"tokens": t}, None)) for t in tokens]
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=RTOL)


def test_every_parameter_groups_norm_and_the_tied_cross_term(tiny_config):
    """Each group's ghost norm equals its per-example gradient's; the wte/lm_head cross term is
    needed (without it, i.e. treating the tied embedding as two matrices, norms are wrong)."""
    from flax import nnx

    graphdef, params, tokens = _setup(tiny_config)
    sq, _ = jax.jit(lambda p, t: ghost.ghost_sq_norms(graphdef, p, {"tokens": t}))(params, tokens)
    loss = model_example_loss(graphdef)
    grads = jax.vmap(jax.grad(lambda p, e: loss(p, e, None)), (None, 0))(params, {"tokens": tokens})
    for path, var in nnx.to_flat_state(grads):
        names = [str(x) for x in path]
        if names[0] in ("wte", "wpe"):
            key = names[0]
        else:
            key = ".".join(names)
        g = np.asarray(var.get_value(), np.float64)
        expected = np.sum(g.reshape(len(g), -1) ** 2, axis=1)
        np.testing.assert_allclose(np.asarray(sq[key]), expected, rtol=RTOL, err_msg=key)
    cross = np.asarray(sq["_wte_cross"])
    assert np.all(np.abs(cross) > 1e3 * RTOL * np.asarray(sq["wte"]))


def test_dense_norms_both_strategies_match_brute_force():
    rng = np.random.default_rng(0)
    for T, d, p in [(3, 40, 50), (50, 4, 5)]:  # auto: ghost, then instantiate
        a = jnp.asarray(rng.normal(size=(2, T, d)), jnp.float32)
        g = jnp.asarray(rng.normal(size=(2, T, p)), jnp.float32)
        brute = [np.sum((np.asarray(a[i]).T @ np.asarray(g[i])) ** 2) for i in range(2)]
        for strategy in ghost.STRATEGIES:
            got = ghost.dense_sq_norms(a, g, strategy)
            np.testing.assert_allclose(got, brute, rtol=RTOL, err_msg=strategy)
    assert ghost.dense_strategy(7, 30, 90) == "ghost"  # the tiny test config's c_attn
    assert ghost.dense_strategy(3, 40, 50) == "ghost"  # 2 T^2 = 18 < d p = 2000
    assert ghost.dense_strategy(50, 4, 5) == "instantiate"  # 5000 >= 20
    with pytest.raises(ValueError, match="Unknown dense strategy"):
        ghost.dense_strategy(3, 4, 5, "fast")


# In the tiny config "auto" takes Gram matrices for every layer (2 T^2 < d p): both paths run.
@pytest.mark.parametrize(
    "microbatch_size,strategy,mode",
    [(2, "auto", "flat"), (6, "instantiate", "flat"), (3, "auto", "per_layer")],
)
def test_ghost_clipped_sum_equals_vmap_engine(tiny_config, microbatch_size, strategy, mode):
    graphdef, params, tokens = _setup(tiny_config)
    is_padding = jnp.array([False, False, True, False, False, False])
    leaves = jax.tree.leaves(_per_example_grads(graphdef, params, tokens))
    if mode == "flat":
        C = float(np.median(_vmap_norms(graphdef, params, tokens)))  # some clipped, some not
    else:  # C_k = C / sqrt(K) at the median norm of a (tensor, example): half are clipped
        tensor_norms = [np.linalg.norm(np.asarray(g).reshape(len(g), -1), axis=1) for g in leaves]
        C = float(np.median(np.concatenate(tensor_norms))) * np.sqrt(len(leaves))
    loss = model_example_loss(graphdef)
    reference = clipping.clipped_grad(loss, C, microbatch_size=microbatch_size, clipping=mode)
    ref, ref_stats = jax.jit(reference)(params, {"tokens": tokens}, is_padding)
    fn = ghost.ghost_clipped_grad(
        graphdef, C, microbatch_size=microbatch_size, strategy=strategy, clipping=mode
    )
    got, stats = jax.jit(fn)(params, {"tokens": tokens}, is_padding)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        assert _rel(a, b) <= RTOL
    for field in ("num_examples", "num_clipped", "num_nonfinite"):
        assert float(getattr(stats, field)) == float(getattr(ref_stats, field))
    np.testing.assert_allclose(float(stats.norm_sum), float(ref_stats.norm_sum), rtol=RTOL)
    np.testing.assert_allclose(float(stats.loss_sum), float(ref_stats.loss_sum), rtol=RTOL)


def test_train_step_with_ghost_engine_equals_vmap_engine(tiny_config):
    graphdef, params, tokens = _setup(tiny_config)
    batch = {"tokens": tokens, "is_padding": jnp.zeros(6, bool)}
    results = {}
    for engine in ("vmap", "ghost"):
        dp, eng = dp_plan(0.5, 1.0, 6), steps.Engine(engine, microbatch_size=3)
        tx = dp.optimizer(optax.sgd(0.1), jax.random.key(9))
        state = steps.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
        )
        acc = jax.jit(steps.make_grad_step(dp, eng, graphdef=graphdef))(
            params, batch, jax.random.key(0), steps.zero_accum(params)
        )
        results[engine], _ = jax.jit(steps.make_update_step(tx, dp))(state, acc)
    # Compare the updates (new - old params): same noise, same clipped sum.
    for a, b, p in zip(
        jax.tree.leaves(results["ghost"].params),
        jax.tree.leaves(results["vmap"].params),
        jax.tree.leaves(params),
        strict=True,
    ):
        assert _rel(np.asarray(a) - np.asarray(p), np.asarray(b) - np.asarray(p)) <= RTOL
    # Clipping units of several rows are refused (tests/test_units.py: the vmap engine).
    step = jax.jit(steps.make_grad_step(dp, steps.Engine("ghost"), graphdef=graphdef))
    segments = {**batch, "segment_ids": jnp.array([0, 0, 2, 2, 2, 5], jnp.int32)}
    with pytest.raises(NotImplementedError, match="one row per unit"):
        step(params, segments, None, steps.zero_accum(params))


def test_nonfinite_examples_contribute_exactly_zero(tiny_config):
    """A NaN/inf example is dropped and counted, and does not poison the book-kept sums."""
    graphdef, params, tokens = _setup(tiny_config)
    mask = np.ones(tokens.shape, np.float32)
    mask[1, 3] = np.nan
    mask[4, 2] = np.inf
    batch = {"tokens": tokens, "token_mask": jnp.asarray(mask)}
    is_padding = jnp.zeros(6, bool)
    loss = model_example_loss(graphdef)
    ref, ref_stats = jax.jit(clipping.clipped_grad(loss, 0.1, microbatch_size=3))(
        params, batch, is_padding
    )
    for strategy in ("ghost", "instantiate"):
        fn = ghost.ghost_clipped_grad(graphdef, 0.1, microbatch_size=3, strategy=strategy)
        got, stats = jax.jit(fn)(params, batch, is_padding)
        assert float(stats.num_nonfinite) == float(ref_stats.num_nonfinite) == 2
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            assert np.all(np.isfinite(a))
            assert _rel(a, b) <= RTOL
    # The same sum as simply leaving the two examples out.
    keep = jnp.array([True, False, True, True, False, True])
    clean = {"tokens": tokens[keep], "token_mask": jnp.ones((4, tokens.shape[1]))}
    fn = ghost.ghost_clipped_grad(graphdef, 0.1, microbatch_size=2)
    without, _ = jax.jit(fn)(params, clean, jnp.zeros(4, bool))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(without), strict=True):
        assert _rel(a, b) <= RTOL


def _dot_precisions(jaxpr) -> list:
    """The precision of every dot_general in a (closed) jaxpr, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn.params["precision"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _dot_precisions(sub)
    return out


@pytest.mark.parametrize("with_lora", [False, True])
def test_gram_path_runs_at_full_float32_precision(tiny_config, with_lora):
    """The Gram norms and the book-kept sums they are paired with are separate computations of
    one gradient: both must be full-precision matmuls (a GPU's default TF32 would round their
    inputs to 2^-11 and make them disagree by more than the clipping margin)."""
    from jaxdp import lora
    from jaxdp.ghost import _Pass

    model = init_model(tiny_config, seed=0)
    if with_lora:
        lora.apply_lora(model, rank=2, alpha=4.0)
    graphdef, state = steps.init_state(model, optax.sgd(0.1))
    params, (_, _, tokens) = state.params, _setup(tiny_config)
    recorded = _Pass(graphdef, params, {"tokens": tokens}, None, None, "ghost")
    sq, kept = recorded.sq_norms()
    assert not kept.keys() - {k for k in kept if k.endswith((".bias", ".scale"))}  # all Gram
    w = jnp.linspace(0.1, 1.0, tokens.shape[0])
    groups = ["wte", "h.0.attn.c_attn.kernel", "h.0.mlp.c_proj.kernel"]
    if with_lora:
        groups += ["h.0.attn.c_attn.lora_a", "h.0.attn.c_attn.lora_b"]
        assert {"h.0.attn.c_attn.lora_a", "h.0.attn.c_attn.lora_b"} <= sq.keys()
    for fn in (
        lambda: recorded.sq_norms()[0],
        *[lambda g=g: recorded.weighted_sum(g, w, kept) for g in groups],
    ):
        precisions = _dot_precisions(jax.make_jaxpr(fn)().jaxpr)
        assert precisions, "no matmul traced"
        highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
        assert all(p == highest for p in precisions), precisions
    # The instantiating strategy needs no such care: its norms are of the values it sums.
    inst = _Pass(graphdef, params, {"tokens": tokens}, None, None, "instantiate")
    assert "h.0.attn.c_attn.kernel" in inst.sq_norms()[1]
