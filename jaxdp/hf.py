"""Hugging Face <-> jaxdp: load GPT-2 weights and save a directory `transformers` can load.

Loading reads `config.json` plus `model.safetensors` (no torch needed) or, if only
`pytorch_model.bin` exists, loads it with `torch.load(weights_only=True)` (torch must be
installed). A model id that is not a local directory is fetched from the Hub with
`huggingface_hub.snapshot_download`; when the Hub cannot be reached, `HubUnavailableError` says
how to point at a local directory instead.

Saving writes `config.json` (with `tie_word_embeddings=True`) and `model.safetensors` holding the
`transformer.*` tensors only: the output layer is the token embedding, so the tie is kept and
`transformers.GPT2LMHeadModel.from_pretrained(dir)` re-ties it on load. No torch is needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxdp.gpt2 import GPT2Config, GPT2LMHeadModel

# Files fetched from the Hub for a model id; the tokenizer files are optional.
_HUB_PATTERNS = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "generation_config.json",
]
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_HF_PREFIX = "transformer."


class HubUnavailableError(OSError):
    """The Hugging Face Hub could not be reached (or the model id does not exist there)."""


def resolve_model_dir(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local directory for `name_or_path`, downloading from the Hub if it is not a directory."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass a Hugging Face model directory.")
    name = str(name_or_path)
    if looks_like_path(name):
        raise FileNotFoundError(f"Model directory not found: {path}")
    try:
        # huggingface_hub (the `hf` extra) is needed only to download from the Hub.
        from huggingface_hub import snapshot_download  # noqa: PLC0415 (the hf extra)

        return Path(snapshot_download(name, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # network errors, offline mode, unknown repo, auth, ...
        raise HubUnavailableError(
            f"Could not get model {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"If you are offline or the Hub is unreachable, download the model on a machine with "
            f"internet access (e.g. `hf download {name} config.json model.safetensors "
            f"--local-dir ./{name.split('/')[-1]}`) and pass the local directory instead, e.g. "
            f"`--config.model.name_or_path=/path/to/{name.split('/')[-1]}` or "
            f"`jaxdp.hf.from_pretrained('/path/to/dir')`. To train from scratch without any "
            f"download, use a preset name with `model.init=random`."
        ) from e


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id ("gpt2", "org/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name


def _hub_host() -> tuple[str, int]:
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return endpoint.hostname or "huggingface.co", endpoint.port or 443


def check_hub_access(**names: str | os.PathLike | None) -> None:
    """Fails at once, naming every setting that needs the Hub, when the Hub cannot be reached.

    `names` are settings such as model="gpt2", tokenizer="gpt2", dataset="wikitext"; those
    that are local paths (or None) need no Hub. With HF_HUB_OFFLINE=1 nothing is probed: the
    libraries then use the Hugging Face cache and fail fast if a file is not in it. Without this
    check an offline run spends a minute in retries before the first error, and reveals the
    next missing resource only on the next attempt."""
    remote = {
        k: str(v)
        for k, v in names.items()
        if v is not None and not Path(v).expanduser().exists() and not looks_like_path(str(v))
    }
    if not remote or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    host, port = _hub_host()
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        needed = ", ".join(f"{k}={v!r}" for k, v in remote.items())
        raise HubUnavailableError(
            f"The Hugging Face Hub ({host}) cannot be reached ({e}), and these settings need it: "
            f"{needed}. Point them at local directories (for the offline quickstart: "
            f"configs/tiny_offline.py), or set HF_HUB_OFFLINE=1 to use copies already in your "
            f"Hugging Face cache."
        ) from None


def load_hf_config(model_dir: str | os.PathLike) -> GPT2Config:
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"No config.json in {model_dir}; is it a Hugging Face model dir?")
    return GPT2Config.from_hf_dict(json.loads(config_path.read_text()))


def _read_state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF checkpoint directory as NumPy arrays, keyed by their HF names."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file() or index.is_file():
        if single.is_file():
            return load_file(single)
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(load_file(model_dir / shard))
        return tensors
    bin_path = model_dir / "pytorch_model.bin"
    if bin_path.is_file():
        try:
            import torch  # noqa: PLC0415 (optional: a .bin checkpoint)
        except ImportError as e:
            raise ImportError(
                f"{bin_path} is a PyTorch pickle; install torch to read it, or convert it to "
                f"model.safetensors."
            ) from e
        # weights_only=True never executes pickled code.
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
        return {k: v.to(torch.float32).numpy() for k, v in state.items()}
    raise FileNotFoundError(f"No model.safetensors (or pytorch_model.bin) in {model_dir}.")


def hf_key(path: Iterable[Any]) -> str:
    """`('h', 0, 'attn', 'c_attn', 'kernel')` -> `'transformer.h.0.attn.c_attn.weight'`."""
    *mods, leaf = (str(p) for p in path)
    return _HF_PREFIX + ".".join([*mods, _LEAF_TO_HF[leaf]])


def _abstract_model(config: GPT2Config) -> GPT2LMHeadModel:
    return nnx.eval_shape(lambda: GPT2LMHeadModel(config, rngs=nnx.Rngs(0)))


def params_from_state_dict(
    config: GPT2Config, state_dict: Mapping[str, np.ndarray], *, dtype: Any = jnp.float32
) -> GPT2LMHeadModel:
    """Builds a model from HF tensors (keys with or without the `transformer.` prefix)."""
    tensors = {
        (k if k.startswith(_HF_PREFIX) else _HF_PREFIX + k): v for k, v in state_dict.items()
    }
    graphdef, state = nnx.split(_abstract_model(config))
    loaded = []
    for path, var in nnx.to_flat_state(state):
        key = hf_key(path)
        if key not in tensors:
            raise ValueError(f"Checkpoint has no tensor {key!r}: not a GPT-2 of this config?")
        value = np.asarray(tensors.pop(key))
        if value.shape != var.get_value().shape:
            raise ValueError(
                f"{key}: checkpoint shape {value.shape} != model shape {var.get_value().shape}."
            )
        loaded.append((path, var.replace(jnp.asarray(value, dtype=dtype))))
    # What is left may only be the tied output layer and old checkpoints' attention-mask buffers.
    lm_head = tensors.pop(_HF_PREFIX + "lm_head.weight", None)
    if lm_head is not None:
        wte = next(v.get_value() for p, v in loaded if hf_key(p) == _HF_PREFIX + "wte.weight")
        if not np.array_equal(np.asarray(lm_head, np.float32), np.asarray(wte, np.float32)):
            raise NotImplementedError(
                "lm_head.weight differs from wte.weight: untied output layers are not supported."
            )
    unexpected = [k for k in tensors if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if unexpected:
        raise ValueError(f"Checkpoint has unexpected tensors, e.g. {unexpected[:3]}.")
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    revision: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    config: GPT2Config | None = None,
) -> GPT2LMHeadModel:
    """Loads a GPT-2 from a local HF directory or a Hub model id (e.g. `"gpt2"`).

    `config_overrides` replaces config fields that do not change parameter shapes, such as
    dropout rates (`{"resid_pdrop": 0.0}`); `config` replaces the directory's config.json (it
    must describe the same shapes).
    """
    model_dir = resolve_model_dir(name_or_path, revision=revision)
    config = load_hf_config(model_dir) if config is None else config
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    return params_from_state_dict(config, _read_state_dict(model_dir), dtype=dtype)


def state_dict(model: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    """The model's tensors under HF `GPT2LMHeadModel` names (fp32, without the tied lm_head)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {
        hf_key(path): np.asarray(jax.device_get(var.get_value()), dtype=np.float32)
        for path, var in flat
    }


def save_pretrained(
    model: GPT2LMHeadModel,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes a directory that `transformers.GPT2LMHeadModel.from_pretrained` loads.

    Contents: `config.json`, `model.safetensors` (tied: no separate lm_head tensor) and, if a
    tokenizer is given, its files (`tokenizer.save_pretrained`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = model.config.to_hf_dict()
    hf_config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    weights = out / "model.safetensors"
    save_file(state_dict(model), weights, metadata={"format": "pt", **(metadata or {})})
    set_default_mode(weights)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def set_default_mode(path: Path) -> None:
    """safetensors creates files readable by their owner only (0600): give them the mode any
    other new file gets (0666 less the umask), like config.json beside them."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
