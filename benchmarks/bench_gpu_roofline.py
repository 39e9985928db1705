"""The fused vocabulary projection against the GEMM alone, per shape and implementation (issue 15).

    python benchmarks/bench_gpu_roofline.py [--out DIR]         # on a GPU: well under 4 minutes on an H100/H200
    python benchmarks/bench_gpu_roofline.py --smoke [--out DIR] # on the CPU: tiny shapes, impls cpu/torch (plumbing)

Per shape (N in {4096, 16384, 1024}; GPT-J dims d=4096, V=50400 and GPT-2 dims d=768, V=50257; k in {10, 100};
bfloat16; the top-k list, as ``topk_logits``) it times, side by side in one run, with CUDA events
(``triton.testing.do_bench`` medians; it clears the L2 before every call, and the calls rotate over
``--rotate`` input sets besides):

* ``gemm``: ``torch.matmul(h, W.T, out=logits)``, the GEMM alone writing the N x V bf16 logits (the yardstick);
* ``cuda``: ``blens_fast._C_cuda.topk_logits`` (the variant the binding picks: wgmma / mma / simple), and each
  variant (``cuda:wgmma``, ``cuda:mma``, ``cuda:simple``: the first CUDA kernel), implementations of their own for
  ``impl=`` and the tuning table;
* ``triton``: ``triton_topk`` (autotuned), and ``triton:fixed`` (the fixed configuration);
* ``torch``: ``blens_fast.ops.topk.topk_logits(impl="torch")``, the chunked reference.

Before timing, every implementation is checked on the shape: on integer inputs (exact logits, many ties) the fused
kernels' lists (CUDA: top-k, bottom-k and the target counts; Triton: the timed top-k call) must equal the exact
reference (indices and values; the log-sum-exp within 1e-4); on random inputs every implementation must return a
valid top-k of the float32 truth within the fair bar (torch's same-dtype error + 1e-4 (1 + max |logit|)), and the
share of rows whose index list equals the truth's is recorded. An implementation that fails is reported and left
out of the tuning table.

Writes ``DIR/gpu_roofline_<gpu>.json`` (per shape and implementation: ms, TFLOP/s, ``fraction_of_gemm`` = GEMM time
/ implementation time, the check results; a flat ``fraction_of_gemm`` map keyed ``impl|dims|N|k``; the FLOP and
byte floors of each shape from the ceilings measured at the start: an 8192^3 bf16 GEMM and a 4 GiB device copy),
``DIR/gpu_roofline_<gpu>.md`` (the table) and ``DIR/tables/<gpu>.json``, the measured table for
``blens_fast.ops.tuning`` (copy it to ``blens_fast/ops/tables/``). ``--time-limit`` seconds (default 200) bounds the
run: shapes not started by then are listed as skipped. The last lines printed are a short summary table.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import median_seconds, timed  # noqa: E402

from blens_fast.ops import reference, tuning  # noqa: E402
from blens_fast.ops.registry import triton_interpreting  # noqa: E402
from blens_fast.ops.topk import TOPK  # noqa: E402

DIMS = {"gptj": (4096, 50400), "gpt2": (768, 50257)}
SMOKE_DIMS = {"tiny64": (64, 1000), "tiny96": (96, 1003)}


# ------------------------------------------------------------------------------------------------ timing helpers
class Timer:
    """Medians of CUDA-event timings (triton.testing.do_bench) on a GPU, of perf_counter on the CPU."""

    def __init__(self, device, warmup_ms, rep_ms):
        self.cuda = device.type == "cuda"
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        """Median ms of fn(); one call first (compiles, autotunes): a call over 250 ms is timed 3 times, plainly."""
        first = timed(fn, sync=self.sync)[0] * 1e3
        if first > 250 or not self.cuda:
            return median_seconds(fn, 3 if first > 250 else 5, sync=self.sync) * 1e3
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))


def rotating(fn, sets):
    """fn(*set) over the input sets in turn, one set per call."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(sets)
        return fn(*sets[state["i"]])

    return call


def measure_ceilings(timer, device) -> dict:
    """The two ceilings of METHOD.md, measured: a device copy (bytes read + written) and an 8192^3 bf16 GEMM."""
    if device.type != "cuda":
        return {}
    out = {}
    x = torch.empty(1 << 31, dtype=torch.uint8, device=device)  # 2 GiB
    y = torch.empty_like(x)
    ms = timer(lambda: y.copy_(x))
    out["copy_bytes_per_s"] = 2 * x.numel() / (ms * 1e-3)
    del x, y
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(8192, 8192, device=device, generator=g).to(torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, generator=g).to(torch.bfloat16)
    ms = timer(lambda: a @ b)
    out["gemm_flop_per_s"] = 2 * 8192 ** 3 / (ms * 1e-3)
    del a, b
    torch.cuda.empty_cache()
    return out


def floors(n, d, v, k, ceilings) -> dict:
    """FLOP floor and byte floor (ms) of the fused projection and of the GEMM alone."""
    flop = 2 * n * v * d
    fused_bytes = 2 * (n * d + v * d) + n * k * 12 + n * 4   # inputs once; values + indices + lse out
    gemm_bytes = 2 * (n * d + v * d) + 2 * n * v             # + the bf16 logits written
    out = {"flop": flop, "fused_bytes": fused_bytes, "gemm_bytes": gemm_bytes}
    if ceilings:
        out["floor_flop_ms"] = flop / ceilings["gemm_flop_per_s"] * 1e3
        out["floor_fused_bytes_ms"] = fused_bytes / ceilings["copy_bytes_per_s"] * 1e3
        out["floor_gemm_bytes_ms"] = gemm_bytes / ceilings["copy_bytes_per_s"] * 1e3
    return out


# ------------------------------------------------------------------------------------------------ implementations
def _cuda_ext():
    try:
        return importlib.import_module("blens_fast._C_cuda")
    except ImportError:
        return None


def _topk_api():
    from blens_fast.ops import topk as topk_mod

    return topk_mod


def make_impls(device, names, k):
    """name -> (run(h, w, k, top, bottom, targets, tau) -> reference.Lists, exact: which lists the exact check
    compares ('all' = top, bottom, counts; 'top'; None = no exact check))."""
    impls = {}
    ext = _cuda_ext() if device.type == "cuda" else None
    variants = list(ext.topk_variants()) if ext is not None else []
    for name in names:
        if name == "gemm":
            continue
        if name == "cuda" and ext is not None:
            impls[name] = (lambda h, w, k, top, bottom, t=None, tau=None: reference.Lists(
                *ext.topk_logits(h, w, None, None, None, None, None, k, top, bottom, t, tau)), "all")
        elif name.startswith("cuda:") and ext is not None and name[5:] in variants:
            var = name[5:]
            impls[name] = (lambda h, w, k, top, bottom, t=None, tau=None, var=var: reference.Lists(
                *ext.topk_logits_variant(h, w, None, None, None, None, None, k, top, bottom, t, tau, var, 0, 0)),
                "all")
        elif name in ("triton", "triton:fixed") and (device.type == "cuda" or triton_interpreting()):
            from blens_fast.ops.triton.topk import triton_topk

            auto = None if name == "triton" else False
            impls[name] = (lambda h, w, k, top, bottom, t=None, tau=None, auto=auto: reference.Lists(
                *triton_topk(h, w, k=k, top=top, bottom=bottom, target_ids=t, target_logits=tau, autotune=auto)),
                "top")
        elif name in ("torch", "cpu"):
            if name == "cpu" and device.type != "cpu":
                continue
            api = _topk_api()

            def run(h, w, k, top, bottom, t=None, tau=None, impl=name):
                res = api.topk_logits(h, w, k=k, impl=impl)
                return reference.Lists(res.values, res.indices, None, None, res.logsumexp, None)

            # torch's 16-bit GEMM rounds the logits to the dtype: no exact check at large d
            impls[name] = (run, "top" if name == "cpu" else None)
    return impls


# ------------------------------------------------------------------------------------------------ checks
class _no_tf32:
    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


def truth_logits_chunks(h, w, chunk):
    wf = w.float()
    for start in range(0, h.shape[0], chunk):
        with _no_tf32():
            yield start, h[start:start + chunk].float() @ wf.T


def exact_reference(h, w, k, targets, chunk=4096):
    parts = []
    for start, logits in truth_logits_chunks(h, w, chunk):
        t = targets[start:start + chunk]
        tau = logits.gather(1, t[:, None])[:, 0]
        parts.append((reference.select_lists(logits, k, top=True, bottom=True, target_ids=t, target_logits=tau),
                      tau))
    return reference.cat_lists([p for p, _ in parts]), torch.cat([t for _, t in parts])


def check_exact(run, which, h, w, k, ref, targets, tau) -> dict:
    if which == "all":
        res = run(h, w, k, True, True, targets, tau)
        fields = ("top_indices", "top_values", "bottom_indices", "bottom_values", "target_counts")
    else:
        res = run(h, w, k, True, False)
        fields = ("top_indices", "top_values")
    bad = {}
    for field in fields:
        a, r = getattr(res, field), getattr(ref, field)
        rows = int((a != r).reshape(a.shape[0], -1).any(1).sum()) if a is not None else a is None
        if rows:
            bad[field] = int(rows)
    lse_err = float((res.logsumexp.double() - ref.logsumexp.double()).abs().max())
    ok = not bad and lse_err <= 1e-4 * (1 + float(ref.logsumexp.abs().max()))
    return {"exact_ok": ok, "exact_lists": which, "exact_bad_rows": bad, "exact_lse_err": lse_err}


def check_random(results: dict, h, w, k, chunk=4096) -> dict:
    """Valid top-k of the float32 truth within the fair bar, and the share of rows with the truth's exact index
    list, for every implementation's ``results[name] = reference.Lists`` (the truth computed once, by chunks)."""
    acc = {name: {"val": 0.0, "kth": 0.0, "lse": 0.0, "same": 0} for name in results}
    tol = 0.0
    for start, truth in truth_logits_chunks(h, w, chunk):
        rows = slice(start, start + truth.shape[0])
        same_dtype = float(((h[rows] @ w.T).float() - truth).abs().max())
        tol = max(tol, same_dtype + 1e-4 * (1 + float(truth.abs().max())))
        kth = torch.topk(truth, k, dim=1).values[:, -1:]
        lse_truth = torch.logsumexp(truth, 1)
        ref_idx = reference.select_topk(truth, k, True)[1]
        for name, res in results.items():
            a = acc[name]
            picked = truth.gather(1, res.top_indices[rows])
            a["val"] = max(a["val"], float((res.top_values[rows] - picked).abs().max()))
            a["kth"] = max(a["kth"], float((kth - picked).clamp_min(0).max()))
            a["lse"] = max(a["lse"], float((res.logsumexp[rows] - lse_truth).abs().max()))
            a["same"] += int((ref_idx == res.top_indices[rows]).all(1).sum())
        del truth
    return {name: {"random_ok": a["val"] <= tol and a["kth"] <= tol and a["lse"] <= tol, "random_tol": tol,
                   "random_value_err": a["val"], "random_kth_violation": a["kth"], "random_lse_err": a["lse"],
                   "index_equal_fraction": a["same"] / h.shape[0]} for name, a in acc.items()}


# ------------------------------------------------------------------------------------------------ main
def inputs(n, d, v, device, sets, seed, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(sets):
        h = torch.randn(n, d, device=device, generator=g).to(dtype)
        w = (torch.randn(v, d, device=device, generator=g) / math.sqrt(d)).to(dtype)
        out.append((h, w))
    return out


def integer_inputs(n, d, v, device, seed, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randint(-2, 3, (n, d), device=device, generator=g).to(dtype)
    w = torch.randint(-2, 3, (v, d), device=device, generator=g).to(dtype)
    t = torch.randint(0, v, (n,), device=device, generator=g)
    return h, w, t


def software() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "out/gpu_roofline")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (impls cpu, torch): the plumbing")
    p.add_argument("--n", default=None, help="rows, comma-separated (default 4096,16384,1024)")
    p.add_argument("--dims", default=None, help="gptj,gpt2 (default both)")
    p.add_argument("--k", default="10,100")
    p.add_argument("--impls", default="gemm,cuda,cuda:wgmma,cuda:mma,cuda:simple,triton,triton:fixed,torch")
    p.add_argument("--rotate", type=int, default=3, help="input sets the timed calls rotate over")
    p.add_argument("--warmup-ms", type=float, default=10)
    p.add_argument("--rep-ms", type=float, default=40)
    p.add_argument("--time-limit", type=float, default=200, help="seconds; shapes not started by then are skipped")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-table", action="store_true", help="do not write the tuning table")
    p.add_argument("--no-sweep", action="store_true", help="skip the CUDA (splits, group) sweep at the end")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    if args.smoke:
        device = torch.device("cpu")
        dims = SMOKE_DIMS
        ns = [int(x) for x in (args.n or "64,130").split(",")]
        impls_wanted = [x for x in args.impls.split(",") if x in ("gemm", "torch", "cpu", "triton", "triton:fixed")]
        if "cpu" not in impls_wanted:
            impls_wanted.append("cpu")
        if not triton_interpreting():
            impls_wanted = [x for x in impls_wanted if not x.startswith("triton")]
        gpu = "cpu_smoke"
    else:
        if not torch.cuda.is_available():
            print("bench_gpu_roofline: no CUDA GPU here. Run it on a GPU machine (benchmarks/gpu_issue15.sh), or "
                  "use --smoke for a tiny CPU run of the plumbing.", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        dims = {name: DIMS[name] for name in (args.dims or "gptj,gpt2").split(",")}
        ns = [int(x) for x in (args.n or "4096,16384,1024").split(",")]
        impls_wanted = args.impls.split(",")
        gpu = torch.cuda.get_device_name(device)
    ks = [int(x) for x in args.k.split(",")]
    slug = tuning.device_slug(gpu)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(device, args.warmup_ms, args.rep_ms)
    torch.manual_seed(0)

    ext = _cuda_ext() if device.type == "cuda" else None
    header = {"gpu": gpu, "device": str(device), "software": software(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        header.update(sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
        if ext is not None:
            header["cuda_variants"] = list(ext.topk_variants())
            header["cuda_auto_variant_bf16"] = ext.topk_auto_variant(
                torch.zeros(128, 64, dtype=torch.bfloat16, device=device))
        else:
            header["cuda_variants"] = "blens_fast._C_cuda is not built"
    print(f"bench_gpu_roofline: {json.dumps(header)}", flush=True)
    ceilings = measure_ceilings(timer, device)
    if ceilings:
        print(f"ceilings: bf16 GEMM 8192^3 {ceilings['gemm_flop_per_s'] / 1e12:.0f} TFLOP/s, device copy "
              f"{ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)", flush=True)

    shapes, skipped, table_entries = [], [], []
    flat = {}
    for n in ns:
        for dname, (d, v) in dims.items():
            for k in ks:
                label = f"{dname}|N={n}|k={k}"
                if time.perf_counter() - t_start > args.time_limit:
                    skipped.append(label)
                    print(f"== {label}: skipped (time limit)", flush=True)
                    continue
                shape = {"dims": dname, "n": n, "d": d, "v": v, "k": k, "dtype": "bfloat16",
                         **floors(n, d, v, k, ceilings), "impls": {}}
                sets = inputs(n, d, v, device, args.rotate, seed=n + d + k)
                impls = make_impls(device, impls_wanted, k)
                # correctness first: random inputs (also where Triton autotunes), then integer inputs (exact)
                checks = {}
                if not args.no_check:
                    h0, w0 = sets[0]
                    outputs = {}
                    for name, (run, exact) in impls.items():
                        try:
                            outputs[name] = run(h0, w0, k, True, False)
                        except Exception as exc:  # noqa: BLE001 - report and go on
                            checks[name] = {"random_ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
                    checks.update(check_random(outputs, h0, w0, k))
                    del outputs
                    hi, wi, ti = integer_inputs(n, d, v, device, seed=k)
                    ref, tau = exact_reference(hi, wi, k, ti)
                    for name, (run, exact) in impls.items():
                        if exact is None or "error" in checks[name]:
                            continue
                        try:
                            checks[name].update(check_exact(run, exact, hi, wi, k, ref, ti, tau))
                        except Exception as exc:  # noqa: BLE001
                            checks[name].update(exact_ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
                    del hi, wi, ti, ref, tau
                # timing, side by side
                logits = torch.empty(n, v, dtype=torch.bfloat16, device=device)
                gemm_ms = timer(rotating(lambda h, w: torch.matmul(h, w.T, out=logits), sets))
                del logits
                shape["gemm_ms"] = gemm_ms
                shape["gemm_tflops"] = shape["flop"] / (gemm_ms * 1e-3) / 1e12
                line = [f"gemm {gemm_ms:.3f} ms ({shape['gemm_tflops']:.0f} TFLOP/s)"]
                for name, (run, _) in impls.items():
                    rec = dict(checks.get(name, {}))
                    try:
                        ms = timer(rotating(lambda h, w, run=run: run(h, w, k, True, False), sets))
                        rec.update(ms=ms, tflops=shape["flop"] / (ms * 1e-3) / 1e12, fraction_of_gemm=gemm_ms / ms)
                        if name.startswith("triton") and device.type == "cuda":
                            from blens_fast.ops.triton.topk import last_config

                            if name == "triton":
                                rec["config"] = last_config()
                        flat[f"{name}|{dname}|{n}|{k}"] = rec["fraction_of_gemm"]
                        ok = rec.get("random_ok", True) and rec.get("exact_ok", True)
                        line.append(f"{name} {ms:.3f} ms ({rec['fraction_of_gemm']:.2f}x gemm){'' if ok else ' WRONG'}")
                    except Exception as exc:  # noqa: BLE001
                        rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
                        line.append(f"{name} ERROR")
                    shape["impls"][name] = rec
                print(f"== {label}: " + "; ".join(line), flush=True)
                for name, rec in shape["impls"].items():
                    if not (rec.get("random_ok", True) and rec.get("exact_ok", True)) or "error" in rec:
                        print(f"   {name}: check {json.dumps({x: y for x, y in rec.items() if x != 'config'})}",
                              flush=True)
                shapes.append(shape)
                # the tuning table: dispatcher names only, correct ones only
                good = {name: rec["ms"] for name, rec in shape["impls"].items()
                        if "ms" in rec and rec.get("random_ok", True) and rec.get("exact_ok", True)}
                times = {name: ms for name, ms in good.items() if name in TOPK.implementations}
                extra = {name: ms for name, ms in good.items() if name not in times}
                extra["gemm"] = gemm_ms
                if times:
                    table_entries.append(tuning.make_entry("topk", d=d, v=v, n=n, k=k, dtype=torch.bfloat16,
                                                           times_ms=times, extra_ms=extra, lists="top"))
                del sets
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    sweep = []
    if ext is not None and not args.no_sweep:
        sweep = sweep_plan(ext, timer, device, args, t_start)
    result = {**header, "ceilings": ceilings, "shapes": shapes, "skipped": skipped, "fraction_of_gemm": flat,
              "plan_sweep": sweep, "seconds": time.perf_counter() - t_start}
    json_path = out_dir / f"gpu_roofline_{slug}.json"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path = out_dir / f"gpu_roofline_{slug}.md"
    md_path.write_text(markdown(result))
    if table_entries and not args.no_table:
        path = tuning.write_table(gpu, table_entries, root=out_dir / "tables",
                                  meta={"source": "benchmarks/bench_gpu_roofline.py", **header}, merge=False)
        print(f"tuning table: {path} (copy it to blens_fast/ops/tables/)")
    print(f"wrote {json_path} and {md_path} in {result['seconds']:.0f} s")
    print(summary(result))
    bad = [f"{s['dims']}|{s['n']}|{s['k']}|{name}" for s in shapes for name, rec in s["impls"].items()
           if "error" in rec or not (rec.get("random_ok", True) and rec.get("exact_ok", True))]
    if bad:
        print(f"bench_gpu_roofline: FAILED checks: {', '.join(bad)}")
    return 1 if bad else 0


def sweep_plan(ext, timer, device, args, t_start) -> list:
    """The CUDA auto variant at GPT-J dims, k = 10, with the planner's (splits, group) and a few others, while the
    time limit allows: calibrates blens_topk_fast_plan."""
    out = []
    d, v = DIMS["gptj"]
    for n, plans in ((4096, [(0, 0), (4, 32), (8, 32), (8, 8), (2, 32)]),
                     (16384, [(0, 0), (1, 128), (2, 128), (6, 24), (12, 12)])):
        if time.perf_counter() - t_start > args.time_limit - 10:
            break
        sets = inputs(n, d, v, device, args.rotate, seed=7)
        for splits, group in plans:
            run = (lambda h, w, splits=splits, group=group: ext.topk_logits_variant(
                h, w, None, None, None, None, None, 10, True, False, None, None, "auto", splits, group))
            try:
                ms = timer(rotating(run, sets))
                out.append({"n": n, "d": d, "v": v, "k": 10, "splits": splits, "group": group, "ms": ms})
                print(f"plan sweep: N={n} splits={splits or 'auto'} group={group or 'auto'}: {ms:.3f} ms", flush=True)
            except Exception as exc:  # noqa: BLE001
                out.append({"n": n, "splits": splits, "group": group, "error": f"{type(exc).__name__}: {exc}"[:300]})
        del sets
    return out


def markdown(result) -> str:
    lines = [f"# Fused projection vs the GEMM alone on {result['gpu']}", ""]
    sw = result.get("software", {})
    lines.append(f"torch {sw.get('torch')}, CUDA {sw.get('cuda')}, Triton {sw.get('triton')}; "
                 f"CUDA variants {result.get('cuda_variants')}, auto (bf16) {result.get('cuda_auto_variant_bf16')}. "
                 f"Medians of CUDA-event timings (triton.testing.do_bench, L2 cleared per call, inputs rotating), "
                 f"bfloat16, top-k list. fraction = GEMM-alone time / implementation time.")
    c = result.get("ceilings") or {}
    if c:
        lines.append(f"Ceilings measured in the same run: bf16 GEMM 8192^3 {c['gemm_flop_per_s'] / 1e12:.0f} "
                     f"TFLOP/s; device copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write).")
    lines.append("")
    names = []
    for s in result["shapes"]:
        for name in s["impls"]:
            if name not in names:
                names.append(name)
    lines.append("| dims | N | k | FLOP floor ms | byte floor ms (fused / GEMM) | GEMM ms (TFLOP/s) | "
                 + " | ".join(f"{n} ms (TFLOP/s, fraction)" for n in names) + " |")
    lines.append("|" + "---|" * (6 + len(names)))
    for s in result["shapes"]:
        cells = [s["dims"], str(s["n"]), str(s["k"]),
                 f"{s.get('floor_flop_ms', float('nan')):.3f}",
                 f"{s.get('floor_fused_bytes_ms', float('nan')):.3f} / {s.get('floor_gemm_bytes_ms', float('nan')):.3f}",
                 f"{s['gemm_ms']:.3f} ({s['gemm_tflops']:.0f})"]
        for name in names:
            rec = s["impls"].get(name)
            if not rec or "ms" not in rec:
                cells.append("error" if rec else "")
                continue
            ok = rec.get("random_ok", True) and rec.get("exact_ok", True)
            cells.append(f"{rec['ms']:.3f} ({rec['tflops']:.0f}, {rec['fraction_of_gemm']:.2f})" + ("" if ok else " WRONG"))
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("skipped"):
        lines += ["", f"Skipped (time limit): {', '.join(result['skipped'])}"]
    if result.get("plan_sweep"):
        lines += ["", "CUDA auto variant, GPT-J dims, k = 10, by (splits, group) (0 = the planner's choice):", "",
                  "| N | splits | group | ms |", "|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['splits']} | {r['group']} | {r.get('ms', float('nan')):.3f} |"
                  for r in result["plan_sweep"]]
    lines.append("")
    return "\n".join(lines)


def summary(result) -> str:
    names = []
    for s in result["shapes"]:
        for name in s["impls"]:
            if name not in names:
                names.append(name)
    head = f"{'shape':<20}{'gemm ms':>9}" + "".join(f"{n:>14}" for n in names)
    rows = [f"fraction of GEMM-alone throughput ({result['gpu']}):", head]
    for s in result["shapes"]:
        row = f"{s['dims'] + ' N=' + str(s['n']) + ' k=' + str(s['k']):<20}{s['gemm_ms']:>9.3f}"
        for name in names:
            rec = s["impls"].get(name, {})
            if "fraction_of_gemm" in rec:
                ok = rec.get("random_ok", True) and rec.get("exact_ok", True)
                row += f"{rec['fraction_of_gemm']:>13.2f}{'' if ok else '!'}"
            else:
                row += f"{'err' if rec else '-':>14}"
        rows.append(row)
    rows.append("(! = failed its correctness check)")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
