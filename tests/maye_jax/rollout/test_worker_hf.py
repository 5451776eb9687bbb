"""The rollout worker with the `hf` backend, driven by WorkerEngine (client.py), on CPU.

Parity is checked against the trainer's own teacher-forced logprobs (`score_batch`), exactly
(1e-4, fp32): the worker's `score` request on fixed responses, and the logprobs the worker
returns for the tokens it samples. The model directory carries a hostile generation_config.json
(repetition penalty, top-k 1, n-gram bans, ...) that the worker must ignore. Failure handling:
a SIGKILLed or hung worker raises with its log lines; neither the segment nor the worker's log
folder outlives the run (a killed trainer, a worker that cannot start), and what a kill of both
leaves is removed at the next start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import numpy as np
import psutil
import pytest
from PIL import Image

from maye_jax.data.processor import load_processor
from maye_jax.data.sequences import make_sequence_batch, score_batch
from maye_jax.models.configs import ModelConfig
from maye_jax.models.hf_mapping import iter_hf_tensors, load_hf_tensors
from maye_jax.models.hf_names import normalize_hf_name
from maye_jax.models.qwen_vl import build_model
from maye_jax.rollout.client import (
    WorkerDiedError,
    WorkerEngine,
    WorkerRequestError,
    WorkerTimeoutError,
)
from maye_jax.rollout.engine import Prompt, Sampling
from maye_jax.rollout.shm import SEGMENT_PREFIX, SHM_ROOT
from maye_jax.storage.model_folders import load_model
from maye_jax.tiny import tiny_hf_model

# fp32 logprobs of torch (the worker) against JAX (the trainer): different kernels sum in
# different orders through the layers and the 152k-entry log_softmax; a wrong weight, position
# or temperature moves a logprob by 1e-2 or more.
TOLERANCE = 1e-4
HOSTILE_GENERATION_CONFIG = dict(
    do_sample=True,
    temperature=0.1,
    top_k=1,
    top_p=0.01,
    repetition_penalty=1.8,
    no_repeat_ngram_size=1,
    min_new_tokens=3,
    suppress_tokens=[151645],
    bos_token_id=151643,
    eos_token_id=[151645],
)


def our_segments() -> set[str]:
    return {e for e in os.listdir(SHM_ROOT) if e.startswith(SEGMENT_PREFIX)}


def make_model_dir(root, family: str = "qwen2_vl", seed: int = 3):
    """A tiny random model with the real tokenizer, saved like a hub checkpoint."""
    model_dir = root / f"{family}-model"
    hf = tiny_hf_model(family, seed=seed, vocab_size=151936, initializer_range=0.2)
    hf.save_pretrained(str(model_dir))
    load_processor(family=family).save_pretrained(model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps(HOSTILE_GENERATION_CONFIG))
    return model_dir


def make_prompts(model_dir, family: str = "qwen2_vl") -> tuple[list[dict], list[Prompt]]:
    """A one-image prompt (56x84), a two-image prompt (84x56 and 56x56, each at its `<image>`
    marker: M-RoPE positions over two images) and a text-only prompt."""
    processor = load_processor(model_dir, family=family)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        for height, width in ((56, 84), (84, 56), (56, 56))
    ]
    encoded = [
        processor.encode(images[0], "<image>What is the area of the rectangle?"),
        processor.encode(images[1:], "Is <image> larger than <image>?", images_first=False),
        processor.encode(None, "What is 3 + 4?"),
    ]
    assert len(encoded[1]["image_grid_thw"]) == 2
    prompts = [Prompt(e["input_ids"], e["pixel_values"], e["image_grid_thw"]) for e in encoded]
    return encoded, prompts


def fixed_responses(model_dir, family: str = "qwen2_vl") -> list[list[int]]:
    tokenizer = load_processor(model_dir, family=family).tokenizer
    texts = ["The area is $3 \\times 4 = 12$, so \\boxed{12}.", "Hmm", "3 + 4 = \\boxed{7}"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [151645] for t in texts]


def trainer_logprobs(model, hf_config, encoded, responses, temperature=1.0) -> list[np.ndarray]:
    """The trainer's teacher-forced logprobs of each response (the reference)."""
    config = ModelConfig.from_hf(hf_config)
    batch = make_sequence_batch(encoded, responses, config)
    logprobs = score_batch(
        model, batch.device_arrays(), prompt_len=batch.prompt_len, temperature=temperature
    )
    logprobs = np.asarray(jax.device_get(logprobs))
    return [logprobs[row, : len(r)] for row, r in enumerate(responses)]


def perturbed(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """New trainable weights: MLP down projections scaled, norms shifted (vision untouched)."""
    changed = {}
    for name, array in arrays.items():
        if normalize_hf_name(name).startswith("visual."):
            continue
        if "down_proj" in name:
            array = array * np.float32(1.7)
        elif name.endswith("norm.weight"):
            array = array + np.float32(0.25)
        changed[name] = np.ascontiguousarray(array)
    return changed


def assert_close(actual: list, expected: list, tolerance: float = TOLERANCE) -> float:
    worst = 0.0
    for a, e in zip(actual, expected):
        assert len(a) == len(e)
        worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(e)))))
    assert worst < tolerance, f"max |diff| {worst}"
    return worst


@pytest.fixture(scope="module")
def setup(module_scratch):
    root = module_scratch("worker_hf")
    model_dir = make_model_dir(root)
    model, hf_config = load_model(model_dir)
    encoded, prompts = make_prompts(model_dir)
    engine = WorkerEngine("hf", model_dir, timeout_s=120)
    try:
        yield dict(
            root=root,
            model_dir=model_dir,
            model=model,
            hf_config=hf_config,
            encoded=encoded,
            prompts=prompts,
            engine=engine,
            arrays={name: np.ascontiguousarray(a) for name, a in iter_hf_tensors(model)},
        )
    finally:
        engine.close()
    assert not our_segments()


def test_sync_then_score_equals_trainer_then_resync_changes_it(setup):
    engine, arrays = setup["engine"], setup["arrays"]
    responses = fixed_responses(setup["model_dir"])
    checksum = engine.sync_weights(arrays, version=1)
    assert engine.version == 1 and len(checksum) == 32
    assert engine.last_sync["tensors"] == len(arrays)  # first sync: vision tower included
    expected = trainer_logprobs(setup["model"], setup["hf_config"], setup["encoded"], responses)
    assert_close(engine.score(setup["prompts"], responses), expected)

    new_arrays = perturbed(arrays)
    new_model = load_hf_tensors(load_model(setup["model_dir"])[0], {**arrays, **new_arrays}.items())
    new_expected = trainer_logprobs(new_model, setup["hf_config"], setup["encoded"], responses)
    assert max(np.abs(n - o).max() for n, o in zip(new_expected, expected)) > 0.05
    new_checksum = engine.sync_weights(new_arrays, version=2)  # trainable tensors only
    assert new_checksum != checksum and engine.version == 2
    assert engine.last_sync["tensors"] == len(new_arrays) < len(arrays)
    assert_close(engine.score(setup["prompts"], responses), new_expected)

    # back to the original weights: a worker that kept version 2 would fail here
    engine.sync_weights({n: a for n, a in arrays.items() if n in new_arrays}, version=3)
    assert_close(engine.score(setup["prompts"], responses), expected)


def test_device_side_hf_layout_syncs_the_same_bytes(setup):
    """What the trainer syncs on an accelerator (`device_hf_tensors`: HF layout and the
    worker's dtype made on the device, JAX arrays fetched while the segment is written) is
    bit-equal to the host path, in fp32 and in bf16 (one rounding, the same on either side);
    on the CPU backend `hf_tensors_for_sync` gives host views with the same bytes."""
    import ml_dtypes

    from maye_jax.models.hf_mapping import device_hf_tensors, flax_param_paths, hf_tensors_for_sync

    engine, model = setup["engine"], setup["model"]
    host = setup["arrays"]
    names = set(flax_param_paths(model))
    for dtype in (np.float32, ml_dtypes.bfloat16):
        on_device = device_hf_tensors(model, names, dtype=dtype)
        assert on_device.keys() == host.keys()
        for name, value in on_device.items():
            assert isinstance(value, jax.Array) and value.dtype == dtype
            np.testing.assert_array_equal(np.asarray(value), host[name].astype(dtype), name)
    engine.sync_weights(host, version=20)  # the engine's first sync, if it is, includes frozen
    reference = engine.sync_weights(host, version=21)  # trainable ones only from here on
    assert engine.sync_weights(device_hf_tensors(model, names), version=22) == reference
    # On the CPU backend the trainer sends host views (kernels transposed by the copy).
    chosen = hf_tensors_for_sync(model, names, dtype=np.float32)
    assert not any(isinstance(v, jax.Array) for v in chosen.values())
    assert engine.sync_weights(chosen, version=23) == reference
    with pytest.raises(KeyError, match="no parameters named"):
        device_hf_tensors(model, {"not.a.param"})


def test_load_policy_sends_the_weights_in_hf_layout(setup):
    """`load_policy(model, version)`, the one way trainers hand weights to any engine: the HF
    layout of the model's parameters, checked by the worker, under that version (whether a
    version needs loading is the run's Rollouts', test_overlap.py)."""
    engine, model = setup["engine"], setup["model"]
    responses = fixed_responses(setup["model_dir"])
    engine.load_policy(model, 40)
    first = engine.last_sync
    assert engine.version == 40 and first["tensors"] > 0
    engine.load_policy(model, 41)
    assert engine.last_sync is not first and engine.version == 41
    expected = trainer_logprobs(model, setup["hf_config"], setup["encoded"], responses)
    assert_close(engine.score(setup["prompts"], responses), expected)


def test_prefetch_starts_transfers_in_order_within_its_window(monkeypatch):
    from maye_jax.rollout import shm

    started = []

    class FakeDeviceArray:
        def __init__(self, index):
            self.index = index

        def copy_to_host_async(self):
            started.append(self.index)

    monkeypatch.setattr(shm, "PREFETCH_BYTES", 100)
    sizes = [60, 30, 50, 200, 10, 10]
    prefetch = shm._Prefetch([(FakeDeviceArray(i), n) for i, n in enumerate(sizes)] + [(b"", 5)])
    seen = []
    for index in range(len(sizes) + 1):
        prefetch.ahead_of(index)
        seen.append(list(started))
    # 0 (60 B) + 1 (30 B) < 100 B, so 2 starts too; at 1: 30 + 50 < 100, so 3 starts; 3 is
    # 200 B: nothing more starts until it has been written; plain host arrays are skipped.
    assert seen[:4] == [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert seen[4] == seen[-1] == list(range(len(sizes)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_teacher_forcing(setup, temperature):
    engine = setup["engine"]
    if engine.version is None:
        engine.sync_weights(setup["arrays"], version=1)
    sampling = Sampling(n=2, temperature=temperature, max_tokens=6, seed=11)
    completions = engine.generate(setup["prompts"], sampling, step=4)
    assert [len(row) for row in completions] == [2, 2, 2]
    rows = [(i, c) for i, row in enumerate(completions) for c in row]
    for _, c in rows:
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
        assert c.finish_reason == ("stop" if c.token_ids[-1] in (151645, 151643) else "length")
    # the hostile generation config (top-k 1, repetition penalty, n-gram bans) is not applied
    assert len({tuple(c.token_ids) for _, c in rows}) == len(rows)
    model = load_hf_tensors(load_model(setup["model_dir"])[0], setup["arrays"].items())
    expected = trainer_logprobs(
        model,
        setup["hf_config"],
        [setup["encoded"][i] for i, _ in rows],
        [c.token_ids for _, c in rows],
        temperature=temperature,
    )
    assert_close([c.logprobs for _, c in rows], expected)
    # per-request seeds: the same (seed, step) reproduces, another step differs
    again = engine.generate(setup["prompts"], sampling, step=4)
    assert [[c.token_ids for c in row] for row in again] == [
        [c.token_ids for c in row] for row in completions
    ]
    other = engine.generate(setup["prompts"], sampling, step=5)
    assert [[c.token_ids for c in row] for row in other] != [
        [c.token_ids for c in row] for row in completions
    ]


def test_torn_segment_is_an_error_not_a_stale_rollout(setup, monkeypatch):
    engine, arrays = setup["engine"], setup["arrays"]
    engine.sync_weights(arrays, version=10)
    original_write = engine.segment.write

    def write_then_corrupt(*args, **kwargs):
        record = original_write(*args, **kwargs)
        engine.segment._map[engine.segment.data_offset + 12345] ^= 0xFF
        return record

    monkeypatch.setattr(engine.segment, "write", write_then_corrupt)
    with pytest.raises(WorkerRequestError, match="checksum"):
        engine.sync_weights(perturbed(arrays), version=11)
    monkeypatch.undo()
    assert engine.version == 10
    with pytest.raises(WorkerRequestError, match="holds 10"):
        engine._request(dict(op="score", version=11, temperature=1.0, items=[]), [], "score")
    engine.sync_weights(arrays, version=12)  # the engine recovers with a good sync


def test_killed_worker_raises_with_log_lines_quickly(tmp_path):
    """The death is seen at once, not at the request's timeout (600 s here: a bound of 300 s
    tells the two apart on any machine load)."""
    engine = WorkerEngine("null", timeout_s=600)
    engine.sync_weights({"model.norm.weight": np.ones(8, np.float32)}, version=1)
    segment = engine.segment.directory
    assert os.path.isdir(segment)
    os.kill(engine.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(WorkerDiedError, match="killed by signal 9") as raised:
        engine.generate([Prompt(np.array([1, 2, 3]))], Sampling(max_tokens=2))
    assert time.monotonic() - started < 300
    assert "null backend ready" in str(raised.value)  # the worker's last log lines
    assert not os.path.exists(segment)
    engine.close()


def test_hung_worker_times_out_and_is_killed():
    """A stopped worker: the 2 s timeout fires (without it the request would wait forever; the
    60 s bound is generous for a loaded machine) and the worker is killed."""
    engine = WorkerEngine("null", timeout_s=2)
    try:
        os.kill(engine.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(WorkerTimeoutError, match="within 2 s"):
            engine.sync_weights({"model.norm.weight": np.ones(8, np.float32)}, version=1)
        assert time.monotonic() - started < 60
        with pytest.raises(ProcessLookupError):
            os.kill(engine.pid, 0)
    finally:
        engine.close()
    assert engine.segment.directory and not os.path.exists(engine.segment.directory)


def test_engine_error_is_raised_with_worker_traceback(setup):
    engine = setup["engine"]
    if engine.version is None:
        engine.sync_weights(setup["arrays"], version=1)
    out_of_vocabulary = [[10**7]]
    with pytest.raises(WorkerRequestError, match="(?s)failed during score.*Traceback") as raised:
        engine.score(setup["prompts"][2:], out_of_vocabulary)
    assert "worker log" in str(raised.value)
    assert engine.score(setup["prompts"][2:], [[9707]])[0].shape == (1,)  # still serving


def wait_for_exit(pid: int, seconds: float = 120.0) -> bool:
    """Whether process `pid` (not our child) ends within `seconds` (generous: it normally ends
    within a second of its trainer)."""
    try:
        psutil.Process(pid).wait(timeout=seconds)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from maye_jax.rollout.client import WorkerEngine
    engine = WorkerEngine("null")
    engine.sync_weights({"model.norm.weight": np.ones(1 << 20, np.float32)}, version=1)
    print(engine.segment.directory, engine.pid, flush=True)
    time.sleep(3600)  # until the test signals it
    """
)


def test_sigterm_of_trainer_leaves_nothing_in_dev_shm(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(SIGTERM_SCRIPT)
    before = our_segments()
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    try:
        directory, worker_pid = proc.stdout.readline().split()
        assert os.path.isdir(directory)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == -signal.SIGTERM
    finally:
        proc.kill()
    assert not os.path.exists(directory)
    assert our_segments() <= before
    assert wait_for_exit(int(worker_pid)), "the worker outlived the trainer"


SIGKILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from maye_jax.rollout.client import WorkerEngine
    engine = WorkerEngine("null")
    arrays = {"model.norm.weight": np.ones(1 << 20, np.float32)}
    if sys.argv[1] == "synced":
        engine.sync_weights(arrays, version=1)
    else:  # the segment is written but the sync request never left (the race of a kill)
        engine.segment.write(arrays, 1)
    print(engine.segment.directory, engine.pid, engine.log_path, flush=True)
    time.sleep(3600)  # until the test kills it
    """
)


@pytest.mark.parametrize("phase", ["synced", "written_not_sent"])
def test_sigkill_of_trainer_leaves_no_segment_and_no_log_folder(tmp_path, phase):
    """The kernel sends the orphaned worker SIGTERM; it removes the segment (whose path it got
    at start, so a kill between writing the segment and sending the sync is covered too) and
    the log folder the dead trainer made for it."""
    script = tmp_path / "trainer.py"
    script.write_text(SIGKILL_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), phase],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    try:
        directory, worker_pid, log_path = proc.stdout.readline().split()
        assert os.path.isdir(directory) and os.path.isfile(log_path)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=120) == -signal.SIGKILL
    finally:
        proc.kill()
    assert wait_for_exit(int(worker_pid)), "the worker outlived the trainer"
    assert not os.path.exists(directory)
    assert not os.path.exists(os.path.dirname(log_path))


def test_a_worker_that_cannot_start_leaks_no_socket_or_folder(tmp_path):
    from maye_jax.rollout.client import WorkerStartError

    def our_log_folders():
        prefix = f"maye-worker-{os.getpid()}-"
        return {e for e in os.listdir(tempfile.gettempdir()) if e.startswith(prefix)}

    folders, descriptors = our_log_folders(), set(os.listdir("/proc/self/fd"))
    with pytest.raises(WorkerStartError, match="could not be started with '/no/such/python'"):
        WorkerEngine("null", python="/no/such/python")
    assert our_log_folders() == folders
    assert set(os.listdir("/proc/self/fd")) <= descriptors


def test_leftovers_of_a_killed_trainer_and_worker_are_removed_at_the_next_start(tmp_path):
    """A SIGKILL of trainer and worker leaves both folders: the next worker engine removes the
    ones whose process is gone, and nothing else."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    temp = tempfile.gettempdir()
    stale = [
        os.path.join(temp, f"maye-worker-{dead.pid}-dead1"),
        os.path.join(SHM_ROOT, f"{SEGMENT_PREFIX}{dead.pid}-dead1"),
        # this process's number, but made before it started: by an earlier process
        os.path.join(temp, f"maye-worker-{os.getpid()}-reused"),
    ]
    kept = [
        os.path.join(temp, f"maye-worker-{os.getpid()}-alive"),  # a live engine's
        os.path.join(SHM_ROOT, f"{SEGMENT_PREFIX}{os.getpid()}-alive"),
        os.path.join(temp, f"not-maye-worker-{dead.pid}-x"),  # not ours
    ]
    for path in stale + kept:
        os.makedirs(path)
        with open(os.path.join(path, "file"), "w") as handle:
            handle.write("x")
    an_hour_ago = time.time() - 3600 - (time.time() - psutil.Process().create_time())
    os.utime(stale[2], (an_hour_ago, an_hour_ago))
    try:
        engine = WorkerEngine("null")
        engine.close()
        assert [os.path.exists(p) for p in stale] == [False, False, False]
        assert [os.path.exists(p) for p in kept] == [True, True, True]
    finally:
        for path in stale + kept:
            shutil.rmtree(path, ignore_errors=True)


def test_syncing_read_only_arrays_warns_nothing():
    """Arrays fetched from JAX are read-only; the transposed copy into the segment must not
    trigger PyTorch's "non-writable array" warning (it is only read)."""
    import warnings

    from maye_jax.rollout.shm import SegmentReader, WeightSegment

    kernel = np.asarray(jax.numpy.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    assert not kernel.flags.writeable
    segment = WeightSegment()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            record = segment.write({"model.layers.0.mlp.down_proj.weight": kernel.T}, 1)
        view = SegmentReader().read(record.path, 1, record.checksum)
        np.testing.assert_array_equal(view.tensors["model.layers.0.mlp.down_proj.weight"], kernel.T)
    finally:
        segment.close()


def test_qwen3_vl_worker_scores_like_the_trainer_before_and_after_a_sync(module_scratch):
    """Qwen3-VL in the hf worker: weights synced in Qwen3-VL's hub names
    (`model.visual.*`, `model.language_model.*`); its scores equal the trainer's teacher-forced
    logprobs, before and after a sync of changed weights (its samples: the RL loop with this
    worker, tests/maye_jax/test_train.py)."""
    model_dir = make_model_dir(module_scratch("worker_hf_qwen3"), "qwen3_vl")
    model, hf_config = load_model(model_dir)
    encoded, prompts = make_prompts(model_dir, "qwen3_vl")
    assert int(encoded[0]["image_grid_thw"].prod()) // 4 >= 64  # Qwen3-VL's minimum
    responses = fixed_responses(model_dir, "qwen3_vl")
    arrays = dict(iter_hf_tensors(model))
    assert any(n.startswith("model.language_model.layers.") for n in arrays)
    with WorkerEngine("hf", model_dir, timeout_s=120) as engine:
        engine.load_policy(model, 1)
        expected = trainer_logprobs(model, hf_config, encoded, responses)
        assert_close(engine.score(prompts, responses), expected)
        changed = perturbed(arrays)
        abstract = build_model(ModelConfig.from_hf(hf_config), abstract=True)
        new_model = load_hf_tensors(abstract, {**arrays, **changed}.items())
        new_expected = trainer_logprobs(new_model, hf_config, encoded, responses)
        assert max(np.abs(n - o).max() for n, o in zip(new_expected, expected)) > 0.05
        engine.sync_weights(changed, version=2)
        assert_close(engine.score(prompts, responses), new_expected)
