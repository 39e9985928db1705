"""``sketch_update`` per implementation against the dense accumulation it avoids (each example's d_in x d_out
gradient ``A_e^T B_e`` formed, its squared norm taken and added to the running sum): GPT-2-small ``mlp.in`` shape
(768 x 3072), 8 examples of 16 tokens, the sketch sizes of ``gradient_stats``' default rank 8, float32."""
from __future__ import annotations

import functools

import torch
from microbench import DEVICES, Case, paths, require

from blens_fast.ops.lowrank import SKETCH, sketch_update
from blens_fast.stats import sketch_sizes

D_IN, D_OUT, EXAMPLES, TOKENS, RANK = 768, 3072, 8, 16, 8
CASES = [Case(group=f"sketch_update/{device}/{D_IN}x{D_OUT}/{EXAMPLES}x{TOKENS}", device=device, rounds=50,
              warmup_rounds=5) for device in DEVICES]


def dense_accumulation(a, b, offsets, summed):
    """Each example's gradient formed and added to ``summed``; their squared Frobenius norms."""
    norms_sq = []
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        grad = a[start:end].T @ b[start:end]
        norms_sq.append(grad.square().sum())
        summed += grad
    return torch.stack(norms_sq)


@paths(CASES, ("dense",))
def bench_sketch_update(measure, case, path):
    k, l, m = sketch_sizes(RANK)
    g = torch.Generator().manual_seed(0)
    rows = EXAMPLES * TOKENS
    a, b = (torch.randn(rows, D_IN, generator=g).to(case.device), torch.randn(rows, D_OUT, generator=g).to(case.device))
    offsets = torch.arange(0, rows + 1, TOKENS)
    if path == "dense":
        fn = functools.partial(dense_accumulation, a, b, offsets, torch.zeros(D_IN, D_OUT, device=case.device))
    else:
        require(path, SKETCH.available(case.device))
        right = torch.randn(D_OUT, k + m, generator=g).to(case.device)
        left_t = torch.randn(D_IN, l, generator=g).to(case.device)
        y = torch.zeros(D_IN, k + m, device=case.device)
        w = torch.zeros(l, D_OUT, device=case.device)
        fn = functools.partial(sketch_update, a, b, offsets, right, left_t, y, w, impl=path)
    measure(fn, case, path, yardstick=path == "dense")
