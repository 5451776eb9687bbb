"""Training checkpoints on a stand-in state: each is recorded with a digest as it is written;
a damaged newest one (truncated or changed data file, missing metadata or state folder,
incomplete write) is skipped with a warning naming what was wrong and the previous one is
restored exactly; none intact is refused; old checkpoints are deleted only after the new one
is whole (keep=1 included); a failed write names the real error and keeps the last good one."""

from __future__ import annotations

import errno
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maye_jax.storage import digest
from maye_jax.storage.train_checkpoints import (
    CheckpointError,
    CheckpointWriteError,
    TrainCheckpointer,
)


def state_at(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "params": {"w": jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)},
        "moments": jnp.asarray(rng.standard_normal((128,)), jnp.bfloat16),
        "count": jnp.asarray(step, jnp.int32),
    }


def shardings_of(state):
    return jax.tree.map(lambda x: x.sharding, state)


def write(tmp_path, steps, keep=5) -> TrainCheckpointer:
    checkpointer = TrainCheckpointer(tmp_path, keep=keep)
    for step in steps:
        checkpointer.save(step, state_at(step), {"generation_step": step, "note": f"s{step}"})
    return checkpointer


def restored_step(tmp_path) -> int:
    state, meta = TrainCheckpointer(tmp_path).restore_latest(state_at(0), shardings_of(state_at(0)))
    expected = state_at(meta["generation_step"])
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert meta["note"] == f"s{meta['generation_step']}"
    return meta["generation_step"]


def data_file(step_dir):
    return max(step_dir.glob("state/ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


def truncate(step_dir):
    path = data_file(step_dir)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    return f"{path.relative_to(step_dir)} has {size // 2} bytes, {size} when written"


def change_bytes(step_dir):
    path = data_file(step_dir)
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(b"\x5a" * 16)
    return "state arrays differ from what was written (e.g. ['params']['w'])"


def remove_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()
    return "state/_METADATA is missing"


def garble_metadata(step_dir):
    """Same size, not JSON any more: only the restore itself can tell."""
    path = step_dir / "state" / "_METADATA"
    path.write_bytes(b"#" * path.stat().st_size)
    return "it does not restore: "


def remove_state(step_dir):
    shutil.rmtree(step_dir / "state")
    return "is missing"


def remove_digest(step_dir):
    (step_dir / "digest.process_0.json").unlink()
    return "digest.process_0.json is missing (the write did not complete)"


def change_meta(step_dir):
    path = step_dir / "meta" / "metadata"
    path.write_text(path.read_text().replace('"s2"', '"s9"'))
    return "meta differs from what was written"


@pytest.mark.parametrize(
    "damage",
    [
        truncate,
        change_bytes,
        remove_metadata,
        garble_metadata,
        remove_state,
        remove_digest,
        change_meta,
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    write(tmp_path, [1, 2])
    expected = damage(tmp_path / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING, logger="maye_jax"):
        assert restored_step(tmp_path) == 1
    warnings = [r.getMessage() for r in caplog.records if "cannot be trusted" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoints/2" in warnings[0], warnings
    assert expected in warnings[0], warnings[0]
    # the damaged one is gone, so the resumed run writes step 2 again
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    TrainCheckpointer(tmp_path).save(2, state_at(2), {"generation_step": 2, "note": "s2"})
    assert restored_step(tmp_path) == 2


def test_changed_bytes_restore_silently_without_the_digest(tmp_path):
    """The case the content digest exists for: Orbax itself restores the changed values."""
    checkpointer = write(tmp_path, [1])
    change_bytes(tmp_path / "checkpoints" / "1")
    state, _ = checkpointer.restore(1, None)
    assert not np.array_equal(
        np.asarray(state["params"]["w"]), np.asarray(state_at(1)["params"]["w"])
    )


def test_no_intact_checkpoint_is_refused_naming_each(tmp_path):
    write(tmp_path, [1, 2])
    truncate(tmp_path / "checkpoints" / "1")
    remove_digest(tmp_path / "checkpoints" / "2")
    with pytest.raises(
        CheckpointError, match=r"no intact checkpoint .*step 2: digest.*step 1: state"
    ):
        TrainCheckpointer(tmp_path).restore_latest(state_at(0), shardings_of(state_at(0)))


def test_no_checkpoint_at_all_is_a_fresh_start(tmp_path):
    assert (
        TrainCheckpointer(tmp_path).restore_latest(state_at(0), shardings_of(state_at(0))) is None
    )


def test_keep_1_deletes_the_previous_checkpoint_only_after_the_new_one_is_whole(
    tmp_path, monkeypatch
):
    checkpointer = write(tmp_path, [1, 2], keep=1)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["2"]
    seen = []
    write_digest = TrainCheckpointer._write_digest

    def killed_before_the_digest(self, step_dir, arrays, meta):
        seen.append(sorted(p.name for p in folder.iterdir() if p.name.isdigit()))
        raise KeyboardInterrupt  # what a kill leaves: Orbax's files, no digest

    monkeypatch.setattr(TrainCheckpointer, "_write_digest", killed_before_the_digest)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(3, state_at(3), {"generation_step": 3, "note": "s3"})
    assert seen == [["2", "3"]]  # the previous one was still there while step 3 was written
    monkeypatch.setattr(TrainCheckpointer, "_write_digest", write_digest)
    assert restored_step(tmp_path) == 2


def test_a_failed_write_names_the_error_and_keeps_the_last_good_one(tmp_path, monkeypatch):
    checkpointer = write(tmp_path, [1])
    manager = checkpointer._manager

    def full_disk(step, *args, **kwargs):
        partial = tmp_path / "checkpoints" / f"{step}.orbax-checkpoint-tmp"
        partial.mkdir()
        (partial / "part").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manager, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as raised:
        checkpointer.save(2, state_at(2), {"generation_step": 2, "note": "s2"})
    message = str(raised.value)
    assert message.startswith("checkpoint of step 2 not written: OSError: the disk is full")
    assert message.endswith(
        f"the last good checkpoint is step 1 ({tmp_path / 'checkpoints' / '1'})"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    assert restored_step(tmp_path) == 1


def test_a_step_written_by_an_earlier_run_is_never_overwritten(tmp_path):
    write(tmp_path, [1])
    with pytest.raises(CheckpointWriteError, match="exists already .*resume"):
        TrainCheckpointer(tmp_path).save(1, state_at(5), {"generation_step": 1})
    assert restored_step(tmp_path) == 1


def test_the_digest_lists_every_file_and_every_array(tmp_path):
    write(tmp_path, [1])
    step_dir = tmp_path / "checkpoints" / "1"
    record = json.loads((step_dir / "digest.process_0.json").read_text())
    on_disk = digest.file_sizes(step_dir, lambda name: not name.startswith("digest."))
    assert record["files"] == on_disk
    assert sorted(record["arrays"]) == ["['count']", "['moments']", "['params']['w']"]
    assert record["arrays"] == digest.content_digests(state_at(1))


TWO_PROCESS_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
process, port, folder, phase = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from maye_jax.storage.train_checkpoints import TrainCheckpointer
mesh = jax.make_mesh((8,), ("x",))
def state_at(step):
    data = np.arange(8 * 1024, dtype=np.float32) * (step + 1)
    w = jax.make_array_from_callback(data.shape, NamedSharding(mesh, P("x")), lambda i: data[i])
    return {"w": w, "n": jax.device_put(np.int32(step), NamedSharding(mesh, P()))}
checkpointer = TrainCheckpointer(folder, keep=5)
if phase == "save":
    for step in (1, 2):
        checkpointer.save(step, state_at(step), {"generation_step": step})
else:
    template = state_at(0)
    state, meta = checkpointer.restore_latest(template, jax.tree.map(lambda x: x.sharding, template))
    local = np.concatenate([np.asarray(s.data) for s in state["w"].addressable_shards])
    print(json.dumps({"step": meta["generation_step"], "local_sum": float(local.sum())}))
checkpointer.close()
"""


def run_two_processes(script, folder, phase) -> list[str]:
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.getcwd()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(folder), phase],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    return [out for out, _ in outputs] + [err for _, err in outputs]


def test_two_processes_agree_on_the_step_they_restore(tmp_path):
    """Each process checks the files the other did not write; process 1's truncated data file
    is seen by process 1 alone, yet both restore step 1 (process 0 is told where)."""
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    folder = tmp_path / "run"
    run_two_processes(script, folder, "save")
    step_dir = folder / "checkpoints" / "2"
    assert json.loads((step_dir / "digest.process_1.json").read_text())["files"]
    victim = max(step_dir.glob("state/ocdbt.process_1/d/*"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as handle:
        handle.truncate(100)
    out0, out1, err0, err1 = run_two_processes(script, folder, "restore")
    results = [json.loads(out.strip().splitlines()[-1]) for out in (out0, out1)]
    assert [r["step"] for r in results] == [1, 1]
    # step 1's values: arange * 2, each process holding its half
    half = np.arange(8 * 1024, dtype=np.float64).reshape(2, -1) * 2
    assert [r["local_sum"] for r in results] == [half[0].sum(), half[1].sum()]
    assert "checkpoints/2 cannot be trusted: damaged on process 1" in err0
    assert f"{victim.relative_to(step_dir)} has 100 bytes" in err1
