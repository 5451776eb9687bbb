"""Folders a killed run left behind (a worker's log folder, a weight segment), found by name.

Each such folder is named `<prefix><pid>-<random>`, `pid` being the process that made it (the
trainer). `remove_stale_folders` removes those whose process has ended, and only those:
never a folder of another name, never one of a live run. Imports no JAX.
"""

from __future__ import annotations

import os
import shutil


def remove_stale_folders(root: str, prefix: str) -> list[str]:
    """Removes the folders `<root>/<prefix><pid>-*` whose process `pid` is gone (or is a newer
    process that reuses the number); returns their paths. Folders of other names are never
    touched."""
    removed = []
    try:
        entries = os.listdir(root)
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        try:
            pid = int(entry[len(prefix) :].split("-")[0])
        except ValueError:
            continue
        path = os.path.join(root, entry)
        if owner_is_gone(pid, path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def owner_is_gone(pid: int, path: str) -> bool:
    """True when the process that made `path` has ended: no process `pid`, or one that started
    after `path` was last changed (the number was reused)."""
    if not _process_exists(pid):
        return True
    try:
        import psutil
    except ImportError:  # the worker's environment may lack it: trust the pid alone
        return False
    try:
        return psutil.Process(pid).create_time() > os.stat(path).st_mtime + 1.0
    except (OSError, psutil.Error):
        return False


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
