"""A run's identity across restarts: what must not change when a workdir is resumed, and its
secrets, drawn at the first start and read back at every later one (private/run.json)."""

from __future__ import annotations

from typing import Any

from jaxdp import data, randomness, sharding
from jaxdp.plan import PrivacyPlan
from jaxdp.settings import Settings
from jaxdp.workdir import RunMismatchError, RunRecord, Workdir, fingerprint_diff

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


def config_fingerprint(cfg: Settings) -> dict[str, Any]:
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


def run_fingerprint(cfg: Settings, plan: PrivacyPlan, train_rows: data.UnitRows) -> dict[str, Any]:
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


def check_same_run(wd: Workdir, fingerprint, cfg: Settings, *, partial: bool = False) -> None:
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


def open_run(
    wd: Workdir, cfg: Settings, fingerprint: dict[str, Any], lead: bool
) -> randomness.Secrets:
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
    check_same_run(wd, fingerprint, cfg)
    return RunRecord.load(wd.run_record).secrets
