"""The single metrics writer of a run: JSONL always, TensorBoard and W&B when asked.

Every line of `OUTPUT_DIR/metrics.jsonl` is one JSON object that carries integer
`generation_step` and `epoch` (ARCHITECTURE.md lists the keys). `run.json` describes the run
so reports can group runs; `rollouts/step_<n>.jsonl` keeps every rollout of a step.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

VERSIONED_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "transformers",
    "torch",
    "numpy",
    "math-verify",
    "maye-jax",
)


def _jsonable(value):
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class MetricsWriter:
    def __init__(
        self,
        output_dir,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "maye-jax",
        run_name: str = "run",
        config: Mapping | None = None,
        append: bool = False,
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(
            self.output_dir / "metrics.jsonl", "a" if append else "w", encoding="utf-8"
        )
        self._tensorboard = None
        self._wandb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError as error:
                raise ImportError(
                    "W&B logging was enabled but wandb is not installed: "
                    "pip install 'maye-jax[wandb]'"
                ) from error
            mode = os.environ.get("WANDB_MODE", "offline")
            self._wandb = wandb_module.init(
                project=wandb_project,
                name=run_name,
                mode=mode,
                dir=str(self.output_dir),
                config=dict(config or {}),
            )

    def write(self, metrics: Mapping, *, generation_step: int, epoch: int) -> dict:
        line = {"generation_step": int(generation_step), "epoch": int(epoch)}
        line.update({k: _jsonable(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in line.items() if isinstance(v, (int, float)) and v is not None}
        if self._tensorboard is not None:
            for key, value in numeric.items():
                self._tensorboard.add_scalar(key, value, generation_step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=generation_step)
        return line

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_run(output_dir) -> dict:
    """First, best and last value of every eval/ metric of a run, from its metrics.jsonl."""
    lines = read_metrics(output_dir)
    summary = {}
    for key in {k for line in lines for k in line if k.startswith("eval/")}:
        values = [(line["epoch"], line[key]) for line in lines if key in line]
        summary[key] = dict(first=values[0][1], best=max(v for _, v in values), last=values[-1][1])
    return summary


def truncate_metrics(output_dir, step: int) -> None:
    """Drops the metric lines written after the checkpoint a resumed run continues from."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [m for m in read_metrics(path) if m["generation_step"] <= step]
    path.write_text("".join(json.dumps(m) + "\n" for m in kept))


def git_sha(directory=None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_json(
    output_dir,
    *,
    name: str,
    seed: int,
    kind: str,
    config: Mapping,
    devices: Sequence[str],
    fingerprint: Mapping | None = None,
    total_steps: int | None = None,
) -> Path:
    """`{name, seed, kind: rl|sft, config, git_sha, versions, devices, fingerprint, total_steps,
    finished}`: what the run is (reports group runs by it; a resume is checked against it).
    `total_steps` is the run's planned number of steps; `finished` is false until
    `mark_run_finished` (so a run that was stopped, crashed or is still going reads as not
    finished)."""
    record = dict(
        name=name,
        seed=int(seed),
        kind=kind,
        config=config,
        git_sha=git_sha(),
        versions=package_versions(),
        devices=list(devices),
        fingerprint=dict(fingerprint or {}),
        total_steps=None if total_steps is None else int(total_steps),
        finished=False,
    )
    return _write_json_atomically(Path(output_dir) / "run.json", record)


def mark_run_finished(output_dir) -> Path:
    """Sets `finished: true` in the run's run.json: every planned step ran (and was exported)."""
    path = Path(output_dir) / "run.json"
    record = json.loads(path.read_text())
    record["finished"] = True
    return _write_json_atomically(path, record)


def _write_json_atomically(path: Path, record: Mapping) -> Path:
    """A reader (the report, a second process) never sees a half-written run.json."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(partial, path)
    return path


def write_rollouts(output_dir, generation_step: int, rows: Sequence[Mapping]) -> Path:
    """`rollouts/step_<n>.jsonl`: prompt id, response and each reward component per rollout."""
    folder = Path(output_dir) / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{generation_step}.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(
                json.dumps({k: _jsonable(v) for k, v in row.items()}, ensure_ascii=False) + "\n"
            )
    return path
