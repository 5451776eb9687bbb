"""Atomic writes for JAX's persistent compilation cache, in the test session and the processes
it starts.

JAX (0.10) writes a cache entry in place (`jax._src.lru_cache.LRUCache.put`: open, write). A
process killed while writing leaves a truncated executable, and so does a second process that
reads the entry while the first writes it; whoever deserialises a truncated executable next
crashes with a segfault, taking the whole pytest session with it. Here every entry is written to
a temporary file beside it and renamed into place, so a reader sees a whole entry or none.

`install()` patches at once (the pytest process, which has imported JAX already);
`install_on_import()` patches when JAX's cache module is first imported, so that a process that
never imports JAX (a verifier child) does not pay for importing it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import tempfile

_MODULE = "jax._src.lru_cache"


def _patch(lru_cache) -> None:
    cls = lru_cache.LRUCache
    if getattr(cls.put, "_maye_atomic", False):
        return
    original_put = cls.put

    def put(self, key: str, value: bytes) -> None:
        if self.eviction_enabled:  # JAX's own locked path: not used by the tests' caches
            return original_put(self, key, value)
        if not key:
            raise ValueError("key cannot be empty")
        target = self.path / f"{key}{lru_cache._CACHE_SUFFIX}"
        if target.exists():
            return
        handle, temporary = tempfile.mkstemp(dir=str(self.path), prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(value)
            os.replace(temporary, target)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise

    put._maye_atomic = True
    cls.put = put


def install() -> None:
    """Patches JAX's cache now (imports it)."""
    import jax._src.lru_cache as lru_cache

    _patch(lru_cache)


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)


def install_on_import() -> None:
    """Patches JAX's cache when it is first imported (now, if it already is)."""
    if _MODULE in sys.modules:
        _patch(sys.modules[_MODULE])
    else:
        sys.meta_path.insert(0, _PatchOnImport())


SITE = os.path.dirname(os.path.abspath(__file__))  # this folder, with sitecustomize.py


def subprocess_environment(env: dict, name: str, *, site: bool = True) -> dict:
    """`env` for a process the tests start: the session's compilation cache in a subfolder
    `name` of its own (one writer at a time per folder, and executables compiled for another
    process layout never read), written atomically through this folder's sitecustomize.py
    (`site=False` where the process has a sitecustomize of its own that installs it)."""
    session_cache = os.environ.get("MAYE_TEST_SUBPROCESS_JAX_CACHE")  # tests/conftest.py
    env = dict(env)
    if session_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(session_cache, name)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    if site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, env.get("PYTHONPATH")) if p)
    return env
