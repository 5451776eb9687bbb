#!/usr/bin/env bash
# Sets up .venv (and .venv-vllm, the vLLM CPU worker's own environment) if needed, checks the
# whole tree with `ruff check` and `ruff format --check`, and runs the test suite (CPU, 8 fake
# JAX devices). MAYE_SKIP_VLLM=1 skips the vLLM environment and its tests; otherwise they are
# required to run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${MAYE_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/setup_vllm_env.sh
  export MAYE_REQUIRE_VLLM=1
fi
. .venv/bin/activate
ruff check .
ruff format --check .
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m pytest -q "$@"
