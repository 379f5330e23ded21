"""The trainer behind `jaxdp train`: `run(settings, workdir)`, top to bottom in sections.

    checks -> mesh -> data -> plan -> model -> workdir -> optimizer -> restore -> loop -> finish

It takes typed `jaxdp.settings.Settings` (checked when they were made) and builds its parts with
`jaxdp.builders`; the run's identity and secrets are `jaxdp.resume`'s, the batches
`jaxdp.batches`', the evaluations `jaxdp.evaluators`'. It writes into `workdir` (layout:
`jaxdp.workdir`) only through the release boundary (`jaxdp.release`): publishable
`config.json`, `privacy.json`, `metrics.jsonl`, `samples.jsonl`, `report.png`, `hf/` (and
`peft/`), and the PRIVATE `private/` (secret randomness, checkpoints, noise-free training
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdp import builders, data, randomness, report, resume, sharding, steps
from jaxdp.batches import BatchMaker
from jaxdp.evaluators import LossEvaluator, SampleEvaluator
from jaxdp.memory import DeviceMemoryError
from jaxdp.params import merge
from jaxdp.release import RunRelease, describe_result, mechanism_record
from jaxdp.settings import ConfigError, Settings
from jaxdp.tracking import (
    Event,
)
from jaxdp.training_loop import TrainingLoop
from jaxdp.workdir import Workdir

__all__ = ["ConfigError", "DeviceMemoryError", "describe_result", "run"]
log = logging.getLogger("jaxdp")


def run(
    settings: Settings,
    workdir: str | Path,
    *,
    extra_train_blocks: np.ndarray | None = None,
    callbacks: Sequence[Callable[[Event], None]] = (),
    cancel: threading.Event | Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) the run of `settings` in `workdir`; returns its privacy record.

    `extra_train_blocks` [n, block_size] are appended to the training examples (privacy audits
    insert canaries this way)."""
    s = settings
    # ---- Checks: the workdir and the sources, before any slow work.
    wd = Workdir(workdir)
    wd.check_layout()
    resume.check_same_run(wd, {"config": resume.config_fingerprint(s)}, s, partial=True)
    train_source, eval_source = builders.checked_sources(s)

    # ---- Mesh (and multi-host start-up, if configured: before any other JAX computation).
    d = s.distributed
    sharding.initialize_distributed(
        d.coordinator_address, d.num_processes, d.process_id, mode=d.initialize
    )
    lead = jax.process_index() == 0  # the process that writes files other than checkpoints
    mesh = sharding.make_mesh(s.mesh.shape, s.mesh.axes)

    # ---- Model configuration (presets and config.json only), tokenizer and data.
    model_config, tokenizer = builders.model_config_and_tokenizer(s)
    train_rows, eval_rows = builders.load_rows(
        wd, train_source, eval_source, tokenizer, s.data, lead
    )
    if extra_train_blocks is not None and len(extra_train_blocks):
        train_rows = train_rows.append_blocks(extra_train_blocks)
    eval_rows = eval_rows.first_rows(s.data.max_eval_examples)
    builders.check_units(s.data, train_rows)

    # ---- Privacy plan: the noise multiplier, and the number of steps the budget allows.
    # The unit's description comes from the settings, never from the data (`describe_unit`).
    N, T = train_rows.num_units, train_rows.block_size
    unit = data.describe_unit(s.data.privacy_unit, T, s.data.max_blocks_per_unit)
    plan = builders.privacy_plan(s, N, unit=unit, unit_kind=s.data.privacy_unit)
    log.info(
        "%d training examples of %d tokens; %s; q=%.5g, sigma=%.4g, C=%g, %d steps%s",
        N,
        T,
        plan.describe(),
        plan.sampling_prob,
        plan.noise_multiplier,
        plan.l2_clip_norm,
        plan.num_steps,
        " (APPROXIMATE: batches not Poisson-sampled)" if plan.approximate else "",
    )
    builders.warn_about_hopeless_settings(plan, s.model)
    engine = builders.engine(s, plan, model_config)

    # ---- Model.
    model = builders.build_model(s.model, model_config, seed=s.train.seed)

    # ---- Workdir: the run's secret randomness is drawn and stored (private/run.json) at the
    # first start, once every check has passed; read back, fingerprint checked, at later ones.
    secrets = resume.open_run(wd, s, resume.run_fingerprint(s, plan, train_rows), lead)
    # Everything outside private/ is written through the release boundary (`jaxdp.release`).
    release = RunRelease(wd, enabled=lead, tensorboard=s.train.tensorboard)
    release.settings(s.to_dict())

    # ---- Optimizer and train state, sharded over the mesh.
    noise_key = secrets.noise_key() if plan.enabled else None
    tx = plan.optimizer(
        builders.build_optimizer(s.optim, plan.num_steps), noise_key, steps.group_names(engine)
    )
    try:
        graphdef, state = steps.init_state(model, tx, builders.trainable_patterns(s.model))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    log.info(
        "%d trainable parameters, %d frozen.",
        sum(x.size for x in jax.tree.leaves(state.params)),
        sum(x.size for x in jax.tree.leaves(state.frozen)),
    )
    del model
    state, compiled = steps.shard_and_jit(tx, plan, engine, state, mesh, graphdef=graphdef)
    batches = BatchMaker(plan, engine, mesh, train_rows, s.dp.physical_batch_size)
    sampler = plan.sampler(secrets.sampling)

    # ---- Restore, then the loop: the bookkeeping of every step (`jaxdp.training_loop`).
    loop = TrainingLoop(s, wd, plan, secrets, release, lead, callbacks)
    state = loop.restore(state, noise_key)
    loop.ledger = dict(
        model_config=dataclasses.asdict(model_config),
        trainable=list(builders.trainable_patterns(s.model)),
        lora=builders.lora_record(s.model),
        tokenizer=str(s.data.tokenizer),
    )
    eval_batch_size = math.ceil(s.train.eval_batch_size / mesh.size) * mesh.size
    loop.evaluators = [
        LossEvaluator(compiled.eval_step, eval_rows, eval_batch_size, mesh),
        SampleEvaluator(release, s.train, tokenizer, graphdef, lead),
    ]
    state, cancelled = loop.train(state, compiled, batches, sampler, train_rows, cancel)

    # ---- Finish: a final checkpoint, the privacy statement, the exports and the reports.
    final_step = int(state.step)
    if loop.ckpt.latest_step() != final_step:
        loop.save(state, final_step)
    summary = mechanism_record(plan, final_step, randomness=secrets.label)
    summary["planned_steps"] = plan.num_steps
    if cancelled:
        summary["cancelled"] = True
    # Gathering sharded arrays is collective: every process takes part.
    export = s.train.export_hf and not cancelled
    host = sharding.to_host((state.params, state.frozen)) if export else None
    release.privacy(summary)
    if export:
        release.model(
            merge(graphdef, *host), tokenizer, summary, base=builders.base_model(s.model),
            peft=s.train.export_peft,
        )  # fmt: skip
    title = plan.describe() + (f" ({randomness.FIXED_SEED_LABEL})" if loop.fixed_seed else "")
    release.report(title=title, target_epsilon=plan.target_epsilon if plan.enabled else None)
    if lead:
        report.plot_private(wd.private_metrics, wd.metrics, wd.private_report, title=title)
    release.finish()
    loop.close()
    loop.notify(Event("end", final_step, plan.num_steps, {"cancelled": cancelled, **summary}))
    return summary
