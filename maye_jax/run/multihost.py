"""Several JAX processes (one per host) running the same loop: the one module that answers how
many processes there are (`process_count`, `multiprocess`), which one this is and whether it
writes the run's files (`process_index`, `is_leader`), and how they agree on a value; every
other module asks here.

Every process runs the same program on its own share of each step's prompts (`share`);
everything that must agree is exchanged here, on the host, with JAX's collectives
(`jax.experimental.multihost_utils`): statistics as sums and counts (`global_sum`), per-row
values and strings (`allgather_rows`, `allgather_objects`), process 0's value (`leader_value`),
decisions (`any_process`). Process 0 alone writes files (`is_leader`). With one process every
function is the identity and no collective runs.

A run has several processes once `jax.distributed` is initialized (run/startup.py does it for
every multi-process run); until then, and without JAX, a process is on its own. Nothing here
imports or starts JAX itself: before `jax.distributed.initialize` only `configured_process_id`
(from the config and the environment) can tell a process's place, e.g. for the folder lock.
"""

from __future__ import annotations

import os
import pickle
import secrets
import sys
from pathlib import Path

import numpy as np

from maye_jax.errors import UserError


def process_count() -> int:
    """The run's processes: 1 until jax.distributed is initialized (then JAX's count)."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return 1
    return jax.process_count()


def multiprocess() -> bool:
    """True in a run of several processes."""
    return process_count() > 1


def process_index() -> int:
    return sys.modules["jax"].process_index() if multiprocess() else 0


def is_leader() -> bool:
    """True in the process that writes the run's files (process 0)."""
    return process_index() == 0


def configured_process_id(settings) -> int:
    """This process's index as configured (`sharding.process_id`, else $MAYE_PROCESS_ID; 0 for
    one process): known before jax.distributed starts."""
    process_id = settings.sharding.process_id
    if process_id is None:
        process_id = os.environ.get("MAYE_PROCESS_ID") or 0
    return int(process_id)


def share(total: int, what: str) -> slice:
    """This process's contiguous share of `total` items (process p: [p*k, (p+1)*k))."""
    count = process_count()
    if total % count:
        raise UserError(f"{what}: {total} do not split over {count} processes")
    size = total // count
    return slice(process_index() * size, (process_index() + 1) * size)


def _gather(array: np.ndarray) -> np.ndarray:
    """[processes, ...]: every process's `array` (same shape everywhere)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(array), tiled=False))


def allgather_rows(array) -> np.ndarray:
    """Each process's rows (axis 0) concatenated in process order; their counts may differ."""
    array = np.asarray(array)
    if not multiprocess():
        return array
    counts = _gather(np.asarray([array.shape[0]], np.int64))[:, 0]
    padded = np.zeros((int(counts.max()),) + array.shape[1:], array.dtype)
    padded[: array.shape[0]] = array
    gathered = _gather(padded)
    return np.concatenate([gathered[p, : int(n)] for p, n in enumerate(counts)])


def allgather_objects(value) -> list:
    """Every process's picklable `value` (e.g. its responses' texts), in process order."""
    if not multiprocess():
        return [value]
    data = np.frombuffer(pickle.dumps(value), np.uint8)
    lengths = _gather(np.asarray([data.size], np.int64))[:, 0]
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    gathered = _gather(padded)
    return [pickle.loads(gathered[p, : int(n)].tobytes()) for p, n in enumerate(lengths)]


def leader_value(value):
    """Process 0's picklable `value`, on every process (e.g. the checkpoints it lists)."""
    return allgather_objects(value)[0]


def global_sum(values) -> np.ndarray:
    """The sum over processes of `values` (float64 on the host: exact for counts)."""
    values = np.asarray(values, np.float64)
    if not multiprocess():
        return values
    return _gather(values).sum(axis=0)


def any_process(flag: bool) -> bool:
    """True on every process when it is True on any (e.g. a stop request one host saw)."""
    if not multiprocess():
        return bool(flag)
    return bool(_gather(np.asarray([int(bool(flag))], np.int32)).max())


def first_flagged(flag: bool) -> int | None:
    """The lowest index of a process where `flag` is True, on every process (None: none)."""
    flags = [bool(flag)] if not multiprocess() else [bool(f) for f in _gather([int(flag)])[:, 0]]
    return flags.index(True) if any(flags) else None


def barrier(name: str) -> None:
    """Waits for every process (nothing to wait for with one)."""
    if multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_shared_folder(folder: Path) -> None:
    """Every process must see the same output folder (a shared file system): process 0 writes
    a random token there, every other process must read it back."""
    if not multiprocess():
        return
    token_file = Path(folder) / ".maye-shared-check"
    token = secrets.token_hex(8) if is_leader() else ""
    if is_leader():
        token_file.write_text(token)
    expected = leader_value(token)
    barrier("shared folder written")
    seen = token_file.read_text() if token_file.is_file() else None
    ok = allgather_objects(seen == expected)
    barrier("shared folder read")
    if is_leader():
        token_file.unlink(missing_ok=True)
    if not all(ok):
        missing = [p for p, good in enumerate(ok) if not good]
        raise UserError(
            f"config.output_dir: {folder} is not the same folder on every host (processes "
            f"{missing} do not see process 0's files): use a shared file system"
        )
