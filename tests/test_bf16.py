"""bf16 mixed precision: bf16 activations and matmuls, float32 parameters, and a per-example
contribution that never exceeds the clip norm because of rounding (issue 18)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dp_plan, per_example_norms

from jaxdp import clipping, fused, ghost, noise, steps
from jaxdp.gpt2 import GPT2Config, Tape, init_model
from jaxdp.loss import model_example_loss


@pytest.fixture
def bf16_config(tiny_config):
    return dataclasses.replace(tiny_config, compute_dtype="bfloat16")


def _adversarial(config, seed=0, scale=8.0, batch=4, seq=9):
    """A bf16 model whose weights are blown up by `scale` (large activations and gradients, where
    bf16's 8-bit mantissa rounds most) and a batch with repeated tokens."""
    model = init_model(config, seed=seed)
    graphdef, state = steps.init_state(model, optax.sgd(0.1))
    params = jax.tree.map(lambda x: x * scale, state.params)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(batch, seq))
    tokens[0, :] = tokens[0, 0]  # one token repeated: the embedding row's terms add up
    return graphdef, params, jnp.asarray(tokens, jnp.int32)


def _engines(graphdef, C):
    return {
        "vmap": clipping.clipped_grad(model_example_loss(graphdef), C),
        "ghost_instantiate": ghost.ghost_clipped_grad(graphdef, C, strategy="instantiate"),
        "vmap_per_layer": clipping.clipped_grad(
            model_example_loss(graphdef), C, clipping="per_layer"
        ),
        "fused": fused.fused_clipped_grad(graphdef, C),
    }


def _norm64(tree) -> float:
    return float(
        np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    )


def test_model_computes_in_bf16_with_float32_parameters(bf16_config):
    from flax import nnx

    model = init_model(bf16_config)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    tokens = jnp.zeros((2, 5), jnp.int32)
    tape = Tape()
    logits = model(tokens, tape=tape)
    assert logits.dtype == jnp.float32  # the loss is taken in float32
    assert tape.inputs["h.0.attn.c_attn"].dtype == jnp.bfloat16  # activations are bf16
    # The same weights in float32 give nearly the same logits (bf16 rounding only).
    f32 = init_model(dataclasses.replace(bf16_config, compute_dtype="float32"))
    np.testing.assert_allclose(logits, f32(tokens), atol=0.05)
    # Never written to a Hugging Face config.json, never read from one.
    assert "compute_dtype" not in bf16_config.to_hf_dict()
    assert GPT2Config.from_hf_dict({"dtype": "bfloat16", "n_layer": 2}).compute_dtype == "float32"
    with pytest.raises(ValueError, match="compute_dtype"):
        GPT2Config(compute_dtype="float16")


@pytest.mark.parametrize("engine", ["vmap", "ghost_instantiate", "vmap_per_layer", "fused"])
def test_no_contribution_exceeds_C_in_bf16(bf16_config, engine):
    """Every example alone (the others padding): its clipped contribution's norm, taken in
    float64, is at most C, whether C is far below its gradient norm (large-norm inputs) or just
    at it (factor ~1, where a rounding excess would show)."""
    graphdef, params, tokens = _adversarial(bf16_config)
    B = tokens.shape[0]
    loss = model_example_loss(graphdef)
    per_example = jax.vmap(jax.grad(lambda p, e: loss(p, e, None)), (None, 0))(
        params, {"tokens": tokens}
    )
    norms = np.asarray(per_example_norms(per_example))
    assert np.all(np.isfinite(norms)) and norms.min() > 10.0  # large gradients
    checked = 0
    for C in (1e-3 * float(norms.min()), float(norms[1]), float(norms.max()) * 0.999):
        fn = jax.jit(_engines(graphdef, C)[engine])
        for i in range(B):
            pad = jnp.asarray(np.arange(B) != i)
            contribution, _ = fn(params, {"tokens": tokens}, pad)
            assert _norm64(contribution) <= C, (engine, C, i, _norm64(contribution))
            checked += 1
    assert checked == 3 * B


def test_bf16_sums_match_float32_sums_to_bf16_accuracy(bf16_config):
    """The clipped sum in bf16 is the float32 one up to bf16 rounding of the activations: a
    bf16 step trains the same model."""
    graphdef, params, tokens = _adversarial(bf16_config, scale=1.0)
    graphdef32, _ = steps.init_state(
        init_model(dataclasses.replace(bf16_config, compute_dtype="float32")), optax.sgd(0.1)
    )
    pad = jnp.zeros((tokens.shape[0],), bool)
    C = 1.0
    a, _ = jax.jit(ghost.ghost_clipped_grad(graphdef, C, strategy="instantiate"))(
        params, {"tokens": tokens}, pad
    )
    b, _ = jax.jit(ghost.ghost_clipped_grad(graphdef32, C, strategy="instantiate"))(
        params, {"tokens": tokens}, pad
    )
    rel = _norm64(jax.tree.map(lambda x, y: x - y, a, b)) / _norm64(b)
    assert 0 < rel < 0.05, rel
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(a))  # the accumulator


def test_gram_norms_are_refused_in_bf16(bf16_config):
    graphdef, params, tokens = _adversarial(bf16_config)
    fn = ghost.ghost_clipped_grad(graphdef, 1.0, strategy="ghost")
    with pytest.raises(NotImplementedError, match="bfloat16"):
        jax.jit(fn)(params, {"tokens": tokens}, jnp.zeros((tokens.shape[0],), bool))


def test_a_per_layer_plan_is_honoured_layer_by_layer(bf16_config):
    """One Gram layer in an otherwise instantiated plan is found and named."""
    from jaxdp import clipping_plan

    graphdef, params, tokens = _adversarial(bf16_config)
    names = [x.name for x in clipping_plan.dense_layers(bf16_config)]
    plan = tuple((n, "ghost" if n == "h.1.mlp.c_fc" else "instantiate") for n in names)
    fn = ghost.ghost_clipped_grad(graphdef, 1.0, strategy=plan)
    with pytest.raises(NotImplementedError, match=r"h\.1\.mlp\.c_fc"):
        jax.jit(fn)(params, {"tokens": tokens}, jnp.zeros((tokens.shape[0],), bool))
    all_instantiated = tuple((n, "instantiate") for n in names)
    out, _ = jax.jit(ghost.ghost_clipped_grad(graphdef, 1.0, strategy=all_instantiated))(
        params, {"tokens": tokens}, jnp.zeros((tokens.shape[0],), bool)
    )
    assert _norm64(out) > 0


def _linear_loss(params, example, key):
    del key
    return jnp.sum(example["x"].astype(params["w"].dtype) * params["w"])  # gradient: x


def test_make_private_with_bf16_parameters_does_the_dp_arithmetic_in_float32():
    """bf16 parameters: the accumulator, the clipped sum and the noise are float32, one example
    contributes at most C (in float64), and the noisy mean is the float32 reference
    ((sum + sigma C z) / B, z from the two noise keys, drawn here with jax.random directly),
    rounded to bf16 only at the end."""
    import jaxdp
    from jaxdp.randomness import Secrets

    d, N, C, sigma, B = 301, 12, 1.0, 0.7, 6.0
    rng = np.random.default_rng(0)
    # Gradients just above C, with values bf16 cannot hold exactly: rounding matters here.
    x = rng.normal(size=(N, d)) / np.sqrt(d) * 1.0007
    data = {"x": jnp.asarray(x, jnp.bfloat16)}
    params = {"w": jnp.asarray(rng.normal(size=d), jnp.bfloat16)}
    secrets = Secrets.from_seed(3)
    private = jaxdp.make_private(
        _linear_loss, params, optax.sgd(1.0), num_examples=N, expected_batch_size=B, steps=1,
        noise_multiplier=sigma, l2_clip_norm=C, microbatch_size=2, physical_batch_size=4,
        secrets=secrets,
    )  # fmt: skip
    state = private.initial_state
    # Each example alone: its clipped contribution, in float64, is at most C.
    for i in range(N):
        one = {"x": data["x"][i : i + 1].repeat(4, 0), "is_padding": np.arange(4) > 0}
        acc = private.accumulate(state, one, private.zero_grads(state), step=0)
        assert acc.grad_sum["w"].dtype == jnp.float32
        assert _norm64(acc.grad_sum) <= C
    # A whole step's sum over several physical batches and microbatches, then the noise.
    acc = private.zero_grads(state)
    for j, batch in enumerate(private.batches(0, data)):
        acc = private.accumulate(state, batch, acc, step=0, index=j)
    assert acc.grad_sum["w"].dtype == jnp.float32
    updates, _ = private.optimizer.update(acc.grad_sum, state.opt_state, state.params)
    assert updates["w"].dtype == jnp.bfloat16  # rounded to the parameters' dtype, at the end
    keys = jax.random.wrap_key_data(
        np.asarray(jax.random.key_data(secrets.noise_key())), impl="threefry2x32"
    )
    chunk = lambda k: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(k, 0), 0), 0)
    bits = [np.asarray(jax.random.bits(chunk(k), (1, d), jnp.uint32)) for k in keys]
    z = noise._normal_from_bits(jnp.asarray(bits[0] ^ bits[1]))[0]  # tests/test_randomness.py
    expected = (np.asarray(acc.grad_sum["w"], np.float32) + np.float32(sigma * C) * z) / B
    np.testing.assert_array_equal(
        np.asarray(updates["w"], np.float32),
        -np.asarray(jnp.asarray(expected, jnp.float32).astype(jnp.bfloat16), np.float32),
    )


@pytest.mark.parametrize("engine", ["ghost", "fused"])
def test_engines_that_sum_in_the_parameters_dtype_refuse_bf16_parameters(tiny_config, engine):
    model = init_model(tiny_config, seed=0)
    graphdef, state = steps.init_state(model, optax.sgd(0.1))
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), state.params)
    plan = dp_plan(1.0, 1.0, 2, clipping="per_layer" if engine == "fused" else "flat")
    grad_step = steps.make_grad_step(plan, steps.Engine(engine), graphdef=graphdef)
    acc = steps.make_zero_accum(plan, steps.Engine(engine))(params)
    batch = {"tokens": jnp.zeros((2, 5), jnp.int32), "is_padding": jnp.zeros(2, bool)}
    with pytest.raises(ValueError, match="float32 trainable parameters"):
        grad_step(params, batch, None, acc, state.frozen)
