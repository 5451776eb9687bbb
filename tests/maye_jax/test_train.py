"""The RL loop end to end on a tiny model (real tokenizer, synthetic data, JAX sampler)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maye_jax.config.settings import load_settings
from maye_jax.run.metrics import read_metrics
from maye_jax.train import Trainer
from tests.tiny_run import tiny_run_config
from tests.vllm_env import require_vllm_python

REQUIRED_KEYS = (
    "train/accuracy",
    "train/reward/accuracy",
    "train/reward/language",
    "train/reward/total",
    "loss/policy",
    "loss/kl",
    "loss/total",
    "kl/k3",
    "clip_frac/low",
    "clip_frac/high",
    "ratio/mean",
    "approx_kl",
    "entropy",
    "grad_norm",
    "lr",
    "response_length/mean",
    "response_length/max",
    "response_length/clip_ratio",
    "mismatch/logprob_abs_mean",
    "mismatch/logprob_abs_max",
    "time/data_seconds",
    "time/rollout_seconds",
    "time/trajectory_seconds",
    "time/update_seconds",
    "time/sync_seconds",
    "memory/host_bytes",
    "memory/device_bytes",
    "reflection/reflection_ratio",
    "reflection/count/wait",
)


# The trainer's logprobs of the sampled tokens against the engine's own, in fp32: ~1e-6 measured
# with the JAX sampler (the same kernels; the decode loop sums in another order) and the torch
# workers; a wrong weight sync, position or temperature is 1e-2 or more.
MISMATCH_BOUND = 1e-4


def tiny_config(tmp_path, **overrides):
    """The tests' tiny run (tests/tiny_run.py) with 2 prompts x 2 samples per step and a KL
    loss; `section__name=value` overrides."""
    c = tiny_run_config(tmp_path / "run", tmp_path / "data")
    c.rollout.num_samples = 2
    c.rl.batch_size = 8
    c.rl.ppo_batch_size = 4
    c.rl.micro_batch_size = 2
    c.rl.forward_batch_size = 8
    c.rl.kl_loss_coeff = 0.01
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(c, section), name, value)
    return c


def rl_settings(config, check_files=True):
    """The typed settings an RL run reads (checked as the CLI checks them)."""
    return load_settings(config, kind="rl", check_files=check_files)


@pytest.fixture(scope="module")
def uninterrupted(module_scratch):
    tmp = module_scratch("full")
    config = tiny_config(tmp)
    config.eval.save_responses = True  # what `evaluate` on final_hf/ must reproduce
    Trainer(rl_settings(config)).run()
    return tmp / "run"


def test_metrics_file_is_complete(uninterrupted):
    lines = read_metrics(uninterrupted)
    steps = [line for line in lines if line["generation_step"] > 0]
    assert [line["generation_step"] for line in steps] == [1, 2]
    assert [line["epoch"] for line in steps] == [1, 2]
    for line in steps:
        missing = [k for k in REQUIRED_KEYS if k not in line]
        assert not missing, missing
        assert 0.0 <= line["train/accuracy"] <= 1.0
        assert line["response_length/max"] <= 6
    start = lines[0]
    assert start["generation_step"] == 0 and start["epoch"] == 0
    for split in ("validation", "test"):
        for setting in ("pass@8_t1.0", "pass@1_t0.6", "pass@1_t0.01"):
            assert f"eval/{split}/{setting}" in start
            assert f"eval/{split}/{setting}" in steps[-1]
    run = json.loads((uninterrupted / "run.json").read_text())
    assert run["kind"] == "rl" and run["seed"] == 0
    assert run["total_steps"] == 2 and run["finished"] is True
    assert (uninterrupted / "rollouts" / "step_2.jsonl").is_file()
    assert (uninterrupted / "final_hf" / "config.json").is_file()
    # The mismatch between trainer and sampler logprobs is small in fp32.
    assert all(line["mismatch/logprob_abs_max"] < MISMATCH_BOUND for line in steps)


def test_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    config = tiny_config(tmp_path)
    from maye_jax.errors import RunStopped

    first = Trainer(rl_settings(config))
    with pytest.raises(RunStopped, match="stopped after step 1 of 2"):
        first.run(stop_after_step=1)  # a preemption after generation step 1
    assert [m["generation_step"] for m in read_metrics(tmp_path / "run")] == [0, 1]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["finished"] is False
    config.resume = True
    Trainer(rl_settings(config)).run()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["finished"] is True
    resumed = read_metrics(tmp_path / "run")
    reference = read_metrics(uninterrupted)
    assert len(resumed) == len(reference)
    for ours, theirs in zip(resumed, reference):
        keys = {k for k in theirs if not k.startswith(("time/", "memory/"))}
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}


def test_a_stop_during_evaluation_abandons_it_and_resume_reruns_it(uninterrupted, tmp_path):
    """SIGTERM while step 1's evaluation runs: the evaluation is abandoned within a batch, step 1
    is checkpointed with its metrics but its line waits; the resumed run reruns the evaluation
    and its metrics equal the uninterrupted run's."""
    import os
    import signal

    from maye_jax.errors import RunStopped

    config = tiny_config(tmp_path)
    trainer = Trainer(rl_settings(config))
    generate, sent = trainer.rollouts.engine.generate, []

    def generate_then_signal(prompts, sampling, *, step=0, first_index=0):
        if step >= 1_001_000 and not sent:  # the first evaluation call after step 1
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return generate(prompts, sampling, step=step, first_index=first_index)

    trainer.rollouts.engine.generate = generate_then_signal
    with pytest.raises(RunStopped) as stopped:
        trainer.run()
    assert stopped.value.signum == signal.SIGTERM and sent
    assert "--config.resume=True" in str(stopped.value)
    assert [m["generation_step"] for m in read_metrics(tmp_path / "run")] == [0]
    config.resume = True
    Trainer(rl_settings(config)).run()
    resumed, reference = read_metrics(tmp_path / "run"), read_metrics(uninterrupted)
    assert len(resumed) == len(reference)
    for ours, theirs in zip(resumed, reference):
        keys = {k for k in theirs if not k.startswith(("time/", "memory/"))}
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}


def dynamic_sampling_config(tmp_path):
    """2 prompts x 2 samples per step, 8 records, 2 epochs (at most 8 steps). With the language
    reward alone and 3-token responses, some groups score all the same (no CJK in either)."""
    c = tiny_config(tmp_path)
    c.rl.dynamic_sampling = True
    c.data.synth_num_train = 8
    c.rl.batch_size, c.rl.ppo_batch_size, c.rl.micro_batch_size = 4, 4, 2
    c.rewards.names = ("language",)
    c.rollout.max_tokens = 3
    c.eval.enabled = False
    return c


def test_dynamic_sampling_resumes_exactly_and_ends_epochs_early(tmp_path):
    """Dropped groups are replaced by the next prompts of the epoch, so a step can read more
    than its batch: the data cursor saved in the checkpoint makes resume exact, and an epoch
    whose prompts run out ends after fewer steps (here the run ends after 6 of at most 8)."""
    from maye_jax.errors import RunStopped

    full = dynamic_sampling_config(tmp_path / "full")
    Trainer(rl_settings(full)).run()
    reference = read_metrics(tmp_path / "full" / "run")
    assert [m["generation_step"] for m in reference] == [1, 2, 3, 4, 5, 6]
    assert [m["epoch"] for m in reference] == [1, 1, 1, 2, 2, 2]
    extra = [m["dynamic_sampling/extra_prompts"] for m in reference]
    assert extra == [1, 0, 1, 0, 1, 0]
    assert sum(m["dynamic_sampling/groups_dropped"] for m in reference) == 3
    assert [m["dynamic_sampling/groups_refilled"] for m in reference] == [0, 0, 1, 0, 0, 0]
    # Each epoch read 2 records per step plus the top-ups, and ended with fewer than a step's
    # 2 records left (epoch 1 read all 8, epoch 2 read 7).
    for epoch, read in ((1, 8), (2, 7)):
        lines = [m for m in reference if m["epoch"] == epoch]
        assert sum(2 + m["dynamic_sampling/extra_prompts"] for m in lines) == read
        assert "train/epoch_accuracy" in lines[-1]
    assert (tmp_path / "full" / "run" / "final_hf" / "config.json").is_file()
    record = json.loads((tmp_path / "full" / "run" / "run.json").read_text())
    assert record["finished"] is True and record["total_steps"] == 8  # planned: at most 8

    config = dynamic_sampling_config(tmp_path / "resumed")
    first = Trainer(rl_settings(config))
    with pytest.raises(RunStopped, match="stopped after step 1 of 8"):
        first.run(stop_after_step=1)  # after a step that read 3 prompts instead of 2
    config.resume = True
    Trainer(rl_settings(config)).run()
    resumed = read_metrics(tmp_path / "resumed" / "run")
    assert len(resumed) == len(reference)
    for ours, theirs in zip(resumed, reference):
        keys = {k for k in theirs if not k.startswith(("time/", "memory/"))}
        assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}
    # Resuming the finished run again runs no step.
    Trainer(rl_settings(config)).run()
    assert len(read_metrics(tmp_path / "resumed" / "run")) == len(reference)


def _first_prompt_batch(trainer):
    """The first training problem with a fixed response, as a SequenceBatch."""
    from maye_jax.data.sequences import make_sequence_batch

    record = trainer.data["train"][0]
    encoded = trainer.processor.encode_record(record)
    tokenizer = trainer.processor.tokenizer
    response = tokenizer("The answer is \\boxed{12}.", add_special_tokens=False)["input_ids"]
    return make_sequence_batch([encoded], [response], trainer.policy.model_config)


def _teacher_forced(model, batch):
    from maye_jax.data.sequences import score_batch

    arrays = batch.device_arrays()
    return np.asarray(score_batch(model, arrays, prompt_len=batch.prompt_len))[0]


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_two_generation_steps_with_a_worker_engine(engine, tmp_path):
    """The same loop on a tiny Qwen3-VL (`model.tiny_family="qwen3_vl"`) with the torch-side
    worker: the trainer's logprobs of the worker's samples agree with the worker's own, at
    step 2 too, after an update synced to it through shared memory (a worker that kept the
    old weights would be off by the update's change, checked to be far larger). The data: a
    geo3k_easyr1 parquet file (tests/byod_data.py) whose records hold one image, two images
    (vLLM's per-prompt limit follows) or none, with a reward function from a file."""
    from tests.byod_data import write_sets

    if engine == "vllm":
        require_vllm_python()
    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text(
        "def short(responses, records):\n    return [-len(r) / 100 for r in responses]\n"
    )
    config = tiny_config(tmp_path)
    config.model.tiny_family = "qwen3_vl"
    config.data.synth_dir = None
    config.data.train_file = str(write_sets(tmp_path / "byod")["easyr1_parquet"])
    config.data.layout = "geo3k_easyr1"
    config.rewards.functions = (f"{reward_file}:short",)
    config.rollout.engine = engine
    config.rl.num_epochs = 1
    config.rl.batch_size = config.rl.ppo_batch_size = 4  # 2 prompts x 2 samples; 4 records: 2 steps
    config.eval.enabled = False
    trainer = Trainer(rl_settings(config))
    before = trainer.policy.model()
    batch = _first_prompt_batch(trainer)
    old_logprobs = _teacher_forced(before, batch)
    trainer.run()
    new_logprobs = _teacher_forced(trainer.policy.model(), batch)
    lines = read_metrics(tmp_path / "run")
    assert [m["generation_step"] for m in lines] == [1, 2]
    for line in lines:
        assert not [k for k in (*REQUIRED_KEYS, "train/reward/short") if k not in line]
        assert line["mismatch/logprob_abs_max"] < MISMATCH_BOUND, line["mismatch/logprob_abs_max"]
    assert np.abs(new_logprobs - old_logprobs).max() > 1e-2  # what a stale worker would miss


def test_tower_and_merger_train_in_the_loop_and_reach_the_worker(tmp_path):
    """train_vit + train_connector: the tower runs inside the update on each micro-batch's
    images, its weights change, and the torch worker samples with them (its logprobs agree with
    the trainer's after the first update). The shared-memory segment lays out exactly the
    trainer's frozen tensors (here the embeddings, not the tower) as sent once."""

    config = tiny_config(tmp_path)
    config.model.train_vit = config.model.train_connector = True
    config.model.train_embeddings = False  # frozen embeddings: sent with the first sync only
    config.rollout.engine = "hf"
    config.rl.num_epochs = 1
    config.data.synth_num_train = 8  # 4 prompts x 2 samples per step: 2 steps
    config.eval.enabled = False
    config.checkpoint.export_hf = False
    trainer = Trainer(rl_settings(config))
    tower = [n for n in trainer.policy.state.params if n.startswith("visual.")]
    assert tower and not any(n.startswith("visual.") for n in trainer.policy.frozen)
    before = {n: np.array(trainer.policy.state.params[n]) for n in tower}
    trainer.run()
    after = {n: np.array(trainer.policy.state.params[n]) for n in tower}
    assert all(np.max(np.abs(after[n] - before[n])) > 0 for n in tower)
    lines = read_metrics(tmp_path / "run")
    assert [m["generation_step"] for m in lines] == [1, 2]
    for line in lines:
        assert line["mismatch/logprob_abs_max"] < MISMATCH_BOUND, line["mismatch/logprob_abs_max"]


def test_validation_accuracy_rises_with_rl(tmp_path):
    """A short deterministic run that must learn: SFT leaves the model split between two final
    answers (half the golden solutions say 3, half say 7); every question's answer is 7, so RL
    with the accuracy reward moves validation accuracy up."""
    from maye_jax.data.records import read_records
    from maye_jax.run import startup
    from maye_jax.run.harness import RunHarness
    from maye_jax.sft import SFTRunner
    from maye_jax.training.policy import build_policy, optimizer_for

    def write(path, n, mixed):
        lines = []
        for i in range(n):
            solution = "\\boxed{3}" if mixed and i % 2 else "\\boxed{7}"
            lines.append(
                json.dumps(
                    dict(
                        id=f"{path.stem}-{i}",
                        question=f"Question {i}: what is it?",
                        answer="7",
                        solution=solution,
                    )
                )
            )
        path.write_text("\n".join(lines) + "\n")
        return read_records(path)

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = tiny_config(tmp_path)
    config.data.synth_dir = ""
    config.rl.num_epochs = 3
    config.rl.batch_size, config.rollout.num_samples = 8, 2
    config.rl.kl_loss_coeff = 0.0
    config.optim.learning_rate = 3e-3
    config.optim.warmup_fraction = 0.0
    config.sft.batch_size = config.sft.micro_batch_size = 8
    config.sft.learning_rate = 2e-2
    config.rollout.max_tokens = config.eval.max_tokens = 8
    config.eval.splits = ("validation",)
    config.eval.settings = ("pass@1_t0.6",)
    config.checkpoint.export_hf = False
    sft_data = {
        "train": write(data_dir / "sft.jsonl", 16, mixed=True),
        "validation": write(data_dir / "validation.jsonl", 16, mixed=False),
    }
    rl_data = {
        "train": write(data_dir / "train.jsonl", 8, mixed=False),
        "validation": sft_data["validation"],
    }
    settings = rl_settings(config, check_files=False)  # the data is given below, not read
    source = startup.materialize_start_model(settings)
    optimizer, _ = optimizer_for(settings, 1)
    policy = build_policy(
        settings, startup.build_mesh(settings), source, optimizer, with_reference=False
    )
    processor = startup.load_run_processor(settings, source, "qwen2_vl")
    runner = SFTRunner(settings, policy, processor, sft_data, num_epochs=16)
    harness = RunHarness(
        tmp_path / "sft", kind="sft", settings=settings, total_steps=runner.total_steps
    )
    with harness as run:
        policy = runner.run(run, evaluate_at_start=False, evaluate_every_epoch=False)
    summary = Trainer(settings, policy=policy, data=rl_data, processor=processor).run()
    accuracy = summary["eval/validation/pass@1_t0.6"]
    assert 0.2 <= accuracy["first"] <= 0.8, accuracy  # SFT left the model undecided
    assert accuracy["best"] >= accuracy["first"] + 0.15, accuracy


def test_a_train_checkpoint_and_final_hf_evaluate_as_the_run_did(uninterrupted, tmp_path):
    """`RUN/checkpoints/N` holds only the trained tensors: loaded as a model it is the run's
    start model with those tensors (the frozen tower from the start model), so it gives the
    final export's weights; `convert` writes it as an HF folder. Both carry what the run read
    its inputs and evaluated with, and `evaluate` on `final_hf/` with no option but the data
    reproduces the run's last in-run evaluation number for number (the same JAX engine)."""
    import subprocess
    import sys

    from maye_jax.models.hf_mapping import iter_hf_tensors
    from maye_jax.storage.model_folders import iter_safetensors, load_model
    from maye_jax.storage.run_inputs import model_defaults

    checkpoint = uninterrupted / "checkpoints" / "2"
    final = uninterrupted / "final_hf"
    model, _ = load_model(checkpoint)
    exported = dict(iter_safetensors(final))
    ours = dict(iter_hf_tensors(model))
    assert ours.keys() == exported.keys()
    for name, value in ours.items():
        np.testing.assert_array_equal(np.asarray(value, np.float32), exported[name], name)
    out = tmp_path / "hf"
    converted = subprocess.run(
        [sys.executable, "-m", "maye_jax.convert", f"--input={checkpoint}", f"--output={out}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert dict(iter_safetensors(out)).keys() == exported.keys()
    assert (out / "tokenizer_config.json").is_file()

    run_inputs = {
        "prompt_template": "maye",
        "seed": 0,
        "eval_step": 2,
        "dtype": "float32",
        "eval_max_tokens": 4,
        "min_pixels": 3136,
        "max_pixels": 3136,
    }
    assert model_defaults(checkpoint) == run_inputs  # from its run's run.json
    assert model_defaults(final) == {
        k: v for k, v in run_inputs.items() if not k.endswith("_pixels")
    }
    preprocessor = json.loads((final / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"shortest_edge": 3136, "longest_edge": 3136}
    validation = next((uninterrupted.parent / "data").rglob("*_validation.jsonl"))
    evaluated = subprocess.run(
        [
            sys.executable,
            "-m",
            "maye_jax.evaluate",
            f"--model={final}",
            f"--data={validation}",
            "--split=validation",
            f"--output={tmp_path / 'responses.jsonl'}",
            "--noprogress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    last = read_metrics(uninterrupted)[-1]
    assert last["generation_step"] == 2
    in_run = {k: v for k, v in last.items() if k.startswith("eval/validation/")}
    assert len(in_run) == 3 and metrics == in_run
    responses = [json.loads(line) for line in (tmp_path / "responses.jsonl").open()]
    in_run_responses = uninterrupted / "eval_responses" / "epoch_2_validation.jsonl"
    assert len(responses) == 2 * (8 + 1 + 1)
    assert responses == [json.loads(line) for line in in_run_responses.open()]  # in order
