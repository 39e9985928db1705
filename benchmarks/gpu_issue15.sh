#!/usr/bin/env bash
# Issue 15 on one GPU (H100/H200), ONE run of about 6-8 minutes (fits one `run` call with timeout_s=600):
#   0. the GPU, the software, and a 5-second probe: does the driver load the sm_90a image when a fatbinary holds
#      both sm_90 and sm_90a? (decides how to build; the answer is the setup.py change the repository needs)
#   1. build the extensions with sm_90a added (wgmma): setup.py with NVCC_APPEND_FLAGS when the driver picks sm_90a
#      over sm_90, else a throwaway copy of setup.py with sm_90 replaced by sm_90a (the repository is not touched);
#      the ptxas resource report of the projection kernels is kept;
#   2. tests/kernels/test_gpu_kernels.py: every CUDA variant and every Triton tuning config against the exact
#      reference (the Triton compiles are the benchmark's too);
#   3. the existing CUDA/Triton projection tests (tests/kernels/test_topk.py -k "cuda or triton");
#   4a. each CUDA variant (wgmma, mma, simple) checked in its own process: only those that pass are benchmarked, and
#      the binding's auto is pinned to the best of them (a crash or hang in one variant cannot take step 4 with it);
#   4. benchmarks/bench_gpu_roofline.py: each implementation beside the GEMM alone, checked first; writes the JSON,
#      the markdown table and the tuning table;
#   5. a short summary last.
# Everything goes to $OUT (default out/gpu_issue15): gpu_issue15_log.txt, build_log.txt, gpu_roofline_<gpu>.json,
# gpu_roofline_<gpu>.md, tables/<gpu>.json (copy to blens_fast/ops/tables/). Steps that would not end before
# BUDGET seconds (default 540) are shortened or skipped, and say so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_issue15}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PATH:${CUDA_HOME:-/usr/local/cuda}/bin"
PY=${PYTHON:-python3}
LOG="$OUT/gpu_issue15_log.txt"
BUDGET=${BUDGET:-540}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(date +%s) + T0 )); }
{
  echo "== gpu_issue15.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) at $(git rev-parse --short HEAD 2>/dev/null) (+ working tree)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'capability', torch.cuda.get_device_capability())"
  nvcc --version | tail -2

  echo "== 0. driver image choice between sm_90 and sm_90a"
  mkdir -p /tmp/blens_probe
  cat > /tmp/blens_probe/probe.cu <<'EOF'
#include <cstdio>
__global__ void probe(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 901;  // the sm_90a image
#elif defined(__CUDA_ARCH__)
  *out = __CUDA_ARCH__;
#endif
}
int main() {
  int* d = nullptr; int h = -1;
  if (cudaMalloc(&d, sizeof(int)) != cudaSuccess) { printf("-1\n"); return 1; }
  probe<<<1, 1>>>(d);
  cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost);
  printf("%d\n", h);
  return 0;
}
EOF
  PROBE=-1
  if nvcc -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
      -gencode=arch=compute_90a,code=sm_90a /tmp/blens_probe/probe.cu -o /tmp/blens_probe/probe 2>&1 | tail -3; then
    PROBE=$(/tmp/blens_probe/probe || echo -1)
  fi
  echo "probe: a fatbinary with sm_80 + sm_90 + sm_90a images ran the image of: $PROBE (901 = sm_90a, 900 = sm_90)"

  echo "== 1. build"
  t0=$(date +%s)
  if [ "$PROBE" = 901 ]; then
    echo "build: setup.py + NVCC_APPEND_FLAGS=-gencode=arch=compute_90a,code=sm_90a (the driver prefers sm_90a)"
    NVCC_APPEND_FLAGS="-gencode=arch=compute_90a,code=sm_90a -Xptxas -v" MAX_JOBS=16 timeout 330 \
      $PY setup.py build_ext --inplace > "$OUT/build_log.txt" 2>&1
    rc=$?
  else
    echo "build: a copy of setup.py with -gencode=arch=compute_90,code=sm_90 replaced by compute_90a/sm_90a"
    sed 's/-gencode=arch=compute_90,code=sm_90"/-gencode=arch=compute_90a,code=sm_90a"/' setup.py > /tmp/blens_setup_sm90a.py
    grep -n "gencode" /tmp/blens_setup_sm90a.py
    NVCC_APPEND_FLAGS="-Xptxas -v" MAX_JOBS=16 timeout 330 $PY /tmp/blens_setup_sm90a.py build_ext --inplace \
      > "$OUT/build_log.txt" 2>&1
    rc=$?
  fi
  echo "build rc=$rc in $(( $(date +%s) - t0 )) s"
  grep -E "error|warning: |Warning:" "$OUT/build_log.txt" | grep -v "UserWarning\|deprecated" | head -20
  $PY - <<'EOF'
import torch, blens_fast._C, blens_fast._C_cuda as ext
w = torch.zeros(256, 64, dtype=torch.bfloat16, device="cuda")
print("extensions ok; CUDA projection variants:", list(ext.topk_variants()), "auto for bf16:", ext.topk_auto_variant(w))
EOF

  echo "== 2. tests/kernels/test_gpu_kernels.py (left $(left) s)"
  t0=$(date +%s)
  T=$(( $(left) - 60 )); [ "$T" -gt 200 ] && T=200; [ "$T" -lt 30 ] && T=30
  timeout "$T" $PY -m pytest -q -p no:cacheprovider -s \
    tests/kernels/test_gpu_kernels.py --durations=8 2>&1 | grep -v "^$" | tail -40
  echo "GPU kernel tests rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s"

  echo "== 3. existing CUDA/Triton projection tests (left $(left) s)"
  TOPK_TESTS=tests/kernels/test_topk.py
  [ -f "$TOPK_TESTS" ] || TOPK_TESTS=tests/test_topk.py
  T=$(( $(left) - 200 )); [ "$T" -gt 110 ] && T=110   # the benchmark keeps at least 200 s
  if [ "$T" -ge 40 ]; then
    t0=$(date +%s)
    timeout "$T" $PY -m pytest -q -p no:cacheprovider -m "not slow" "$TOPK_TESTS" -k "cuda or triton" \
      --durations=5 2>&1 | tail -15
    echo "top-k tests (CUDA, Triton) rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s (limit $T s)"
  else
    echo "skipped: too little time left for them before the benchmark"
  fi

  echo "== 4a. each CUDA variant in its own process (a crash or hang must not take the benchmark with it)"
  cat > /tmp/blens_variant_check.py <<'PYEOF'
import sys, torch, blens_fast._C_cuda as ext
from blens_fast.ops import reference
variant = sys.argv[1]
g = torch.Generator().manual_seed(0)
n, d, v, k = 1000, 256, 5003, 37
h = torch.randint(-2, 3, (n, d), generator=g).to(torch.bfloat16).cuda()
w = torch.randint(-2, 3, (v, d), generator=g).to(torch.bfloat16).cuda()
want = reference.select_lists(h.float() @ w.float().T, k, top=True, bottom=True)
got = reference.Lists(*ext.topk_logits_variant(h, w, None, None, None, None, None, k, True, True, None, None,
                                               variant, 0, 0))
torch.cuda.synchronize()
fields = ("top_indices", "top_values", "bottom_indices", "bottom_values")
print("OK" if all(torch.equal(getattr(got, f), getattr(want, f)) for f in fields) else "WRONG")
PYEOF
  GOOD=""
  for VAR in wgmma mma simple; do
    R=$(timeout 60 $PY /tmp/blens_variant_check.py "$VAR" 2>&1 | tail -1)
    echo "variant $VAR: $R"
    [ "$R" = OK ] && GOOD="$GOOD $VAR"
  done
  # every variant that passed is an implementation of its own (impl="cuda:<variant>"); impl="cuda" (the binding's
  # own choice) only when the variant it picks for bf16 passed
  AUTO=$(timeout 60 $PY -c "import torch, blens_fast._C_cuda as e; print(e.topk_auto_variant(torch.zeros(8, 64, dtype=torch.bfloat16, device='cuda')))" 2>/dev/null | tail -1)
  IMPLS="gemm"
  case " $GOOD " in *" $AUTO "*) IMPLS="$IMPLS,cuda";; esac
  for VAR in $GOOD; do IMPLS="$IMPLS,cuda:$VAR"; done
  IMPLS="$IMPLS,triton,triton:fixed,torch"
  echo "benchmark impls: $IMPLS (the binding picks '${AUTO:-none}' for bf16)"

  echo "== 4. roofline benchmark (left $(left) s)"
  t0=$(date +%s)
  LIMIT=$(( $(left) - 50 ))   # the benchmark starts no new shape after LIMIT s; a started one ends within ~20 s
  [ "$LIMIT" -gt 200 ] && LIMIT=200
  [ "$LIMIT" -lt 30 ] && LIMIT=30
  timeout $(( LIMIT + 45 )) $PY benchmarks/bench_gpu_roofline.py --out "$OUT" --time-limit "$LIMIT" --impls "$IMPLS" 2>&1 \
    | grep -v "^$" | tee "$OUT/bench_stdout.txt" | grep -v "^fraction of GEMM\|^shape \|^gpt\|^(! =" | tail -60
  echo "roofline benchmark rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s"

  echo "== ptxas resources of the projection kernels in this build"
  grep -A2 "Compiling entry function.*topk_\(mma\|wgmma\)_kernel" "$OUT/build_log.txt" | grep -E "entry|registers|spill" \
    | sed 's/ptxas info    : //' | head -24
  ls -la "$OUT" "$OUT/tables" 2>/dev/null
  echo "== 5. summary (total $(elapsed) s)"
  sed -n '/^fraction of GEMM/,$p' "$OUT/bench_stdout.txt" 2>/dev/null | head -20
} 2>&1 | tee "$LOG"
rm -f "$OUT/bench_stdout.txt"
