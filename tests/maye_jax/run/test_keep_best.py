"""`checkpoint.keep_best` on a stand-in loop: the best evaluation's checkpoint survives the
retention of the newest ones, its weights are exported to best_hf/ and named in best.json, ties
keep the earlier step, a later best replaces it (and its checkpoint is pruned), a crash between
the checkpoint and the export is repaired on resume, and a metric no evaluation writes is
refused at start-up."""

from __future__ import annotations

import json
import os
import signal

import jax
import jax.numpy as jnp
import pytest

from maye_jax.config.defaults import default_config
from maye_jax.config.settings import ConfigError, load_settings
from maye_jax.run.best import BestEvaluation
from maye_jax.run.harness import RunHarness

METRIC = "eval/validation/pass@1_t0.6"


def config_for(tmp_path, **checkpoint):
    c = default_config()
    c.name = "best"
    c.output_dir = str(tmp_path / "run")
    c.model.tiny_family = "qwen2_vl"
    c.logging.progress_bar = False
    c.checkpoint.every_steps, c.checkpoint.keep, c.checkpoint.keep_best = 100, 1, METRIC
    for key, value in checkpoint.items():
        setattr(c.checkpoint, key, value)
    return c


def train(config, evaluations: dict[int, float], *, total=6, signal_at=None):
    """Steps add 1 to the state; step s logs `evaluations[s]` as the metric when present. The
    export writes the state's count, so best_hf/ shows which weights it holds."""
    settings = load_settings(config, kind="sft", check_files=False)
    holder = {"state": {"count": jnp.zeros((), jnp.int32)}}
    shardings = jax.tree.map(lambda x: x.sharding, holder["state"])

    def export(folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "count.txt").write_text(str(int(holder["state"]["count"])))

    with RunHarness(
        settings.output_dir, kind="sft", settings=settings, total_steps=total, export=export
    ) as run:
        start, holder["state"], _ = run.restore(holder["state"], shardings)
        for step in run.steps(start):
            holder["state"] = {"count": holder["state"]["count"] + 1}
            if step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            metrics = {METRIC: evaluations[step]} if step in evaluations else {}
            run.log(metrics, step=step, epoch=step)
            run.end_step(step, holder["state"], {})
        run.finish(None)
    return settings.output_dir


def checkpoint_steps(out) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def test_best_checkpoint_is_kept_and_exported_and_ties_keep_the_earlier(tmp_path):
    out = tmp_path / "run"
    train(config_for(tmp_path), {2: 0.3, 4: 0.5, 6: 0.5})
    assert checkpoint_steps(out) == [4, 6]  # the newest (keep=1) and the best
    record = json.loads((out / "best.json").read_text())
    assert (record["metric"], record["value"], record["generation_step"]) == (METRIC, 0.5, 4)
    assert record["checkpoint"] == "checkpoints/4" and record["model"] == "best_hf"
    assert (out / "best_hf" / "count.txt").read_text() == "4"


def test_a_later_best_replaces_it_and_a_crash_before_the_export_is_repaired(tmp_path):
    out = tmp_path / "run"
    config = config_for(tmp_path)
    train(config, {2: 0.3, 4: 0.5}, signal_at=4)  # stops after step 4, its best
    assert checkpoint_steps(out) == [4]
    # A crash after the checkpoint of step 4, before its export and record were written:
    (out / "best.json").unlink()
    (out / "best_hf" / "count.txt").write_text("stale")
    os.rename(out / "best_hf", out / "best_hf.partial")
    config.resume = True
    train(config, {2: 0.3, 4: 0.5, 6: 0.4}, total=6)
    assert json.loads((out / "best.json").read_text())["generation_step"] == 4
    assert (out / "best_hf" / "count.txt").read_text() == "4"  # from the restored weights
    assert checkpoint_steps(out) == [4, 6]
    # Resumed again with more steps and a better value at step 8: step 4 is pruned.
    config.resume = True
    train(config, {2: 0.3, 4: 0.5, 6: 0.4, 8: 0.9}, total=8)
    assert checkpoint_steps(out) == [8]
    assert json.loads((out / "best.json").read_text())["generation_step"] == 8
    assert (out / "best_hf" / "count.txt").read_text() == "8"


def test_best_of_metric_lines():
    lines = [
        {"generation_step": 0, "epoch": 0, METRIC: 0.2},
        {"generation_step": 1, "epoch": 1},
        {"generation_step": 2, "epoch": 1, METRIC: 0.6},
        {"generation_step": 4, "epoch": 2, METRIC: 0.6},
    ]
    best = BestEvaluation.from_lines(METRIC, lines)
    assert (best.step, best.value, best.epoch, best.pending) == (2, 0.6, 1, False)


def test_a_metric_no_evaluation_writes_is_refused(tmp_path):
    config = config_for(tmp_path, keep_best="eval/validation/pass@1_t0.7")
    with pytest.raises(ConfigError, match="config.checkpoint.keep_best: 'eval/validation/pass"):
        load_settings(config, kind="sft", check_files=False)
    config.checkpoint.keep_best = METRIC
    config.eval.enabled = False
    with pytest.raises(ConfigError, match="config.checkpoint.keep_best: needs evaluations"):
        load_settings(config, kind="sft", check_files=False)
