"""The folder holding the maye_jax package, for the subprocesses it starts (the reward
verifiers, the rollout worker): they import this checkout's code even where it is not installed,
and the vLLM worker runs in its own environment that never installs it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env_with_checkout(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` whose PYTHONPATH starts with ROOT (any earlier entries kept after it)."""
    child_env = dict(env)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return child_env
