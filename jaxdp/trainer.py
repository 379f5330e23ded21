"""The training run behind `scripts/train.py`: data, privacy plan, model, optimizer, restore, loop.

`run(config, workdir)` reads the ConfigDict of `jaxdp.config.default_config()` and writes into
`workdir`: `metrics.jsonl`, `checkpoints/`, `privacy.json`, `samples.jsonl`, `hf/` and
`report.png`. Running it again on the same workdir resumes from the last checkpoint; a
resumed run ends with the same parameters and epsilon as an uninterrupted one.
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

from jaxdp import accounting, checkpoint, data, ghost, hf, lora, sampling, sharding, train
from jaxdp.generate import generate
from jaxdp.gpt2 import GPT2Config, init_model

log = logging.getLogger("jaxdp")

NEIGHBOURING_RELATION = "add-or-remove-one example (one block of block_size tokens)"
COVERED = (
    "the trained parameters at every step (checkpoints, hf/, peft/) and anything computed from "
    "them and public data alone: eval metrics on held-out data, generated samples"
)
NOT_COVERED = (
    "training-set diagnostics in metrics.jsonl (train_loss, batch_size, examples_seen, "
    "clip_fraction, grad_norm_mean, num_nonfinite): computed from the private data without noise; "
    "for the data holder only, do not publish them"
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
        return accounting.describe_guarantee(self.sampling)


def sensitivity_factor(group_size: int) -> float:
    """Sensitivity of the clipped sum in units of C under add/remove-one.

    Per-example clipping: adding or removing an example adds or removes one vector of norm <= C.
    Group clipping (fixed cells, `sampling.group_layout`): it changes one existing group's clipped
    sum from one vector of norm <= C to another, a change of norm <= 2C. The accountant is then
    given noise_multiplier / 2 (the Poisson-subsampled Gaussian with sensitivity 2C).
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
    )
    if dp.group_size < 1 or (dp.enabled and dp.microbatch_size % dp.group_size):
        raise ConfigError(
            f"dp.microbatch_size ({dp.microbatch_size}) must be a multiple of dp.group_size "
            f"({dp.group_size} >= 1)."
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
                raise ConfigError(
                    f"Even one step at noise_multiplier={sigma} and q={q:.4g} exceeds "
                    f"target_epsilon={target} at delta={delta:.3g}; raise the noise multiplier, "
                    f"lower the batch size, or raise the target."
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


def _fingerprint(cfg, plan: PrivacyPlan, train_blocks: np.ndarray) -> dict[str, Any]:
    """What must not change between a checkpoint and the run resuming it."""
    return {
        "data_sha256": hashlib.sha256(np.ascontiguousarray(train_blocks).tobytes()).hexdigest(),
        "num_examples": plan.num_examples,
        "block_size": cfg.data.block_size,
        "dp_enabled": plan.enabled,
        "sampling": plan.sampling,
        "sampling_prob": plan.sampling_prob,
        "noise_multiplier": plan.noise_multiplier,
        "l2_clip_norm": plan.l2_clip_norm,
        "clipping": cfg.dp.clipping,
        "trainable": list(trainable_patterns(cfg)),
        "lora": lora_record(cfg),
        "group_size": cfg.dp.group_size,
        "target_delta": plan.target_delta,
        "seed": cfg.train.seed,
        "model": cfg.model.name_or_path,
        "optimizer": cfg.optim.to_dict(),
    }


def _physical_batches(idx: np.ndarray, blocks: np.ndarray, P: int, mesh, group_size: int = 1):
    if group_size > 1:
        slots, slot_padding = sampling.group_layout(idx, group_size)
        chunks = sampling.pad_batches(slots, P, slot_padding)
    else:
        chunks = sampling.pad_batches(idx, P)
    for rows, is_padding in chunks:
        batch = sharding.global_batch({"tokens": blocks}, rows, mesh)
        batch.update(sharding.global_batch({"is_padding": is_padding}, np.arange(P), mesh))
        yield batch


def _evaluate(eval_step, state, blocks: np.ndarray, batch_size: int, mesh) -> dict[str, float]:
    if len(blocks) == 0:
        return {}
    sums = {"loss_sum": 0.0, "num_tokens": 0.0, "num_correct": 0.0}
    for batch in _physical_batches(np.arange(len(blocks)), blocks, batch_size, mesh):
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
    workdir = Path(workdir).expanduser().resolve()

    # Mesh (and multi-host start-up, if configured: before any other JAX call).
    d = cfg.distributed
    sharding.initialize_distributed(
        d.coordinator_address, d.num_processes, d.process_id, mode=d.initialize
    )
    lead = jax.process_index() == 0  # the process that writes files other than checkpoints
    mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2) + "\n")

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

    # Model and optimizer.
    model = build_model(cfg, len(tokenizer))
    dp_cfg = None
    if plan.enabled:
        dp_cfg = train.DPSGDConfig(
            l2_clip_norm=plan.l2_clip_norm,
            noise_multiplier=plan.noise_multiplier,
            expected_batch_size=plan.expected_batch_size,
            microbatch_size=cfg.dp.microbatch_size * mesh.size,  # per device -> per step
            clipping=cfg.dp.clipping,
            group_size=cfg.dp.group_size,
            noise_seed=cfg.train.seed,
            engine=cfg.dp.engine,
            ghost_strategy=cfg.dp.ghost_strategy,
        )
    tx = train.make_optimizer(build_optimizer(cfg, plan.num_steps), dp_cfg)
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
    if plan.enabled and plan.sampling == "poisson":
        sampler = sampling.PoissonSampler(N, plan.sampling_prob, cfg.train.seed)
        # Group clipping lays each drawn example's cell out in group_size slots: up to k x rows.
        P = cfg.dp.physical_batch_size or plan.group_size * sampling.default_physical_batch_size(
            plan.expected_batch_size, N, micro
        )
    else:
        sampler = sampling.ShuffleSampler(N, int(round(plan.expected_batch_size)), cfg.train.seed)
        P = cfg.dp.physical_batch_size or int(round(plan.expected_batch_size))
    P = int(math.ceil(P / micro) * micro)

    eval_batch_size = math.ceil(cfg.train.eval_batch_size / mesh.size) * mesh.size

    # Shardings: batch over all devices; params and optimizer state replicated or FSDP-sharded.
    state, steps = train.shard_and_jit(graphdef, tx, dp_cfg, state, mesh)

    # Restore.
    mngr = checkpoint.manager(workdir, max_to_keep=cfg.train.keep_checkpoints)
    fingerprint = _fingerprint(cfg, plan, train_blocks)
    metrics_path = workdir / "metrics.jsonl"
    start, examples_seen = 0, 0
    if (latest := mngr.latest_step()) is not None:
        state, meta = checkpoint.restore(mngr, latest, checkpoint.abstract(state), fingerprint)
        start, examples_seen = int(state.step), int(meta["examples_seen"])
        log.info(
            "Resumed from %s at step %d (epsilon so far: %s).",
            mngr.directory,
            start,
            meta["privacy"]["epsilon"],
        )
    if lead:
        _truncate_jsonl(metrics_path, start)
        _truncate_jsonl(workdir / "samples.jsonl", start)

    def save(step: int, eps: float) -> None:
        meta = {
            "fingerprint": fingerprint,
            "privacy": _privacy_record(plan, step, eps),
            "examples_seen": examples_seen,
            "model_config": model_config,
            "trainable": list(trainable_patterns(cfg)),
            "lora": lora_record(cfg),
            "tokenizer": str(cfg.data.tokenizer),
        }
        checkpoint.save(mngr, step, state, meta)

    # Loop.
    base_key = jax.random.key(cfg.train.seed)
    group_size = plan.group_size if plan.enabled else 1
    eps = plan.epsilon(start)
    progress = _progress(cfg.train.progress and lead, start, plan.num_steps)
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(start, plan.num_steps):
        idx = sampler.sample(step)
        step_key = jax.random.fold_in(base_key, step)
        acc = steps.zero_accum(state.params)
        batches = _physical_batches(idx, train_blocks, P, mesh, group_size)
        for j, batch in enumerate(batches):
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
            record = {
                "step": done,
                "train_loss": float(metrics["train_loss"]),
                "epsilon": eps if math.isfinite(eps) else None,
                "epsilon_is_approximate": plan.approximate,
                "delta": plan.target_delta,
                "noise_multiplier": plan.noise_multiplier,
                "sampling_prob": plan.sampling_prob,
                "batch_size": int(metrics["batch_size"]),
                "examples_seen": examples_seen,
                "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
                "clip_fraction": float(metrics["clip_fraction"]),
                "grad_norm_mean": float(metrics["grad_norm_mean"]),
                "num_nonfinite": int(metrics["num_nonfinite"]),
            }
            t_last, tokens_since = now, 0
            if is_eval:
                record.update(_evaluate(steps.eval_step, state, eval_blocks, eval_batch_size, mesh))
                params = (state.params, state.frozen)
                _write_samples(workdir, cfg, tokenizer, graphdef, params, done, lead)
            if lead:
                _append_jsonl(metrics_path, record)
            progress.set_postfix(
                loss=f"{record['train_loss']:.3f}",
                eps=f"{eps:.3g}" + ("~" if plan.approximate else ""),
            )
        if done % cfg.train.checkpoint_every == 0 or done == plan.num_steps:
            save(done, plan.epsilon(done))
        progress.update(1)
    progress.close()

    # Finish: privacy statement, HF export, report.
    final_step = int(state.step)
    if mngr.latest_step() != final_step:
        save(final_step, plan.epsilon(final_step))
    summary = _privacy_record(plan, final_step, plan.epsilon(final_step))
    # Gathering sharded arrays is collective: every process takes part.
    host = sharding.to_host((state.params, state.frozen)) if cfg.train.export_hf else None
    if lead:
        (workdir / "privacy.json").write_text(json.dumps(summary, indent=2) + "\n")
        if cfg.train.export_hf:
            model = train.merge(graphdef, *host)
            if lora.has_lora(model):
                if cfg.train.export_peft and cfg.model.init == "pretrained":
                    base = str(cfg.model.name_or_path)
                    lora.save_peft_adapter(model, workdir / "peft", base_model_name_or_path=base)
                model = lora.merge_lora(model)  # a plain GPT2LMHeadModel
            hf.save_pretrained(model, workdir / "hf", tokenizer=tokenizer)
        from jaxdp import report

        report.plot(metrics_path, workdir / "report.png", title=plan.describe())
    mngr.close()
    return summary


def _privacy_record(plan: PrivacyPlan, steps: int, eps: float) -> dict[str, Any]:
    return {
        "epsilon": eps if math.isfinite(eps) else None,
        "delta": plan.target_delta,
        "epsilon_is_approximate": plan.approximate,
        "guarantee": plan.describe(),
        "accountant": plan.accountant,
        "steps": steps,
        "sampling_prob": plan.sampling_prob,
        "expected_batch_size": plan.expected_batch_size,
        "num_examples": plan.num_examples,
        "noise_multiplier": plan.noise_multiplier,
        "accounting_noise_multiplier": plan.accounting_noise_multiplier,
        "l2_clip_norm": plan.l2_clip_norm,
        "group_size": plan.group_size,
        "target_epsilon": plan.target_epsilon,
        "sampling_method": plan.sampling if plan.enabled else "shuffle (non-private)",
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "covers": COVERED,
        "not_covered": NOT_COVERED,
    }


def _write_samples(workdir, cfg, tokenizer, graphdef, params, step, lead: bool) -> None:
    for i, prompt in enumerate(cfg.train.sample_prompts):
        ids = data.tokenize(tokenizer, prompt)
        out = generate(
            graphdef,
            params,
            ids,
            max_new_tokens=cfg.train.sample_max_new_tokens,
            top_k=cfg.train.sample_top_k,
            key=jax.random.fold_in(jax.random.key(cfg.train.seed), i),
        )
        if not lead:
            continue
        text = tokenizer.decode(out.tolist())
        _append_jsonl(
            workdir / "samples.jsonl", {"step": step, "prompt": prompt, "completion": text}
        )
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
