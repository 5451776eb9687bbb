#!/usr/bin/env bash
# Sets up .venv if needed and runs the test suite (CPU, 8 fake JAX devices).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m pytest -q "$@"
