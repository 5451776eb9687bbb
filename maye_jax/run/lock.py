"""One run per output folder: an exclusive lock held for the life of the run.

`hold_output_folder(folder)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `folder/.maye.lock`
and writes the holder (pid, host, start time) into it. The OS releases the lock when the
process dies, however it dies, so a killed run never leaves a stale lock; a second run on the
same folder is refused at once (`OutputFolderBusy`, naming the holder's pid and host).

One layer takes it: the prologue of a run (run/startup.py `hold_run_folder`: RL, SFT, each run
of the experiment) and the experiment for its own folder, from before the folder is checked to
the run's end; what runs inside (the SFT warm-up in OUTPUT_DIR/sft_warmup, the run harness) is
covered by it. A forked child closes its copies of the descriptors, so it cannot keep a lock
alive after the run ends.

Several JAX processes write one folder, so only process 0 locks it; the lock is taken before
jax.distributed has said which process this is, so the configured index decides
(`multihost.configured_process_id`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from maye_jax.errors import RunStopped, UserError

LOCK_NAME = ".maye.lock"

_held: dict[Path, list[int]] = {}  # folder -> [descriptor, holds]
_guard = threading.Lock()


class OutputFolderBusy(UserError):
    """Another process is running in this output folder."""


@contextlib.contextmanager
def hold_output_folder(folder, *, process_id: int | None = None) -> Iterator[None]:
    """Holds `folder`'s lock inside the block (nothing to hold for processes other than 0)."""
    if process_id:
        yield
        return
    folder = Path(folder).absolute()
    made = _missing_parts(folder) + ([] if (folder / LOCK_NAME).exists() else [folder / LOCK_NAME])
    acquire(folder)
    refused = False
    try:
        yield
    except RunStopped:
        raise
    except UserError:
        refused = True
        raise
    finally:
        release(folder)
        if refused and not holds(folder):
            # A refusal (bad data, a folder holding another run, ...) leaves nothing behind:
            # the lock file and the folders made for it go, unless something else is in them.
            _remove_if_only_made(made)


def acquire(folder: Path) -> None:
    with _guard:
        if folder in _held:
            _held[folder][1] += 1
            return
        if folder.exists() and not folder.is_dir():
            raise UserError(f"config.output_dir: {folder} is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:  # a read-only file system, a file in the way, no permission
            raise UserError(
                f"config.output_dir: {folder}: cannot write there ({error.strerror}: "
                f"{error.filename})"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise OutputFolderBusy(
                f"{folder} is in use by another run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}): wait for "
                "it to end or stop it, or choose another output_dir"
            ) from None
        holder = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%c"))
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        _held[folder] = [descriptor, 1]


def release(folder: Path) -> None:
    with _guard:
        entry = _held.get(folder)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[folder]
            os.close(entry[0])  # releases the flock


def _missing_parts(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_if_only_made(made: list[Path]) -> None:
    """Removes the lock file, then each folder of `made` (deepest first) that is empty."""
    for path in sorted(made, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.unlink() if path.name == LOCK_NAME else path.rmdir()


def holds(folder) -> bool:
    """True when this process holds `folder`'s lock."""
    return Path(folder).absolute() in _held


def _read_holder(descriptor: int) -> dict:
    try:
        return json.loads(os.pread(descriptor, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _close_in_child() -> None:
    for descriptor, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)
