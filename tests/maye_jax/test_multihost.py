"""`python -m maye_jax.train` as 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1,
gloo collectives) equals 1 process x 8 devices on the same mesh shape: every metrics row, the
final HF export, what each process wrote and generated, and a stop seen by one process only.

The HSDP runs start from the session's SFT-warmed tiny model (tests/golden/warm_model.py), so
responses end at different lengths and their scores differ within a step and between the
hosts (checked): the advantages are not zero, and Reinforce++ whitens them with both hosts'
statistics. Each step
makes several mini-batches of rows shuffled across the hosts (and, with 3 rows per host on 4
data devices, global rows with padding holes between the hosts' blocks): a row sent to the
wrong place changes the numbers. The HSDP pair samples with the hf worker (one per host) and
is stopped during step 1 by a SIGTERM to one process, then resumed; the FSDP pair samples with
the JAX sampler. Each pair has one single-process reference, 2 steps each.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from maye_jax.run.metrics import read_metrics
from tests.jax_cache_site import atomic_jax_cache

REPO = Path(__file__).resolve().parents[2]
NOISE = ("time/", "memory/")
FLOAT_NOISE = ("mismatch/",)  # trainer vs sampler logprobs: float noise by nature

TINY_CONFIG = f"""
import sys

sys.path.insert(0, {str(REPO)!r})  # the tests' tiny run, from this checkout
from tests.tiny_run import tiny_run_config


def get_config():
    c = tiny_run_config("run", "data", name="multihost")
    c.data.synth_num_train, c.data.synth_num_validation, c.data.synth_num_test = 8, 4, 2
    c.rl.num_epochs = 1
    c.rl.batch_size = 4  # 4 prompts per step: 2 per host
    c.rl.ppo_batch_size = 4
    c.rl.micro_batch_size = 4
    c.rl.kl_loss_coeff = 0.01
    c.eval.splits = ("validation",)
    c.eval.settings = ("pass@8_t1.0", "pass@1_t0.01")
    c.eval.batch_size = 1  # so a process's share of the split takes several batches
    return c
"""

WARM_CONFIG = """
from maye_jax.config.defaults import default_config


def get_config():
    c = default_config()
    c.name = "multihost"
    c.output_dir = "run"
    c.model.path = {model!r}
    c.model.dtype = c.model.frozen_dtype = "float32"
    c.data.train_file = {train!r}
    c.data.validation_file = {validation!r}
    c.data.max_pixels = 4 * 28 * 28
    c.data.prompt_template = "plain"
    c.rollout.temperature = 0.6
    c.rollout.max_tokens = c.eval.max_tokens = 16
    c.rollout.num_samples = 3
    c.rl.num_epochs = 1
    c.rl.batch_size = 6  # 2 prompts x 3 samples: one prompt, 3 rows per host
    c.rl.ppo_batch_size = 3  # 2 mini-batches per step, each with rows of both hosts
    c.rl.micro_batch_size = 1
    c.rl.forward_batch_size = 3
    c.rl.kl_loss_coeff = 0.01
    c.optim.learning_rate = 3e-3
    c.optim.warmup_fraction = 0.0
    c.eval.splits = ("validation",)
    c.eval.settings = ("pass@1_t0.6", "pass@1_t0.01")
    c.eval.batch_size = 1  # so a process's share of the split takes several batches
    c.checkpoint.every_steps = 1
    c.logging.progress_bar = False
    return c
"""


AUDIT = Path(__file__).resolve().parent / "multihost_audit"  # sitecustomize: what each did


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(devices: int, folder: Path, name: str) -> dict:
    # the pairs of every test compile the same programs: a cache folder per process of a pair
    # (and one for the single-process runs), shared by the module's tests
    cache = f"multihost-process{name}" if name else "multihost-single"
    env = atomic_jax_cache.subprocess_environment(os.environ, cache, site=False)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"  # never inherited
    env["JAX_PLATFORMS"] = "cpu"
    # the audit's sitecustomize installs the atomic cache writes (from atomic_jax_cache.SITE)
    paths = [str(AUDIT), atomic_jax_cache.SITE, env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["MAYE_AUDIT_ROOT"] = str(folder / "run")
    env["MAYE_AUDIT_LOG"] = str(folder / f"audit{name}.jsonl")
    return env


def start(folder: Path, overrides: dict, *, process_id=None, port=None, devices=8):
    command = [sys.executable, "-m", "maye_jax.train", f"--config={folder / 'config.py'}"]
    command += [f"--config.{key}={value}" for key, value in overrides.items()]
    name = "" if process_id is None else str(process_id)
    if process_id is not None:
        command += [
            f"--config.sharding.coordinator_address=127.0.0.1:{port}",
            "--config.sharding.num_processes=2",
            f"--config.sharding.process_id={process_id}",
        ]
    log = open(folder / f"process{name}.log", "a")
    env = environment(devices, folder, name)
    return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=log)


def run_folder(tmp: Path, warm_model=None) -> Path:
    """`tmp` with the run's config.py: from `warm_model` (its folder and data files), else
    the tests' tiny random model on synthetic data."""
    tmp.mkdir(parents=True, exist_ok=True)
    text = TINY_CONFIG
    if warm_model is not None:
        model, files = warm_model
        text = WARM_CONFIG.format(
            model=str(model), train=str(files["train"]), validation=str(files["validation"])
        )
    (tmp / "config.py").write_text(text)
    return tmp


def run_single(tmp: Path, warm_model, overrides: dict) -> Path:
    """The reference: the same run in this test process (its 8 devices, one process)."""
    import importlib.util

    from maye_jax.train import run_rl

    folder = run_folder(tmp, warm_model)
    spec = importlib.util.spec_from_file_location("multihost_config", folder / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.output_dir = str(folder / "run")
    if warm_model is None:
        config.data.synth_dir = str(folder / "data")
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(config[section], name, value)
    run_rl(config)
    return folder / "run"


def run_pair(folder: Path, overrides: dict, *, stop_process=None):
    """Both processes of one run (4 CPU devices each); with `stop_process`, SIGTERM to that
    process alone once the start evaluation's line is written (so the signal lands during
    step 1, before either process decides whether step 1 is the last). Returns the exit
    codes."""
    port = free_port()
    processes = [start(folder, overrides, process_id=i, port=port, devices=4) for i in (0, 1)]
    if stop_process is not None:
        metrics = folder / "run" / "metrics.jsonl"
        deadline = time.time() + 600
        while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
            if any(p.poll() is not None for p in processes):
                break  # one failed before the line: its exit code says so, without the wait
            time.sleep(0.05)
        processes[stop_process].send_signal(signal.SIGTERM)
    return [p.wait(timeout=1800) for p in processes]  # generous: a loaded 2-core machine took 600


def logs(folder: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(folder.glob("process*.log")))


def audit(folder: Path, process: int, kind: str) -> list[dict]:
    path = folder / f"audit{process}.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# The runs from the warmed model: its sure answers (a token's p ~ 1 - 1e-3) have gradients
# 1 - p, which fp32 holds to ~1e-7 / 1e-3 = 1e-4 of their size, summed in another order by two
# processes than by one; after Adam the second mini-batch's metrics differ by up to 3.5e-4
# relative and the weights by 2.2e-5 (measured). A row in the wrong place moves them by 1e-2 or
# more (the weights by about the learning rate, 3e-3).
WARM_METRICS_REL, WARM_WEIGHTS_ATOL = 1e-3, 1e-4


def assert_same_metrics(ours: Path, reference: Path, rel: float = 1e-4) -> None:
    a, b = read_metrics(ours), read_metrics(reference)
    assert [m["generation_step"] for m in a] == [m["generation_step"] for m in b]
    for line_a, line_b in zip(a, b):
        keys = {k for k in line_b if not k.startswith(NOISE)}
        assert keys == {k for k in line_a if not k.startswith(NOISE)}
        for key in sorted(keys):
            x, y = line_a[key], line_b[key]
            if isinstance(y, float) or isinstance(x, float):
                # Two processes reduce over their rows in another order than one: fp32 rounding,
                # which Adam's division by sqrt(v) magnifies in the weights over the steps.
                # mismatch/*: trainer vs sampler logprob noise itself, compared absolutely.
                close = dict(abs=1e-4) if key.startswith(FLOAT_NOISE) else dict(rel=rel, abs=1e-6)
                assert x == pytest.approx(y, **close), (line_b["generation_step"], key, x, y)
            else:
                assert x == y, (line_b["generation_step"], key, x, y)


HSDP_REFERENCE = {"sharding.dp": 2, "sharding.fsdp": 4}
HSDP = {"sharding.fsdp": 4}  # dp unset: one dp row per process


def rollout_scores(run: Path) -> dict[int, list[list[float]]]:
    """Each step's scores, by prompt (from the run's rollouts files)."""
    by_step = {}
    for path in sorted((run / "rollouts").glob("*.jsonl")):
        step = int(path.stem.rsplit("_", 1)[-1])
        groups: dict[str, list[float]] = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            groups.setdefault(row["prompt_id"], []).append(row["score"])
        by_step[step] = list(groups.values())
    return by_step


ENGINE = {"rollout.engine": "hf"}  # one torch worker per host, synced from its host's copy


@pytest.fixture(scope="module")
def hsdp(module_scratch, warm_model):
    """The HSDP pair, stopped by a SIGTERM to process 1 alone during step 1 and resumed, and
    its reference: the same run uninterrupted in one process. Returns (pair folder, what the
    stopped pair left: exit codes, checkpoint steps and metric steps; the resumed pair's exit
    codes, the reference's run folder)."""
    reference = run_single(module_scratch("hsdp_reference"), warm_model, HSDP_REFERENCE | ENGINE)
    folder = run_folder(module_scratch("hsdp_pair"), warm_model)
    run = folder / "run"
    stopped = dict(codes=run_pair(folder, HSDP | ENGINE, stop_process=1))
    checkpoints = (run / "checkpoints").iterdir() if (run / "checkpoints").is_dir() else ()
    stopped["checkpoints"] = sorted(int(p.name) for p in checkpoints if p.name.isdigit())
    stopped["metric_steps"] = [m["generation_step"] for m in read_metrics(run)]
    resumed = run_pair(folder, HSDP | ENGINE | {"resume": True})
    return folder, stopped, resumed, reference


def test_a_stop_seen_by_one_process_stops_both_at_the_same_step(hsdp):
    """SIGTERM to process 1 alone: both stop after the same step, with one checkpoint, and exit
    143."""
    folder, stopped, _, _ = hsdp
    assert stopped["codes"] == [128 + signal.SIGTERM] * 2, logs(folder)
    assert stopped["checkpoints"] == [1], stopped  # both stopped after step 1
    assert stopped["metric_steps"] == [0, 1], stopped  # the start evaluation's line, step 1


def test_two_processes_resumed_equal_one_uninterrupted_on_the_same_mesh(hsdp):
    """HSDP (one dp row per host, FSDP over its 4 devices), the hf worker engine, Reinforce++
    with whitening across the hosts and the KL loss, 2 mini-batches per step of rows of both
    hosts, evaluation at the start and the end, stopped after step 1 and resumed: the metrics,
    the run record and the final export equal those of 1 process x 8 devices uninterrupted."""
    folder, _, codes, reference = hsdp
    run = folder / "run"
    assert codes == [0, 0], logs(folder)
    # not a degenerate run: in a step, the scores differ within a host's prompt and between
    # the hosts (so do the advantages, and each host whitening alone would give other ones)
    scores = rollout_scores(reference)
    assert sorted(scores) == [1, 2] and all(len(groups) == 2 for groups in scores.values())
    assert any(
        np.ptp(sum(groups, [])) > 0.5 and np.ptp(np.mean(groups, axis=1)) > 0.3
        for groups in scores.values()
    ), scores
    assert rollout_scores(run) == scores
    assert_same_metrics(run, reference, rel=WARM_METRICS_REL)
    record = json.loads((run / "run.json").read_text())
    assert record["processes"] == 2 and record["local_devices"] == 4
    assert len(record["devices"]) == 8 and record["finished"]
    from maye_jax.storage.model_folders import iter_safetensors

    ours = dict(iter_safetensors(run / "final_hf"))
    theirs = dict(iter_safetensors(reference / "final_hf"))
    assert ours.keys() == theirs.keys()
    for name in theirs:  # fp32 reductions in another order, magnified by Adam (above)
        np.testing.assert_allclose(
            ours[name], theirs[name], rtol=1e-4, atol=WARM_WEIGHTS_ATOL, err_msg=name
        )
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(str(run / "final_hf"))


def test_process_one_writes_nothing_and_each_host_generates_its_share(hsdp):
    """Process 1 writes no file of the run (only its part of the collective Orbax writes of
    the checkpoints and the start model's parameters: not the start model's other files,
    which it once rewrote while process 0 did), and each host sampled its own one of a step's
    2 prompts, with its global index (step 1 before the stop, step 2 after the resume)."""
    folder, _, _, _ = hsdp
    written = {r["path"] for r in audit(folder, 1, "write")}
    collective = ("checkpoints", "start_model.partial/params")
    assert all(p.startswith(collective) or p == "start_model.partial" for p in written), sorted(
        written
    )
    assert any(
        not p.startswith(("checkpoints", "start_model"))
        for p in {r["path"] for r in audit(folder, 0, "write")}
    )  # the audit does see process 0's files
    for process in (0, 1):
        rollouts = [r for r in audit(folder, process, "generate") if r["step"] < 1_000_000]
        assert [r["step"] for r in rollouts] == [1, 2]
        assert all((r["first_index"], r["prompts"]) == (process, 1) for r in rollouts)


def mixed_data(folder: Path) -> dict:
    """Synthetic problems of which about half have no image: the train and validation files."""
    from maye_jax.data.records import read_records
    from maye_jax.data.synth import generate

    paths = generate(
        folder, "text_dominant", num_train=8, num_validation=4, num_test=2, text_only_fraction=0.5
    )
    images = [bool(r.images) for r in read_records(paths["train"])]
    assert 0 < sum(images) < len(images)
    return {
        "data.train_file": str(paths["train"]),
        "data.validation_file": str(paths["validation"]),
    }


def test_fsdp_across_processes_with_grpo_and_a_warm_up_equals_one_process(tmp_path):
    """Qwen3-VL with its vision tower training, on problems of which about half have no image:
    FSDP over all 8 devices of both hosts (dp=1; every host gathers its copy of the weights to
    sample), an SFT warm-up first (one batch of the 8 training records in 10 rows: 5 records on
    host 0, 3 and 2 empty rows on host 1), then GRPO with 2 samples per prompt (the groups stay
    on one host) in 2 mini-batches per step. Micro-batches of one row, so the text-only ones
    run the tower on padding while the other host's may hold an image: no process waits for
    another, and the numbers equal one process's. (A random model: its scores, hence GRPO's
    advantages, are all alike; the runs from the warmed model above have them differ.)"""
    overrides = {
        "model.tiny_family": "qwen3_vl",
        "model.train_vit": True,
        "model.train_connector": True,
        "sharding.dp": 1,
        "sharding.fsdp": 8,
        "rl.advantage_estimator": "grpo",
        "rollout.num_samples": 2,
        "rl.batch_size": 8,
        "rl.ppo_batch_size": 4,  # 2 mini-batches per step
        "rl.micro_batch_size": 1,
        "sft.warmup_epochs": 1,
        "sft.batch_size": 10,  # more than the 8 records: one short batch, uneven per host
        "sft.micro_batch_size": 1,
        # the processes' all-reductions sum in another order than one process's: the weights
        # differ in their last bits, which at T = 1 flipped a draw of a near-tie once
        "rollout.temperature": 0.6,
        # evaluation across the hosts is checked on the HSDP runs above
        "eval.enabled": False,
        **mixed_data(tmp_path / "mixed"),
    }
    folder = run_folder(tmp_path / "pair")
    assert run_pair(folder, overrides) == [0, 0], logs(folder)
    reference = run_single(tmp_path / "single", None, overrides)
    assert_same_metrics(folder / "run", reference)
    assert_same_metrics(folder / "run" / "sft_warmup", reference / "sft_warmup")
    from maye_jax.evaluation.report import build_report

    built = build_report([folder / "run"], tmp_path / "report", plots=False)
    (comparison,) = built["summary"]["comparisons"]
    assert comparison["comparison_key"].endswith("| tiny-qwen3_vl")
