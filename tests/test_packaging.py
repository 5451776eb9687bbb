"""How the package is found and installed.

`maye_jax.models` and `maye_jax.sharding`: the repository keeps them in its top-level `models/`
and `sharding/` folders, and `maye_jax/models`, `maye_jax/sharding` are committed links to them.
No import hook: an install (setuptools follows the links into the wheel) and a bare checkout on
`sys.path` (the vLLM worker's own environment, `benchmarks/`, the GPU scripts) import the same
files the same way.

The package as a user installs it: a wheel built from this checkout, installed without its
dependencies into a fresh virtual environment (they come from the test environment's
site-packages through a `.pth` file), used from a folder outside the checkout. Every module of
the source tree must be in the wheel and every subpackage must import from the fresh
environment, not from the checkout: a subpackage left out of the packaging fails here (an
editable install or a run from the checkout would hide it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.vllm_env import require_vllm_python

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
    from maye_jax.checkout import env_with_checkout

    python = require_vllm_python()

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


PACKAGE = "maye_jax"
SIBLINGS = ("models", "sharding")  # top-level folders installed as maye_jax.models / .sharding


def source_modules() -> dict[str, Path]:
    """Every module of the package in this checkout, `relative/path.py` as installed (under
    maye_jax/) -> its source file: maye_jax/ itself, and models/ and sharding/ at their
    installed place unless maye_jax/ already holds them (links)."""
    trees = {Path(PACKAGE): ROOT / PACKAGE}
    for name in SIBLINGS:
        if not (ROOT / PACKAGE / name).exists():
            trees[Path(PACKAGE) / name] = ROOT / name
    modules = {}
    for installed, source in trees.items():
        for folder, dirs, files in os.walk(source, followlinks=True):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for file in files:
                if file.endswith(".py"):
                    path = Path(folder) / file
                    modules[(installed / path.relative_to(source)).as_posix()] = path
    return modules


def subpackages(modules: dict[str, Path]) -> list[str]:
    """`maye_jax`, `maye_jax.config`, ...: every folder with an __init__.py."""
    return sorted(
        str(Path(path).parent).replace("/", ".")
        for path in modules
        if path.endswith("/__init__.py")
    )


def checkout_copy(target: Path) -> Path:
    """The checkout's files (tracked and untracked-not-ignored ones where git can list them),
    copied so that the build leaves nothing in the checkout."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
    )
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            source = ROOT / name
            if source.is_file() or source.is_symlink():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name, follow_symlinks=False)
    else:  # not a git checkout
        ignore = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", "runs")
        shutil.copytree(ROOT, target, symlinks=True, ignore=ignore, dirs_exist_ok=True)
    return target


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, env=env, timeout=600, **kwargs
    )


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory):
    """(the fresh environment's python, its site-packages) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = checkout_copy(tmp / "checkout")
    wheels = tmp / "wheels"
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--wheel-dir", wheels, source]
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = wheels.glob("maye_jax-*.whl")
    venv = tmp / "venv"
    created = run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert created.returncode == 0, created.stderr[-3000:]
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run([python, "-c", purelib]).stdout.strip())
    # The dependencies: this test environment's site-packages (its own .pth files, such as the
    # editable install of this checkout, are not processed for a folder added by a .pth).
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index"]
        + [wheel]
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    elsewhere = tmp / "elsewhere"  # the current folder: neither the checkout nor the venv
    elsewhere.mkdir()
    return python, site.resolve(), elsewhere


def test_the_wheel_holds_every_module_of_the_source_tree(fresh_install):
    _, site, _ = fresh_install
    installed = {
        path.relative_to(site).as_posix()
        for path in (site / PACKAGE).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert installed == set(source_modules())


def test_every_subpackage_imports_from_the_fresh_environment(fresh_install):
    python, site, elsewhere = fresh_install
    names = subpackages(source_modules())
    assert {f"{PACKAGE}.models", f"{PACKAGE}.sharding", f"{PACKAGE}.rl"} <= set(names)
    script = (
        "import importlib, json, sys\n"
        "files = {name: importlib.import_module(name).__file__ for name in sys.argv[1:]}\n"
        "print(json.dumps(files))\n"
    )
    result = run([python, "-c", script, *names], cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    files = json.loads(result.stdout.strip().splitlines()[-1])
    outside = {name: file for name, file in files.items() if not Path(file).is_relative_to(site)}
    assert not outside, f"imported from outside {site}: {outside}"


def test_the_training_command_prints_its_usage(fresh_install):
    python, _, elsewhere = fresh_install
    result = run([python, "-m", f"{PACKAGE}.train", "--help"], cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "python -m maye_jax.train --config=" in result.stdout
    # every option with its type, default, rule and meaning (maye_jax/config/options.py)
    assert "responses per generation step (global)" in result.stdout
