"""The training run behind `scripts/train.py`: data, privacy plan, model, optimizer, restore, loop.

`run(config, workdir)` reads the ConfigDict of `jaxdp.config.default_config()` and writes into
`workdir` (layout: `jaxdp.workdir`): publishable `config.json`, `privacy.json`, `metrics.jsonl`,
`samples.jsonl`, `report.png`, `hf/` (and `peft/`), and the PRIVATE `private/` (secret
randomness, checkpoints, noise-free training diagnostics). Running it again on the same workdir
resumes from the last checkpoint with the stored secrets; a resumed run ends with the same
parameters and epsilon as an uninterrupted one, and replays the steps it logged after its last
checkpoint exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from jaxdp import (
    accounting,
    checkpoint,
    data,
    ghost,
    hf,
    lora,
    randomness,
    report,
    sampling,
    sharding,
    train,
)
from jaxdp.generate import generate
from jaxdp.gpt2 import GPT2Config, init_model
from jaxdp.workdir import RunMismatchError, RunRecord, Workdir, fingerprint_diff

log = logging.getLogger("jaxdp")

NEIGHBOURING_RELATION = "add-or-remove-one example (one block of block_size tokens)"
COVERED = (
    "the trained parameters at every step and everything outside W/private computed from them "
    "and public data alone: hf/, peft/, metrics.jsonl (epsilon, eval metrics on held-out data), "
    "samples.jsonl, report.png"
)
NOT_COVERED = (
    "W/private: its noise-free training diagnostics (train loss, batch sizes, examples seen, "
    "clip fraction, gradient norms, throughput) are computed from the private data without "
    "noise, and its run.json and checkpoints hold the secret noise key; never publish W/private"
)
PUBLIC_PARAMETERS = (
    "num_examples (N) is treated as public, as in the DP-SGD literature, and with it "
    "sampling_prob = expected_batch_size / N, the default target_delta = 1 / (10 N) and, with "
    "micro-batch clipping, num_cells: the guarantee is for neighbouring datasets under these "
    "fixed parameters"
)
# Settings that may differ when a run is resumed: they change neither the examples nor the
# noise nor the trajectory (only logging, evaluation, export, float summation order), or the
# privacy plan stands in for them (the resolved noise multiplier). Everything else must match.
RESUMABLE_FIELDS = frozenset(
    {
        "train.log_every",
        "train.eval_every",
        "train.eval_batch_size",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.sample_prompts",
        "train.sample_max_new_tokens",
        "train.sample_top_k",
        "train.export_hf",
        "train.export_peft",
        "train.progress",
        "train.num_steps",
        "train.num_epochs",
        "data.max_eval_examples",
        "data.eval_files",
        "data.hf_eval_split",
        "dp.microbatch_size",
        "dp.physical_batch_size",
        "dp.engine",
        "dp.ghost_strategy",
        "dp.noise_multiplier",
        "dp.target_epsilon",
        "dp.target_delta",
        "dp.accountant",
        "mesh",
        "distributed",
    }
)


class ConfigError(ValueError):
    """The configuration cannot be run as given."""


# ----------------------------------------------------------------------------------- data ---


def load_data(cfg: ml_collections.ConfigDict) -> tuple[Any, np.ndarray, np.ndarray]:
    """(tokenizer, train blocks [N, T], eval blocks [M, T])."""
    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    T = cfg.data.block_size
    if cfg.data.source == "text_files":
        if not cfg.data.train_files:
            raise ConfigError("data.source='text_files' needs data.train_files.")
        train_blocks = data.text_file_blocks(list(cfg.data.train_files), tokenizer, T)
        eval_blocks = (
            data.text_file_blocks(list(cfg.data.eval_files), tokenizer, T)
            if cfg.data.eval_files
            else np.zeros((0, T), np.int32)
        )
    elif cfg.data.source in ("hf", "tfds"):
        d = cfg.data
        if d.source == "hf":
            load = lambda split: data.hf_dataset_blocks(
                d.hf_dataset, d.hf_config, split, d.hf_text_field, tokenizer, T
            )
        else:
            load = lambda split: data.tfds_blocks(
                d.hf_dataset, split, d.hf_text_field, tokenizer, T
            )
        train_blocks = load(d.hf_train_split)
        eval_blocks = load(d.hf_eval_split) if d.hf_eval_split else np.zeros((0, T), np.int32)
    else:
        raise ConfigError(
            f"Unknown data.source {cfg.data.source!r}; use 'hf', 'text_files' or 'tfds'."
        )
    if cfg.data.max_eval_examples is not None:
        eval_blocks = eval_blocks[: cfg.data.max_eval_examples]
    if len(train_blocks) == 0:
        raise ConfigError(
            f"The training data gives no complete block of {T} tokens; use more text or a "
            f"smaller data.block_size."
        )
    return tokenizer, train_blocks, eval_blocks


# --------------------------------------------------------------------------- privacy plan ---


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    enabled: bool
    num_examples: int
    sampling: str  # "poisson" | "shuffle"
    sampling_prob: float
    expected_batch_size: float
    num_steps: int  # steps this run will take (may be fewer than asked: budget)
    noise_multiplier: float
    l2_clip_norm: float
    target_epsilon: float | None
    target_delta: float
    accountant: str
    group_size: int = 1
    secure_noise: bool = False

    @property
    def num_cells(self) -> int | None:
        """Micro-batch clipping's number of content-hash cells (None without it)."""
        return math.ceil(self.num_examples / self.group_size) if self.group_size > 1 else None

    @property
    def accounting_noise_multiplier(self) -> float:
        """sigma relative to the sensitivity: C per example, 2C per group (group clipping)."""
        return self.noise_multiplier / sensitivity_factor(self.group_size)

    @property
    def approximate(self) -> bool:
        return self.enabled and self.sampling != "poisson"

    @functools.cached_property
    def _curve(self) -> accounting.EpsilonCurve:
        return accounting.EpsilonCurve(
            self.accounting_noise_multiplier,
            self.sampling_prob,
            self.target_delta,
            accountant=self.accountant,
        )

    def epsilon(self, steps: int) -> float:
        """Epsilon after `steps` steps (Poisson accounting; `approximate` says if it applies)."""
        return self._curve(steps) if self.enabled else math.inf

    def describe(self) -> str:
        if not self.enabled:
            return "non-private (no DP guarantee)"
        if self.noise_multiplier == 0:
            return "no privacy: noise_multiplier is 0, epsilon is infinite"
        return accounting.describe_guarantee(self.sampling)

    def neighbouring_relation(self) -> str:
        if self.group_size == 1:
            return NEIGHBOURING_RELATION
        return (
            f"{NEIGHBOURING_RELATION}; micro-batch clipping: each example belongs to one of "
            f"{self.num_cells} cells by a hash of its content, the drawn members of a cell are "
            f"clipped together, so one example changes one cell's clipped sum by at most 2C"
        )


def sensitivity_factor(group_size: int) -> float:
    """Sensitivity of the clipped sum in units of C under add/remove-one.

    Per-example clipping: adding or removing an example adds or removes one vector of norm <= C.
    Group clipping (cells by content hash, `sampling.content_cells`, so no other example changes
    cell): it changes one cell's clipped sum from one vector of norm <= C to another, a change of
    norm <= 2C. The accountant is then given noise_multiplier / 2 (the Poisson-subsampled
    Gaussian with sensitivity 2C).
    """
    return 1.0 if group_size == 1 else 2.0


def plan_privacy(cfg: ml_collections.ConfigDict, num_examples: int) -> PrivacyPlan:
    dp = cfg.dp
    N, B = num_examples, float(dp.expected_batch_size)
    if B < 1:
        raise ConfigError(f"dp.expected_batch_size must be >= 1, got {B}.")
    if B > N:
        raise ConfigError(
            f"dp.expected_batch_size={B:g} exceeds the number of training examples ({N}); "
            f"use a smaller batch or more data (a block is {cfg.data.block_size} tokens)."
        )
    q = B / N
    steps = cfg.train.num_steps
    if cfg.train.num_epochs is not None:
        steps = math.ceil(cfg.train.num_epochs / q)
    if steps < 1:
        raise ConfigError(f"train.num_steps must be >= 1, got {steps}.")
    delta = dp.target_delta if dp.target_delta is not None else 1.0 / (10 * N)
    if dp.sampling not in ("poisson", "shuffle"):
        raise ConfigError(f"Unknown dp.sampling {dp.sampling!r}; use 'poisson' or 'shuffle'.")
    common = dict(
        num_examples=N,
        sampling=dp.sampling if dp.enabled else "shuffle",
        sampling_prob=q,
        expected_batch_size=B,
        l2_clip_norm=dp.l2_clip_norm,
        target_delta=delta,
        accountant=dp.accountant,
        group_size=dp.group_size,
        secure_noise=dp.secure_noise,
    )
    if dp.group_size < 1 or (dp.enabled and dp.microbatch_size < dp.group_size):
        raise ConfigError(
            f"dp.microbatch_size ({dp.microbatch_size}) must be at least dp.group_size "
            f"({dp.group_size} >= 1): a cell's drawn members share one microbatch."
        )
    if dp.group_size > 1 and dp.sampling != "poisson":
        raise ConfigError("dp.group_size > 1 needs dp.sampling='poisson'.")
    if dp.engine not in train.ENGINES:
        raise ConfigError(f"Unknown dp.engine {dp.engine!r}; use one of {train.ENGINES}.")
    if dp.ghost_strategy not in ghost.STRATEGIES:
        raise ConfigError(
            f"Unknown dp.ghost_strategy {dp.ghost_strategy!r}; use one of {ghost.STRATEGIES}."
        )
    if dp.engine == "ghost" and dp.group_size != 1:
        raise ConfigError("dp.engine='ghost' supports per-example clipping only (group_size=1).")
    factor = sensitivity_factor(dp.group_size)
    if not dp.enabled:
        return PrivacyPlan(
            enabled=False, num_steps=steps, noise_multiplier=0.0, target_epsilon=None, **common
        )
    sigma, target = dp.noise_multiplier, dp.target_epsilon
    try:
        if sigma is None:
            if target is None:
                raise ConfigError("Set dp.noise_multiplier or dp.target_epsilon (or both).")
            sigma = factor * accounting.calibrate_noise_multiplier(
                target, delta, q, steps, accountant=dp.accountant
            )
        elif target is not None:
            affordable = accounting.max_steps_within_budget(
                sigma / factor, q, target, delta, accountant=dp.accountant, upper=steps
            )
            if affordable < 1:
                one_step = accounting.compute_epsilon(
                    sigma / factor, q, 1, delta, accountant=dp.accountant
                )
                raise ConfigError(
                    f"Even one step at noise_multiplier={sigma} and q={q:.4g} exceeds "
                    f"target_epsilon={target} at delta={delta:.3g} (one step costs epsilon="
                    f"{one_step:.4g}); raise the noise multiplier, lower the batch size, or raise "
                    f"the target."
                )
            if affordable < steps:
                log.warning(
                    "The epsilon budget allows %d of the %d requested steps; training "
                    "will stop there.",
                    affordable,
                    steps,
                )
                steps = affordable
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return PrivacyPlan(
        enabled=True,
        num_steps=steps,
        noise_multiplier=float(sigma),
        target_epsilon=target,
        **common,
    )


# ---------------------------------------------------------------------- model, optimizer ---


def build_model(cfg: ml_collections.ConfigDict, vocab_size: int):
    m = cfg.model
    overrides = {}
    if m.dropout is not None:
        overrides = dict(resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout)
    if m.init == "random":
        config = GPT2Config.preset(m.name_or_path, vocab_size=vocab_size, **overrides)
        model = init_model(config, seed=cfg.train.seed)
    elif m.init == "pretrained":
        model = hf.from_pretrained(m.name_or_path, revision=m.revision, config_overrides=overrides)
    else:
        raise ConfigError(f"Unknown model.init {m.init!r}; use 'pretrained' or 'random'.")
    if model.config.n_positions < cfg.data.block_size:
        raise ConfigError(
            f"data.block_size={cfg.data.block_size} exceeds the model's "
            f"n_positions={model.config.n_positions}."
        )
    if model.config.vocab_size < vocab_size:
        raise ConfigError(
            f"The tokenizer has {vocab_size} tokens but the model only {model.config.vocab_size}."
        )
    if m.lora_rank:
        lora.apply_lora(model, m.lora_rank, m.lora_alpha, m.lora_targets, seed=cfg.train.seed)
    return model


def trainable_patterns(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """model.trainable, or only the LoRA adapters when LoRA is on and nothing else is asked."""
    if cfg.model.trainable:
        return tuple(cfg.model.trainable)
    return (lora.LORA_PATTERN,) if cfg.model.lora_rank else ()


def lora_record(cfg: ml_collections.ConfigDict) -> dict[str, Any] | None:
    m = cfg.model
    if not m.lora_rank:
        return None
    return {"rank": m.lora_rank, "alpha": m.lora_alpha, "targets": list(m.lora_targets)}


def build_optimizer(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    o = cfg.optim
    if o.schedule == "constant":
        lr = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "cosine":
        lr = optax.cosine_decay_schedule(o.learning_rate, max(1, num_steps - o.warmup_steps))
    else:
        raise ConfigError(f"Unknown optim.schedule {o.schedule!r}; use 'constant' or 'cosine'.")
    if o.warmup_steps:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), lr], [o.warmup_steps]
        )
    if o.name == "sgd":
        return optax.sgd(lr, momentum=o.momentum or None)
    if o.name == "adam":
        return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    if o.name == "adamw":
        return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    raise ConfigError(f"Unknown optim.name {o.name!r}; use 'sgd', 'adam' or 'adamw'.")


# ------------------------------------------------------------------------------ helpers ---


def config_fingerprint(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The settings that must not change between the start of a run and its resumption."""

    def strip(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            path = prefix + k
            if path in RESUMABLE_FIELDS:
                continue
            out[k] = strip(v, path + ".") if isinstance(v, dict) else v
        return out

    return strip(cfg.to_dict())


def run_fingerprint(cfg, plan: PrivacyPlan, train_blocks: np.ndarray) -> dict[str, Any]:
    """What a run is: its settings, its training data (a hash: kept private), its plan."""
    return {
        "config": config_fingerprint(cfg),
        "data_sha256": hashlib.sha256(np.ascontiguousarray(train_blocks).tobytes()).hexdigest(),
        "num_examples": plan.num_examples,
        "noise_multiplier": plan.noise_multiplier,
        # A cosine schedule's horizon shapes every step; a constant one does not depend on it.
        "lr_schedule_steps": plan.num_steps if cfg.optim.schedule == "cosine" else None,
    }


def _check_same_run(wd: Workdir, fingerprint: dict[str, Any], *, partial: bool = False) -> None:
    """Refuses to continue a workdir whose run differs (in `fingerprint`'s keys if partial)."""
    if not wd.run_record.exists():
        return
    saved = RunRecord.load(wd.run_record).fingerprint
    if partial:
        saved = {k: saved.get(k) for k in fingerprint}
    diffs = fingerprint_diff(saved, fingerprint)
    if diffs:
        raise RunMismatchError(
            f"{wd.root} holds a different run ({'; '.join(diffs)}). Continuing it would add the "
            f"same noise to other gradients and mix two runs' privacy accounting. Use a new "
            f"--workdir, or restore the original settings. (To train a finished run longer, fix "
            f"dp.noise_multiplier to its value in privacy.json and raise train.num_steps.)"
        )


def _open_run(wd: Workdir, cfg, fingerprint: dict[str, Any], lead: bool) -> randomness.Secrets:
    """The run's secrets: read from private/run.json, or drawn and stored at the first start."""
    if lead and not wd.run_record.exists():
        leftovers = [p for p in (wd.metrics, wd.privacy, wd.checkpoints) if p.exists()]
        if leftovers:
            raise RunMismatchError(
                f"{wd.root} holds outputs of an earlier run ({leftovers[0].name}) but not its "
                f"secret randomness (private/run.json): it cannot be continued privately. Use a "
                f"new --workdir."
            )
        seed = cfg.dp.noise_seed
        secrets = (
            randomness.Secrets.generate() if seed is None else randomness.Secrets.from_seed(seed)
        )
        wd.make_private()
        RunRecord(secrets, fingerprint).save(wd.run_record)
    sharding.sync_processes("jaxdp_run_record")
    _check_same_run(wd, fingerprint)
    return RunRecord.load(wd.run_record).secrets


def _physical_batches(
    idx: np.ndarray, blocks: np.ndarray, P: int, mesh, micro: int, units: np.ndarray | None
):
    """The drawn examples `idx` as padded physical batches of P rows, sharded over the mesh.

    With clipping units (`units`: the cell of every example) the rows of a unit share a
    microbatch of `micro` rows and carry `segment_ids`."""
    if units is None:
        chunks = [(rows, pad, None) for rows, pad in sampling.pad_batches(idx, P)]
    else:
        packed, dropped = sampling.pack_units(idx, units[idx], P, micro)
        if dropped:
            log.warning("%d drawn examples beyond a microbatch per cell were left out.", dropped)
        chunks = [(b.rows, b.is_padding, b.segment_ids) for b in packed]
    for rows, is_padding, segment_ids in chunks:
        batch = sharding.global_batch({"tokens": blocks}, rows, mesh)
        per_row = {"is_padding": is_padding}
        if segment_ids is not None:
            per_row["segment_ids"] = segment_ids
        batch.update(sharding.global_batch(per_row, np.arange(P), mesh))
        yield batch


def _evaluate(eval_step, state, blocks: np.ndarray, batch_size: int, mesh) -> dict[str, float]:
    if len(blocks) == 0:
        return {}
    sums = {"loss_sum": 0.0, "num_tokens": 0.0, "num_correct": 0.0}
    for batch in _physical_batches(np.arange(len(blocks)), blocks, batch_size, mesh, 1, None):
        out = eval_step(state.params, batch, state.frozen)
        for k in sums:
            sums[k] += float(out[k])
    loss = sums["loss_sum"] / sums["num_tokens"]
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 700.0)),
        "eval_accuracy": sums["num_correct"] / sums["num_tokens"],
    }


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drops records of steps after `last_step` (logged by a run that died after a checkpoint)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------- run ---


def run(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    extra_train_blocks: np.ndarray | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) the run described by `cfg` in `workdir`; returns the final summary.

    `extra_train_blocks` [n, block_size] are appended to the training examples (privacy audits
    insert canaries this way)."""
    wd = Workdir(workdir)
    wd.check_layout()
    # A changed setting is refused before any slow work (the data and the plan are checked too,
    # once they are known).
    _check_same_run(wd, {"config": config_fingerprint(cfg)}, partial=True)

    # Mesh (and multi-host start-up, if configured: before any other JAX call).
    d = cfg.distributed
    sharding.initialize_distributed(
        d.coordinator_address, d.num_processes, d.process_id, mode=d.initialize
    )
    lead = jax.process_index() == 0  # the process that writes files other than checkpoints
    mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)

    # Data.
    tokenizer, train_blocks, eval_blocks = load_data(cfg)
    if extra_train_blocks is not None and len(extra_train_blocks):
        train_blocks = np.concatenate([train_blocks, np.asarray(extra_train_blocks, np.int32)])
    N, T = train_blocks.shape

    # Privacy plan: the noise multiplier and the number of steps the budget allows.
    plan = plan_privacy(cfg, N)
    label = " (APPROXIMATE: batches not Poisson-sampled)" if plan.approximate else ""
    log.info(
        "%d training examples of %d tokens; %s; q=%.5g, sigma=%.4g, C=%g, %d steps%s",
        N,
        T,
        plan.describe(),
        plan.sampling_prob,
        plan.noise_multiplier,
        plan.l2_clip_norm,
        plan.num_steps,
        label,
    )

    # Model.
    model = build_model(cfg, len(tokenizer))
    dp_cfg = None
    if plan.enabled:
        dp_cfg = train.DPSGDConfig(
            l2_clip_norm=plan.l2_clip_norm,
            noise_multiplier=plan.noise_multiplier,
            expected_batch_size=plan.expected_batch_size,
            microbatch_size=cfg.dp.microbatch_size * mesh.size,  # per device -> per step
            clipping=cfg.dp.clipping,
            engine=cfg.dp.engine,
            ghost_strategy=cfg.dp.ghost_strategy,
            secure_noise=plan.secure_noise,
        )

    # The run's secret randomness: drawn and stored (private/run.json) at the first start, once
    # every check has passed; read back, with the fingerprint checked, on every later start.
    fingerprint = run_fingerprint(cfg, plan, train_blocks)
    secrets = _open_run(wd, cfg, fingerprint, lead)
    if lead:
        wd.config.write_text(cfg.to_json_best_effort(indent=2) + "\n")

    # Optimizer and train state.
    tx = train.make_optimizer(
        build_optimizer(cfg, plan.num_steps), dp_cfg, secrets.noise_key() if plan.enabled else None
    )
    try:
        graphdef, state = train.init_state(model, tx, trainable_patterns(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
    n_frozen = sum(x.size for x in jax.tree.leaves(state.frozen))
    log.info("%d trainable parameters, %d frozen.", n_trainable, n_frozen)
    model_config = dataclasses.asdict(model.config)
    del model
    # Physical batches hold whole microbatches of microbatch_size examples per device.
    micro = (cfg.dp.microbatch_size if plan.enabled else 1) * mesh.size
    sampling_seed = secrets.sampling
    if plan.enabled and plan.sampling == "poisson":
        sampler = sampling.PoissonSampler(N, plan.sampling_prob, sampling_seed)
        P = cfg.dp.physical_batch_size or sampling.default_physical_batch_size(
            plan.expected_batch_size, N, micro
        )
    else:
        sampler = sampling.ShuffleSampler(N, int(round(plan.expected_batch_size)), sampling_seed)
        P = cfg.dp.physical_batch_size or int(round(plan.expected_batch_size))
    P = int(math.ceil(P / micro) * micro)
    # Micro-batch clipping: the clipping unit of each example is its content-hash cell.
    units = None
    if plan.enabled and plan.group_size > 1:
        units = sampling.content_cells(train_blocks, plan.num_cells)

    eval_batch_size = math.ceil(cfg.train.eval_batch_size / mesh.size) * mesh.size

    # Shardings: batch over all devices; params and optimizer state replicated or FSDP-sharded.
    state, steps = train.shard_and_jit(graphdef, tx, dp_cfg, state, mesh)

    # Restore.
    mngr = checkpoint.manager(wd.root, max_to_keep=cfg.train.keep_checkpoints)
    start, examples_seen = 0, 0
    if (latest := mngr.latest_step()) is not None:
        state, meta = checkpoint.restore(mngr, latest, checkpoint.abstract(state))
        if plan.enabled and not train.noise_key_matches(state, secrets.noise_key()):
            raise RunMismatchError(
                f"The checkpoint at step {latest} in {mngr.directory} was written with another "
                f"noise key than {wd.run_record}: the two do not belong together. Use a new "
                f"--workdir."
            )
        start, examples_seen = int(state.step), int(meta["examples_seen"])
        log.info(
            "Resumed from %s at step %d (epsilon so far: %s).",
            mngr.directory,
            start,
            meta["privacy"]["epsilon"],
        )
    if lead:
        # Steps logged after the last checkpoint are replayed with the same secrets, data and
        # state, so their records come back identical: no new information is released.
        for path in (wd.metrics, wd.private_metrics, wd.samples):
            _truncate_jsonl(path, start)

    def save(step: int, eps: float) -> None:
        meta = {
            "privacy": _privacy_record(plan, step, eps, secrets),
            "examples_seen": examples_seen,
            "model_config": model_config,
            "trainable": list(trainable_patterns(cfg)),
            "lora": lora_record(cfg),
            "tokenizer": str(cfg.data.tokenizer),
        }
        checkpoint.save(mngr, step, state, meta)

    # Loop.
    dropout_key = secrets.dropout_key()
    eps = plan.epsilon(start)
    approx = "~" if plan.approximate else ""
    if secrets.fixed_by_user and plan.enabled:
        log.warning("dp.noise_seed is set: %s.", randomness.FIXED_SEED_LABEL)
        approx += " (fixed seed: not private)"
    progress = _progress(cfg.train.progress and lead, start, plan.num_steps)
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(start, plan.num_steps):
        idx = sampler.sample(step)
        step_key = randomness.dropout_step_key(dropout_key, step)
        acc = steps.zero_accum(state.params)
        for j, batch in enumerate(_physical_batches(idx, train_blocks, P, mesh, micro, units)):
            key = jax.random.fold_in(step_key, j)
            acc = steps.grad_step(state.params, batch, key, acc, state.frozen)
        state, metrics = steps.update_step(state, acc)
        done = step + 1
        examples_seen += len(idx)
        tokens_since += len(idx) * T
        if plan.enabled and float(metrics["num_nonfinite"]) > 0:
            log.warning(
                "Step %d: %d examples had non-finite gradients (zeroed, still private).",
                done,
                int(metrics["num_nonfinite"]),
            )
        if not plan.enabled and not math.isfinite(float(metrics["train_loss"])):
            # The state now holds the bad update: keep it out of the checkpoints.
            raise FloatingPointError(
                f"Non-finite training loss at step {done}; lower the learning rate. The latest "
                f"checkpoint (step {mngr.latest_step()}) is unaffected."
            )
        is_eval = done % cfg.train.eval_every == 0 or done == plan.num_steps
        if done % cfg.train.log_every == 0 or is_eval or done == start + 1:
            eps = plan.epsilon(done)
            now = time.perf_counter()
            public = {
                "step": done,
                "epsilon": eps if math.isfinite(eps) else None,
                "epsilon_is_approximate": plan.approximate,
                "delta": plan.target_delta,
                "noise_multiplier": plan.noise_multiplier,
                "sampling_prob": plan.sampling_prob,
                "noise_seed_fixed_by_user": secrets.fixed_by_user,
            }
            private = {
                "step": done,
                "train_loss": float(metrics["train_loss"]),
                "batch_size": int(metrics["batch_size"]),
                "examples_seen": examples_seen,
                "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
                "clip_fraction": float(metrics["clip_fraction"]),
                "grad_norm_mean": float(metrics["grad_norm_mean"]),
                "num_nonfinite": int(metrics["num_nonfinite"]),
            }
            t_last, tokens_since = now, 0
            if is_eval:
                public.update(_evaluate(steps.eval_step, state, eval_blocks, eval_batch_size, mesh))
                params = (state.params, state.frozen)
                _write_samples(wd, cfg, tokenizer, graphdef, params, done, lead)
            if lead:
                _append_jsonl(wd.metrics, public)
                _append_jsonl(wd.private_metrics, private)
            progress.set_postfix(loss=f"{private['train_loss']:.3f}", eps=f"{eps:.3g}{approx}")
        if done % cfg.train.checkpoint_every == 0 or done == plan.num_steps:
            save(done, plan.epsilon(done))
        progress.update(1)
    progress.close()

    # Finish: privacy statement, HF export, reports.
    final_step = int(state.step)
    if mngr.latest_step() != final_step:
        save(final_step, plan.epsilon(final_step))
    summary = _privacy_record(plan, final_step, plan.epsilon(final_step), secrets)
    # Gathering sharded arrays is collective: every process takes part.
    host = sharding.to_host((state.params, state.frozen)) if cfg.train.export_hf else None
    if lead:
        wd.privacy.write_text(json.dumps(summary, indent=2) + "\n")
        if cfg.train.export_hf:
            model = train.merge(graphdef, *host)
            if lora.has_lora(model):
                if cfg.train.export_peft and cfg.model.init == "pretrained":
                    base = str(cfg.model.name_or_path)
                    lora.save_peft_adapter(model, wd.peft, base_model_name_or_path=base)
                model = lora.merge_lora(model)  # a plain GPT2LMHeadModel
            hf.save_pretrained(model, wd.hf, tokenizer=tokenizer)
        title = plan.describe()
        target = plan.target_epsilon if plan.enabled else None
        report.plot_public(wd.metrics, wd.report, title=title, target_epsilon=target)
        report.plot_private(wd.private_metrics, wd.metrics, wd.private_report, title=title)
    mngr.close()
    return summary


def _privacy_record(
    plan: PrivacyPlan, steps: int, eps: float, secrets: randomness.Secrets
) -> dict[str, Any]:
    if not plan.enabled:
        return {
            "epsilon": None,
            "epsilon_is_approximate": False,
            "guarantee": plan.describe(),
            "steps": steps,
            "expected_batch_size": plan.expected_batch_size,
            "num_examples": plan.num_examples,
            "sampling_method": "shuffle (non-private)",
            "covers": "nothing: the run is not differentially private",
        }
    return {
        "epsilon": eps if math.isfinite(eps) else None,
        "delta": plan.target_delta,
        "epsilon_is_approximate": plan.approximate,
        "guarantee": plan.describe(),
        "randomness": secrets.label,
        "accountant": plan.accountant,
        "steps": steps,
        "sampling_prob": plan.sampling_prob,
        "expected_batch_size": plan.expected_batch_size,
        "num_examples": plan.num_examples,
        "noise_multiplier": plan.noise_multiplier,
        "accounting_noise_multiplier": plan.accounting_noise_multiplier,
        "l2_clip_norm": plan.l2_clip_norm,
        "group_size": plan.group_size,
        "num_cells": plan.num_cells,
        "secure_noise": plan.secure_noise,
        "target_epsilon": plan.target_epsilon,
        "sampling_method": plan.sampling,
        "neighbouring_relation": plan.neighbouring_relation(),
        "public_parameters": PUBLIC_PARAMETERS,
        "covers": COVERED,
        "not_covered": NOT_COVERED,
    }


def describe_result(summary: dict[str, Any]) -> str:
    """One line for the console: steps and epsilon with every label it carries."""
    eps = summary["epsilon"]
    if summary.get("delta") is None:
        return f"{summary['steps']} steps, non-private"
    if eps is None:
        return f"{summary['steps']} steps, {summary['guarantee']}"
    labels = []
    if summary["epsilon_is_approximate"]:
        labels.append("APPROXIMATE: batches not Poisson-sampled")
    if summary.get("randomness") == randomness.FIXED_SEED_LABEL:
        labels.append(randomness.FIXED_SEED_LABEL)
    label = f" ({'; '.join(labels)})" if labels else ""
    return f"{summary['steps']} steps, epsilon = {eps:.4g} at delta = {summary['delta']:.3g}{label}"


def _write_samples(wd: Workdir, cfg, tokenizer, graphdef, params, step, lead: bool) -> None:
    for i, prompt in enumerate(cfg.train.sample_prompts):
        ids = data.tokenize(tokenizer, prompt)
        out = generate(
            graphdef,
            params,
            ids,
            max_new_tokens=cfg.train.sample_max_new_tokens,
            top_k=cfg.train.sample_top_k,
            key=randomness.generation_key(cfg.train.seed, i),
        )
        if not lead:
            continue
        text = tokenizer.decode(out.tolist())
        _append_jsonl(wd.samples, {"step": step, "prompt": prompt, "completion": text})
        log.info("Sample at step %d: %s|%s", step, prompt, text)


class _NoProgress:
    def update(self, n):  # noqa: D401
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
