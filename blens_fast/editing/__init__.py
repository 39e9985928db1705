"""Reversible fact edits: the Backward Lens forward shift (no backward pass) and a gradient baseline.

:func:`edit` is the public call; the pieces live beside it: :mod:`.update` (the :class:`Edit` object, its
per-model stack, save/load), :mod:`.forward_shift`, :mod:`.whitening`, :mod:`.auto_scale`, :mod:`.gradient`, and
:mod:`.calibration` (where missing settings come from).
"""
from __future__ import annotations

import math
import warnings

from .._checks import as_str_list, check_choice, check_positive_int
from ..context import ModelContext, with_context
from .calibration import calibrated_defaults, uncalibrated_settings, variant_name
from .forward_shift import forward_shift_edit
from .gradient import gradient_edit
from .update import Edit, Update, applied_edits
from .whitening import Whitening, ff2_whitening

METHODS = ("forward_shift", "gradient")

__all__ = ["Edit", "EditSkipped", "METHODS", "Update", "Whitening", "applied_edits", "calibrated_defaults", "edit",
           "ff2_whitening", "resolve_settings", "variant_name"]


class EditSkipped(UserWarning):
    """An edit left some of its facts unchanged (``info["skipped"]``): the warning names each and why."""


def resolve_settings(ctx: ModelContext, method: str = "forward_shift", *, layer=None, scale=None, margin=None,
                     steps=None, lr=None, whiten=False, normalize_key: bool = False, calibration=None,
                     defaults: dict | None = None) -> dict:
    """The complete settings an edit will use, checked before any work: ``layer``, then ``scale`` (a number or
    ``"auto"``) and ``margin`` or ``steps`` and ``lr``; ``variant``; ``source`` (where they came from).

    Given values win; missing ones come from ``defaults`` (a dict of settings) or the model's calibration
    (``calibration=PATH``, the shipped one, the paper's GPT-2 XL setting; see :mod:`.calibration`) when it has an
    entry for this variant at this layer, and otherwise from the documented uncalibrated default (the last layer,
    ``scale="auto"``; for the gradient, a step size relative to the weight's norm)."""
    check_choice(method, "method", METHODS)
    if isinstance(scale, str) and scale != "auto":
        raise ValueError(f"scale={scale!r}: expected a number or 'auto'")
    if method == "gradient" and (whiten is not False or normalize_key or scale is not None or margin is not None):
        raise ValueError("whiten, normalize_key, scale and margin apply to method='forward_shift' only")
    name = variant_name(method, whiten=whiten is not False, normalize_key=normalize_key, auto=scale == "auto")
    if defaults is not None:
        found, source = dict(defaults), "given defaults"
    else:
        found, source = dict(calibrated_defaults(ctx, calibration).get(name, {})), "calibration"
    if layer is not None and found.get("layer") is not None and (found["layer"] - layer) % ctx.num_layers != 0:
        found = {}  # the calibrated values belong to another layer
    if not found:
        found, source = uncalibrated_settings(ctx, method, layer), "uncalibrated default"
    given = {"layer": layer, "steps": steps, "lr": lr} if method == "gradient" else {
        "layer": layer, "scale": scale, "margin": margin}
    settings = {key: found.get(key) if value is None else value for key, value in given.items()}
    if settings["layer"] is None:
        raise ValueError(f"no layer for {name!r} on this model: pass layer= (--layer on the command line)")
    (settings["layer"],) = ctx.check_layers([settings["layer"]])
    if method == "gradient":
        settings["steps"] = check_positive_int(5 if settings["steps"] is None else settings["steps"], "steps")
        _check_number(settings["lr"], "lr", name, positive=True)
    elif settings["scale"] == "auto" or (settings["scale"] is None and settings["margin"] is not None):
        settings["scale"] = "auto"
        name = variant_name(method, whiten=whiten is not False, normalize_key=normalize_key, auto=True)
        if settings["layer"] != ctx.num_layers - 1:
            raise ValueError(f"scale='auto' needs the edit at the last layer ({ctx.num_layers - 1}), got "
                             f"layer={settings['layer']}: only there is the shift's effect on the logits exact")
        _check_number(settings["margin"], "margin", name)
    else:
        _check_number(settings["scale"], "scale", name, positive=True)
    used = [key for key, value in given.items() if value is None and found.get(key) is not None]
    settings.update(variant=name, source=source if used else "given")
    return settings


def _check_number(value, name, variant, *, positive=False):
    if value is None:
        raise ValueError(f"no {name} for {variant!r} on this model: pass {name}= (--{name} on the command line) or "
                         "calibrate one with blens eval-counterfact --calibrate FILE")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0):
        raise ValueError(f"{name}={value!r}: expected a {'positive ' if positive else ''}finite number")


@with_context
def edit(ctx: ModelContext, prompt, target, *, method: str = "forward_shift", layer: int | None = None, scale=None,
         whiten=False, normalize_key: bool = False, margin: float | None = None, skip_if_argmax: bool = True,
         steps: int | None = None, lr: float | None = None, calibration=None, defaults=None,
         progress: bool = True) -> Edit:
    """Edit the model in place so that ``prompt`` continues with ``target``; returns the applied :class:`Edit`.

    Called as ``edit(model, tokenizer, prompt, target)`` or ``edit(ctx, prompt, target)``. ``prompt`` / ``target``:
    a string each, or equal-length lists (several facts in one edit). ``method="forward_shift"``: one forward pass,
    no backward (see :mod:`.forward_shift` for ``whiten``, ``normalize_key``, ``scale="auto"`` with ``margin``,
    ``skip_if_argmax``). ``method="gradient"``: ``steps`` normalised gradient steps of Frobenius size ``lr`` on
    ``mlp.out`` at ``layer``. Missing ``layer``/``scale``/``margin``/``steps``/``lr`` come from ``defaults``, the
    model's calibration (``calibration=PATH``, the shipped one, the paper's GPT-2 XL setting), or the documented
    uncalibrated default (the last layer, ``scale="auto"``): see :func:`resolve_settings`; ``info["source"]`` of the
    result says which. On any error the model is left untouched. ``progress``: a bar while whitening statistics
    are estimated (the first ``whiten=True`` edit of a model).
    """
    prompts = as_str_list(prompt, "prompt")
    targets = as_str_list(target, "target")
    examples = ctx.tokenize(prompts, targets)
    settings = resolve_settings(ctx, method, layer=layer, scale=scale, margin=margin, steps=steps, lr=lr,
                                whiten=whiten, normalize_key=normalize_key, calibration=calibration,
                                defaults=defaults)
    layer = settings["layer"]
    info = {"method": method, "variant": settings["variant"], "source": settings["source"], "layer": layer,
            "prompts": prompts, "targets": targets, "target_token_ids": [e.target_ids[0] for e in examples]}
    if method == "gradient":
        return gradient_edit(ctx, examples, layer, settings["steps"], float(settings["lr"]), info)
    whitening = None
    if whiten is True:
        whitening = ff2_whitening(ctx, layer, progress=progress)
    elif isinstance(whiten, Whitening):
        if whiten.layer != layer:
            raise ValueError(f"the Whitening was estimated at layer {whiten.layer}, the edit is at layer {layer}")
        whitening = whiten
    elif whiten is not False:
        raise TypeError(f"whiten must be True, False or a Whitening, got {type(whiten).__name__}")
    info.update(whiten=whitening is not None, normalize_key=bool(normalize_key) or whitening is not None,
                skip_if_argmax=skip_if_argmax)
    applied = forward_shift_edit(ctx, examples, layer, settings["scale"], settings["margin"], whitening,
                                 normalize_key, skip_if_argmax, info)
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
