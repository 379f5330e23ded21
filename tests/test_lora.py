"""Trainable subsets and LoRA: counts, frozen parameters untouched, merged export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dp_plan, load_config, small
from flax import nnx

from jaxdp import builders, hf, lora, steps
from jaxdp import run as run_lib
from jaxdp.config import to_settings
from jaxdp.gpt2 import init_model
from jaxdp.loss import model_example_loss
from jaxdp.params import path_name, trainable_filter


def _flat(state):
    return {path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_lora_parameter_count_and_identity_at_init(tiny_config):
    model = init_model(tiny_config, seed=0)
    ids = jnp.arange(14).reshape(2, 7) % 61
    before = model(ids)
    r, d, L = 4, tiny_config.n_embd, tiny_config.n_layer
    lora.apply_lora(model, rank=r, alpha=8.0)
    _, adapters, _ = nnx.split(model, trainable_filter([lora.LORA_PATTERN]), ...)
    # c_attn: d -> 3d, c_proj: d -> d; each adapter has r * (in + out) parameters.
    assert sum(x.size for x in jax.tree.leaves(adapters)) == L * r * ((d + 3 * d) + (d + d))
    np.testing.assert_array_equal(model(ids), before)  # B = 0: the adapted model starts as base
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.apply_lora(model, rank=r, alpha=8.0)


def test_merged_export_equals_adapted_model(tmp_path, tiny_config):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = lora.apply_lora(
        init_model(tiny_config, seed=1), rank=3, alpha=6.0, targets=("attn.c_attn", "mlp.c_fc")
    )
    rng = np.random.default_rng(0)
    for block in model.h:  # non-zero adapters, as after training
        for layer in (block.attn.c_attn, block.mlp.c_fc):
            layer.lora_b.set_value(jnp.asarray(rng.normal(size=layer.lora_b.get_value().shape)))
    ids = jnp.asarray(rng.integers(0, 61, size=(2, 9)))
    adapted = np.asarray(model(ids))
    merged = lora.merge_lora(model)
    assert not lora.has_lora(merged) and lora.has_lora(model)
    np.testing.assert_allclose(np.asarray(merged(ids)), adapted, atol=1e-5, rtol=0)
    out = hf.save_pretrained(merged, tmp_path / "hf")
    pt = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        logits = pt(torch.from_numpy(np.asarray(ids))).logits.numpy()
    np.testing.assert_allclose(logits, adapted, atol=1e-4, rtol=0)


def test_trainable_filter_selects_by_full_path(tiny_config):
    model = init_model(tiny_config)
    _, params, frozen = nnx.split(model, trainable_filter([r"h\.1\..*", r"ln_f\..*"]), ...)
    names = set(_flat(params))
    assert names and all(n.startswith(("h.1.", "ln_f.")) for n in names)
    assert "h.0.ln_1.scale" in _flat(frozen) and "wte.embedding" in _flat(frozen)
    with pytest.raises(ValueError, match="No parameter matches"):
        steps.init_state(model, optax.sgd(0.1), trainable=["nothing"])


@pytest.mark.parametrize("use_lora", [False, True])
def test_frozen_parameters_are_bit_identical_after_dp_training(tmp_path, use_lora):
    cfg = small(load_config("tiny_offline"), num_steps=2)
    cfg.optim.learning_rate = 0.1
    if use_lora:
        cfg.model.lora_rank = 2
    else:
        cfg.model.trainable = (r"h\.1\..*",)
    run_lib.run(to_settings(cfg), tmp_path)
    from jaxdp import checkpoint

    mngr = checkpoint.manager(tmp_path)
    meta = checkpoint.read_meta(mngr, mngr.latest_step())
    assert meta["trainable"] == ([lora.LORA_PATTERN] if use_lora else [r"h\.1\..*"])
    # The initial model, rebuilt the way the run built it.
    model_config = builders.model_configuration(to_settings(cfg).model)
    initial = builders.build_model(to_settings(cfg).model, model_config, seed=cfg.train.seed)
    _, init_params, init_frozen = nnx.split(
        initial, trainable_filter(builders.trainable_patterns(to_settings(cfg).model)), ...
    )
    import orbax.checkpoint as ocp

    restored = mngr.restore(
        mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.PyTreeRestore())
    )["state"]
    final_frozen = jax.tree.map(np.asarray, restored["frozen"])
    flat_final = {
        ".".join(str(k.key if hasattr(k, "key") else k) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(final_frozen)[0]
    }
    flat_init = _flat(init_frozen)
    assert len(flat_final) == len(flat_init) > 0
    for name, value in flat_init.items():
        match = [v for k, v in flat_final.items() if k.startswith(name)]
        assert len(match) == 1, name
        np.testing.assert_array_equal(match[0], value, err_msg=name)
    # The trainable ones did move (the test can fail).
    flat_params = jax.tree_util.tree_flatten_with_path(restored["params"])[0]
    moved = [
        not np.array_equal(np.asarray(v), iv)
        for (_, v), iv in zip(flat_params, _flat(init_params).values(), strict=True)
    ]
    assert any(moved)
    model, _ = checkpoint.load_model_from_workdir(tmp_path)
    assert not lora.has_lora(model)


def test_ghost_engine_with_a_trainable_subset_equals_vmap(tiny_config):
    model = init_model(tiny_config, seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, size=(4, 7)), jnp.int32)
    batch = {"tokens": tokens, "is_padding": jnp.array([False, True, False, False])}
    results = {}
    for engine in ("vmap", "ghost"):
        dp, eng = dp_plan(0.05, 0.0, 3), steps.Engine(engine)
        graphdef, state = steps.init_state(model, optax.sgd(1.0), trainable=[r"h\.0\..*", "wte.*"])
        acc = jax.jit(steps.make_grad_step(dp, eng, graphdef=graphdef))(
            state.params, batch, None, steps.zero_accum(state.params), state.frozen
        )
        results[engine] = acc
    for a, b in zip(
        jax.tree.leaves(results["ghost"].grad_sum),
        jax.tree.leaves(results["vmap"].grad_sum),
        strict=True,
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
    assert float(results["ghost"].stats.num_clipped) == float(results["vmap"].stats.num_clipped)


def test_ghost_engine_with_lora_equals_vmap(tiny_config):
    """LoRA adapters (and a fully trained layer beside them) in the ghost engine. With T = 7,
    d = 30, rank 2, "auto" instantiates lora_a's gradient (2 T^2 >= 30 x 2) and takes Gram
    matrices for lora_b (2 T^2 < 2 x 90) and the dense kernel."""
    from jaxdp.ghost import dense_strategy

    T, d, r = 7, tiny_config.n_embd, 2
    assert dense_strategy(T, d, r) == "instantiate"
    assert dense_strategy(T, r, 3 * d) == "ghost" and dense_strategy(T, d, d) == "ghost"
    from jaxdp import clipping, ghost

    model = lora.apply_lora(init_model(tiny_config, seed=1), 2, 4.0)
    rng = np.random.default_rng(3)
    for block in model.h:  # lora_b starts at zero, which would make lora_a's gradient zero
        for layer in (block.attn.c_attn, block.attn.c_proj):
            layer.lora_b.set_value(jnp.asarray(rng.normal(size=layer.lora_b.get_value().shape)))
    trainable = [lora.LORA_PATTERN, r"h\.1\.attn\.c_proj\.kernel", r"ln_f\..*"]
    graphdef, state = steps.init_state(model, optax.sgd(1.0), trainable=trainable)
    assert any("lora_a" in path_name(p) for p, _ in nnx.to_flat_state(state.params))
    tokens = jnp.asarray(rng.integers(0, 61, size=(4, 7)), jnp.int32)
    is_padding = jnp.array([False, True, False, False])
    loss = model_example_loss(graphdef, state.frozen)
    ref, ref_stats = jax.jit(clipping.clipped_grad(loss, 0.05))(
        state.params, {"tokens": tokens}, is_padding
    )
    fn = ghost.ghost_clipped_grad(graphdef, 0.05, frozen=state.frozen)
    got, stats = jax.jit(fn)(state.params, {"tokens": tokens}, is_padding)
    assert float(ref_stats.num_clipped) > 0
    assert float(stats.num_clipped) == float(ref_stats.num_clipped)
    np.testing.assert_allclose(float(stats.norm_sum), float(ref_stats.norm_sum), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(b) > 0
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


def test_peft_adapter_directory_loads_in_peft(tmp_path, tiny_config):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = init_model(tiny_config, seed=2)
    hf.save_pretrained(base, tmp_path / "base")
    model = lora.apply_lora(nnx.clone(base), rank=3, alpha=6.0)
    rng = np.random.default_rng(1)
    for block in model.h:
        for layer in (block.attn.c_attn, block.attn.c_proj):
            layer.lora_b.set_value(jnp.asarray(rng.normal(size=layer.lora_b.get_value().shape)))
    lora.save_peft_adapter(model, tmp_path / "peft", base_model_name_or_path=str(tmp_path / "base"))
    pt_base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    pt = peft.PeftModel.from_pretrained(pt_base, tmp_path / "peft").eval()
    ids = rng.integers(0, 61, size=(2, 9))
    with torch.no_grad():
        logits = pt(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits, np.asarray(model(jnp.asarray(ids))), atol=1e-4, rtol=0)
    # Only the attention layers were adapted (mlp.c_proj shares the name c_proj).
    n_lora = sum(p.numel() for n, p in pt.named_parameters() if "lora_" in n)
    d, L = tiny_config.n_embd, tiny_config.n_layer
    assert n_lora == L * 3 * ((d + 3 * d) + (d + d))


def test_lora_run_on_a_pretrained_base_exports_merged_and_peft(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from jaxdp.gpt2 import GPT2Config

    base_dir = hf.save_pretrained(init_model(GPT2Config.preset("tiny"), seed=4), tmp_path / "base")
    cfg = small(load_config("tiny_offline"), num_steps=2)
    relative = os.path.relpath(base_dir)  # as a user types it
    cfg.model.init, cfg.model.name_or_path = "pretrained", relative
    cfg.model.lora_rank = 2
    cfg.dp.engine = "ghost"  # LoRA through the ghost engine (vmap: the frozen-parameter test)
    cfg.optim.learning_rate = 0.05
    run_lib.run(to_settings(cfg), tmp_path / "run")
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "hf").eval()
    adapted = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(base_dir), tmp_path / "run" / "peft"
    ).eval()
    base = transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 50257, size=(1, 16)))
    with torch.no_grad():
        a, b, c = merged(ids).logits, adapted(ids).logits, base(ids).logits
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4, rtol=0)
    assert not np.allclose(a.numpy(), c.numpy(), atol=1e-4)  # training moved the adapters
    # The adapter names its base by an absolute path: it loads from any working directory.
    adapter_config = json.loads((tmp_path / "run" / "peft" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir.resolve())
