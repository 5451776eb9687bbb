"""Device meshes: ('dp', 'fsdp', 'tp') over the first dp*fsdp*tp devices.

The default trainer mesh is fsdp=7 on an 8-GPU node: GPUs 0-6 train, the last one is left to
the rollout engine. Multi-host runs call `initialize_distributed` first (jax.distributed), after
which `jax.devices()` lists every host's devices, ordered by process: with dp = the number of
processes and fsdp x tp = each host's devices (HSDP, the default), every dp row is one host, so
each host holds a whole copy of the weights sharded over its own devices.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

MESH_AXES = ("dp", "fsdp", "tp")


def make_mesh(fsdp: int = 1, tp: int = 1, dp: int = 1, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    needed = dp * fsdp * tp
    if needed > len(devices):
        raise ValueError(
            f"mesh dp={dp} x fsdp={fsdp} x tp={tp} needs {needed} devices, {len(devices)} available"
        )
    return Mesh(np.array(devices[:needed]).reshape(dp, fsdp, tp), MESH_AXES)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids=None,
) -> bool:
    """Starts jax.distributed for multi-host runs; returns False (and does nothing) on one host.

    Arguments default to the environment (MAYE_COORDINATOR, MAYE_NUM_PROCESSES,
    MAYE_PROCESS_ID), and jax's own cluster auto-detection (SLURM, ...) applies when a
    coordinator is set but the counts are not. `local_device_ids`: the accelerators this
    process trains on (the others, e.g. the rollout GPU, stay invisible to JAX). A second call
    in the same process (the experiment runner starts several runs) is a no-op.
    """
    coordinator_address = coordinator_address or os.environ.get("MAYE_COORDINATOR")
    if not coordinator_address:
        return False
    if jax.distributed.is_initialized():
        return True
    num_processes = num_processes if num_processes is not None else _env_int("MAYE_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("MAYE_PROCESS_ID")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def hosts_of_rows(mesh: Mesh) -> list[set[int]]:
    """The processes that hold each dp row of `mesh` (one each in the default HSDP layout)."""
    return [{d.process_index for d in row.reshape(-1)} for row in mesh.devices]
