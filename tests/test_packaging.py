"""How `maye_jax.models` and `maye_jax.sharding` are found: the repository keeps them in its
top-level `models/` and `sharding/` folders, and `maye_jax/models`, `maye_jax/sharding` are
committed links to them. No import hook: an install (setuptools follows the links into the
wheel) and a bare checkout on `sys.path` (the vLLM worker's own environment, `benchmarks/`, the
GPU scripts) import the same files the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_models_and_sharding_are_committed_links_to_the_top_level_folders():
    for name in ("models", "sharding"):
        link = ROOT / "maye_jax" / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}"
    listed = subprocess.run(
        ["git", "ls-files", "-s", "maye_jax/models", "maye_jax/sharding"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert [line.split()[0] for line in listed if line] == ["120000", "120000"]  # git links


def test_a_checkout_without_an_install_imports_them_without_an_import_hook():
    """`python -S` has no site-packages (no install, no editable finder): only the checkout on
    sys.path, as a worker started with `checkout.env_with_checkout` sees it."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import maye_jax, maye_jax.models, maye_jax.models.hf_names, maye_jax.sharding\n"
        "import maye_jax.qwen_ids\n"
        "print(maye_jax.models.hf_names.__file__)\n"
        "print(maye_jax.sharding.__file__)\n"
        "print(sum(type(f).__module__.startswith('maye_jax') for f in sys.meta_path))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd="/", timeout=60
    )
    assert out.returncode == 0, out.stderr
    models_file, sharding_file, hooks = out.stdout.split()
    assert Path(models_file) == ROOT / "maye_jax" / "models" / "hf_names.py"
    assert Path(sharding_file) == ROOT / "maye_jax" / "sharding" / "__init__.py"
    assert Path(models_file).resolve() == ROOT / "models" / "hf_names.py"
    assert hooks == "0"


def test_the_vllm_environment_imports_the_workers_modules_from_the_checkout():
    """The vLLM worker's own environment never installs maye_jax: with the checkout on
    PYTHONPATH (as `checkout.env_with_checkout` starts it) it imports the worker, the hf backend
    and `maye_jax.models.hf_names`, and no JAX."""
    import pytest

    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        if os.environ.get("MAYE_REQUIRE_VLLM") == "1":
            pytest.fail(f"MAYE_REQUIRE_VLLM=1 but {python} is missing")
        pytest.skip("vLLM environment not installed (run scripts/setup_vllm_env.sh)")
    from maye_jax.checkout import env_with_checkout

    code = (
        "import sys\n"
        "import maye_jax.rollout.worker, maye_jax.rollout.hf_backend, maye_jax.models.hf_names\n"
        "print(maye_jax.models.hf_names.__file__, 'jax' in sys.modules)\n"
    )
    env = env_with_checkout({k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    out = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    models_file, jax_imported = out.stdout.split()
    assert Path(models_file) == ROOT / "maye_jax" / "models" / "hf_names.py"
    assert jax_imported == "False"
