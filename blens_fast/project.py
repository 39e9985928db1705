"""Reading vectors through the model's own lens: optional unit normalisation, the final norm with its
weights, the unembedding with its bias, and the exact top (or bottom) k tokens, fused.

The fused implementations ("cpu", "triton", "cuda") never materialise the normalised vectors: one read of
``N x d`` computes two float32 coefficients per row (:func:`~blens_fast.ops.topk_reference.row_norm_coefficients`), and
each kernel normalises a block of rows as it loads it (its prologue), ``x = (h * a - c) * w + b``, rounded to the
unembedding's dtype the way the model's own norm output is. The torch paths apply the reference norm
(:func:`~blens_fast.ops.topk_reference.normalize_rows`) chunk by chunk.
"""
from __future__ import annotations

import torch

from .context import ModelContext, with_context
from .ops.topk import (DTYPES, CpuTuning, Prologue, TopBottomK, TopK, check_projection, check_targets, one_list,
                       run_projection)


@with_context(tokenizer=False)
def project(ctx: ModelContext, vectors: torch.Tensor, *, k: int = 10, largest: bool = True, final_norm: bool = True,
            unit_norm: bool = False, impl: str = "auto", tuning: CpuTuning | None = None) -> TopK:
    """Top-k (``largest=False``: bottom-k) tokens of ``vectors`` (``(..., d)``) read through the model's lens.

    Called as ``project(model, vectors)`` or ``project(ctx, vectors)``. ``unit_norm=True`` scales each vector to
    unit L2 norm first (the paper's normalised variant); ``final_norm`` applies the model's final
    LayerNorm/RMSNorm (with its weight and bias); the unembedding's bias is added when it has one (GPT-J).
    ``impl`` as in :func:`~blens_fast.ops.topk.topk_logits`.
    """
    return one_list(largest, lambda **which: project_lists(ctx, vectors, k=k, final_norm=final_norm,
                                                           unit_norm=unit_norm, impl=impl, tuning=tuning, **which))


def project_lists(ctx: ModelContext, vectors: torch.Tensor, *, k: int = 10, top: bool = True, bottom: bool = True,
                  targets=None, final_norm: bool = True, unit_norm: bool = False, impl: str = "auto",
                  tuning: CpuTuning | None = None) -> TopBottomK:
    """Top-k and bottom-k tokens of ``vectors`` read through the lens and each row's target rank, in one pass over
    the vocabulary (see :func:`~blens_fast.ops.topk.topk_bottomk_logits`); arguments as in :func:`project`;
    ``targets``: one token id per vector (or one for all), or None."""
    lens = ctx.lens
    if not isinstance(vectors, torch.Tensor):
        raise TypeError(f"vectors must be a torch.Tensor, got {type(vectors).__name__}")
    if not vectors.is_floating_point():
        raise TypeError(f"vectors must be floating point, got {vectors.dtype}")
    weight = lens.weight.detach()
    v, d = weight.shape
    if vectors.dim() < 1 or vectors.shape[-1] != d:
        got = vectors.shape[-1] if vectors.dim() else "no"
        raise ValueError(f"vectors have {got} features but the model's unembedding has d={d} "
                         f"(vectors shape {tuple(vectors.shape)}, unembedding {v} x {d})")
    if vectors.device != weight.device:
        raise ValueError(f"vectors are on {vectors.device} but the model is on {weight.device}: move one of them first")
    for name, flag in (("final_norm", final_norm), ("unit_norm", unit_norm)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}: {flag!r}")
    bias = lens.bias.detach() if lens.bias is not None else None
    if weight.dtype not in DTYPES:  # a float64 model: the kernels take (and the logits are) float32
        weight = weight.float()
    if vectors.dtype not in DTYPES:
        vectors = vectors.float()
    use_norm = final_norm and lens.norm_kind is not None
    if not use_norm and not unit_norm:  # the vectors go into the GEMM as they are
        vectors = vectors.to(weight.dtype)
    hidden, weight, bias, k, lead = check_projection(vectors, weight, bias, k, impl, top=top, bottom=bottom)
    target_ids = check_targets(targets, lead, v, weight.device)
    prologue = None
    if use_norm or unit_norm:
        prologue = Prologue.build(hidden, lens.norm_kind if use_norm else None, lens.eps, unit_norm,
                                  lens.norm_weight, lens.norm_bias)
    return run_projection(hidden, weight, bias, k, impl, lead, top=top, bottom=bottom, targets=target_ids,
                          prologue=prologue, tuning=tuning)
