"""One rule for the tests that need the vLLM worker's environment: the interpreter the trainer
would start (`maye_jax.rollout.factory.vllm_python`: $MAYE_VLLM_PYTHON, else the project's
`.venv-vllm`). Missing, such a test is skipped, or fails under MAYE_REQUIRE_VLLM=1 (CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maye_jax.rollout.factory import vllm_python

MISSING = "vLLM environment not installed (run scripts/setup_vllm_env.sh)"


def require_vllm_python(*, module_level: bool = False) -> Path:
    """The vLLM worker's interpreter; skips the test (or the whole module) when it is missing,
    fails instead when MAYE_REQUIRE_VLLM=1."""
    python = vllm_python()
    if not python.exists():
        if os.environ.get("MAYE_REQUIRE_VLLM") == "1":
            pytest.fail(f"MAYE_REQUIRE_VLLM=1 but {python} is missing: {MISSING}", pytrace=False)
        pytest.skip(f"{MISSING}: {python} is missing", allow_module_level=module_level)
    return python
