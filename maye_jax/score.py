"""Teacher-forced log-probabilities of given responses (for debugging and parity checks).

    python -m maye_jax.score --model=DIR --data=FILE.jsonl --output=OUT.jsonl [--dtype=float32]

DIR is an HF model directory or a maye-jax Orbax checkpoint. Each input record (any format and
layout of config.data: `--format`, `--layout`, the key flags) holds a question, its images and
a `response` string. Each output line is the input row (without embedded image bytes) plus
`response_token_ids` and `response_logprobs` (one float per response token) under the prompt
of SPEC §1 (`--prompt_template`, default the layout's). The response is tokenized alone, with
no special tokens added and nothing appended.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from absl import flags

from maye_jax.data.data_flags import data_settings_from_flags, define_data_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF model directory or maye-jax checkpoint.", required=True)
flags.DEFINE_string("data", None, "Input records with a `response` (any format).", required=True)
flags.DEFINE_string("output", None, "Output jsonl.", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("batch_size", 8, "Records per forward pass.")
flags.DEFINE_float("temperature", 1.0, "Logprobs are log_softmax(logits / temperature).")
flags.DEFINE_integer("chunk_size", 512, "Sequence chunk of the logprob computation.")
flags.DEFINE_bool("progress", True, "Progress bars on stderr (--noprogress: none).")
flags.DEFINE_string("prompt_template", None, "Prompt template name; None: the layout's.")
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
    instruction: str | None = None,
):
    """Yields (record, token_ids, logprobs) in input order, each prompt under `instruction`
    (None: MAYE's); `progress`: a bar over the records on stderr, with ETA."""
    from maye_jax.data.processor import MAYE_INSTRUCTION

    instruction = MAYE_INSTRUCTION if instruction is None else instruction
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


def main(argv):
    del argv
    import jax.numpy as jnp

    from maye_jax.data.layouts import resolve_layout
    from maye_jax.data.processor import get_prompt_template, load_processor
    from maye_jax.data.records import DataError, read_records
    from maye_jax.models.configs import ModelConfig
    from maye_jax.storage.model_folders import load_model

    started = time.time()
    dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
    if FLAGS.temperature <= 0:  # logprobs divide the logits by it
        print(f"score: error: --temperature={FLAGS.temperature}: must be > 0", file=sys.stderr)
        return 1
    output_folder = Path(FLAGS.output).absolute().parent
    if not output_folder.is_dir():
        print(f"score: error: --output: folder {output_folder} does not exist", file=sys.stderr)
        return 1
    try:
        data = data_settings_from_flags(prompt_template=FLAGS.prompt_template)
        records = read_records(FLAGS.data, resolve_layout(data), fmt=data.format, kind="score")
        model, hf_config = load_model(FLAGS.model, dtype=dtype, progress=FLAGS.progress)
        config = ModelConfig.from_hf(hf_config)
        processor = load_processor(FLAGS.model, family=config.family)
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
                instruction=get_prompt_template(data.prompt_template),
            ):
                line = dict(record.fields, response_token_ids=ids, response_logprobs=logprobs)
                out.write(json.dumps(line, ensure_ascii=False, default=_json_value) + "\n")
                count += 1
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"score: error: {error}", file=sys.stderr)
        return 1
    print(f"score: {count} record(s) -> {FLAGS.output} in {time.time() - started:.1f} s")
    return 0


if __name__ == "__main__":
    from maye_jax.run.cli import run_cli

    run_cli("score", main)
