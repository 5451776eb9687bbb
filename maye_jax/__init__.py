"""maye-jax: MAYE (RL for vision-language models) in JAX/Flax NNX.

The model and sharding code lives in the repository's top-level `models/` and `sharding/`
folders and is imported as `maye_jax.models` and `maye_jax.sharding` (an install maps them
with setuptools' package-dir). Code run from a checkout without an install (the vLLM worker's
own environment, `benchmarks/`, the GPU scripts) reaches them through the small finder below.
Importing this package imports no JAX.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SIBLING_PACKAGES = ("models", "sharding")
_CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


class _SiblingPackageFinder(importlib.abc.MetaPathFinder):
    """Finds `maye_jax.models[.x]` / `maye_jax.sharding[.x]` in the checkout's top-level folders
    when no installed copy provides them."""

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != __name__ or parts[1] not in _SIBLING_PACKAGES:
            return None
        if len(parts) > 2:  # submodules: found on the parent package's __path__ as usual
            return None
        folder = _CHECKOUT_ROOT / parts[1]
        if not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if not all((Path(__file__).parent / name).is_dir() for name in _SIBLING_PACKAGES):
    # First in line: the folders beside *this* maye_jax win over an editable install's mapping,
    # so a second checkout (e.g. a git worktree) never mixes in another checkout's models.
    sys.meta_path.insert(0, _SiblingPackageFinder())
