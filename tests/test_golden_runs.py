"""The redesigned trainer reproduces the golden runs recorded before it (tests/golden/runs.py):
every line of metrics and rollouts, every key (time and memory aside). Token counts, texts and
every other non-float value must be equal; floats equal to float32 rounding. XLA compiles for
the CPU it runs on (AVX-512 or AVX2, FMA or not), so the last bits of a sum differ between CPU
models: the goldens recorded on one machine are reproduced bit for bit there, and to a few ulps
of float32 on another (measured: at most 2e-7 absolute on these tiny runs' metrics)."""

from __future__ import annotations

import math

import pytest

from tests.golden.runs import GOLDEN_DIR, NAMES, comparable, recorded_files, run_golden

# float32 rounding of values of order 1 and of tiny losses, after a few updates
RTOL, ATOL = 1e-5, 1e-6


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)
    if isinstance(a, float) or isinstance(b, float):  # an int where the golden has a float
        return False
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_golden_run_is_reproduced(name, tmp_path):
    out = run_golden(name, tmp_path)
    expected = {p.name: p for p in (GOLDEN_DIR / name).glob("*.jsonl")}
    produced = recorded_files(out)
    assert sorted(produced) == sorted(expected)
    for label, path in produced.items():
        ours, theirs = comparable(path), comparable(expected[label])
        assert len(ours) == len(theirs), label
        for line, (a, b) in enumerate(zip(ours, theirs)):
            assert sorted(a) == sorted(b), f"{name}/{label} line {line + 1}: keys differ"
            differing = {k: (a[k], b[k]) for k in a if not _same(a[k], b[k])}
            assert not differing, f"{name}/{label} line {line + 1}: {differing}"
