"""The paper's experiment (SPEC §5/§6) as one command: RL vs SFT from the same start model,
several seeds each, then the multi-seed report.

    python -m maye_jax.experiment --config=configs/demo_paper.py

The config is an ordinary run config (its `rl`, `sft`, `rollout`, `eval`... sections configure
the arms) plus an `experiment` section:
  - `seeds`: the seeds of each arm, e.g. (0, 1, 2);
  - `warmup_epochs`: set, first fine-tunes `model` on the golden solutions for that many epochs
    (one run, seed `c.seed`) and starts both arms from the result, so that rewards are not all
    zero for a tiny model; None starts both arms from `model` itself;
  - `sft_epochs`, `sft_learning_rate`: the SFT arm (None: as many epochs as RL, and
    `sft.learning_rate`).

Layout of `output_dir`: `start/` (the warm-up run; `start/final_hf` is the arms' start model),
`rl_seed<s>/`, `sft_seed<s>/` and `report/` (maye_jax.report: table.md, summary.json, plots).
Every run is started with `resume`, so re-running the command after an interruption skips the
finished runs (run.json's `finished`, `metrics.run_finished`) and continues the interrupted one
from its checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import ml_collections
from absl import flags

log = logging.getLogger("maye_jax")


def default_experiment() -> ml_collections.ConfigDict:
    """The `experiment` section with its declared defaults (maye_jax/config/options.py)."""
    from maye_jax.config.defaults import section_config
    from maye_jax.config.options import ExperimentSettings

    return section_config(ExperimentSettings)


def _base(c) -> ml_collections.ConfigDict:
    c = copy.deepcopy(c)
    c.unlock()  # the command line locks its config; each run's copy changes fields
    if "experiment" in c:
        del c["experiment"]
    c.resume = True
    c.checkpoint.export_hf = True  # the warm-up's final_hf is the arms' start model
    return c


def warmup_config(c) -> ml_collections.ConfigDict:
    w = _base(c)
    w.name = f"{c.name}_start"
    w.output_dir = str(Path(c.output_dir) / "start")
    w.sft.num_epochs = c.experiment.warmup_epochs
    w.sft.warmup_epochs = None
    w.model.train_embeddings = True  # the warm-up teaches the format: the whole LLM trains
    w.eval.enabled = False  # each arm evaluates the start model as its epoch 0
    return w


def arm_config(c, kind: str, seed: int, start_model: str) -> ml_collections.ConfigDict:
    """The config of one arm's run: RL (`kind="rl"`) or SFT, from `start_model`."""
    a = _base(c)
    a.name = f"{c.name}_{kind}"
    a.seed = seed
    a.report_group = c.report_group or c.name
    a.output_dir = str(Path(c.output_dir) / f"{kind}_seed{seed}")
    if start_model:
        a.model.path = start_model
        a.model.tiny_family = None
    a.sft.warmup_epochs = None  # the arms start from the shared (warmed) start model
    if kind == "rl":
        a.sft.num_epochs = None
    else:
        e = c.experiment
        a.sft.num_epochs = e.sft_epochs or c.rl.num_epochs
        if e.sft_learning_rate is not None:
            a.sft.learning_rate = e.sft_learning_rate
    return a


def run_experiment(c) -> dict:
    """Runs what is not finished yet, then the report; returns build_report's result (None in
    processes other than 0). Every run's config is checked before the first one starts."""
    from maye_jax.config.settings import load_settings
    from maye_jax.run.startup import hold_run_folder

    settings = load_settings(c, kind="experiment")
    # One experiment per folder; each run locks its own sub-folder (its prologue).
    with hold_run_folder(settings):
        return _run_experiment(c)


def _run_experiment(c) -> dict:
    from maye_jax.config.settings import load_settings
    from maye_jax.evaluation.report import build_report
    from maye_jax.run.metrics import run_finished
    from maye_jax.sft import run_sft
    from maye_jax.train import run_rl

    start_model = c.model.path
    warmup = warmup_config(c) if c.experiment.warmup_epochs else None
    if warmup is not None:
        load_settings(warmup, kind="sft")
        start_model = str(Path(warmup.output_dir).absolute() / "final_hf")
    for seed in c.experiment.seeds:
        for kind in ("rl", "sft"):
            # the warm-up writes the arms' start model: its folder cannot be checked yet
            arm = arm_config(c, kind, seed, start_model)
            load_settings(arm, kind=kind, check_files=warmup is None)
    if warmup is not None and not run_finished(warmup.output_dir):
        log.info("experiment: SFT warm-up of the start model -> %s", warmup.output_dir)
        run_sft(warmup)
    run_dirs = []
    for seed in c.experiment.seeds:
        for kind in ("rl", "sft"):
            a = arm_config(c, kind, seed, start_model)
            run_dirs.append(a.output_dir)
            if run_finished(a.output_dir):
                log.info("experiment: %s seed %d finished earlier: %s", kind, seed, a.output_dir)
                continue
            log.info("experiment: %s seed %d -> %s", kind, seed, a.output_dir)
            if kind == "rl":
                run_rl(a)
            else:
                run_sft(a)
    from maye_jax.run import multihost

    report = None
    if multihost.is_leader():  # several processes: process 0 writes the report
        report = build_report(run_dirs, Path(c.output_dir) / "report")
    multihost.barrier("report written")
    return report


def main(argv) -> int:
    del argv
    c = flags.FLAGS.config
    report = run_experiment(c)
    if report is not None:
        print(report["markdown"])
        print(json.dumps({"report": str(Path(c.output_dir) / "report")}))
    return 0


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    run_cli("experiment", main, config_flag=True)
