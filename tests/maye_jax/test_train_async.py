"""Rollouts overlapped with the update (`rl.async_rollouts`) end to end, with the hf worker:
each step's responses come from the weights one update behind, the truncated importance weight
is computed from the logprobs the worker returned with them, an evaluation and a checkpoint wait
for the generation in flight, and a run stopped after a step resumes exactly."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import pytest

from maye_jax.errors import RunStopped
from maye_jax.rollout.client import WorkerEngine
from maye_jax.run.metrics import read_metrics
from maye_jax.train import Trainer
from tests.maye_jax.test_train import MISMATCH_BOUND, rl_settings, tiny_config


def async_config(tmp_path):
    config = tiny_config(tmp_path)
    config.rollout.engine = "hf"
    config.rl.async_rollouts = True
    config.rl.rollout_is_cap = 2.0
    config.rl.num_epochs = 2  # 2 steps per epoch (4 prompts x 2 samples of 8 records)
    config.data.synth_num_train = 8
    config.eval.at_start = False
    config.eval.splits = ("validation",)
    config.eval.settings = ("pass@1_t0.01",)
    config.checkpoint.export_hf = False
    return config


INJECTED_STEP = 4  # generated ahead (while update 3 runs) with the weights after update 2
CAPPED_TOKENS = 2  # the first 2 tokens of each response: IS weight at the cap, the rest ~0


def injected_logprobs(num_tokens: int) -> list[float]:
    """Known stale "rollout" logprobs: -1000 makes `logprobs_old - logprobs_rollout` ~ +1000
    (weight: the cap, 2.0), +1000 makes it ~ -1000 (weight: exp(-20) after the clip)."""
    return [-1000.0 if t < CAPPED_TOKENS else 1000.0 for t in range(num_tokens)]


@pytest.fixture(scope="module", autouse=True)
def known_stale_logprobs_at_step_4():
    """Every run of this module gets the worker's completions of step 4 with the logprobs of
    `injected_logprobs` in place of the worker's own (the uninterrupted and the resumed runs
    alike, so they still agree)."""
    submit = WorkerEngine.submit_generate

    def submit_then_inject(self, prompts, sampling, *, step=0, first_index=0):
        pending = submit(self, prompts, sampling, step=step, first_index=first_index)
        if step == INJECTED_STEP:
            completions = pending.result

            def injected():
                return [
                    [
                        dataclasses.replace(c, logprobs=injected_logprobs(len(c.token_ids)))
                        for c in row
                    ]
                    for row in completions()
                ]

            pending.result = injected
        return pending

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WorkerEngine, "submit_generate", submit_then_inject)
        yield


@pytest.fixture(scope="module")
def uninterrupted(module_scratch):
    tmp = module_scratch("async")
    Trainer(rl_settings(async_config(tmp))).run()
    return tmp / "run"


def test_each_step_learns_from_the_weights_one_update_behind(uninterrupted):
    lines = read_metrics(uninterrupted)
    assert [line["generation_step"] for line in lines] == [1, 2, 3, 4]
    # step 1 and 2: the start weights; step n >= 3: the weights after update n - 2
    versions = []
    for step in range(1, 5):
        rows = (uninterrupted / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()
        versions.append(sorted({json.loads(row)["weights_version"] for row in rows}))
    assert versions == [[0], [0], [1], [2]]
    assert [line["rollout/weights_lag"] for line in lines] == [0.0, 1.0, 1.0, 1.0]
    # on-policy, the worker's logprobs are the trainer's; one update stale they are not, and
    # the truncated importance weight (rl.rollout_is_cap) is applied to every step
    assert lines[0]["mismatch/logprob_abs_max"] < MISMATCH_BOUND
    assert all(line["mismatch/logprob_abs_max"] > 1e-3 for line in lines[1:])
    assert all("is_weight/mean" in line for line in lines)
    # the evaluations after each epoch ran (after the generation in flight)
    assert all("eval/validation/pass@1_t0.01" in lines[i] for i in (1, 3))


def test_the_is_weight_comes_from_the_stale_logprobs_the_worker_returned(uninterrupted):
    """Step 4's responses were generated ahead by the worker; their logprobs were replaced by
    known ones (`injected_logprobs`): the truncated IS weight of every token is then the cap
    (2.0) on the first 2 tokens and exp(-20) on the others, whatever the trainer's own
    logprobs, and the mismatch metric measures the injected values."""
    lines = read_metrics(uninterrupted)
    rows = (uninterrupted / "rollouts" / f"step_{INJECTED_STEP}.jsonl").read_text().splitlines()
    lengths = {json.loads(row)["response_length"] for row in rows}
    # Every response has the same length, so every PPO mini-batch holds the same share of
    # capped tokens and the step's mean over its mini-batches is that share.
    assert lengths == {6}, lengths
    expected = (CAPPED_TOKENS * 2.0 + (6 - CAPPED_TOKENS) * math.exp(-20.0)) / 6
    step = lines[INJECTED_STEP - 1]
    assert step["is_weight/mean"] == pytest.approx(expected, rel=1e-6)
    # |logprobs_old -+ 1000| with logprobs_old in (-30, 0]
    assert 1000.0 < step["mismatch/logprob_abs_max"] < 1030.0
    assert 1000.0 - 30.0 < step["mismatch/logprob_abs_mean"] < 1000.0 + 30.0
    # The steps before learn from the worker's own stale logprobs: weights near 1.
    for line in lines[1 : INJECTED_STEP - 1]:
        assert abs(line["is_weight/mean"] - 1.0) < 0.05, line["is_weight/mean"]


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    """SIGTERM during update 2, while step 3 is generated: the step ends, the checkpoint keeps
    step 3's finished responses, the worker stops; the resumed run uses them."""
    config = async_config(tmp_path)
    first = Trainer(rl_settings(config))
    update = first.policy_update

    def update_then_signal(trajectory, step):
        if step == 2:
            assert first.rollouts.engine.in_flight  # step 3 is being generated meanwhile
            os.kill(os.getpid(), signal.SIGTERM)
        return update(trajectory, step)

    first.policy_update = update_then_signal
    with pytest.raises(RunStopped, match="stopped after step 2 of 4"):
        first.run()
    assert first.rollouts.engine._proc.poll() is not None  # the worker is gone
    config.resume = True
    resumed_trainer = Trainer(rl_settings(config))
    resumed_trainer.run()
    resumed, reference = read_metrics(tmp_path / "run"), read_metrics(uninterrupted)
    assert [m["generation_step"] for m in resumed] == [1, 2, 3, 4]
    for ours, theirs in zip(resumed, reference):
        keys = {k for k in theirs if not k.startswith(("time/", "memory/"))}
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}
    for step in (3, 4):
        name = f"step_{step}.jsonl"
        ours = (tmp_path / "run" / "rollouts" / name).read_text()
        assert ours == (uninterrupted / "rollouts" / name).read_text()
