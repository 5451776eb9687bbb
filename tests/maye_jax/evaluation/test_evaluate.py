"""The evaluation scheme's aggregation: any-of-k per prompt, keys per split and setting."""

from __future__ import annotations

from maye_jax.config.defaults import default_config
from maye_jax.config.settings import load_settings
from maye_jax.data.records import Record
from maye_jax.evaluation.evaluate import (
    SETTINGS,
    evaluate_configured_splits,
    evaluate_split,
    sampling_for,
)
from maye_jax.rollout.engine import Completion


class FakeProcessor:
    def encode_record(self, record, instruction):
        return {"input_ids": [1, 2, 3], "pixel_values": None, "image_grid_thw": None}


class FakeEngine:
    """Answers prompt i with the i-th row of canned texts, n samples per prompt."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, sampling, *, step=0, first_index=0):
        answers = self.answers[first_index:]  # prompts[i] is the split's record first_index + i
        return [
            [
                Completion([1], [-0.1], answers[i][j % len(answers[i])], "stop")
                for j in range(sampling.n)
            ]
            for i in range(len(prompts))
        ]


def _records(n):
    return [
        Record(
            id=str(i),
            question="q",
            answer=str(i),
            solution=f"\\boxed{{{i}}}",
            source=f"f:{i}",
            fields={},
        )
        for i in range(n)
    ]


def test_settings_are_the_papers():
    assert sampling_for("pass@8_t1.0", max_tokens=16, seed=0, stop_token_ids=(1,)).n == 8
    greedyish = sampling_for("pass@1_t0.01", max_tokens=16, seed=0, stop_token_ids=(1,))
    assert (greedyish.n, greedyish.temperature, greedyish.top_p) == (1, 0.01, 0.001)
    assert SETTINGS["pass@1_t0.6"] == dict(n=1, temperature=0.6, top_p=1.0)


def test_pass_at_k_is_any_of_k():
    # Samples cycle through each prompt's texts: prompt 0 is right at samples 2 and 5 of 8,
    # prompt 1 never, prompt 2 at samples 0, 2, 4, 6.
    answers = [
        ["\\boxed{5}", "\\boxed{7}", "\\boxed{0}"],
        ["\\boxed{9}"],
        ["\\boxed{2}", "\\boxed{3}"],
    ]
    engine = FakeEngine(answers)
    metrics, rows = evaluate_split(
        engine,
        FakeProcessor(),
        _records(3),
        split="validation",
        settings=["pass@8_t1.0", "pass@1_t0.6"],
        max_tokens=8,
        seed=0,
        step=0,
        instruction="",
        batch_size=3,
    )
    assert metrics["eval/validation/pass@8_t1.0"] == 2 / 3
    # pass@1 uses the first sample only: prompt 0 wrong, prompt 1 wrong, prompt 2 right.
    assert metrics["eval/validation/pass@1_t0.6"] == 1 / 3
    assert len(rows) == 3 * 8 + 3
    assert sum(r["correct"] for r in rows if r["setting"] == "pass@8_t1.0") == 2 + 0 + 4


def test_progress_bar_counts_every_sample_and_logging_progress_bar_turns_it_off(capsys):
    """One bar per split on stderr over prompts x samples of every setting (3 x (8+1+1)),
    none with `logging.progress_bar=False`; the metrics are the same either way."""
    # prompt 0 is right at its second sample only, prompt 1 never, prompt 2 always
    answers = [["\\boxed{5}", "\\boxed{0}"], ["\\boxed{9}"], ["\\boxed{2}"]]
    results = {}
    for progress_bar in (True, False):
        c = default_config()
        c.model.tiny_family = "qwen2_vl"
        c.eval.splits = ("validation",)
        c.logging.progress_bar = progress_bar
        metrics = evaluate_configured_splits(
            FakeEngine(answers),
            FakeProcessor(),
            {"validation": _records(3), "train": _records(1)},
            load_settings(c, kind="rl", check_files=False),  # the data is in memory
            step=0,
            instruction="",
        )
        results[progress_bar] = (metrics, capsys.readouterr())
    (metrics, shown), (quiet_metrics, quiet) = results[True], results[False]
    assert (
        metrics
        == quiet_metrics
        == {
            "eval/validation/pass@8_t1.0": 2 / 3,
            "eval/validation/pass@1_t0.6": 1 / 3,
            "eval/validation/pass@1_t0.01": 1 / 3,
        }
    )
    assert "eval validation: 100%" in shown.err and "30/30" in shown.err
    assert shown.out == quiet.out == quiet.err == ""


def test_evaluate_cli_on_an_hf_directory(tmp_path):
    """`python -m maye_jax.evaluate` on a tiny HF model: every setting's key, accuracy in [0, 1],
    and the responses file (one line per sample)."""
    import json
    import os
    import subprocess
    import sys

    from maye_jax.data.processor import load_processor
    from maye_jax.data.synth import generate
    from maye_jax.tiny import tiny_hf_model

    model_dir = tmp_path / "model"
    tiny_hf_model("qwen2_vl", vocab_size=151936, seed=0, initializer_range=0.2).save_pretrained(
        str(model_dir)
    )
    load_processor(family="qwen2_vl").save_pretrained(model_dir)
    data = generate(
        tmp_path / "data", "text_dominant", num_train=1, num_validation=2, num_test=1, image_size=56
    )["validation"]
    out = tmp_path / "responses.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "maye_jax.evaluate",
            f"--model={model_dir}",
            f"--data={data}",
            "--split=validation",
            "--max_tokens=4",
            "--dtype=float32",
            f"--output={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # progress on stderr (the model's tensors, then 2 prompts x 10 samples), JSON on stdout
    assert "read model: 100%" in result.stderr and "eval validation: 100%" in result.stderr
    assert "20/20" in result.stderr
    metrics = json.loads(result.stdout[result.stdout.index("{") :])
    assert set(metrics) == {f"eval/validation/{s}" for s in SETTINGS}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * (8 + 1 + 1)
