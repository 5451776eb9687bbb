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
    rows = runner.batch_arrays(records)
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
    assert rows["response_mask"].sum() == sum(len(t) for t in targets)
    from maye_jax.update import make_minibatch

    _, metrics, _ = runner.step_fn(
        runner.policy.state, runner.policy.frozen, make_minibatch(rows, 1)
    )
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
