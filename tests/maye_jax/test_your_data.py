"""A user's own data and reward function end to end: an RL step on a geo3k_easyr1 parquet file
(embedded PNG, CMYK JPEG and RGBA bytes; a two-image record; a text-only record in the same
batch) with a reward function from a file, evaluated on the same set saved by `datasets`
`save_to_disk`, on each engine; SFT on a parquet file whose solutions are named by
data.solution_key; SFT without solutions refused in one line; evaluate and data check read
every format (tests/maye_jax/data/test_formats.py, tests/maye_jax/test_score.py)."""

from __future__ import annotations

import json
import textwrap

import pytest

from maye_jax.config.settings import load_settings
from maye_jax.errors import UserError
from maye_jax.run.metrics import read_metrics
from maye_jax.train import Trainer
from tests.byod_data import write_sets
from tests.tiny_run import tiny_run_config

REWARD_SOURCE = textwrap.dedent(
    """
    def format_parts(responses, records):
        return [
            {"mentions_answer": float(record["answer"] in response), "short": -len(response) / 100}
            for response, record in zip(responses, records)
        ]
    """
)


@pytest.fixture(scope="module")
def inputs(module_scratch):
    root = module_scratch("your_data")
    sets = write_sets(root / "data")
    reward_file = root / "my_rewards.py"
    reward_file.write_text(REWARD_SOURCE)
    return root, sets, reward_file


def byod_config(tmp, sets, reward_file, engine: str = "jax"):
    """The tiny run on the geo3k_easyr1 parquet set: 4 prompts x 2 samples, one step."""
    c = tiny_run_config(tmp / "run", tmp / "synth")
    c.data.synth_dir = None
    c.data.train_file = str(sets["easyr1_parquet"])
    c.data.validation_file = str(sets["easyr1_arrow"])
    c.data.layout = "geo3k_easyr1"
    c.rewards.functions = (f"{reward_file}:format_parts=0.5",)
    c.rollout.engine = engine
    c.rollout.num_samples = 2
    c.rl.num_epochs = 1
    c.rl.batch_size = 8
    c.rl.ppo_batch_size = 4
    c.rl.micro_batch_size = 2
    c.rl.forward_batch_size = 8
    c.eval.enabled = engine == "jax"
    c.eval.at_start = False
    c.eval.splits = ("validation",)
    return c


def test_an_rl_step_on_parquet_with_a_reward_function_from_a_file(inputs, tmp_path):
    """(The worker engines run two steps on this set: tests/maye_jax/test_train.py.)"""
    _, sets, reward_file = inputs
    engine = "jax"
    Trainer(load_settings(byod_config(tmp_path, sets, reward_file, engine), kind="rl")).run()
    run = tmp_path / "run"
    lines = read_metrics(run)
    step = next(line for line in lines if "train/reward/total" in line)
    for key in ("format_parts.mentions_answer", "format_parts.short", "accuracy", "language"):
        assert f"train/reward/{key}" in step, sorted(step)
    assert step["train/reward/format_parts.short"] < 0  # every response has characters
    if engine != "jax":  # the worker's logprobs of its samples (two-image prompt included)
        assert step["mismatch/logprob_abs_max"] < 1e-3, step["mismatch/logprob_abs_max"]
    rows = [json.loads(line) for line in (run / "rollouts" / "step_1.jsonl").open()]
    assert len(rows) == 8 and {row["prompt_id"] for row in rows} == {"p0", "p1", "p2", "p3"}
    for row in rows:
        parts = row["reward/format_parts.mentions_answer"], row["reward/format_parts.short"]
        others = row["reward/accuracy"] + row["reward/language"]
        assert row["score"] == pytest.approx(others + 0.5 * sum(parts), abs=1e-6)  # float32 scores
    if engine == "jax":  # evaluated on the save_to_disk folder
        assert any(key.startswith("eval/validation/") for line in lines for key in line), lines
    run_json = json.loads((run / "run.json").read_text())
    assert list(run_json["fingerprint"]["reward_functions"]) == [f"{reward_file}:format_parts"]


def test_sft_on_parquet_with_named_solutions_and_refused_without(inputs, tmp_path):
    import pyarrow.parquet as pq

    from maye_jax.sft import run_sft

    _, sets, reward_file = inputs
    table = pq.read_table(sets["easyr1_parquet"])
    solutions = [f"The answer is \\boxed{{{a}}}." for a in table.column("answer").to_pylist()]
    with_solutions = tmp_path / "with_solutions.parquet"
    pq.write_table(table.append_column("worked", [solutions]), with_solutions)
    config = byod_config(tmp_path, sets, reward_file)
    config.data.train_file = str(with_solutions)
    config.data.validation_file = None
    config.rewards.functions = ()
    config.eval.enabled = False
    config.sft.batch_size, config.sft.micro_batch_size = 4, 2
    config.checkpoint.export_hf = False
    with pytest.raises(UserError, match="config.data.solution_key: SFT trains on golden solutions"):
        load_settings(config, kind="sft")
    config.data.solution_key = "worked"
    run_sft(load_settings(config, kind="sft"))
    lines = read_metrics(tmp_path / "run")
    losses = [line["sft/loss"] for line in lines if "sft/loss" in line]
    assert losses and all(loss > 0 for loss in losses)
