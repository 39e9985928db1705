#!/usr/bin/env bash
# One GPU session (H100/H200), about 6 minutes of device time on an H100: build the extensions (CUDA included),
# run the kernel tests on the GPU (the CUDA and Triton top-k kernels, the low-rank kernels, the projection with
# its norm prologue: compiled for real), time one batch's projection per implementation side by side, then
# issue 7's benchmark at full GPT-J dimensions (`blens bench --model gpt-j --device cuda`). Everything lands in
# $OUT (default out/gpu_check): gpu_log.txt plus the bench's JSON, markdown table and PNG.
# Knobs: TESTS=0 skips the tests, PROMPTS (default 100,300,1000), BATCH (prompts per capture, default 4),
# MAX_TOKENS (padded positions per capture, default 64), BENCH_SECONDS (the benchmark's time limit).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LOG="$OUT/gpu_log.txt"
BENCH_SECONDS=${BENCH_SECONDS:-300}
PROMPTS=${PROMPTS:-100,300,1000}
BATCH=${BATCH:-4}
MAX_TOKENS=${MAX_TOKENS:-64}
TESTS=${TESTS:-1}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'triton', triton.__version__)"
  echo "== build"
  t0=$(date +%s)
  MAX_JOBS=16 timeout 300 $PY setup.py build_ext --inplace > /tmp/gpu_build.txt 2>&1
  echo "build rc=$? in $(( $(date +%s) - t0 )) s"; grep -E "error|warning: " /tmp/gpu_build.txt | head -20
  $PY -c "import blens_fast._C_cuda, blens_fast._C; print('extensions ok')"
  if [ "$TESTS" = 1 ]; then
  echo "== tests on the GPU"
  t0=$(date +%s)
  timeout 120 $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/kernels/test_topk.py -k "cuda or triton" \
    --durations=5 2>&1 | tail -25
  echo "top-k tests (CUDA, Triton) rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s"
  t0=$(date +%s)
  timeout 150 $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/kernels/test_lowrank_ops.py tests/kernels/test_project.py tests/pipeline/test_stats.py \
    --durations=5 2>&1 | tail -25
  echo "low-rank, projection and stats tests rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s"
  fi
  echo "== one batch's projection per implementation (GPT-J dims, 2 layers, 64 prompts)"
  timeout 90 $PY benchmarks/profile_projection.py --model gpt-j --depth 2 --device cuda --prompts 64 \
    --impls cuda,triton,torch 2>&1
  echo "== GPT-J benchmark"
  t0=$(date +%s)
  timeout "$BENCH_SECONDS" $PY -m blens_fast.cli bench --model gpt-j --device cuda --dtype bfloat16 \
    --prompts "$PROMPTS" --naive-prompts 1 --batch-size "$BATCH" --max-tokens "$MAX_TOKENS" --quiet \
    --out "$OUT" 2>&1
  echo "blens bench rc=$? in $(( $(date +%s) - t0 )) s"
  ls -la "$OUT"
} 2>&1 | tee "$LOG"
