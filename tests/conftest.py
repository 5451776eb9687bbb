"""Test-session setup: 8 fake CPU devices, a persistent JAX compilation cache, compiled programs
released when they would exhaust the process's memory mappings, and scratch folders for
module-scoped runs that do not outlive their module.

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

# One compilation cache per test session, removed at its end (MAYE_JAX_CACHE_DIR names a
# lasting one), its entries written atomically (tests/jax_cache_site/atomic_jax_cache.py: JAX's
# own in-place write leaves a truncated entry when a process is killed mid-write). The
# processes the tests start get folders of their own below it (`subprocess_environment`): an
# executable compiled for 2 processes x 4 devices has the same key as one for 1 x 8.
_OWN_CACHE = "MAYE_JAX_CACHE_DIR" not in os.environ
_CACHE_DIR = os.environ.get("MAYE_JAX_CACHE_DIR") or tempfile.mkdtemp(prefix="maye-jax-cache-")
os.environ["MAYE_TEST_SUBPROCESS_JAX_CACHE"] = _CACHE_DIR
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


def _mapped_regions() -> int:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Drops JAX's compiled programs after a test once this process holds over 20,000 memory
    mappings. Each program XLA:CPU compiles or loads from the cache maps its code in regions of
    its own (5 end-to-end runs left 11,800 mappings); kept for the whole session they reached
    the kernel's limit (vm.max_map_count, 65,530), and the next compilation aborted, or the
    next cache read segfaulted. Dropped, the next test that needs one compiles it again (or
    reads it from the cache)."""
    yield
    if _mapped_regions() > 20_000:
        import gc

        jax.clear_caches()
        gc.collect()
