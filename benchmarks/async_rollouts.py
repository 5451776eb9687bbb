"""Rollouts overlapped with the update against synchronous ones, on the demo, in one run.

    python benchmarks/async_rollouts.py [--out=runs/bench_async] [--epochs=1]

1. The demo's SFT warm-up (configs/demo.py: 12 epochs on the golden solutions), once, on both
   cores; its final policy is the start model of both arms.
2. Two RL arms from that start, the demo's recipe shortened to `epochs` RL epochs, with the
   vLLM CPU worker (`.venv-vllm`): synchronous, then `rl.async_rollouts=True`. Both run with the
   trainer pinned to CPU 0 (`taskset -c 0`) and the worker to CPU 1 (`rollout.worker_cpus=1`),
   so that overlapping has a core to use; both with `rl.rollout_is_cap=2.0` (which overlap
   requires; on policy the weight is ~1), so the overlap is the only difference.

Printed: the seconds per generation step of each arm (the mean over steps 2.. of the step's
timed sections: data, rollout, sync, trajectory, update; step 1 compiles), the synchronous
step's parts (rollout + sync alone, trajectory + update alone), the goal (an overlapped step
at most max(rollout, trajectory + update) + 10% of the synchronous step), and each arm's
validation accuracy before RL and after each epoch, under the paper's three settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("data", "rollout", "sync", "trajectory", "update")
SETTINGS = ("pass@8_t1.0", "pass@1_t0.6", "pass@1_t0.01")


def demo_config(out: Path):
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "configs"))
    from demo import get_config

    c = get_config()
    c.data.synth_dir = str(out / "data")
    c.checkpoint.export_hf = False
    c.logging.progress_bar = False
    c.overwrite = True
    return c


def warm_up(out: Path) -> None:
    """The demo's SFT warm-up as an SFT run whose final policy (start/final_hf) starts both arms."""
    from maye_jax.sft import run_sft

    c = demo_config(out)
    c.output_dir = str(out / "start")
    c.sft.num_epochs, c.sft.warmup_epochs = c.sft.warmup_epochs, None
    c.model.train_embeddings = True  # as the demo's warm-up: the whole LLM learns the format
    c.eval.enabled = False
    c.checkpoint.export_hf = True
    run_sft(c)


def arm(out: Path, mode: str, epochs: int) -> None:
    from maye_jax.train import run_rl

    c = demo_config(out)
    c.output_dir = str(out / mode)
    c.model.path, c.model.tiny_family = str(out / "start" / "final_hf"), None
    c.sft.warmup_epochs = None
    c.rl.num_epochs = epochs
    c.rollout.engine = "vllm"
    c.rollout.worker_cpus = "1"
    c.rl.rollout_is_cap = 2.0
    c.rl.async_rollouts = mode == "async"
    run_rl(c)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_seconds(lines: list[dict]) -> dict[str, float]:
    steps = [line for line in lines if line["generation_step"] >= 2]
    mean = lambda key: sum(line.get(f"time/{key}_seconds", 0.0) for line in steps) / len(steps)  # noqa: E731
    parts = {key: mean(key) for key in SECTIONS}
    parts["step"] = sum(parts.values())
    return parts


def report(out: Path) -> None:
    sync, overlap = read(out / "sync" / "metrics.jsonl"), read(out / "async" / "metrics.jsonl")
    s, a = step_seconds(sync), step_seconds(overlap)
    rollout = s["rollout"] + s["sync"]
    learn = s["trajectory"] + s["update"]
    goal = max(rollout, learn) + 0.1 * s["step"]
    print(
        f"synchronous step {s['step']:.2f} s (rollout + sync {rollout:.2f} s, trajectory + update "
        f"{learn:.2f} s, data {s['data']:.2f} s)"
    )
    print(
        f"overlapped step  {a['step']:.2f} s (waiting for the rollout {a['rollout']:.2f} s, sync "
        f"{a['sync']:.2f} s, trajectory + update {a['trajectory'] + a['update']:.2f} s)"
    )
    print(
        f"synchronous / overlapped: {s['step'] / a['step']:.2f}x; goal max(rollout, trajectory + "
        f"update) + 10% = {goal:.2f} s: {'met' if a['step'] <= goal else 'NOT met'}"
    )
    lags = [line["rollout/weights_lag"] for line in overlap if "rollout/weights_lag" in line]
    print(f"overlapped responses' weights lag per step: {lags}")
    for name, lines in (("synchronous", sync), ("overlapped", overlap)):
        evals = [line for line in lines if "eval/validation/pass@1_t0.6" in line]
        cells = []
        for setting in SETTINGS:
            values = [100 * line[f"eval/validation/{setting}"] for line in evals]
            cells.append(f"{setting} " + " -> ".join(f"{v:.1f}" for v in values))
        print(f"{name}: validation accuracy by epoch: " + "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_async")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--phase", default="all", choices=("all", "warmup", "sync", "async", "report")
    )
    args = parser.parse_args()
    out = Path(args.out).absolute()
    if args.phase == "warmup":
        return warm_up(out)
    if args.phase in ("sync", "async"):
        return arm(out, args.phase, args.epochs)
    if args.phase == "report":
        return report(out)
    me = [sys.executable, str(Path(__file__).resolve()), f"--out={out}", f"--epochs={args.epochs}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if not (out / "start" / "final_hf" / "config.json").is_file():
        subprocess.run([*me, "--phase=warmup"], check=True, env=env, cwd=REPO)
    for mode in ("sync", "async"):
        subprocess.run(
            ["taskset", "-c", "0", *me, f"--phase={mode}"], check=True, env=env, cwd=REPO
        )
    report(out)


if __name__ == "__main__":
    main()
