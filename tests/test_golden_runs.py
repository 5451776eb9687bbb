"""The trainer reproduces the golden runs (tests/golden/runs.py, tests/golden/README.md): every
line of metrics and rollouts, every key (time and memory aside); token counts, texts and every
other non-float value equal, floats to float32 rounding (`tests.golden.runs.same_value`: XLA's
code, hence the last bits, depend on the CPU model; the runs from the warmed model compare the
update's own metrics more loosely, for the reason given there).

The goldens from the SFT-warmed model must also keep pinning what they were made for: responses
that stop at EOS at different lengths, rewards, accuracy and evaluation that are not 0 and move,
and the length penalty each one turns on (checked on the recorded files)."""

from __future__ import annotations

import json

import pytest

from tests.golden.margins import MIN_MARGIN
from tests.golden.runs import (
    GOLDEN_DIR,
    NAMES,
    RECORD_FILE,
    WARM_NAMES,
    assert_same_lines,
    recorded_files,
    run_golden,
)


def assert_reproduced(name: str, out) -> None:
    expected = {p.name: p for p in (GOLDEN_DIR / name).glob("*.jsonl")}
    produced = recorded_files(out)
    assert sorted(produced) == sorted(expected)
    for label, path in produced.items():
        assert_same_lines(path, expected[label], f"{name}/{label}", warm=name in WARM_NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_golden_run_is_reproduced(name, tmp_path):
    assert_reproduced(name, run_golden(name, tmp_path))


@pytest.mark.parametrize("name", WARM_NAMES)
def test_golden_run_from_the_warmed_model_is_reproduced(name, tmp_path, warm_model):
    assert_reproduced(name, run_golden(name, tmp_path, warm_model))


def golden_lines(name: str, label: str) -> list[dict]:
    text = (GOLDEN_DIR / name / label).read_text()
    return [json.loads(line) for line in text.splitlines()]


def golden_rollouts(name: str) -> list[dict]:
    paths = sorted((GOLDEN_DIR / name).glob("rollouts.step_*.jsonl"))
    return [row for path in paths for row in golden_lines(name, path.name)]


@pytest.mark.parametrize("name", WARM_NAMES)
def test_the_warmed_goldens_stop_score_and_learn(name):
    """What these goldens exist to pin, on their recorded files, and the recording rule."""
    recorded = json.loads((GOLDEN_DIR / name / RECORD_FILE).read_text())
    assert recorded["commit"] and recorded["cpu"]
    assert recorded["min_sampled_token_margin"] > MIN_MARGIN
    rows = golden_rollouts(name)
    lengths = {row["response_length"] for row in rows if row["finished"]}
    assert len(lengths) >= 2, lengths  # EOS at different lengths
    assert any(row["reward/accuracy"] == 1.0 for row in rows)
    assert any(row["reward/accuracy"] == 0.0 for row in rows)
    steps = [m for m in golden_lines(name, "metrics.jsonl") if "train/reward/total" in m]
    for key in ("train/reward/total", "train/accuracy", "response_length/mean"):
        assert len({m[key] for m in steps}) > 1, key  # moves between steps
    evals = [m for m in golden_lines(name, "metrics.jsonl") if "eval/validation/pass@1_t0.6" in m]
    for key in ("eval/validation/pass@1_t0.6", "eval/validation/pass@1_t0.01"):
        assert all(m[key] > 0 for m in evals), key
    assert (
        len({(m["eval/validation/pass@1_t0.6"], m["eval/validation/pass@1_t0.01"]) for m in evals})
        > 1
    )
    if name == "rl_grpo_eos_penalty":
        cut = [row for row in rows if not row["finished"]]
        too_short = [row for row in rows if row["finished"] and row["response_length"] <= 6]
        assert cut and all(row["score"] == pytest.approx(-0.1) for row in cut)
        assert too_short and all(row["score"] == pytest.approx(-0.1) for row in too_short)
    else:
        assert any(row["reward/overlong"] < 0 for row in rows)
        assert any(row["reward/overlong"] == 0 for row in rows)
