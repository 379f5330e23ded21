"""Orbax checkpoints of a run (in W/private/checkpoints), verified by content checksums.

A checkpoint at step t holds the `TrainState` (params and optimizer state, including the noise
transform's secret key and counter) and a JSON `meta` record: the privacy ledger (steps taken,
sampling probability, noise multiplier, clip norm, accountant, epsilon spent so far), the number
of examples seen, and the model/tokenizer needed to rebuild the model. The Poisson sampler and
the dropout keys are stateless functions of (secret seed, step), so restoring step t resumes
exactly. Checkpoints are PRIVATE: they hold the noise key and noise-free statistics.

After a save has completed, `Checkpointer` writes the sha256 of every file of the checkpoint to
W/private/checksums/<step>.json, and verifies them before restoring: a bit flip or a truncated
file is a one-line `CheckpointError` naming the step and how to fall back to the previous one,
never corrupted weights. Silently restarting from scratch instead would spend the privacy budget
twice, so no error here ever does that.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxdp import lora
from jaxdp.gpt2 import GPT2Config, GPT2LMHeadModel
from jaxdp.params import trainable_filter
from jaxdp.workdir import Workdir

META_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, corrupt or incomplete."""


def manager(workdir: str | os.PathLike, *, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    directory = Workdir(workdir).checkpoints
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _files_sha256(step_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[path.relative_to(step_dir).as_posix()] = h.hexdigest()
    return out


def _short(e: BaseException) -> str:
    """An exception as one short line (orbax and TensorStore errors embed pages of specs)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:160]}" + ("..." if len(first) > 160 else "")


class Checkpointer:
    """Saves and restores a run's checkpoints, with content checksums (module docstring)."""

    def __init__(self, wd: Workdir, *, keep: int | None = 3):
        self.wd = wd
        self.mngr = manager(wd.root, max_to_keep=keep)
        self.checksums = wd.private / "checksums"

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def _step_dir(self, step: int) -> Path:
        return Path(self.mngr.directory) / str(step)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        meta = {"version": META_VERSION, **meta}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.mngr.save(step, args=args, force=True)
        self.mngr.wait_until_finished()
        if jax.process_index() == 0:  # after the save has completed on every process
            self.checksums.mkdir(parents=True, exist_ok=True)
            record = {"step": step, "files": _files_sha256(self._step_dir(step))}
            tmp = self.checksums / f"{step}.json.tmp"
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(tmp, self.checksums / f"{step}.json")
            kept = {str(s) for s in self.mngr.all_steps()}
            for old in self.checksums.glob("*.json"):
                if old.stem not in kept:
                    old.unlink()

    def _fallback_hint(self, step: int) -> str:
        earlier = [s for s in self.mngr.all_steps() if s < step]
        moved = f"{self._step_dir(step)}.bad"
        if earlier:
            return (
                f"To resume from step {max(earlier)} instead, move it away (mv "
                f"{self._step_dir(step)} {moved}) and run the same command again."
            )
        return (
            f"It is the only checkpoint: move it away (mv {self._step_dir(step)} {moved}) and "
            f"delete private/run.json only if you accept starting over with new noise (the "
            f"privacy spent so far then adds to the new run's)."
        )

    def verify(self, step: int) -> None:
        """Raises CheckpointError unless every file of checkpoint `step` matches its checksum."""
        path = self.checksums / f"{step}.json"
        bad = f"Checkpoint {step} in {self.mngr.directory}"
        if not path.exists():
            raise CheckpointError(
                f"{bad} has no checksum record (its save did not complete). "
                f"{self._fallback_hint(step)}"
            )
        expected = json.loads(path.read_text())["files"]
        actual = _files_sha256(self._step_dir(step))
        if actual != expected:
            changed = sorted(set(expected) ^ set(actual)) + sorted(
                k for k in set(expected) & set(actual) if expected[k] != actual[k]
            )
            raise CheckpointError(
                f"{bad} is corrupt ({len(changed)} file(s) changed or missing, e.g. "
                f"{changed[0]}). {self._fallback_hint(step)}"
            )

    def read_meta(self, step: int) -> dict[str, Any]:
        return read_meta(self.mngr, step)

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of checkpoint `step`, shaped and sharded like `like` (verified first)."""
        self.verify(step)
        meta = self.read_meta(step)
        try:
            restored = self.mngr.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract(like)))
            )
        except Exception as e:
            raise CheckpointError(
                f"Checkpoint {step} in {self.mngr.directory} could not be restored ({_short(e)}); "
                f"it may be from another model. {self._fallback_hint(step)}"
            ) from None
        return restored["state"], meta

    def close(self) -> None:
        self.mngr.close()


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])
    except Exception as e:
        raise CheckpointError(
            f"Checkpoint {mngr.directory}/{step} has no readable metadata ({_short(e)}). It may "
            f"be corrupt; move it away to resume from an earlier checkpoint, or use a new workdir."
        ) from None


def load_model_from_workdir(workdir: str | os.PathLike, step: int | None = None):
    """(model, tokenizer name) from a run directory's latest (or given) checkpoint, verified.

    LoRA adapters, if the run had them, are merged into the returned plain GPT-2."""
    ckpt = Checkpointer(Workdir(workdir), keep=None)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {Workdir(workdir).checkpoints}.")
        ckpt.verify(step)
        meta = ckpt.read_meta(step)
        config, lora_cfg = GPT2Config(**meta["model_config"]), meta.get("lora")

        def build():
            model = GPT2LMHeadModel(config, rngs=nnx.Rngs(0))
            if lora_cfg:
                lora.apply_lora(model, lora_cfg["rank"], lora_cfg["alpha"], lora_cfg["targets"])
            return model

        model = nnx.eval_shape(build)  # structure only; the values come from the checkpoint
        graphdef, params, frozen = nnx.split(model, trainable_filter(meta["trainable"]), ...)
        try:
            restored = ckpt.mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item={"params": abstract(params), "frozen": abstract(frozen)},
                        partial_restore=True,
                    )
                ),
            )
        except Exception as e:
            raise CheckpointError(
                f"Checkpoint {step} in {ckpt.mngr.directory} could not be read ({_short(e)})."
            ) from None
    finally:
        ckpt.close()
    state = restored["state"]
    model = nnx.merge(graphdef, state["params"], state["frozen"])
    if lora_cfg:
        model = lora.merge_lora(model)
    return model, meta.get("tokenizer")
