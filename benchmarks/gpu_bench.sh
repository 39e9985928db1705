#!/usr/bin/env bash
# The GPU benchmark: the Backward Lens at full GPT-J dimensions (d=4096, 4d=16384, V=50,400, 28 layers, random
# initialisation, bfloat16) on one H100/H200, naive PyTorch vs blens_fast, over N = 100 and 1,000 CounterFact
# prompts. Run from the repository root on the GPU machine; everything lands in $OUT (default
# benchmarks/results). Sized for < 8 minutes: build <= 3 min (skipped when the extension is already built),
# benchmark <= 5.5 min (each finished N is also kept in bench_cuda_*.partial.json).
#
# The naive way runs on 1 prompt (56 dense 4096 x 16384 SVDs per prompt) and its time is scaled by N (it is a
# loop over prompts, so linear in N); its memory is per prompt (flat in N). If it runs out of memory the report
# says where. In bfloat16 the naive dense gradients are rounded to bf16 before matrix_rank sees them, so
# the gradient ranks of the two ways may disagree (the report shows the fractions); the command then exits 1,
# which this script records and carries on.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu_env.txt"

# 1. build the C++/CUDA extensions in place (impl=auto falls back to Triton when the CUDA one is missing)
if ! $PY -c "import blens_fast._C_cuda" 2>/dev/null; then
  timeout 180 $PY setup.py build_ext --inplace -j 8 > "$OUT/gpu_build.log" 2>&1 \
    && echo "build: ok" || echo "build: FAILED or timed out (see gpu_build.log); the projection uses Triton"
fi

# 2. the benchmark: N sweep 100 -> 1000 at CounterFact length; the naive way measured on 1 prompt
timeout 330 $PY -m blens_fast.cli bench --model gpt-j --device cuda --dtype bfloat16 \
  --prompts 100,1000 --naive-prompts 1 --batch-size 16 --no-progress --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
echo "blens bench exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_bench.log"
ls -la "$OUT"
