"""Triton fused vocabulary projection: top-k, bottom-k, log-sum-exp and target counts in one pass.

One program owns ``BLOCK_M`` rows and a contiguous range of vocabulary tiles (a *split*). For each
``BLOCK_M x BLOCK_N`` tile it runs the GEMM over ``d`` in ``BLOCK_K`` steps with float32
accumulation (the optional norm prologue is applied to each loaded block of ``hidden``), then, on
the same float32 tile of logits (columns past ``V`` masked out), does whichever of these was asked
for (``TOP`` / ``BOTTOM`` / ``COUNT`` constexpr flags; the log-sum-exp is always computed):

* updates the online log-sum-exp (running max and sum of ``exp``);
* **top-k** (``TOP``): turns the tile into 64-bit keys ``(order-preserving float bits << 32) |
  (2^32 - 1 - index)``: one integer comparison orders by value and, for equal values, puts the
  **lower index first**; compares every key with the row's running k-th key (the minimum of its
  ``k`` live slots) and, while some row of the tile has a candidate, inserts each row's best
  remaining candidate into its minimum slot (a max-reduce and a min-reduce per round: ``k`` rounds on
  the first tile, usually 0-2 afterwards; cheaper than a bitonic merge per tile, and the interpreter
  runs it fast too). ``KP`` = ``k`` rounded up to a power of two; slots ``>= k`` are padding;
* **bottom-k** (``BOTTOM``): the same update (:func:`_insert_tile`) on a second set of slots, with
  the keys of the *negated* logits: the largest keys are then the smallest logits, and the same index
  part still puts the lower index first among equal values;
* **target counts** (``COUNT``): with the row's target id ``t`` and logit ``tau``, three int32
  counters per row: columns ``j != t`` with ``logit_j > tau``, with ``logit_j < tau``, and with
  ``logit_j == tau and j < t`` (the target's own column is skipped whatever its logit in the tile).

Programs are numbered row-tile-fastest, so the programs resident at once are different row tiles
of the same split: they read the same unembedding tiles at about the same time and ``W`` is served
from L2 (the grouped tile order). Splits give small ``N`` enough programs; their top-``KP`` /
bottom-``KP`` lists, ``(max, sum)`` pairs and counts are merged in torch (``N x splits x KP`` keys,
``N x splits x 3`` counts: tiny next to ``N x V``).

:func:`triton_topk` returns ``(top_values, top_indices, bottom_values, bottom_indices, logsumexp,
target_counts)``, the fields of :class:`blens_fast.ops.reference.Lists` (``None`` where not asked for).
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
# nested jit function as combine function (which dominates interpreted runs). A plain nested jit call
# (:func:`_insert_tile`, once per tile and list) costs next to nothing.
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_SUM = tl.standard._sum_combine


@triton.jit
def _empty_slots(BLOCK_M: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
    """``K`` live slots per row, unsorted; empty slots hold distinct tiny keys (MIN + slot) so the row's minimum
    (= the k-th best key = the threshold) is unique; slots ``>= K`` are padding (MAX). Returns (slots, threshold)."""
    slot = tl.arange(0, KP)
    best = tl.where(slot[None, :] < K, -9223372036854775808 + slot[None, :].to(tl.int64),
                    9223372036854775807) + tl.zeros([BLOCK_M, KP], tl.int64)
    return best, tl.reduce(best, 1, _MIN)


@triton.jit
def _insert_tile(best, thr, val, cols64, col_mask):
    """Merge one tile of float32 values (``BLOCK_M x BLOCK_N``, columns ``cols64``) into the running k largest
    keys ``best`` (``BLOCK_M x KP``, threshold ``thr`` = each row's minimum slot). Returns (best, thr)."""
    # key: order-preserving int32 of the float (signed compare; canonical zero) << 32 | ~index
    bits = val.to(tl.int32, bitcast=True)
    bits = tl.where(val == 0.0, 0, bits)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (bits.to(tl.int64) << 32) | (4294967295 - cols64)[None, :]
    # one vector compare with the threshold per element; then insert the rows' best remaining candidate
    # into their minimum slot while any row has one (the first tile takes k rounds, later tiles usually 0-2)
    ck = tl.where(col_mask[None, :] & (key > thr[:, None]), key, -9223372036854775808)
    top = tl.reduce(ck, 1, _MAX)
    while tl.reduce(top, 0, _MAX) > -9223372036854775808:
        take = top > thr  # rows that still have a candidate
        best = tl.where((best == thr[:, None]) & take[:, None], top[:, None], best)
        thr = tl.reduce(best, 1, _MIN)
        ck = tl.where((ck != top[:, None]) & (ck > thr[:, None]), ck, -9223372036854775808)
        top = tl.reduce(ck, 1, _MAX)
    return best, thr


@triton.jit
def _topk_kernel(H, W, B, RA, RC, NW, NB, TID, TLOG, OUT_TOP, OUT_BOT, OUT_M, OUT_S, OUT_CNT,
                 N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, tiles_per_split,
                 K: tl.constexpr, KP: tl.constexpr, TOP: tl.constexpr, BOTTOM: tl.constexpr, COUNT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr, HAS_NW: tl.constexpr, HAS_NB: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    if PROLOGUE:
        ra = tl.load(RA + rows64, mask=row_mask, other=0.0)
        rc = tl.load(RC + rows64, mask=row_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_M], tl.float32)
    if TOP:
        best_top, thr_top = _empty_slots(BLOCK_M, K, KP)
    if BOTTOM:
        best_bot, thr_bot = _empty_slots(BLOCK_M, K, KP)
    if COUNT:
        tid = tl.load(TID + rows64, mask=row_mask, other=-1)
        tau = tl.load(TLOG + rows64, mask=row_mask, other=0.0)
        n_greater = tl.zeros([BLOCK_M], tl.int32)
        n_less = tl.zeros([BLOCK_M], tl.int32)
        n_equal_lower = tl.zeros([BLOCK_M], tl.int32)

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

        if COUNT:  # on the float32 logits, out-of-range columns and the target's own column excluded
            other = col_mask[None, :] & (cols64[None, :] != tid[:, None])
            n_greater += tl.reduce(((acc > tau[:, None]) & other).to(tl.int32), 1, _SUM)
            n_less += tl.reduce(((acc < tau[:, None]) & other).to(tl.int32), 1, _SUM)
            n_equal_lower += tl.reduce(((acc == tau[:, None]) & col_mask[None, :] & (cols64[None, :] < tid[:, None]))
                                       .to(tl.int32), 1, _SUM)

        acc = tl.where(col_mask[None, :], acc, float("-inf"))
        # online log-sum-exp (NaN propagates through the sum; all -inf so far keeps s = 0)
        m_new = tl.maximum(m_i, tl.reduce(acc, 1, _MAX))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_i = s_i * tl.exp(m_i - m_safe) + tl.reduce(tl.exp(acc - m_safe[:, None]), 1, _SUM)
        m_i = m_new

        # running top-k / bottom-k (the top-k of the negated logits) on 64-bit keys
        if TOP:
            best_top, thr_top = _insert_tile(best_top, thr_top, acc, cols64, col_mask)
        if BOTTOM:
            best_bot, thr_bot = _insert_tile(best_bot, thr_bot, -acc, cols64, col_mask)

    slot = tl.arange(0, KP)
    out = (pid_s * N + rows64)[:, None] * KP + slot[None, :]
    if TOP:
        tl.store(OUT_TOP + out, tl.where(slot[None, :] < K, best_top, -9223372036854775808), mask=row_mask[:, None])
    if BOTTOM:
        tl.store(OUT_BOT + out, tl.where(slot[None, :] < K, best_bot, -9223372036854775808), mask=row_mask[:, None])
    tl.store(OUT_M + pid_s * N + rows64, m_i, mask=row_mask)
    tl.store(OUT_S + pid_s * N + rows64, s_i, mask=row_mask)
    if COUNT:
        cnt = (pid_s * N + rows64) * 3
        tl.store(OUT_CNT + cnt, n_greater, mask=row_mask)
        tl.store(OUT_CNT + cnt + 1, n_less, mask=row_mask)
        tl.store(OUT_CNT + cnt + 2, n_equal_lower, mask=row_mask)


def decode_keys(keys: torch.Tensor, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the kernel's key encoding: (float32 values, int64 indices); ``largest=False`` for the keys of
    the negated logits (the bottom list)."""
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


def triton_topk(hidden, weight, bias=None, *, k=10, top=True, bottom=False, target_ids=None, target_logits=None,
                prologue=None, splits: int | None = None, block_m: int | None = None, block_n: int | None = None,
                block_k: int | None = None):
    """One fused pass over ``hidden @ weight.T (+ bias)`` (rows of ``hidden`` optionally normalised by
    ``prologue``). Returns ``(top_values, top_indices, bottom_values, bottom_indices, logsumexp, target_counts)``:

    * top (``top=True``): float32 / int64 ``N x k``, descending, ties lower index first; else ``None``;
    * bottom (``bottom=True``): ``N x k``, ascending, ties lower index first; else ``None``;
    * ``logsumexp``: float32 ``N`` over the whole row (always);
    * ``target_counts``: int64 ``N x 3`` = (greater, less, equal with a lower index) of the row's logits against
      ``target_logits`` (float32 ``N``), skipping column ``target_ids`` (int64 ``N``); ``None`` without targets.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    count = target_ids is not None
    if count and target_logits is None:
        raise ValueError("target_ids need target_logits")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    kp, bm, bn, bk, num_warps = _config(k, n, interpreting)
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    if (top or bottom) and kp > bn:
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

    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    dummy_i64 = torch.empty(1, dtype=torch.int64, device=dev)
    top_keys = torch.empty(splits, n, kp, dtype=torch.int64, device=dev) if top else dummy_i64
    bot_keys = torch.empty(splits, n, kp, dtype=torch.int64, device=dev) if bottom else dummy_i64
    m = torch.empty(splits, n, dtype=torch.float32, device=dev)
    s = torch.empty(splits, n, dtype=torch.float32, device=dev)
    if count:
        tid = target_ids.to(device=dev, dtype=torch.int64).contiguous()
        tlog = target_logits.to(device=dev, dtype=torch.float32).contiguous()
        counts = torch.empty(splits, n, 3, dtype=torch.int32, device=dev)
    else:
        tid, tlog, counts = dummy_i64, dummy, torch.empty(1, dtype=torch.int32, device=dev)
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
        hidden, weight, bias if bias is not None else dummy, ra, rc, nw, nb, tid, tlog, top_keys, bot_keys, m, s,
        counts, n, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), tiles_per_split,
        K=k, KP=kp, TOP=bool(top), BOTTOM=bool(bottom), COUNT=count, HAS_BIAS=bias is not None,
        PROLOGUE=prologue is not None, HAS_NW=prologue is not None and prologue.norm_weight is not None,
        HAS_NB=prologue is not None and prologue.norm_bias is not None, PRECISION=precision,
        UPCAST_DOT=interpreting and weight.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=num_warps,
    )

    def merged(keys, largest):
        # the K live slots are unsorted: order them (and merge the splits) with an int64 topk
        best = torch.topk(keys.permute(1, 0, 2).reshape(n, splits * kp), k, dim=1).values
        values, indices = decode_keys(best, largest)
        return values.contiguous(), indices.contiguous()

    tv, ti = merged(top_keys, True) if top else (None, None)
    bv, bi = merged(bot_keys, False) if bottom else (None, None)
    lse = torch.logsumexp(m + torch.log(s), dim=0) if splits > 1 else m[0] + torch.log(s[0])
    target_counts = counts.sum(0, dtype=torch.int64) if count else None
    return tv, ti, bv, bi, lse, target_counts
