"""The report of a generation step: its responses as the metrics and the rollout files see them
(every process's rows, in the step's global row order; with one process, its own rows), the
step's metrics computed from them, its training accuracy and its rollouts file, so a run's
numbers do not depend on how its rows were split over hosts.

    metrics, correct = report_step(trajectory, sampled.correct(), update_metrics, ...)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import psutil

from maye_jax.evaluation.scheme import reflection_metrics
from maye_jax.run import multihost
from maye_jax.run.metrics import write_rollouts


@dataclasses.dataclass
class StepRows:
    scores: np.ndarray  # [N] total reward
    reward_components: dict[str, np.ndarray]  # name -> [N]
    correct: np.ndarray  # [N] bool, accuracy reward == 1
    response_lengths: np.ndarray  # [N] int
    finished: np.ndarray  # [N] bool, ended with a stop token
    mismatch: np.ndarray  # [valid tokens] |trainer - rollout engine| logprob, row by row
    texts: list[str]
    prompt_ids: list[str]
    weights_versions: list[int] | None = None  # overlapped rollouts: the weights of each row


def gather_step_rows(trajectory) -> StepRows:
    """This process's real rows of `trajectory`, and every other process's (their texts and
    ids as strings, the rest as arrays)."""
    n = trajectory.num_rows
    mask = trajectory.batch.response_mask[:n].astype(bool)
    mismatch = np.abs(trajectory.logprobs_old[:n] - trajectory.rollout_logprobs[:n])[mask]
    gather = multihost.allgather_rows
    texts, prompt_ids = trajectory.texts, trajectory.prompt_ids
    if multihost.multiprocess():
        parts = multihost.allgather_objects((list(texts), list(prompt_ids)))
        texts = [text for part, _ in parts for text in part]
        prompt_ids = [pid for _, part in parts for pid in part]
    return StepRows(
        scores=gather(trajectory.scores[:n]),
        reward_components={
            name: gather(values[:n]) for name, values in trajectory.reward_components.items()
        },
        correct=gather(trajectory.correct[:n]),
        response_lengths=gather(trajectory.response_lengths[:n]),
        finished=gather(trajectory.finished[:n]),
        mismatch=gather(mismatch),
        texts=list(texts),
        prompt_ids=list(prompt_ids),
    )


def step_metrics(rows: StepRows, update_metrics: dict, timings: dict, device_bytes: int) -> dict:
    """The metrics line of a generation step (ARCHITECTURE's keys)."""
    lengths, mismatch = rows.response_lengths, rows.mismatch
    metrics = {
        "train/reward/total": float(np.mean(rows.scores)),
        "response_length/mean": float(lengths.mean()),
        "response_length/max": int(lengths.max()),
        "response_length/clip_ratio": float(np.mean(~rows.finished)),
        "response_length/num_eos": int(rows.finished.sum()),
        "mismatch/logprob_abs_mean": float(mismatch.mean()) if mismatch.size else 0.0,
        "mismatch/logprob_abs_max": float(mismatch.max()) if mismatch.size else 0.0,
        "memory/host_bytes": int(psutil.Process().memory_info().rss),
        "memory/device_bytes": device_bytes,
    }
    for name, values in rows.reward_components.items():
        metrics[f"train/reward/{name}"] = float(np.mean(values))
    metrics.update(update_metrics)
    for name, value in reflection_metrics(rows.texts, list(rows.correct)).items():
        metrics[f"reflection/{name}"] = value
    metrics.update(timings)
    return metrics


def rollout_rows(rows: StepRows) -> list[dict]:
    """`rollouts/step_<n>.jsonl`'s lines: prompt id, response and each reward component."""
    out = []
    for i, text in enumerate(rows.texts):
        row = dict(
            prompt_id=rows.prompt_ids[i],
            response=text,
            response_length=int(rows.response_lengths[i]),
            finished=bool(rows.finished[i]),
            score=float(rows.scores[i]),
        )
        for name, values in rows.reward_components.items():
            row[f"reward/{name}"] = float(values[i])
        if rows.weights_versions is not None:
            row["weights_version"] = int(rows.weights_versions[i])
        out.append(row)
    return out


def device_memory_bytes() -> int:
    """Bytes in use on this process's devices (0 where a device does not say)."""
    total = 0
    for device in jax.local_devices():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats:
            total += int(stats.get("bytes_in_use", 0))
    return total


def report_step(
    trajectory,
    sampled_correct: list[bool],
    update_metrics: dict,
    *,
    step: int,
    timings: dict,
    extra_metrics: dict,
    weights_versions: list[int] | None = None,
    output_dir: Path | None = None,
) -> tuple[dict, list[bool]]:
    """(the metrics line of generation step `step`, every process's correctness of every
    response sampled). `sampled_correct`: this process's, per response sampled (dynamic
    sampling's dropped groups too: leaving out all-correct groups would bias the training
    accuracy down); `extra_metrics`: the rollouts' and dynamic sampling's; `weights_versions`:
    overlapped rollouts' version of each row; `output_dir`: write the step's rollouts file
    into its `rollouts/` (process 0)."""
    rows = gather_step_rows(trajectory)  # every process's
    metrics = step_metrics(rows, update_metrics, timings, device_memory_bytes())
    rows.weights_versions = weights_versions
    metrics.update(extra_metrics)
    correct = multihost.allgather_rows(np.asarray(sampled_correct)).tolist()
    metrics["train/accuracy"] = float(np.mean(correct))
    if output_dir is not None and multihost.is_leader():
        write_rollouts(output_dir, step, rollout_rows(rows))
    return metrics, correct
