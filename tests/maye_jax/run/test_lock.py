"""One run per output folder: another process is refused at once, naming the holder; one layer
(the run's prologue) locks it, and what runs inside takes no lock of its own; a killed holder
or a forked child never leaves the folder locked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from maye_jax.config.defaults import default_config
from maye_jax.config.settings import load_settings
from maye_jax.run import lock, startup
from maye_jax.run.harness import RunHarness

PROBE = (
    "import sys; from pathlib import Path; from maye_jax.run import lock\n"
    "try:\n"
    "    lock.acquire(Path(sys.argv[1]))\n"
    "    print('acquired')\n"
    "except lock.OutputFolderBusy as error:\n"
    "    print('busy:', error)\n"
)
HOLDER = PROBE.replace("print('acquired')", "print('acquired', flush=True); sys.stdin.read()")


def probe(folder) -> str:
    """What another process gets when it tries to lock `folder`. A probe that queued for the
    lock instead of being refused would wait for ever: the 120 s timeout fails the test."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
        timeout=120,
    )
    return out.stdout.strip() or out.stderr


def test_another_process_is_refused_naming_the_holder(tmp_path):
    with lock.hold_output_folder(tmp_path):
        answer = probe(tmp_path)  # refused, not queued (see probe)
        assert answer.startswith(f"busy: {tmp_path} is in use by another run (pid {os.getpid()}")
        assert f"on host {socket.gethostname()}" in answer
    assert probe(tmp_path) == "acquired"


def test_the_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    try:
        assert holder.stdout.readline().strip() == "acquired"
        with pytest.raises(lock.OutputFolderBusy, match=f"pid {holder.pid} "):
            lock.acquire(tmp_path.absolute())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock.hold_output_folder(tmp_path):  # no stale lock to clean up
        assert lock.holds(tmp_path)


def test_one_layer_locks_the_run_folder(tmp_path):
    """The run's prologue (startup.hold_run_folder) holds OUTPUT_DIR from before the folder is
    checked to the run's end; the harnesses inside it (the SFT warm-up's in
    OUTPUT_DIR/sft_warmup, the run's own) take no lock of their own."""
    c = default_config()
    c.model.tiny_family = "qwen2_vl"
    c.output_dir = str(tmp_path)
    c.logging.progress_bar = False
    settings = load_settings(c, kind="sft", check_files=False)  # no data is read
    warmup = tmp_path / "sft_warmup"
    with startup.hold_run_folder(settings):
        assert lock.holds(tmp_path) and probe(tmp_path).startswith("busy:")
        with RunHarness(
            warmup, kind="sft_warmup", settings=settings, total_steps=1, describe=False
        ):
            assert not lock.holds(warmup) and probe(warmup) == "acquired"
        with RunHarness(tmp_path, kind="sft", settings=settings, total_steps=1):
            assert lock.holds(tmp_path)  # the prologue's
        assert lock.holds(tmp_path)
    assert not lock.holds(tmp_path) and probe(tmp_path) == "acquired"


@pytest.mark.filterwarnings("ignore:os.fork")
def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path):
    with lock.hold_output_folder(tmp_path):
        child = os.fork()
        if child == 0:  # e.g. a data loader forked by the run, outliving it a while
            time.sleep(3600)  # until the test kills it
            os._exit(0)
    try:
        assert probe(tmp_path) == "acquired"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_only_process_0_locks(tmp_path):
    with lock.hold_output_folder(tmp_path, process_id=1):
        assert not lock.holds(tmp_path)
    with lock.hold_output_folder(tmp_path, process_id=0):
        assert lock.holds(tmp_path)
