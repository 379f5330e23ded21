"""The training run behind `jaxdp train` (and `scripts/train.py`), top to bottom in sections.

    checks -> mesh -> data -> plan -> model -> workdir -> optimizer -> restore -> loop -> finish

`run(config, workdir)` is the ONE place that reads the ConfigDict of
`jaxdp.config.default_config()`: everything it calls takes explicit arguments, and the
bookkeeping lives in small objects (`jaxdp.tracking`: metrics writer, progress bar, observers;
`jaxdp.checkpoint`; `jaxdp.workdir`). It writes into `workdir` (layout: `jaxdp.workdir`):
publishable `config.json`, `privacy.json`, `metrics.jsonl`, `samples.jsonl`, `report.png`, `hf/`
(and `peft/`), and the PRIVATE `private/` (secret randomness, checkpoints, noise-free training
diagnostics, the token cache).

Running it again on the same workdir resumes from the last checkpoint with the stored secrets; a
resumed run ends with the same parameters and epsilon as an uninterrupted one and replays the
steps it logged after its last checkpoint exactly. Observers (`callbacks`) receive an `Event` at
every step, eval and checkpoint; `cancel` (a `threading.Event` or a callable) stops the run after
the current step with a checkpoint and an honest privacy.json for the steps it ran.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from jaxdp import (
    checkpoint,
    clipping_plan,
    data,
    ghost,
    hf,
    lora,
    randomness,
    report,
    sampling,
    sharding,
    steps,
)
from jaxdp.adaptive import AdaptiveClipping
from jaxdp.clipping import CLIPPING_MODES
from jaxdp.generate import generate
from jaxdp.gpt2 import COMPUTE_DTYPES, PRESETS, GPT2Config, GPT2LMHeadModel, init_model
from jaxdp.params import merge
from jaxdp.plan import PrivacyPlan
from jaxdp.release import RunRelease, mechanism_record
from jaxdp.tracking import Event, MetricsWriter, Observers, Progress, should_stop
from jaxdp.workdir import RunMismatchError, RunRecord, Workdir, fingerprint_diff

log = logging.getLogger("jaxdp")

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
# Settings that may differ when a run is resumed: they change neither the examples nor the
# noise nor the trajectory (only logging, evaluation, export, float summation order), or the
# privacy plan's fingerprint stands in for them (the resolved noise multiplier, the number of
# examples). Everything else must match.
RESUMABLE_FIELDS = frozenset(
    {
        "model.public_name",  # a name in the exports' metadata, nothing trained
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
        "train.tensorboard",
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
# The ratio of the noise's standard deviation to the largest possible clipped mean gradient
# (sigma / B) above which training cannot move: every coordinate's noise exceeds the whole
# gradient's norm.
HOPELESS_NOISE_RATIO = 1.0


class ConfigError(ValueError):
    """The configuration cannot be run as given (one line says what to change)."""


def _one_row_units(d: ml_collections.ConfigDict) -> bool:
    """Every privacy unit is one row (block): what the ghost and fused engines clip."""
    return d.privacy_unit == "block" or d.max_blocks_per_unit == 1


class DeviceMemoryError(RuntimeError):
    """A step did not fit in the accelerator's memory (one line says what to lower)."""


def _out_of_memory(e: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def _memory_advice(cfg, step: int, latest: int | None, reason: str) -> str:
    """What to lower when a step ran out of device memory; the run continues from its last
    checkpoint with those settings (they may change on resume: RESUMABLE_FIELDS)."""
    dp = cfg.dp
    knobs = []
    if dp.enabled and dp.microbatch_size > 1:
        half = dp.microbatch_size // 2
        knobs.append(f"--config.dp.microbatch_size={half} (now {dp.microbatch_size})")
    ghost_fits = dp.group_size == 1 and _one_row_units(cfg.data)  # (as check_config asks)
    if dp.engine == "vmap" and dp.enabled and ghost_fits:
        knobs.append("--config.dp.engine=ghost --config.dp.ghost_strategy=plan")
    elif dp.engine == "ghost" and dp.ghost_strategy != "ghost":
        knobs.append("--config.dp.ghost_strategy=ghost (Gram-matrix norms: the least memory)")
    where = f"from its last checkpoint (step {latest})" if latest else "from the start"
    return (
        f"Step {step} ran out of device memory ({reason}). Lower what a step holds: "
        f"{' or '.join([*knobs, 'dp.physical_batch_size'])}; rerun the same command with that "
        f"and the run continues {where}: nothing is lost."
    )


# ============================================================================================
# The run.


def run(  # noqa: C901 (to be split into the thin trainer)
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    extra_train_blocks: np.ndarray | None = None,
    callbacks: Sequence[Callable[[Event], None]] = (),
    cancel: threading.Event | Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) the run described by `cfg` in `workdir`; returns its privacy record.

    `extra_train_blocks` [n, block_size] are appended to the training examples (privacy audits
    insert canaries this way)."""
    # ---- Checks: every setting, the workdir and the sources, before any slow work.
    check_config(cfg)
    wd = Workdir(workdir)
    wd.check_layout()
    _check_same_run(wd, {"config": config_fingerprint(cfg)}, cfg, partial=True)
    train_source, eval_source = text_sources(cfg.data)
    for source in (train_source, eval_source):
        if source is not None:
            source.check()
    hf.check_hub_access(
        model=cfg.model.name_or_path if cfg.model.init == "pretrained" else None,
        tokenizer=cfg.data.tokenizer,
        dataset=cfg.data.hf_dataset if cfg.data.source == "hf" else None,
    )

    # ---- Mesh (and multi-host start-up, if configured: before any other JAX computation).
    d = cfg.distributed
    sharding.initialize_distributed(
        d.coordinator_address, d.num_processes, d.process_id, mode=d.initialize
    )
    lead = jax.process_index() == 0  # the process that writes files other than checkpoints
    mesh = sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)

    # ---- Model configuration (cheap: presets and config.json only) and data.
    model_config = dataclasses.replace(
        model_configuration(cfg.model), compute_dtype=cfg.train.dtype
    )
    if model_config.n_positions < cfg.data.block_size:
        raise ConfigError(
            f"data.block_size={cfg.data.block_size} exceeds the model's n_positions="
            f"{model_config.n_positions}; use a smaller block size."
        )
    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    if cfg.model.init == "random":  # the embedding is sized to the tokenizer
        model_config = dataclasses.replace(model_config, vocab_size=len(tokenizer))
    elif model_config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"The tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model_config.vocab_size}: they do not belong together."
        )
    train_rows, eval_rows = load_rows(wd, train_source, eval_source, tokenizer, cfg.data, lead)
    if extra_train_blocks is not None and len(extra_train_blocks):
        train_rows = train_rows.append_blocks(extra_train_blocks)
    eval_rows = eval_rows.first_rows(cfg.data.max_eval_examples)
    N, T = train_rows.num_units, train_rows.block_size
    if cfg.data.expected_units is not None and N != cfg.data.expected_units:
        raise ConfigError(
            f"The training data has {N} privacy units, but the plan was made for "
            f"data.expected_units={cfg.data.expected_units}."
        )
    if N == 0:
        what = "complete block" if cfg.data.privacy_unit == "block" else "record"
        raise ConfigError(
            f"The training data gives no {what} of {T} tokens; use more text or a smaller "
            f"data.block_size."
        )

    # ---- Privacy plan: the noise multiplier, and the number of steps the budget allows.
    # The unit's description comes from the settings, never from the data (`describe_unit`).
    unit = data.describe_unit(cfg.data.privacy_unit, T, cfg.data.max_blocks_per_unit)
    plan = privacy_plan(cfg, N, unit=unit, unit_kind=cfg.data.privacy_unit)
    approx = " (APPROXIMATE: batches not Poisson-sampled)" if plan.approximate else ""
    log.info(
        "%d training examples of %d tokens; %s; q=%.5g, sigma=%.4g, C=%g, %d steps%s",
        N,
        T,
        plan.describe(),
        plan.sampling_prob,
        plan.noise_multiplier,
        plan.l2_clip_norm,
        plan.num_steps,
        approx,
    )
    _warn_about_hopeless_settings(plan, cfg.model)
    strategy = cfg.dp.ghost_strategy
    if strategy == "plan" and plan.enabled and cfg.dp.engine == "ghost":
        strategy = plan_layers(model_config, cfg.data.block_size, cfg.dp.microbatch_size)
    elif strategy == "plan":
        strategy = "auto"  # no ghost engine: nothing to plan
    engine = steps.Engine(
        cfg.dp.engine,
        strategy,
        cfg.dp.microbatch_size if plan.enabled else None,
        diagnostics=cfg.dp.diagnostics and plan.enabled,
    )

    # ---- Model.
    model = build_model(cfg.model, model_config, seed=cfg.train.seed)

    # ---- Workdir: the run's secret randomness is drawn and stored (private/run.json) at the
    # first start, once every check has passed; read back, fingerprint checked, at later ones.
    fingerprint = run_fingerprint(cfg, plan, train_rows)
    secrets = open_run(wd, cfg, fingerprint, lead)
    # Everything outside private/ is written through the release boundary (`jaxdp.release`).
    release = RunRelease(wd, enabled=lead, tensorboard=cfg.train.tensorboard)
    release.settings(cfg.to_dict())

    # ---- Optimizer and train state, sharded over the mesh.
    noise_key = secrets.noise_key() if plan.enabled else None
    tx = plan.optimizer(
        build_optimizer(cfg.optim, plan.num_steps), noise_key, steps.group_names(engine)
    )
    try:
        graphdef, state = steps.init_state(model, tx, trainable_patterns(cfg.model))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    log.info(
        "%d trainable parameters, %d frozen.",
        sum(x.size for x in jax.tree.leaves(state.params)),
        sum(x.size for x in jax.tree.leaves(state.frozen)),
    )
    del model
    state, compiled = steps.shard_and_jit(tx, plan, engine, state, mesh, graphdef=graphdef)
    batches = BatchMaker(plan, engine, mesh, train_rows, cfg.dp.physical_batch_size)
    sampler = plan.sampler(secrets.sampling)

    # ---- Restore.
    ckpt = checkpoint.Checkpointer(wd, keep=cfg.train.keep_checkpoints)
    start, examples_seen = 0, 0
    if (latest := ckpt.latest_step()) is not None:
        state, meta = ckpt.restore(latest, state)
        if plan.enabled and not steps.noise_key_matches(state, noise_key):
            raise RunMismatchError(
                f"The checkpoint at step {latest} in {wd.checkpoints} was written with another "
                f"noise key than {wd.run_record}: the two do not belong together. Use a new "
                f"--workdir."
            )
        start, examples_seen = int(state.step), int(meta["examples_seen"])
        log.info("Resumed at step %d (epsilon so far: %s).", start, meta["privacy"]["epsilon"])
    writer = MetricsWriter(wd, enabled=lead, tensorboard=cfg.train.tensorboard)  # private
    samples = SampleWriter(release, cfg.train, tokenizer, graphdef, lead)
    if lead:  # records of steps after the checkpoint: replayed below
        writer.truncate(start)
        release.truncate(start)
    sharding.sync_processes("jaxdp_logs")
    ledger = dict(
        model_config=dataclasses.asdict(model_config),
        trainable=list(trainable_patterns(cfg.model)),
        lora=lora_record(cfg.model),
        tokenizer=str(cfg.data.tokenizer),
    )
    notify = Observers(callbacks)
    eval_batch_size = math.ceil(cfg.train.eval_batch_size / mesh.size) * mesh.size

    def public_metrics(step: int) -> dict[str, Any]:
        return {**plan.metrics(step), "noise_seed_fixed_by_user": secrets.fixed_by_user}

    # Public records (epsilon, eval metrics, and the per-step DP releases: SNR estimate,
    # adaptive clip norms, released fractions) go to metrics.jsonl only once a checkpoint
    # covers their step: a step replayed after a crash (with other performance settings, hence
    # other rounding) reuses its noise, and must never publish a second, differently computed
    # release of it. (Private records are written at once.)
    pending_public: list[tuple[int, dict[str, Any]]] = []

    def publish(upto: int) -> None:
        while pending_public and pending_public[0][0] <= upto:
            release.metrics(*pending_public.pop(0))

    def save(step: int) -> None:
        privacy = mechanism_record(plan, step, randomness=secrets.label)
        ckpt.save(step, state, {"privacy": privacy, "examples_seen": examples_seen, **ledger})
        notify(Event("checkpoint", step, plan.num_steps))
        publish(step)

    def release_eval(step: int) -> dict[str, float]:
        """Eval metrics and samples: computed only from a CHECKPOINTED state, so that a crash
        can never make the run release a second, differently computed version of them (a
        replayed step may differ in float rounding, dropout masks or dropped cell members when
        performance settings change on resume, and would reuse the same noise)."""
        if ckpt.latest_step() != step:
            save(step)
        metrics = evaluate(compiled.eval_step, state, eval_rows, eval_batch_size, mesh)
        samples.write((state.params, state.frozen), step)
        if metrics:  # (no evaluation data: nothing to tell)
            notify(Event("eval", step, plan.num_steps, metrics))
        return metrics

    is_eval_step = lambda step: step % cfg.train.eval_every == 0 or step == plan.num_steps
    if start and is_eval_step(start) and not release.has_metric(start, "eval_loss"):
        # Killed between the checkpoint and its eval records: release them now, from it.
        release.metrics(start, {**public_metrics(start), **release_eval(start)})

    # ---- Loop.
    progress = Progress(cfg.train.progress and lead, start, plan.num_steps)
    dropout_key = secrets.dropout_key()
    label = "~" if plan.approximate else ""
    if secrets.fixed_by_user and plan.enabled:
        log.warning("dp.noise_seed is set: %s.", randomness.FIXED_SEED_LABEL)
        label += " (fixed seed)"
    notify(Event("start", start, plan.num_steps, public_metrics(start)))
    cancelled, t_last, tokens_since = False, time.perf_counter(), 0
    with progress.logging_above():
        for step in range(start, plan.num_steps):
            if should_stop(cancel):
                cancelled = True
                break
            idx = sampler.sample(step)
            step_key = randomness.dropout_step_key(dropout_key, step)
            try:
                acc = compiled.zero_accum(state.params, steps.clip_thresholds(state))
                for j, batch in enumerate(batches.physical(idx)):
                    key = jax.random.fold_in(step_key, j)
                    acc = compiled.grad_step(state.params, batch, key, acc, state.frozen)
                state, metrics = compiled.update_step(state, acc)
                jax.block_until_ready(metrics)  # an allocation failure surfaces here at last
            except jax.errors.JaxRuntimeError as e:
                if not _out_of_memory(e):
                    raise
                reason = str(e).strip().splitlines()[0][:200]
                raise DeviceMemoryError(
                    _memory_advice(cfg, step + 1, ckpt.latest_step(), reason)
                ) from e
            done = step + 1
            examples_seen += len(idx)
            tokens_since += int(train_rows.lengths[train_rows.rows_of(idx)].sum())
            _check_step(plan, metrics, done, ckpt)
            public = public_metrics(done)
            released = _host_values(metrics.pop("public", {}))  # DP releases (covered)
            private = _host_values(metrics)
            if done % cfg.train.log_every == 0 or is_eval_step(done) or done == 1:
                now = time.perf_counter()
                private.update(
                    examples_seen=examples_seen,
                    tokens_per_s=tokens_since / max(now - t_last, 1e-9),
                )
                t_last, tokens_since = now, 0
                if is_eval_step(done):
                    public.update(release_eval(done))  # (checkpointed at `done` first)
                writer.write(done, private)
                pending_public.append((done, {**public, **released}))
                if is_eval_step(done):
                    publish(done)  # release_eval's checkpoint covers it
            notify(Event("step", done, plan.num_steps, {**public, **released}, private))
            if done % cfg.train.checkpoint_every == 0 or done == plan.num_steps:
                if ckpt.latest_step() != done:
                    save(done)
            eps = public["epsilon"]
            postfix = {
                "loss": f"{private['train_loss']:.3f}",
                "eps": ("inf" if eps is None else f"{eps:.3g}") + label,
            }
            if "eval_loss" in public:
                postfix["eval"] = f"{public['eval_loss']:.3f}"
            progress.update(**postfix)
    progress.close()

    # ---- Finish: a final checkpoint, the privacy statement, the exports and the reports.
    final_step = int(state.step)
    if ckpt.latest_step() != final_step:
        save(final_step)
    summary = mechanism_record(plan, final_step, randomness=secrets.label)
    summary["planned_steps"] = plan.num_steps
    if cancelled:
        summary["cancelled"] = True
    # Gathering sharded arrays is collective: every process takes part.
    export = cfg.train.export_hf and not cancelled
    host = sharding.to_host((state.params, state.frozen)) if export else None
    release.privacy(summary)
    if export:
        release.model(
            merge(graphdef, *host), tokenizer, summary, base=base_model(cfg.model),
            peft=cfg.train.export_peft,
        )  # fmt: skip
    title = plan.describe()
    if secrets.fixed_by_user and plan.enabled:
        title += f" ({randomness.FIXED_SEED_LABEL})"
    release.report(title=title, target_epsilon=plan.target_epsilon if plan.enabled else None)
    if lead:
        report.plot_private(wd.private_metrics, wd.metrics, wd.private_report, title=title)
    release.finish()
    writer.close()
    ckpt.close()
    notify(Event("end", final_step, plan.num_steps, {"cancelled": cancelled, **summary}))
    return summary


# ============================================================================================
# Sections' helpers: each reads the part of the config it is given.


def check_config(cfg: ml_collections.ConfigDict) -> None:  # noqa: C901 (to typed settings)
    """One-line ConfigErrors for settings that cannot work, before any slow work."""
    m, d, dp, o, t = cfg.model, cfg.data, cfg.dp, cfg.optim, cfg.train
    choices = {
        "model.init": (m.init, ("pretrained", "random")),
        "data.source": (d.source, data.SOURCES),
        "data.privacy_unit": (d.privacy_unit, data.UNITS),
        "data.record_separator": (d.record_separator, data.SEPARATORS),
        "dp.sampling": (dp.sampling, ("poisson", "shuffle")),
        "dp.clipping": (dp.clipping, CLIPPING_MODES),
        "dp.engine": (dp.engine, steps.ENGINES),
        "dp.ghost_strategy": (dp.ghost_strategy, (*ghost.STRATEGIES, "plan")),
        "train.dtype": (t.dtype, COMPUTE_DTYPES),
        "dp.accountant": (dp.accountant, ("pld", "rdp")),
        "optim.name": (o.name, OPTIMIZERS),
        "optim.schedule": (o.schedule, SCHEDULES),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"Unknown {name} {value!r}; use one of {', '.join(allowed)}.")
    positive = {
        "dp.l2_clip_norm": dp.l2_clip_norm,
        "dp.expected_batch_size": dp.expected_batch_size,
        "optim.learning_rate": o.learning_rate,
        "train.eval_every": t.eval_every,
        "train.log_every": t.log_every,
        "train.checkpoint_every": t.checkpoint_every,
        "train.eval_batch_size": t.eval_batch_size,
    }
    for name, value in positive.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value!r}.")
    if not (isinstance(d.block_size, int) and d.block_size >= 2):
        raise ConfigError(
            f"data.block_size must be an integer >= 2 (one prediction needs two tokens), got "
            f"{d.block_size!r}."
        )
    if t.num_epochs is None and not (isinstance(t.num_steps, int) and t.num_steps >= 1):
        raise ConfigError(f"train.num_steps must be an integer >= 1, got {t.num_steps!r}.")
    if t.num_epochs is not None and not t.num_epochs > 0:
        raise ConfigError(f"train.num_epochs must be positive, got {t.num_epochs!r}.")
    if not (isinstance(dp.microbatch_size, int) and dp.microbatch_size >= 1):
        raise ConfigError(f"dp.microbatch_size must be an integer >= 1, got {dp.microbatch_size}.")
    if (
        dp.enabled
        and t.dtype != "float32"
        and dp.engine == "ghost"
        and dp.ghost_strategy in ("auto", "ghost")
    ):
        raise ConfigError(
            f"train.dtype={t.dtype!r} with dp.engine='ghost' needs dp.ghost_strategy 'plan' or "
            f"'instantiate': in low precision the ghost engine norms only per-example gradients "
            f"it instantiates (the values it sums), never Gram matrices."
        )
    if dp.physical_batch_size is not None and dp.physical_batch_size < 1:
        raise ConfigError(f"dp.physical_batch_size must be >= 1, got {dp.physical_batch_size}.")
    if dp.group_size < 1 or (dp.enabled and dp.microbatch_size < dp.group_size):
        raise ConfigError(
            f"dp.microbatch_size ({dp.microbatch_size}) must be at least dp.group_size "
            f"({dp.group_size} >= 1): a cell's drawn members share one microbatch."
        )
    if dp.group_size > 1 and dp.sampling != "poisson":
        raise ConfigError("dp.group_size > 1 needs dp.sampling='poisson'.")
    if (
        dp.enabled
        and dp.group_size > 1
        and not (isinstance(dp.num_cells, int) and dp.num_cells >= 1)
    ):
        raise ConfigError(
            f"dp.group_size={dp.group_size} needs dp.num_cells: a public number of cells fixed "
            f"before training (e.g. the number of units you expect / group_size), never computed "
            f"from the data (a removal that changed it would move every example to another "
            f"cell), got {dp.num_cells!r}."
        )
    if dp.engine == "ghost" and dp.group_size != 1:
        raise ConfigError("dp.engine='ghost' supports per-example clipping only (group_size=1).")
    if dp.engine in ("ghost", "fused") and dp.enabled and not _one_row_units(d):
        raise ConfigError(
            f"dp.engine={dp.engine!r} clips one row per privacy unit: use data.privacy_unit="
            f"'block' or data.max_blocks_per_unit=1, or the vmap engine, which norms each "
            f"unit's summed gradient."
        )
    if dp.engine == "fused" and dp.enabled:
        if dp.clipping != "per_layer":
            raise ConfigError("dp.engine='fused' clips per layer: set dp.clipping='per_layer'.")
        if dp.group_size != 1:
            raise ConfigError(
                "dp.engine='fused' clips one row per privacy unit: use dp.group_size=1 (or the "
                "vmap engine)."
            )
    if dp.enabled and dp.noise_multiplier is None and dp.target_epsilon is None:
        raise ConfigError("Set dp.noise_multiplier or dp.target_epsilon (or both).")
    for name in ("noise_multiplier", "target_epsilon"):
        value = dp[name]
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"dp.{name} must be a non-negative number, got {value}.")
    if dp.target_delta is not None and not 0 < dp.target_delta < 1:
        raise ConfigError(
            f"dp.target_delta must be in (0, 1) (and well below 1 / N), got {dp.target_delta}."
        )
    if m.lora_rank < 0:
        raise ConfigError(f"model.lora_rank must be >= 0, got {m.lora_rank}.")
    if m.dropout is not None and not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}.")
    if m.init == "random" and m.name_or_path.split("/")[-1] not in PRESETS:
        raise ConfigError(
            f"model.init='random' needs a preset name in model.name_or_path "
            f"({', '.join(PRESETS)}), got {m.name_or_path!r}."
        )
    if d.source in ("text_files", "jsonl", "csv") and not d.train_files:
        raise ConfigError(f"data.source={d.source!r} needs data.train_files.")
    if d.privacy_unit == "user" and d.source == "text_files":
        raise ConfigError(
            "data.privacy_unit='user' needs records with a user column (data.user_field): use "
            "data.source='jsonl', 'csv' or 'hf'."
        )
    if not (isinstance(d.max_blocks_per_unit, int) and d.max_blocks_per_unit >= 1):
        raise ConfigError(f"data.max_blocks_per_unit must be >= 1, got {d.max_blocks_per_unit!r}.")
    if d.privacy_unit != "block" and dp.group_size > 1:
        raise ConfigError(
            "dp.group_size > 1 (micro-batch clipping) needs data.privacy_unit='block'."
        )
    if dp.enabled and d.privacy_unit != "block" and dp.microbatch_size < d.max_blocks_per_unit:
        raise ConfigError(
            f"dp.microbatch_size ({dp.microbatch_size}) must be at least data.max_blocks_per_unit "
            f"({d.max_blocks_per_unit}): a unit's rows are summed within one microbatch."
        )


def text_sources(d: ml_collections.ConfigDict) -> tuple[data.TextSource, data.TextSource | None]:
    """(training source, evaluation source or None) of the data config."""
    common = dict(
        text_field=d.text_field,
        user_field=d.user_field if d.privacy_unit == "user" else None,
        record_separator=d.record_separator,
    )
    if d.source in ("text_files", "jsonl", "csv"):
        train = data.TextSource(d.source, files=tuple(d.train_files), **common)
        if not d.eval_files:
            return train, None
        return train, data.TextSource(d.source, files=tuple(d.eval_files), **common)

    def split(name):
        return data.TextSource(
            d.source, dataset=d.hf_dataset, config=d.hf_config, split=name, **common
        )

    return split(d.hf_train_split), (split(d.hf_eval_split) if d.hf_eval_split else None)


def load_rows(wd: Workdir, train_source, eval_source, tokenizer, d, lead: bool):
    """(train rows, eval rows) for the privacy unit (`jaxdp.data.UnitRows`), tokenized once into
    the private token cache by process 0 and memory-mapped by every process. Evaluation uses
    the same rows (records are evaluated as records, one unit each)."""
    cache = wd.private / "cache"
    rows = lambda source, unit: data.load_rows(
        source,
        tokenizer,
        d.block_size,
        unit=unit,
        max_blocks_per_unit=d.max_blocks_per_unit,
        cache_dir=cache,
    )

    def load():
        train = rows(train_source, d.privacy_unit)
        if eval_source is None:
            return train, data.block_rows(np.zeros(0, np.uint16), d.block_size)
        return train, rows(eval_source, "block" if d.privacy_unit == "block" else "record")

    blocks, error = None, None
    if lead:  # tokenizes once; the others wait, then memory-map the cache
        try:
            wd.make_private()
            blocks = load()
        except ValueError as e:  # a missing column, text that is not UTF-8, ...
            error = ConfigError(str(e))
        except Exception as e:  # reaches the other processes as an error, not a hang
            error = e
    sharding.sync_processes("jaxdp_token_cache")
    if error is not None:
        raise error
    try:
        return blocks if lead else load()
    except ValueError as e:
        raise ConfigError(str(e)) from e


def privacy_plan(
    cfg: ml_collections.ConfigDict,
    num_examples: int,
    unit: str | None = None,
    unit_kind: str = "block",
) -> PrivacyPlan:
    """The plan for `num_examples` privacy units (described by `unit`)."""
    dp, t = cfg.dp, cfg.train
    steps_or_epochs = dict(steps=t.num_steps) if t.num_epochs is None else dict(epochs=t.num_epochs)
    unit = unit or f"example (one block of {cfg.data.block_size} tokens)"
    units = dict(unit=unit, unit_kind=unit_kind)
    try:
        if not dp.enabled:
            return PrivacyPlan.non_private(
                num_examples=num_examples,
                batch_size=dp.expected_batch_size,
                **units,
                **steps_or_epochs,
            )
        return PrivacyPlan.create(
            num_examples=num_examples,
            expected_batch_size=dp.expected_batch_size,
            l2_clip_norm=dp.l2_clip_norm,
            noise_multiplier=dp.noise_multiplier,
            target_epsilon=dp.target_epsilon,
            target_delta=dp.target_delta,
            accountant=dp.accountant,
            sampling=dp.sampling,
            clipping=dp.clipping,
            group_size=dp.group_size,
            num_cells=dp.num_cells if dp.group_size > 1 else None,
            secure_noise=dp.secure_noise,
            adaptive=adaptive_clipping(dp),
            **units,
            **steps_or_epochs,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _host_values(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars as floats, vectors (per-group values) as lists of floats."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = float(v) if v.ndim == 0 else [float(x) for x in v.ravel()]
    return out


def adaptive_clipping(dp: ml_collections.ConfigDict) -> AdaptiveClipping | None:
    """dp.adaptive as settings (None when off); sigma_b defaults to expected_batch_size / 20."""
    a = dp.adaptive
    if not a.enabled:
        return None
    sigma_b = a.count_noise_multiplier
    return AdaptiveClipping(
        target_quantile=a.target_quantile,
        learning_rate=a.learning_rate,
        count_noise_multiplier=dp.expected_batch_size / 20 if sigma_b is None else sigma_b,
        min_clip_norm=a.min_clip_norm,
        max_clip_norm=a.max_clip_norm,
    )


def _warn_about_hopeless_settings(plan: PrivacyPlan, m: ml_collections.ConfigDict) -> None:
    ratio = plan.noise_multiplier / plan.expected_batch_size
    if plan.enabled and ratio >= HOPELESS_NOISE_RATIO:
        log.warning(
            "noise_multiplier / expected_batch_size = %.3g: the noise on every coordinate of the "
            "mean gradient is larger than the whole clipped gradient can be, so training will "
            "barely move the loss. Raise the target epsilon, the batch size or the dataset size.",
            ratio,
        )
    if m.lora_rank and m.init == "random":
        log.warning(
            "LoRA adapters on a randomly initialised base model: the frozen weights are noise. "
            "LoRA is meant for fine-tuning pretrained weights (model.init='pretrained')."
        )


def model_configuration(m: ml_collections.ConfigDict) -> GPT2Config:
    """The architecture (a preset, or a pretrained model's config.json): cheap, no weights."""
    overrides = {}
    if m.dropout is not None:
        overrides = dict(resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout)
    if m.init == "random":
        return GPT2Config.preset(m.name_or_path, **overrides)
    config = hf.load_hf_config(hf.resolve_model_dir(m.name_or_path, revision=m.revision))
    return dataclasses.replace(config, **overrides)


def plan_layers(config: GPT2Config, seq_len: int, microbatch: int) -> str | tuple:
    """dp.ghost_strategy="plan": each dense layer's strategy for this microbatch size
    (`jaxdp.clipping_plan`; a low-precision model instantiates every layer, its only option)."""
    if config.compute_dtype != "float32":
        log.info("Clipping plan: a %s model: every layer instantiated.", config.compute_dtype)
        return "instantiate"
    try:
        chosen = clipping_plan.plan(config, seq_len, microbatch, microbatch_sizes=[microbatch])
    except ValueError as e:  # even Gram norms everywhere are over the memory budget
        log.warning("%s Using Gram-matrix norms for every layer (the least memory).", e)
        return "ghost"
    log.info("Clipping plan: %s", chosen.describe())
    return chosen.strategies


def build_model(m: ml_collections.ConfigDict, config: GPT2Config, seed: int) -> GPT2LMHeadModel:
    """The model: random (public `seed`) or pretrained weights, plus LoRA adapters."""
    if m.init == "random":
        model = init_model(config, seed=seed)
    else:
        model = hf.from_pretrained(m.name_or_path, revision=m.revision, config=config)
    if m.lora_rank:
        lora.apply_lora(model, m.lora_rank, m.lora_alpha, m.lora_targets, seed=seed)
    return model


def trainable_patterns(m: ml_collections.ConfigDict) -> tuple[str, ...]:
    """model.trainable, or only the LoRA adapters when LoRA is on and nothing else is asked."""
    if m.trainable:
        return tuple(m.trainable)
    return (lora.LORA_PATTERN,) if m.lora_rank else ()


def lora_record(m: ml_collections.ConfigDict) -> dict[str, Any] | None:
    if not m.lora_rank:
        return None
    return {"rank": m.lora_rank, "alpha": m.lora_alpha, "targets": list(m.lora_targets)}


def build_optimizer(o: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    if o.schedule == "constant":
        lr = optax.constant_schedule(o.learning_rate)
    else:
        lr = optax.cosine_decay_schedule(o.learning_rate, max(1, num_steps - o.warmup_steps))
    if o.warmup_steps:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), lr], [o.warmup_steps]
        )
    if o.name == "sgd":
        return optax.sgd(lr, momentum=o.momentum or None)
    if o.name == "adam":
        return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)


# ---- Fingerprint and run record ------------------------------------------------------------


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


def run_fingerprint(cfg, plan: PrivacyPlan, train_rows: data.UnitRows) -> dict[str, Any]:
    """What a run is: its settings, its training data (a hash: kept private), its plan."""
    out = {
        "config": config_fingerprint(cfg),
        "data_sha256": train_rows.sha256(),
        "plan": plan.fingerprint(),
        # The noise's keys per value (2 since 128-bit noise): an older checkpoint's noise state
        # holds one key and cannot continue with two.
        "noise_keys": randomness.NOISE_KEY_STREAMS,
        # A cosine schedule's horizon shapes every step; a constant one does not depend on it.
        "lr_schedule_steps": plan.num_steps if cfg.optim.schedule == "cosine" else None,
    }
    if plan.adaptive is not None and plan.clipping == "per_layer":
        # Per-layer adaptive thresholds are kept per clipping group, which the engine defines
        # (the fused engine splits the tied embedding): the engine cannot change on resume.
        out["clipping_groups"] = "fused" if cfg.dp.engine == "fused" else "tensors"
    return out


def _check_same_run(wd: Workdir, fingerprint, cfg, *, partial: bool = False) -> None:
    """Refuses to continue a workdir whose run differs (in `fingerprint`'s keys if partial)."""
    if not wd.run_record.exists():
        return
    record = RunRecord.load(wd.run_record)
    saved = record.fingerprint
    if partial:
        saved = {k: saved.get(k) for k in fingerprint}
    diffs = fingerprint_diff(saved, fingerprint)
    if not diffs:
        return
    changed = fingerprint_diff(record.settings, cfg.to_dict())
    settings = f" Changed settings: {'; '.join(changed)}." if changed and not partial else ""
    raise RunMismatchError(
        f"{wd.root} holds a different run ({'; '.join(diffs)}).{settings} Continuing it would "
        f"add the same noise to other gradients and mix two runs' privacy accounting. Use a new "
        f"--workdir, or restore the original settings. (To train a finished run longer, fix "
        f"dp.noise_multiplier to its value in privacy.json and raise train.num_steps.)"
    )


def open_run(wd: Workdir, cfg, fingerprint: dict[str, Any], lead: bool) -> randomness.Secrets:
    """The run's secrets: read from private/run.json, or drawn and stored at the first start.

    Process 0 creates the record; every process then reads it (a shared file system). An error
    on process 0 reaches the others as a missing record, not as a wait forever."""
    error = None
    if lead and not wd.run_record.exists():
        try:
            leftovers = wd.released()
            if leftovers:
                raise RunMismatchError(
                    f"{wd.root} holds outputs of an earlier run ({leftovers[0].name}) but not its "
                    f"secret randomness (private/run.json): it cannot be continued privately. "
                    f"Use a new --workdir."
                )
            seed = cfg.dp.noise_seed
            secrets = (
                randomness.Secrets.generate()
                if seed is None
                else randomness.Secrets.from_seed(seed)
            )
            wd.make_private()
            RunRecord(secrets, fingerprint, cfg.to_dict()).create(wd.run_record)
        except RunMismatchError as e:
            error = e
    sharding.sync_processes("jaxdp_run_record")
    if error is not None:
        raise error
    if not wd.run_record.exists():
        raise RunMismatchError(f"Process 0 could not start the run in {wd.root}; see its error.")
    _check_same_run(wd, fingerprint, cfg)
    return RunRecord.load(wd.run_record).secrets


# ---- The loop's parts ----------------------------------------------------------------------


class BatchMaker:
    """Drawn privacy units -> padded physical batches of fixed shape, sharded over the mesh.

    Physical batches hold whole microbatches (`engine.microbatch_size` rows per device). A unit
    of several rows (a record cut into blocks, a user's records, or a micro-batch clipping
    cell) has its rows in one microbatch, with `segment_ids` naming the unit; rows shorter than
    the block carry a `token_mask`."""

    def __init__(self, plan: PrivacyPlan, engine, mesh, rows: data.UnitRows, physical=None):
        self.mesh, self.rows = mesh, rows
        self.micro = (engine.microbatch_size or 1) * mesh.size
        if plan.enabled and plan.sampling == "poisson":
            default = sampling.default_physical_batch_size(
                plan.expected_batch_size, plan.num_examples, self.micro, rows.counts
            )
        else:
            default = int(round(plan.expected_batch_size)) * rows.cap
        self.size = int(math.ceil((physical or default) / self.micro) * self.micro)
        self.units = None  # the clipping unit of every row, when units have several rows
        if plan.enabled and plan.group_size > 1:
            self.units = sampling.content_cells(rows.tokens, plan.num_cells)
        elif plan.enabled and rows.several_rows:
            self.units = rows.unit_of_row

    def physical(self, units: np.ndarray):
        rows = self.rows.rows_of(units)
        if self.units is None:
            chunks = [(r, pad, None) for r, pad in sampling.pad_batches(rows, self.size)]
        else:
            packed, dropped = sampling.pack_units(rows, self.units[rows], self.size, self.micro)
            if dropped:
                log.warning("%d drawn rows beyond a microbatch per unit were left out.", dropped)
            chunks = [(b.rows, b.is_padding, b.segment_ids) for b in packed]
        for r, is_padding, segment_ids in chunks:
            yield put_rows(self.rows, r, is_padding, self.mesh, segment_ids)


def put_rows(rows: data.UnitRows, r: np.ndarray, is_padding, mesh, segment_ids=None):
    """The physical batch of rows `r` (tokens, padding, token mask, segments) on the mesh."""
    batch = sharding.global_batch({"tokens": rows.tokens}, r, mesh)
    per_row = {"is_padding": is_padding}
    if rows.padded:
        per_row["token_mask"] = rows.token_mask(r)  # [P, T], for these rows only
    if segment_ids is not None:
        per_row["segment_ids"] = segment_ids
    batch.update(sharding.global_batch(per_row, np.arange(len(r)), mesh))
    return batch


def _check_step(plan: PrivacyPlan, metrics, done: int, ckpt) -> None:
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
            f"checkpoint (step {ckpt.latest_step()}) is unaffected."
        )


def evaluate(eval_step, state, rows: data.UnitRows, batch_size: int, mesh) -> dict[str, float]:
    """Token-weighted loss, perplexity and accuracy on held-out rows (public data)."""
    if len(rows.lengths) == 0:
        return {}
    sums = {"loss_sum": 0.0, "num_tokens": 0.0, "num_correct": 0.0}
    for r, is_padding in sampling.pad_batches(np.arange(len(rows.lengths)), batch_size):
        out = eval_step(state.params, put_rows(rows, r, is_padding, mesh), state.frozen)
        for k in sums:
            sums[k] += float(out[k])
    loss = sums["loss_sum"] / sums["num_tokens"]
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 700.0)),
        "eval_accuracy": sums["num_correct"] / sums["num_tokens"],
    }


class SampleWriter:
    """Continuations of `train.sample_prompts` at each eval, released into samples.jsonl (the
    model is post-processed with public randomness)."""

    def __init__(
        self, release: RunRelease, t: ml_collections.ConfigDict, tokenizer, graphdef, lead
    ):
        self.release = release
        self.prompts, self.max_new_tokens = tuple(t.sample_prompts), t.sample_max_new_tokens
        self.top_k, self.seed = t.sample_top_k, t.seed
        self.tokenizer, self.graphdef, self.lead = tokenizer, graphdef, lead

    def write(self, params, step: int) -> None:
        for i, prompt in enumerate(self.prompts):
            out = generate(
                self.graphdef,
                params,
                data.tokenize(self.tokenizer, prompt),
                max_new_tokens=self.max_new_tokens,
                top_k=self.top_k,
                key=randomness.generation_key(self.seed, i),
            )
            if self.lead:
                text = self.tokenizer.decode(out.tolist())
                self.release.sample(step, prompt, text)
                log.info("Sample at step %d: %s|%s", step, prompt, text)


def base_model(m: ml_collections.ConfigDict) -> str | None:
    """The pretrained base model for the model card and PEFT: `model.public_name` if set, else
    name_or_path (a local one by absolute path)."""
    if m.init != "pretrained":
        return None
    if m.public_name:
        return str(m.public_name)
    base = str(m.name_or_path)
    if Path(base).expanduser().is_dir():  # a local base: where it is, for any cwd
        base = str(Path(base).expanduser().resolve())
    return base


def describe_result(summary: dict[str, Any]) -> str:
    """One line for the console: steps and epsilon with every label it carries."""
    eps = summary["epsilon"]
    steps_done = summary["steps"]
    if summary.get("delta") is None:
        return f"{steps_done} steps, non-private"
    if eps is None:
        return f"{steps_done} steps, {summary['guarantee']}"
    labels = []
    if summary["epsilon_is_approximate"]:
        labels.append("APPROXIMATE: batches not Poisson-sampled")
    if summary.get("randomness") == randomness.FIXED_SEED_LABEL:
        labels.append(randomness.FIXED_SEED_LABEL)
    label = f" ({'; '.join(labels)})" if labels else ""
    return f"{steps_done} steps, epsilon = {eps:.4g} at delta = {summary['delta']:.3g}{label}"
