"""Qwen3-VL's DeepStack in the layer scan, timed against the model's own layer loop in the same run.

    python benchmarks/deepstack_scan.py [--hidden=256] [--layers=8] [--levels=3] [--rows=8]

One jitted update (`training/update.py`, fp32, one CPU device) of a random Qwen3-VL whose image
features come precomputed per row (the frozen tower: K DeepStack levels beside each token's
feature), two ways: `UpdateConfig.scan_layers=False` (the model's loop: the baseline) and
`scan_layers=True` (`models/layer_scan.py`: every layer scanned, the levels closed over, layer i
adding level i while i < K). Prints the median seconds per update, the compile seconds and the
scan's ratio to the loop. Every row holds an image of 64 merged tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import fp32_update_step, median_seconds  # noqa: E402

from maye_jax.data.sequences import make_sequence_batch, tower_features  # noqa: E402
from maye_jax.models.configs import ModelConfig  # noqa: E402
from maye_jax.rl.losses import LossConfig  # noqa: E402
from maye_jax.tiny import tiny_hf_config  # noqa: E402
from maye_jax.training.batch import UpdateBatch, per_row_image_features  # noqa: E402
from maye_jax.training.update import UpdateConfig  # noqa: E402


def qwen3_config(args) -> ModelConfig:
    hf = tiny_hf_config(
        "qwen3_vl",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        vision_depth=args.levels,
    )
    hf.vision_config.deepstack_visual_indexes = list(range(args.levels))
    return ModelConfig.from_hf(hf)


def minibatch(model, config: ModelConfig, args) -> UpdateBatch:
    """`rows` rows of a 64-token image, prompt text and a response, as 2 micro-batches."""
    rng = np.random.default_rng(0)
    image = [
        config.vision_start_token_id,
        *[config.image_token_id] * 64,
        config.vision_end_token_id,
    ]
    prompts = [
        dict(
            input_ids=np.array(list(rng.integers(0, 200, args.prompt - 66)) + image),
            pixel_values=rng.standard_normal((256, config.vision.patch_dim), np.float32),
            image_grid_thw=np.array([[1, 16, 16]]),
        )
        for _ in range(args.rows)
    ]
    responses = [list(rng.integers(0, 200, args.response)) for _ in range(args.rows)]
    batch = make_sequence_batch(prompts, responses, config, pad_id=0, length_multiple=64)
    arrays = batch.device_arrays()
    features = tower_features(model, arrays["vision"])
    per_row, index = per_row_image_features(features, arrays["image_feature_index"], 64)
    shape = batch.response_mask.shape
    rows = UpdateBatch(
        input_ids=arrays["input_ids"],
        attention_mask=arrays["attention_mask"],
        positions=jnp.moveaxis(arrays["positions"], 0, 1),
        response_mask=arrays["response_mask"],
        advantages=jnp.asarray(rng.standard_normal(shape), jnp.float32),
        logprobs_old=jnp.asarray(rng.normal(-7, 0.1, shape), jnp.float32),
        image_feature_index=index,
        image_features=per_row,
    )
    return rows.split(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--levels", type=int, default=3, help="DeepStack levels (Qwen3-VL: 3)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    config = qwen3_config(args)
    variants = {"loop": False, "scan": True}
    print(
        f"Qwen3-VL: hidden {args.hidden}, {args.layers} layers, {args.levels} DeepStack levels, "
        f"vocab {args.vocab}, {args.rows} rows x {args.prompt}+{args.response} tokens, fp32, "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cores visible)"
    )
    seconds = {}
    batch = None
    for name, scan_layers in variants.items():
        update = UpdateConfig(
            loss=LossConfig(kl_loss_coeff=0.0), logprob_chunk_size=128, scan_layers=scan_layers
        )
        model, step, state, frozen = fp32_update_step(config, update)
        batch = batch or minibatch(model, config, args)
        holder = {"state": state}

        def run(step=step, holder=holder, frozen=frozen, batch=batch):
            holder["state"], metrics, _ = step(holder["state"], frozen, batch)
            jax.block_until_ready(metrics)

        started = time.perf_counter()
        run()
        compile_seconds = time.perf_counter() - started
        timing = median_seconds(run, args.steps, warmup=1)
        seconds[name] = timing["median"]
        print(
            f"  {name:<7} {timing['median']:7.3f} s per update (compile {compile_seconds:5.1f} s)"
        )
    print(f"  scan / loop: {seconds['scan'] / seconds['loop']:.3f}x the time")


if __name__ == "__main__":
    main()
