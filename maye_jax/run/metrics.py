"""The single metrics writer of a run: JSONL always, TensorBoard and W&B when asked.

Every line of `OUTPUT_DIR/metrics.jsonl` is one JSON object that carries integer
`generation_step` and `epoch` (ARCHITECTURE.md lists the keys). `run.json` describes the run
so reports can group runs; `rollouts/step_<n>.jsonl` keeps every rollout of a step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

from maye_jax.storage.atomic import append_line, atomic_write_text, open_for_append

log = logging.getLogger("maye_jax")

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
        path = self.output_dir / "metrics.jsonl"
        if not append:
            atomic_write_text(path, "")
        # One whole line per write, synced: a kill or a full disk leaves at most a torn last
        # line, which `read_metrics` drops.
        self._jsonl = open_for_append(path)
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
        append_line(self._jsonl, json.dumps(line))
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


def read_jsonl(path) -> list[dict]:
    """The objects of a JSON-lines file that is only ever appended to. A last line that does not
    parse was torn by a kill or a full disk while being written: it is dropped with a warning.
    Any other line that does not parse is an error naming the file and line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            out.append(json.loads(text))
        except json.JSONDecodeError as error:
            if number == len(lines):
                log.warning(
                    "%s: dropped its torn last line %d (%d characters, %s): it was being "
                    "written when the run stopped",
                    path,
                    number,
                    len(text),
                    error.msg,
                )
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    return out


def read_metrics(path) -> list[dict]:
    """The lines of `metrics.jsonl` (a run folder or the file), a torn last line dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return read_jsonl(path)


def summarize_run(output_dir) -> dict:
    """First, best and last value of every eval/ metric of a run, from its metrics.jsonl."""
    lines = read_metrics(output_dir)
    summary = {}
    for key in {k for line in lines for k in line if k.startswith("eval/")}:
        values = [(line["epoch"], line[key]) for line in lines if key in line]
        summary[key] = dict(first=values[0][1], best=max(v for _, v in values), last=values[-1][1])
    return summary


def truncate_metrics(output_dir, step: int) -> None:
    """Drops the metric lines written after the checkpoint a resumed run continues from (and a
    torn last line), rewriting the file through a temporary file and a rename."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [m for m in read_metrics(path) if m["generation_step"] <= step]
    atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in kept))


def drop_rollouts_after(output_dir, step: int) -> list[Path]:
    """Removes `rollouts/step_<n>.jsonl` of the steps after `step` (a resumed run writes them
    again); returns what it removed."""
    removed = []
    for path in sorted((Path(output_dir) / "rollouts").glob("step_*.jsonl")):
        number = path.stem.removeprefix("step_")
        if number.isdigit() and int(number) > step:
            path.unlink()
            removed.append(path)
    return removed


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
    processes: int = 1,
    local_devices: int | None = None,
) -> Path:
    """`{name, seed, kind: rl|sft, config, git_sha, versions, devices, processes, local_devices,
    fingerprint, total_steps, finished}`: what the run is (reports group runs by it; a resume
    is checked against it); `processes` x `local_devices` JAX processes and devices each.
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
        processes=int(processes),
        local_devices=len(devices) if local_devices is None else int(local_devices),
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


def run_finished(output_dir) -> bool:
    """The one test of a finished run: its run.json says `finished: true` (every planned step
    ran and the final export, when asked for, is written; `mark_run_finished`)."""
    try:
        return json.loads((Path(output_dir) / "run.json").read_text()).get("finished") is True
    except (OSError, ValueError):
        return False


def _write_json_atomically(path: Path, record: Mapping) -> Path:
    """A reader (the report, a second process) never sees a half-written run.json."""
    return atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")


def write_rollouts(output_dir, generation_step: int, rows: Sequence[Mapping]) -> Path:
    """`rollouts/step_<n>.jsonl`: prompt id, response and each reward component per rollout."""
    folder = Path(output_dir) / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(
        json.dumps({k: _jsonable(v) for k, v in row.items()}, ensure_ascii=False) + "\n"
        for row in rows
    )
    return atomic_write_text(folder / f"step_{generation_step}.jsonl", text)
