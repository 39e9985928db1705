#!/usr/bin/env bash
# For a session with a GPU: build the extensions (CUDA included), run the top-k/project tests on
# CUDA (Triton compiled for real, the CUDA kernel run), then the GPU benchmark. Writes to $OUT
# (default ./out/gpu_check). Budget: build ~3-5 min, tests ~1 min, benchmark ~3 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
bash csrc/compile_check.sh > "$OUT/compile_check.txt" 2>&1; echo "compile_check rc=$?" | tee -a "$OUT/summary.txt"
MAX_JOBS="${MAX_JOBS:-8}" python -m pip install --no-build-isolation -e . > "$OUT/build.txt" 2>&1
echo "build rc=$?" | tee -a "$OUT/summary.txt"
python -c "import blens_fast._C_cuda, blens_fast._C; print('extensions ok')" >> "$OUT/summary.txt" 2>&1
python -m pytest -q -x tests/test_topk.py tests/test_project.py -p no:cacheprovider --durations=10 \
  > "$OUT/tests.txt" 2>&1; echo "tests rc=$?" | tee -a "$OUT/summary.txt"
tail -3 "$OUT/tests.txt" >> "$OUT/summary.txt"
# GPT-2 dims, bf16 (the issue's targets: >=1.5x faster than naive at N=16k, <=1.33x cuBLAS GEMM), then GPT-J
timeout 420 python benchmarks/bench_project.py --device cuda --dims gpt2 --dtype bfloat16 \
  --n 1024,16384,65536,262144 --impls gemm,naive,torch,triton,cuda --warmup 2 --repeats 5 --out "$OUT" \
  > "$OUT/bench.txt" 2>&1; echo "bench gpt2 rc=$?" | tee -a "$OUT/summary.txt"
timeout 300 python benchmarks/bench_project.py --device cuda --dims gptj --dtype bfloat16 --n 1024,16384,65536 \
  --impls gemm,naive,triton,cuda --warmup 1 --repeats 3 --out "$OUT" --append \
  >> "$OUT/bench.txt" 2>&1; echo "bench gptj rc=$?" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"
