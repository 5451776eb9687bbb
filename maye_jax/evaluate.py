"""python -m maye_jax.evaluate --model=DIR --data=PATH [--engine=jax|hf|vllm] [--layout=...]: any
checkpoint or HF model under the scheme's generation settings (maye_jax/evaluation/evaluate.py),
on data of any format (`--format`, `--layout` and the key flags are config.data's).

A model folder a run wrote (initial_model/, start_model/, final_hf/, best_hf/, or a train
checkpoint RUN/checkpoints/N) is read and evaluated as that run did: its pixel limits
(preprocessor_config.json), prompt template, seed, evaluation step, dtype and longest response
(maye_jax_run.json; a train checkpoint: its run's run.json) are the defaults of --min_pixels,
--max_pixels, --prompt_template, --seed, --step, --dtype and --max_tokens, so on the same engine
it gives the run's own numbers (a folder no run wrote: the data layout's prompt template). Metrics as JSON on stdout; progress on stderr.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from absl import flags

from maye_jax.data.data_flags import data_settings_from_flags, define_data_flags
from maye_jax.errors import UserError
from maye_jax.evaluation.evaluate import SETTINGS, evaluate_split

FLAGS = flags.FLAGS

# Without a run's file in the model folder (storage/run_inputs.py), these (the prompt template:
# the data layout's).
FALLBACKS = dict(seed=0, eval_step=0, dtype="bfloat16", eval_max_tokens=2048)
FROM_RUN = "default: the run's, from the model folder; else"


def _define_flags():
    flags.DEFINE_string("model", None, "HF model directory or maye-jax checkpoint.")
    flags.DEFINE_string(
        "data", None, "Records to evaluate on (.jsonl, .parquet, a save_to_disk folder)."
    )
    flags.DEFINE_string("split", "test", "Name of the split in the metric keys.")
    flags.DEFINE_enum("engine", "jax", ["jax", "hf", "vllm"], "Rollout engine.")
    flags.DEFINE_string("worker_python", None, "Interpreter of the hf/vllm worker.")
    flags.DEFINE_list("settings", list(SETTINGS), "Evaluation settings.")
    flags.DEFINE_integer("max_tokens", None, f"Max new tokens ({FROM_RUN} 2048).")
    flags.DEFINE_integer("seed", None, f"Sampling seed ({FROM_RUN} 0).")
    flags.DEFINE_integer(
        "step", None, f"The step the draws are seeded with, as a run's evaluation ({FROM_RUN} 0)."
    )
    flags.DEFINE_enum(
        "dtype", None, ["float32", "bfloat16"], f"Compute dtype ({FROM_RUN} bfloat16)."
    )
    flags.DEFINE_string("prompt_template", None, f"Prompt template name ({FROM_RUN} the layout's).")
    flags.DEFINE_integer(
        "min_pixels",
        None,
        "An image is resized to at least this many pixels (default: the "
        "model folder's preprocessor_config.json; else 3136).",
    )
    flags.DEFINE_integer(
        "max_pixels",
        None,
        "... and to at most this many (default: as --min_pixels; else 12845056).",
    )
    flags.DEFINE_string("output", "", "Optional jsonl of every response with its correctness.")
    flags.DEFINE_bool("progress", True, "Progress bars on stderr (--noprogress: none).")
    define_data_flags()


def options(model: str) -> dict:
    """The evaluation's options: each flag given, else the model folder's run's (storage/
    run_inputs.py), else FALLBACKS; pixel limits None unless given or a train checkpoint's
    run names them (then the model folder's preprocessor_config.json decides)."""
    from maye_jax.storage.run_inputs import model_defaults

    run = {**FALLBACKS, **model_defaults(model)}

    def pick(flag, key):
        value = getattr(FLAGS, flag)
        return run.get(key) if value is None else value

    return dict(
        prompt_template=pick("prompt_template", "prompt_template"),
        seed=pick("seed", "seed"),
        step=pick("step", "eval_step"),
        dtype=pick("dtype", "dtype"),
        max_tokens=pick("max_tokens", "eval_max_tokens"),
        min_pixels=pick("min_pixels", "min_pixels"),
        max_pixels=pick("max_pixels", "max_pixels"),
    )


def check_arguments() -> None:
    """The flags' mistakes, before any work."""
    from maye_jax.data.processor import prompt_template_names
    from maye_jax.storage.atomic import cannot_write
    from maye_jax.storage.model_folders import is_hf_directory, is_orbax_checkpoint
    from maye_jax.storage.run_models import is_train_checkpoint

    if not FLAGS.model or not FLAGS.data:
        raise UserError("--model and --data are required")
    model = FLAGS.model
    if not (is_hf_directory(model) or is_orbax_checkpoint(model) or is_train_checkpoint(model)):
        raise UserError(
            f"--model: {model}: neither an HF model directory (config.json + *.safetensors) "
            "nor a maye-jax checkpoint (maye_jax.json + params/, or a run's checkpoints/<step>)"
        )
    unknown = [s for s in FLAGS.settings if s not in SETTINGS]
    if unknown:
        raise UserError(f"--settings: {unknown}: unknown; known: {', '.join(SETTINGS)}")
    if FLAGS.prompt_template is not None and FLAGS.prompt_template not in prompt_template_names():
        raise UserError(
            f"--prompt_template: {FLAGS.prompt_template!r}: unknown; known: "
            f"{', '.join(prompt_template_names())}"
        )
    for flag in ("max_tokens", "min_pixels", "max_pixels"):
        value = getattr(FLAGS, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag}={value}: must be >= 1")
    if FLAGS.output:
        if not Path(FLAGS.output).absolute().parent.is_dir():
            raise UserError(f"--output: the folder of {FLAGS.output} does not exist")
        problem = cannot_write(FLAGS.output)
        if problem:
            raise UserError(f"--output: {FLAGS.output}: {problem}")


def check_prompts(records, processor, hf_config, instruction: str, max_tokens: int) -> None:
    """Every prompt and `max_tokens` response tokens fit in the model's context (what the
    engines hold here), before the model loads."""
    from maye_jax.data.prompt_length import prompt_lengths, within_limit
    from maye_jax.run.context import model_context

    context = model_context(hf_config)
    within_limit(
        records,
        prompt_lengths(processor, records, instruction),
        limit=context - max_tokens,
        on_error="fail",
        source=FLAGS.data,
        field="--max_tokens",
        why=(
            f"the model's context (max_position_embeddings) is {context}, and --max_tokens "
            f"{max_tokens} of it are kept for the response; lower --max_tokens or shorten them"
        ),
        skip_hint="",
    )


def main(argv):
    del argv
    import jax.numpy as jnp

    from maye_jax.config.settings import section_settings
    from maye_jax.data.layouts import resolve_layout
    from maye_jax.data.processor import get_prompt_template, load_processor
    from maye_jax.data.records import images_per_prompt, read_records
    from maye_jax.models.configs import ModelConfig
    from maye_jax.rollout.factory import make_engine
    from maye_jax.storage.model_folders import (
        export_hf,
        is_hf_directory,
        load_model,
        read_hf_config,
        tokenizer_source,
    )

    check_arguments()
    chosen = options(FLAGS.model)
    if (
        chosen["min_pixels"]
        and chosen["max_pixels"]
        and chosen["min_pixels"] > chosen["max_pixels"]
    ):
        raise UserError(
            f"--min_pixels {chosen['min_pixels']} > --max_pixels {chosen['max_pixels']}"
        )
    scratch = tempfile.TemporaryDirectory(prefix="maye-evaluate-")
    try:
        data = data_settings_from_flags(prompt_template=chosen["prompt_template"])
        layout = resolve_layout(data)
        records = read_records(FLAGS.data, layout, fmt=data.format)
        model_dir = str(tokenizer_source(FLAGS.model))  # a train checkpoint: its start model's
        hf_config = read_hf_config(model_dir)
        config = ModelConfig.from_hf(hf_config)
        processor = load_processor(
            model_dir,
            family=config.family,
            min_pixels=chosen["min_pixels"],
            max_pixels=chosen["max_pixels"],
        )
        instruction = get_prompt_template(layout.prompt_template)
        check_prompts(records, processor, hf_config, instruction, chosen["max_tokens"])
        dtype = jnp.bfloat16 if chosen["dtype"] == "bfloat16" else jnp.float32
        model, hf_config = load_model(FLAGS.model, dtype=dtype, progress=FLAGS.progress)
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
            dtype=chosen["dtype"],
            images_per_prompt=images_per_prompt({"data": records}),
        )
        try:
            metrics, rows = evaluate_split(
                engine,
                processor,
                records,
                split=FLAGS.split,
                settings=FLAGS.settings,
                max_tokens=chosen["max_tokens"],
                seed=chosen["seed"],
                step=chosen["step"],
                instruction=instruction,
                progress=FLAGS.progress,
            )
        finally:
            engine.close()
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from None
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
