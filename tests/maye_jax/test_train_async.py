"""Rollouts overlapped with the update (`rl.async_rollouts`) end to end, with the hf worker:
each step's responses come from the weights one update behind, an evaluation and a checkpoint
wait for the generation in flight, and a run stopped after a step resumes exactly."""

from __future__ import annotations

import json
import os
import signal

import pytest

from maye_jax.errors import RunStopped
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
