"""Pure-PyTorch references for the fused top-k vocabulary projection.

Every fast path in :mod:`blens_fast.ops.topk` is tested against these. Two flavours:

* :func:`naive_selection` materialises the full ``N x V`` logits (the thing the fused kernels avoid);
* :func:`chunked_selection` does the same work ``chunk_rows`` rows at a time, so memory is bounded by one
  ``chunk_rows x V`` block.

Each returns a :class:`Selection`: the top-k and/or bottom-k, the log-sum-exp, and the target's counts (for its
rank) that one pass yields. Both implement the package-wide selection rule exactly: values sorted (descending for
``largest``, ascending otherwise), **ties go to the lower vocabulary index** (``torch.topk`` itself does not
promise that on the CPU, so rows whose k-th value is tied outside the selection are re-selected
with a stable sort), and the log-sum-exp of the whole row. Logits are float32 sums of the exact products of the
inputs whatever their dtype (16-bit inputs are upcast, never multiplied by a GEMM that rounds its output to 16 bits):
the contract every implementation meets. :func:`normalize_rows` is the reference of the norm prologue (and of
:meth:`blens_fast.adapters.Lens.normalize`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

#: Elements (rows x V) of one logits chunk in :func:`chunked_selection`: 2**24 float32 = 64 MiB.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


#: vocabulary rows of a 16-bit weight upcast at a time by :func:`logits_block`
UPCAST_ROWS = 8192


def logits_block(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden @ weight.T (+ bias)`` as float32 sums of the inputs' exact products: 16-bit inputs are upcast (the
    weight :data:`UPCAST_ROWS` vocabulary rows at a time, so no float32 copy of the whole matrix is made)."""
    h = hidden.float()
    if weight.dtype == torch.float32:
        logits = h @ weight.t()
    else:
        logits = torch.empty(h.shape[:-1] + (weight.shape[0],), dtype=torch.float32, device=h.device)
        for v in range(0, weight.shape[0], UPCAST_ROWS):
            logits[..., v:v + UPCAST_ROWS] = h @ weight[v:v + UPCAST_ROWS].float().t()
    if bias is not None:
        logits = logits + bias.float()
    return logits


def normalize_rows(hidden: torch.Tensor, norm_kind, eps: float, unit: bool = False, norm_weight=None,
                   norm_bias=None) -> torch.Tensor:
    """The reference norm in float32: optional unit L2 normalisation (``F.normalize``), then LayerNorm
    (``norm_kind="layernorm"``, biased variance) or RMSNorm (``"rmsnorm"``) with ``eps``, times ``norm_weight``,
    plus ``norm_bias``; ``norm_kind=None``: no norm (weight and bias ignored)."""
    h = hidden.float()
    if unit:
        h = torch.nn.functional.normalize(h, dim=-1)
    if norm_kind is None:
        return h
    if norm_kind == "layernorm":
        h = torch.nn.functional.layer_norm(h, (h.shape[-1],), eps=eps)
    elif norm_kind == "rmsnorm":
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"norm_kind={norm_kind!r}: expected 'layernorm', 'rmsnorm' or None")
    if norm_weight is not None:
        h = h * norm_weight.float()
    if norm_bias is not None:
        h = h + norm_bias.float()
    return h


def select_topk(logits: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
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


class Selection(NamedTuple):
    """What one pass over the vocabulary returns per row (``None`` where not requested).

    ``top_*`` / ``bottom_*``: ``N x k`` (values float32, sorted best first; indices int64);
    ``logsumexp``: ``N`` float32 over the whole row; ``target_counts``: ``N x 3`` int64 =
    (tokens with a greater logit than the target's, with a smaller one, with an equal one and a lower
    index), never counting the target's own column. The target's 1-based rank is
    ``greater + equal_lower + 1`` from the top and ``less + equal_lower + 1`` from the bottom, the
    positions it has in the sorted selections under the lower-index-wins tie rule.
    """

    top_values: torch.Tensor | None
    top_indices: torch.Tensor | None
    bottom_values: torch.Tensor | None
    bottom_indices: torch.Tensor | None
    logsumexp: torch.Tensor
    target_counts: torch.Tensor | None


def target_counts(logits: torch.Tensor, target_ids: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``N x 3`` int64 (greater, less, equal with a lower index) of each row's logits against its target's logit
    ``target_logits[i]``, skipping the target's own column ``target_ids[i]`` (see :class:`Selection`)."""
    cols = torch.arange(logits.shape[1], device=logits.device)[None, :]
    ids, tau = target_ids[:, None], target_logits.float()[:, None]
    other = cols != ids
    greater = ((logits > tau) & other).sum(-1)
    less = ((logits < tau) & other).sum(-1)
    equal_lower = ((logits == tau) & (cols < ids)).sum(-1)
    return torch.stack([greater, less, equal_lower], dim=1)


def select(logits: torch.Tensor, k: int, *, top: bool, bottom: bool, target_ids=None,
           target_logits=None) -> Selection:
    """The requested selections, log-sum-exp and target counts of float32 ``logits`` (rows x V)."""
    tv, ti = select_topk(logits, k, True) if top else (None, None)
    bv, bi = select_topk(logits, k, False) if bottom else (None, None)
    counts = target_counts(logits, target_ids, target_logits) if target_ids is not None else None
    return Selection(tv, ti, bv, bi, torch.logsumexp(logits, dim=-1), counts)


def naive_selection(hidden, weight, bias, *, k: int, top: bool, bottom: bool, target_ids=None,
                    target_logits=None) -> Selection:
    """Full ``N x V`` logits, then :func:`select`."""
    return select(logits_block(hidden, weight, bias), k, top=top, bottom=bottom, target_ids=target_ids,
                  target_logits=target_logits)


def cat_selections(parts: list[Selection]) -> Selection:
    """Row-wise concatenation of :class:`Selection`."""
    return Selection(*(None if fields[0] is None else torch.cat(fields) for fields in zip(*parts)))


def chunked_selection(hidden, weight, bias, *, k: int, top: bool, bottom: bool, target_ids=None, target_logits=None,
                      chunk_rows: int | None = None, normalize=None) -> Selection:
    """:func:`naive_selection` ``chunk_rows`` rows at a time (memory bounded by one chunk of logits); ``normalize``
    (a callable on a chunk of rows) is applied to each chunk first."""
    n, v = hidden.shape[0], weight.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, DEFAULT_CHUNK_ELEMENTS // max(v, 1))
    parts = []
    for start in range(0, max(n, 1), chunk_rows):
        rows = slice(start, start + chunk_rows)
        h = hidden[rows] if normalize is None else normalize(hidden[rows]).to(weight.dtype)
        parts.append(naive_selection(h, weight, bias, k=k, top=top, bottom=bottom,
                                     target_ids=None if target_ids is None else target_ids[rows],
                                     target_logits=None if target_logits is None else target_logits[rows]))
    return cat_selections(parts)


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
    c = torch.zeros(n, dtype=torch.float32, device=hidden.device)  # only LayerNorm subtracts a mean
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
        else:
            a[start:start + h.shape[0]] = scale
    return a, c
