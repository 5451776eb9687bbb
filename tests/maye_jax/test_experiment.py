"""maye_jax.experiment: warm-up once, RL and SFT arms per seed from its output, the report;
a second invocation finds every run finished and only rebuilds the report."""

from __future__ import annotations

import json

from maye_jax.experiment import arm_config, default_experiment, run_experiment
from maye_jax.run.metrics import read_metrics
from tests.maye_jax.test_train import tiny_config


def _experiment_config(tmp_path):
    c = tiny_config(tmp_path)
    c.name = "mini"
    c.rl.num_epochs = 1
    c.sft.batch_size = c.sft.micro_batch_size = 2
    c.sft.learning_rate = 1e-3
    c.eval.splits = ("validation",)
    c.eval.settings = ("pass@1_t0.01",)
    c.checkpoint.every_steps = 100
    c.experiment = default_experiment()
    c.experiment.seeds = (0, 1)
    c.experiment.warmup_epochs = 1
    c.lock()  # as the command line's config_flags does
    return c


def test_experiment_runs_both_arms_from_one_start_and_reports(tmp_path):
    c = _experiment_config(tmp_path)
    report = run_experiment(c)
    out = tmp_path / "run"
    start = str((out / "start" / "final_hf").absolute())
    for kind in ("rl", "sft"):
        for seed in (0, 1):
            run = json.loads((out / f"{kind}_seed{seed}" / "run.json").read_text())
            assert (run["kind"], run["seed"], run["name"]) == (kind, seed, f"mini_{kind}")
            assert run["config"]["model"]["path"] == start
            assert run["config"]["report_group"] == "mini"
            epochs = [
                m["epoch"]
                for m in read_metrics(out / f"{kind}_seed{seed}")
                if "eval/validation/pass@1_t0.01" in m
            ]
            assert epochs == [0, 1]
    (comparison,) = report["summary"]["comparisons"]
    assert comparison["rl"]["seeds"] == [0, 1] and comparison["sft"]["seeds"] == [0, 1]
    assert (out / "report" / "table.md").read_text() == report["markdown"]
    assert "RL mean" in report["markdown"] and "SFT max" in report["markdown"]

    # Everything is finished: a re-run trains nothing and rebuilds the same table.
    before = {p: p.stat().st_mtime_ns for p in out.glob("*_seed*/metrics.jsonl")}
    again = run_experiment(c)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*_seed*/metrics.jsonl")} == before
    assert again["markdown"] == report["markdown"]


def test_sft_arm_defaults_to_the_rl_epochs(tmp_path):
    c = _experiment_config(tmp_path)
    c.rl.num_epochs = 3  # a locked config still accepts changes to existing fields
    arm = arm_config(c, "sft", 2, "/models/start")
    assert arm.sft.num_epochs == 3 and arm.seed == 2 and arm.model.path == "/models/start"
    assert arm.model.tiny_family is None and "experiment" not in arm
    rl_arm = arm_config(c, "rl", 0, "/models/start")
    assert rl_arm.sft.num_epochs is None and rl_arm.sft.warmup_epochs is None
