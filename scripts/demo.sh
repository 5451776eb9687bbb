#!/usr/bin/env bash
# Sets up .venv if needed and runs the main job on the embedded default (CPU, tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m maye_jax.demo "$@"
