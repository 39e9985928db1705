"""Fused top-k vocabulary projection: ``topk(norm(h) @ W.T + b)`` without the ``N x V`` logits.

Public calls, each with an ``impl=`` switch resolved by one registry (:mod:`blens_fast.ops.registry`):
:func:`topk_logits` (one list) and :func:`topk_bottomk_logits` (top-k, bottom-k, log-sum-exp and target ranks in
one pass). Arguments are checked here; the kernels live in their own files:

========== ==========================================================================================
``torch``  reference: chunked float32 ``matmul`` + ``torch.topk`` (memory bounded by one chunk of logits)
``naive``  the full ``N x V`` logits + selection (comparison only)
``cpu``    C++ (``csrc/cpu/topk_kernel.cpp``): cache-sized blocks, each block's logits from the kernel's own
           exact GEMM (a row's results never depend on the threads or the other rows), then a threshold
           selection and online log-sum-exp while the block is hot
``triton`` Triton (``ops/triton/topk.py``): GEMM tiles, per-tile top-k merged into a running top-k
``cuda``   CUDA (``csrc/cuda/``): tensor-core tile GEMM + warp-level top-k, the variant the binding picks
           for the weight and the GPU (``wgmma``, else ``mma``, else ``simple``); ``cuda:simple``,
           ``cuda:mma`` and ``cuda:wgmma`` name one variant (:data:`CUDA_VARIANTS`)
``auto``   the registry's choice for the tensors' device (measured table on GPUs, else its default order)
========== ==========================================================================================

The dispatch runs inside the ``torch.library`` op ``blens_fast::topk_bottomk`` (with a fake implementation, so
the call traces under fake tensors and ``torch.compile``).

Semantics shared by every implementation (the tests check each against the reference):

* values are float32 logits, the float32 sums of the exact products of the inputs (16-bit inputs are never
  multiplied by a GEMM that rounds to 16 bits), sorted descending for ``largest=True`` and ascending otherwise;
  indices are int64; ``logsumexp`` is over the whole row, so ``exp(values - logsumexp)`` are exact softmax
  probabilities (also for the bottom-k);
* **ties go to the lower vocabulary index**;
* **NaN policy: an error.** A row whose logits contain NaN or +-inf (NaN/inf in ``hidden``, ``weight`` or ``bias``,
  or float overflow) has a non-finite log-sum-exp; the calls raise ``ValueError`` naming the rows instead of
  returning a selection that means nothing. A finite ``-inf`` bias (masking tokens) is fine as long as the row
  keeps finite logits.
* ``hidden`` may have leading batch dimensions ``(..., d)``; the results keep them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import topk_reference
from .registry import Implementation, Operation, extension_unavailable, triton_unavailable
from .tuning import measured_impl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Largest k the register/shared-memory top-k of the GPU kernels holds; above it ``auto`` uses the
#: chunked torch path on the GPU (the output is then ``N x k`` anyway).
GPU_MAX_K = 256
#: the CUDA kernel's variants (csrc/cuda/topk_binding.cpp), each an implementation ``cuda:<variant>``: ``simple`` (the
#: first kernel: WMMA, exact float32 FMA for float32 weights), ``mma`` (mma.sync + cp.async, sm_80+) and ``wgmma``
#: (sm_90a), the last two for 16-bit weights with 16-byte aligned rows
CUDA_VARIANTS = ("simple", "mma", "wgmma")


@dataclass(frozen=True)
class TopK:
    """Top (or bottom) k tokens per row.

    ``values`` (float32, ``(..., k)``, sorted: descending when ``largest`` else ascending),
    ``indices`` (int64 token ids, same shape), ``logsumexp`` (float32, ``(...)``: over the whole
    vocabulary, so :meth:`probs` are exact softmax probabilities) and ``largest``.
    """

    values: torch.Tensor
    indices: torch.Tensor
    logsumexp: torch.Tensor
    largest: bool = True

    # -- shape ---------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """How many tokens each row holds."""
        return self.values.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Leading (row) shape, without ``k``."""
        return tuple(self.logsumexp.shape)

    def __len__(self) -> int:
        return self.values.shape[0] if self.values.dim() > 1 else 1

    def __getitem__(self, item) -> "TopK":
        """Rows by index/slice/mask, e.g. ``topk[3]``, ``topk[10:20]``."""
        if self.values.dim() < 2:
            raise IndexError("a TopK of a single vector has no rows to index")
        return TopK(self.values[item], self.indices[item], self.logsumexp[item], self.largest)

    def flatten(self) -> "TopK":
        """Rows flattened to ``(N, k)``."""
        return TopK(self.values.reshape(-1, self.k), self.indices.reshape(-1, self.k),
                    self.logsumexp.reshape(-1), self.largest)

    def to(self, device) -> "TopK":
        """The result on ``device``."""
        return TopK(self.values.to(device), self.indices.to(device), self.logsumexp.to(device), self.largest)

    def cpu(self) -> "TopK":
        """The result on the CPU."""
        return self.to("cpu")

    @staticmethod
    def cat(parts, dim: int = 0) -> "TopK":
        """Concatenate results along a row dimension (all with the same ``k`` and ``largest``)."""
        parts = list(parts)
        if not parts:
            raise ValueError("TopK.cat needs at least one TopK")
        ks, largest = {p.k for p in parts}, {p.largest for p in parts}
        if len(ks) != 1 or len(largest) != 1:
            raise ValueError(f"TopK.cat needs equal k and largest, got k={sorted(ks)} largest={sorted(largest)}")
        return TopK(torch.cat([p.values for p in parts], dim), torch.cat([p.indices for p in parts], dim),
                    torch.cat([p.logsumexp for p in parts], dim), parts[0].largest)

    # -- derived -------------------------------------------------------------------------
    def probs(self) -> torch.Tensor:
        """Softmax probabilities of the selected tokens: ``exp(values - logsumexp)``."""
        return torch.exp(self.values - self.logsumexp.unsqueeze(-1))

    def log_probs(self) -> torch.Tensor:
        """Log-softmax probabilities of the selected tokens: ``values - logsumexp``."""
        return self.values - self.logsumexp.unsqueeze(-1)

    def decode(self, tokenizer) -> list:
        """Token strings, as nested lists shaped like ``indices`` (``tokenizer.decode`` of each id)."""
        ids = self.indices.cpu()
        cache: dict[int, str] = {}
        for i in torch.unique(ids).tolist():
            cache[i] = tokenizer.decode([i])
        return _map_nested(ids.tolist(), cache)

    def to_pandas(self, tokenizer=None):
        """Long format: one row per (row, rank) with ``row, rank, token_id, logit, prob`` (+ ``token``)."""
        import pandas as pd

        flat = self.flatten().cpu()
        n, k = flat.values.shape
        data = {
            "row": torch.arange(n).repeat_interleave(k).numpy(),
            "rank": torch.arange(k).repeat(n).numpy(),
            "token_id": flat.indices.reshape(-1).numpy(),
            "logit": flat.values.reshape(-1).numpy(),
            "prob": flat.probs().reshape(-1).numpy(),
        }
        frame = pd.DataFrame(data)
        if tokenizer is not None:
            ids = flat.indices.reshape(-1)
            cache = {i: tokenizer.decode([i]) for i in torch.unique(ids).tolist()}
            frame["token"] = [cache[i] for i in ids.tolist()]
        return frame


def _map_nested(x, cache):
    if isinstance(x, list):
        return [_map_nested(y, cache) for y in x]
    return cache[x]


@dataclass(frozen=True)
class TopBottomK:
    """What one pass over the vocabulary gives per row: the top-k and/or bottom-k tokens (:class:`TopK`, sharing
    ``logsumexp``; ``None`` where not asked for) and, when targets were given, each target's logit and its
    1-based rank from the top and from the bottom among all V tokens (lower index first on ties, so a target
    in a list sits at position ``rank - 1``)."""

    top: TopK | None
    bottom: TopK | None
    logsumexp: torch.Tensor
    target_ids: torch.Tensor | None = None
    target_logits: torch.Tensor | None = None
    target_rank_top: torch.Tensor | None = None
    target_rank_bottom: torch.Tensor | None = None

    def to_pandas(self, tokenizer=None):
        """Long format: ``list`` (``top``/``bottom``) + :meth:`TopK.to_pandas` columns, and ``target_rank`` (the
        target's rank in that list's order) when targets were given."""
        import pandas as pd

        frames = []
        for name, part, ranks in (("top", self.top, self.target_rank_top),
                                  ("bottom", self.bottom, self.target_rank_bottom)):
            if part is None:
                continue
            frame = part.to_pandas(tokenizer)
            frame.insert(1, "list", name)
            if ranks is not None:
                frame["target_rank"] = ranks.reshape(-1).cpu().numpy()[frame["row"].to_numpy()]
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class Prologue:
    """The normalisation a fused kernel applies to each loaded block of ``hidden``:
    ``x = (h * a[row] - c[row]) * norm_weight + norm_bias``, then rounded to the weight dtype (``a``, ``c`` from
    :func:`topk_reference.row_norm_coefficients`). ``norm_kind``, ``eps`` and ``unit`` describe the same norm for the
    torch reference (:func:`topk_reference.normalize_rows`)."""

    a: torch.Tensor
    c: torch.Tensor
    norm_weight: torch.Tensor | None
    norm_bias: torch.Tensor | None
    norm_kind: str | None
    eps: float
    unit: bool

    @classmethod
    def build(cls, hidden: torch.Tensor, norm_kind, eps: float, unit: bool, norm_weight=None, norm_bias=None):
        """The prologue of rows ``hidden`` (N x d): one read of them for two float32 coefficients per row."""
        with torch.no_grad():
            a, c = topk_reference.row_norm_coefficients(hidden, norm_kind, eps, unit)
        weight = norm_weight.detach().float().contiguous() if norm_kind and norm_weight is not None else None
        bias = norm_bias.detach().float().contiguous() if norm_kind and norm_bias is not None else None
        return cls(a, c, weight, bias, norm_kind, float(eps), bool(unit))

    def apply(self, hidden: torch.Tensor, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The kernels' normalisation of ``hidden[rows]`` in float32 (before rounding to the weight dtype)."""
        x = hidden[rows].float() * self.a[rows, None] - self.c[rows, None]
        if self.norm_weight is not None:
            x = x * self.norm_weight
        if self.norm_bias is not None:
            x = x + self.norm_bias
        return x

    def reference(self, hidden: torch.Tensor) -> torch.Tensor:
        """The reference norm of rows ``hidden`` (what the torch implementations apply)."""
        return topk_reference.normalize_rows(hidden, self.norm_kind, self.eps, self.unit, self.norm_weight,
                                             self.norm_bias)


@dataclass(frozen=True)
class CpuTuning:
    """Block sizes and GEMM mode of the C++ kernel (0 = chosen from the shapes; ``gemm_mode`` 1: the exact float32
    GEMM on upcast 16-bit blocks, 2: the native 16-bit batch-reduce GEMM with float32 output; see
    csrc/cpu/topk_kernel.cpp)."""

    block_rows: int = 0
    block_vocab: int = 0
    gemm_mode: int = 0


# ---------------------------------------------------------------------------------------
def topk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, k: int = 10,
                largest: bool = True, impl: str = "auto", tuning: CpuTuning | None = None) -> TopK:
    """Exact top-k (``largest=False``: bottom-k) of ``hidden @ weight.T (+ bias)`` per row, fused.

    ``hidden``: ``(..., d)``; ``weight``: ``V x d`` (an ``lm_head``), same floating dtype (float32,
    bfloat16 or float16) and device; ``bias``: ``V`` or None. Returns a :class:`TopK`. See the module
    docstring for the tie rule (lower index wins) and the NaN policy (``ValueError``).
    """
    return one_list(largest, lambda **which: topk_bottomk_logits(hidden, weight, bias, k=k, impl=impl, tuning=tuning,
                                                                 **which))


def one_list(largest: bool, compute) -> TopK:
    """The single list of ``compute(top=..., bottom=...)`` (a one-pass call): the top-k when ``largest``, else the
    bottom-k."""
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {type(largest).__name__}: {largest!r}")
    result = compute(top=largest, bottom=not largest)
    return result.top if largest else result.bottom


def topk_bottomk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                        k: int = 10, top: bool = True, bottom: bool = True, targets=None,
                        impl: str = "auto", tuning: CpuTuning | None = None) -> TopBottomK:
    """Top-k and bottom-k of ``hidden @ weight.T (+ bias)`` per row, and the rank of a target token per row, in
    **one** pass over the vocabulary (one GEMM): a :class:`TopBottomK`.

    ``targets``: token ids shaped like ``hidden``'s leading dimensions (or one id for every row), or None.
    Arguments otherwise as in :func:`topk_logits`. A target's rank is exact on the C++ path's exact GEMM (its logit
    is the pass's own dot product); elsewhere up to float32 rounding: its logit is computed on its own, so tokens
    within rounding of it may fall either way.
    """
    hidden, weight, bias, k, lead = check_projection(hidden, weight, bias, k, impl, top=top, bottom=bottom)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: expected the same dtype")
    return run_projection(hidden, weight, bias, k, impl, lead, top=top, bottom=bottom,
                          targets=check_targets(targets, lead, weight.shape[0], weight.device), prologue=None,
                          tuning=tuning)


def check_targets(targets, lead: tuple[int, ...], vocab: int, device) -> torch.Tensor | None:
    """``targets`` as a flat int64 tensor with one id per row (``lead`` = the rows' shape), or None."""
    if targets is None:
        return None
    if isinstance(targets, bool) or not isinstance(targets, (int, list, tuple, torch.Tensor)):
        raise TypeError(f"targets must be token ids (an int, a list or an integer tensor), got "
                        f"{type(targets).__name__}")
    t = torch.as_tensor(targets)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"targets must be integer token ids, got {t.dtype}")
    if t.dim() == 0:
        t = t.expand(lead)
    if tuple(t.shape) != tuple(lead):
        raise ValueError(f"targets have shape {tuple(t.shape)} but the vectors' rows have shape {tuple(lead)}: "
                         "expected one target id per row")
    t = t.reshape(-1).to(device=device, dtype=torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        bad = t[(t < 0) | (t >= vocab)][0].item()
        raise ValueError(f"target id {bad} is out of range: the vocabulary has V={vocab} tokens (0..{vocab - 1})")
    return t.contiguous()


def check_projection(hidden, weight, bias, k, impl, *, top=True, bottom=False):
    """Validate a projection's arguments (each message names the bad value and what was expected); returns
    ``(hidden as N x d, weight, bias, k, leading shape)``."""
    if impl not in TOPK.choices:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(map(repr, TOPK.choices))}")
    for name, flag in (("top", top), ("bottom", bottom)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}: {flag!r}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} is {t.dtype}: expected float32, bfloat16 or float16")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V x d, as in an lm_head), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (..., d), got a 0-d tensor")
    v, d = weight.shape
    if hidden.shape[-1] != d:
        raise ValueError(f"hidden has {hidden.shape[-1]} features but weight has {d} columns "
                         f"(weight is V x d = {v} x {d})")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}: expected one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
        if bias.dim() != 1 or bias.shape[0] != v:
            raise ValueError(f"bias has shape {tuple(bias.shape)} but weight has {v} rows: expected ({v},)")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}: expected one device")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}: {k!r}")
    if not 1 <= k <= v:
        raise ValueError(f"k={k} is out of range: the vocabulary has V={v} entries, expected 1 <= k <= {v}")
    lead = tuple(hidden.shape[:-1])
    return hidden.reshape(-1, d), weight, bias, k, lead


def target_logits(hidden, weight, bias, targets, prologue, impl: str = "torch",
                  chunk_rows: int = 1024) -> torch.Tensor:
    """Each row's logit for its target, the way the kernels compute logits: the row normalised by the prologue
    and rounded to the weight dtype, times the target's weight row, in float32 (+ bias); ``chunk_rows`` rows at
    a time (float32 temporaries stay small). ``impl="cpu"``: the C++ kernel's own dot product, bit for bit the logit
    its pass computes for that column (so the target's rank is exact); otherwise equal up to float32 rounding."""
    if impl == "cpu":
        from . import _extension

        return _extension.extension("cpu").target_logits(hidden, weight, bias, *_prologue_args(prologue), targets)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        x = hidden[rows].float() if prologue is None else prologue.apply(hidden, rows)
        out[rows] = (x.to(weight.dtype).float() * weight[targets[rows]].float()).sum(-1)
    return out + bias[targets].float() if bias is not None else out


def run_projection(hidden, weight, bias, k, impl, lead, *, top, bottom, targets, prologue,
                   tuning: CpuTuning | None = None) -> TopBottomK:
    """The checked one-pass projection of ``hidden`` (N x d) through ``impl``, results shaped by ``lead``."""
    n = hidden.shape[0]
    if not (top or bottom or targets is not None):
        raise ValueError("nothing to compute: ask for top=True, bottom=True or targets")
    chosen = TOPK.resolve(impl, weight.device, k=k, n=n, d=weight.shape[1], v=weight.shape[0], dtype=weight.dtype,
                          aligned_rows=_aligned_rows(weight))
    tuning = tuning or CpuTuning()
    with torch.no_grad():
        tau = target_logits(hidden, weight, bias, targets, prologue, chosen.name) if targets is not None else None
        p = prologue
        outputs = torch.ops.blens_fast.topk_bottomk(
            hidden, weight, bias, *((p.a, p.c, p.norm_weight, p.norm_bias) if p else (None,) * 4),
            (p.norm_kind or "") if p else "", p.eps if p else 0.0, p.unit if p else False, targets, tau, k, top,
            bottom, chosen.name, tuning.block_rows, tuning.block_vocab, tuning.gemm_mode)
    selection = topk_reference.Selection(*(None if not wanted else t for t, wanted in
                                           zip(outputs, (top, top, bottom, bottom, True, targets is not None))))
    lse = selection.logsumexp
    bad = ~torch.isfinite(lse)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        shown = ", ".join(str(r) for r in rows[:8].tolist()) + (", ..." if rows.numel() > 8 else "")
        raise ValueError(f"{rows.numel()} of {n} rows have NaN or infinite logits (rows {shown}): hidden, weight "
                         "or bias contains NaN/inf, or the logits overflow float32; drop or fix those rows first")

    def part(values, indices, largest):
        return None if values is None else TopK(values.reshape(*lead, k), indices.reshape(*lead, k),
                                                lse.reshape(lead), largest)

    ranks = [None, None]
    if targets is not None:
        greater, less, equal_lower = selection.target_counts.unbind(1)
        ranks = [(greater + equal_lower + 1).reshape(lead), (less + equal_lower + 1).reshape(lead)]
    return TopBottomK(part(selection.top_values, selection.top_indices, True),
                      part(selection.bottom_values, selection.bottom_indices, False), lse.reshape(lead),
                      None if targets is None else targets.reshape(lead),
                      None if tau is None else tau.reshape(lead), *ranks)


# -- the torch.library op ------------------------------------------------------------------
@torch.library.custom_op("blens_fast::topk_bottomk", mutates_args=())
def _topk_bottomk_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     row_a: Optional[torch.Tensor], row_c: Optional[torch.Tensor],
                     norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], norm_kind: str,
                     eps: float, unit: bool, targets: Optional[torch.Tensor], target_logits: Optional[torch.Tensor],
                     k: int, top: bool, bottom: bool, impl: str, block_rows: int, block_vocab: int,
                     gemm_mode: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
    """One pass of implementation ``impl`` (resolved, not "auto"): the six fields of
    :class:`topk_reference.Selection`, selections not asked for and counts without targets as empty ``0 x k`` /
    ``0 x 3`` tensors."""
    prologue = None if row_a is None else Prologue(row_a, row_c, norm_weight, norm_bias, norm_kind or None, eps,
                                                   unit)
    n = hidden.shape[0]
    if n == 0:
        found = topk_reference.Selection(None, None, None, None, torch.empty(0, device=hidden.device), None)
    else:
        found = TOPK.implementations[impl].run(hidden, weight, bias, k, top, bottom, targets, target_logits,
                                               prologue, CpuTuning(block_rows, block_vocab, gemm_mode))
    return _dense_outputs(found, n, k, hidden.device)


def _dense_outputs(found: topk_reference.Selection, n: int, k: int, device) -> tuple:
    """:class:`topk_reference.Selection` with every absent field as an empty tensor of the op's fixed output dtypes."""
    def or_empty(t, width, dtype):
        return torch.empty(0, width, dtype=dtype, device=device) if t is None else t.contiguous()

    return (or_empty(found.top_values, k, torch.float32), or_empty(found.top_indices, k, torch.int64),
            or_empty(found.bottom_values, k, torch.float32), or_empty(found.bottom_indices, k, torch.int64),
            found.logsumexp.float().contiguous(), or_empty(found.target_counts, 3, torch.int64))


@_topk_bottomk_op.register_fake
def _(hidden, weight, bias, row_a, row_c, norm_weight, norm_bias, norm_kind, eps, unit, targets, target_logits, k,
      top, bottom, impl, block_rows, block_vocab, gemm_mode):
    n = hidden.shape[0]

    def rows(wanted, width, dtype):
        return hidden.new_empty((n if wanted else 0, width), dtype=dtype)

    return (rows(top, k, torch.float32), rows(top, k, torch.int64), rows(bottom, k, torch.float32),
            rows(bottom, k, torch.int64), hidden.new_empty((n,), dtype=torch.float32),
            rows(targets is not None, 3, torch.int64))


# -- implementations ----------------------------------------------------------------------
# Each takes (hidden N x d, weight, bias, k, top, bottom, targets (N) or None, target logits (N) or None,
# prologue or None, CpuTuning) and returns a topk_reference.Selection.
def _impl_torch(hidden, weight, bias, k, top, bottom, targets, tau, prologue, tuning, naive=False):
    # with a prologue: the reference norm per chunk, rounded to the weight dtype like the model's own norm output
    return topk_reference.chunked_selection(hidden, weight, bias, k=k, top=top, bottom=bottom, target_ids=targets,
                                            target_logits=tau, chunk_rows=hidden.shape[0] if naive else None,
                                            normalize=None if prologue is None else prologue.reference)


def _impl_naive(*args):
    return _impl_torch(*args, naive=True)


def _prologue_args(prologue):
    if prologue is None:
        return None, None, None, None
    return prologue.a, prologue.c, prologue.norm_weight, prologue.norm_bias


def _impl_cpu(hidden, weight, bias, k, top, bottom, targets, tau, prologue, tuning):
    from . import _extension

    return topk_reference.Selection(*_extension.extension("cpu").topk_logits(
        hidden, weight, bias, *_prologue_args(prologue), k, top, bottom, targets, tau, tuning.block_rows,
        tuning.block_vocab, tuning.gemm_mode))


def _impl_triton(hidden, weight, bias, k, top, bottom, targets, tau, prologue, tuning):
    from .triton.topk import triton_topk

    return topk_reference.Selection(*triton_topk(hidden, weight, bias, k=k, top=top, bottom=bottom,
                                                 target_ids=targets, target_logits=tau, prologue=prologue))


def _cuda(variant: str):
    """The CUDA kernel, ``variant`` one of :data:`CUDA_VARIANTS` or ``"auto"`` (the binding's choice)."""
    def run(hidden, weight, bias, k, top, bottom, targets, tau, prologue, tuning):
        from . import _extension

        return topk_reference.Selection(*_extension.extension("cuda").topk_logits_variant(
            hidden, weight, bias, *_prologue_args(prologue), k, top, bottom, targets, tau, variant, 0, 0))
    return run


def _aligned_rows(weight: torch.Tensor) -> bool:
    """Whether the fast CUDA variants can stream ``weight``'s rows in 16-byte chunks (the binding copies a weight
    whose rows are not contiguous, and the copy's rows are aligned when d is a multiple of 8)."""
    if weight.stride(-1) != 1 and weight.shape[-1] != 1:
        return weight.shape[-1] % 8 == 0
    return weight.stride(0) % 8 == 0 and weight.data_ptr() % 16 == 0


def _gpu_k_limit(device, k=1, **facts):
    return f"it supports k <= {GPU_MAX_K}, got k={k}" if k > GPU_MAX_K else None


def _triton_check(device, **facts):
    return triton_unavailable(device) or _gpu_k_limit(device, **facts)


def _cuda_check(variant: str):
    def check(device, dtype=None, aligned_rows=True, **facts):
        reason = extension_unavailable("cuda")(device) or _gpu_k_limit(device, **facts)
        if reason or variant in ("auto", "simple"):
            return reason
        if dtype == torch.float32:
            return f"the {variant!r} variant takes bfloat16 or float16 weights (float32 runs on 'cuda:simple')"
        if not aligned_rows:
            return f"the {variant!r} variant needs weight rows aligned to 16 bytes (use 'cuda:simple')"
        from . import _extension

        with torch.cuda.device(device):
            usable = _extension.extension("cuda").topk_variants()
        if variant not in usable:
            return (f"the {variant!r} variant cannot run on this GPU or build (usable: {', '.join(usable)}; wgmma "
                    "needs compute capability 9.0 and an sm_90a build, mma sm_80+)")
        return None
    return check


TOPK = Operation("topk", [
    Implementation("torch", _impl_torch, ("cpu", "cuda")),
    Implementation("naive", _impl_naive, ("cpu", "cuda")),
    Implementation("cpu", _impl_cpu, ("cpu",), lambda device, **facts: extension_unavailable("cpu")(device)),
    Implementation("triton", _impl_triton, ("cuda", "cpu"), _triton_check),
    Implementation("cuda", _cuda("auto"), ("cuda",), _cuda_check("auto")),
    *(Implementation(f"cuda:{variant}", _cuda(variant), ("cuda",), _cuda_check(variant)) for variant in CUDA_VARIANTS),
], measured=measured_impl)


def available_impls(device: torch.device | str = "cpu") -> list[str]:
    """The implementations usable for tensors on ``device`` in this environment."""
    return TOPK.available(device)
