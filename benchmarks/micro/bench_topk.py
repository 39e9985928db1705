"""``topk_logits`` per implementation against the float32 GEMM that writes the N x V logits (``gemm``) and against
that GEMM followed by ``torch.topk`` (``gemm+topk``), at GPT-2 dims (d=768, V=50,257), k=10.

For bfloat16 inputs both yardsticks run on the inputs upcast to float32 beforehand (untimed): the contract is
float32 logits, the float32 sums of the exact products, which is what the kernels compute; a bfloat16 GEMM would
round them. The torch reference is not timed at N=16,384 on the CPU (about 2.5 GEMMs, some 45 s a round).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from microbench import DEVICES, FAST_PATHS, Case, dtype_name, paths, require

from blens_fast.ops.topk import available_impls, topk_logits

D, V, K = 768, 50257, 10
LARGE_N = 16384
#: (rounds, warm-up rounds) per N on the CPU: the GEMM alone takes ~2 s at N=2,048 and ~16 s at N=16,384 on one
#: thread; N=2,048 runs first and warms every path up
CPU_ROUNDS = {2048: (3, 1), LARGE_N: (2, 0)}


@dataclass(frozen=True, kw_only=True)
class TopkCase(Case):
    n: int
    dtype: torch.dtype


CASES = [TopkCase(group=f"topk_logits/{device}/{dtype_name(dtype)}/N{n}", device=device, n=n, dtype=dtype,
                  rounds=rounds, warmup_rounds=warmup)
         for device in DEVICES for n, (rounds, warmup) in CPU_ROUNDS.items()
         for dtype in (torch.float32, torch.bfloat16)]
YARDSTICKS = ("gemm", "gemm+topk")


def fast_paths(case: TopkCase) -> tuple[str, ...]:
    impls = FAST_PATHS[case.device]
    return tuple(i for i in impls if i != "torch") if case.device == "cpu" and case.n == LARGE_N else impls


@pytest.fixture(scope="module")
def operands():
    """``operands(case)``: ``(hidden, weight)`` in the case's dtype and the same upcast to float32; the last case's
    are kept (a group's paths run one after another)."""
    @functools.lru_cache(maxsize=1)
    def build(case: TopkCase):
        g = torch.Generator().manual_seed(0)
        weight = (torch.randn(V, D, generator=g) / D ** 0.5).to(case.device, case.dtype)
        hidden = torch.randn(case.n, D, generator=g).to(case.device, case.dtype)
        return hidden, weight, hidden.float(), weight.float()

    return build


@paths(CASES, YARDSTICKS, fast_paths)
def bench_topk_logits(measure, operands, case, path):
    hidden, weight, hidden32, weight32 = operands(case)
    if path == "gemm":
        fn = functools.partial(torch.matmul, hidden32, weight32.T)
    elif path == "gemm+topk":
        def fn():
            return torch.topk(torch.matmul(hidden32, weight32.T), K)
    else:
        require(path, available_impls(case.device))
        fn = functools.partial(topk_logits, hidden, weight, k=K, impl=path)
    measure(fn, case, path, yardstick=path in YARDSTICKS)
