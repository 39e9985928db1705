#!/usr/bin/env bash
# The whole GPU check in one prepared run: about 9 minutes on an H100/H200, so it fits one device `run` call with
# timeout_s=600. Stages, in order:
#   info      the GPU and the software, and a 5-second probe: does the driver run the sm_90a image when a fatbinary
#             holds both sm_90 and sm_90a? (decides how the build adds sm_90a, for the wgmma kernel)
#   build     both extensions with sm_90a (setup.py + NVCC_APPEND_FLAGS when the driver prefers sm_90a; otherwise a
#             throwaway copy of the sources with sm_90 replaced by sm_90a, its .so files copied back); ptxas'
#             register and spill report of the projection kernels
#   tests     the tests that run only on a GPU (skipped on a CPU) and the GPU paths of the others: every test whose
#             name, file or parametrization says cuda, triton or gpu, and those named in GPU_TESTS_BY_NAME
#             (tests/kernels/test_gpu_kernels.py: each CUDA variant and Triton config; the CUDA/Triton projection;
#             the batched ranks on the GPU; the statistics' Triton update; ...). A new GPU-only test joins by name.
#   roofline  each CUDA variant checked in its own process (a crash or hang stays there), then
#             benchmarks/bench_gpu_roofline.py: every implementation beside the GEMM alone, the tuning table
#   lens      the GPT-J-dims lens end to end: one batch's projection per implementation
#             (benchmarks/profile_projection.py), then `blens bench --model gpt-j --device cuda` over --prompts
#             CounterFact prompts: time and peak memory per stage, agreement with the naive way on 1 prompt
#   training  the training lens's cost on the GPU (benchmarks/bench_training_lens.py cost --device cuda): step time
#             with and without the lens at every=10 and every=1, the extra peak of allocated memory; optional: no
#             earlier stage gives up time for it, it runs in what they leave (skipped when under its minimum)
# Each stage is time-boxed: it gets its own box, and never so much that the later stages would lose their minimum
# within BUDGET seconds for the whole run; a stage whose minimum no longer fits is skipped and says so.
# Results under OUT: gpu_check_log.txt (all that is printed), <stage>_*.log (each command's full output),
# stages.tsv (stage, exit code, seconds, box), gpu_roofline_<gpu>.{json,md}, tables/<gpu>.json (copy to
# blens_fast/ops/tables/), profile_projection_cuda.{json,md}, bench_cuda_gpt-j_bfloat16.{json,md,png},
# training_lens_cost_cuda.{json,md}.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--stages info,build,tests,roofline,lens,training]
#                                [--prompts N] [--test-workers N] [--dry-run]
# --dry-run prints the plan (stages, boxes, commands) and runs nothing: it needs no GPU. Exit code: 0 when every stage
# that ran ended with 0, 1 otherwise, 2 for bad arguments or no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-out/gpu_check}
BUDGET=${BUDGET:-560}
STAGES=info,build,tests,roofline,lens,training
PROMPTS=""
TEST_WORKERS=4
DRY=0
ALL_STAGES="info build tests roofline lens training"
# per stage: its box, the least it needs, and what it took on an H100 (the dry run's clock)
# (training: not yet run on a GPU; its typical time is an estimate)
declare -A BOX=([info]=30 [build]=220 [tests]=150 [roofline]=160 [lens]=200 [training]=120)
declare -A MIN=([info]=10 [build]=90 [tests]=60 [roofline]=90 [lens]=100 [training]=40)
declare -A TYPICAL=([info]=10 [build]=100 [tests]=100 [roofline]=160 [lens]=190 [training]=70)
OPTIONAL="training"  # stages for which no earlier stage keeps time back

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
fail_usage() { echo "gpu_check.sh: $1 (see --help)" >&2; exit 2; }
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || fail_usage "$1 $2: expected a positive integer"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || fail_usage "--out needs a folder"; OUT=$2; shift 2 ;;
    --budget) [ $# -ge 2 ] || fail_usage "--budget needs seconds"; positive "$1" "$2"; BUDGET=$2; shift 2 ;;
    --stages) [ $# -ge 2 ] || fail_usage "--stages needs a list"; STAGES=$2; shift 2 ;;
    --prompts) [ $# -ge 2 ] || fail_usage "--prompts needs a number"; positive "$1" "$2"; PROMPTS=$2; shift 2 ;;
    --test-workers) [ $# -ge 2 ] || fail_usage "--test-workers needs a number"; positive "$1" "$2"
                    TEST_WORKERS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) fail_usage "unknown argument '$1'" ;;
  esac
done
SELECTED=()
for stage in ${STAGES//,/ }; do
  [[ " $ALL_STAGES " == *" $stage "* ]] \
    || fail_usage "--stages: unknown stage '$stage' (expected some of ${ALL_STAGES// /,})"
  SELECTED+=("$stage")
done
[ ${#SELECTED[@]} -gt 0 ] || fail_usage "--stages: no stage given"
if [ "$DRY" = 0 ] && ! command -v nvidia-smi > /dev/null; then
  echo "gpu_check.sh: no nvidia-smi here: this check needs a CUDA GPU (--dry-run prints the plan anywhere)" >&2
  exit 2
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PATH:${CUDA_HOME:-/usr/local/cuda}/bin"
PY=${PYTHON:-python3}
T0=$(date +%s)
DRY_CLOCK=0  # seconds the dry run pretends have passed
now() { if [ "$DRY" = 1 ]; then echo $(( T0 + DRY_CLOCK )); else date +%s; fi; }
left() { echo $(( BUDGET - $(now) + T0 )); }
selected() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }

# the seconds a stage may take now: its box, less what the selected later stages need at least
limit_for() {
  local stage=$1 reserve=0 later=0 s
  for s in $ALL_STAGES; do
    [ "$s" = "$stage" ] && { later=1; continue; }
    [ "$later" = 1 ] && selected "$s" && [[ " $OPTIONAL " != *" $s "* ]] && reserve=$(( reserve + MIN[$s] ))
  done
  local limit=$(( $(left) - reserve ))
  [ "$limit" -gt "${BOX[$stage]}" ] && limit=${BOX[$stage]}
  echo "$limit"
}

# step SECONDS LOG COMMAND...: the command under `timeout`, its whole output in OUT/LOG, the tail printed
step() {
  local seconds=$1 log=$2; shift 2
  if [ "$DRY" = 1 ]; then echo "  [<= ${seconds} s] $(printf '%q ' "$@")"; return 0; fi
  if [ "$seconds" -lt 5 ]; then echo "skipped: no time left in this stage for $log"; return 124; fi
  local t0 rc; t0=$(date +%s)
  timeout "$seconds" "$@" > "$OUT/$log" 2>&1; rc=$?
  tail -n "${TAIL:-25}" "$OUT/$log"
  [ "$rc" = 124 ] && echo "(stopped at its limit of $seconds s)"
  echo "-> rc=$rc in $(( $(date +%s) - t0 )) s ($log)"
  return "$rc"
}

stage_info() {
  step 20 info_versions.log bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
--format=csv; $PY -c \"import torch, triton, transformers; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'capability', \
torch.cuda.get_device_capability())\"; nvcc --version | tail -2; git rev-parse --short HEAD"
  mkdir -p "$OUT/probe"
  cat > "$OUT/probe/probe.cu" <<'EOF'
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
  step 60 info_probe.log bash -c "nvcc -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
-gencode=arch=compute_90a,code=sm_90a '$OUT/probe/probe.cu' -o '$OUT/probe/probe' && '$OUT/probe/probe'"
  PROBE=$(tail -n 1 "$OUT/info_probe.log" 2>/dev/null)
  echo "probe: a fatbinary with sm_80 + sm_90 + sm_90a images ran the image of: ${PROBE:-?} (901 = sm_90a, 900 = sm_90)"
}

stage_build() {
  local limit=$1 probe rc=0
  probe=$(tail -n 1 "$OUT/info_probe.log" 2>/dev/null)
  if [ "$probe" = 901 ] || [ "$DRY" = 1 ]; then
    echo "build: setup.py + NVCC_APPEND_FLAGS=sm_90a (when the driver prefers sm_90a; otherwise a copy of the"
    echo "       sources with sm_90 replaced by sm_90a in blens_fast/ops/build_flags.py, its .so files copied back)"
    step "$limit" build_log.txt env NVCC_APPEND_FLAGS="-gencode=arch=compute_90a,code=sm_90a -Xptxas -v" \
      MAX_JOBS=16 "$PY" setup.py build_ext --inplace || rc=$?
  else
    echo "build: a copy of the sources with sm_90 replaced by sm_90a (the driver did not prefer sm_90a: $probe)"
    rm -rf /tmp/blens_gpu_build && mkdir -p /tmp/blens_gpu_build
    tar -C "$ROOT" --exclude=./out --exclude=./.cache --exclude=./build --exclude=./.git -cf - . \
      | tar -C /tmp/blens_gpu_build -xf -
    sed -i 's/compute_90,code=sm_90"/compute_90a,code=sm_90a"/' /tmp/blens_gpu_build/blens_fast/ops/build_flags.py
    grep -n "gencode" /tmp/blens_gpu_build/blens_fast/ops/build_flags.py
    (cd /tmp/blens_gpu_build && step "$limit" build_log.txt env NVCC_APPEND_FLAGS="-Xptxas -v" MAX_JOBS=16 \
      "$PY" setup.py build_ext --inplace) && cp /tmp/blens_gpu_build/blens_fast/_C*.so "$ROOT/blens_fast/" || rc=$?
  fi
  step 60 build_check.log "$PY" -c "import torch, blens_fast._C, blens_fast._C_cuda as ext
w = torch.zeros(256, 64, dtype=torch.bfloat16, device='cuda')
print('extensions ok; CUDA projection variants:', list(ext.topk_variants()),
      'auto for bf16:', ext.topk_auto_variant(w))" \
    || rc=$?
  if [ "$DRY" = 0 ]; then
    echo "ptxas resources of the projection kernels:"
    grep -A2 "Compiling entry function.*topk_\(mma\|wgmma\)_kernel" "$OUT/build_log.txt" \
      | grep -E "entry|registers|spill" | sed 's/ptxas info    : //' | head -24
  fi
  return "$rc"
}

# GPU paths are found by name (cuda, triton or gpu in the test's name, file or parameters), and these by hand
GPU_TESTS_BY_NAME="test_impls_agree_and_tables"
stage_tests() {
  step "$1" tests.log "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -n "$TEST_WORKERS" tests \
    -k "cuda or triton or gpu or ${GPU_TESTS_BY_NAME// / or }" -rs --durations=10
}

stage_roofline() {
  local limit=$1 t0 good="" auto impls variant result
  t0=$(now)
  cat > "$OUT/variant_check.py" <<'EOF'
import sys, torch, blens_fast._C_cuda as ext
from blens_fast.ops import topk_reference
variant = sys.argv[1]
g = torch.Generator().manual_seed(0)
n, d, v, k = 1000, 256, 5003, 37
h = torch.randint(-2, 3, (n, d), generator=g).to(torch.bfloat16).cuda()
w = torch.randint(-2, 3, (v, d), generator=g).to(torch.bfloat16).cuda()
want = topk_reference.select(h.float() @ w.float().T, k, top=True, bottom=True)
got = topk_reference.Selection(*ext.topk_logits_variant(h, w, None, None, None, None, None, k, True, True, None, None,
                                                        variant, 0, 0))
torch.cuda.synchronize()
fields = ("top_indices", "top_values", "bottom_indices", "bottom_values")
print("OK" if all(torch.equal(getattr(got, f), getattr(want, f)) for f in fields) else "WRONG")
EOF
  for variant in wgmma mma simple; do
    TAIL=1 step 40 "roofline_variant_$variant.log" "$PY" "$OUT/variant_check.py" "$variant"
    result=$(tail -n 1 "$OUT/roofline_variant_$variant.log" 2>/dev/null)
    echo "variant $variant: ${result:-?}"
    [ "$result" = OK ] && good="$good $variant"
  done
  # every variant that passed is an implementation of its own (impl="cuda:<variant>"); impl="cuda" (the binding's
  # own choice) only when the variant it picks for bf16 passed
  impls=gemm
  for variant in $good; do impls="$impls,cuda:$variant"; done
  auto=$(timeout 60 "$PY" -c "import torch, blens_fast._C_cuda as e; print(e.topk_auto_variant(torch.zeros(8, 64, dtype=torch.bfloat16, device='cuda')))" 2>/dev/null | tail -n 1)
  case " $good " in *" $auto "*) impls="$impls,cuda";; esac
  impls="$impls,triton,triton:fixed,torch"
  [ "$DRY" = 1 ] && impls="gemm,cuda:<each variant that passed>,cuda,triton,triton:fixed,torch"
  echo "benchmark impls: $impls (the binding picks '${auto:-none}' for bf16)"
  # the benchmark starts no new shape after --time-limit; a started one ends within about 20 s
  local rest=$(( limit - $(now) + t0 ))
  local bench_limit=$(( rest - 45 )); [ "$bench_limit" -lt 20 ] && bench_limit=20
  TAIL=30 step "$rest" roofline_bench.log "$PY" benchmarks/bench_gpu_roofline.py --out "$OUT" \
    --time-limit "$bench_limit" --impls "$impls"
}

stage_lens() {
  local limit=$1 t0 prompts rc=0
  t0=$(now)
  step 45 lens_profile_projection.log "$PY" benchmarks/profile_projection.py --model gpt-j --depth 2 --device cuda \
    --prompts 64 --impls auto,cuda,triton,torch --out "$OUT" || rc=$?
  local rest=$(( limit - $(now) + t0 ))
  [ "$DRY" = 1 ] && rest=$(( limit - 45 ))
  # at GPT-J dims on an H100: building the model ~20 s, blens_fast ~0.06 s a prompt, the naive way ~60 s (1 prompt)
  prompts=${PROMPTS:-$( [ "$rest" -ge 140 ] && echo 1000 || { [ "$rest" -ge 100 ] && echo 300 || echo 100; } )}
  TAIL=40 step "$rest" lens_bench.log "$PY" -m blens_fast.cli bench --model gpt-j --device cuda --dtype bfloat16 \
    --prompts "$prompts" --naive-prompts 1 --batch-size 4 --max-tokens 64 --quiet --out "$OUT" || rc=$?
  return "$rc"
}

stage_training() {
  TAIL=30 step "$1" training_bench.log "$PY" benchmarks/bench_training_lens.py cost --device cuda \
    --models default,gpt2-small --threads-list 1 --rounds 2 --out "$OUT"
}

run_stages() {
  echo "== gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) at $(git rev-parse --short HEAD 2>/dev/null) (+ working tree);" \
    "budget $BUDGET s; stages ${SELECTED[*]}; results in $OUT"
  [ "$DRY" = 1 ] && echo "(dry run: the plan only, nothing runs; each stage is assumed to take what it took on an" \
    "H100: $(for s in $ALL_STAGES; do printf '%s %s s, ' "$s" "${TYPICAL[$s]}"; done | sed 's/, $//'))"
  printf "stage\trc\tseconds\tbox\n" > "$OUT/stages.tsv"
  local stage limit t0 rc
  for stage in $ALL_STAGES; do
    selected "$stage" || continue
    limit=$(limit_for "$stage")
    if [ "$limit" -lt "${MIN[$stage]}" ]; then
      echo "== $stage: skipped ($(left) s left of the budget; it needs at least ${MIN[$stage]} s)"
      printf "%s\tskipped\t0\t%s\n" "$stage" "$limit" >> "$OUT/stages.tsv"
      continue
    fi
    echo "== $stage (box $limit s; $(left) s left of the budget)"
    t0=$(now)
    "stage_$stage" "$limit"; rc=$?
    if [ "$DRY" = 1 ]; then
      rc=plan
      DRY_CLOCK=$(( DRY_CLOCK + (TYPICAL[$stage] < limit ? TYPICAL[$stage] : limit) ))
    fi
    printf "%s\t%s\t%s\t%s\n" "$stage" "$rc" "$(( $(now) - t0 ))" "$limit" >> "$OUT/stages.tsv"
  done
  echo "== summary (total $(( $(now) - T0 )) s)"
  column -t -s $'\t' "$OUT/stages.tsv" 2>/dev/null || cat "$OUT/stages.tsv"
  [ "$DRY" = 1 ] && return 0
  sed -n '/^fraction of GEMM/,$p' "$OUT/roofline_bench.log" 2>/dev/null | head -20
  ls -la "$OUT"
  [ -d "$OUT/tables" ] && ls -la "$OUT/tables"
  # the exit code: 0 when every stage that ran ended with 0
  ! awk -F'\t' 'NR > 1 && $2 != 0 && $2 != "skipped" { bad = 1 } END { exit !bad }' "$OUT/stages.tsv"
}

run_stages 2>&1 | tee "$OUT/gpu_check_log.txt"
exit "${PIPESTATUS[0]}"
