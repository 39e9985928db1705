"""Triton kernels of the fused low-rank accumulation (see ``blens_fast/ops/lowrank_reference.py``).

Two launches, no atomics (so the result does not depend on scheduling):

1. ``_project_kernel``: per tile of rows, the thin products ``C = B right`` (``N x s1``) and
   ``D = A left_t`` (``N x s2``), read once from the factors as the capture produced them.
2. ``_accumulate_kernel``: one grid whose programs do three kinds of work: a tile of ``p`` rows of
   ``y += A^T C``, a tile of ``q`` columns of ``w += D^T B``, or one example's
   ``sum((A_e A_e^T) * (B_e B_e^T))`` over tile pairs of its rows.

Inputs may be float32, float16 or bfloat16; everything accumulates in float32 with IEEE dots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _project_kernel(a_ptr, b_ptr, right_ptr, left_ptr, c_ptr, d_ptr, n, p, q, s1, s2,
                    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n
    ks = tl.arange(0, BLOCK_K)
    cols1 = tl.arange(0, S1)
    cols2 = tl.arange(0, S2)
    acc_c = tl.zeros((BLOCK_T, S1), dtype=tl.float32)
    for k0 in range(0, q, BLOCK_K):
        kk = k0 + ks
        b = tl.load(b_ptr + rows[:, None] * q + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < q), other=0.0)
        r = tl.load(right_ptr + kk[:, None] * s1 + cols1[None, :], mask=(kk[:, None] < q) & (cols1[None, :] < s1),
                    other=0.0)
        acc_c += tl.dot(b.to(tl.float32), r, input_precision="ieee")
    tl.store(c_ptr + rows[:, None] * s1 + cols1[None, :], acc_c, mask=row_ok[:, None] & (cols1[None, :] < s1))
    acc_d = tl.zeros((BLOCK_T, S2), dtype=tl.float32)
    for k0 in range(0, p, BLOCK_K):
        kk = k0 + ks
        a = tl.load(a_ptr + rows[:, None] * p + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < p), other=0.0)
        l = tl.load(left_ptr + kk[:, None] * s2 + cols2[None, :], mask=(kk[:, None] < p) & (cols2[None, :] < s2),
                    other=0.0)
        acc_d += tl.dot(a.to(tl.float32), l, input_precision="ieee")
    tl.store(d_ptr + rows[:, None] * s2 + cols2[None, :], acc_d, mask=row_ok[:, None] & (cols2[None, :] < s2))


@triton.jit
def _accumulate_kernel(a_ptr, b_ptr, c_ptr, d_ptr, y_ptr, w_ptr, offsets_ptr, norms_ptr, n, p, q, s1, s2,
                       num_y_tiles, num_w_tiles,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                       S1: tl.constexpr, S2: tl.constexpr):
    pid = tl.program_id(0)
    ts = tl.arange(0, BLOCK_T)
    if pid < num_y_tiles:
        # y[p0:p0+BLOCK_D, :] += A[:, p0:p0+BLOCK_D]^T C
        ds = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        cols = tl.arange(0, S1)
        acc = tl.zeros((BLOCK_D, S1), dtype=tl.float32)
        for t0 in range(0, n, BLOCK_T):
            tt = t0 + ts
            a = tl.load(a_ptr + tt[:, None] * p + ds[None, :], mask=(tt[:, None] < n) & (ds[None, :] < p), other=0.0)
            c = tl.load(c_ptr + tt[:, None] * s1 + cols[None, :], mask=(tt[:, None] < n) & (cols[None, :] < s1),
                        other=0.0)
            acc += tl.dot(tl.trans(a.to(tl.float32)), c, input_precision="ieee")
        ptrs = y_ptr + ds[:, None] * s1 + cols[None, :]
        ok = (ds[:, None] < p) & (cols[None, :] < s1)
        tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + acc, mask=ok)
    elif pid < num_y_tiles + num_w_tiles:
        # w[:, q0:q0+BLOCK_D] += D^T B[:, q0:q0+BLOCK_D]
        ds = (pid - num_y_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
        rows = tl.arange(0, S2)
        acc = tl.zeros((S2, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, n, BLOCK_T):
            tt = t0 + ts
            d = tl.load(d_ptr + tt[:, None] * s2 + rows[None, :], mask=(tt[:, None] < n) & (rows[None, :] < s2),
                        other=0.0)
            b = tl.load(b_ptr + tt[:, None] * q + ds[None, :], mask=(tt[:, None] < n) & (ds[None, :] < q), other=0.0)
            acc += tl.dot(tl.trans(d), b.to(tl.float32), input_precision="ieee")
        ptrs = w_ptr + rows[:, None] * q + ds[None, :]
        ok = (rows[:, None] < s2) & (ds[None, :] < q)
        tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + acc, mask=ok)
    else:
        # one example: sum over tile pairs (i, j) of its rows of (A_i A_j^T) * (B_i B_j^T)
        e = pid - num_y_tiles - num_w_tiles
        start = tl.load(offsets_ptr + e).to(tl.int32)
        stop = tl.load(offsets_ptr + e + 1).to(tl.int32)
        ks = tl.arange(0, BLOCK_K)
        total = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        for i0 in range(start, stop, BLOCK_T):
            ii = i0 + ts
            for j0 in range(start, i0 + 1, BLOCK_T):  # the Gram products are symmetric
                jj = j0 + ts
                ga = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
                for k0 in range(0, p, BLOCK_K):
                    kk = k0 + ks
                    ai = tl.load(a_ptr + ii[:, None] * p + kk[None, :], mask=(ii[:, None] < stop) & (kk[None, :] < p),
                                 other=0.0)
                    aj = tl.load(a_ptr + jj[:, None] * p + kk[None, :], mask=(jj[:, None] < stop) & (kk[None, :] < p),
                                 other=0.0)
                    ga += tl.dot(ai.to(tl.float32), tl.trans(aj.to(tl.float32)), input_precision="ieee")
                gb = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
                for k0 in range(0, q, BLOCK_K):
                    kk = k0 + ks
                    bi = tl.load(b_ptr + ii[:, None] * q + kk[None, :], mask=(ii[:, None] < stop) & (kk[None, :] < q),
                                 other=0.0)
                    bj = tl.load(b_ptr + jj[:, None] * q + kk[None, :], mask=(jj[:, None] < stop) & (kk[None, :] < q),
                                 other=0.0)
                    gb += tl.dot(bi.to(tl.float32), tl.trans(bj.to(tl.float32)), input_precision="ieee")
                total += tl.where(j0 == i0, 1.0, 2.0) * ga * gb
        tl.store(norms_ptr + e, tl.sum(tl.sum(total, axis=1), axis=0))


def _pow2(x: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(int(x)))


def sketch_update_triton(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, right: torch.Tensor,
                         left_t: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Triton implementation of :func:`blens_fast.ops.lowrank.sketch_update` (arguments already checked)."""
    a, b = a.contiguous(), b.contiguous()
    right, left_t = right.contiguous(), left_t.contiguous()
    n, p = a.shape
    q = b.shape[1]
    s1, s2 = right.shape[1], left_t.shape[1]
    num_examples = offsets.shape[0] - 1
    c = torch.empty((n, s1), dtype=torch.float32, device=a.device)
    d = torch.empty((n, s2), dtype=torch.float32, device=a.device)
    norms = torch.empty(num_examples, dtype=torch.float32, device=a.device)
    S1, S2 = _pow2(s1), _pow2(s2)
    block_t, block_k, block_d = 16, 32, 32
    if n > 0:
        _project_kernel[(triton.cdiv(n, block_t),)](a, b, right, left_t, c, d, n, p, q, s1, s2,
                                                    BLOCK_T=block_t, BLOCK_K=block_k, S1=S1, S2=S2)
    num_y = triton.cdiv(p, block_d) if n > 0 else 0
    num_w = triton.cdiv(q, block_d) if n > 0 else 0
    grid = (num_y + num_w + num_examples,)
    if grid[0] > 0:
        _accumulate_kernel[grid](a, b, c, d, y, w, offsets.contiguous(), norms, n, p, q, s1, s2, num_y, num_w,
                                 BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_K=block_k, S1=S1, S2=S2)
    return norms.double().clamp_min(0)
