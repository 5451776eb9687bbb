"""The run harness on a stand-in state: run.json, metrics, checkpoint cadence, a signal stops
the run after its step with a checkpoint, resume restores the state and drops later metric
lines, and named timing sections are exclusive of the sections nested in them."""

from __future__ import annotations

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maye_jax.config.defaults import default_config
from maye_jax.config.settings import load_settings
from maye_jax.run import harness as harness_module
from maye_jax.run.harness import RunHarness, SectionTimer
from maye_jax.run.metrics import read_metrics


def settings_for(tmp_path, **checkpoint):
    c = default_config()
    c.name = "harness"
    c.output_dir = str(tmp_path / "run")
    c.model.tiny_family = "qwen2_vl"
    c.logging.progress_bar = False
    for key, value in checkpoint.items():
        setattr(c.checkpoint, key, value)
    return c


def train(tmp_path, config, *, total=5, signal_at=None, data_ends_at=None):
    """A stand-in loop: the state counts steps; a SIGTERM arrives during step `signal_at`; the
    data runs out during step `data_ends_at` (as dynamic sampling can make it)."""
    settings = load_settings(config, kind="sft", check_files=False)  # no data is read
    state = {"count": jnp.zeros((), jnp.int32), "weights": jnp.arange(4.0)}
    shardings = jax.tree.map(lambda x: x.sharding, state)
    with RunHarness(settings.output_dir, kind="sft", settings=settings, total_steps=total) as run:
        start, state, meta = run.restore(state, shardings)
        for step in run.steps(start):
            with run.section("update"):
                state = {"count": state["count"] + 1, "weights": state["weights"] * 2}
                if step == signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)
            if step == data_ends_at:
                run.end_early(step)
            run.log({"count": int(state["count"]), **run.timings()}, step=step, epoch=1)
            run.end_step(step, state, {"note": f"after {step}"})
        run.finish(None)
        return run, state, start, meta


def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_continues(tmp_path):
    config = settings_for(tmp_path, every_steps=2, keep=5)
    previous = signal.getsignal(signal.SIGTERM)
    run, state, _, _ = train(tmp_path, config, signal_at=3)
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored on exit
    out = tmp_path / "run"
    assert run.stop_requested and not run.finished and run.last_step == 3
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 3]  # the cadence, then the stop
    assert [m["generation_step"] for m in read_metrics(out)] == [1, 2, 3]
    record = json.loads((out / "run.json").read_text())
    assert (record["kind"], record["total_steps"], record["finished"]) == ("sft", 5, False)
    # A metric line written after the checkpoint (a crash before the next one) is dropped.
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"generation_step": 4, "epoch": 1, "count": 99}) + "\n")
    config.resume = True
    run, state, start, meta = train(tmp_path, config)
    assert start == 3 and meta["note"] == "after 3" and meta["generation_step"] == 3
    assert run.finished and int(state["count"]) == 5
    assert json.loads((out / "run.json").read_text())["finished"] is True
    np.testing.assert_array_equal(np.asarray(state["weights"]), np.arange(4.0) * 2**5)
    assert [m["count"] for m in read_metrics(out)] == [1, 2, 3, 4, 5]


def test_a_run_whose_data_ends_early_finishes_there_with_a_checkpoint(tmp_path):
    config = settings_for(tmp_path, every_steps=10, keep=5)
    run, state, _, _ = train(tmp_path, config, total=6, data_ends_at=4)
    out = tmp_path / "run"
    assert run.finished and run.last_step == 4 and int(state["count"]) == 4
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4]  # the last step, although not on the cadence
    config.resume = True
    settings = load_settings(config, kind="sft", check_files=False)
    with RunHarness(out, kind="sft", settings=settings, total_steps=6) as run:
        state = {"count": jnp.zeros((), jnp.int32), "weights": jnp.arange(4.0)}
        start, _, _ = run.restore(state, jax.tree.map(lambda x: x.sharding, state))
        run.end_early(start)  # the resumed loop knows its data ended there
        assert start == 4 and list(run.steps(start)) == [] and run.finished
    assert [m["generation_step"] for m in read_metrics(out)] == [1, 2, 3, 4]


def test_sections_are_exclusive_of_nested_sections(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 10.0, 10.0, 12.0])  # outer(in, nested in, nested out, out), other
    monkeypatch.setattr(harness_module.time, "perf_counter", lambda: next(clock))
    timer = SectionTimer()
    with timer.section("rollout"):
        with timer.section("sync"):
            pass
    with timer.section("update"):
        pass
    assert timer.take() == {"sync": 2.0, "rollout": 8.0, "update": 2.0}
    assert timer.take() == {}


def test_an_evaluation_a_stop_abandons_is_rerun_whole_on_resume(tmp_path):
    """The harness's evaluation protocol, once for RL and SFT: a stop request during step 2's
    evaluation checkpoints step 2 with its metrics (its line waits) and stops the run; the
    resumed run reruns the evaluation and writes step 2's line with both, then goes on."""
    from maye_jax.errors import EvaluationInterrupted, RunStopped

    config = settings_for(tmp_path, every_steps=10, keep=5)
    calls = []

    def evaluate_every_step(run, step, interrupt_at=None):
        def evaluate():
            calls.append(step)
            if step == interrupt_at:  # a SIGTERM arrived: the evaluation sees should_stop()
                run.stop_requested = True
                assert run.should_stop()
                raise EvaluationInterrupted("a stop request")
            return {"eval/score": float(step)}

        return evaluate

    def train(interrupt_at=None):
        settings = load_settings(config, kind="sft", check_files=False)
        state = {"count": jnp.zeros((), jnp.int32)}
        shardings = jax.tree.map(lambda x: x.sharding, state)
        with RunHarness(settings.output_dir, kind="sft", settings=settings, total_steps=3) as run:
            start, state, meta = run.restore(state, shardings)
            if start == 0:
                run.evaluate_start(evaluate_every_step(run, 0))
            run.finish_interrupted_evaluation(start, meta, start, evaluate_every_step(run, start))
            for step in run.steps(start):
                state = {"count": state["count"] + 1}
                run.end_step_with_evaluation(
                    step,
                    state,
                    {"note": step},
                    {"count": int(state["count"])},
                    epoch=step,
                    evaluate=evaluate_every_step(run, step, interrupt_at),
                )
            run.finish(None)
        return state

    with pytest.raises(RunStopped, match="stopped after step 2 of 3"):
        train(interrupt_at=2)
    out = tmp_path / "run"
    assert [m["generation_step"] for m in read_metrics(out)] == [0, 1]  # step 2's line waits
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [2]
    config.resume = True
    state = train()
    assert calls == [0, 1, 2, 2, 3] and int(state["count"]) == 3
    lines = read_metrics(out)
    assert [(m["generation_step"], m.get("count"), m["eval/score"]) for m in lines] == [
        (0, None, 0.0),
        (1, 1, 1.0),
        (2, 2, 2.0),  # the step's own metrics, saved with its checkpoint, and the rerun's
        (3, 3, 3.0),
    ]
