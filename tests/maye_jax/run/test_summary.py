"""The lines a run ends its output with: what ran, first / best / last evaluation, training,
where its files are; a run without evaluation says so instead of printing `{}`."""

from __future__ import annotations

import json

from maye_jax.run.summary import summary_lines


def _run_folder(folder, lines, **record):
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(dict(name="demo", **record)))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "final_hf").mkdir()
    return folder


def test_an_evaluated_rl_run(tmp_path):
    key = "eval/validation/pass@8_t1.0"
    lines = [
        {"generation_step": 0, "epoch": 0, key: 0.5},
        {"generation_step": 1, "epoch": 1, key: 0.75, "train/accuracy": 0.25},
        {
            "generation_step": 2,
            "epoch": 2,
            key: 0.625,
            "train/accuracy": 0.5,
            "train/epoch_accuracy": 0.375,
            "response_length/mean": 41.4,
        },
    ]
    folder = _run_folder(tmp_path / "run", lines, kind="rl", total_steps=2, finished=True)
    assert summary_lines(folder) == [
        "run 'demo' (rl): 2 of 2 steps, finished",
        "evaluation accuracy (first / best / last):",
        "  validation pass@8 T=1.0  50.0% at the start / 75.0% at epoch 1 / 62.5%",
        "training: accuracy 37.5% over the last epoch; mean response length 41 tokens at step 2",
        f"model: {folder / 'final_hf'}",
        f"metrics: {folder / 'metrics.jsonl'}",
    ]


def test_an_sft_run_without_evaluation(tmp_path):
    lines = [
        {"generation_step": 1, "epoch": 1, "sft/loss": 2.5},
        {"generation_step": 2, "epoch": 1, "sft/loss": 1.25},
    ]
    folder = _run_folder(tmp_path / "run", lines, kind="sft", total_steps=3, finished=False)
    assert summary_lines(folder) == [
        "run 'demo' (sft): 2 of 3 steps, not finished",
        "evaluation: none (eval.enabled=False, or no evaluation was due)",
        "training: SFT loss 2.5 at step 1, 1.25 at the last step",
        f"model: {folder / 'final_hf'}",
        f"metrics: {folder / 'metrics.jsonl'}",
    ]
