#!/usr/bin/env bash
# Compile every .cu under csrc/ with nvcc for sm_80 and sm_90 into object files (no torch needed).
# Exits non-zero when a file fails; skips (exit 0) with a message when nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; fi
if [ -z "$NVCC" ]; then
  echo "compile_check: nvcc not found (set NVCC or CUDA_HOME); skipping the CUDA compile check"
  exit 0
fi
OUT="${COMPILE_CHECK_OUT:-$(mktemp -d)}"
status=0
while IFS= read -r -d '' cu; do
  obj="$OUT/$(echo "${cu#./}" | tr '/' '_').o"
  echo "compile_check: $NVCC ${cu#./} -> $obj"
  if ! "$NVCC" -std=c++17 -O3 -Xptxas -v -c "$cu" -o "$obj" \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 2> "$obj.log"; then
    cat "$obj.log"; echo "compile_check: FAILED ${cu#./}"; status=1
  else
    grep -E "registers|spill" "$obj.log" | sort -u | head -20 || true
  fi
done < <(find . -name '*.cu' -print0)
[ $status -eq 0 ] && echo "compile_check: all .cu files compiled for sm_80 and sm_90"
# the Triton kernels too, when triton is installed (ptx/cubin for sm_80 and sm_90, no GPU needed)
if python -c "import triton" 2>/dev/null; then
  (cd .. && env -u TRITON_INTERPRET python -m blens_fast.ops.triton.compile_check) || status=1
fi
exit $status
