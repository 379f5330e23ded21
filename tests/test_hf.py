"""HF PyTorch -> jaxdp -> HF PyTorch round trip, compared numerically (fp32, offline)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp import hf
from jaxdp.gpt2 import GPT2Config, init_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def _random_hf_model(vocab_size=50257, n_positions=64, **kw):
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=48,
        n_head=3,
        n_layer=3,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **kw,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    # Default init leaves biases at zero and LayerNorms at identity; perturb every tensor so that
    # a parameter loaded into the wrong place cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.numpy()


@pytest.mark.parametrize("vocab_size", [50257, 61])
def test_hf_to_jax_to_hf_parity(tmp_path, vocab_size):
    pt_model = _random_hf_model(vocab_size=vocab_size)
    src = tmp_path / "src"
    pt_model.save_pretrained(src)
    ids = np.random.default_rng(0).integers(0, vocab_size, size=(2, 37))
    expected = _torch_logits(pt_model, ids)

    model = hf.from_pretrained(src)
    assert model.config.vocab_size == vocab_size and model.config.n_layer == 3
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=ATOL, rtol=0)

    out = hf.save_pretrained(model, tmp_path / "out")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    np.testing.assert_allclose(_torch_logits(reloaded, ids), expected, atol=ATOL, rtol=0)


def test_jax_random_init_exports_and_matches_torch(tmp_path, tiny_config):
    model = init_model(tiny_config, seed=3)
    out = hf.save_pretrained(model, tmp_path / "out")
    from safetensors.numpy import load_file

    assert "transformer.wte.weight" in load_file(out / "model.safetensors")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    pt = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = np.random.default_rng(1).integers(0, 61, size=(3, 11))
    np.testing.assert_allclose(
        _torch_logits(pt, ids), np.asarray(model(jnp.asarray(ids))), atol=ATOL, rtol=0
    )


def test_openai_style_checkpoint_without_prefix_and_with_buffers(tmp_path, tiny_config):
    model = init_model(tiny_config, seed=5)
    tensors = {k.removeprefix("transformer."): v for k, v in hf.state_dict(model).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 11, 11), np.float32))  # old mask buffer
    tensors["lm_head.weight"] = tensors["wte.weight"].copy()
    reloaded = hf.params_from_state_dict(tiny_config, tensors)
    ids = jnp.arange(7)[None] % 61
    np.testing.assert_array_equal(reloaded(ids), model(ids))


def test_pytorch_bin_checkpoint_loads_with_weights_only(tmp_path):
    pt_model = _random_hf_model(vocab_size=61)
    src = tmp_path / "bin"
    pt_model.save_pretrained(src)
    state = {k: v for k, v in pt_model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, src / "pytorch_model.bin")
    os.remove(src / "model.safetensors")
    ids = np.random.default_rng(2).integers(0, 61, size=(1, 9))
    np.testing.assert_allclose(
        np.asarray(hf.from_pretrained(src)(jnp.asarray(ids))),
        _torch_logits(pt_model, ids),
        atol=ATOL,
        rtol=0,
    )


def test_mismatched_checkpoint_is_an_error(tmp_path, tiny_config):
    tensors = hf.state_dict(init_model(tiny_config))
    bigger = GPT2Config(**{**tiny_config.__dict__, "n_embd": 33})
    with pytest.raises(ValueError, match="shape"):
        hf.params_from_state_dict(bigger, tensors)
    del tensors["transformer.ln_f.bias"]
    with pytest.raises(ValueError, match="ln_f.bias"):
        hf.params_from_state_dict(tiny_config, tensors)


def test_unreachable_hub_gives_one_clear_error(tmp_path):
    # HF_HUB_OFFLINE makes huggingface_hub refuse any request: no network is touched.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    code = (
        "from jaxdp import hf\n"
        "try:\n    hf.from_pretrained('gpt2')\n"
        "except hf.HubUnavailableError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR Could not get model 'gpt2'")
    assert "local directory" in out.stdout and "model.name_or_path" in out.stdout


def test_export_script_from_hf_dir(tmp_path, tokenizer_dir):
    pt_model = _random_hf_model(vocab_size=50257)
    src = tmp_path / "src"
    pt_model.save_pretrained(src)
    out = tmp_path / "exported"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "scripts", "export_to_pytorch.py"),
            "--from",
            str(src),
            "--out",
            str(out),
            "--tokenizer",
            str(tokenizer_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "tokenizer_config.json").is_file() and (out / "config.json").is_file()
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = np.random.default_rng(3).integers(0, 50257, size=(1, 13))
    np.testing.assert_allclose(
        _torch_logits(reloaded, ids), _torch_logits(pt_model, ids), atol=ATOL, rtol=0
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world")["input_ids"] == [15496, 995]
