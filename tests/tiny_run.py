"""The tests' tiny run, defined once: the config every end-to-end test starts from (the golden
runs, the RL and SFT tests, the fault and multi-process tests), each then setting what it is
about.

A one-layer Qwen2-VL-architecture model of hidden size 64 with the real 152k-token tokenizer
(fp32, so runs repeat exactly), a synthetic text-dominant data set of 4 / 2 / 2 problems with
56-pixel images, 6-token responses and 4-token evaluations, 2 epochs of one step each at
4 responses per step, checkpoints after every step, no progress bars.
"""

from __future__ import annotations

from pathlib import Path


def tiny_run_config(output_dir, data_dir, *, name: str = "test"):
    """The tiny run writing into `output_dir`, its synthetic data generated into `data_dir`."""
    from maye_jax.config.defaults import default_config

    c = default_config()
    c.name = name
    c.output_dir = str(Path(output_dir))
    c.model.tiny_family = "qwen2_vl"
    c.model.tiny_hidden_size = 64
    c.model.tiny_num_layers = 1
    c.model.dtype = c.model.frozen_dtype = "float32"
    c.data.synth_dir = str(Path(data_dir))
    c.data.synth_num_train, c.data.synth_num_validation, c.data.synth_num_test = 4, 2, 2
    c.data.synth_image_size = 56
    c.data.max_pixels = 4 * 28 * 28
    c.rollout.max_tokens = 6
    c.rollout.num_samples = 1
    c.rl.num_epochs = 2
    c.rl.batch_size = 4
    c.rl.ppo_batch_size = 2
    c.rl.micro_batch_size = 1
    c.rl.forward_batch_size = 4
    c.optim.learning_rate = 1e-3
    c.eval.max_tokens = 4
    c.checkpoint.every_steps = 1
    c.logging.progress_bar = False
    return c
