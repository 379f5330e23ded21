"""Orbax checkpoints of a run (in W/private/checkpoints), with the privacy ledger beside the arrays.

A checkpoint at step t holds the `TrainState` (params and optimizer state, including the noise
transform's secret key and counter) and a JSON `meta` record: the privacy ledger (steps taken,
sampling probability, noise multiplier, clip norm, accountant, epsilon spent so far), the number
of examples seen, and the model/tokenizer needed to rebuild the model. The Poisson sampler and
the dropout keys are stateless functions of (secret seed, step), so restoring step t resumes
exactly. Checkpoints are PRIVATE: they hold the noise key and noise-free statistics.

A checkpoint that cannot be read raises `CheckpointError`: silently restarting from scratch
would spend the privacy budget twice. (Whether it belongs to the same run is checked against
W/private/run.json, see `jaxdp.workdir`.)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxdp.workdir import Workdir

META_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or belongs to a different run configuration."""


def manager(workdir: str | os.PathLike, *, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    directory = Workdir(workdir).checkpoints
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    meta = {"version": META_VERSION, **meta}
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    mngr.wait_until_finished()


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])
    except Exception as e:
        raise CheckpointError(
            f"Checkpoint {mngr.directory}/{step} has no readable metadata ({e}). It may be "
            f"corrupt; move it away to resume from an earlier checkpoint, or use a new workdir."
        ) from e


def restore(
    mngr: ocp.CheckpointManager, step: int, abstract_state: Any
) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of checkpoint `step`; raises CheckpointError if it cannot be read."""
    meta = read_meta(mngr, step)
    try:
        restored = mngr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
    except Exception as e:
        raise CheckpointError(
            f"Checkpoint {mngr.directory}/{step} could not be restored ({type(e).__name__}: {e}). "
            f"It may be corrupt or from another model; it was NOT silently replaced."
        ) from e
    return restored["state"], meta


def abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def load_model_from_workdir(workdir: str | os.PathLike, step: int | None = None):
    """(model, tokenizer name) from a run directory's latest (or given) checkpoint.

    LoRA adapters, if the run had them, are merged into the returned plain GPT-2."""
    from flax import nnx

    from jaxdp import lora
    from jaxdp.gpt2 import GPT2Config, GPT2LMHeadModel

    mngr = manager(workdir, max_to_keep=None)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"No checkpoint in {Workdir(workdir).checkpoints}.")
    meta = read_meta(mngr, step)
    config, lora_cfg = GPT2Config(**meta["model_config"]), meta.get("lora")

    def build():
        model = GPT2LMHeadModel(config, rngs=nnx.Rngs(0))
        if lora_cfg:
            lora.apply_lora(model, lora_cfg["rank"], lora_cfg["alpha"], lora_cfg["targets"])
        return model

    model = nnx.eval_shape(build)  # structure only; the values come from the checkpoint
    graphdef, params, frozen = nnx.split(model, lora.trainable_filter(meta["trainable"]), ...)
    try:
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract(params), "frozen": abstract(frozen)},
                    partial_restore=True,
                )
            ),
        )
    except Exception as e:
        raise CheckpointError(f"Checkpoint {mngr.directory}/{step} could not be read: {e}") from e
    state = restored["state"]
    model = nnx.merge(graphdef, state["params"], state["frozen"])
    if lora_cfg:
        model = lora.merge_lora(model)
    return model, meta.get("tokenizer")
