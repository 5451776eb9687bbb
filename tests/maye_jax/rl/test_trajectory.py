"""maye_jax/rl/trajectory.py: reward scoring (rows prompt-major, the configured penalties) and
response columns bucketed to the batch's longest response."""

from dataclasses import replace

import numpy as np
import pytest

from maye_jax.data.records import Record
from maye_jax.data.sequences import response_bucket, response_len_buckets
from maye_jax.models.configs import ModelConfig
from maye_jax.models.qwen_vl import build_model
from maye_jax.rl.trajectory import TrajectoryConfig, build_trajectory, score_responses
from maye_jax.rollout.engine import Completion
from maye_jax.tiny import tiny_hf_config


def record(index: int, answer: str) -> Record:
    return Record(
        id=f"r{index}",
        question="q <image>",
        answer=answer,
        solution=f"so \\boxed{{{answer}}}",
        source=f"test:{index}",
        fields={},
    )


def completion(text: str, num_tokens: int, finish_reason: str = "stop") -> Completion:
    return Completion(list(range(num_tokens)), [0.0] * num_tokens, text, finish_reason)


def test_scores_rows_prompt_major_with_the_original_penalty_and_the_overlong_penalty():
    records = [record(0, "7"), record(1, "3")]
    completions = [
        [completion("\\boxed{7}", 4), completion("\\boxed{7}", 10, "length")],
        [completion("\\boxed{3}", 1), completion("no answer", 8)],
    ]
    config = TrajectoryConfig(
        reward_names=("accuracy",),
        penalty={"min_response_length": 1, "reward_penalty": -0.1},
        overlong={"max_tokens": 10, "buffer_len": 4, "penalty_factor": 1.0},
    )
    rewards = score_responses(records, completions, config)
    assert rewards["accuracy"] == [1.0, 1.0, 1.0, 0.0]
    # overlong: 0 up to 6 tokens, then -(length - 6) / 4
    assert rewards["overlong"] == [0.0, -1.0, 0.0, -0.5]
    # row 1 has no EOS, row 2 is an EOS alone (last valid index 0 < 1): -0.1 instead of 1.0
    assert rewards["total"] == [1.0, -1.1, -0.1, -0.5]
    plain = score_responses(records, completions, TrajectoryConfig(reward_names=("accuracy",)))
    assert plain == {"accuracy": [1.0, 1.0, 1.0, 0.0], "total": [1.0, 1.0, 1.0, 0.0]}


def test_response_len_buckets():
    assert response_len_buckets(2048, 4) == (256, 512, 1024, 2048)
    assert response_len_buckets(40, 4) == (8, 16, 24, 40)
    assert response_len_buckets(6, 4) == (8,)  # the golden runs' R stays 8
    assert response_len_buckets(2048, 1) == (2048,)
    assert [response_bucket(n, (8, 16, 24)) for n in (1, 8, 9, 24)] == [8, 8, 16, 24]
    with pytest.raises(ValueError, match="exceeds the longest bucket 24"):
        response_bucket(25, (8, 16, 24))


def test_response_buckets_change_only_padding():
    """R is the bucket of the batch's longest response (16 of 8/16/32/64, not max_tokens 64);
    the logprob pass takes the rows by length, so the chunk of the two shortest (rows 3 and 0)
    computes 8 columns; the logprobs of every response token are the fixed-R trajectory's."""
    config = ModelConfig.from_hf(tiny_hf_config("qwen2_vl", vocab_size=256))
    model = build_model(config, seed=1)
    rng = np.random.default_rng(0)
    prompts = [dict(input_ids=rng.integers(0, 200, 5 + i)) for i in range(4)]
    completions = [
        [Completion(list(rng.integers(0, 200, n)), [-0.5] * n, "t", "length")] for n in (3, 9, 5, 2)
    ]
    options = TrajectoryConfig(
        reward_names=(), max_tokens=64, forward_batch_size=2, chunk_size=8, response_len_buckets=4
    )
    common = dict(
        policy=model,
        reference=model,
        config=config,
        records=[record(i, "1") for i in range(4)],
        prompts=prompts,
        completions=completions,
        pad_id=0,
        rewards={"total": [0.0] * 4},
    )
    bucketed = build_trajectory(options=options, **common)
    fixed = build_trajectory(options=replace(options, response_len_buckets=1), **common)
    assert (bucketed.batch.response_len, fixed.batch.response_len) == (16, 64)
    mask = bucketed.batch.response_mask.astype(bool)
    assert mask.sum() == 19 and not fixed.batch.response_mask[:, 16:].any()
    for name in ("logprobs_old", "ref_logprobs", "rollout_logprobs"):
        ours, theirs = getattr(bucketed, name), getattr(fixed, name)[:, :16]
        np.testing.assert_allclose(ours[mask], theirs[mask], rtol=1e-5, atol=1e-6)
    assert np.all(bucketed.logprobs_old[[0, 3], 8:] == 0.0)  # their chunk's 8 columns only
    assert np.all(bucketed.logprobs_old[1, 8:9] != 0.0)
