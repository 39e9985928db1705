"""Compile the Triton kernels for sm_80 and sm_90 without a GPU (ptx + cubin through triton's ptxas).

    python -m blens_fast.ops.triton.compile_check [--quick]

Compiles the fixed configuration of four list/count combinations (both lists and the counts: the most registers;
one list; ranks only) and every configuration of the autotuning space (:data:`TUNE_CONFIGS`, pruned per KP as the
autotuner prunes it) for a representative KP of each size class, for sm_80 and sm_90, and prints each kernel's
registers, spills and shared memory. ``--quick`` compiles the tuning space for sm_90 only. Must run without
TRITON_INTERPRET (the interpreter replaces the jit functions); exits non-zero on failure.
"""
from __future__ import annotations

import os
import sys
import time

from ..registry import triton_interpreting


def _signature(dt: str) -> dict:
    sig = {name: "*fp32" for name in ("B", "RA", "RC", "NW", "NB", "TLOG", "OUT_M", "OUT_S")}
    sig.update(H=f"*{dt}", W=f"*{dt}", TID="*i64", OUT_TOP="*i64", OUT_BOT="*i64", OUT_CNT="*i32")
    sig.update({n: "i32" for n in ("N", "V", "D", "stride_hn", "stride_hd", "stride_wv", "stride_wd", "splits_req",
                                   "target_programs", "n_bucket")})
    return sig


def _compile(kernel, dt, k, kp, top, bottom, count, block, warps, stages, cap):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bm, bn, bk, gm = block
    sig = _signature(dt)
    consts = dict(K=k, KP=kp, TOP=top, BOTTOM=bottom, COUNT=count, HAS_BIAS=True, PROLOGUE=True, HAS_NW=True,
                  HAS_NB=True, PRECISION="ieee", UPCAST_DOT=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm)
    sig.update({c: "constexpr" for c in consts})
    options = {"num_warps": warps}
    if stages is not None:
        options["num_stages"] = stages
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                          target=GPUTarget("cuda", cap, 32), options=options)


def _cuobjdump() -> str | None:
    import shutil

    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _report(kernel) -> str:
    """Shared memory from the compile metadata; registers and stack (spills) from the cubin via cuobjdump."""
    import re
    import subprocess
    import tempfile

    out = f"{kernel.metadata.shared} bytes shared memory"
    tool = _cuobjdump()
    if tool is None:
        return out
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if found:
        regs, stack = int(found.group(1)), int(found.group(2))
        out += f", {regs} registers, {stack} bytes stack" + (" (spills)" if stack else "")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if triton_interpreting():
        print("compile_check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    quick = "--quick" in argv

    from .topk import TUNE_CONFIGS, _config, _prune_configs, _topk_kernel

    failures = 0

    def attempt(what, **kw):
        nonlocal failures
        start = time.perf_counter()
        try:
            kernel = _compile(_topk_kernel, **kw)
            print(f"compile_check: triton _topk_kernel {what} sm_{kw['cap']}: ok, {_report(kernel)} "
                  f"({time.perf_counter() - start:.1f} s)")
        except Exception as exc:  # noqa: BLE001 - report every failure
            failures += 1
            print(f"compile_check: triton _topk_kernel {what} sm_{kw['cap']}: FAILED {type(exc).__name__}: {exc}")

    # the fixed configuration: (dtype, k, top, bottom, counts)
    for dt, k, top, bottom, count in (("bf16", 10, True, True, True), ("fp16", 100, True, True, True),
                                      ("fp32", 17, False, True, False), ("bf16", 10, False, False, True)):
        kp, bm, bn, bk, warps = _config(k, 1 << 20, interpreting=False)
        what = "+".join(name for name, on in (("top", top), ("bottom", bottom), ("counts", count)) if on)
        for cap in (80, 90):
            attempt(f"fixed {dt} k={k} {what}", dt=dt, k=k, kp=kp, top=top, bottom=bottom, count=count,
                    block=(bm, bn, bk, 0), warps=warps, stages=None, cap=cap)
    # the autotuning space, pruned as the autotuner prunes it, for KP = 16 (k = 10), 128 (k = 100), 256 (k = 256)
    for k in (10, 100, 256):
        kp = max(1, 1 << (k - 1).bit_length())
        for cfg in _prune_configs(TUNE_CONFIGS, KP=kp):
            kw = cfg.kwargs
            block = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"])
            what = (f"tuned bf16 k={k} top BM={block[0]} BN={block[1]} BK={block[2]} GROUP_M={block[3]} "
                    f"warps={cfg.num_warps} stages={cfg.num_stages}")
            for cap in ((90,) if quick else (80, 90)):
                attempt(what, dt="bf16", k=k, kp=kp, top=True, bottom=False, count=False, block=block,
                        warps=cfg.num_warps, stages=cfg.num_stages, cap=cap)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
