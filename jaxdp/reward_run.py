"""Training a DP reward model from a config file (`jaxdp train-reward`; see `jaxdp.reward`).

Outputs in the workdir W:

    W/reward_model/model.safetensors, config.json   the reward model (head w; LoRA adapters)
    W/privacy.json    the guarantee, per preference tuple (`PrivacyPlan.record`)
    W/report.json     held-out preference accuracy, epsilon, delta, sizes (public)
    W/report.png      held-out accuracy and epsilon against steps (public)
    W/metrics.jsonl   public per-step records (epsilon, held-out accuracy)
    W/private/        noise-free training loss (NOT covered by epsilon)

The randomness of sampling and noise is secret (`Secrets.generate`: the operating system's
entropy, never written out) unless `dp.noise_seed` is set for a reproducible test (labelled).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxdp import data, hf, lora, reward
from jaxdp.config import _optional
from jaxdp.gpt2 import GPT2Config, init_model
from jaxdp.params import path_name, split
from jaxdp.private import make_private
from jaxdp.randomness import Secrets
from jaxdp.release import REWARD_REPORT_FIELDS, RunRelease, mechanism_record
from jaxdp.tracking import JsonlLog, Progress
from jaxdp.workdir import Workdir

log = logging.getLogger("jaxdp")
UNIT = "preference tuple (prompt, chosen response, rejected response)"


class ConfigError(ValueError):
    """A reward config that cannot work."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = "openai-community/gpt2"  # HF id, local dir, or a preset (init=random)
    c.model.init = "pretrained"  # "pretrained" | "random"
    c.model.seed = 0  # public: a random base's weights, LoRA's initialisation
    c.model.lora_rank = 0  # > 0: a LoRA reward model (adapters on attn.c_attn, attn.c_proj)
    c.model.lora_alpha = 16.0
    c.data = ml_collections.ConfigDict()
    # "synthetic" (known reward, offline), a JSONL file, or a Hugging Face dataset id
    c.data.source = "Anthropic/hh-rlhf"
    c.data.eval_source = _optional(str)  # None: the source's eval_split (Hub) / none
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.max_train = _optional(int)  # use the first k training tuples
    c.data.max_eval = _optional(int, 1000)
    c.data.num_synthetic = 4000  # synthetic: training tuples (and a quarter as many held out)
    c.data.tokenizer = "openai-community/gpt2"
    c.data.max_length = 256  # tokens of prompt + response (the last ones kept)
    c.dp = ml_collections.ConfigDict()
    c.dp.target_epsilon = 8.0
    c.dp.target_delta = _optional(float)  # None: 1 / (10 N)
    c.dp.expected_batch_size = 256.0
    c.dp.l2_clip_norm = 2.0  # >= 2 never clips the linear head (its gradients have norm <= 2)
    c.dp.noise_seed = _optional(int)  # None: secret (OS entropy); set only for tests
    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 0.3  # Adam; the head needs a large norm: features are close together
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 200
    c.train.eval_every = 50
    c.train.progress = True
    return c


def _check(cfg) -> None:
    if cfg.model.init not in ("pretrained", "random"):
        raise ConfigError(f"model.init must be 'pretrained' or 'random', got {cfg.model.init!r}.")
    if cfg.model.lora_rank < 0:
        raise ConfigError(f"model.lora_rank must be >= 0, got {cfg.model.lora_rank}.")
    if cfg.data.max_length < 2:
        raise ConfigError(f"data.max_length must be >= 2, got {cfg.data.max_length}.")
    if cfg.train.num_steps < 1 or cfg.train.eval_every < 1:
        raise ConfigError("train.num_steps and train.eval_every must be >= 1.")


def load_base(cfg):
    """The frozen base GPT-2 (plus LoRA adapters when asked): (graphdef, trainable, frozen)."""
    m = cfg.model
    if m.init == "random":
        model = init_model(GPT2Config.preset(m.name_or_path, resid_pdrop=0.0, embd_pdrop=0.0,
                                             attn_pdrop=0.0), seed=m.seed)  # fmt: skip
    else:
        model = hf.from_pretrained(m.name_or_path)
    if m.lora_rank:
        lora.apply_lora(model, m.lora_rank, m.lora_alpha, seed=m.seed)
        return split(model, (lora.LORA_PATTERN,))
    graphdef, params, _ = split(model, ())
    return graphdef, None, params  # everything frozen: the base is only a feature map


def load_data(cfg) -> tuple[list[reward.Preference], list[reward.Preference]]:
    d = cfg.data
    if d.source == "synthetic":
        n = d.num_synthetic
        train = reward.synthetic_preferences(n, seed=1)[: d.max_train]
        return train, reward.synthetic_preferences(max(1, n // 4), seed=2)
    train = reward.load_preferences(d.source, split=d.train_split, limit=d.max_train)
    eval_source = d.eval_source or (None if Path(d.source).expanduser().is_file() else d.source)
    held_out = (
        reward.load_preferences(eval_source, split=d.eval_split, limit=d.max_eval)
        if eval_source
        else []
    )
    return train, held_out


def run(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains the reward model of `cfg` into `workdir`; returns report.json's contents."""
    _check(cfg)
    wd = Path(workdir)
    if (wd / "reward_model").exists():
        raise ConfigError(f"{wd} already holds a reward model; use a new --workdir.")
    (wd / "private").mkdir(parents=True, exist_ok=True)
    train_prefs, eval_prefs = load_data(cfg)
    if len(train_prefs) < 2:
        raise ConfigError(f"{len(train_prefs)} training tuples: too few to train on.")
    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    graphdef, adapters, frozen = load_base(cfg)
    log.info("%d training and %d held-out preference tuples", len(train_prefs), len(eval_prefs))
    train = reward.encode_pairs(tokenizer, train_prefs, cfg.data.max_length)
    held = reward.encode_pairs(tokenizer, eval_prefs, cfg.data.max_length) if eval_prefs else None
    base_params = frozen if adapters is None else (adapters, frozen)
    dim = reward.merged(graphdef, base_params).config.n_embd

    secrets = (
        Secrets.generate() if cfg.dp.noise_seed is None else Secrets.from_seed(cfg.dp.noise_seed)
    )
    common = dict(
        num_examples=len(train_prefs),
        expected_batch_size=cfg.dp.expected_batch_size,
        steps=cfg.train.num_steps,
        l2_clip_norm=cfg.dp.l2_clip_norm,
        target_epsilon=cfg.dp.target_epsilon,
        target_delta=cfg.dp.target_delta,
        secrets=secrets,
    )
    opt = optax.adam(cfg.optim.learning_rate)
    try:
        if adapters is None:  # the linear head on precomputed features of the frozen base
            feats = {
                f"phi_{s}": reward.compute_features(
                    graphdef, base_params, train[side], train[f"{side}_last"]
                )
                for s, side in (("w", "chosen"), ("l", "rejected"))
            }
            private = make_private(reward.linear_example_loss, {"w": jnp.zeros(dim)}, opt, **common)
            train_data = feats
        else:
            loss = reward.lora_example_loss(graphdef, frozen)
            private = make_private(
                loss, {"lora": adapters, "w": jnp.zeros(dim)}, opt, microbatch_size=8, **common
            )
            train_data = train
    except ValueError as e:
        raise ConfigError(str(e)) from e
    plan = private.plan
    log.info(
        "DP reward model: %s; q=%.4g, sigma=%.4g, C=%g, %d steps, target epsilon %g",
        plan.describe(),
        plan.sampling_prob,
        plan.noise_multiplier,
        plan.l2_clip_norm,
        plan.num_steps,
        cfg.dp.target_epsilon,
    )

    def held_out_accuracy(state) -> float | None:
        if held is None:
            return None
        p = state.params
        fp = base_params if adapters is None else (p["lora"], frozen)
        phi_w = reward.compute_features(graphdef, fp, held["chosen"], held["chosen_last"])
        phi_l = reward.compute_features(graphdef, fp, held["rejected"], held["rejected_last"])
        return reward.accuracy(np.asarray(p["w"]), phi_w, phi_l)

    # Everything outside private/ goes through the release boundary (`jaxdp.release`).
    release = RunRelease(Workdir(wd), tensorboard=False)
    private_log = JsonlLog(wd / "private" / "metrics.jsonl")
    state = private.initial_state
    progress = Progress(cfg.train.progress, 0, plan.num_steps)
    history = []
    with progress.logging_above():
        for t in range(plan.num_steps):
            state, metrics = private.step(state, t, train_data)
            done = t + 1
            record: dict[str, Any] = {"step": done, "epsilon": plan.epsilon(done)}
            if done % cfg.train.eval_every == 0 or done == plan.num_steps:
                record["heldout_accuracy"] = held_out_accuracy(state)
                history.append(record)
            release.metrics(done, {k: v for k, v in record.items() if k != "step"})
            private_log.append({"step": done, "train_loss": float(metrics["train_loss"])})
            progress.update(eps=f"{record['epsilon']:.3g}")
    progress.close()

    privacy = mechanism_record(plan, randomness=secrets.label)
    privacy |= {
        "privacy_unit": UNIT,
        "epsilon_per": "preference tuple",
        "per_example_gradient_bound": 2.0 if adapters is None else None,
        "covers": "the reward model (head and adapters), report.json, report.png, "
        "metrics.jsonl, and every policy computed from the reward model and public inputs "
        "(best-of-N, Gibbs): post-processing",
    }
    release.privacy(privacy)
    save_reward_model(wd / "reward_model", state.params, cfg, dim)
    accuracy = history[-1].get("heldout_accuracy") if history else None
    report = {
        "heldout_accuracy": accuracy,
        "epsilon": privacy["epsilon"],
        "delta": privacy["delta"],
        "steps": plan.num_steps,
        "num_train": len(train_prefs),
        "num_heldout": len(eval_prefs),
        "noise_multiplier": plan.noise_multiplier,
        "expected_batch_size": plan.expected_batch_size,
        "lora_rank": cfg.model.lora_rank,
    }
    release.json("report.json", report, REWARD_REPORT_FIELDS)
    _plot(history, wd / "report.png", report)  # a rendering of report.json and metrics
    release.finish()
    return report


def save_reward_model(out: Path, params, cfg, dim: int) -> None:
    """model.safetensors (w [D], LoRA adapters by path) + config.json (how to rebuild phi)."""
    out.mkdir(parents=True)
    tensors = {"w": np.asarray(params["w"], np.float32)}
    if "lora" in params:
        for p, v in nnx.to_flat_state(params["lora"]):
            tensors[f"lora.{path_name(p)}"] = np.asarray(v.get_value(), np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    meta = {
        "base_model": cfg.model.name_or_path,
        "init": cfg.model.init,
        "seed": cfg.model.seed,
        "lora_rank": cfg.model.lora_rank,
        "lora_alpha": cfg.model.lora_alpha,
        "tokenizer": cfg.data.tokenizer,
        "max_length": cfg.data.max_length,
        "feature": "L2-normalised ln_f output at the last real token of prompt + response",
        "reward": "w . feature",
        "dim": dim,
    }
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


class RewardModel:
    """A saved reward model, ready to score (prompt, response) pairs."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.meta = json.loads((directory / "config.json").read_text())
        tensors = load_file(str(directory / "model.safetensors"))
        cfg = default_config()
        cfg.model.name_or_path = self.meta["base_model"]
        cfg.model.init = self.meta["init"]
        cfg.model.seed = self.meta["seed"]
        cfg.model.lora_rank = self.meta["lora_rank"]
        cfg.model.lora_alpha = self.meta["lora_alpha"]
        self.graphdef, adapters, self.frozen = load_base(cfg)
        if adapters is not None:
            adapters = nnx.from_flat_state(
                [
                    (p, v.replace(jnp.asarray(tensors[f"lora.{path_name(p)}"])))
                    for p, v in nnx.to_flat_state(adapters)
                ]
            )
        self.params = self.frozen if adapters is None else (adapters, self.frozen)
        self.w = tensors["w"]
        self.tokenizer = data.load_tokenizer(self.meta["tokenizer"])

    def model(self):
        return reward.merged(self.graphdef, self.params)

    def __call__(self, prompt: str, responses: list[str]) -> np.ndarray:
        """Rewards of `responses` to `prompt` [len(responses)]."""
        enc = [reward.encode(self.tokenizer, prompt, r, self.meta["max_length"]) for r in responses]
        tokens = np.stack([t for t, _ in enc])
        last = np.asarray([i for _, i in enc], np.int32)
        phi = reward.compute_features(self.graphdef, self.params, tokens, last)
        return phi @ self.w


def _plot(history: list[dict], out: Path, report: dict) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415 (the train extra)

    fig = Figure(figsize=(10, 4))
    ax_acc, ax_eps = fig.subplots(1, 2)
    steps = [r["step"] for r in history if r.get("heldout_accuracy") is not None]
    if steps:
        ax_acc.plot(steps, [r["heldout_accuracy"] for r in history if r["step"] in steps], "o-")
        ax_acc.axhline(0.5, color="gray", ls="--", label="chance")
        ax_acc.legend()
    else:
        ax_acc.text(0.5, 0.5, "no held-out data", ha="center", va="center")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("held-out preference accuracy")
    ax_acc.grid(alpha=0.3)
    ax_eps.plot([r["step"] for r in history], [r["epsilon"] for r in history], color="tab:red")
    ax_eps.set_xlabel("step")
    ax_eps.set_ylabel(f"epsilon (delta = {report['delta']:.3g})")
    ax_eps.grid(alpha=0.3)
    fig.suptitle(
        f"DP reward model: accuracy {report['heldout_accuracy']}, epsilon {report['epsilon']:.3g}"
        if report["heldout_accuracy"] is not None
        else "DP reward model"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
