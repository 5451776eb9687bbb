"""What survives what: faults injected into a 3-step RL run (one-layer tiny model), each
followed by a resume whose metrics must equal the uninterrupted run's, bit for bit.

One uninterrupted baseline per session (every checkpoint kept); each test starts from a copy
of its folder as it stood at some step (hard links: restores only read them), injects its
fault and resumes. Faults: a damaged latest checkpoint, a torn last metric line, a
half-written initial model, SIGKILL while a checkpoint is written (keep=1), a full disk at a
checkpoint write, and a second trainer on the same folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from maye_jax.run import lock
from maye_jax.run.metrics import read_metrics
from maye_jax.train import run_rl
from tests.maye_jax.test_train import tiny_config

TOTAL_STEPS = 3
NOISE = ("time/", "memory/")


def fault_config(root: Path):
    c = tiny_config(root)
    c.rl.num_epochs = TOTAL_STEPS  # one step per epoch
    c.eval.enabled = False
    c.checkpoint.keep = int(os.environ.get("MAYE_TEST_KEEP", TOTAL_STEPS))
    return c


@pytest.fixture(scope="module")
def baseline(module_scratch) -> Path:
    root = module_scratch("baseline")
    run_rl(fault_config(root))
    return root / "run"


def comparable(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in line.items() if not k.startswith(NOISE)} for line in read_metrics(run_dir)
    ]


def copy_run(baseline: Path, root: Path, *, step: int, checkpoints=None, link: bool = True) -> Path:
    """`root/run` as the baseline stood after `step`: its start and initial models, the
    checkpoints `checkpoints` (default: 1..step), metric lines and rollouts up to `step`."""
    run = root / "run"
    run.mkdir(parents=True)
    copy = os.link if link else shutil.copy2
    for name in ("start_model", "initial_model"):
        shutil.copytree(baseline / name, run / name, copy_function=copy)
    for number in checkpoints or range(1, step + 1):
        source = baseline / "checkpoints" / str(number)
        shutil.copytree(source, run / "checkpoints" / str(number), copy_function=copy)
    lines = [m for m in read_metrics(baseline) if m["generation_step"] <= step]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (run / "rollouts").mkdir()
    for number in range(1, step + 1):
        name = f"step_{number}.jsonl"
        shutil.copy2(baseline / "rollouts" / name, run / "rollouts" / name)
    return run


def resume(root: Path) -> Path:
    config = fault_config(root)
    config.resume = True
    run_rl(config)
    return root / "run"


def unlinked(path: Path) -> Path:
    """`path` as a file of its own (not a hard link into the baseline), to damage it."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def largest_data_file(step_dir: Path) -> Path:
    return max((step_dir / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


def test_baseline_keeps_a_digest_per_checkpoint(baseline):
    assert [m["generation_step"] for m in read_metrics(baseline)] == [1, 2, 3]
    for step in range(1, TOTAL_STEPS + 1):
        record = json.loads(
            (baseline / "checkpoints" / str(step) / "digest.process_0.json").read_text()
        )
        assert record["num_processes"] == 1 and len(record["arrays"]) > 10
        assert any(name.startswith("state/ocdbt.process_0/d/") for name in record["files"])
    assert not list(baseline.glob("*.partial"))


def test_random_bytes_in_the_latest_checkpoint_fall_back_and_resume_exactly(
    baseline, tmp_path, caplog
):
    """Bytes changed inside an array's data load silently (shown first); the content digest
    catches them, the previous checkpoint is restored and the damaged one deleted."""
    import jax

    from maye_jax.storage.train_checkpoints import TrainCheckpointer

    run = copy_run(baseline, tmp_path, step=2)
    victim = unlinked(largest_data_file(run / "checkpoints" / "2"))
    with open(victim, "r+b") as handle:
        handle.seek(victim.stat().st_size // 2)
        handle.write(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
    damaged = TrainCheckpointer(run).restore(2, None)[0]  # unchecked: no error
    intact = TrainCheckpointer(baseline).restore(2, None)[0]
    differs = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(damaged), jax.tree.leaves(intact))
    ]
    assert sum(differs) == 1

    resumed = resume(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "cannot be trusted" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "checkpoints/2" in warnings[0] and "differ from what was written" in warnings[0]
    assert comparable(resumed) == comparable(baseline)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_a_torn_last_metric_line_is_dropped_on_resume(baseline, tmp_path, caplog):
    """A kill or a full disk mid-write leaves half of step 3's line: the resume drops it."""
    run = copy_run(baseline, tmp_path, step=2)
    third = (baseline / "metrics.jsonl").read_text().splitlines()[2]
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(third[: len(third) // 2])
    resumed = resume(tmp_path)
    assert any("torn last line 3" in r.getMessage() for r in caplog.records)
    assert comparable(resumed) == comparable(baseline)


def test_a_half_written_initial_model_is_written_again(baseline, tmp_path, caplog):
    """What a kill inside `save_pretrained` used to leave (config.json, no weights), and what
    one leaves now (initial_model.partial): the next start writes the model again, whole."""
    run = copy_run(baseline, tmp_path, step=2)
    shutil.rmtree(run / "initial_model")
    (run / "initial_model").mkdir()
    shutil.copy2(baseline / "initial_model" / "config.json", run / "initial_model")
    (run / "initial_model.partial").mkdir()
    shutil.copy2(baseline / "initial_model" / "config.json", run / "initial_model.partial")
    resumed = resume(tmp_path)
    assert any("has no weights" in r.getMessage() for r in caplog.records)
    assert not (run / "initial_model.partial").exists()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        assert (run / "initial_model" / name).read_bytes() == (
            baseline / "initial_model" / name
        ).read_bytes(), name
    assert comparable(resumed) == comparable(baseline)


def run_faulty(root: Path, fault: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(
        [sys.executable, "-m", "tests.maye_jax.faulty_run", str(root), fault],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_sigkill_while_a_checkpoint_is_written_with_keep_1(baseline, tmp_path, caplog, monkeypatch):
    """keep=1: step 2 is the only checkpoint; the process is killed after Orbax wrote step 3,
    before its digest. Step 2 is still there (old ones are deleted only after the new one is
    whole), the resume skips the incomplete step 3 and reproduces the run."""
    run = copy_run(baseline, tmp_path, step=2, checkpoints=[2])
    monkeypatch.setenv("MAYE_TEST_KEEP", "1")  # fault_config reads it, here and in the child
    result = run_faulty(tmp_path, "kill_before_digest")
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "3"]
    assert not (run / "checkpoints" / "3" / "digest.process_0.json").exists()
    assert [m["generation_step"] for m in read_metrics(run)] == [1, 2, 3]
    resumed = resume(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "cannot be trusted" in r.getMessage()]
    assert len(warnings) == 1 and "digest.process_0.json is missing" in warnings[0], warnings
    assert comparable(resumed) == comparable(baseline)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["3"]


@contextlib.contextmanager
def small_tmpfs(path: Path, size_mb: int):
    """A tmpfs of `size_mb` at `path` (yields False where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_at_a_checkpoint_write_names_the_error_and_keeps_the_last_one(
    baseline, tmp_path, caplog, capsys
):
    """The run (resumed at step 2) fills its disk while writing checkpoint 3: it stops, its
    log ends with the real error (not Orbax's late "Event loop is closed" reports), nothing of
    step 3 remains, and once there is room the resume reproduces the run. The disk is a small
    tmpfs where mounting one is allowed (root), else Orbax's write fails with a simulated ENOSPC;
    the test prints which (also under -q)."""
    root = tmp_path / "disk"
    copied = sum(folder_bytes(baseline / name) for name in ("start_model", "initial_model"))
    checkpoint = folder_bytes(baseline / "checkpoints" / "2")
    room = copied + checkpoint + checkpoint // 2 + 8 * 2**20  # checkpoint 3 does not fit
    with small_tmpfs(root, size_mb=room // 2**20) as mounted:
        with capsys.disabled():
            path = f"a real {room // 2**20} MB tmpfs" if mounted else "a simulated ENOSPC"
            print(f"\n{__name__}: the full disk is {path} (tmpfs mount allowed: {mounted})")
        copy_run(baseline, root, step=2, checkpoints=[2], link=False)
        result = run_faulty(root, "disk_full" if mounted else "simulated_disk_full")
        assert result.returncode == 1, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert "CheckpointWriteError: checkpoint of step 3 not written" in last, result.stderr[
            -3000:
        ]
        assert "No space left on device" in last and "last good checkpoint is step 2" in last
        assert "Event loop is closed" not in result.stderr, result.stderr[-3000:]
        run = root / "run"
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]
        if mounted:
            size = (room + 3 * checkpoint) // 2**20
            subprocess.run(["mount", "-o", f"remount,size={size}m", str(root)], check=True)
        resumed = resume(root)
        assert comparable(resumed) == comparable(baseline)
        assert not [r for r in caplog.records if "cannot be trusted" in r.getMessage()]


def test_a_second_trainer_on_the_folder_is_refused_at_once(baseline, tmp_path):
    """Another process holds the folder (as a running trainer does): a second run stops at
    once naming it and changes nothing; once the holder is killed (-9) the OS has released
    the lock."""
    run = copy_run(baseline, tmp_path, step=2)
    before = (run / "metrics.jsonl").read_text()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from maye_jax.run import lock; "
            f"lock.acquire(Path({str(run)!r})); print('held', flush=True); time.sleep(3600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(lock.OutputFolderBusy, match=f"pid {holder.pid} on host "):
            resume(tmp_path)
        assert time.monotonic() - started < 300  # refused; queued, it would wait for the holder
        assert (run / "metrics.jsonl").read_text() == before
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
    finally:
        holder.kill()
        holder.wait()
    with lock.hold_output_folder(run):
        assert lock.holds(run)
    assert not lock.holds(run)
