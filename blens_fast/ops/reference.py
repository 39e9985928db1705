"""Pure-PyTorch references for the fused top-k vocabulary projection.

Every fast path in :mod:`blens_fast.ops.topk` is tested against these. Two flavours:

* :func:`naive_topk` materialises the full ``N x V`` logits (the thing the fused kernels avoid);
* :func:`chunked_topk` does the same work ``chunk_rows`` rows at a time, so memory is bounded by one
  ``chunk_rows x V`` block.

Both implement the package-wide selection rule exactly: values sorted (descending for ``largest``,
ascending otherwise), **ties go to the lower vocabulary index** (``torch.topk`` itself does not
promise that on the CPU, so rows whose k-th value is tied outside the selection are re-selected
with a stable sort), and the log-sum-exp of the whole row. The final norm reference is
:meth:`blens_fast.adapters.Lens.normalize`; it is not duplicated here.
"""
from __future__ import annotations

import torch

#: Elements (rows x V) of one logits chunk in :func:`chunked_topk`: 2**24 float32 = 64 MiB.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def logits_block(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden @ weight.T (+ bias)`` in the inputs' dtype (torch's own GEMM), returned as float32."""
    logits = torch.matmul(hidden, weight.t()).float()
    if bias is not None:
        logits = logits + bias.float()
    return logits


def select_topk(logits: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of float32 ``logits`` (rows x V) with the lower-index-wins tie rule.

    ``torch.topk`` picks the values; rows where the k-th value also occurs outside the selection
    (a tie across the boundary) are redone with a stable sort, and the selection is ordered by
    (value, index) so equal values are listed lower index first. NaN is treated as by ``torch.topk``
    (larger than everything); :func:`blens_fast.ops.topk.topk_logits` raises on such rows anyway.
    """
    values, indices = torch.topk(logits, k, dim=-1, largest=largest, sorted=True)
    if values.numel():
        kth = values[:, -1:]
        outside = (logits == kth).sum(-1) - (values == kth).sum(-1)
        bad = (outside > 0).nonzero().flatten()
        if bad.numel():
            rows = logits[bad]
            order = torch.sort(rows, dim=-1, descending=largest, stable=True).indices[:, :k]
            indices[bad] = order
            values[bad] = rows.gather(-1, order)
    return _order_by_value_then_index(values, indices, largest)


def _order_by_value_then_index(values, indices, largest):
    # sort the k winners by index, then stably by value: equal values end up lower index first
    by_index = torch.sort(indices, dim=-1).indices
    values, indices = values.gather(-1, by_index), indices.gather(-1, by_index)
    by_value = torch.sort(values, dim=-1, descending=largest, stable=True).indices
    return values.gather(-1, by_value), indices.gather(-1, by_value)


def naive_topk(hidden, weight, bias=None, *, k=10, largest=True):
    """Full ``N x V`` logits, then the exact selection and ``torch.logsumexp``: (values, indices, lse)."""
    logits = logits_block(hidden, weight, bias)
    values, indices = select_topk(logits, k, largest)
    return values, indices, torch.logsumexp(logits, dim=-1)


def chunked_topk(hidden, weight, bias=None, *, k=10, largest=True, chunk_rows: int | None = None):
    """:func:`naive_topk` on ``chunk_rows`` rows at a time (memory bounded by one chunk of logits)."""
    n, v = hidden.shape[0], weight.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, DEFAULT_CHUNK_ELEMENTS // max(v, 1))
    dev = hidden.device
    values = torch.empty(n, k, dtype=torch.float32, device=dev)
    indices = torch.empty(n, k, dtype=torch.int64, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        values[start:stop], indices[start:stop], lse[start:stop] = naive_topk(
            hidden[start:stop], weight, bias, k=k, largest=largest)
    return values, indices, lse


def plain_topk(hidden, weight, bias=None, *, k=10, largest=True):
    """What one writes without thinking: ``torch.topk(hidden @ weight.T)`` plus ``logsumexp``.

    The benchmark's "naive" baseline; no tie fix-up, so it is not used as the test reference.
    """
    logits = logits_block(hidden, weight, bias)
    values, indices = torch.topk(logits, k, dim=-1, largest=largest)
    return values, indices, torch.logsumexp(logits, dim=-1)


def row_norm_coefficients(hidden: torch.Tensor, norm_kind, eps: float, unit: bool,
                          chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(a, c)`` with ``norm(h) = (h * a - c) * norm_weight + norm_bias`` (float32, shape ``N``).

    This is how the fused paths apply the optional unit normalisation and the final LayerNorm /
    RMSNorm inside their prologue: one read of ``N x d`` here, two floats per row out, and the
    kernels normalise each block as they load it instead of writing a normalised copy of all vectors.
    The statistics are the ones :meth:`Lens.normalize` uses (float32; LayerNorm's biased variance).
    """
    n = hidden.shape[0]
    a = torch.empty(n, dtype=torch.float32, device=hidden.device)
    c = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_rows):
        h = hidden[start:start + chunk_rows].float()
        scale = torch.ones(h.shape[0], dtype=torch.float32, device=h.device)
        if unit:  # F.normalize semantics: h / max(||h||, 1e-12)
            scale = 1.0 / h.norm(dim=-1).clamp_min(1e-12)
        if norm_kind == "layernorm":
            hs = h * scale[:, None]
            var, mean = torch.var_mean(hs, dim=-1, unbiased=False)
            rstd = torch.rsqrt(var + eps)
            a[start:start + h.shape[0]] = scale * rstd
            c[start:start + h.shape[0]] = mean * rstd
        elif norm_kind == "rmsnorm":
            hs = h * scale[:, None]
            rstd = torch.rsqrt(hs.pow(2).mean(-1) + eps)
            a[start:start + h.shape[0]] = scale * rstd
            c[start:start + h.shape[0]] = 0.0
        else:
            a[start:start + h.shape[0]] = scale
            c[start:start + h.shape[0]] = 0.0
    return a, c
