"""SFT: the loss is the NLL of the response tokens only, and it decreases."""

from __future__ import annotations

import numpy as np
import pytest

from maye_jax import runtime
from maye_jax.processor import load_processor
from maye_jax.sequences import make_sequence_batch, score_batch
from maye_jax.sft import SFTRunner, sft_targets
from tests.maye_jax.test_train import tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("sft"))
    config.sft.batch_size = config.sft.micro_batch_size = 4
    config.sft.learning_rate = 1e-2
    data = runtime.prepare_data(config)
    mesh = runtime.build_mesh(config)
    source = runtime.materialize_start_model(config)
    optimizer, _ = runtime.optimizer_for(config, 1)
    policy = runtime.build_policy(config, mesh, source, optimizer, with_reference=False)
    processor = load_processor(str(source), family="qwen2_vl", max_pixels=config.data.max_pixels)
    return config, data, policy, processor


def test_first_step_loss_is_the_response_nll(setup):
    """A step reports the loss at the weights it starts from: it equals -mean logprob of the
    response tokens (teacher forced), so no prompt token contributes."""
    config, data, policy, processor = setup
    runner = SFTRunner(config, policy, processor, data, num_epochs=1, writer=None)
    records = data["train"][:4]
    minibatch = runner.minibatch(records, 1)
    encoded = [processor.encode(r.load_image(), r.question) for r in records]
    targets = sft_targets(processor.tokenizer, records)
    assert all(t[-1] == 151645 for t in targets)  # the solution, then <|im_end|>
    batch = make_sequence_batch(
        encoded,
        targets,
        policy.model_config,
        batch_size=4,
        prompt_multiple=64,
        response_len=runner.response_len,
    )
    logprobs = np.asarray(
        score_batch(runner.policy.model(), batch.device_arrays(), prompt_len=batch.prompt_len)
    )
    expected = -logprobs[batch.response_mask.astype(bool)].mean()
    assert minibatch["response_mask"].sum() == sum(len(t) for t in targets)
    _, metrics, _ = runner.step_fn(runner.policy.state, runner.policy.frozen, minibatch)
    np.testing.assert_allclose(float(metrics["loss/policy"]), expected, rtol=1e-5)


def test_loss_decreases(setup):
    config, data, policy, processor = setup
    from maye_jax.metrics import MetricsWriter, read_metrics

    out = config.output_dir + "/sft_metrics"
    writer = MetricsWriter(out)
    SFTRunner(config, policy, processor, data, num_epochs=6, writer=writer).run(
        evaluate_at_start=False, evaluate_every_epoch=False
    )
    writer.close()
    losses = [m["sft/loss"] for m in read_metrics(out)]
    assert len(losses) == 6
    assert losses[-1] < losses[1] - 0.5


def test_sft_trains_the_tower_when_asked(tmp_path):
    """train_vit + train_connector: each micro-batch packs its own images into the step, and
    the tower's weights move."""
    config = tiny_config(tmp_path)
    config.model.train_vit = config.model.train_connector = True
    config.sft.batch_size, config.sft.micro_batch_size = 4, 2
    data = runtime.prepare_data(config)
    source = runtime.materialize_start_model(config)
    optimizer, _ = runtime.optimizer_for(config, 1)
    policy = runtime.build_policy(
        config, runtime.build_mesh(config), source, optimizer, with_reference=False
    )
    processor = load_processor(str(source), family="qwen2_vl", max_pixels=config.data.max_pixels)
    runner = SFTRunner(config, policy, processor, data, num_epochs=1, writer=None)
    tower = [n for n in runner.policy.state.params if n.startswith("visual.")]
    assert tower
    minibatch = runner.minibatch(data["train"][:4], 2)
    assert minibatch["vision"]["patches"].shape[0] == 2 and "image_features" not in minibatch
    before = {n: np.array(runner.policy.state.params[n]) for n in tower}
    runner.run(evaluate_at_start=False, evaluate_every_epoch=False)
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

    from maye_jax.metrics import read_metrics
    from maye_jax.sft import run_sft

    config = _sft_config(tmp_path)
    summary = run_sft(config)
    out = tmp_path / "run"
    lines = read_metrics(out)
    assert [m["generation_step"] for m in lines] == [0, 1, 2, 3, 4]
    evaluated = [m["epoch"] for m in lines if "eval/validation/pass@1_t0.01" in m]
    assert evaluated == [0, 1, 2]  # the untrained model, then every epoch
    assert json.loads((out / "run.json").read_text())["kind"] == "sft"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [
        "3",
        "4",
    ]  # every step, keeping the last `checkpoint.keep`
    assert (out / "final_hf" / "config.json").is_file()
    assert "eval/validation/pass@1_t0.01" in summary


def test_sft_resume_continues_exactly(tmp_path):
    """Stopped after step 1 (a preemption) and resumed == never stopped: same losses, same
    final weights."""
    from maye_jax.metrics import MetricsWriter, read_metrics
    from maye_jax.train_checkpoint import TrainCheckpointer

    def fresh(out):
        config = _sft_config(tmp_path / out)
        config.eval.enabled = False
        data = runtime.prepare_data(config)
        mesh = runtime.build_mesh(config)
        source = runtime.materialize_start_model(config)
        optimizer, _ = runtime.optimizer_for(config, 1)
        policy = runtime.build_policy(config, mesh, source, optimizer, with_reference=False)
        processor = load_processor(str(source), family="qwen2_vl", max_pixels=4 * 28 * 28)
        return config, data, policy, processor

    def run(out, *, stop_after=None, resume=False):
        config, data, policy, processor = fresh(out)
        writer = MetricsWriter(tmp_path / out / "metrics", append=resume)
        checkpointer = TrainCheckpointer(tmp_path / out / "ckpt", keep=2)
        runner = SFTRunner(
            config, policy, processor, data, num_epochs=2, writer=writer, checkpointer=checkpointer
        )
        runner.stop_after_step = stop_after
        policy = runner.run(evaluate_at_start=False, evaluate_every_epoch=False, resume=resume)
        writer.close()
        checkpointer.close()
        return policy

    full = run("full")
    run("split", stop_after=1)
    assert len(read_metrics(tmp_path / "split" / "metrics")) == 1
    resumed = run("split", resume=True)
    ours = read_metrics(tmp_path / "split" / "metrics")
    theirs = read_metrics(tmp_path / "full" / "metrics")
    assert [m["generation_step"] for m in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        assert (a["sft/loss"], a["sft/lr"], a["epoch"]) == (b["sft/loss"], b["sft/lr"], b["epoch"])
    for name, value in full.state.params.items():
        np.testing.assert_array_equal(np.asarray(resumed.state.params[name]), np.asarray(value))
