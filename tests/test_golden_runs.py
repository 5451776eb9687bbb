"""The redesigned trainer reproduces the golden runs recorded before it (tests/golden/runs.py):
every metric of every line, bit for bit (time and memory aside), and every rollout."""

from __future__ import annotations

import pytest

from tests.golden.runs import GOLDEN_DIR, NAMES, comparable, recorded_files, run_golden


@pytest.mark.parametrize("name", NAMES)
def test_golden_run_is_reproduced_bit_for_bit(name, tmp_path):
    out = run_golden(name, tmp_path)
    expected = {p.name: p for p in (GOLDEN_DIR / name).glob("*.jsonl")}
    produced = recorded_files(out)
    assert sorted(produced) == sorted(expected)
    for label, path in produced.items():
        ours, theirs = comparable(path), comparable(expected[label])
        assert len(ours) == len(theirs), label
        for line, (a, b) in enumerate(zip(ours, theirs)):
            assert a == b, f"{name}/{label} line {line + 1}: " + str(
                {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
            )
