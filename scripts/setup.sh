#!/usr/bin/env bash
# Creates .venv (once) and installs maye-jax with its test extras into it.
# MAYE_TORCH_SPEC overrides the torch requirement (default: the 2.13.0 CPU build this
# project is tested with; on a GPU node pass e.g. MAYE_TORCH_SPEC="torch" for your CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.maye-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  python -m pip install -q "${MAYE_TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
