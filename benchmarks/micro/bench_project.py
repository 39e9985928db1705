"""``project`` with the norm prologue per implementation: a GPT-2-small lens (final LayerNorm with its weight and
bias, then the unembedding; d=768, V=50,257), k=10, float32, against the GEMM alone on the same vectors normalised
beforehand (untimed)."""
from __future__ import annotations

import functools

import pytest
import torch
from microbench import DEVICES, Case, paths, require

from blens_fast import project
from blens_fast.bench.run import build_model
from blens_fast.ops.topk import available_impls

N, K = 2048, 10
CASES = [Case(group=f"project/{device}/float32/N{N}", device=device, rounds=3) for device in DEVICES]


@pytest.fixture(scope="module")
def lenses():
    """``lenses(device)``: a one-layer GPT-2 at GPT-2-small dims (its lens is what is timed), built on first use."""
    return functools.cache(lambda device: build_model("gpt2-small", depth=1, device=device)[0])


@paths(CASES, ("gemm",))
def bench_project(measure, lenses, case, path):
    ctx = lenses(case.device)
    vectors = torch.randn(N, ctx.lens.weight.shape[1], generator=torch.Generator().manual_seed(0)).to(case.device)
    if path == "gemm":
        fn = functools.partial(torch.matmul, ctx.lens.normalize(vectors), ctx.lens.weight.detach().T)
    else:
        require(path, available_impls(case.device))
        fn = functools.partial(project, ctx, vectors, k=K, impl=path)
    measure(fn, case, path, yardstick=path == "gemm")
