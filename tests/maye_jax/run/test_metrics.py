"""The metrics writer: JSONL lines with step/epoch, TensorBoard events, run.json, rollouts;
a torn last line (a kill or a full disk mid-write) is dropped, rewrites go through a rename."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maye_jax.run.metrics import (
    MetricsWriter,
    drop_rollouts_after,
    mark_run_finished,
    read_metrics,
    truncate_metrics,
    write_rollouts,
    write_run_json,
)


def test_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write(
        {"loss/total": np.float32(0.5), "lr": 1e-6, "grad_norm": float("nan")},
        generation_step=1,
        epoch=0,
    )
    writer.write({"loss/total": 0.25}, generation_step=2, epoch=1)
    writer.close()
    lines = read_metrics(tmp_path)
    assert lines[0] == {
        "generation_step": 1,
        "epoch": 0,
        "loss/total": 0.5,
        "lr": 1e-6,
        "grad_norm": None,
    }
    assert lines[1]["epoch"] == 1 and isinstance(lines[1]["generation_step"], int)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_run_json_and_rollouts(tmp_path):
    write_run_json(
        tmp_path, name="demo", seed=3, kind="rl", config={"a": 1}, devices=["cpu:0"], total_steps=12
    )
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["name"] == "demo" and run["seed"] == 3 and run["kind"] == "rl"
    assert run["versions"]["jax"] and run["devices"] == ["cpu:0"]
    assert run["total_steps"] == 12 and run["finished"] is False
    mark_run_finished(tmp_path)
    assert json.loads((tmp_path / "run.json").read_text()) == dict(run, finished=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # no partial file left
    path = write_rollouts(
        tmp_path, 4, [{"prompt_id": "p1", "response": "x", "reward/accuracy": 1.0}]
    )
    assert path.name == "step_4.jsonl"
    assert json.loads(path.read_text())["prompt_id"] == "p1"


def test_a_torn_last_line_is_dropped_and_a_bad_middle_line_is_named(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    whole = [json.dumps({"generation_step": s, "epoch": 1, "x": s / 3}) for s in (1, 2)]
    path.write_text("\n".join(whole) + "\n" + whole[1][:9])  # a kill mid-write
    assert read_metrics(tmp_path) == [json.loads(line) for line in whole]
    assert "metrics.jsonl: dropped its torn last line 3" in caplog.text
    path.write_text(whole[0] + "\n{broken\n" + whole[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(tmp_path)


def test_truncate_metrics_rewrites_through_a_rename_and_drops_a_torn_tail(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write({"loss": step / 7}, generation_step=step, epoch=1)
    writer.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as handle:
        handle.write('{"generation_step": 4, "epo')
    inode = path.stat().st_ino
    truncate_metrics(tmp_path, 2)
    assert path.stat().st_ino != inode  # a new file renamed into place, never rewritten in place
    assert [m["loss"] for m in read_metrics(tmp_path)] == [1 / 7, 2 / 7]
    writer = MetricsWriter(tmp_path, append=True)  # the resumed run appends whole lines
    writer.write({"loss": 3 / 7}, generation_step=3, epoch=1)
    writer.close()
    assert [m["generation_step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


def test_rollouts_after_the_resumed_step_are_dropped_and_rewritten_whole(tmp_path):
    for step in (1, 2, 3):
        write_rollouts(tmp_path, step, [{"prompt_id": f"p{step}"}])
    first = (tmp_path / "rollouts" / "step_1.jsonl").stat().st_ino
    assert [p.name for p in drop_rollouts_after(tmp_path, 1)] == ["step_2.jsonl", "step_3.jsonl"]
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["step_1.jsonl"]
    write_rollouts(tmp_path, 1, [{"prompt_id": "again"}])
    assert (tmp_path / "rollouts" / "step_1.jsonl").stat().st_ino != first
