"""The vLLM worker's host-side pieces (no vLLM needed): engine calls that each fit one
scheduler step on CPU, the tcmalloc preload, CPU pinning."""

from __future__ import annotations

import pytest

from maye_jax.rollout.client import find_tcmalloc, vllm_worker_env
from maye_jax.rollout.vllm_backend import plan_engine_calls
from maye_jax.rollout.worker import parse_cpus


def test_calls_fit_the_token_and_request_limits_in_order():
    lengths = [100, 300, 250, 50, 400, 10, 10]
    assert plan_engine_calls(lengths, max_batched_tokens=500, max_seqs=3) == [
        (0, 2),
        (2, 4),
        (4, 7),
    ]
    calls = plan_engine_calls(lengths, max_batched_tokens=500, max_seqs=2)
    assert calls == [(0, 2), (2, 4), (4, 6), (6, 7)]
    covered = [i for start, stop in calls for i in range(start, stop)]
    assert covered == list(range(len(lengths)))
    for start, stop in calls:
        assert sum(lengths[start:stop]) <= 500 and stop - start <= 2


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [([], []), ([4096], [(0, 1)]), ([2048, 2048], [(0, 2)]), ([2048, 2049], [(0, 1), (1, 2)])],
)
def test_edges(lengths, expected):
    assert plan_engine_calls(lengths, max_batched_tokens=4096, max_seqs=256) == expected


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_tcmalloc_is_preloaded_from_vllms_env_else_the_system_else_not(tmp_path):
    python = _touch(tmp_path / "env" / "bin" / "python")
    system = tmp_path / "usr_lib"
    assert find_tcmalloc(python, system_dirs=[system]) is None
    assert "LD_PRELOAD" not in vllm_worker_env({}, python, None)

    system_lib = _touch(system / "libtcmalloc_minimal.so.4")
    assert find_tcmalloc(python, system_dirs=[system]) == system_lib
    bundled = _touch(tmp_path / "env/lib/python3.11/site-packages/vllm/libs/libtcmalloc.so.4")
    assert find_tcmalloc(python, system_dirs=[system]) == bundled

    env = vllm_worker_env({"LD_PRELOAD": "/x/libgomp.so.1", "A": "1"}, python, "1")
    assert env["LD_PRELOAD"] == f"{bundled}:/x/libgomp.so.1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["A"] == "1"
    mine = {"LD_PRELOAD": "/opt/libtcmalloc.so"}
    assert vllm_worker_env(mine, python, None)["LD_PRELOAD"] == "/opt/libtcmalloc.so"


def test_worker_cpu_lists():
    assert parse_cpus("1") == {1}
    assert parse_cpus("0,2-4") == {0, 2, 3, 4}
