"""Reversible fact edits: the Backward Lens forward shift (no backward pass) and a gradient baseline.

:func:`edit` is the public call; the pieces live beside it: :mod:`.update` (the :class:`Edit` object, its
per-model stack, save/load), :mod:`.forward_shift`, :mod:`.whitening`, :mod:`.auto_scale`, :mod:`.gradient`, and
:mod:`.calibration` (where missing settings come from).
"""
from __future__ import annotations

import warnings

from .._checks import as_str_list
from ..context import ModelContext, with_context
from .calibration import calibrated_defaults, variant_name
from .forward_shift import forward_shift_edit
from .gradient import gradient_edit
from .settings import METHODS, EditSettings, resolve_settings
from .update import Edit, Update, applied_edits
from .whitening import Whitening, ff2_whitening

__all__ = ["Edit", "EditSettings", "EditSkipped", "METHODS", "Update", "Whitening", "applied_edits",
           "calibrated_defaults", "edit", "ff2_whitening", "resolve_settings", "variant_name"]


class EditSkipped(UserWarning):
    """An edit left some of its facts unchanged (``info["skipped"]``): the warning names each and why."""


@with_context
def edit(ctx: ModelContext, prompt, target, *, method: str = "forward_shift", layer: int | None = None, scale=None,
         whiten=False, normalize_key: bool = False, margin: float | None = None, skip_if_argmax: bool = True,
         steps: int | None = None, lr: float | None = None, calibration=None, defaults=None,
         settings: EditSettings | None = None, progress: bool = True) -> Edit:
    """Edit the model in place so that ``prompt`` continues with ``target``; returns the applied :class:`Edit`.

    Called as ``edit(model, tokenizer, prompt, target)`` or ``edit(ctx, prompt, target)``. ``prompt`` / ``target``:
    a string each, or equal-length lists (several facts in one edit). ``method="forward_shift"``: one forward pass,
    no backward (see :mod:`.forward_shift` for ``whiten``, ``normalize_key``, ``scale="auto"`` with ``margin``,
    ``skip_if_argmax``). ``method="gradient"``: ``steps`` normalised gradient steps of Frobenius size ``lr`` on
    ``mlp.out`` at ``layer``. Missing ``layer``/``scale``/``margin``/``steps``/``lr`` come from ``defaults``, the
    model's calibration (``calibration=PATH``, the shipped one, the paper's GPT-2 XL setting), or the documented
    uncalibrated default (the last layer, ``scale="auto"``): see :func:`resolve_settings`; ``info["source"]`` of the
    result says which. ``settings``: an :class:`EditSettings` resolved before, instead of the separate settings
    (many edits, one resolution). On any error the model is left untouched. ``progress``: a bar while whitening
    statistics are estimated (the first ``whiten=True`` edit of a model).
    """
    prompts = as_str_list(prompt, "prompt")
    targets = as_str_list(target, "target")
    examples = ctx.tokenize(prompts, targets)
    if settings is None:
        settings = resolve_settings(ctx, method, layer=layer, scale=scale, margin=margin, steps=steps, lr=lr,
                                    whiten=whiten, normalize_key=normalize_key, skip_if_argmax=skip_if_argmax,
                                    calibration=calibration, defaults=defaults)
    elif not isinstance(settings, EditSettings):
        raise TypeError(f"settings must be an EditSettings (from resolve_settings), got {type(settings).__name__}")
    else:
        given = {"layer": layer, "scale": scale, "margin": margin, "steps": steps, "lr": lr, "calibration": calibration,
                 "defaults": defaults}
        clash = [key for key, value in given.items() if value is not None] + [
            key for key, value, default in (("method", method, "forward_shift"), ("whiten", whiten, False),
                                            ("normalize_key", normalize_key, False),
                                            ("skip_if_argmax", skip_if_argmax, True)) if value != default]
        if clash:
            raise ValueError(f"settings= already holds every setting: leave out {', '.join(clash)}")
    info = {"method": settings.method, "variant": settings.variant, "source": settings.source,
            "layer": settings.layer, "prompts": prompts, "targets": targets,
            "target_token_ids": [e.target_ids[0] for e in examples]}
    if settings.method == "gradient":
        return gradient_edit(ctx, examples, settings.layer, settings.steps, settings.lr, info)
    settings = settings.with_whitening(ctx, progress=progress)
    whitened = settings.whiten is not False
    info.update(whiten=whitened, normalize_key=settings.normalize_key or whitened,
                skip_if_argmax=settings.skip_if_argmax)
    applied = forward_shift_edit(ctx, examples, settings, info)
    _warn_skipped(applied.info)
    return applied


def _warn_skipped(info: dict) -> None:
    """An :class:`EditSkipped` warning naming every fact the forward shift left unchanged, and why."""
    from .auto_scale import MAX_SHIFT

    auto = info["scale"] == "auto"
    reasons = []
    for prompt, target, skipped, already in zip(info["prompts"], info["targets"], info["skipped"],
                                                info["already_argmax"]):
        if not skipped:
            continue
        if already:
            why = (f"the model already predicts it with a logit lead of at least margin={info['margin']:g}" if auto
                   else "the model already predicts it (skip_if_argmax=True)")
        else:
            why = (f"no shift at layer {info['layer']} up to {MAX_SHIFT:g} x the residual's norm makes it the "
                   "model's top prediction")
        reasons.append(f"{prompt!r} -> {target!r}: {why}")
    if reasons:
        count = len(info["skipped"])
        what = "the edit changes nothing" if len(reasons) == count else (
            f"{len(reasons)} of its {count} facts {'is' if len(reasons) == 1 else 'are'} left unchanged")
        warnings.warn(f"edit skipped ({what}): " + "; ".join(reasons), EditSkipped, stacklevel=4)
