"""Files and folders that are either complete or absent, whatever kills the process.

- `atomic_folder(path)`: every model folder (the start model, `initial_model`, `convert`'s
  output, the final HF export) is written under `<path>.partial` and renamed to `path` only
  when complete, so a folder under its final name is always whole and "does it exist?" is the
  whole completeness check. A `.partial` left by a killed writer is removed by the next write
  of the same folder.
- `atomic_write_text(path, text)`: a file rewritten in full (run.json, a rollouts or
  eval-responses file, a metrics file cut back on resume) goes through a temporary file and a
  rename, so a kill leaves the old content or the new, never a mix or nothing.
- `cannot_write(path)`: why a file or folder to be written at `path` cannot be, asked by a
  tool before its work (a read-only file system, a file in the way).
- `append_line(handle, text)`: one whole line per `write` on an O_APPEND file, flushed to the
  disk; a kill or a full disk can leave at most a torn last line, which readers drop
  (maye_jax/run/metrics.py).

Renames are within one folder (one file system), which POSIX makes atomic; the parent folder is
fsynced after each so the rename itself survives a power cut. With several JAX processes (an
Orbax model folder is written by all of them), process 0 alone prepares and renames the folder,
between barriers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from maye_jax.run import multihost

PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"


def cannot_write(path: str | os.PathLike) -> str | None:
    """Why nothing can be written at `path` (a file or folder, which need not exist yet), or
    None: its nearest existing folder must take a new file, probed with a temporary file that
    is removed at once (so a read-only file system or a full permission check answers, not
    the permission bits, which root ignores)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"cannot write in {folder} ({error.strerror})"
    return None


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path).absolute()
    return path.with_name(path.name + PARTIAL_SUFFIX)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, alone: bool = False) -> Iterator[Path]:
    """Yields an empty folder to write into; on success it becomes `path` (replacing a previous
    `path` only then), on an exception it is removed and `path` is left as it was. With several
    processes every one must enter it (an Orbax write), unless `alone`: this process writes the
    folder by itself (e.g. process 0's HF export from its own copy of the weights)."""
    path = Path(path).absolute()
    partial = partial_path(path)
    replaced = path.with_name(path.name + REPLACED_SUFFIX)
    primary = alone or multihost.is_leader()

    def barrier(name: str) -> None:
        if not alone:
            multihost.barrier(name)

    if primary:
        for stale in (partial, replaced):  # left by a writer that was killed
            shutil.rmtree(stale, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.mkdir()
    barrier(f"atomic_folder:start:{path}")
    try:
        yield partial
        barrier(f"atomic_folder:written:{path}")
        if primary:
            _fsync_tree(partial)
            if path.exists():
                os.replace(path, replaced)
            os.replace(partial, path)
            _fsync_dir(path.parent)
    except BaseException:
        if primary:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if primary:
        shutil.rmtree(replaced, ignore_errors=True)
    barrier(f"atomic_folder:renamed:{path}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(path.parent)
    return path


def open_for_append(path: str | os.PathLike):
    """A binary O_APPEND handle without buffering: each `append_line` is one write(2)."""
    return open(path, "ab", buffering=0)


def append_line(handle, text: str) -> None:
    """Appends `text` + newline as one write and syncs it, so a kill or a full disk leaves at
    most a torn last line (a short write raises, naming the file)."""
    data = (text + "\n").encode("utf-8")
    written = handle.write(data)
    if written != len(data):
        raise OSError(f"{handle.name}: wrote {written} of {len(data)} bytes")
    os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Syncs every file and folder under `root`, so the rename publishes data on disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(folder))
