"""Loaded (PYTHONPATH) into the processes of the multi-host tests, to record what they do:

- every file this process opens for writing, renames, creates or deletes under
  $MAYE_AUDIT_ROOT, appended to $MAYE_AUDIT_LOG (Python-level operations: Orbax's and
  safetensors' native writers are not seen, and the tests exempt the collective checkpoints);
- every rollout generate call (its step, first global prompt index and number of prompts).
"""

import importlib.abc
import importlib.util
import json
import os
import sys

import atomic_jax_cache  # tests/jax_cache_site, on PYTHONPATH too

atomic_jax_cache.install_on_import()  # the only sitecustomize Python loads: this one

_ROOT = os.environ.get("MAYE_AUDIT_ROOT")
_LOG = os.environ.get("MAYE_AUDIT_LOG")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _record(kind, **fields):
    with open(_LOG, "a") as handle:  # outside the audited folder
        handle.write(json.dumps(dict(kind=kind, pid=os.getpid(), **fields)) + "\n")


def _under_root(path) -> str | None:
    try:
        path = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return None
    root = os.path.abspath(_ROOT)
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else None


def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1] or "", args[2] or 0
        writing = any(c in str(mode) for c in "wax+") or flags & _WRITE_FLAGS
        relative = _under_root(args[0]) if writing else None
    elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        relative = _under_root(args[0]) if args else None
    else:
        return
    if relative is not None:
        _record("write", event=event, path=relative)


class _PatchSampler(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Wraps JaxSampler.generate (and WorkerEngine.generate) once their modules load."""

    loaders: dict = {}
    targets = {
        "maye_jax.rollout.jax_sampler": "JaxSampler",
        "maye_jax.rollout.client": "WorkerEngine",
    }

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.targets:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        self.loaders[fullname] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.loaders[spec.name].create_module(spec)

    def exec_module(self, module):
        self.loaders[module.__name__].exec_module(module)
        cls = getattr(module, self.targets[module.__name__])
        generate = cls.generate

        def recorded(engine, prompts, sampling, *, step=0, first_index=0):
            import jax

            _record(
                "generate",
                process=jax.process_index(),
                step=int(step),
                first_index=int(first_index),
                prompts=len(prompts),
            )
            return generate(engine, prompts, sampling, step=step, first_index=first_index)

        cls.generate = recorded


if _ROOT and _LOG:
    sys.addaudithook(_hook)
    sys.meta_path.insert(0, _PatchSampler())
