"""python -m maye_jax.evaluate --model=DIR --data=PATH [--engine=jax|hf|vllm] [--layout=...]: any
checkpoint or HF model under the scheme's generation settings (maye_jax/evaluation/evaluate.py),
on data of any format (`--format`, `--layout` and the key flags are config.data's)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from absl import flags

from maye_jax.data.data_flags import data_settings_from_flags, define_data_flags
from maye_jax.evaluation.evaluate import SETTINGS, evaluate_split

FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_string("model", None, "HF model directory or maye-jax checkpoint.")
    flags.DEFINE_string(
        "data", None, "The data to evaluate on: .jsonl, .parquet, save_to_disk folder."
    )
    flags.DEFINE_string("split", "test", "Name of the split in the metric keys.")
    flags.DEFINE_enum("engine", "jax", ["jax", "hf", "vllm"], "Rollout engine.")
    flags.DEFINE_string("worker_python", None, "Interpreter of the hf/vllm worker.")
    flags.DEFINE_list("settings", list(SETTINGS), "Evaluation settings.")
    flags.DEFINE_integer("max_tokens", 2048, "Max new tokens.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype (jax engine).")
    flags.DEFINE_string("output", "", "Optional jsonl of every response with its correctness.")
    flags.DEFINE_string("prompt_template", None, "Prompt template name; None: the layout's.")
    define_data_flags()
    flags.DEFINE_bool("progress", True, "Progress bars on stderr (--noprogress: none).")


def main(argv):
    del argv
    import jax.numpy as jnp

    from maye_jax.config.settings import section_settings
    from maye_jax.data.layouts import resolve_layout
    from maye_jax.data.processor import get_prompt_template, load_processor
    from maye_jax.data.records import DataError, images_per_prompt, read_records
    from maye_jax.errors import UserError
    from maye_jax.models.configs import ModelConfig
    from maye_jax.rollout.factory import make_engine

    if not FLAGS.model or not FLAGS.data:
        print("evaluate: --model and --data are required", file=sys.stderr)
        return 2
    if FLAGS.max_tokens < 1:
        print(f"evaluate: error: --max_tokens={FLAGS.max_tokens}: must be >= 1", file=sys.stderr)
        return 1
    if FLAGS.output and not Path(FLAGS.output).absolute().parent.is_dir():
        print(
            f"evaluate: error: --output: the folder of {FLAGS.output} does not exist",
            file=sys.stderr,
        )
        return 1
    scratch = tempfile.TemporaryDirectory(prefix="maye-evaluate-")
    try:
        data = data_settings_from_flags(prompt_template=FLAGS.prompt_template)
        records = read_records(FLAGS.data, resolve_layout(data), fmt=data.format)
        dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
        from maye_jax.storage.model_folders import (
            export_hf,
            is_hf_directory,
            load_model,
            tokenizer_source,
        )

        model, hf_config = load_model(FLAGS.model, dtype=dtype, progress=FLAGS.progress)
        config = ModelConfig.from_hf(hf_config)
        model_dir = str(tokenizer_source(FLAGS.model))  # a train checkpoint: its start model's
        processor = load_processor(model_dir, family=config.family)
        if FLAGS.engine != "jax" and not is_hf_directory(FLAGS.model):
            # a worker starts from an HF folder: write the loaded weights as one
            model_dir = str(export_hf(model, hf_config, scratch.name, tokenizer_source=model_dir))
        engine = make_engine(
            FLAGS.engine,
            model=model,
            config=config,
            tokenizer=processor.tokenizer,
            model_dir=model_dir,
            rollout=section_settings(
                "rollout", engine=FLAGS.engine, worker_python=FLAGS.worker_python
            ),
            dtype=FLAGS.dtype,
            images_per_prompt=images_per_prompt({"data": records}),
        )
        try:
            metrics, rows = evaluate_split(
                engine,
                processor,
                records,
                split=FLAGS.split,
                settings=FLAGS.settings,
                max_tokens=FLAGS.max_tokens,
                seed=FLAGS.seed,
                step=0,
                instruction=get_prompt_template(data.prompt_template),
                progress=FLAGS.progress,
            )
        finally:
            engine.close()
    except (UserError, DataError, FileNotFoundError, ValueError) as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 1
    finally:
        scratch.cleanup()
    if FLAGS.output:
        Path(FLAGS.output).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    _define_flags()
    run_cli("evaluate", main)
