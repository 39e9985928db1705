"""Triton fused top-k vocabulary projection.

One program owns ``BLOCK_M`` rows and a contiguous range of vocabulary tiles (a *split*). For each
``BLOCK_M x BLOCK_N`` tile it runs the GEMM over ``d`` in ``BLOCK_K`` steps with float32
accumulation (the optional norm prologue is applied to each loaded block of ``hidden``), then

* updates the online log-sum-exp (running max and sum of ``exp``),
* turns the tile into 64-bit keys ``(order-preserving float bits << 32) | (2^32 - 1 - index)``: one
  integer comparison orders by value and, for equal values, puts the **lower index first**,
* compares every key with the row's running k-th key (the minimum of its ``k`` live slots) and,
  while some row of the tile has a candidate, inserts each row's best remaining candidate into its
  minimum slot (a max-reduce and a min-reduce per round: ``k`` rounds on the first tile, usually
  0-2 afterwards; cheaper than a bitonic merge per tile, and the interpreter runs it fast too).
  ``KP`` = ``k`` rounded up to a power of two; slots ``>= k`` are padding.

Programs are numbered row-tile-fastest, so the programs resident at once are different row tiles
of the same split: they read the same unembedding tiles at about the same time and ``W`` is served
from L2 (the grouped tile order). Splits give small ``N`` enough programs; their top-``KP`` lists and
``(max, sum)`` pairs are merged in torch (``N x splits x KP`` keys: tiny next to ``N x V``).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

MIN_KEY = -(2 ** 63)


# Reductions go through tl.reduce with triton's own combine functions: identical code to tl.max /
# tl.min / tl.sum on the GPU, and the interpreter maps them to numpy without the per-call cost of a
# nested jit function (which dominates interpreted runs).
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_SUM = tl.standard._sum_combine


@triton.jit
def _topk_kernel(H, W, B, RA, RC, NW, NB, OUT_KEY, OUT_M, OUT_S,
                 N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, tiles_per_split,
                 K: tl.constexpr, KP: tl.constexpr, LARGEST: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PROLOGUE: tl.constexpr, HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    if PROLOGUE:
        ra = tl.load(RA + rows64, mask=row_mask, other=0.0)
        rc = tl.load(RC + rows64, mask=row_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_M], tl.float32)
    slot = tl.arange(0, KP)
    # K live slots per row, unsorted; empty slots hold distinct tiny keys (MIN + slot) so the row's
    # minimum (= the k-th best key = the threshold) is unique; slots >= K are padding (MAX).
    best = tl.where(slot[None, :] < K, -9223372036854775808 + slot[None, :].to(tl.int64),
                    9223372036854775807) + tl.zeros([BLOCK_M, KP], tl.int64)
    thr = tl.reduce(best, 1, _MIN)

    n_tiles = tl.cdiv(V, BLOCK_N)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_mask = kk < D
            h_mask = row_mask[:, None] & k_mask[None, :]
            h = tl.load(H + rows64[:, None] * stride_hn + kk[None, :] * stride_hd, mask=h_mask, other=0.0)
            if PROLOGUE:
                h = h.to(tl.float32) * ra[:, None] - rc[:, None]
                if HAS_NW:
                    h = h * tl.load(NW + kk, mask=k_mask, other=0.0)[None, :]
                if HAS_NB:
                    h = h + tl.load(NB + kk, mask=k_mask, other=0.0)[None, :]
                h = tl.where(h_mask, h, 0.0)
            h = h.to(W.dtype.element_ty)
            w = tl.load(W + cols64[None, :] * stride_wv + kk[:, None] * stride_wd,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST_DOT:  # the interpreter multiplies bfloat16 as raw uint16 bits: do it in float32 (exact)
                acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(B + cols64, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(col_mask[None, :], acc, float("-inf"))

        # online log-sum-exp (NaN propagates through the sum; all -inf so far keeps s = 0)
        m_new = tl.maximum(m_i, tl.reduce(acc, 1, _MAX))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - m_safe) + tl.reduce(tl.exp(acc - m_safe[:, None]), 1, _SUM)
        m_i = m_new

        # running top-k on 64-bit keys: one vector compare with the threshold per element; then
        # insert the rows' best remaining candidate into their minimum slot while any row has one
        # (the first tile takes k rounds, later tiles usually 0-2)
        # key: order-preserving int32 of the float (signed compare; canonical zero) << 32 | ~index
        if LARGEST:
            val = acc
        else:
            val = -acc
        bits = val.to(tl.int32, bitcast=True)
        bits = tl.where(val == 0.0, 0, bits)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = (bits.to(tl.int64) << 32) | (4294967295 - cols64)[None, :]
        key = tl.where(col_mask[None, :], key, -9223372036854775808)
        ck = tl.where(key > thr[:, None], key, -9223372036854775808)
        top = tl.reduce(ck, 1, _MAX)
        while tl.reduce(top, 0, _MAX) > -9223372036854775808:
            take = top > thr  # rows that still have a candidate
            best = tl.where((best == thr[:, None]) & take[:, None], top[:, None], best)
            thr = tl.reduce(best, 1, _MIN)
            ck = tl.where((ck != top[:, None]) & (ck > thr[:, None]), ck, -9223372036854775808)
            top = tl.reduce(ck, 1, _MAX)

    best = tl.where(slot[None, :] < K, best, -9223372036854775808)
    out = (pid_s * N + rows64)[:, None] * KP + slot[None, :]
    tl.store(OUT_KEY + out, best, mask=row_mask[:, None])
    tl.store(OUT_M + pid_s * N + rows64, m_i, mask=row_mask)
    tl.store(OUT_S + pid_s * N + rows64, s_i, mask=row_mask)


def decode_keys(keys: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the kernel's key encoding: (float32 values, int64 indices)."""
    hi = (keys >> 32).to(torch.int32)
    idx = 4294967295 - (keys & 0xFFFFFFFF)
    bits = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    values = bits.view(torch.float32)
    return (values if largest else -values), idx


def _config(k: int, n: int, interpreting: bool):
    kp = max(1, 1 << (k - 1).bit_length())
    if interpreting:  # the interpreter pays per program and per op, not per element
        return kp, 64, 256, 64, 4
    block_m = 64 if kp <= 64 else 32
    block_n = max(128, kp)
    return kp, block_m, block_n, 64, 8


def triton_topk(hidden, weight, bias=None, *, k=10, largest=True, prologue=None, splits: int | None = None,
                block_m: int | None = None, block_n: int | None = None, block_k: int | None = None):
    """Fused top-k of ``hidden @ weight.T (+ bias)`` (rows of ``hidden`` optionally normalised by
    ``prologue``): returns (values float32 [N,k], indices int64 [N,k], logsumexp float32 [N])."""
    n, d = hidden.shape
    v = weight.shape[0]
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    kp, bm, bn, bk, num_warps = _config(k, n, interpreting)
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    if kp > bn:
        raise ValueError(f"block_n={bn} must be at least k rounded up to a power of two ({kp})")
    dev = hidden.device
    n_row_tiles = triton.cdiv(n, bm)
    n_tiles = triton.cdiv(v, bn)
    if splits is None:
        if dev.type == "cuda":
            target = 2 * torch.cuda.get_device_properties(dev).multi_processor_count
            splits = min(max(1, math.ceil(target / n_row_tiles)), max(1, n_tiles // 8))
        else:
            splits = 1
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(splits, n_tiles)))
    splits = triton.cdiv(n_tiles, tiles_per_split)

    keys = torch.empty(splits, n, kp, dtype=torch.int64, device=dev)
    m = torch.empty(splits, n, dtype=torch.float32, device=dev)
    s = torch.empty(splits, n, dtype=torch.float32, device=dev)
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    if prologue is not None:
        ra, rc = prologue.a.contiguous(), prologue.c.contiguous()
        nw = prologue.norm_weight.contiguous() if prologue.norm_weight is not None else dummy
        nb = prologue.norm_bias.contiguous() if prologue.norm_bias is not None else dummy
    else:
        ra = rc = nw = nb = dummy
    if weight.dtype == torch.float32:
        precision = "tf32" if (dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    else:
        precision = "ieee"  # ignored for 16-bit inputs (tensor cores, float32 accumulation)
    grid = (n_row_tiles, splits)
    _topk_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, ra, rc, nw, nb, keys, m, s,
        n, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), tiles_per_split,
        K=k, KP=kp, LARGEST=largest, HAS_BIAS=bias is not None, PROLOGUE=prologue is not None,
        HAS_NW=prologue is not None and prologue.norm_weight is not None,
        HAS_NB=prologue is not None and prologue.norm_bias is not None, PRECISION=precision,
        UPCAST_DOT=interpreting and weight.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=num_warps,
    )
    # the K live slots are unsorted: order them (and merge the splits) with an int64 topk
    top = torch.topk(keys.permute(1, 0, 2).reshape(n, splits * kp), k, dim=1).values
    lse = torch.logsumexp(m + torch.log(s), dim=0) if splits > 1 else m[0] + torch.log(s[0])
    values, indices = decode_keys(top, largest)
    return values.contiguous(), indices.contiguous(), lse
