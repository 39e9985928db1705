"""Compile the Triton kernels for sm_80 and sm_90 without a GPU (ptx + cubin through triton's ptxas).

    python -m blens_fast.ops.triton.compile_check

Must run without TRITON_INTERPRET (the interpreter replaces the jit functions); exits non-zero on failure.
"""
from __future__ import annotations

import os
import sys


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .topk import _config, _topk_kernel

    failures = 0
    # (dtype, k, top, bottom, counts): both lists and the counts (the most registers), one list, ranks only
    for dt, k, top, bottom, count in (("bf16", 10, True, True, True), ("fp16", 100, True, True, True),
                                      ("fp32", 17, False, True, False), ("bf16", 10, False, False, True)):
        kp, bm, bn, bk, warps = _config(k, 1 << 20, interpreting=False)
        sig = {name: "*fp32" for name in ("B", "RA", "RC", "NW", "NB", "TLOG", "OUT_M", "OUT_S")}
        sig.update(H=f"*{dt}", W=f"*{dt}", TID="*i64", OUT_TOP="*i64", OUT_BOT="*i64", OUT_CNT="*i32")
        sig.update({n: "i32" for n in ("N", "V", "D", "stride_hn", "stride_hd", "stride_wv", "stride_wd",
                                       "tiles_per_split")})
        consts = dict(K=k, KP=kp, TOP=top, BOTTOM=bottom, COUNT=count, HAS_BIAS=True, PROLOGUE=True, HAS_NW=True,
                      HAS_NB=True, PRECISION="ieee", UPCAST_DOT=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        sig.update({c: "constexpr" for c in consts})
        what = "+".join(name for name, on in (("top", top), ("bottom", bottom), ("counts", count)) if on)
        what = f"{dt} k={k} {what}"
        for cap in (80, 90):
            try:
                kernel = triton.compile(ASTSource(fn=_topk_kernel, signature=sig, constexprs=consts),
                                        target=GPUTarget("cuda", cap, 32), options={"num_warps": warps})
                print(f"compile_check: triton _topk_kernel {what} sm_{cap}: ok, "
                      f"{kernel.metadata.shared} bytes shared memory")
            except Exception as exc:  # noqa: BLE001 - report every failure
                failures += 1
                print(f"compile_check: triton _topk_kernel {what} sm_{cap}: FAILED {type(exc).__name__}: {exc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
