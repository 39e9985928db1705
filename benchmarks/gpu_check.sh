#!/usr/bin/env bash
# One GPU session (H100/H200), sized for about 9 minutes of device time: build the extensions (CUDA included),
# run the kernel tests on the GPU (the CUDA top-k kernel and the low-rank kernels: CUDA and Triton compiled
# for real), then issue 7's benchmark at full GPT-J dimensions (`blens bench --model gpt-j --device cuda`). Everything
# lands in $OUT (default out/gpu_check): gpu_log.txt plus the bench's JSON, markdown table and PNG.
# Knobs: TESTS=0 skips the tests, PROMPTS (default 100,1000), BATCH (prompts per capture, default 4),
# BENCH_SECONDS (the benchmark's time limit).
# When the CUDA kernel's tests fail, the benchmark projects with Triton instead (and the log says so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LOG="$OUT/gpu_log.txt"
BENCH_SECONDS=${BENCH_SECONDS:-300}
PROMPTS=${PROMPTS:-100,1000}
BATCH=${BATCH:-4}
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
  topk_rc=0
  if [ "$TESTS" = 1 ]; then
  echo "== tests on the GPU"
  t0=$(date +%s)
  timeout 150 $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/test_topk.py -k cuda --durations=5 2>&1 | tail -25
  topk_rc=${PIPESTATUS[0]}
  echo "topk cuda tests rc=$topk_rc in $(( $(date +%s) - t0 )) s"
  t0=$(date +%s)
  timeout 120 $PY -m pytest -q -p no:cacheprovider -m "not slow" tests/test_lowrank_ops.py --durations=5 2>&1 | tail -25
  echo "lowrank tests rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s"
  fi
  echo "== where one batch's projection goes (GPT-J dims, 2 layers, 16 prompts)"
  timeout 60 $PY benchmarks/profile_projection.py --model gpt-j --layers 2 --device cuda --prompts 16 2>&1
  impl=auto
  [ "$topk_rc" -ne 0 ] && impl=triton && echo "the CUDA top-k kernel failed its tests: the benchmark uses Triton"
  echo "== GPT-J benchmark (impl=$impl)"
  t0=$(date +%s)
  timeout "$BENCH_SECONDS" $PY -m blens_fast.cli bench --model gpt-j --device cuda --dtype bfloat16 \
    --prompts "$PROMPTS" --naive-prompts 1 --batch-size "$BATCH" --impl "$impl" --no-progress --out "$OUT" 2>&1
  echo "blens bench rc=$? in $(( $(date +%s) - t0 )) s"
  ls -la "$OUT"
} 2>&1 | tee "$LOG"
