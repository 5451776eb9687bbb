"""Test-session setup: 8 fake CPU devices, a persistent JAX compilation cache, and scratch
folders for module-scoped runs that do not outlive their module.

The device count and the cache must be configured before JAX is first imported, which is why
they live here.
"""

import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.jax_cache_site import atomic_jax_cache  # noqa: E402

# One compilation cache per test session, removed at its end; MAYE_JAX_CACHE_DIR names a
# lasting one. Its entries are written atomically (tests/jax_cache_site/atomic_jax_cache.py:
# JAX's own in-place write leaves a truncated entry when a process is killed mid-write, and
# reading one segfaults). The processes a test starts get folders of their own below it
# (`subprocess_cache_dir`): an executable compiled for 2 processes x 4 devices has the same
# cache key as one for 1 process x 8 devices, and must never be loaded by the other.
_OWN_CACHE = "MAYE_JAX_CACHE_DIR" not in os.environ
_CACHE_DIR = os.environ.get("MAYE_JAX_CACHE_DIR") or tempfile.mkdtemp(prefix="maye-jax-cache-")
atomic_jax_cache.install()
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="module")
def module_scratch(tmp_path_factory, request):
    """Makes folders for a module-scoped fixture's runs and removes them when the module's tests
    end, unless one of them failed (kept then, for debugging, as pytest keeps a failed tmp_path).

    An end-to-end run writes checkpoints of the 152k-vocabulary tiny model, hundreds of MB each;
    kept to the end of the session they would add up to many GB on a CI disk."""
    failures_before = request.session.testsfailed
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failures_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory):
    """(model folder, data files) of the short-SFT-warmed tiny model (tests/golden/warm_model.py),
    built once per session for the end-to-end tests whose responses must stop, score and
    learn; removed at the session's end."""
    from tests.golden import warm_model as warm

    root = tmp_path_factory.mktemp("warm_model")
    yield warm.build(root)
    shutil.rmtree(root, ignore_errors=True)


SUITE_PEAK_GIB = 3  # measured: 2.8 GiB above the start, at its peak


def _free_disk() -> tuple[Path, float]:
    where = Path(tempfile.gettempdir())
    return where, shutil.disk_usage(where).free / 2**30


def pytest_report_header(config):
    """Free disk where the tests write (shown without -q)."""
    where, free_gib = _free_disk()
    return f"disk: {free_gib:.1f} GiB free in {where} (the suite needs about {SUITE_PEAK_GIB} GiB)"


def pytest_sessionstart(session):
    """A full disk fails end-to-end tests with an OS error deep in a checkpoint write; this says
    so up front, also under -q."""
    where, free_gib = _free_disk()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if free_gib < SUITE_PEAK_GIB and reporter is not None:
        reporter.write_line(
            f"warning: {free_gib:.1f} GiB free in {where}; the suite needs about "
            f"{SUITE_PEAK_GIB} GiB (tests writing checkpoints will fail with a full disk)",
            yellow=True,
        )


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)
