"""A step that does not fit in the accelerator's memory: one error naming what to lower."""

from __future__ import annotations

from jaxdp.settings import Settings


class DeviceMemoryError(RuntimeError):
    """A step did not fit in the accelerator's memory (one line says what to lower)."""


def out_of_memory(e: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def memory_advice(cfg: Settings, step: int, latest: int | None, reason: str) -> str:
    """What to lower when a step ran out of device memory; the run continues from its last
    checkpoint with those settings (they may change on resume: RESUMABLE_FIELDS)."""
    dp = cfg.dp
    knobs = []
    if dp.enabled and dp.microbatch_size > 1:
        half = dp.microbatch_size // 2
        knobs.append(f"--config.dp.microbatch_size={half} (now {dp.microbatch_size})")
    ghost_fits = dp.group_size == 1 and cfg.data.one_row_units  # (as Settings asks)
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
