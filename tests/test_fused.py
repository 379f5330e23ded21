"""The fused per-layer engine against a brute-force per-example reference (fp32, <= 1e-5)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdp import clipping, fused, lora, steps
from jaxdp.clipping import ROUNDING_MARGIN
from jaxdp.gpt2 import Tape, init_model
from jaxdp.loss import example_loss
from jaxdp.params import merge, path_name

RTOL = 1e-5


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _flat(tree) -> dict[str, np.ndarray]:
    return {path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


def _random_thresholds(names, C, seed=0):
    """Unequal per-group thresholds with sensitivity exactly C."""
    rng = np.random.default_rng(seed)
    th = fused.default_thresholds(C, names) * jnp.asarray(rng.uniform(0.3, 2.0, len(names)))
    return (th * C / fused.sensitivity(th, names)).astype(jnp.float32)


class _UntiedHead(Tape):
    """The reference model's output layer uses its own copy of wte, so that per-example
    gradients of the input side (wte) and the output side (the copy) come apart."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def __call__(self, name, layer, x):
        if name == "lm_head":
            return jnp.einsum("btd,vd->btv", x, self.head)
        return layer(x)


def _reference(graphdef, params, frozen, tokens, pad, thresholds, names):
    """sum_i sum_k c_ik g_ik from vmap(grad) per-example gradients, the tied embedding's two
    sides clipped apart (as the fused engine's groups are)."""

    def loss(p, head, t):
        model = merge(graphdef, p, frozen)
        return example_loss(model(t[None], tape=_UntiedHead(head)), t[None], None)[0]

    head = merge(graphdef, params, frozen).wte.embedding.get_value()
    g, g_head = jax.vmap(jax.grad(loss, (0, 1)), (None, None, 0))(params, head, tokens)
    th = {n: float(thresholds[k]) for k, n in enumerate(names)}
    real = ~np.asarray(pad)

    def clip(x, c):
        x = np.asarray(x, np.float64)
        n = np.sqrt((x.reshape(len(x), -1) ** 2).sum(1))
        return np.einsum("b...,b->...", x, np.minimum(1.0, c * (1 - ROUNDING_MARGIN) / n) * real)

    out = {}
    for name, x in _flat(g).items():
        if name == fused.WTE:
            out[name] = clip(x, th[fused.WTE_IN]) + clip(g_head, th[fused.WTE_OUT])
        else:
            out[name] = clip(x, th[name])
    return out


def _batch(config, B=6, T=9, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(B, T))
    tokens[0, 5] = tokens[0, 2]  # a repeated token: the embedding rows overlap
    pad = np.zeros(B, bool)
    pad[-1] = True
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(pad)


@pytest.mark.parametrize("microbatch", [None, 2])
def test_fused_sums_equal_the_per_example_reference(tiny_config, microbatch):
    config = dataclasses.replace(tiny_config, vocab_size=71)
    graphdef, state = steps.init_state(init_model(config, seed=1), optax.sgd(0.1))
    params, frozen = state.params, state.frozen
    tokens, pad = _batch(config)
    names = fused.groups(params)
    assert fused.WTE_IN in names and fused.WTE_OUT in names
    C = 0.05  # small: most groups of most examples are clipped
    th = _random_thresholds(names, C)
    fn = jax.jit(
        fused.fused_clipped_grad(
            graphdef, C, microbatch_size=microbatch, frozen=frozen, chunk_bytes=4096
        )
    )
    summed, stats = fn(params, {"tokens": tokens}, pad, None, None, th)
    ref = _reference(graphdef, params, frozen, tokens, pad, th, names)
    got = _flat(summed)
    assert set(got) == set(ref)
    for name in ref:
        assert _rel(got[name], ref[name]) <= RTOL, name
    assert float(stats.num_examples) == 5
    assert float(stats.num_clipped) == 5  # every example has some group above its threshold


@pytest.mark.parametrize("trainable", ["lora", "last_block"])
def test_fused_equals_vmap_per_layer_when_nothing_is_tied(tiny_config, trainable):
    """LoRA adapters or a few trainable tensors: the fused groups are the tensors, exactly the
    vmap engine's per-layer clipping with the same thresholds."""
    config = dataclasses.replace(tiny_config, vocab_size=71)
    model = init_model(config, seed=2)
    if trainable == "lora":
        lora.apply_lora(model, rank=2, alpha=4.0)
        patterns = (lora.LORA_PATTERN,)
    else:
        patterns = (r"h\.1\..*", r"ln_f\..*")
    graphdef, state = steps.init_state(model, optax.sgd(0.1), patterns)
    params, frozen = state.params, state.frozen
    if trainable == "lora":  # non-zero B, so that A's gradients are not all zero
        params = jax.tree.map(lambda x: x + 0.05, params)
    tokens, pad = _batch(config, seed=3)
    names = fused.groups(params)
    assert fused.WTE_IN not in names
    C = 0.02
    th = _random_thresholds(names, C, seed=4)
    fn = jax.jit(fused.fused_clipped_grad(graphdef, C, frozen=frozen))
    summed, stats = fn(params, {"tokens": tokens}, pad, None, None, th)

    def loss(p, example, key):
        model = merge(graphdef, p, frozen)
        return example_loss(model(example["tokens"][None]), example["tokens"][None], None)[0]

    ref_fn = clipping.clipped_grad(loss, C, clipping="per_layer")
    ref, ref_stats = jax.jit(ref_fn)(params, {"tokens": tokens}, pad, None, None, th)
    got, want = _flat(summed), _flat(ref)
    for name in want:
        assert _rel(got[name], want[name]) <= RTOL, name
    assert float(stats.num_clipped) == float(ref_stats.num_clipped)
    np.testing.assert_allclose(stats.group_sq_norms, ref_stats.group_sq_norms, rtol=1e-4)
    np.testing.assert_array_equal(stats.below, ref_stats.below)


def test_every_example_contributes_at_most_C(tiny_config):
    """Adversarially large gradients (huge logits scale), unequal thresholds: each example's
    contribution alone (all other rows padding) has norm <= S(thresholds) = C."""
    config = dataclasses.replace(tiny_config, vocab_size=71)
    graphdef, state = steps.init_state(init_model(config, seed=5), optax.sgd(0.1))
    params = jax.tree.map(lambda x: x * 30.0, state.params)  # exploding activations
    tokens, _ = _batch(config, B=4, seed=6)
    names = fused.groups(params)
    C = 0.5
    th = _random_thresholds(names, C, seed=7)
    fn = jax.jit(fused.fused_clipped_grad(graphdef, C, frozen=state.frozen))
    for i in range(4):
        pad = jnp.arange(4) != i
        summed, stats = fn(params, {"tokens": tokens}, pad, None, None, th)
        assert float(stats.num_nonfinite) == 0 and float(stats.num_clipped) == 1
        norm = np.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(summed)))
        assert 0.2 * C < norm <= C * (1 + 1e-5)


def test_sensitivity_counts_the_tied_embedding_twice():
    names = ["a", fused.WTE_IN, fused.WTE_OUT]
    th = jnp.asarray([3.0, 1.0, 2.0])
    assert float(fused.sensitivity(th, names)) == pytest.approx(np.sqrt(9 + 9))  # (1 + 2)^2
    d = fused.default_thresholds(1.0, names)
    assert 1.0 - 2e-6 <= float(fused.sensitivity(d, names)) <= 1.0


def test_fused_refuses_units_of_several_rows(tiny_config):
    graphdef, state = steps.init_state(init_model(tiny_config, seed=0), optax.sgd(0.1))
    tokens = jnp.zeros((4, 5), jnp.int32)
    fn = fused.fused_clipped_grad(graphdef, 1.0, frozen=state.frozen)
    with pytest.raises(NotImplementedError, match="one row per unit"):
        fn(state.params, {"tokens": tokens}, jnp.zeros(4, bool), None, jnp.zeros(4, jnp.int32))
