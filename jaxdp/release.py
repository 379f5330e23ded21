"""The release boundary: everything that leaves the private part of a run goes through here.

A run directory's publishable files (config.json, privacy.json, metrics.jsonl, samples.jsonl,
report.png, tensorboard/, hf/, peft/) are written by `RunRelease` alone, and `make_private`'s
`record()` is `mechanism_record`. Every field they hold comes from one of three `Source`s:

- `SETTING`: the run's settings (public by construction), or a constant text;
- `PUBLIC_N`: documented public: the number of privacy units N, treated as public as in the
  DP-SGD literature, and what follows from it with the settings alone (q = B / N, the default
  delta = 1 / (10 N), delta * N, epsilon, a noise multiplier calibrated to a target, the
  number of steps that epochs or a budget give);
- `NOISED`: a noised release (the parameters; the per-step releases of the noise transform:
  the SNR estimated from the noisy sum, adaptive clipping's thresholds and noisy fractions), or
  a function of it and public data (eval metrics on the public eval set, samples from public
  prompts with public randomness, the exported model).

A field is written only if its source is declared here (`PRIVACY_FIELDS`, `METRIC_FIELDS`,
`SAMPLE_FIELDS`); anything else raises `ReleaseError`, so a new output must say why it may
leave. Files that are not field lists are pure renderings of the released fields
(`render_report`: report.png from metrics.jsonl; `model_card`: hf/README.md from privacy.json;
`render_board`: tensorboard/ from metrics.jsonl, with the step as its wall time). None of them
holds a timing: the files' modification times are set to `RELEASE_MTIME` when the run ends.

`jaxdp.neighbours` checks all of this differentially: a run on D, on D + x and on D - x with the
same secrets must release byte-identical SETTING fields, PUBLIC_N fields that are the plan's
for each dataset's N, and NOISED fields that are functions of the released model.
"""

from __future__ import annotations

import enum
import gzip
import json
import math
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jaxdp import hf, lora
from jaxdp.randomness import FIXED_SEED_LABEL
from jaxdp.tracking import JsonlLog, namespaced, read_metrics
from jaxdp.workdir import Workdir


class Source(enum.Enum):
    """Where a released field comes from (see the module docstring)."""

    SETTING = "setting"
    PUBLIC_N = "documented public: N and the settings"
    NOISED = "noised release, or a function of it and public data"


S, N, R = Source.SETTING, Source.PUBLIC_N, Source.NOISED

# privacy.json (and make_private's record(), the model card, the service's job result).
PRIVACY_FIELDS: dict[str, Source] = {
    "epsilon": N,
    "delta": N,  # the default is 1 / (10 N)
    "delta_times_num_examples": N,
    "epsilon_is_approximate": S,
    "guarantee": S,
    "randomness": S,  # how the secrets were chosen: a label, never a secret
    "accountant": S,
    "steps": N,  # epochs / q, a budget, or the steps run before a cancel (the operator's act)
    "planned_steps": N,
    "cancelled": S,  # the operator's act
    "sampling_prob": N,
    "expected_batch_size": S,
    "num_examples": N,
    "privacy_unit": S,  # `jaxdp.data.describe_unit`: kind, block size and configured cap
    "epsilon_per": S,
    "noise_multiplier": N,  # a setting, or calibrated from the target at N
    "accounting_noise_multiplier": N,
    "l2_clip_norm": S,
    "clipping": S,
    "group_size": S,
    "num_cells": S,
    "secure_noise": S,
    "adaptive_clipping": N,  # settings, and the gradient's share of a calibrated sigma
    "target_epsilon": S,
    "sampling_method": S,
    "neighbouring_relation": S,
    "public_parameters": S,
    "covers": S,
    "not_covered": S,
    "group_privacy": S,
    "per_example_gradient_bound": S,  # the reward model's: a property of its loss
}

# One record of metrics.jsonl (keys without their "public/" prefix).
METRIC_FIELDS: dict[str, Source] = {
    "step": S,
    "epsilon": N,
    "epsilon_is_approximate": S,
    "delta": N,
    "noise_multiplier": N,
    "sampling_prob": N,
    "noise_seed_fixed_by_user": S,
    "noise_to_batch": N,  # sigma / B
    "snr_estimate": R,  # from the noisy sum
    "clip_norm": R,  # adaptive clipping: released with noise
    "clip_thresholds": R,
    "fraction_below": R,
    "eval_loss": R,  # the released model on the public eval set
    "eval_ppl": R,
    "eval_accuracy": R,
    "heldout_accuracy": R,  # the reward model on public held-out preferences
}

# The reward model's report.json.
REWARD_REPORT_FIELDS: dict[str, Source] = {
    "heldout_accuracy": R,
    "epsilon": N,
    "delta": N,
    "steps": N,
    "num_train": N,
    "num_heldout": S,  # the public held-out set's size
    "noise_multiplier": N,
    "expected_batch_size": S,
    "lora_rank": S,
}

# One record of samples.jsonl: the released model continuing public prompts.
SAMPLE_FIELDS: dict[str, Source] = {"step": S, "prompt": S, "completion": R}

PUBLIC_PREFIX = "public"
# Every released file's modification time (1980-01-01, the earliest a zip archive holds): the
# time a file was written would tell how long tokenizing and training took on the private data.
RELEASE_MTIME = 315532800
BOARD_FILE = "events.out.tfevents.0000000000.jaxdp"


class ReleaseError(RuntimeError):
    """A field without a declared source was about to leave the private part (a bug)."""


def checked(record: dict[str, Any], fields: dict[str, Source], what: str) -> dict[str, Any]:
    """`record` if each of its fields has a declared source in `fields`; else ReleaseError."""
    unknown = sorted(set(record) - set(fields))
    if unknown:
        raise ReleaseError(
            f"{what} would release {', '.join(unknown)}, which no source in jaxdp.release "
            f"declares: add each to its field list with the reason it may leave the private "
            f"part (a setting, documented public, or a noised release), or keep it private."
        )
    return record


def mechanism_record(plan, steps: int | None = None, *, randomness: str | None = None) -> dict:
    """The publishable privacy statement of `plan` after `steps` steps (privacy.json, and
    `make_private(...).record()`)."""
    return checked(plan.record(steps, randomness=randomness), PRIVACY_FIELDS, "privacy.json")


def public_settings(settings: dict[str, Any]) -> str:
    """config.json: the run's settings (a fixed noise seed is kept private)."""
    settings = json.loads(json.dumps(settings, default=str))
    if settings.get("dp", {}).get("noise_seed") is not None:
        settings["dp"]["noise_seed"] = "<fixed by the user: kept in private/run.json>"
    return json.dumps(settings, indent=2, default=str) + "\n"


class RunRelease:
    """The only writer of a run directory's publishable files (process 0 when `enabled`)."""

    def __init__(self, wd: Workdir, *, enabled: bool = True, tensorboard: bool = True):
        self.wd, self.enabled, self.tensorboard = wd, enabled, tensorboard
        self._metrics = JsonlLog(wd.metrics, enabled)
        self._samples = JsonlLog(wd.samples, enabled)

    # ---- field lists ---------------------------------------------------------------------

    def settings(self, settings: dict[str, Any]) -> None:
        if self.enabled:
            self.wd.config.write_text(public_settings(settings))

    def privacy(self, record: dict[str, Any]) -> None:
        checked(record, PRIVACY_FIELDS, "privacy.json")
        if self.enabled:
            self.wd.privacy.write_text(json.dumps(record, indent=2) + "\n")

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        """One public metrics record (metrics.jsonl, and tensorboard/ when enabled)."""
        checked({"step": step, **values}, METRIC_FIELDS, "metrics.jsonl")
        if not values:
            return
        self._metrics.append({"step": step, **namespaced(PUBLIC_PREFIX, values)})
        self._sync_board()

    def sample(self, step: int, prompt: str, completion: str) -> None:
        record = {"step": step, "prompt": prompt, "completion": completion}
        self._samples.append(checked(record, SAMPLE_FIELDS, "samples.jsonl"))

    def truncate(self, last_step: int) -> None:
        """Drops the records of steps after `last_step` (a resumed run replays them)."""
        self._metrics.truncate(last_step)
        self._samples.truncate(last_step)
        self._sync_board()

    def has_metric(self, step: int, key: str) -> bool:
        records = read_metrics(self.wd.metrics, PUBLIC_PREFIX)
        return any(r.get("step") == step and key in r for r in records)

    # ---- renderings of released fields ----------------------------------------------------

    def json(self, name: str, record: dict[str, Any], fields: dict[str, Source]) -> None:
        """Another released JSON file of field list `fields` (the reward model's report)."""
        checked(record, fields, name)
        if self.enabled:
            (self.wd.root / name).write_text(json.dumps(record, indent=2) + "\n")

    def report(self, *, title: str, target_epsilon: float | None) -> None:
        if self.enabled:
            render_report(self.wd.metrics, self.wd.report, title, target_epsilon)

    def model(self, model, tokenizer, record: dict[str, Any], *, base: str | None, peft: bool):
        """hf/ (LoRA merged: a plain GPT2LMHeadModel) and, for LoRA on a pretrained base with
        `peft`, peft/; each with a model card stating `record`'s guarantee."""
        from jaxdp import report  # noqa: PLC0415 (matplotlib, the train extra: only here)

        checked(record, PRIVACY_FIELDS, "the model card")
        if not self.enabled:
            return
        card = report.model_card(record, base_model=base)
        if lora.has_lora(model):
            if peft and base is not None:
                lora.save_peft_adapter(model, self.wd.peft, base_model_name_or_path=base)
                (self.wd.peft / "README.md").write_text(card)
            model = lora.merge_lora(model)
        hf.save_pretrained(model, self.wd.hf, tokenizer=tokenizer)
        (self.wd.hf / "README.md").write_text(card)

    def finish(self) -> None:
        """Every released file's modification time set to RELEASE_MTIME (the run directory's
        and private/'s too). Creation and change times cannot be reset: publish the files'
        contents (`archive`), not the directory itself."""
        if self.enabled:
            for path in [*public_paths(self.wd), self.wd.private, self.wd.root]:
                if path.exists():
                    os.utime(path, (RELEASE_MTIME, RELEASE_MTIME))

    def _sync_board(self) -> None:
        if self.enabled and self.tensorboard:
            render_board(self.wd.metrics, self.wd.root / "tensorboard")


def public_paths(wd: Workdir) -> list[Path]:
    """Every file and directory of the run directory outside private/."""
    return sorted(p for p in wd.root.rglob("*") if p != wd.private and wd.private not in p.parents)


def archive(wd: Workdir, out: str | Path) -> Path:
    """A deterministic .tar.gz of the run's publishable files (sorted; every entry's time
    RELEASE_MTIME, owner 0, mode 0644/0755): what to publish, with no file system timing."""

    out = Path(out)
    with (
        out.open("wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,  # (no name, no time)
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in public_paths(wd):
            info = tarfile.TarInfo(path.relative_to(wd.root).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = RELEASE_MTIME, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = path.stat().st_size, 0o644
                with path.open("rb") as f:
                    tar.addfile(info, f)
    return out


def render_report(metrics_path: Path, out_path: Path, title: str, target_epsilon) -> Path:
    """report.png: a function of metrics.jsonl and two settings."""
    from jaxdp import report  # noqa: PLC0415 (matplotlib, the train extra)

    return report.plot_public(metrics_path, out_path, title=title, target_epsilon=target_epsilon)


def render_board(metrics_path: Path, out_dir: Path) -> Path | None:
    """tensorboard/: the public metrics as TensorBoard scalars, from metrics.jsonl alone, with
    each event's wall time set to its step (a real clock would time the private data). Written
    whole each time (an atomic replace). None when tensorboardX is not installed."""
    try:
        from tensorboardX.proto import event_pb2, summary_pb2  # noqa: PLC0415 (optional)
        from tensorboardX.record_writer import RecordWriter  # noqa: PLC0415 (optional)
    except ImportError:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = out_dir / BOARD_FILE, out_dir / f".{BOARD_FILE}.tmp"
    writer = RecordWriter(str(tmp))
    writer.write(event_pb2.Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString())
    for record in read_metrics(metrics_path):
        step = int(record["step"])
        values = [
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in record.items()
            if tag != "step" and _scalar(value)
        ]
        if values:
            event = event_pb2.Event(
                wall_time=float(step), step=step, summary=summary_pb2.Summary(value=values)
            )
            writer.write(event.SerializeToString())
    writer.close()
    os.replace(tmp, path)
    return path


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def board_scalars(out_dir: Path) -> Iterable[tuple[int, float, str, float]]:
    """(step, wall time, tag, value) of every scalar in tensorboard/ (for tests and readers)."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415 (optional)

    data = (out_dir / BOARD_FILE).read_bytes()
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 8], "little")
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            yield event.step, event.wall_time, value.tag, value.simple_value


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
    if summary.get("randomness") == FIXED_SEED_LABEL:
        labels.append(FIXED_SEED_LABEL)
    label = f" ({'; '.join(labels)})" if labels else ""
    return f"{steps_done} steps, epsilon = {eps:.4g} at delta = {summary['delta']:.3g}{label}"
