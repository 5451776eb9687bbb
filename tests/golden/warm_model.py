"""A short-SFT-warmed tiny model and its data, built once per test session (`warm_model` in
tests/conftest.py) for the end-to-end runs that must stop, score and learn.

The tiny random Qwen2-VL (hidden 64, 2 layers, the real 152k vocabulary: the run's special token
ids are the real tokenizer's) is fine-tuned by the SFT baseline (`maye_jax.sft.run_sft`) on two
kinds of questions:

- "sum" (with an image): always answered `3 + 4 = \\boxed{7}` (11 tokens with the end of
  sequence): the model becomes sure of it, so its answers are known (right where a record's
  answer is 7, wrong where it is 8);
- "side" (text only): answered `\\boxed{3}` (wrong, 6 tokens with the end of sequence) in 2
  of 6 solutions, `x = 2 + 3, so \\boxed{5}` (right, 15 tokens) in 2 and
  `x = 2 + 3 = 5, so \\boxed{5}` (right, 18 tokens) in 2: the model is split between a short
  wrong answer and two right ones that part after `x = 2 + 3`, so responses end at different
  lengths (or run past a `max_tokens` of 16), accuracy is neither 0 nor 1, and RL with the
  accuracy reward moves it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

SUM_QUESTION = "<image>What is the sum of the two numbers in the picture?"
SIDE_QUESTION = "Find the length of side x."
SUM_SOLUTION = "3 + 4 = \\boxed{7}"
SIDE_SHORT_WRONG = "\\boxed{3}"
SIDE_RIGHT = "x = 2 + 3, so \\boxed{5}"
SIDE_LONG_RIGHT = "x = 2 + 3 = 5, so \\boxed{5}"


def _record(name: str, kind: str, solution: str, answer: str, image: str | None) -> dict:
    record = dict(
        id=name,
        question=SUM_QUESTION if kind == "sum" else SIDE_QUESTION,
        answer=answer,
        solution=solution,
    )
    if image is not None:
        record["image"] = image
    return record


def write_data(root: Path) -> dict[str, Path]:
    """The SFT warm-up set, the RL training set and the validation set (jsonl + 56 px images);
    returns {"sft", "train", "validation"}: file paths."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def image(name: str) -> str:
        pixels = rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{name}.png")
        return f"{name}.png"

    sets = {
        "sft": [
            _record(f"sft-sum-{i}", "sum", SUM_SOLUTION, "7", image(f"sft{i}")) for i in range(6)
        ]
        + [
            _record(f"sft-side-{i}", "side", solution, "", None)
            for i, solution in enumerate(
                [SIDE_SHORT_WRONG] * 2 + [SIDE_RIGHT] * 2 + [SIDE_LONG_RIGHT] * 2
            )
        ],
        "train": [
            _record("train-sum-0", "sum", "\\boxed{7}", "7", image("train0")),
            _record("train-side-0", "side", "\\boxed{5}", "5", None),
            _record("train-sum-1", "sum", "\\boxed{7}", "7", image("train1")),
            _record("train-side-1", "side", "\\boxed{5}", "5", None),
        ],
        "validation": [
            _record("validation-sum-7", "sum", "\\boxed{7}", "7", image("validation0")),
            _record("validation-sum-8", "sum", "\\boxed{8}", "8", image("validation1")),
            _record("validation-side-0", "side", "\\boxed{5}", "5", None),
            _record("validation-side-1", "side", "\\boxed{5}", "5", None),
        ],
    }
    files = {}
    for name, records in sets.items():
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return files


def sft_config(root: Path, files: dict[str, Path]):
    """40 SFT steps of the 12 solutions at a constant 1e-2: the loss goes from 11.9 to ~0.06
    per token (2 layers; 1 layer at a cosine-decayed 2e-2 stalled near 1.9)."""
    from maye_jax.config.defaults import default_config

    c = default_config()
    c.name = "warm_model"
    c.seed = 0
    c.output_dir = str(root / "sft")
    c.model.tiny_family = "qwen2_vl"
    c.model.tiny_hidden_size = 64
    c.model.tiny_num_layers = 2
    c.model.dtype = c.model.frozen_dtype = "float32"
    c.data.train_file = str(files["sft"])
    c.data.validation_file = str(files["validation"])
    c.data.max_pixels = 4 * 28 * 28
    c.data.prompt_template = "plain"  # short prompts: one 64-token bucket
    c.sft.num_epochs = 40
    c.sft.batch_size = c.sft.micro_batch_size = 12
    c.sft.learning_rate = 1e-2
    c.sft.warmup_fraction = 0.0
    c.optim.schedule = "constant"
    c.eval.enabled = False
    c.checkpoint.every_steps = 1000  # only the final checkpoint
    c.logging.progress_bar = False
    return c


def build(root: Path) -> tuple[Path, dict[str, Path]]:
    """Writes the data under `root/data` and the warmed model to `root/model` (an HF folder
    with its tokenizer); returns (model folder, data files)."""
    from maye_jax.sft import run_sft

    files = write_data(root / "data")
    config = sft_config(root, files)
    run_sft(config)
    model = root / "model"
    shutil.move(Path(config.output_dir) / "final_hf", model)
    shutil.rmtree(config.output_dir)  # checkpoints of the 152k vocabulary: ~0.3 GB
    return model, files
