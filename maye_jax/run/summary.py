"""The lines a run ends its output with (train and sft print them), read from its folder:

run 'demo' (rl): 48 of 48 steps, finished
evaluation accuracy (first / best / last):
  validation pass@8 T=1.0   73.4% at the start / 78.1% at epoch 2 / 67.2%
training: accuracy 42.5% over the last epoch; mean response length 83 tokens at step 48
model: runs/demo/final_hf
metrics: runs/demo/metrics.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

from maye_jax.evaluation.scheme import SETTING_LABELS
from maye_jax.run.metrics import read_metrics


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _evaluation_lines(lines: list[dict]) -> list[str]:
    keys = sorted(
        {k for line in lines for k, v in line.items() if k.startswith("eval/") and v is not None}
    )
    if not keys:
        return ["evaluation: none (eval.enabled=False, or no evaluation was due)"]
    rows = []
    for key in keys:
        _, split, setting = key.split("/", 2)
        values = [(line["epoch"], line[key]) for line in lines if line.get(key) is not None]
        first_epoch, first = values[0]
        best_epoch, best = max(values, key=lambda item: item[1])  # the earliest of equal bests
        where = "at the start" if first_epoch == 0 else f"at epoch {first_epoch}"
        rows.append(
            (
                f"{split} {SETTING_LABELS.get(setting, setting)}",
                f"{_percent(first)} {where} / {_percent(best)} at epoch {best_epoch} / "
                f"{_percent(values[-1][1])}",
            )
        )
    width = max(len(label) for label, _ in rows)
    return ["evaluation accuracy (first / best / last):"] + [
        f"  {label:<{width}}  {text}" for label, text in rows
    ]


def _training_line(lines: list[dict], kind: str) -> str | None:
    steps = [line for line in lines if line["generation_step"] > 0]
    if not steps:
        return None
    last = steps[-1]
    if kind == "sft":
        losses = [line["sft/loss"] for line in steps if line.get("sft/loss") is not None]
        if not losses:
            return None
        return f"training: SFT loss {losses[0]:.4g} at step 1, {losses[-1]:.4g} at the last step"
    parts = []
    epochs = [line["train/epoch_accuracy"] for line in steps if "train/epoch_accuracy" in line]
    if epochs:
        parts.append(f"accuracy {_percent(epochs[-1])} over the last epoch")
    elif last.get("train/accuracy") is not None:
        parts.append(f"accuracy {_percent(last['train/accuracy'])} at the last step")
    if last.get("response_length/mean") is not None:
        parts.append(
            f"mean response length {last['response_length/mean']:.0f} tokens at step "
            f"{last['generation_step']}"
        )
    return "training: " + "; ".join(parts) if parts else None


def summary_lines(output_dir) -> list[str]:
    """The run's summary: what ran, its evaluations, its training, where its files are."""
    folder = Path(output_dir).absolute()
    record = json.loads((folder / "run.json").read_text())
    lines = read_metrics(folder)
    last_step = max((line["generation_step"] for line in lines), default=0)
    state = "finished" if record.get("finished") else "not finished"
    kind = record.get("kind", "rl")
    out = [
        f"run {record.get('name')!r} ({kind}): {last_step} of {record.get('total_steps')} "
        f"steps, {state}"
    ]
    out += _evaluation_lines(lines)
    training = _training_line(lines, kind)
    if training:
        out.append(training)
    for name, what in (("final_hf", "model"), ("best_hf", "best evaluation's model")):
        if (folder / name).is_dir():
            out.append(f"{what}: {folder / name}")
    out.append(f"metrics: {folder / 'metrics.jsonl'}")
    return out


def print_summary(output_dir) -> None:
    print("\n".join(summary_lines(output_dir)))
