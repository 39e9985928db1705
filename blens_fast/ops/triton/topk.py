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

Programs (a 1-D grid) are numbered row-tile-fastest (``GROUP_M = 0``), so the programs resident at once are
different row tiles of the same split: they read the same unembedding tiles at about the same time and ``W`` is
served from L2. With ``GROUP_M > 0`` they come in groups of ``GROUP_M`` row tiles, split-major inside a group, and
at least ``target / GROUP_M`` splits are used: the resident programs then read few distinct hidden panels too (for
large ``N`` at large ``d`` the hidden panels of all row tiles do not fit in L2). Splits give small ``N`` enough
programs; their top-``KP`` / bottom-``KP`` lists, ``(max, sum)`` pairs and counts are merged in torch
(``N x splits x KP`` keys, ``N x splits x 3`` counts: tiny next to ``N x V``). The number of splits is computed by
the same formula in the kernel (:func:`_plan_splits`) and on the host (:func:`plan_splits`), so that it can depend
on the autotuned block sizes.

On a GPU, large problems run through :data:`_topk_kernel_tuned` (``triton.autotune`` over :data:`TUNE_CONFIGS`:
block sizes, warps, pipeline stages and the tile order, keyed on ``d``, ``V``, ``N`` rounded up to a power of two,
``KP``, the lists asked for and the dtypes); small ones, explicit block sizes and the interpreter use one fixed
configuration (:func:`_config`), so interpreted runs stay fast and give the same results as before.

:func:`triton_topk` returns ``(top_values, top_indices, bottom_values, bottom_indices, logsumexp,
target_counts)``, the fields of :class:`blens_fast.ops.topk_reference.Selection` (``None`` where not asked for).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..registry import triton_interpreting

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
    keys ``best`` (``BLOCK_M x KP``, threshold ``thr`` = each row's minimum slot). Returns (best, thr).

    A float prefilter first: a key above ``thr`` has a value ``v`` with ``!(v < bound)``, ``bound`` the float that
    ``thr``'s high word encodes (NaN for empty slots, so that everything passes), so tiles in which no row has such
    a value (most tiles, once the lists have filled) skip the int64 keys altogether."""
    hi = (thr >> 32).to(tl.int32)
    bound = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(tl.float32, bitcast=True)
    maybe = col_mask[None, :] & ~(val < bound[:, None])
    if tl.reduce(tl.reduce(maybe.to(tl.int32), 1, _MAX), 0, _MAX) > 0:
        best, thr = _insert_candidates(best, thr, val, cols64, col_mask)
    return best, thr


@triton.jit
def _insert_candidates(best, thr, val, cols64, col_mask):
    """The exact update of :func:`_insert_tile` on 64-bit keys."""
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
def _plan_splits(n_row_tiles, n_tiles, splits_req, target_programs, GROUP_M: tl.constexpr):
    """(splits, tiles_per_split): the kernel's copy of :func:`plan_splits` (the same integer formula)."""
    if GROUP_M == 0:
        rows_c = n_row_tiles
    else:
        rows_c = tl.minimum(n_row_tiles, GROUP_M)
    want = tl.maximum(tl.cdiv(target_programs, rows_c), 1)
    s = tl.minimum(want, tl.maximum(n_tiles // 8, 1))
    s = tl.where(splits_req > 0, splits_req, s)
    s = tl.maximum(tl.minimum(s, n_tiles), 1)
    tiles_per_split = tl.cdiv(n_tiles, s)
    return tl.cdiv(n_tiles, tiles_per_split), tiles_per_split


@triton.jit(do_not_specialize=["N", "V", "splits_req", "target_programs", "n_bucket"])
def _topk_kernel(H, W, B, RA, RC, NW, NB, TID, TLOG, OUT_TOP, OUT_BOT, OUT_M, OUT_S, OUT_CNT,
                 N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, splits_req, target_programs, n_bucket,
                 K: tl.constexpr, KP: tl.constexpr, TOP: tl.constexpr, BOTTOM: tl.constexpr, COUNT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr, HAS_NW: tl.constexpr, HAS_NB: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # n_bucket (N rounded up to a power of two) is only part of the autotuning key
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(N, BLOCK_M)
    n_tiles = tl.cdiv(V, BLOCK_N)
    splits, tiles_per_split = _plan_splits(n_row_tiles, n_tiles, splits_req, target_programs, GROUP_M)
    if GROUP_M == 0:  # row tile fastest
        pid_m = pid % n_row_tiles
        pid_s = pid // n_row_tiles
    else:  # groups of GROUP_M row tiles, split-major inside a group
        group_size = GROUP_M * splits
        g = pid // group_size
        rem = pid % group_size
        rows_here = tl.minimum(n_row_tiles - g * GROUP_M, GROUP_M)
        pid_s = rem // rows_here
        pid_m = g * GROUP_M + rem % rows_here
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    split64 = pid_s.to(tl.int64)
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
    out = (split64 * N + rows64)[:, None] * KP + slot[None, :]
    if TOP:
        tl.store(OUT_TOP + out, tl.where(slot[None, :] < K, best_top, -9223372036854775808), mask=row_mask[:, None])
    if BOTTOM:
        tl.store(OUT_BOT + out, tl.where(slot[None, :] < K, best_bot, -9223372036854775808), mask=row_mask[:, None])
    tl.store(OUT_M + split64 * N + rows64, m_i, mask=row_mask)
    tl.store(OUT_S + split64 * N + rows64, s_i, mask=row_mask)
    if COUNT:
        cnt = (split64 * N + rows64) * 3
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
    """The fixed configuration (interpreter, small problems, explicit block sizes): (KP, BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps)."""
    kp = max(1, 1 << (k - 1).bit_length())
    if interpreting:  # the interpreter pays per program and per op, not per element
        return kp, 64, 256, 64, 4
    block_m = 64 if kp <= 64 else 32
    block_n = max(128, kp)
    return kp, block_m, block_n, 64, 8


def _tune_config(block_m, block_n, block_k, warps, stages, group_m):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


#: The autotuning space (GPU only), pruned per KP by :func:`_prune_configs` (BLOCK_N >= KP, BLOCK_M * KP <= 8192:
#: the running lists and the tile's int64 keys live in registers). It holds the fixed configuration of every KP
#: (64/128 for KP <= 64, 32/128 for KP = 128, 32/256 for KP = 256), larger row tiles, wider vocabulary tiles, a
#: deeper pipeline and the grouped tile order (GROUP_M = 16 row tiles). Kept small: every config is one compile per
#: distinct KP and list set (about a second or more each on the GPU machine's CPU).
TUNE_CONFIGS = [
    _tune_config(64, 128, 64, 8, 3, 0),     # the fixed GPU config for KP <= 64
    _tune_config(128, 128, 64, 8, 3, 0),
    _tune_config(64, 256, 64, 8, 3, 0),
    _tune_config(128, 128, 64, 8, 4, 16),
    _tune_config(64, 128, 64, 4, 4, 0),
    _tune_config(32, 128, 64, 4, 3, 0),     # the fixed GPU config for KP = 128
    _tune_config(64, 128, 64, 8, 3, 16),
    _tune_config(32, 256, 64, 8, 3, 0),     # the fixed GPU config for KP = 256
]
#: Below this many multiply-adds (N * V * d) the fixed configuration is used (tuning would cost more than it saves).
TUNE_MIN_WORK = 1 << 33


def _prune_configs(configs, named_args=None, **kwargs):
    """The configs of :data:`TUNE_CONFIGS` that suit ``KP`` (``triton.autotune``'s ``early_config_prune``)."""
    kp = kwargs["KP"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] >= kp and c.kwargs["BLOCK_M"] * kp <= 8192]
    if not kept:  # k above what the space covers: the fixed configuration
        _, bm, bn, bk, warps = _config(kp, 1, interpreting=False)
        kept = [_tune_config(bm, bn, bk, warps, 3, 0)]
    return kept


def _tuner_bench(kernel_call, quantiles):
    """The autotuner's timing: short (a few ms per config), medians by CUDA events."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def plan_splits(n: int, v: int, block_m: int, block_n: int, group_m: int, splits_req: int,
                target_programs: int) -> tuple[int, int]:
    """(splits, tiles_per_split) for ``n`` rows and ``v`` columns: enough programs for ``target_programs`` (at least
    ``target / GROUP_M`` splits when grouped), at most ``n_tiles // 8`` splits, or ``splits_req`` when > 0. The
    kernel computes the same numbers (:func:`_plan_splits`)."""
    n_row_tiles = triton.cdiv(n, block_m)
    n_tiles = triton.cdiv(v, block_n)
    rows_c = n_row_tiles if group_m == 0 else min(n_row_tiles, group_m)
    s = min(max(triton.cdiv(target_programs, rows_c), 1), max(n_tiles // 8, 1))
    if splits_req > 0:
        s = splits_req
    s = max(min(s, n_tiles), 1)
    tiles_per_split = triton.cdiv(n_tiles, s)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


_topk_kernel_tuned = triton.autotune(
    configs=TUNE_CONFIGS,
    key=["n_bucket", "D", "V", "KP", "TOP", "BOTTOM", "COUNT", "PROLOGUE", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=_tuner_bench,
)(_topk_kernel)


def autotuning_enabled() -> bool:
    """``BLENS_TRITON_AUTOTUNE=0`` turns the autotuned path off (the fixed configuration everywhere)."""
    return os.environ.get("BLENS_TRITON_AUTOTUNE", "1") not in ("0", "")


def last_config() -> dict | None:
    """The configuration of the last autotuned launch (block sizes, GROUP_M, warps, stages), or None."""
    cfg = getattr(_topk_kernel_tuned, "best_config", None)
    if cfg is None:
        return None
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def triton_topk(hidden, weight, bias=None, *, k=10, top=True, bottom=False, target_ids=None, target_logits=None,
                prologue=None, splits: int | None = None, block_m: int | None = None, block_n: int | None = None,
                block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                group_m: int | None = None, autotune: bool | None = None):
    """One fused pass over ``hidden @ weight.T (+ bias)`` (rows of ``hidden`` optionally normalised by
    ``prologue``). Returns ``(top_values, top_indices, bottom_values, bottom_indices, logsumexp, target_counts)``:

    * top (``top=True``): float32 / int64 ``N x k``, descending, ties lower index first; else ``None``;
    * bottom (``bottom=True``): ``N x k``, ascending, ties lower index first; else ``None``;
    * ``logsumexp``: float32 ``N`` over the whole row (always);
    * ``target_counts``: int64 ``N x 3`` = (greater, less, equal with a lower index) of the row's logits against
      ``target_logits`` (float32 ``N``), skipping column ``target_ids`` (int64 ``N``); ``None`` without targets.

    The launch configuration: autotuned on a GPU for problems of at least :data:`TUNE_MIN_WORK` multiply-adds
    (``autotune=None``; ``True`` forces it on a GPU, ``False`` or ``BLENS_TRITON_AUTOTUNE=0`` turns it off), else
    the fixed one; any of ``splits``, ``block_m``, ``block_n``, ``block_k``, ``num_warps``, ``num_stages``,
    ``group_m`` given by hand also means the fixed one, with those values.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    count = target_ids is not None
    if count and target_logits is None:
        raise ValueError("target_ids need target_logits")
    interpreting = triton_interpreting()
    dev = hidden.device
    kp, bm, bn, bk, warps = _config(k, n, interpreting)
    by_hand = any(x is not None for x in (splits, block_m, block_n, block_k, num_warps, num_stages, group_m))
    tuned = (dev.type == "cuda" and not interpreting and not by_hand and autotune is not False
             and autotuning_enabled() and (autotune or n * v * d >= TUNE_MIN_WORK))
    bm, bn, bk, warps = block_m or bm, block_n or bn, block_k or bk, num_warps or warps
    gm = group_m or 0
    if (top or bottom) and kp > bn and not tuned:
        raise ValueError(f"block_n={bn} must be at least k rounded up to a power of two ({kp})")
    target = 2 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    splits_req = splits if splits is not None else (0 if dev.type == "cuda" else 1)
    if tuned:
        candidates = _prune_configs(TUNE_CONFIGS, KP=kp)
        alloc_splits = max(plan_splits(n, v, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["GROUP_M"],
                                       splits_req, target)[0] for c in candidates)
    else:
        alloc_splits = plan_splits(n, v, bm, bn, gm, splits_req, target)[0]
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    dummy_i64 = torch.empty(1, dtype=torch.int64, device=dev)
    top_keys = torch.empty(alloc_splits, n, kp, dtype=torch.int64, device=dev) if top else dummy_i64
    bot_keys = torch.empty(alloc_splits, n, kp, dtype=torch.int64, device=dev) if bottom else dummy_i64
    m = torch.empty(alloc_splits, n, dtype=torch.float32, device=dev)
    s = torch.empty(alloc_splits, n, dtype=torch.float32, device=dev)
    if count:
        tid = target_ids.to(device=dev, dtype=torch.int64).contiguous()
        tlog = target_logits.to(device=dev, dtype=torch.float32).contiguous()
        counts = torch.empty(alloc_splits, n, 3, dtype=torch.int32, device=dev)
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
    args = (hidden, weight, bias if bias is not None else dummy, ra, rc, nw, nb, tid, tlog, top_keys, bot_keys, m, s,
            counts, n, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), splits_req, target,
            1 << max(0, n - 1).bit_length())
    consts = dict(K=k, KP=kp, TOP=bool(top), BOTTOM=bool(bottom), COUNT=count, HAS_BIAS=bias is not None,
                  PROLOGUE=prologue is not None, HAS_NW=prologue is not None and prologue.norm_weight is not None,
                  HAS_NB=prologue is not None and prologue.norm_bias is not None, PRECISION=precision,
                  UPCAST_DOT=interpreting and weight.dtype == torch.bfloat16)

    def n_programs(meta):
        used = plan_splits(n, v, meta["BLOCK_M"], meta["BLOCK_N"], meta["GROUP_M"], splits_req, target)[0]
        return (triton.cdiv(n, meta["BLOCK_M"]) * used,)

    if tuned:
        _topk_kernel_tuned[n_programs](*args, **consts)
        cfg = _topk_kernel_tuned.best_config.kwargs
        splits = plan_splits(n, v, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["GROUP_M"], splits_req, target)[0]
    else:
        launch = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps)
        if num_stages is not None:
            launch["num_stages"] = num_stages
        _topk_kernel[n_programs](*args, **consts, **launch)
        splits = alloc_splits
    if splits < alloc_splits:
        top_keys, bot_keys, m, s = top_keys[:splits], bot_keys[:splits], m[:splits], s[:splits]
        counts = counts[:splits]

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
