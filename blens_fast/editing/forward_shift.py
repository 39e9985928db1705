"""The forward shift (Katz et al., 2024, "Backward Lens", editing without a backward pass).

One forward pass of the prompt gives ``a_n``, the input of the MLP output projection (FF2; ``mlp.out``) at the
prompt's last token. The edit adds to that projection, at one layer, the outer product of a key built from ``a_n``
and the *input* embedding ``e_t`` of the target's first token::

    W_FF2 += scale * outer(key, e_t)        # in [in, out] terms; written in the weight's own layout

so that at the prompt's last token the MLP output moves by ``scale * (key . a_n) * e_t``. Keys:

* paper (default): ``key = a_n``. The paper uses GPT-2 XL, layer 35 of 48, scale 0.24, and skips the edit when
  the target already is the argmax (``skip_if_argmax=True``; the same forward pass answers it).
* ``normalize_key=True``: ``key = a_n / (a_n . a_n)``, so the residual stream moves by exactly ``scale * e_t``.
* ``whiten=True`` (beyond the paper): ``key = C^-1 a_n / (a_n^T C^-1 a_n)`` (:mod:`.whitening`).
* ``scale="auto"`` (beyond the paper; last layer only): the smallest shift giving the target a logit lead of
  ``margin`` (:mod:`.auto_scale`); the scale is that shift divided by the key's response ``key . a_n``, so any key
  (raw, normalised or whitened) moves the residual by exactly the shift.

Several facts at once: the per-fact outer products are summed. With ``normalize_key`` or ``whiten`` the keys are
solved jointly (``K = C^-1 A (A^T C^-1 A + eps I)^-1``, ``C = I`` without whitening) so that each key answers 1 to
its own ``a_n`` and 0 to the other edited prompts' ``a_n``; the paper's raw keys are summed.
"""
from __future__ import annotations

import torch

from ..context import ModelContext
from ..forward import forward_hidden
from .auto_scale import auto_shifts
from .settings import EditSettings
from .update import Edit, Update
from .whitening import Whitening


def forward_shift_edit(ctx: ModelContext, examples, settings: EditSettings, info: dict) -> Edit:
    """Build and apply the forward-shift edit of ``examples`` (``settings`` resolved, its whitening estimated)."""
    layer = settings.layer
    ids, mask = ctx.pad([e.prompt_ids for e in examples])
    last = mask.sum(1) - 1
    rows = torch.arange(len(examples), device=ctx.device)
    found = forward_hidden(ctx, ids, mask, ff2_layers=[layer], pre_norm=settings.auto)
    logits = ctx.lens.logits(found.hidden[rows, last])
    ff2 = found.ff2_inputs[layer]
    cdt = torch.float64 if ff2.dtype == torch.float64 else torch.float32
    a = ff2[rows, last].to(cdt)
    tokens = torch.tensor([e.target_ids[0] for e in examples], device=ctx.device)
    already = logits.argmax(-1) == tokens
    if not torch.isfinite(a).all():
        raise ValueError("the FF2 input at the prompt's last token is not finite: check the model's weights")
    keep = kept_facts(settings, already)
    if bool((a.norm(dim=-1)[keep] == 0).any()):
        raise ValueError("the FF2 input at the prompt's last token is zero: no key can address it")
    keys = edit_keys(a, keep, settings.whiten or None, settings.normalize_key)
    embed = ctx.embedding_matrix[tokens].to(cdt)
    shifts = None
    if settings.auto:
        shifts = auto_shifts(ctx, found.pre_norm[rows, last].float(), embed, tokens, settings.margin).to(cdt)
        info.update(scale="auto", margin=settings.margin, shifts=shifts.tolist())
    else:
        info.update(scale=settings.scale)
    scales, keep = shift_scales(settings, keys, a, already, shifts)
    info.update(scales=scales.tolist(), skipped=(~keep).tolist(), already_argmax=already.tolist())
    edited = keep.nonzero().flatten()
    updates = []
    if len(edited):
        k = keys[edited] * scales[edited, None]
        e = embed[edited]
        left, right = (k, e) if ctx.adapter.weight_layout == "in_out" else (e, k)
        updates.append(Update(layer, "mlp.out", left.contiguous(), right.contiguous()))
    return Edit(updates, info).apply(ctx)


def kept_facts(settings: EditSettings, already: torch.Tensor, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """Which facts are edited: with ``skip_if_argmax`` (fixed scales only) not those whose target already is the
    argmax; with ``scale="auto"`` only those with a wanted shift (``shifts`` > 0)."""
    keep = ~already if settings.skip_if_argmax and not settings.auto else torch.ones_like(already)
    return keep if shifts is None else keep & (shifts > 0)


def shift_scales(settings: EditSettings, keys: torch.Tensor, a: torch.Tensor, already: torch.Tensor,
                 shifts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per fact (rows of ``keys`` and of ``a``, its FF2 input at the prompt's last token), the scale of its outer
    product and whether it is edited at all: ``settings.scale``, or for ``scale="auto"`` the wanted shift divided by
    the key's response ``key . a_n`` (``shifts``, from :func:`.auto_scale.auto_shifts`); 0 where not edited.
    At any position p the edit then moves the residual stream by ``scale * (key . a_p) * e_target``."""
    keep = kept_facts(settings, already, shifts)
    if settings.auto:
        response = (keys * a).sum(-1)
        scales = torch.where(keep, shifts / response, torch.zeros_like(shifts))
    else:
        scales = torch.where(keep, torch.full_like(keys[:, 0], settings.scale), torch.zeros_like(keys[:, 0]))
    return scales, keep


def edit_keys(a: torch.Tensor, keep: torch.Tensor, whitening: Whitening | None, normalize_key: bool) -> torch.Tensor:
    """Keys per fact (rows of ``a``); rows not kept are returned as they are and never used."""
    if whitening is None and not normalize_key:
        return a
    keys = a.clone()
    index = keep.nonzero().flatten()
    if len(index) == 0:
        return keys
    rows = a[index].double()
    cinv_a = rows if whitening is None else rows @ whitening.inverse.to(rows.device).double()  # symmetric
    gram = rows @ cinv_a.T  # A^T C^-1 A
    solved = torch.linalg.pinv(gram, hermitian=True, rtol=1e-10) @ cinv_a  # pinv: repeated prompts are fine
    keys[index] = solved.to(keys.dtype)
    return keys
