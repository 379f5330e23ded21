"""Jobs of the service: what one is, its privacy plan and ledger check, and the worker.

A job fine-tunes a base model (a local Hugging Face directory or a Hub id) on one uploaded
dataset with DP-SGD: LoRA adapters (or the parameters matching `trainable` regexes), one record
= one privacy unit. At submission (`plan_job`) the noise multiplier is calibrated to the job's
target epsilon for the dataset's record count, and the job's DP event is composed with every
earlier job's on every dataset that holds one of the same records (dp-accounting's PLD
accountant, `ledger_epsilon`; records are matched by keyed digest, so a re-upload or an
overlapping dataset carries what was spent): a job that would take any record over its
tenant's cap is refused with the numbers, and an accepted one reserves its planned steps. When
it ends, its entry is set to the steps it actually ran (a failed or cancelled job counts them;
nothing is ever refunded, not even when the dataset is deleted).

The worker (`run_worker`, one process per accelerator host, started with the `spawn` method)
claims jobs from the database, heart-beats while it runs one, and runs it with `jaxdp.run.run`
in W/tenants/<tenant>/jobs/<id>/: progress events go to the database (server-sent to the
page), cancellation is read from it between steps. A worker that dies is replaced by the
server that started it, which hands its job back at once (`supervision`); a remote worker's job
is claimed again after the heartbeat timeout. The job then resumes from its checkpoint with its
stored secrets and ends with the parameters and epsilon of an uninterrupted job.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import os
import re
import shutil
import threading
import time
import traceback
import zipfile
from pathlib import Path
from typing import Annotated, Any

import dp_accounting
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased, sessionmaker

from jaxdp import accounting, data, release
from jaxdp import run as run_lib
from jaxdp import settings as settings_lib
from jaxdp.plan import PrivacyPlan
from jaxdp.serve import db
from jaxdp.tracking import Event

log = logging.getLogger("jaxdp.serve")
ARTIFACTS = ("peft.zip", "hf.zip", "privacy.json", "report.png")
MAX_STEPS = 1_000_000  # a job's steps, given or from its epochs
MAX_CLAIMS = 3  # a job claimed more often took its workers down: it fails instead


Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]


def _optional(schema: dict[str, Any]) -> None:
    """An optional field without a value (None: left out; an explicit null is refused)."""
    schema.pop("default", None)


class JobSpec(BaseModel):
    """What a tenant asks for (the API's job body): `steps` or `epochs`, not both. Unknown fields
    are refused, and every number is bounded."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"oneOf": [{"required": ["steps"]}, {"required": ["epochs"]}]},
    )

    dataset_id: str = Field(min_length=1, max_length=64)
    base_model: str = Field(
        min_length=1, max_length=100, description="the name of a base model the admin registered"
    )
    lora_rank: int = Field(
        8, ge=0, le=1024, description="0: train the `trainable` parameters instead"
    )
    lora_targets: list[Name] = Field(["attn.c_attn", "attn.c_proj"], max_length=64)
    trainable: list[Name] = Field(
        [], max_length=64, description="regexes of parameter paths to train"
    )
    target_epsilon: float = Field(gt=0, le=1000)
    target_delta: float = Field(
        None,
        gt=0,
        lt=1,
        description="the tenant's delta (fixed when the tenant was created)",
        json_schema_extra=_optional,
    )
    epochs: float = Field(None, gt=0, le=10_000, json_schema_extra=_optional)
    steps: int = Field(None, ge=1, le=MAX_STEPS, json_schema_extra=_optional)
    expected_batch_size: float = Field(16, ge=1, le=1_000_000)
    l2_clip_norm: float = Field(1.0, gt=0, le=1e6)
    learning_rate: float = Field(1e-3, gt=0, le=10)
    block_size: int = Field(128, ge=2, le=8192)
    max_blocks_per_record: int = Field(1, ge=1, le=64)
    microbatch_size: int = Field(8, ge=1, le=4096)
    checkpoint_every: int = Field(None, ge=1, le=1_000_000, json_schema_extra=_optional)
    eval_dataset_id: str = Field(None, min_length=1, max_length=64, json_schema_extra=_optional)

    @classmethod
    def stored(cls, spec: dict[str, Any]) -> JobSpec:
        """A job's spec as the database holds it, or the part of it a plan depends on: checked
        when it was submitted, not again (an older version stored unset fields as null and
        knew none of today's bounds)."""
        return cls.model_construct(**{k: v for k, v in spec.items() if v is not None})

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict) and (nulls := sorted(k for k, v in data.items() if v is None)):
            raise ValueError(f"null is not a value ({', '.join(nulls)}): leave the field out")
        return data

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> JobSpec:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give the number of steps or of epochs (one of them)")
        if self.lora_rank == 0 and not self.trainable:
            raise ValueError("with lora_rank 0, name the trainable parameters (regexes)")
        for pattern in self.trainable:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"trainable: {pattern!r} is not a regex ({e})") from None
        return self


def plan_job(spec: JobSpec, num_records: int, delta: float) -> PrivacyPlan:
    """The job's privacy plan at its tenant's `delta`: the noise multiplier for its target, on
    record units (each distinct uploaded record: uploads are de-duplicated)."""
    if spec.epochs is not None:  # steps = ceil(epochs / q), q = batch / records (PrivacyPlan)
        steps = math.ceil(spec.epochs * num_records / spec.expected_batch_size)
        if steps > MAX_STEPS:
            raise ValueError(
                f"{spec.epochs:g} epochs of {num_records} records at an expected batch size of "
                f"{spec.expected_batch_size:g} is {steps} steps, over the limit of {MAX_STEPS}: "
                f"ask for fewer epochs or a larger batch."
            )
    if spec.target_delta is not None and spec.target_delta != delta:
        raise ValueError(
            f"target_delta={spec.target_delta:g} differs from the tenant's delta {delta:g}: every "
            f"job, the cap and the ledger are stated at the tenant's delta (leave it out)."
        )
    return PrivacyPlan.create(
        num_examples=num_records,
        expected_batch_size=spec.expected_batch_size,
        steps=spec.steps,
        epochs=spec.epochs,
        l2_clip_norm=spec.l2_clip_norm,
        target_epsilon=spec.target_epsilon,
        target_delta=delta,
        unit=data.describe_unit("record", spec.block_size, spec.max_blocks_per_record),
        unit_kind="record",
    )


Entry = tuple[float, float, int]  # (accounting noise multiplier, sampling probability, steps)


def ledger_epsilon(entries: list[Entry], delta: float) -> float:
    """Epsilon of composing jobs' DP events (accounting noise multiplier, q, steps): PLD, at
    the discretization `accounting.pld_interval` gives the smallest noise multiplier (as the
    jobs' own plans were calibrated). The composition of each set of events is computed once."""
    return _composed_epsilon(tuple(sorted(e for e in entries if e[2] > 0)), delta)


@accounting.single_flight
def _composed_epsilon(entries: tuple[Entry, ...], delta: float) -> float:
    if not entries:
        return 0.0
    events = [accounting.dpsgd_event(s, q, n) for s, q, n in entries]
    interval = accounting.pld_interval(min(s for s, _, _ in entries))
    acc = accounting.make_accountant("pld", pld_discretization=interval)
    return float(acc.compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(delta))


def clear_caches() -> None:
    """Forgets every composition computed in this process (see `planning.Planner.run`)."""
    _composed_epsilon.cache_clear()


def ledger_groups(s: Session, tenant_id: str, dataset_id: str) -> list[list[Entry]]:
    """The DP events each record of a dataset is in, grouped: a record's events are those of
    every job on every dataset (of this tenant, deleted or not) that holds the same record. One
    group per distinct set of such datasets, keeping only the sets no other set contains."""
    mine, other = aliased(db.DatasetRecord), aliased(db.DatasetRecord)
    rows = s.execute(
        select(mine.digest, other.dataset_id)
        .join(other, (other.digest == mine.digest) & (other.tenant_id == tenant_id))
        .where(mine.dataset_id == dataset_id)
    )
    holders: dict[str, set[str]] = collections.defaultdict(set)
    for digest, holder in rows:
        holders[digest].add(holder)
    sets = {frozenset(h) for h in holders.values()} or {frozenset([dataset_id])}
    maximal = [g for g in sets if not any(g < h for h in sets)]
    entries = s.scalars(
        select(db.LedgerEntry).where(db.LedgerEntry.dataset_id.in_(set().union(*maximal)))
    ).all()
    return sorted(  # a canonical order: two reads of an unchanged ledger compare equal
        sorted((e.noise_multiplier, e.sampling_prob, e.steps) for e in entries if e.dataset_id in g)
        for g in maximal
    )


def worst_record_epsilon(groups: list[list[Entry]], delta: float, *new: Entry) -> float:
    """Epsilon of the dataset's worst-off record, with the events `new` added to each group."""
    return max(ledger_epsilon([*g, *new], delta) for g in groups)


# ---- The run of one job -------------------------------------------------------------------------


def job_dir(workdir: Path, job: db.Job) -> Path:
    return Path(workdir) / "tenants" / job.tenant_id / "jobs" / job.id


def job_settings(
    spec: JobSpec, plan: dict[str, Any], base: str, data_file: str, eval_file: str | None
) -> settings_lib.Settings:
    """The training settings of a job: the plan's noise multiplier and steps, fixed; `base`
    the registered base model's source."""
    steps = plan["steps"]
    s = settings_lib
    return s.Settings(
        model=s.ModelSettings(
            name_or_path=base,
            init="pretrained",
            dropout=0.0,
            public_name=spec.base_model,  # the registered name, never the server's path
            lora_rank=spec.lora_rank,
            lora_targets=tuple(spec.lora_targets),
            trainable=tuple(spec.trainable),
        ),
        data=s.DataSettings(
            source="jsonl",
            train_files=(data_file,),
            eval_files=(eval_file,) if eval_file else (),
            tokenizer=base,
            block_size=spec.block_size,
            privacy_unit="record",
            max_blocks_per_unit=spec.max_blocks_per_record,
            expected_units=plan["num_examples"],
        ),
        dp=s.DPSettings(
            noise_multiplier=plan["noise_multiplier"],
            target_epsilon=None,
            target_delta=plan["delta"],
            expected_batch_size=float(spec.expected_batch_size),
            l2_clip_norm=float(spec.l2_clip_norm),
            microbatch_size=max(spec.microbatch_size, spec.max_blocks_per_record),
        ),
        optim=s.OptimSettings(name="adamw", learning_rate=spec.learning_rate),
        train=s.TrainSettings(
            num_steps=steps,
            eval_every=steps,
            log_every=1,
            checkpoint_every=spec.checkpoint_every or max(1, steps // 10),
            sample_prompts=(),
            progress=False,
            tensorboard=False,
        ),
    )


class LeaseLost(RuntimeError):
    """Another worker claimed the job (this one stopped heart-beating for too long)."""


class _Heartbeat:
    """Refreshes the job's heartbeat from a thread; reads the job's cancel flag."""

    def __init__(self, sessions: sessionmaker, job_id: str, worker: str, interval: float):
        self.sessions, self.job_id, self.worker, self.interval = sessions, job_id, worker, interval
        self.lost = False
        with sessions() as s:
            self.cancel = bool(s.get(db.Job, job_id).cancel_requested)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not db.heartbeat(self.sessions, self.job_id, self.worker):
                    self.lost = True
                with self.sessions() as s:
                    self.cancel = bool(s.get(db.Job, self.job_id).cancel_requested)
            except Exception:  # a database hiccup: the next beat tries again
                log.exception("Heartbeat of job %s failed.", self.job_id)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def should_stop(self) -> bool:
        if self.lost:  # never write into a workdir another worker now owns
            raise LeaseLost(f"Job {self.job_id} was claimed by another worker.")
        return self.cancel


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The zip entries' date: release.RELEASE_MTIME in UTC (never the server's local time).
RELEASE_DATE = time.gmtime(release.RELEASE_MTIME)[:6]


def _zip_dir(directory: Path, out: Path) -> None:
    """A zip of `directory` whose entries carry no timing: the fixed date 1980-01-01 00:00 and
    mode 0644, whatever the files' times or the server's time zone."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                info = zipfile.ZipInfo(path.relative_to(directory).as_posix(), RELEASE_DATE)
                info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
                z.writestr(info, path.read_bytes())


def collect_artifacts(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The job's downloads (everything publishable: never W/private), each with its sha256."""
    out_dir = run_dir / "artifacts"
    out_dir.mkdir(exist_ok=True)
    for name in ("peft", "hf"):
        if (run_dir / name).is_dir():
            _zip_dir(run_dir / name, out_dir / f"{name}.zip")
    for name in ("privacy.json", "report.png"):
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, out_dir / name)
    for path in out_dir.iterdir():  # no timing in a download (its Last-Modified, its zip)
        os.utime(path, (release.RELEASE_MTIME, release.RELEASE_MTIME))
    return {
        p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(out_dir.iterdir())
        if p.name in ARTIFACTS
    }


def run_job(sessions: sessionmaker, workdir: Path, job: db.Job, worker: str, interval: float):
    """Runs (or resumes) one claimed job to its end, recording progress and the ledger."""
    spec = JobSpec.stored(job.spec)
    with sessions() as s:
        dataset = s.get(db.Dataset, job.dataset_id)
        eval_set = s.get(db.Dataset, spec.eval_dataset_id) if spec.eval_dataset_id else None
    run_dir = job_dir(workdir, job)
    steps_run, state, error, summary = int(job.progress.get("step", 0)), "failed", None, None

    reported = steps_run  # a resumed job repeats the steps after its last checkpoint

    def observe(event: Event) -> None:
        nonlocal steps_run
        if event.kind == "step":
            steps_run = max(steps_run, event.step)  # (a replayed step releases nothing new)
            if event.step <= reported:  # the stream stays monotone in step: each step once
                return
            data = {
                "step": event.step,
                "num_steps": event.num_steps,
                "epsilon": event.public.get("epsilon"),
                # Not noised: the tenant's own view of its data, never in an artifact.
                "private": {"train_loss": event.private.get("train_loss")},
            }
            db.add_event(sessions, job.id, "step", data)
        elif event.kind == "eval":
            db.add_event(sessions, job.id, "eval", {"step": event.step, **event.public})

    try:
        if dataset is None or dataset.deleted_at is not None:
            raise FileNotFoundError("The job's dataset was deleted before the job ran.")
        base = job.base_source
        if base is None:
            raise FileNotFoundError("The job names no registered base model.")
        settings = job_settings(
            spec, job.plan, base, dataset.path, eval_set.path if eval_set else None
        )
        with _Heartbeat(sessions, job.id, worker, interval) as beat:
            summary = run_lib.run(settings, run_dir, callbacks=[observe], cancel=beat.should_stop)
        steps_run = summary["steps"]
        state = "cancelled" if summary.get("cancelled") else "succeeded"
    except LeaseLost:
        log.warning("Job %s: claimed by another worker; this one stops.", job.id)
        return
    except Exception as e:  # the job failed: record why, and what it spent
        error = f"{type(e).__name__}: {e}"
        log.error(
            "Job %s of tenant %s failed: %s\n%s",
            job.id,
            job.tenant_id,
            error,
            traceback.format_exc(),
        )
    artifacts = {}
    if state == "succeeded":
        try:
            artifacts = collect_artifacts(run_dir)
        except Exception as e:  # packing failed: the job failed (its steps stay charged)
            state, error = "failed", f"Packing the results failed: {type(e).__name__}: {e}"
            log.error("Job %s: %s\n%s", job.id, error, traceback.format_exc())
    finish_job(sessions, job, state, error, steps_run, summary, artifacts)


def finish_job(sessions, job, state, error, steps_run, summary=None, artifacts=None) -> None:
    """Records a job's end: its state, and in the ledger the steps it actually ran."""
    log.info("Job %s of tenant %s ended: %s, %d steps.", job.id, job.tenant_id, state, steps_run)
    with sessions.begin() as s:
        row = s.get(db.Job, job.id)
        row.state, row.error, row.finished_at = state, error, db.now()
        row.result, row.artifacts = summary, artifacts or {}
        entry = s.scalar(select(db.LedgerEntry).where(db.LedgerEntry.job_id == job.id))
        entry.steps, entry.final = steps_run, True  # what it actually ran
        s.add(db.JobEvent(job_id=job.id, kind="end", data={"state": state, "error": error}))


def run_worker(
    workdir: str | Path,
    db_url: str,
    *,
    worker_id: str | None = None,
    poll_interval: float = 2.0,
    heartbeat_interval: float = 5.0,
    heartbeat_timeout: float = 60.0,
    max_jobs: int | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Claims and runs jobs until stopped (or until `max_jobs` have run)."""
    workdir = Path(workdir).expanduser().resolve()
    # Jobs of all tenants share the compiled programs (JAX's persistent compilation cache).
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(workdir / "cache" / "jax"))
    worker = worker_id or f"{os.uname().nodename}:{os.getpid()}"
    sessions = db.connect(db_url)
    done = 0
    log.info("Worker %s started on %s.", worker, db_url)
    while not (stop is not None and stop.is_set()) and (max_jobs is None or done < max_jobs):
        job = db.claim_job(sessions, worker, heartbeat_timeout)
        if job is None:
            time.sleep(poll_interval)
            continue
        done += 1
        steps = int((job.progress or {}).get("step", 0))
        if job.claims > MAX_CLAIMS:  # it took its workers down each time: never again
            error = f"The job stopped its worker {job.claims - 1} times; it is not retried."
            log.error("Job %s of tenant %s: %s", job.id, job.tenant_id, error)
            finish_job(sessions, job, "failed", error, steps)
            continue
        log.info(
            "Worker %s runs job %s of tenant %s (claim %d).",
            worker,
            job.id,
            job.tenant_id,
            job.claims,
        )
        try:
            run_job(sessions, workdir, job, worker, heartbeat_interval)
        except Exception as e:  # never the worker's end: the job fails, charged what it ran
            log.exception("Job %s of tenant %s could not be run.", job.id, job.tenant_id)
            finish_job(sessions, job, "failed", f"{type(e).__name__}: {e}", steps)


def cap_message(spent: float, planned: float, cap: float, delta: float) -> str:
    return (
        f"This job would take the dataset to epsilon = {planned:.4g} (spent so far: {spent:.4g}) "
        f"at delta = {delta:.3g}, over the tenant's cap of {cap:g}. Lower the target epsilon, "
        f"train fewer epochs, or upload new data."
    )
