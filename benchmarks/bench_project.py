"""Benchmark the fused top-k vocabulary projection against the naive and chunked torch paths and the
GEMM alone (the floor a fused kernel cannot beat), side by side in one run.

    python benchmarks/bench_project.py --device cpu --dims gpt2 --n 1024,4096,16384 --dtype float32,bfloat16 --threads 2
    python benchmarks/bench_project.py --device cuda --dims gpt2,gptj --n 1024,16384,65536,262144 --dtype bfloat16

Implementations (``--impls``):
  gemm      ``hidden @ weight.T`` in the input dtype, full N x V output (the floor)
  gemm_f32  the float32 GEMM of the same operands upcast beforehand (the CPU floor for 16-bit inputs:
            the C++ kernel multiplies upcast blocks in float32 where the CPU lacks native bf16)
  naive     ``torch.topk(hidden @ weight.T) + logsumexp`` on the full logits
  torch     our chunked torch reference (impl="torch")
  cpu / triton / cuda   our fused kernels; ``cpu@RxV`` runs the C++ kernel with R x V blocks and ``cpu@RxVxM``
            also with GEMM mode M (:class:`blens_fast.ops.topk.CpuTuning`; 0 = chosen from the shapes)

Timing: each implementation is run ``--warmup`` times, then ``--repeats`` rounds in which every
implementation runs once in turn (round-robin, so a noisy neighbour hits all alike); the median is
reported, and repeating stops early once a single run exceeds ``--max-seconds``.
Peak extra memory: CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call.
CPU: the process's peak resident set (``VmHWM`` in /proc/self/status, reset through
/proc/self/clear_refs) above the resident set before the call -- everything the call touched:
torch tensors, BLAS packing buffers, the C++ kernel's blocks.
Results: ``project_<device>.json`` and ``.md`` in ``--out`` (``--append``: after the earlier records there).
"""
from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time

import torch
from _common import RESULTS, machine_description, markdown_table, parser, setup, timed

from blens_fast._io import atomic_write_json, atomic_write_text
from blens_fast.bench.meter import read_status_bytes, reset_rss_peak
from blens_fast.ops.topk_reference import logits_block
from blens_fast.ops.topk import CpuTuning, topk_logits

def plain_topk(hidden, weight, bias=None, *, k=10, largest=True):
    """What one writes without thinking, the benchmark's "naive" baseline: ``torch.topk(hidden @ weight.T)`` plus
    ``logsumexp`` (no tie rule, so never a test reference)."""
    logits = logits_block(hidden, weight, bias)
    values, indices = torch.topk(logits, k, dim=-1, largest=largest)
    return values, indices, torch.logsumexp(logits, dim=-1)


DIMS = {"gpt2": (768, 50257), "gptj": (4096, 50400)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def simd(device: str) -> str:
    """The CPU's vector extensions that matter for 16-bit GEMMs (empty on a GPU or where unknown)."""
    if device == "cuda":
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return ""
    return "+".join(flag for flag in SIMD_FLAGS if f" {flag}" in flags)


def measure(fn, device: str) -> tuple[float, float]:
    """``(seconds, peak extra bytes)`` of one call (module docstring)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds, out = timed(fn, sync=torch.cuda.synchronize)
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = reset_rss_peak()
        seconds, out = timed(fn)
        extra = read_status_bytes("VmHWM") - base if base is not None else float("nan")
    del out
    return seconds, extra


def make_impls(names, h, w, k) -> dict:
    impls = {}
    for name in names:
        if name == "gemm":
            impls[name] = lambda: torch.matmul(h, w.T)
        elif name == "gemm_f32":
            hf, wf = h.float(), w.float()
            impls[name] = lambda hf=hf, wf=wf: torch.matmul(hf, wf.T)
        elif name == "naive":
            impls[name] = lambda: plain_topk(h, w, k=k)
        elif name.startswith("cpu@"):
            tuning = CpuTuning(*(int(x) for x in name[4:].split("x")))
            impls[name] = lambda tuning=tuning: topk_logits(h, w, k=k, impl="cpu", tuning=tuning)
        else:
            impls[name] = lambda name=name: topk_logits(h, w, k=k, impl=name)
    return impls


def bench_case(dims, dtype_name, n, impl_names, args) -> list[dict]:
    d, v = DIMS[dims]
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype).to(args.device)
    h = torch.randn(n, d, generator=g).to(dtype).to(args.device)
    names = [x for x in impl_names if not (x == "gemm_f32" and dtype == torch.float32)]
    impls = make_impls(names, h, w, args.k)
    times = {name: [] for name in impls}
    mems = {name: [] for name in impls}
    for fn in impls.values():
        for _ in range(args.warmup):
            fn()
    for _ in range(args.repeats):
        for name, fn in impls.items():
            if times[name] and max(times[name]) > args.max_seconds:
                continue
            seconds, extra = measure(fn, args.device)
            times[name].append(seconds)
            mems[name].append(extra)
            print(f"  {dims} {dtype_name} N={n} {name}: {seconds:.3f}s extra {extra / 2**20:.1f} MiB", flush=True)
    logits_bytes = n * v * 4
    base = statistics.median(times["gemm"]) if "gemm" in times else None
    base32 = statistics.median(times["gemm_f32"]) if "gemm_f32" in times else base
    rows = []
    for name in impls:
        t = statistics.median(times[name])
        m = max(mems[name])
        rows.append({"dims": dims, "d": d, "V": v, "dtype": dtype_name, "N": n, "k": args.k, "impl": name,
                     "seconds": t, "runs": len(times[name]), "all_seconds": times[name],
                     "vs_gemm": t / base if base else None, "vs_gemm_f32": t / base32 if base32 else None,
                     "peak_extra_bytes": m, "extra_vs_logits": m / logits_bytes})
    return rows


def _table(rows) -> str:
    def ratio(value, show=True):
        return f"{value:.3f}" if show and value else ""

    return markdown_table([{"dims": r["dims"], "dtype": r["dtype"], "N": r["N"], "impl": r["impl"],
                            "time (s)": f"{r['seconds']:.3f}", "vs GEMM": ratio(r["vs_gemm"]),
                            "vs fp32 GEMM": ratio(r["vs_gemm_f32"], r["dtype"] != "float32"),
                            "peak extra": f"{r['peak_extra_bytes'] / 2**20:.1f} MiB",
                            "extra / NxV fp32 logits": f"{100 * r['extra_vs_logits']:.2f}%"} for r in rows])


def results_stem(args):
    return args.out / f"project_{args.device}{('_' + args.tag) if args.tag else ''}"


def git_revision() -> str | None:
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent, capture_output=True,
                               text=True)
    except OSError:
        return None
    return found.stdout.strip() if found.returncode == 0 else None


def write(rows, args, earlier) -> None:
    stem = results_stem(args)
    record = {"machine": machine_description(args.device), "simd": simd(args.device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "rows": rows}
    record["git"] = git_revision()
    records = earlier + [record]
    atomic_write_json(stem.with_suffix(".json"), records)
    lines = [f"# Fused top-k projection benchmark ({args.device})", ""]
    for rec in records:
        simd_text = f", SIMD {rec['simd']}" if rec.get("simd") else ""
        lines += [f"## {rec['date']} — {rec['machine']}{simd_text}", "",
                  f"torch {rec['torch']}, args `{' '.join(rec['argv'])}`", "", _table(rec["rows"]), ""]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(lines))
    print(f"wrote {stem}.json and {stem}.md")


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dims", default="gpt2", help="comma list of gpt2, gptj")
    p.add_argument("--n", default="1024,2048,4096,8192,16384", help="comma list of row counts")
    p.add_argument("--dtype", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    p.add_argument("--impls", default=None, help="comma list (default: all for the device)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop repeating an impl after a slower run")
    p.add_argument("--tag", default="")
    p.add_argument("--append", action="store_true", help="append to an existing results file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    setup(args)
    impls = (args.impls.split(",") if args.impls else
             (["gemm", "gemm_f32", "naive", "torch", "cpu"] if args.device == "cpu"
              else ["gemm", "naive", "torch", "triton", "cuda"]))
    existing = results_stem(args).with_suffix(".json")
    earlier = json.loads(existing.read_text()) if args.append and existing.exists() else []
    rows = []
    for dims in args.dims.split(","):
        for dtype_name in args.dtype.split(","):
            for n in (int(x) for x in args.n.split(",")):
                rows += bench_case(dims, dtype_name, n, impls, args)
                write(rows, args, earlier)  # rewritten as rows grow: one record per run
    return rows


if __name__ == "__main__":
    main()
