"""The paper's experiment in miniature on CPU (SPEC §5/§6): RL vs SFT from the same start, three
seeds each, then the report (Table 3 + curves with std bands).

    python -m maye_jax.experiment --config=configs/demo_paper.py

The start model is the demo's: the tiny Qwen2-VL-architecture model after the demo's SFT warm-up
on the synthetic solutions (one run, shared by every arm). Then, per seed, the demo's RL recipe
and an SFT run of as many epochs on the same training set, both evaluated at epoch 0 and after
every epoch on the in-distribution validation split and the out-of-distribution test split (64
problems: the training skills on shapes, wordings and units it never shows; maye_jax/data/synth_ood.py).
Writes runs/demo_paper/{start,rl_seed*,sft_seed*,report}; re-running continues where it stopped.
"""

import importlib.util
from pathlib import Path

from maye_jax.experiment import default_experiment


def demo_config():
    """configs/demo.py's config, loaded by path so this file works from any directory."""
    spec = importlib.util.spec_from_file_location(
        "maye_demo_config", Path(__file__).with_name("demo.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = demo_config()
    c.name = "demo_paper"
    c.output_dir = "runs/demo_paper"
    c.data.synth_dir = "runs/demo_paper/data"
    c.eval.splits = ("validation", "test")
    c.logging.progress_bar = False

    c.experiment = default_experiment()
    c.experiment.seeds = (0, 1, 2)
    c.experiment.warmup_epochs = c.sft.warmup_epochs  # the demo's warm-up makes the shared start
    c.experiment.sft_epochs = c.rl.num_epochs  # the SFT arm: as many epochs as RL
    c.experiment.sft_learning_rate = 1e-3
    return c
