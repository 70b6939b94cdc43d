"""Processes, devices and shardings: `jax.distributed`, the mesh, global arrays."""

from __future__ import annotations

import itertools
import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ghn._compat import coordination_client
from ghn.errors import ConfigError
from ghn.sharding import largest_axis_sharding

log = logging.getLogger(__name__)

DATA = "data"


def _auto_detected() -> str | None:
    """The cluster environment `jax.distributed.initialize()` would detect, if multi-process."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and all(v in os.environ for v in slurm):
        return "SLURM"  # inside `srun`: one process per task
    if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        return "TPU pod"
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def _multi_process_settings(cpu_collectives: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str = "gloo",
) -> bool:
    """Starts `jax.distributed` when this is one of several processes; returns whether it did.

    Explicit arguments win (all three, or `num_processes=1` for a no-op).
    Without them, SLURM (more than one task), a TPU pod slice, Open MPI or
    $JAX_COORDINATOR_ADDRESS are auto-detected by JAX; a lone process is a
    no-op. Must run before anything touches a JAX device. CPU collectives
    across processes use `cpu_collectives` (gloo), which multi-host CPU runs and
    the localhost tests need and GPU/TPU runs ignore.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if num_processes == 1 and process_id in (None, 0):
            return False
        if None in explicit:
            raise ConfigError(
                "give all of coordinator_address, num_processes and process_id (or none, to "
                f"auto-detect), got {coordinator_address=}, {num_processes=}, {process_id=}"
            )
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"need 0 <= process_id < num_processes, got {process_id}")
        _multi_process_settings(cpu_collectives)
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        env = _auto_detected()
        if env is None:
            return False
        log.info("initializing jax.distributed from the %s environment", env)
        _multi_process_settings(cpu_collectives)
        jax.distributed.initialize()
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def make_mesh(num_data: int = -1, devices=None) -> Mesh:
    """A 1-D mesh with axis `data` over `num_data` devices (-1: all)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if num_data == -1 else num_data
    if not 1 <= n <= len(devices):
        raise ConfigError(f"mesh.data={num_data}, but there are {len(devices)} devices")
    if n != len(devices) and jax.process_count() > 1:
        raise ConfigError("a multi-process run must put every device on the mesh (mesh.data=-1)")
    # Auto axes: shardings enter through jit's in/out shardings and GSPMD
    # propagates them, so the zoo's models need no sharding annotations.
    return jax.make_mesh((n,), (DATA,), (AxisType.Auto,), devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA))


def fsdp_sharding(mesh: Mesh, shape: tuple[int, ...], min_size: int) -> NamedSharding:
    """FSDP placement of a GHN array: `ghn.sharding.largest_axis_sharding` over `data`."""
    return largest_axis_sharding(mesh, shape, DATA, min_size)


def put_replicated(tree, sharding: NamedSharding):
    """Host arrays, identical on every process, as global replicated jax.Arrays."""
    return put_global(tree, jax.tree.map(lambda _: sharding, tree))


def put_global(tree, shardings):
    """Host arrays, identical on every process, as global jax.Arrays laid out by
    `shardings` (a matching tree of shardings)."""

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree, shardings)


_BARRIERS = itertools.count()


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Every process waits here for the others; a no-op in a one-process run.

    Uses the `jax.distributed` coordination service, not a device collective:
    CPU (gloo) collectives give up after ~30 s when a peer is late, e.g. still
    compiling a program on a loaded machine, so processes line up here first.
    All processes must call it the same number of times in the same order.
    """
    if jax.process_count() == 1:
        return
    client = coordination_client()
    barrier_id = f"ghn/{name}/{next(_BARRIERS)}"
    if client is None:  # not from jax.distributed.initialize, or JAX internals changed
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(barrier_id)
        return
    client.wait_at_barrier(barrier_id, int(timeout_s * 1000))


def all_processes_agree(flag: bool) -> bool:
    """True on every process if `flag` is True on any (e.g. one process got SIGTERM)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags))


def local_array(x) -> np.ndarray:
    """A fully replicated global array as a NumPy array on this process."""
    return np.asarray(x.addressable_data(0))
