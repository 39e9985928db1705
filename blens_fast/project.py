"""Reading vectors through the model's own lens: optional unit normalisation, the final norm with its
weights, the unembedding with its bias, and the exact top (or bottom) k tokens, fused.

The fused implementations ("cpu", "triton", "cuda") never materialise the normalised vectors: one
read of ``N x d`` computes two float32 coefficients per row (:func:`reference.row_norm_coefficients`),
and each kernel normalises a block of rows as it loads it (its prologue), ``x = (h * a - c) * w + b``,
rounded to the unembedding's dtype the way the model's own norm output is. The torch paths apply
:meth:`Lens.normalize` chunk by chunk, and are the reference.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .adapters import Adapter, get_adapter
from .ops import reference
from .ops.topk import DTYPES, Prologue, TopBottomK, TopK, _check, _run, check_targets, one_list


def project(model: torch.nn.Module, vectors: torch.Tensor, *, k: int = 10, largest: bool = True,
            final_norm: bool = True, normalize: bool = False, impl: str = "auto",
            adapter: Adapter | None = None) -> TopK:
    """Top-k (``largest=False``: bottom-k) tokens of ``vectors`` (``(..., d)``) read through ``model``'s lens.

    ``normalize=True`` scales each vector to unit L2 norm first (the paper's normalised variant);
    ``final_norm`` applies the model's final LayerNorm/RMSNorm (with its weight and bias); the
    unembedding's bias is added when it has one (GPT-J). ``impl`` as in :func:`topk_logits`.
    """
    return one_list(largest, lambda **which: project_topk_bottomk(
        model, vectors, k=k, final_norm=final_norm, normalize=normalize, impl=impl, adapter=adapter, **which))


def project_topk_bottomk(model: torch.nn.Module, vectors: torch.Tensor, *, k: int = 10, top: bool = True,
                         bottom: bool = True, targets=None, final_norm: bool = True, normalize: bool = False,
                         impl: str = "auto", adapter: Adapter | None = None) -> TopBottomK:
    """Top-k and bottom-k tokens of ``vectors`` read through ``model``'s lens and each row's target rank, in one
    pass over the vocabulary (see :func:`blens_fast.ops.topk.topk_bottomk_logits`); arguments as in
    :func:`project`; ``targets``: one token id per vector (or one for all), or None.
    """
    lens = get_adapter(model, adapter).lens(model)
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
        raise ValueError(f"vectors are on {vectors.device} but the model is on {weight.device}: "
                         "move one of them first")
    for name, flag in (("final_norm", final_norm), ("normalize", normalize)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}: {flag!r}")
    bias = lens.bias.detach() if lens.bias is not None else None
    if vectors.dtype not in DTYPES:  # float64 and friends: the kernels take float32
        vectors = vectors.float()
    use_norm = final_norm and lens.norm_kind is not None
    plain = not use_norm and not normalize  # the vectors go into the GEMM as they are
    if plain:
        vectors = vectors.to(weight.dtype)
    hidden, weight, bias, k, lead = _check(vectors, weight, bias, k, impl, top=top, bottom=bottom)
    target_ids = check_targets(targets, lead, v, weight.device)
    if plain:
        return _run(hidden, weight, bias, k, impl, lead, top=top, bottom=bottom, targets=target_ids, prologue=None)

    norm_lens = lens if use_norm else dataclasses.replace(lens, norm_kind=None)

    def reference_norm(h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        if normalize:
            h = F.normalize(h, dim=-1)
        return norm_lens.normalize(h)

    # a one-read pass over N x d for two coefficients per row; the kernels normalise per block
    with torch.no_grad():
        a, c = reference.row_norm_coefficients(hidden, norm_lens.norm_kind, norm_lens.eps, normalize)
    nw = lens.norm_weight.detach().float().contiguous() if use_norm else None
    nb = lens.norm_bias.detach().float().contiguous() if use_norm and lens.norm_bias is not None else None
    prologue = Prologue(a, c, nw, nb, reference=reference_norm)
    return _run(hidden, weight, bias, k, impl, lead, top=top, bottom=bottom, targets=target_ids, prologue=prologue)
