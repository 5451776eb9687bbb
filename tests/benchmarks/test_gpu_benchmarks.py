"""Smoke tests of the GPU benchmarks (benchmarks/gpu_*.py) at the tiny size on the CPU.

Each script runs in its own process, as `gpu_all.sh` runs it, with ml_collections, math_verify
and dashscope made unimportable (the lent GPU machine does not have them); the five processes
run side by side. The tests check the exit status and the JSON each one writes: the keys the
issue asks for, with positive finite rates.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.jax_cache_site import atomic_jax_cache

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
MISSING_ON_GPU = ("ml_collections", "math_verify", "dashscope")

# Runs a script as __main__ with the packages the GPU machine lacks made unimportable.
RUNNER = f"""
import importlib.abc, runpy, sys

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {MISSING_ON_GPU!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machine")

sys.meta_path.insert(0, Missing())
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""

RUNS = {
    # a pretended 1 MiB device: nothing fits, so it falls back through every variant
    "update": [
        "gpu_update.py",
        "--size=tiny",
        "--steps=2",
        "--memory_limit_gib=0.001",
        "--remat=dots",
    ],
    "fit": ["gpu_update.py", "--size=tiny", "--fit", "--micro_batches=4", "--micro_rows=1"],
    "logprobs": ["gpu_logprobs.py", "--size=tiny", "--repeats=1"],
    "sampler": ["gpu_sampler.py", "--size=tiny"],
    "sync": ["gpu_sync.py", "--sizes=tiny", "--repeats=2"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every benchmark once (in parallel); name -> (exit code, output, JSON or None)."""
    out = tmp_path_factory.mktemp("gpu_benchmarks")
    base = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(ROOT))
    procs = {}
    for name, (script, *args) in RUNS.items():
        # side by side: a compilation cache folder each, never one written by another
        env = atomic_jax_cache.subprocess_environment(base, f"gpu-benchmark-{name}")
        if name == "update":
            args = [*args, f"--profile={out / 'profile'}"]
        procs[name] = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RUNNER,
                str(BENCHMARKS / script),
                *args,
                f"--out={out}/{name}.json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
    found = {}
    deadline = time.monotonic() + 600
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        path = out / f"{name}.json"
        data = json.loads(path.read_text()) if path.exists() else None
        found[name] = (proc.returncode, output, data)
    return found


def finished(results, name: str) -> dict:
    code, output, data = results[name]
    assert code == 0, f"{name} exited with {code}:\n{output[-4000:]}"
    assert data is not None and data["complete"], f"{name}: no complete JSON\n{output[-2000:]}"
    assert data["environment"]["platform"] == "cpu"
    return data


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_update_reports_rate_mfu_memory_and_profile(results):
    data = finished(results, "update")
    update = data["update"]
    for key in ("tokens_per_second", "mfu", "seconds_per_update", "model_tflops_per_second"):
        assert positive(update[key]), (key, update[key])
    assert update["finite"] is True
    tried = [v["variant"]["name"] for v in data["variants_tried"]]
    assert tried == [
        "as configured",
        "1 row per micro-batch",
        "1 row per micro-batch, frozen embeddings",
    ]
    sizes = [v["step_resident_estimate_bytes"] for v in data["variants_tried"]]
    assert sizes[0] > sizes[1] > sizes[2] > 0  # each fallback needs less memory
    assert update["variant"] == tried[-1] and update["train_embeddings"] is False
    assert (update["micro_batches"], update["micro_rows"]) == (4, 1)  # the same 4 rows
    assert update["tokens_per_update"] == 4 * (64 + 64)  # tiny lengths
    assert update["peak_bytes"] is None  # the CPU backend has no allocator statistics
    # the FLOPs: 6 N T + 6 layers hidden S T (tiny: 2 layers, hidden 64, S = 128)
    params = data["model"]["trainable_llm_params"]
    assert update["model_flops_per_update"] == 6 * params * 512 + 6 * 2 * 64 * 128 * 512
    assert positive(data["baseline_matmul"]["tflops"])
    assert positive(data["vision_tower"]["seconds"]) and data["vision_tower"]["images"] == 4
    assert positive(data["compile"]["peak_estimate_bytes"])
    summary = data["profile"]["summary"]
    assert summary["top_ops"] and positive(summary["busy_seconds"])
    output = results["update"][1]
    assert "MFU" in output and "fell back" in output and "trace (host XLA threads)" in output


def test_fit_compiles_estimates_and_runs_the_first_variant(results):
    data = finished(results, "fit")
    assert list(data["fit"]) == ["all"]  # it ran, so the smaller variants are not needed
    fit = data["fit"]["all"]
    assert fit["ran"] is True and fit["finite"] is True
    assert positive(fit["resident_estimate_bytes"]) and positive(fit["state_bytes"])
    assert fit["resident_estimate_bytes"] >= fit["peak_estimate_bytes"]
    assert fit["fits_h200_estimate"] is True
    assert len(fit["seconds"]) == 2 and all(positive(s) for s in fit["seconds"])


def test_logprobs_reports_rate_and_memory_per_chunk(results):
    data = finished(results, "logprobs")
    chunks = data["chunks"]
    assert [c["chunk"] for c in chunks] == [16, 64]
    for chunk in chunks:
        assert positive(chunk["tokens_per_second"]) and positive(chunk["fraction_of_matmul"])
        assert chunk["tokens"] == 4 * 128
        for model in ("policy", "reference"):
            assert positive(chunk["memory_estimate"][model]["peak_estimate_bytes"])
    assert positive(data["baseline_matmul"]["tflops"])


def test_sampler_reports_rate_against_roofline_without_recompiling(results):
    data = finished(results, "sampler")
    cases = data["cases"]
    assert [c["case"] for c in cases] == ["4x1", "2x2"]
    for case in cases:
        assert case["recompiled"] is False  # the 1-token warm-up compiled the timed programs
        assert 0 < case["tokens"] <= case["rows"] * case["max_new"]
        assert positive(case["tokens_per_second"]) and positive(case["fraction_of_roofline"])
        assert positive(case["roofline"]["used_cache"]["tokens_per_second"])
    assert positive(data["baseline_bandwidth"]["gbs"])


def test_sync_reports_every_stage_against_device_get(results):
    data = finished(results, "sync")
    assert positive(data["baseline_device_get"]["gbs"])
    tiny = data["sizes"]["tiny"]
    assert tiny["worker_device"] == "cpu" and positive(tiny["first_sync_seconds"])
    stages = ("prepare", "device_to_host", "shm_write", "worker_read", "worker_load")
    for stage in (*stages, "end_to_end", "staged_total"):
        assert positive(tiny["seconds"][stage]) and positive(tiny["gbs"][stage]), stage
    assert positive(tiny["end_to_end_over_device_get"])
    # every LLM tensor in bf16: 2 bytes for each parameter that the update trains
    assert tiny["bytes"] == 2 * finished(results, "fit")["fit"]["all"]["trainable_params"]


def test_preset_configs_match_transformers():
    """_common builds the published configs without transformers; they equal from_hf's."""
    sys.path.insert(0, str(BENCHMARKS))
    import _common

    from maye_jax.models.configs import ModelConfig
    from maye_jax.tiny import preset_hf_config

    for size, preset in _common.PRESET_OF_SIZE.items():
        assert _common.model_config(size) == ModelConfig.from_hf(preset_hf_config(preset))
    assert _common.llm_param_count(_common.model_config("3b")) == 3_085_938_688
    assert _common.image_grid(400, 2) == (1, 40, 40)
