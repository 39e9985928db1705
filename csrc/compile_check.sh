#!/usr/bin/env bash
# Compile-check the GPU code without a GPU:
#   1. every .cu under csrc/ with nvcc for sm_80, sm_90 and sm_90a (the wgmma code of topk_fast_kernel.cu is only
#      compiled in the sm_90a pass) into object files, with ptxas' resource report per kernel and architecture
#      (registers, spill bytes, stack frame; shared memory comes from the launch, see benchmarks/GPU_NOTES.md), and a
#      check that the SASS holds the tensor-core instructions each main loop is meant to use (HMMA + LDSM for sm_80+,
#      HGMMA for sm_90a; needs cuobjdump, from CUDA or Triton's package);
#   2. a syntax check of the torch bindings (csrc/cuda/*.cpp) against the installed torch's headers (skipped when torch
#      is missing; the c10/cuda cmake-generated header a CPU wheel lacks is stubbed);
#   3. the Triton kernels (blens_fast.ops.triton.compile_check) when triton is installed.
# Exits non-zero when anything fails; skips the CUDA parts (exit 0) with a message when nvcc is absent.
# COMPILE_CHECK_OUT=DIR keeps the objects and logs; COMPILE_CHECK_FAST=1 skips parts 2 and 3.
set -euo pipefail
cd "$(dirname "$0")"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; fi
PY=${PYTHON:-python}
status=0
if [ -z "$NVCC" ]; then
  echo "compile_check: nvcc not found (set NVCC or CUDA_HOME); skipping the CUDA compile check"
else
  OUT="${COMPILE_CHECK_OUT:-$(mktemp -d)}"
  mkdir -p "$OUT"
  CUOBJDUMP="$(command -v cuobjdump || true)"
  if [ -z "$CUOBJDUMP" ]; then
    CUOBJDUMP="$($PY -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
    [ -x "$CUOBJDUMP" ] || CUOBJDUMP=""
  fi
  # the nvcc flags setup.py builds with (their one definition), plus the sm_90a image and ptxas' report
  read -r -a NVCC_FLAGS <<< "$($PY -c 'import runpy; print(" ".join(runpy.run_path("../blens_fast/ops/build_flags.py")["NVCC_FLAGS"]))')"
  while IFS= read -r -d '' cu; do
    obj="$OUT/$(echo "${cu#./}" | tr '/' '_').o"
    echo "compile_check: $NVCC ${cu#./} -> $obj"
    if ! "$NVCC" -std=c++17 "${NVCC_FLAGS[@]}" -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -c "$cu" -o "$obj" \
        2> "$obj.log"; then
      cat "$obj.log"; echo "compile_check: FAILED ${cu#./}"; status=1; continue
    fi
    grep -iE "warning|advisory|serializ" "$obj.log" | grep -v "ptxas info" | sed 's/^/compile_check:   /' || true
    # one line per kernel and architecture: registers, spills, stack (kernels whose body is empty there are omitted)
    awk -F"'" '/Compiling entry function/ { fn = $2; arch = $4 }
         /bytes stack frame/ { split($0, w, " "); stack = w[1]; spills = w[5] + w[9] }
         /Used [0-9]+ registers/ { n = split($0, w, " "); for (i = 1; i < n; ++i) if (w[i] == "Used") regs = w[i + 1];
           if (regs + 0 > 8) printf "%s %s regs=%s spill_bytes=%s stack=%s\n", arch, fn, regs, spills, stack }' \
      "$obj.log" > "$obj.res"
    if command -v c++filt > /dev/null; then
      while read -r arch fn rest; do printf 'compile_check:   %-6s %-70s %s\n' "$arch" "$(echo "$fn" | c++filt | cut -c1-70)" "$rest"; done < "$obj.res"
    else
      sed 's/^/compile_check:   /' "$obj.res"
    fi
    if awk '{ split($4, a, "="); if (a[2] + 0 > 0) bad = 1 } END { exit !bad }' "$obj.res"; then
      echo "compile_check: WARNING ${cu#./} spills registers (see $obj.log)"
    fi
    # the tensor-core instructions each main loop is meant to use
    if [ -n "$CUOBJDUMP" ] && grep -q "topk_mma_kernel" "$obj.log"; then
      "$CUOBJDUMP" --dump-sass "$obj" > "$obj.sass" 2>&1 || true
      for want in "topk_mma_kernel:HMMA.16816" "topk_mma_kernel:LDSM" "topk_mma_kernel:LDGSTS" "topk_wgmma_kernel:HGMMA.64x128x16"; do
        fn="${want%%:*}"; op="${want#*:}"
        n=$(awk -v f="$fn" '/Function :/ { p = index($0, f) > 0 } p' "$obj.sass" | grep -c "$op" || true)
        if [ "$n" -gt 0 ]; then echo "compile_check:   SASS: $fn has $n x $op"
        else echo "compile_check:   SASS: $fn has no $op: FAILED"; status=1; fi
      done
      if awk '/Function :/ { p = index($0, "topk_mma_kernel") > 0 || index($0, "topk_wgmma_kernel") > 0 } p' "$obj.sass" | grep -qE "[^A-Z](STL|LDL)[. ]"; then
        echo "compile_check:   SASS: local memory traffic in a fast kernel (STL/LDL): WARNING"
      fi
    fi
  done < <(find . -name '*.cu' -print0 | sort -z)
  [ $status -eq 0 ] && echo "compile_check: all .cu files compiled for sm_80, sm_90 and sm_90a"

  if [ "${COMPILE_CHECK_FAST:-0}" != 1 ] && $PY -c "import torch" 2>/dev/null; then
    CUDA_INC="$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include"
    [ -f "$CUDA_INC/cuda_runtime.h" ] || CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"
    STUB="$OUT/stub_include"
    mkdir -p "$STUB/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
    TORCH_INC=$($PY -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
    PY_INC=$($PY -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])")
    for cpp in cuda/*.cpp; do
      # torch's own cmake header wins when it exists (the stub directory comes last)
      if c++ -std=c++20 -fsyntax-only $TORCH_INC -I"$CUDA_INC" -I"$STUB" $PY_INC -DTORCH_EXTENSION_NAME=_C_cuda \
          -DTORCH_API_INCLUDE_EXTENSION_H "$cpp" 2> "$OUT/$(basename "$cpp").log"; then
        echo "compile_check: torch binding $cpp: syntax ok"
      else
        grep -E "error" "$OUT/$(basename "$cpp").log" | head -20; echo "compile_check: FAILED $cpp"; status=1
      fi
    done
  fi
fi
# the Triton kernels too, when triton is installed (ptx/cubin for sm_80 and sm_90, no GPU needed)
if [ "${COMPILE_CHECK_FAST:-0}" != 1 ] && $PY -c "import triton" 2>/dev/null; then
  (cd .. && env -u TRITON_INTERPRET $PY -m blens_fast.ops.triton.compile_check) || status=1
fi
exit $status
