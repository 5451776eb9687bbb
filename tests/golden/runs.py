"""Golden runs: tiny end-to-end runs whose metrics.jsonl (and rollouts) are recorded, so that
"behaviour unchanged" is checked, not assumed (tests/test_golden_runs.py; how and when to
record: tests/golden/README.md).

    python -m tests.golden.runs [NAME ...]     # re-records (only on purpose!)

`NAMES` were recorded before the trainer's redesign from a random tiny model (their responses
all run to max_tokens, accuracy 0); `WARM_NAMES` start from the session's SFT-warmed tiny model
(tests/golden/warm_model.py): responses stop at EOS at different lengths or are cut, accuracy
and evaluation are not 0 and move, and each length penalty is on in one of them. The test
compares every key but `time/*` and `memory/*`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import date
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent
NAMES = ("rl_reinforce_pp_kl", "rl_grpo", "sft", "warmup_then_rl", "rl_tower")
WARM_NAMES = ("rl_grpo_eos_penalty", "rl_reinforce_pp_overlong")
# The run seed of each: one whose sampled tokens all keep the recording rule's margin
WARM_SEEDS = {"rl_grpo_eos_penalty": 2, "rl_reinforce_pp_overlong": 5}
NOISE_PREFIXES = ("time/", "memory/")
RECORD_FILE = "recorded.json"  # the commit and CPU a golden was recorded on


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


def warm_config(name: str, tmp: Path, warm) -> object:
    """The runs from the SFT-warmed model (`warm`: its folder and data files). Sampling at
    temperature 0.6 and evaluating at 0.6 and 0.01 keep every sampled token's margin above the
    recording rule's 1e-3 (tests/golden/margins.py); at temperature 1 the 152k-token tail makes
    draws of tokens whose whole interval is narrower than that."""
    from maye_jax.config.defaults import default_config

    model_dir, files = warm
    c = default_config()
    c.name = "golden"
    c.seed = WARM_SEEDS[name]
    c.output_dir = str(tmp / "run")
    c.model.path = str(model_dir)
    c.model.dtype = c.model.frozen_dtype = "float32"
    c.data.train_file = str(files["train"])
    c.data.validation_file = str(files["validation"])
    c.data.max_pixels = 4 * 28 * 28
    c.data.prompt_template = "plain"
    c.rollout.temperature = 0.6
    c.rollout.max_tokens = c.eval.max_tokens = 16
    c.optim.learning_rate = 3e-3
    c.optim.warmup_fraction = 0.0
    c.eval.splits = ("validation",)
    c.eval.settings = ("pass@1_t0.6", "pass@1_t0.01")
    c.checkpoint.every_steps = 100
    c.checkpoint.export_hf = False
    c.logging.progress_bar = False
    if name == "rl_grpo_eos_penalty":  # the original's no-EOS / too-short penalty
        c.rl.advantage_estimator = "grpo"
        c.rollout.num_samples = 4
        c.rl.batch_size, c.rl.ppo_batch_size = 8, 4  # 2 prompts x 4 samples: 2 steps
        c.rl.micro_batch_size, c.rl.forward_batch_size = 2, 8
        c.rl.num_epochs = 1
        c.rl.kl_loss_coeff = 0.01
        # the longer right answer (18 tokens) is cut at 16: no EOS
        c.rewards.penalty = True
        c.rewards.min_response_length = 6  # the short wrong one (6 tokens) is too short
    elif name == "rl_reinforce_pp_overlong":  # DAPO's soft overlong penalty
        c.rl.advantage_estimator = "reinforce_pp"
        c.rl.batch_size, c.rl.ppo_batch_size = 4, 2  # 4 prompts x 1 sample: 1 step per epoch
        c.rl.micro_batch_size, c.rl.forward_batch_size = 1, 4
        c.rl.num_epochs = 2
        c.rl.kl_loss_coeff = 0.01
        c.rewards.overlong_buffer_len = 6  # 0 up to 10 tokens, then down to -1 at 16
    else:
        raise ValueError(name)
    return c


def run_golden(name: str, tmp: Path, warm=None) -> Path:
    """Runs golden `name` in `tmp` (a `WARM_NAMES` one from `warm`: the warmed model's folder
    and data files); returns its output directory."""
    if name in WARM_NAMES:
        from maye_jax.train import run_rl

        c = warm_config(name, tmp, warm)
        run_rl(c)
        return Path(c.output_dir)
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
# The trainer's logprobs against the sampler's are two code paths' float noise (0 to ~4e-6
# measured); a wrong weight sync, position or temperature is 1e-2 or more.
MISMATCH_KEYS, MISMATCH_ATOL = ("mismatch/",), 1e-5
# The runs from the warmed model start from a model that every test session builds again with
# 40 Adam steps, which carry float rounding into its weights (4e-5 apart when built with 1
# instead of 8 XLA devices on one CPU, the nearest stand-in for another CPU here). That moved
# the update's own metrics by up to 6.3e-3 relative (approx_kl; kl/k3 2.9e-3, entropy 8.6e-4,
# grad_norm 4.1e-4) and nothing else: every token, reward, accuracy and evaluation was equal.
# These keys compare to 5x that; the update's numbers are pinned tightly by the runs from the
# random model and by tests/maye_jax/test_rl_step_reference.py.
WARM_UPDATE_KEYS = ("loss/", "kl/", "approx_kl", "entropy", "grad_norm", "ratio/", "clip_frac/")
WARM_UPDATE_RTOL = 3e-2


def same_value(a, b, key: str = "", *, warm: bool = False) -> bool:
    """`a` (produced) equals `b` (the golden's) for `key`: floats to the key's tolerance."""
    if isinstance(a, float) and isinstance(b, float):
        if key.startswith(MISMATCH_KEYS):
            return math.isclose(a, b, rel_tol=0.0, abs_tol=MISMATCH_ATOL)
        if warm and key.startswith(WARM_UPDATE_KEYS):
            return math.isclose(a, b, rel_tol=WARM_UPDATE_RTOL, abs_tol=ATOL)
        return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)
    if isinstance(a, float) or isinstance(b, float):  # an int where the golden has a float
        return False
    return a == b


def assert_same_lines(ours: Path, theirs: Path, label: str, *, warm: bool = False) -> None:
    """The `comparable` lines of two files agree: the same keys, values as `same_value`
    (`warm`: a run from the warmed model)."""
    a_lines, b_lines = comparable(ours), comparable(theirs)
    assert len(a_lines) == len(b_lines), label
    for line, (a, b) in enumerate(zip(a_lines, b_lines)):
        assert sorted(a) == sorted(b), f"{label} line {line + 1}: keys differ"
        differing = {k: (a[k], b[k]) for k in a if not same_value(a[k], b[k], k, warm=warm)}
        assert not differing, f"{label} line {line + 1}: {differing}"


def recorded_files(output_dir: Path) -> dict[str, Path]:
    """The files a golden compares: metrics, the warm-up's metrics, each step's rollouts."""
    files = {"metrics.jsonl": output_dir / "metrics.jsonl"}
    if (output_dir / "sft_warmup" / "metrics.jsonl").is_file():
        files["sft_warmup.metrics.jsonl"] = output_dir / "sft_warmup" / "metrics.jsonl"
    for path in sorted((output_dir / "rollouts").glob("step_*.jsonl")):
        files[f"rollouts.{path.name}"] = path
    return files


def recording_machine() -> dict:
    """The commit (`-dirty` with uncommitted changes) and CPU model a golden is recorded on."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(GOLDEN_DIR), *args], capture_output=True, text=True
        ).stdout.strip()

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    dirty = "-dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    return dict(commit=git("rev-parse", "HEAD") + dirty, cpu=cpu, date=date.today().isoformat())


def record(names=NAMES + WARM_NAMES) -> None:
    """Runs each golden and writes its files and `recorded.json`. A run from the warmed model
    is refused when one of its sampled tokens is within 1e-3 of another draw (the README's
    rule): change the run (e.g. its seed), do not lower the rule."""
    import tempfile

    from tests.golden import warm_model
    from tests.golden.margins import MIN_MARGIN, sampled_token_margins

    machine = recording_machine()  # before this recording writes any file
    with tempfile.TemporaryDirectory() as tmp:
        warm = None
        if any(name in WARM_NAMES for name in names):
            warm = warm_model.build(Path(tmp) / "warm")
        for name in names:
            with tempfile.TemporaryDirectory() as run_tmp:
                with sampled_token_margins() as margins:
                    out = run_golden(name, Path(run_tmp), warm)
                recorded = dict(machine)
                if name in WARM_NAMES:
                    smallest = min(margins)
                    if smallest <= MIN_MARGIN:
                        raise SystemExit(
                            f"{name}: a sampled token's margin is {smallest:.3g} <= {MIN_MARGIN} "
                            "(tests/golden/README.md): not recorded; change the run, e.g. its seed"
                        )
                    recorded.update(min_sampled_token_margin=smallest, sampled_tokens=len(margins))
                target = GOLDEN_DIR / name
                target.mkdir(exist_ok=True)
                for old in target.glob("*.jsonl"):
                    old.unlink()
                for label, path in recorded_files(out).items():
                    lines = comparable(path)
                    (target / label).write_text("".join(json.dumps(x) + "\n" for x in lines))
                (target / RECORD_FILE).write_text(json.dumps(recorded, indent=2) + "\n")
                print(f"recorded {name}: {sorted(recorded_files(out))}, {recorded}")


if __name__ == "__main__":
    # As the test session (tests/conftest.py): XLA:CPU splits its work by the device count, so
    # the last bits of a run (and, through the warm-up's Adam steps, the warmed model) depend
    # on it. Set before JAX is first imported.
    import os

    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    record(tuple(sys.argv[1:]) or NAMES + WARM_NAMES)
