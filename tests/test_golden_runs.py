"""The redesigned trainer reproduces the golden runs recorded before it (tests/golden/runs.py):
every line of metrics and rollouts, every key (time and memory aside); token counts, texts and
every other non-float value equal, floats to float32 rounding (`tests.golden.runs.same_value`:
XLA's code, hence the last bits, depend on the CPU model)."""

from __future__ import annotations

import pytest

from tests.golden.runs import GOLDEN_DIR, NAMES, assert_same_lines, recorded_files, run_golden


@pytest.mark.parametrize("name", NAMES)
def test_golden_run_is_reproduced(name, tmp_path):
    out = run_golden(name, tmp_path)
    expected = {p.name: p for p in (GOLDEN_DIR / name).glob("*.jsonl")}
    produced = recorded_files(out)
    assert sorted(produced) == sorted(expected)
    for label, path in produced.items():
        assert_same_lines(path, expected[label], f"{name}/{label}")
