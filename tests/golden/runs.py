"""Golden runs: four tiny end-to-end runs whose metrics.jsonl (and rollouts) were recorded
before the trainer's redesign, so that "behaviour unchanged" is checked, not assumed.

    python -m tests.golden.runs            # re-records every golden (only on purpose!)

Each run writes `OUTPUT_DIR/metrics.jsonl`; the test compares every key but `time/*` and
`memory/*` bit for bit (JSON floats are exact round trips of the float64 values written).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent
NAMES = ("rl_reinforce_pp_kl", "rl_grpo", "sft", "warmup_then_rl", "rl_tower")
NOISE_PREFIXES = ("time/", "memory/")


def base_config(tmp: Path):
    """The tests' tiny run (tests/tiny_run.py), evaluated on validation only, no export."""
    from tests.tiny_run import tiny_run_config

    c = tiny_run_config(tmp / "run", tmp / "data", name="golden")
    c.eval.splits = ("validation",)
    c.eval.settings = ("pass@8_t1.0", "pass@1_t0.01")
    c.checkpoint.export_hf = False
    return c


def golden_config(name: str, tmp: Path):
    c = base_config(tmp)
    if name == "rl_reinforce_pp_kl":  # the paper's estimator: whitening, KL loss, 1 sample
        c.rl.advantage_estimator = "reinforce_pp"
        c.rl.kl_loss_coeff = 0.01
    elif name == "rl_grpo":
        c.rl.advantage_estimator = "grpo"
        c.rollout.num_samples = 2
        c.rl.batch_size = 4  # 2 prompts x 2 samples: 2 steps per epoch
        c.rl.kl_loss_coeff = 0.0
        c.rollout.temperature = 0.6
    elif name == "sft":
        c.sft.num_epochs = 2
        c.sft.batch_size, c.sft.micro_batch_size = 2, 1
        c.sft.learning_rate = 1e-2
    elif name == "warmup_then_rl":
        c.sft.warmup_epochs = 1
        c.sft.batch_size = c.sft.micro_batch_size = 2
        c.sft.learning_rate = 1e-2
        c.rl.advantage_estimator = "grpo"
        c.rollout.num_samples = 2
        c.rl.kl_loss_coeff = 0.001
        c.rl.num_epochs = 1
        c.model.train_embeddings = False
    elif name == "rl_tower":  # the tower and merger train inside the update
        c.model.train_vit = c.model.train_connector = True
        c.rl.kl_loss_coeff = 0.01
        c.rl.num_epochs = 1
    else:
        raise ValueError(name)
    return c


def run_golden(name: str, tmp: Path) -> Path:
    """Runs golden `name` in `tmp`; returns its output directory."""
    c = golden_config(name, tmp)
    if name == "sft":
        from maye_jax.sft import run_sft

        run_sft(c)
    else:
        from maye_jax.train import run_rl

        run_rl(c)
    return Path(c.output_dir)


def comparable(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in line.items() if not k.startswith(NOISE_PREFIXES)} for line in lines]


# XLA compiles for the CPU it runs on (AVX-512 or AVX2, FMA or not), so the last bits of a sum
# differ between CPU models, and a product laid out differently (merged row dimensions,
# head-major attention) sums in another order: floats are compared to float32 rounding.
# Everything that is not a float must be equal.
RTOL, ATOL = 1e-5, 1e-6


def same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)
    if isinstance(a, float) or isinstance(b, float):  # an int where the golden has a float
        return False
    return a == b


def assert_same_lines(ours: Path, theirs: Path, label: str) -> None:
    """The `comparable` lines of two files agree: the same keys, values as `same_value`."""
    a_lines, b_lines = comparable(ours), comparable(theirs)
    assert len(a_lines) == len(b_lines), label
    for line, (a, b) in enumerate(zip(a_lines, b_lines)):
        assert sorted(a) == sorted(b), f"{label} line {line + 1}: keys differ"
        differing = {k: (a[k], b[k]) for k in a if not same_value(a[k], b[k])}
        assert not differing, f"{label} line {line + 1}: {differing}"


def recorded_files(output_dir: Path) -> dict[str, Path]:
    """The files a golden compares: metrics, the warm-up's metrics, each step's rollouts."""
    files = {"metrics.jsonl": output_dir / "metrics.jsonl"}
    if (output_dir / "sft_warmup" / "metrics.jsonl").is_file():
        files["sft_warmup.metrics.jsonl"] = output_dir / "sft_warmup" / "metrics.jsonl"
    for path in sorted((output_dir / "rollouts").glob("step_*.jsonl")):
        files[f"rollouts.{path.name}"] = path
    return files


def record(names=NAMES) -> None:
    import tempfile

    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            out = run_golden(name, Path(tmp))
            target = GOLDEN_DIR / name
            target.mkdir(exist_ok=True)
            for old in target.glob("*.jsonl"):
                old.unlink()
            for label, path in recorded_files(out).items():
                lines = comparable(path)
                (target / label).write_text("".join(json.dumps(x) + "\n" for x in lines))
            print(f"recorded {name}: {sorted(recorded_files(out))}")


if __name__ == "__main__":
    record(sys.argv[1:] or NAMES)
