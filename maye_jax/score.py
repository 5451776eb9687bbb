"""Teacher-forced log-probabilities of given responses (for debugging and parity checks).

    python -m maye_jax.score --model=DIR --data=FILE.jsonl --output=OUT.jsonl [--dtype=float32]

DIR is an HF model directory or a maye-jax Orbax checkpoint. Each input record (any format and
layout of config.data: `--format`, `--layout`, the key flags) holds a question, its images and
a `response` string. Each output line is the input row (without embedded image bytes) plus
`response_token_ids` and `response_logprobs` (one float per response token) under the prompt
template's prompt (the layout's by default: SPEC §1's for MAYE records). The response is
tokenized alone, with no special tokens added and nothing appended.

A model folder a run wrote is read as that run did: its pixel limits, prompt template and dtype
are the defaults of --min_pixels, --max_pixels, --prompt_template and --dtype
(storage/run_inputs.py). A prompt and response longer than the model's context are refused
before the model loads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import flags

from maye_jax.data.data_flags import data_settings_from_flags, define_data_flags
from maye_jax.data.processor import MAYE_INSTRUCTION
from maye_jax.errors import UserError

FLAGS = flags.FLAGS
FROM_RUN = "default: the run's, from the model folder; else"


def _define_flags() -> None:
    """CLI flags, defined only when run as a script so importing this module defines none."""
    flags.DEFINE_string("model", None, "HF model directory or maye-jax checkpoint.")
    flags.DEFINE_string("data", None, "Input records with a `response` (any format).")
    flags.DEFINE_string("output", None, "Output jsonl.")
    flags.DEFINE_enum(
        "dtype", None, ["float32", "bfloat16"], f"Compute dtype ({FROM_RUN} float32)."
    )
    flags.DEFINE_string("prompt_template", None, f"Prompt template name ({FROM_RUN} the layout's).")
    flags.DEFINE_integer(
        "min_pixels",
        None,
        "An image is resized to at least this many pixels (default: the model folder's "
        "preprocessor_config.json; else 3136).",
    )
    flags.DEFINE_integer(
        "max_pixels", None, "... and to at most this many (default: as --min_pixels)."
    )
    flags.DEFINE_integer("batch_size", 8, "Records per forward pass.")
    flags.DEFINE_float("temperature", 1.0, "Logprobs are log_softmax(logits / temperature).")
    flags.DEFINE_integer("chunk_size", 512, "Sequence chunk of the logprob computation.")
    flags.DEFINE_bool("progress", True, "Progress bars on stderr (--noprogress: none).")
    define_data_flags()


def score_records(
    model,
    processor,
    config,
    records,
    *,
    batch_size=8,
    temperature=1.0,
    chunk_size=512,
    progress: bool = False,
    instruction: str = MAYE_INSTRUCTION,
):
    """Yields (record, token_ids, logprobs) in input order, each prompt with `instruction`
    (a prompt template's); `progress`: a bar over the records on stderr, with ETA."""
    from tqdm import tqdm

    bar = tqdm(
        total=len(records), desc="score", unit="record", disable=not progress, file=sys.stderr
    )
    with bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            yield from _score_chunk(
                model,
                processor,
                config,
                chunk,
                batch_size=batch_size,
                temperature=temperature,
                chunk_size=chunk_size,
                instruction=instruction,
            )
            bar.update(len(chunk))


def _score_chunk(
    model, processor, config, chunk, *, batch_size, temperature, chunk_size, instruction
):
    """(record, token_ids, logprobs) of each record of one forward pass."""
    import jax
    import numpy as np

    from maye_jax.data.sequences import make_sequence_batch, score_batch

    tokenizer = processor.tokenizer
    prompts = [processor.encode_record(r, instruction) for r in chunk]
    responses = [
        tokenizer(r.fields["response"], add_special_tokens=False)["input_ids"] for r in chunk
    ]
    for record, ids in zip(chunk, responses):
        if ids and max(ids) >= config.text.vocab_size:
            raise ValueError(
                f"{record.source}: response token id {max(ids)} is outside the "
                f"model's vocabulary ({config.text.vocab_size})"
            )
    batch = make_sequence_batch(
        prompts, responses, config, pad_id=tokenizer.pad_token_id, batch_size=batch_size
    )
    logprobs = score_batch(
        model,
        batch.device_arrays(),
        prompt_len=batch.prompt_len,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    logprobs = np.asarray(jax.device_get(logprobs))
    for row, (record, ids) in enumerate(zip(chunk, responses)):
        yield record, list(ids), logprobs[row, : len(ids)].tolist()


def _json_value(value):
    """A value JSON has no type for (a date, bytes of a column other than the images): its
    text, so every input field passes through."""
    return value.hex() if isinstance(value, bytes) else str(value)


def check_arguments() -> None:
    """The flags' mistakes, before any work."""
    from maye_jax.data.processor import prompt_template_names
    from maye_jax.storage.atomic import cannot_write
    from maye_jax.storage.model_folders import is_hf_directory, is_orbax_checkpoint
    from maye_jax.storage.run_models import is_train_checkpoint

    if not (FLAGS.model and FLAGS.data and FLAGS.output):
        raise UserError("--model, --data and --output are required")
    model = FLAGS.model
    if not (is_hf_directory(model) or is_orbax_checkpoint(model) or is_train_checkpoint(model)):
        raise UserError(
            f"--model: {model}: neither an HF model directory (config.json + *.safetensors) "
            "nor a maye-jax checkpoint (maye_jax.json + params/, or a run's checkpoints/<step>)"
        )
    if FLAGS.temperature <= 0:  # logprobs divide the logits by it
        raise UserError(f"--temperature={FLAGS.temperature}: must be > 0")
    for flag in ("batch_size", "chunk_size", "min_pixels", "max_pixels"):
        value = getattr(FLAGS, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag}={value}: must be >= 1")
    if FLAGS.prompt_template is not None and FLAGS.prompt_template not in prompt_template_names():
        raise UserError(
            f"--prompt_template: {FLAGS.prompt_template!r}: unknown; known: "
            f"{', '.join(prompt_template_names())}"
        )
    output_folder = Path(FLAGS.output).absolute().parent
    if not output_folder.is_dir():
        raise UserError(f"--output: folder {output_folder} does not exist")
    problem = cannot_write(FLAGS.output)
    if problem:
        raise UserError(f"--output: {FLAGS.output}: {problem}")


def main(argv):
    del argv
    import jax.numpy as jnp

    from maye_jax.data.layouts import resolve_layout
    from maye_jax.data.processor import get_prompt_template, load_processor
    from maye_jax.data.prompt_length import prompt_lengths, within_limit
    from maye_jax.data.records import read_records
    from maye_jax.models.configs import ModelConfig
    from maye_jax.run.context import model_context
    from maye_jax.storage.model_folders import load_model, read_hf_config, tokenizer_source
    from maye_jax.storage.run_inputs import model_defaults

    started = time.time()
    check_arguments()
    run = model_defaults(FLAGS.model)  # what the run that wrote the model folder used
    dtype_name = FLAGS.dtype or run.get("dtype", "float32")
    template = FLAGS.prompt_template or run.get("prompt_template")  # None: the layout's
    try:
        data = data_settings_from_flags(prompt_template=template)
        layout = resolve_layout(data)
        records = read_records(FLAGS.data, layout, fmt=data.format, kind="score")
        model_dir = tokenizer_source(FLAGS.model)  # a train checkpoint: its start model's
        hf_config = read_hf_config(model_dir)
        config = ModelConfig.from_hf(hf_config)
        processor = load_processor(
            model_dir,
            family=config.family,
            min_pixels=FLAGS.min_pixels or run.get("min_pixels"),
            max_pixels=FLAGS.max_pixels or run.get("max_pixels"),
        )
        instruction = get_prompt_template(layout.prompt_template)
        tokenizer = processor.tokenizer
        lengths = [
            prompt + len(tokenizer(r.fields["response"], add_special_tokens=False)["input_ids"])
            for r, prompt in zip(records, prompt_lengths(processor, records, instruction))
        ]
        context = model_context(hf_config)
        within_limit(  # prompt and response together: the positions the model has
            records,
            lengths,
            limit=context,
            on_error="fail",
            source=FLAGS.data,
            field="--data",
            why=f"prompt and response count here, the model's context is {context} tokens",
            skip_hint="",
        )
        dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
        model, hf_config = load_model(FLAGS.model, dtype=dtype, progress=FLAGS.progress)
        count = 0
        with open(FLAGS.output, "w", encoding="utf-8") as out:
            for record, ids, logprobs in score_records(
                model,
                processor,
                config,
                records,
                batch_size=FLAGS.batch_size,
                temperature=FLAGS.temperature,
                chunk_size=FLAGS.chunk_size,
                progress=FLAGS.progress,
                instruction=instruction,
            ):
                line = dict(record.fields, response_token_ids=ids, response_logprobs=logprobs)
                out.write(json.dumps(line, ensure_ascii=False, default=_json_value) + "\n")
                count += 1
    except (FileNotFoundError, ValueError) as error:
        raise UserError(str(error)) from None
    print(f"score: {count} record(s) -> {FLAGS.output} in {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    _define_flags()
    run_cli("score", main)
