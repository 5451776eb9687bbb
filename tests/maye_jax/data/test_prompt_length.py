"""Prompt lengths counted from each image's size without decoding it equal the processor's
encoding; records over the limit are refused in one line naming them or skipped with one
warning; the engines' context is checked against the longest prompt and the response."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from maye_jax.config.defaults import default_config
from maye_jax.config.settings import load_settings
from maye_jax.data.images import ImageSource
from maye_jax.data.processor import MAYE_INSTRUCTION, load_processor
from maye_jax.data.prompt_length import prompt_lengths, within_limit
from maye_jax.data.records import DataError, Record
from maye_jax.errors import UserError
from maye_jax.run.context import check_run_prompts

# (width, height) of each record's image; None: a text-only record. 900 x 700 is over
# max_pixels below, 20 x 300 is resized up to min_pixels, 28 x 28 is one patch group.
IMAGE_SIZES = [(56, 56), None, (900, 700), (20, 300), (28, 28)]


@pytest.fixture(scope="module")
def records(module_scratch):
    folder = module_scratch("prompt_length")
    rng = np.random.default_rng(0)
    out = []
    for i, size in enumerate(IMAGE_SIZES):
        images = ()
        if size is not None:
            path = str(folder / f"{i}.png")
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path)
            images = (ImageSource.read_header(f"f:{i + 1}: image 1", path=path),)
        question = ("<image>" if size else "") + "Find x. " * (1 + 3 * i)
        out.append(Record(str(i), question, "1", "\\boxed{1}", f"f:{i + 1}", {}, images))
    return out


@pytest.fixture(scope="module")
def processor():
    return load_processor(family="qwen2_vl", min_pixels=3136, max_pixels=64 * 3136)


def test_lengths_from_image_sizes_equal_the_encoded_prompts(records, processor):
    encoded = [len(processor.encode_record(r, MAYE_INSTRUCTION)["input_ids"]) for r in records]
    assert prompt_lengths(processor, records, MAYE_INSTRUCTION) == encoded
    assert encoded[2] - encoded[0] > 200  # the large image's tokens are counted


def test_over_the_limit_is_refused_naming_them_or_skipped_with_one_warning(
    records, processor, caplog
):
    lengths = prompt_lengths(processor, records, MAYE_INSTRUCTION)
    limit = sorted(lengths)[1]  # three records over it
    over = sorted(range(5), key=lambda i: -lengths[i])[:3]
    with pytest.raises(DataError) as refused:
        within_limit(
            records, lengths, limit=limit, on_error="fail", source="d.jsonl", field="f", why="w"
        )
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"f: 3 of the 5 records of d.jsonl have prompts longer than {limit}")
    assert ", ".join(f"{i}: {lengths[i]}" for i in over) in message  # the longest first
    with caplog.at_level(logging.WARNING, logger="maye_jax"):
        kept, kept_lengths = within_limit(
            records, lengths, limit=limit, on_error="skip", source="d.jsonl", field="f", why="w"
        )
    assert [r.id for r in kept] == [str(i) for i in range(5) if i not in over]
    assert kept_lengths == [lengths[int(r.id)] for r in kept]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("3 of the 5 records of d.jsonl have prompts longer than")
    assert warnings[0].endswith("; skipping them (data.on_error=skip)")


def _settings(**overrides):
    c = default_config()
    c.model.tiny_family = "qwen2_vl"
    c.data.min_pixels, c.data.max_pixels = 3136, 64 * 3136
    c.rollout.max_tokens = c.eval.max_tokens = 100
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(c, section), name, value)
    return load_settings(c, kind="rl", check_files=False)


def test_a_run_checks_its_prompts_and_every_engines_context(records, processor, monkeypatch):
    # the run's processor is the one above (the same pixel limits), not loaded again per run
    monkeypatch.setattr("maye_jax.run.context.run_processor", lambda *args: processor)
    lengths = prompt_lengths(processor, records, MAYE_INSTRUCTION)
    longest = max(lengths)
    data = {"train": records, "validation": records[:2]}
    # the default limit: the tiny model's 32768 positions minus rollout.max_tokens: all fit
    assert check_run_prompts(_settings(), data, kind="rl") == (data, processor)
    with pytest.raises(UserError, match=r"^config.data.max_prompt_tokens: 1 of the 5 records"):
        check_run_prompts(_settings(data__max_prompt_tokens=longest - 1), data, kind="rl")
    skipped, _ = check_run_prompts(
        _settings(data__max_prompt_tokens=longest - 1, data__on_error="skip"), data, kind="rl"
    )
    assert len(skipped["train"]) == 4 and len(skipped["validation"]) == 2
    # vLLM's context: the longest training prompt and rollout.max_tokens must fit in it
    vllm = dict(rollout__engine="vllm", rollout__max_model_len=longest + 99)
    with pytest.raises(UserError) as refused:
        check_run_prompts(_settings(**vllm, data__max_prompt_tokens=longest), data, kind="rl")
    assert str(refused.value) == (
        f"config.rollout.max_tokens: the longest train prompt ({longest} tokens) and 100 "
        f"response tokens are more than rollout.max_model_len {longest + 99} of the vllm "
        "engine; lower data.max_prompt_tokens or rollout.max_tokens"
    )
    # unset, data.max_prompt_tokens leaves rollout.max_tokens of the engine's context
    unset = _settings(rollout__engine="vllm", rollout__max_model_len=longest + 99)
    with pytest.raises(UserError) as refused:
        check_run_prompts(unset, data, kind="rl")
    assert f"rollout.max_model_len {longest + 99} minus rollout.max_tokens 100" in str(
        refused.value
    )
