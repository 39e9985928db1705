"""Benchmark the fused top-k vocabulary projection against the naive and chunked torch paths and the
GEMM alone (the floor a fused kernel cannot beat), side by side in one run.

    python benchmarks/bench_project.py --device cpu --dims gpt2 --n 1024,4096,16384 --dtype float32,bfloat16
    python benchmarks/bench_project.py --device cuda --dims gpt2,gptj --n 1024,16384,65536,262144 --dtype bfloat16

Implementations (``--impls``):
  gemm      ``hidden @ weight.T`` in the input dtype, full N x V output (the floor)
  gemm_f32  the float32 GEMM of the same operands upcast beforehand (the CPU floor for 16-bit inputs:
            the C++ kernel multiplies upcast blocks in float32 where the CPU lacks native bf16)
  naive     ``torch.topk(hidden @ weight.T) + logsumexp`` on the full logits
  torch     our chunked torch reference (impl="torch")
  cpu / triton / cuda   our fused kernels; ``cpu@RxV`` runs the C++ kernel with R x V blocks

Timing: each implementation is run ``--warmup`` times, then ``--repeats`` rounds in which every
implementation runs once in turn (round-robin, so a noisy neighbour hits all alike); the median is
reported, and repeating stops early once a single run exceeds ``--max-seconds``.
Peak extra memory: CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call.
CPU: the process's peak resident set (``VmHWM`` in /proc/self/status, reset through
/proc/self/clear_refs) above the resident set before the call -- everything the call touched:
torch tensors, BLAS packing buffers, the C++ kernel's blocks.
Results: ``benchmarks/results/project_<device>.json`` and ``.md`` (appending to earlier records).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIMS = {"gpt2": (768, 50257), "gptj": (4096, 50400)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = open("/proc/cpuinfo").read()
        simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except OSError:
        simd = []
    return f"{model}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, SIMD {'+'.join(simd)}"


# -- memory -------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def measure(fn, device):
    """(seconds, peak extra bytes) of one call."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        extra = torch.cuda.max_memory_allocated() - base
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _rss_kib("VmRSS:")
        except OSError:
            base = None
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        extra = (_rss_kib("VmHWM:") - base) * 1024 if base is not None else float("nan")
    del out
    return dt, extra


# -- implementations ----------------------------------------------------------------------------
def make_impls(names, h, w, k):
    from blens_fast.ops import reference
    from blens_fast.ops import topk as topk_mod
    from blens_fast.ops.topk import topk_logits

    impls = {}
    for name in names:
        if name == "gemm":
            impls[name] = lambda: torch.matmul(h, w.T)
        elif name == "gemm_f32":
            hf, wf = h.float(), w.float()
            impls[name] = lambda hf=hf, wf=wf: torch.matmul(hf, wf.T)
        elif name == "naive":
            impls[name] = lambda: reference.plain_topk(h, w, k=k)
        elif name.startswith("cpu@"):
            rows, vocab = (int(x) for x in name[4:].split("x"))

            def run(rows=rows, vocab=vocab):
                old = topk_mod._CPU_BLOCK_ROWS, topk_mod._CPU_BLOCK_VOCAB
                topk_mod._CPU_BLOCK_ROWS, topk_mod._CPU_BLOCK_VOCAB = rows, vocab
                try:
                    return topk_logits(h, w, k=k, impl="cpu")
                finally:
                    topk_mod._CPU_BLOCK_ROWS, topk_mod._CPU_BLOCK_VOCAB = old
            impls[name] = run
        else:
            impls[name] = lambda name=name: topk_logits(h, w, k=k, impl=name)
    return impls


def bench_case(dims, dtype_name, n, impl_names, args):
    d, v = DIMS[dims]
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype).to(args.device)
    h = torch.randn(n, d, generator=g).to(dtype).to(args.device)
    names = [x for x in impl_names if not (x == "gemm_f32" and dtype == torch.float32)]
    impls = make_impls(names, h, w, args.k)
    times = {name: [] for name in impls}
    mems = {name: [] for name in impls}
    for name, fn in impls.items():
        for _ in range(args.warmup):
            fn()
    for rep in range(args.repeats):
        for name, fn in impls.items():
            if times[name] and max(times[name]) > args.max_seconds:
                continue
            dt, extra = measure(fn, args.device)
            times[name].append(dt)
            mems[name].append(extra)
            print(f"  {dims} {dtype_name} N={n} {name}: {dt:.3f}s extra {extra / 2**20:.1f} MiB", flush=True)
    logits_bytes = n * v * 4
    rows = []
    base = statistics.median(times["gemm"]) if "gemm" in times else None
    base32 = statistics.median(times["gemm_f32"]) if "gemm_f32" in times else base
    for name in impls:
        t = statistics.median(times[name])
        m = max(mems[name])
        rows.append({
            "dims": dims, "d": d, "V": v, "dtype": dtype_name, "N": n, "k": args.k, "impl": name,
            "seconds": t, "runs": len(times[name]), "all_seconds": times[name],
            "vs_gemm": t / base if base else None, "vs_gemm_f32": t / base32 if base32 else None,
            "peak_extra_bytes": m, "extra_vs_logits": m / logits_bytes,
        })
    return rows


def results_stem(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"project_{args.device}{('_' + args.tag) if args.tag else ''}"


def write(rows, args, earlier):
    stem = results_stem(args)
    record = {"machine": machine_name(args.device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "rows": rows}
    try:
        record["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()
    except OSError:
        pass
    records = earlier + [record]
    stem.with_suffix(".json").write_text(json.dumps(records, indent=1))
    lines = [f"# Fused top-k projection benchmark ({args.device})", ""]
    for rec in records:
        lines += [f"## {rec['date']} — {rec['machine']}", "", f"torch {rec['torch']}, args `{' '.join(rec['argv'])}`",
                  "", "| dims | dtype | N | impl | time (s) | vs GEMM | vs fp32 GEMM | peak extra | extra / NxV fp32 logits |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rec["rows"]:
            vs32 = f"{r['vs_gemm_f32']:.3f}" if r["dtype"] != "float32" and r["vs_gemm_f32"] else ""
            vs = f"{r['vs_gemm']:.3f}" if r["vs_gemm"] else ""
            lines.append(f"| {r['dims']} | {r['dtype']} | {r['N']} | {r['impl']} | {r['seconds']:.3f} | {vs} | {vs32} "
                         f"| {r['peak_extra_bytes'] / 2**20:.1f} MiB | {100 * r['extra_vs_logits']:.2f}% |")
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {stem}.json and {stem}.md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dims", default="gpt2", help="comma list of gpt2, gptj")
    p.add_argument("--n", default="1024,2048,4096,8192,16384", help="comma list of row counts")
    p.add_argument("--dtype", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    p.add_argument("--impls", default=None, help="comma list (default: all for the device)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop repeating an impl after a slower run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--append", action="store_true", help="append to an existing results file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    impls = (args.impls.split(",") if args.impls else
             (["gemm", "gemm_f32", "naive", "torch", "cpu"] if args.device == "cpu"
              else ["gemm", "naive", "torch", "triton", "cuda"]))
    stem = results_stem(args)
    earlier = json.loads(stem.with_suffix(".json").read_text()) if args.append and stem.with_suffix(".json").exists() else []
    rows = []
    for dims in args.dims.split(","):
        for dtype_name in args.dtype.split(","):
            for n in (int(x) for x in args.n.split(",")):
                rows += bench_case(dims, dtype_name, n, impls, args)
                write(rows, args, earlier)  # rewritten as rows grow: one record per run
    return rows


if __name__ == "__main__":
    main()
