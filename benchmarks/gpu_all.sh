#!/usr/bin/env bash
# The four GPU benchmarks of issue 7 in one command, at their real sizes (~9 min on one H100):
#
#     bash benchmarks/gpu_all.sh                  # everything; results in ${OUT:-/tmp/gpu_bench}
#     bash benchmarks/gpu_all.sh sampler_3b       # only the named ones (names below)
#     GPU_BENCH_TINY=1 bash benchmarks/gpu_all.sh # the same at the tiny size (a CPU check)
#
#   update_3b    gpu_update.py   3B policy update: tokens/s, MFU, peak memory, a profile trace
#   sync         gpu_sync.py     3B and 7B LLM weights: JAX device -> host -> /dev/shm -> torch
#   logprobs_3b  gpu_logprobs.py 3B chunked logprob pass (policy + reference) vs chunk size
#   fit_7b       gpu_update.py   does the 7B update fit (this GPU; one H200 by XLA's estimate)?
#   sampler_3b   gpu_sampler.py  3B JAX sampler, 64 prompts x 1 and 16 x 8, 2048 new tokens
#
# Run only when named (a second device call, after the ones above have given the baseline):
#   update_3b_cudnn    update_3b with cuDNN flash attention (--attention cudnn)
#   update_3b_dots     update_3b keeping the projections' outputs (--remat dots)
#   logprobs_3b_cudnn  logprobs_3b with cuDNN flash attention
#
# Each writes NAME.json (rewritten as it measures: a run cut short keeps what it has) and
# NAME.log into the output folder, under its own time limit, all within BUDGET_S seconds
# (default 540); a failing one does not stop the others. The JAX compilation cache
# (JAX_COMPILATION_CACHE_DIR, default /tmp/maye_jax_cache) makes a second run on the same
# machine cheaper: rerun the names that the budget cut. Wheels in .whl/ are installed first
# (the GPU machine lacks ml_collections, math-verify, dashscope and einops: carry their wheels,
# e.g. `pip download --no-deps -d .whl einops ml_collections`).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp/gpu_bench}"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-540}"
START=$(date +%s)
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/maye_jax_cache}"

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  df -h /dev/shm 2>&1 | tail -n 1
  free -g 2>&1 | sed -n 2p
  nproc
} > "$OUT_DIR/machine.txt"
echo "machine: $(tr '\n' ' ' < "$OUT_DIR/machine.txt")"

SELECTED=" $* "
SIZE_3B=3b SIZE_7B=7b SYNC_SIZES=3b,7b
if [ -n "${GPU_BENCH_TINY:-}" ]; then  # a quick check of this script on a CPU
  SIZE_3B=tiny SIZE_7B=tiny SYNC_SIZES=tiny
fi

bench() {  # NAME LIMIT_S SCRIPT ARGS...
  local name=$1 limit=$2
  shift 2
  if [ "$SELECTED" != "  " ] && [[ "$SELECTED" != *" $name "* ]]; then return; fi
  if [ "$SELECTED" == "  " ] && [ -n "${ONLY_WHEN_NAMED:-}" ]; then return; fi
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then
    echo "== $name: not run, ${left} s of the ${BUDGET_S} s budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $PYTHON $*"
  local started
  started=$(date +%s)
  timeout --kill-after=15 "$limit" "$PYTHON" "$@" --out "$OUT_DIR/$name.json" \
    > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - started)) s$([ $rc -eq 124 ] && echo ' (time limit)')"
  if [ $rc -eq 0 ]; then
    sed -n '/^== /,$p' "$OUT_DIR/$name.log"  # the short table each benchmark prints last
  else
    tail -n 30 "$OUT_DIR/$name.log"
  fi
}

bench update_3b 200 benchmarks/gpu_update.py --size $SIZE_3B --profile "$OUT_DIR/profile_update"
bench sync 90 benchmarks/gpu_sync.py --sizes $SYNC_SIZES --repeats 3 --shm_root auto
bench logprobs_3b 110 benchmarks/gpu_logprobs.py --size $SIZE_3B --repeats 2
bench fit_7b 120 benchmarks/gpu_update.py --size $SIZE_7B --fit --micro_batches 4 --micro_rows 1
bench sampler_3b 240 benchmarks/gpu_sampler.py --size $SIZE_3B --repeats 1

ONLY_WHEN_NAMED=1
bench update_3b_cudnn 200 benchmarks/gpu_update.py --size $SIZE_3B --attention cudnn
bench update_3b_dots 200 benchmarks/gpu_update.py --size $SIZE_3B --remat dots
bench logprobs_3b_cudnn 110 benchmarks/gpu_logprobs.py --size $SIZE_3B --repeats 2 --attention cudnn

echo "== summary ($(($(date +%s) - START)) s in all; files in $OUT_DIR)"
"$PYTHON" benchmarks/gpu_summary.py "$OUT_DIR"
