"""The metrics writer: JSONL lines with step/epoch, TensorBoard events, run.json, rollouts."""

from __future__ import annotations

import json

import numpy as np

from maye_jax.run.metrics import (
    MetricsWriter,
    mark_run_finished,
    read_metrics,
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
