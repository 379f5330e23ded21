"""A run's bookkeeping: metrics writer, progress bar, events for observers, cancellation.

Metric keys are namespaced so that the data itself says what the run's epsilon covers:
`public/...` (computed from the noisy model and public data: epsilon, eval metrics) and
`private/...` (noise-free statistics of the training data: train loss, batch sizes, ...).
They are kept apart on disk too: public records go to W/metrics.jsonl (and W/tensorboard) through
`jaxdp.release`, private ones to W/private/metrics.jsonl (and W/private/tensorboard) through
`MetricsWriter`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jaxdp.workdir import Workdir

PUBLIC, PRIVATE = "public", "private"
log = logging.getLogger("jaxdp")


def namespaced(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}/{k}": v for k, v in values.items()}


class JsonlLog:
    """An append-only JSON-lines file of records with a "step" (written by process 0 only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def append(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate(self, last_step: int) -> None:
        """Drops the records of steps after `last_step` (logged by a run that died after its
        last checkpoint: the resumed run replays them exactly)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))


class MetricsWriter:
    """The private diagnostics, one record per logged step: W/private/metrics.jsonl and, when
    tensorboardX is installed, W/private/tensorboard. (Public records are released by
    `jaxdp.release.RunRelease`, the only writer outside W/private.)"""

    def __init__(self, wd: Workdir, *, enabled: bool = True, tensorboard: bool = True):
        self.private = JsonlLog(wd.private_metrics, enabled)
        self._board = None
        if enabled and tensorboard and importlib.util.find_spec("tensorboardX") is not None:
            # tensorboardX is optional: TensorBoard logs are written when it is installed.
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional)

            self._board = SummaryWriter(str(wd.private / "tensorboard"))

    def truncate(self, last_step: int) -> None:
        self.private.truncate(last_step)

    def write(self, step: int, private: dict[str, Any]) -> None:
        if not private:
            return
        record = {"step": step, **namespaced(PRIVATE, private)}
        self.private.append(record)
        if self._board is not None:
            for tag, value in record.items():
                if tag != "step" and isinstance(value, (int, float)):
                    self._board.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._board is not None:
            self._board.close()


def read_metrics(path: str | Path, prefix: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics file, with the `prefix/` of their keys removed if given."""
    path = Path(path)
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if prefix is None:
        return records
    cut = len(prefix) + 1
    return [
        {(k[cut:] if k.startswith(prefix + "/") else k): v for k, v in r.items()} for r in records
    ]


@dataclasses.dataclass(frozen=True)
class Event:
    """What the training loop tells its observers.

    kind: "start" (before the first step), "step" (after every step), "eval", "checkpoint",
      "end" (after the last step, or when cancelled: `public["cancelled"]`).
    public: values covered by epsilon (epsilon, eval metrics); private: noise-free training
      statistics (train loss, ...), for the data holder only."""

    kind: str
    step: int
    num_steps: int
    public: dict[str, Any] = dataclasses.field(default_factory=dict)
    private: dict[str, Any] = dataclasses.field(default_factory=dict)


Callback = Callable[[Event], None]


class Observers:
    """Calls every registered callback with each event; a failing observer is logged, never
    allowed to stop training."""

    def __init__(self, callbacks=()):
        self.callbacks: list[Callback] = list(callbacks)

    def __call__(self, event: Event) -> None:
        for callback in self.callbacks:
            try:
                callback(event)
            except Exception:  # an observer must not kill the run
                log.exception("Observer %r failed on a %s event.", callback, event.kind)


def should_stop(cancel: threading.Event | Callable[[], bool] | None) -> bool:
    """Whether cancellation was requested (an Event that is set, or a callable returning True)."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


class Progress:
    """A tqdm bar of logical steps with loss, epsilon and eval loss; log lines are printed
    above it, not glued to it."""

    def __init__(self, enabled: bool, start: int, total: int):
        self._bar = (
            tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
            if enabled
            else None
        )
        self._postfix: dict[str, str] = {}

    @contextlib.contextmanager
    def logging_above(self) -> Iterator[None]:
        """Routes the "jaxdp" logger through tqdm.write while the bar is shown."""
        if self._bar is None:
            yield
            return
        with logging_redirect_tqdm(loggers=[log]):
            yield

    def update(self, **postfix: str) -> None:
        if self._bar is None:
            return
        self._postfix.update(postfix)
        self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def host_values(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars as floats, vectors (per-group values) as lists of floats."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = float(v) if v.ndim == 0 else [float(x) for x in v.ravel()]
    return out


def check_step(plan, metrics, done: int, ckpt) -> None:
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
