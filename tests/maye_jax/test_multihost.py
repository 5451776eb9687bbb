"""`python -m maye_jax.train` as 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1,
gloo collectives) equals 1 process x 8 devices on the same mesh shape: every metrics row, the
final HF export, what each process wrote and generated, and a stop seen by one process only.

One reference run per variant per session (module fixtures); tiny one-layer model, 2 steps.
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

REPO = Path(__file__).resolve().parents[2]
NOISE = ("time/", "memory/")
FLOAT_NOISE = ("mismatch/",)  # trainer vs sampler logprobs: float noise by nature

CONFIG = """
from maye_jax.config.defaults import default_config


def get_config():
    c = default_config()
    c.name = "multihost"
    c.output_dir = "run"
    c.model.tiny_family = "qwen2_vl"
    c.model.tiny_hidden_size = 64
    c.model.tiny_num_layers = 1
    c.model.dtype = c.model.frozen_dtype = "float32"
    c.data.synth_dir = "data"
    c.data.synth_num_train, c.data.synth_num_validation, c.data.synth_num_test = 8, 4, 2
    c.data.synth_image_size = 56
    c.data.max_pixels = 4 * 28 * 28
    c.rollout.max_tokens = 6
    c.rollout.num_samples = 1
    c.rl.num_epochs = 1
    c.rl.batch_size = 4  # 4 prompts per step: 2 per host
    c.rl.ppo_batch_size = 4
    c.rl.micro_batch_size = 4
    c.rl.forward_batch_size = 4
    c.rl.kl_loss_coeff = 0.01
    c.optim.learning_rate = 1e-3
    c.eval.max_tokens = 4
    c.eval.splits = ("validation",)
    c.eval.settings = ("pass@8_t1.0", "pass@1_t0.01")
    c.eval.batch_size = 1  # so a process's share of the split takes several batches
    c.checkpoint.every_steps = 1
    c.logging.progress_bar = False
    return c
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"  # never inherited
    env["JAX_PLATFORMS"] = "cpu"
    return env


def start(folder: Path, overrides: list[str], *, process_id=None, port=None, devices=8):
    command = [sys.executable, "-m", "maye_jax.train", f"--config={folder / 'config.py'}"]
    command += overrides
    if process_id is not None:
        command += [
            f"--config.sharding.coordinator_address=127.0.0.1:{port}",
            "--config.sharding.num_processes=2",
            f"--config.sharding.process_id={process_id}",
        ]
    log = open(folder / f"process{'' if process_id is None else process_id}.log", "w")
    return subprocess.Popen(command, cwd=folder, env=environment(devices), stdout=log, stderr=log)


def run_folder(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.py").write_text(CONFIG)
    return tmp


def run_single(tmp: Path, overrides: list[str]) -> Path:
    folder = run_folder(tmp)
    process = start(folder, overrides)
    assert process.wait(timeout=600) == 0, (folder / "process.log").read_text()[-3000:]
    return folder / "run"


def run_pair(tmp: Path, overrides: list[str], *, stop_process=None, stop_after_s=None):
    """Both processes of one run; with `stop_process`, SIGTERM to that process alone once
    its run has written its first checkpoint. Returns (run folder, exit codes)."""
    folder = run_folder(tmp)
    port = free_port()
    processes = [start(folder, overrides, process_id=i, port=port, devices=4) for i in (0, 1)]
    if stop_process is not None:
        deadline = time.time() + 600
        while not (folder / "run" / "checkpoints" / "1").is_dir() and time.time() < deadline:
            time.sleep(0.2)
        processes[stop_process].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=600) for p in processes]
    return folder / "run", codes


def logs(folder: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(folder.parent.glob("process*.log")))


def assert_same_metrics(ours: Path, reference: Path) -> None:
    a, b = read_metrics(ours), read_metrics(reference)
    assert [m["generation_step"] for m in a] == [m["generation_step"] for m in b]
    for line_a, line_b in zip(a, b):
        keys = {k for k in line_b if not k.startswith(NOISE)} & set(line_a)
        assert keys == {k for k in line_a if not k.startswith(NOISE)}
        for key in sorted(keys):
            x, y = line_a[key], line_b[key]
            if isinstance(y, (int, float)) and isinstance(x, (int, float)):
                tolerance = (
                    dict(abs=1e-4) if key.startswith(FLOAT_NOISE) else dict(rel=1e-4, abs=1e-6)
                )
                assert x == pytest.approx(y, **tolerance), (line_b["generation_step"], key, x, y)
            else:
                assert x == y, key


HSDP = ["--config.sharding.dp=2", "--config.sharding.fsdp=4"]


@pytest.fixture(scope="module")
def hsdp_reference(tmp_path_factory):
    return run_single(tmp_path_factory.mktemp("hsdp_reference"), HSDP)


@pytest.fixture(scope="module")
def hsdp_pair(tmp_path_factory):
    return run_pair(tmp_path_factory.mktemp("hsdp_pair"), [])


def test_two_processes_equal_one_on_the_same_mesh(hsdp_pair, hsdp_reference):
    """HSDP (one dp row per host, FSDP over its 4 devices), Reinforce++ with whitening and the
    KL loss: the metrics, the run record and the export equal the 1 x 8 run's."""
    run, codes = hsdp_pair
    assert codes == [0, 0], logs(run)
    assert_same_metrics(run, hsdp_reference)
    record = json.loads((run / "run.json").read_text())
    assert record["processes"] == 2 and record["local_devices"] == 4
    assert len(record["devices"]) == 8
    from maye_jax.storage.model_folders import iter_safetensors

    ours = dict(iter_safetensors(run / "final_hf"))
    theirs = dict(iter_safetensors(hsdp_reference / "final_hf"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-5, err_msg=name)
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(str(run / "final_hf"))


def test_process_one_writes_nothing_and_generates_its_share(hsdp_pair):
    """Process 1 writes no run file (only its part of the collective Orbax checkpoints), and
    each host generated its own two prompts of each step."""
    run, _ = hsdp_pair
    written = json.loads((run.parent / "written_by_process1.json").read_text())
    assert all(path.startswith(("checkpoints/", "start_model/")) for path in written), written
    shares = [json.loads(line) for line in (run.parent / "shares.jsonl").read_text().splitlines()]
    assert {(s["process"], s["step"]) for s in shares} == {(p, s) for p in (0, 1) for s in (1, 2)}
    for share in shares:
        assert share["first_index"] == 2 * share["process"] and share["prompts"] == 2


@pytest.mark.parametrize("variant", ["fsdp_across_grpo", "hf_worker"])
def test_other_layouts_and_engines_equal_one_process(variant, tmp_path):
    overrides = {
        "fsdp_across_grpo": [
            "--config.sharding.dp=1",
            "--config.sharding.fsdp=8",
            "--config.rl.advantage_estimator=grpo",
            "--config.rollout.num_samples=2",
            "--config.rl.batch_size=8",
            "--config.rl.ppo_batch_size=8",
            "--config.rl.micro_batch_size=4",
        ],
        "hf_worker": ["--config.rollout.engine=hf"],
    }[variant]
    run, codes = run_pair(tmp_path / "pair", overrides)
    assert codes == [0, 0], logs(run)
    layout = overrides if variant != "hf_worker" else HSDP + overrides
    assert_same_metrics(run, run_single(tmp_path / "single", layout))


def test_a_stop_seen_by_one_process_stops_both_at_the_same_step(hsdp_reference, tmp_path):
    run, codes = run_pair(tmp_path / "pair", [], stop_process=1)
    assert codes == [128 + signal.SIGTERM] * 2, logs(run)
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(m["generation_step"] for m in read_metrics(run)) == steps[-1]
    folder = run.parent
    port = free_port()
    processes = [
        start(folder, ["--config.resume=True"], process_id=i, port=port, devices=4) for i in (0, 1)
    ]
    assert [p.wait(timeout=600) for p in processes] == [0, 0], logs(run)
    assert_same_metrics(run, hsdp_reference)
