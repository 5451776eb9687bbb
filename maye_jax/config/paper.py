"""The paper's four runs (SPEC §4) as one function; `configs/*.py` pick dataset and model.

Paths come from the environment or the command line, e.g.

    python -m maye_jax.train --config=configs/geo3k_qwen2_5_vl_7b.py \
        --config.model.path=/models/Qwen2.5-VL-7B-Instruct --config.data.root=/data/maye

8-GPU node: the trainer shards over GPUs 0-6 (fsdp=7), the vLLM worker owns GPU 7.
"""

from __future__ import annotations

import os

from maye_jax.config.defaults import default_config, paper_preset

DATASETS = {
    # name: (train, validation, test) relative to data.root, epochs (SPEC §1, §4)
    "geometry3k": (
        (
            "geometry3k/geometry3k_rl_v0.jsonl",
            "geometry3k/geometry3k_validation_v0.jsonl",
            "geometry3k/geometry3k_test_v0.jsonl",
        ),
        50,
    ),
    "mm_math5k": (
        (
            "mm_math/mm_math_rl_v0.jsonl",
            "mm_math/mm_math_validation_v0.jsonl",
            "mm_math/math_verse_test_v0.jsonl",
        ),
        30,
    ),
}


def paper_config(dataset: str, model: str):
    c = paper_preset(default_config())
    (train, validation, test), epochs = DATASETS[dataset]
    c.name = f"{dataset}_{model}"
    c.output_dir = f"runs/{c.name}"
    c.model.path = os.environ.get("MAYE_MODEL_PATH", f"models/{model}")
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.data.root = os.environ.get("MAYE_DATA_ROOT", "data")
    c.data.train_file, c.data.validation_file, c.data.test_file = train, validation, test
    c.data.min_pixels = 4 * 28 * 28
    c.data.max_pixels = 16384 * 28 * 28
    c.sharding.fsdp = 7
    c.rollout.engine = "vllm"
    # None: $MAYE_VLLM_PYTHON, else the project's .venv-vllm (rollout/factory.py)
    c.rollout.worker_python = os.environ.get("MAYE_VLLM_PYTHON") or None
    c.rollout.worker_devices = "7"
    c.rollout.gpu_memory_utilization = 0.75
    # A paper-size image (up to 4096 merged patches at max_pixels) plus 2048 response tokens.
    c.rollout.max_model_len = 8192
    c.rl.num_epochs = epochs
    # mm_math5k: 5000 records / 896 per step ~ 5 steps per epoch (150 steps over 30 epochs);
    # geometry3k: 2101 / 896 ~ 2 steps per epoch (100 steps over 50 epochs), as in the paper.
    c.rl.micro_batch_size = 28
    c.rl.forward_batch_size = 112
    c.eval.max_tokens = 2048
    c.checkpoint.every_steps = 10
    return c


def qwen3_vl_config(dataset: str, model: str):
    """Not one of the paper's runs: a Qwen3-VL model with the hyper-parameters of its Qwen2.5-VL-7B
    runs. The pixel bounds keep the same 4 .. 16384 merged tokens per image, in Qwen3-VL's
    32 x 32-pixel tokens (16384 x 32 x 32 is also Qwen3-VL's own largest image)."""
    c = paper_config(dataset, model)
    c.data.min_pixels = 4 * 32 * 32
    c.data.max_pixels = 16384 * 32 * 32
    return c
