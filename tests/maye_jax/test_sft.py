"""SFT: the loss is the NLL of the response tokens only, and it decreases; the SFT CLI run and
its exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from maye_jax.config.settings import load_settings
from maye_jax.data.sequences import make_sequence_batch, score_batch
from maye_jax.errors import RunStopped
from maye_jax.run.harness import RunHarness
from maye_jax.sft import SFTRunner, sft_targets, start_for_sft
from tests.maye_jax.test_train import tiny_config


def sft_settings(config):
    return load_settings(config, kind="sft")


def train(runner, folder, settings, **harness_options):
    """Runs `runner` to the end under a harness writing into `folder`; returns the policy."""
    harness = RunHarness(
        folder, kind="sft", settings=settings, total_steps=runner.total_steps, **harness_options
    )
    with harness as run:
        return runner.run(run, evaluate_at_start=False, evaluate_every_epoch=False)


@pytest.fixture(scope="module")
def setup(module_scratch):
    """(settings, data, a fresh policy per call, processor)."""
    config = tiny_config(module_scratch("sft"))
    config.sft.batch_size = config.sft.micro_batch_size = 4
    config.sft.learning_rate = 1e-2
    settings = sft_settings(config)
    data, _, processor = start_for_sft(settings)
    return settings, data, lambda: start_for_sft(settings)[1], processor


def test_first_step_loss_is_the_response_nll(setup):
    """A step reports the loss at the weights it starts from: it equals -mean logprob of the
    response tokens (teacher forced), so no prompt token contributes."""
    settings, data, fresh_policy, processor = setup
    runner = SFTRunner(settings, fresh_policy(), processor, data, num_epochs=1)
    records = data["train"][:4]
    minibatch = runner.minibatch(records, 1)
    encoded = [processor.encode_record(r) for r in records]
    targets = sft_targets(processor.tokenizer, records)
    assert all(t[-1] == 151645 for t in targets)  # the solution, then <|im_end|>
    batch = make_sequence_batch(
        encoded,
        targets,
        runner.policy.model_config,
        batch_size=4,
        prompt_multiple=64,
        response_len=runner.response_len,
    )
    logprobs = np.asarray(
        score_batch(runner.policy.model(), batch.device_arrays(), prompt_len=batch.prompt_len)
    )
    expected = -logprobs[batch.response_mask.astype(bool)].mean()
    assert minibatch.response_mask.sum() == sum(len(t) for t in targets)
    _, metrics, _ = runner.step_fn(runner.policy.state, runner.policy.frozen, minibatch)
    np.testing.assert_allclose(float(metrics["loss/policy"]), expected, rtol=1e-5)


def test_loss_decreases(setup, tmp_path):
    from maye_jax.run.metrics import read_metrics

    settings, data, fresh_policy, processor = setup
    runner = SFTRunner(settings, fresh_policy(), processor, data, num_epochs=6)
    train(runner, tmp_path / "sft_metrics", settings, checkpoints=False)
    losses = [m["sft/loss"] for m in read_metrics(tmp_path / "sft_metrics")]
    assert len(losses) == 6
    assert losses[-1] < losses[1] - 0.5


def test_sft_trains_the_tower_when_asked(tmp_path):
    """train_vit + train_connector: each micro-batch packs its own images into the step, and
    the tower's weights move."""
    config = tiny_config(tmp_path)
    config.model.train_vit = config.model.train_connector = True
    config.sft.batch_size, config.sft.micro_batch_size = 4, 2
    settings = sft_settings(config)
    data, policy, processor = start_for_sft(settings)
    runner = SFTRunner(settings, policy, processor, data, num_epochs=1)
    tower = [n for n in runner.policy.state.params if n.startswith("visual.")]
    assert tower
    minibatch = runner.minibatch(data["train"][:4], 2)
    assert minibatch.vision["patches"].shape[0] == 2 and minibatch.image_features is None
    before = {n: np.array(runner.policy.state.params[n]) for n in tower}
    train(runner, tmp_path / "out", settings, checkpoints=False)
    after = runner.policy.state.params
    assert all(np.max(np.abs(np.asarray(after[n]) - before[n])) > 0 for n in tower)


def _sft_config(tmp_path):
    config = tiny_config(tmp_path)
    config.sft.num_epochs = 2
    config.sft.batch_size = config.sft.micro_batch_size = 2  # 2 steps per epoch
    config.sft.learning_rate = 1e-2
    config.eval.splits = ("validation",)
    config.eval.settings = ("pass@1_t0.01",)
    config.checkpoint.every_steps = 1
    return config


def test_sft_cli_run_writes_the_scheme_checkpoints_and_export(tmp_path):
    import json

    from maye_jax.run.metrics import read_metrics
    from maye_jax.sft import run_sft

    config = _sft_config(tmp_path)
    metric = "eval/validation/pass@1_t0.01"
    config.checkpoint.keep_best = metric
    summary = run_sft(config)
    out = tmp_path / "run"
    lines = read_metrics(out)
    assert [m["generation_step"] for m in lines] == [0, 1, 2, 3, 4]
    evaluated = [m["epoch"] for m in lines if metric in m]
    assert evaluated == [0, 1, 2]  # the untrained model, then every epoch
    assert json.loads((out / "run.json").read_text())["kind"] == "sft"
    # The best evaluation (the first of the highest values) is recorded and exported; its
    # checkpoint is kept besides the last `checkpoint.keep` (the start model has none).
    scored = [(m[metric], -m["generation_step"]) for m in lines if metric in m]
    best_step = -max(scored)[1]
    best = json.loads((out / "best.json").read_text())
    assert (best["metric"], best["generation_step"]) == (metric, best_step)
    assert (out / "best_hf" / "config.json").is_file()
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == sorted({3, 4} | ({best_step} if best_step else set()))
    assert (out / "final_hf" / "config.json").is_file()
    assert "eval/validation/pass@1_t0.01" in summary


def test_sft_resume_continues_exactly(tmp_path):
    """Stopped after step 1 (a preemption) and resumed == never stopped: same losses, same
    final weights."""
    from maye_jax.run.metrics import read_metrics

    def run(out, *, stop_after=None, resume=False):
        config = _sft_config(tmp_path / out)
        config.eval.enabled = False
        config.resume = resume
        settings = sft_settings(config)
        data, policy, processor = start_for_sft(settings)
        runner = SFTRunner(settings, policy, processor, data, num_epochs=2)
        harness = RunHarness(
            tmp_path / out / "sft",
            kind="sft",
            settings=settings,
            total_steps=runner.total_steps,
            stop_after_step=stop_after,
        )
        with harness as h:
            return runner.run(h, evaluate_at_start=False, evaluate_every_epoch=False)

    full = run("full")
    with pytest.raises(RunStopped, match="stopped after step 1 of 4"):
        run("split", stop_after=1)
    assert len(read_metrics(tmp_path / "split" / "sft")) == 1
    resumed = run("split", resume=True)
    ours = read_metrics(tmp_path / "split" / "sft")
    theirs = read_metrics(tmp_path / "full" / "sft")
    assert [m["generation_step"] for m in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        assert (a["sft/loss"], a["sft/lr"], a["epoch"]) == (b["sft/loss"], b["sft/lr"], b["epoch"])
    for name, value in full.state.params.items():
        np.testing.assert_array_equal(np.asarray(resumed.state.params[name]), np.asarray(value))


def test_a_stopped_warm_up_checkpoints_and_the_resumed_run_equals_the_golden(tmp_path, monkeypatch):
    """SIGTERM during the SFT warm-up inside an RL run: the warm-up checkpoints and the run
    stops (RunStopped); resumed, the warm-up continues from its checkpoint and every metric of
    the warm-up and of RL equals the golden run recorded without a stop."""
    import os
    import signal

    from maye_jax.train import run_rl
    from tests.golden.runs import GOLDEN_DIR, assert_same_lines, golden_config

    config = golden_config("warmup_then_rl", tmp_path)
    train_step = SFTRunner.train_step

    def train_step_then_signal(self, step):
        metrics = train_step(self, step)
        if step == 1 and not config.resume:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(SFTRunner, "train_step", train_step_then_signal)
    with pytest.raises(RunStopped, match="stopped after step 1 of 2"):
        run_rl(config)
    out = tmp_path / "run"
    assert (out / "sft_warmup" / "checkpoints" / "1").is_dir()
    assert not (out / "metrics.jsonl").exists()  # RL has not started
    config.resume = True
    run_rl(config)
    for produced, golden in (
        (out / "sft_warmup" / "metrics.jsonl", "sft_warmup.metrics.jsonl"),
        (out / "metrics.jsonl", "metrics.jsonl"),
    ):
        assert_same_lines(produced, GOLDEN_DIR / "warmup_then_rl" / golden, golden)
