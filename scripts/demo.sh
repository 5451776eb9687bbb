#!/usr/bin/env bash
# Sets up .venv if needed and runs the main job on the embedded default: the MAYE RL loop on a
# tiny Qwen2-VL-architecture model (real tokenizer), synthetic data, JAX sampler, CPU.
# Extra arguments go to the trainer, e.g. --config.rl.num_epochs=1. Each invocation replaces the
# previous demo run in runs/demo (--config.overwrite=True); to keep one, pass another
# --config.output_dir (and --config.data.synth_dir).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m maye_jax.train --config=configs/demo.py --config.overwrite=True "$@"
