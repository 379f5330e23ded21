"""Device mesh, batch and parameter shardings, and multi-host start-up.

Data parallelism: the (padded) physical batch is sharded over every mesh axis, so each device
computes and clips the per-example gradients of its own examples; the sum over examples in the
jitted step becomes a cross-device reduction inserted by XLA. The Gaussian noise is drawn in the
update step from one key shared by all devices, with JAX's sharding-invariant PRNG, so it is the
same noise a single device would draw: one draw per step, not one per device.

FSDP (ZeRO-3 style): with an `fsdp` mesh axis, parameters and optimizer state are additionally
sharded along their largest dimension divisible by that axis' size, and gathered by XLA where a
computation needs them. Results equal the data-parallel ones up to float summation order.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdp.params import PyTree

log = logging.getLogger("jaxdp")

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MIN_SHARDED_SIZE = 2**14  # smaller arrays are replicated: sharding them costs more than it saves


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    mode: str = "auto",
) -> bool:
    """Starts multi-host JAX if configured; returns True if this is a multi-process run.

    mode "auto": explicit arguments, else `jax.distributed.initialize()` when the environment
    shows a multi-process job (SLURM with several tasks, `JAX_COORDINATOR_ADDRESS`, TPU worker
    variables); "always": call `jax.distributed.initialize()` and let JAX auto-detect (Cloud TPU
    pods, GKE, ...); "never": single process. Call it before any other JAX computation.
    """
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"distributed.initialize must be auto, always or never, got {mode!r}.")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    explicit = coordinator_address is not None
    detected = (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "JAX_COORDINATOR_ADDRESS" in os.environ
        or "TPU_WORKER_HOSTNAMES" in os.environ
        or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    )
    if mode == "never" or not (explicit or detected or mode == "always"):
        return False
    if explicit:
        if num_processes is None or process_id is None:
            raise ValueError(
                "distributed.coordinator_address needs distributed.num_processes and "
                "distributed.process_id too."
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count() > 1


def make_mesh(
    shape: Sequence[int] = (-1,),
    axes: Sequence[str] = (DATA_AXIS,),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over `devices` (default: all); one -1 in `shape` takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape, axes = tuple(int(s) for s in shape), tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"mesh.shape {shape} and mesh.axes {axes} differ in length.")
    unknown = set(axes) - {DATA_AXIS, FSDP_AXIS}
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; use {DATA_AXIS!r}, {FSDP_AXIS!r}.")
    if shape.count(-1) > 1:
        raise ValueError(f"At most one -1 in mesh.shape, got {shape}.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh.shape {shape}.")
        shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh.shape {shape} needs {math.prod(shape)} devices; {len(devices)} available."
        )
    device_array = np.asarray(devices).reshape(shape)
    axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
    return Mesh(device_array, axes, axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: Sequence[int], mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> PartitionSpec:
    """Shards the largest dimension divisible by the fsdp axis size; else replicates."""
    n = mesh.shape.get(FSDP_AXIS, 1)
    if n == 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(tree: PyTree, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> PyTree:
    """NamedShardings for parameters / optimizer state: FSDP-sharded if the mesh has `fsdp`."""
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), mesh, min_size)), tree)


def global_batch(
    columns: dict[str, np.ndarray], rows: np.ndarray, mesh: Mesh
) -> dict[str, jax.Array]:
    """The global batch `{name: columns[name][rows]}`, sharded over the mesh by example.

    Every process knows `rows` (the sampler's draw is identical on all hosts), but each one only
    gathers, from its copy or memory map of the data, the rows that its own devices hold.
    """
    sharding = batch_sharding(mesh)
    rows = np.asarray(rows)

    def put(column: np.ndarray) -> jax.Array:
        shape = (len(rows),) + column.shape[1:]
        if jax.process_count() == 1:
            return jax.device_put(column[rows], sharding)
        return jax.make_array_from_callback(
            shape, sharding, lambda idx: column[rows[idx[0]]][(slice(None),) + tuple(idx[1:])]
        )

    return {name: put(column) for name, column in columns.items()}


def to_host(tree: PyTree) -> PyTree:
    """NumPy copies of (possibly multi-host sharded) arrays. Collective: call on every process."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-host run (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
