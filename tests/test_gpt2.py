import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdp.gpt2 import PRESETS, GPT2Config, init_model


def test_presets_have_published_sizes():
    n_params = {}
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        model = nnx.eval_shape(lambda name=name: init_model(GPT2Config.preset(name)))
        state = nnx.state(model, nnx.Param)
        n_params[name] = sum(x.size for x in jax.tree.leaves(state))
    # OpenAI's published counts (tied embeddings): 124M, 355M, 774M, 1558M.
    assert n_params["gpt2"] == 124_439_808
    assert n_params["gpt2-medium"] == 354_823_168
    assert n_params["gpt2-large"] == 774_030_080
    assert n_params["gpt2-xl"] == 1_557_611_200
    assert set(PRESETS) >= set(n_params)


def test_unknown_preset_and_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="Unknown GPT-2 preset"):
        GPT2Config.preset("gpt3")
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=30, n_head=4)


def test_forward_shapes_and_causality(tiny_config):
    model = init_model(tiny_config)
    x = jnp.array(np.random.default_rng(0).integers(0, 61, size=(2, 7)))
    logits = model(x)
    assert logits.shape == (2, 7, 61) and logits.dtype == jnp.float32
    # Changing a later token must not change earlier logits.
    y = x.at[:, 5].set((x[:, 5] + 1) % 61)
    np.testing.assert_array_equal(model(y)[:, :5], logits[:, :5])
    assert not np.allclose(model(y)[:, 5:], logits[:, 5:])


def test_too_long_sequence_is_an_error(tiny_config):
    model = init_model(tiny_config)
    with pytest.raises(ValueError, match="n_positions"):
        model(jnp.zeros((1, 12), jnp.int32))


def test_dropout_only_with_a_key(tiny_config):
    cfg = dataclasses.replace(tiny_config, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    model = init_model(cfg)
    x = jnp.arange(14).reshape(2, 7) % 61
    np.testing.assert_array_equal(model(x), model(x))
    a = model(x, dropout_key=jax.random.key(1))
    b = model(x, dropout_key=jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, model(x, dropout_key=jax.random.key(1)))


def test_model_is_vmappable_per_example(tiny_config):
    model = init_model(tiny_config)
    graphdef, params = nnx.split(model, nnx.Param)
    x = jnp.arange(21).reshape(3, 7) % 61

    def single(p, ids):
        return nnx.merge(graphdef, p)(ids[None])[0]

    batched = jax.vmap(single, in_axes=(None, 0))(params, x)
    np.testing.assert_allclose(batched, model(x), atol=1e-5)
