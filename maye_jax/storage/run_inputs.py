"""What a run used to read its inputs and to evaluate, carried by every model folder it writes
(`initial_model/`, `start_model/`, `final_hf/`, `best_hf/`), so that `evaluate` and `score` on
such a folder read images and prompts, and draw samples, as the run did:

- `preprocessor_config.json`: the pixel limits, in the keys transformers 5.x and vLLM read
  (`size.shortest_edge` / `size.longest_edge` and `min_pixels` / `max_pixels`);
- `maye_jax_run.json` (the project's own file): the prompt template's name, the run's seed, the
  step its evaluation of these weights seeds its draws with, the compute dtype and the
  evaluation's longest response.

A run's train checkpoint (`RUN/checkpoints/N`) carries none of them; its run's run.json says
the same (`of_train_checkpoint`).

    RunInputs.of_run(settings, eval_step=step).write(folder)
    defaults = model_defaults(model_dir)     # {} for a folder no run wrote

This module must not import JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

RUN_FILE = "maye_jax_run.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class RunInputs:
    min_pixels: int
    max_pixels: int
    prompt_template: str  # a name of data.processor.PROMPT_TEMPLATES
    seed: int
    eval_step: int  # the `step` the run's evaluation of these weights draws its samples with
    dtype: str  # compute dtype: float32 | bfloat16
    eval_max_tokens: int

    @classmethod
    def of_run(cls, settings, *, eval_step: int) -> RunInputs:
        """The inputs of the run of `settings` (typed Settings), for weights its evaluation
        would evaluate with `eval_step` (RL: the generation step; SFT: the epoch)."""
        return cls(
            min_pixels=settings.data.min_pixels,
            max_pixels=settings.data.max_pixels,
            prompt_template=settings.data.prompt_template,
            seed=settings.seed,
            eval_step=int(eval_step),
            dtype=settings.model.dtype,
            eval_max_tokens=settings.eval.max_tokens,
        )

    def write(self, folder: str | os.PathLike) -> None:
        """`maye_jax_run.json`, and the pixel limits into `preprocessor_config.json` (the rest
        of it kept; written whole, with the Qwen processor's settings, when there is none)."""
        folder = Path(folder)
        record = {
            "prompt_template": self.prompt_template,
            "seed": self.seed,
            "eval_step": self.eval_step,
            "dtype": self.dtype,
            "eval_max_tokens": self.eval_max_tokens,
        }
        (folder / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
        path = folder / PREPROCESSOR_FILE
        if path.is_file():
            config = json.loads(path.read_text())
        else:
            from maye_jax.data.processor import VLProcessor

            config = VLProcessor(tokenizer=None).preprocessor_config()
        config["min_pixels"], config["max_pixels"] = self.min_pixels, self.max_pixels
        config["size"] = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        path.write_text(json.dumps(config, indent=2) + "\n")


def read_run_file(folder: str | os.PathLike) -> dict[str, Any]:
    """The fields of a model folder's `maye_jax_run.json` ({} without one)."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def of_train_checkpoint(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """What a run's train checkpoint's run used (its run.json), pixel limits included, with the
    evaluation step of the checkpoint's weights ({} without a run.json)."""
    from maye_jax.storage.run_models import run_folder_of

    checkpoint = Path(checkpoint).absolute()
    record_path = run_folder_of(checkpoint) / "run.json"
    if not record_path.is_file():
        return {}
    record = json.loads(record_path.read_text())
    config = record.get("config", {})
    data, model, evaluation = (config.get(k, {}) for k in ("data", "model", "eval"))
    step = int(checkpoint.name)
    if checkpoint.parent.parent.name == "sft_warmup":
        eval_step = 0  # the warm-up is never evaluated
    elif record.get("kind") == "sft":  # SFT evaluates with the epoch
        epochs = config.get("sft", {}).get("num_epochs") or config.get("rl", {}).get("num_epochs")
        steps_per_epoch = (record.get("total_steps") or 0) // max(epochs or 1, 1)
        eval_step = math.ceil(step / steps_per_epoch) if steps_per_epoch else 0
    else:
        eval_step = step
    found = {
        "min_pixels": data.get("min_pixels"),
        "max_pixels": data.get("max_pixels"),
        "prompt_template": _prompt_template(data),
        "seed": record.get("seed"),
        "eval_step": eval_step,
        "dtype": model.get("dtype"),
        "eval_max_tokens": evaluation.get("max_tokens"),
    }
    return {key: value for key, value in found.items() if value is not None}


def _prompt_template(data: dict) -> str | None:
    """The template a run's config.data used: its own, else its layout's (the option's None)."""
    from maye_jax.data.layouts import LAYOUTS

    if data.get("prompt_template") is not None:
        return data["prompt_template"]
    layout = LAYOUTS.get(data.get("layout", "maye"))
    return layout.prompt_template if layout is not None else None


def model_defaults(model_path: str | os.PathLike) -> dict[str, Any]:
    """The defaults `evaluate` and `score` take for a model: its run file's, a train
    checkpoint's run's ({} for a folder no run wrote; its pixel limits, if any, are in its
    preprocessor_config.json)."""
    from maye_jax.storage.run_models import is_train_checkpoint

    if is_train_checkpoint(model_path):
        return of_train_checkpoint(model_path)
    return read_run_file(model_path)
