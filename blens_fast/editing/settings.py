"""The complete settings of an edit (:class:`EditSettings`), resolved and checked once, before any work
(:func:`resolve_settings`): given values win, missing ones come from the model's calibration (:mod:`.calibration`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .._checks import check_choice, check_positive_int
from ..context import ModelContext
from .calibration import calibrated_defaults, uncalibrated_settings, variant_name
from .whitening import Whitening, ff2_whitening

METHODS = ("forward_shift", "gradient")


@dataclass(frozen=True)
class EditSettings:
    """What an edit will do, every value checked: ``method`` at ``layer``; for the forward shift ``scale`` (a number
    or ``"auto"`` with ``margin``), the key (``whiten``: False, True or an estimated :class:`Whitening`;
    ``normalize_key``) and ``skip_if_argmax``; for the gradient ``steps`` of size ``lr``. ``variant`` names the
    calibration entry these settings answer to, ``source`` where the missing values came from (``"given"``,
    ``"given defaults"``, ``"calibration"`` or ``"uncalibrated default"``). Pass it as ``edit(..., settings=...)`` to
    make many edits with one resolution."""

    method: str
    layer: int
    variant: str
    source: str
    scale: float | str | None = None
    margin: float | None = None
    whiten: bool | Whitening = False
    normalize_key: bool = False
    skip_if_argmax: bool = True
    steps: int | None = None
    lr: float | None = None

    @property
    def auto(self) -> bool:
        """Whether the scale is chosen from the last position's logits (``scale="auto"``)."""
        return self.scale == "auto"

    def with_whitening(self, ctx: ModelContext, *, progress: bool = True) -> "EditSettings":
        """These settings with ``whiten=True`` replaced by the layer's estimated :class:`Whitening`."""
        if self.whiten is not True:
            return self
        return dataclasses.replace(self, whiten=ff2_whitening(ctx, self.layer, progress=progress))

    def to_record(self) -> dict:
        """The settings as plain JSON values (a Whitening as its description), without the ones that do not apply."""
        if self.method == "gradient":
            values = {"layer": self.layer, "steps": self.steps, "lr": self.lr}
        else:
            values = {"layer": self.layer, "scale": self.scale, "margin": self.margin if self.auto else None,
                      "whiten": _describe(self.whiten) if self.whiten is not False else None,
                      "normalize_key": True if self.normalize_key else None,
                      "skip_if_argmax": False if not self.skip_if_argmax else None}
        values.update(variant=self.variant, source=self.source)
        return {key: value for key, value in values.items() if value is not None}


def _describe(whiten) -> bool | str:
    if isinstance(whiten, Whitening):
        return f"Whitening(layer={whiten.layer}, ridge={whiten.ridge}, tokens={whiten.num_tokens})"
    return whiten


def resolve_settings(ctx: ModelContext, method: str = "forward_shift", *, layer=None, scale=None, margin=None,
                     steps=None, lr=None, whiten=False, normalize_key: bool = False, skip_if_argmax: bool = True,
                     calibration=None, defaults: dict | None = None) -> EditSettings:
    """The complete :class:`EditSettings` an edit will use, checked before any work.

    Given values win; missing ones come from ``defaults`` (a dict of settings) or the model's calibration
    (``calibration=PATH``, the shipped one, the paper's GPT-2 XL setting; see :mod:`.calibration`) when it has an
    entry for this variant at this layer, and otherwise from the documented uncalibrated default (the last layer,
    ``scale="auto"``; for the gradient, a step size relative to the weight's norm)."""
    check_choice(method, "method", METHODS)
    if isinstance(scale, str) and scale != "auto":
        raise ValueError(f"scale={scale!r}: expected a number or 'auto'")
    if method == "gradient" and (whiten is not False or normalize_key or scale is not None or margin is not None):
        raise ValueError("whiten, normalize_key, scale and margin apply to method='forward_shift' only")
    if whiten is not True and whiten is not False and not isinstance(whiten, Whitening):
        raise TypeError(f"whiten must be True, False or a Whitening, got {type(whiten).__name__}")
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
    values = {key: found.get(key) if value is None else value for key, value in given.items()}
    if values["layer"] is None:
        raise ValueError(f"no layer for {name!r} on this model: pass layer= (--layer on the command line)")
    (values["layer"],) = ctx.check_layers([values["layer"]])
    if method == "gradient":
        values["steps"] = check_positive_int(5 if values["steps"] is None else values["steps"], "steps")
        _check_number(values["lr"], "lr", name, positive=True)
        values["lr"] = float(values["lr"])
    elif values["scale"] == "auto" or (values["scale"] is None and values["margin"] is not None):
        values["scale"] = "auto"
        name = variant_name(method, whiten=whiten is not False, normalize_key=normalize_key, auto=True)
        if values["layer"] != ctx.num_layers - 1:
            raise ValueError(f"scale='auto' needs the edit at the last layer ({ctx.num_layers - 1}), got "
                             f"layer={values['layer']}: only there is the shift's effect on the logits exact")
        _check_number(values["margin"], "margin", name)
        values["margin"] = float(values["margin"])
    else:
        _check_number(values["scale"], "scale", name, positive=True)
        values["scale"] = float(values["scale"])
        values["margin"] = None  # applies to scale="auto" only
    if isinstance(whiten, Whitening) and whiten.layer != values["layer"]:
        raise ValueError(f"the Whitening was estimated at layer {whiten.layer}, the edit is at layer "
                         f"{values['layer']}")
    used = [key for key, value in given.items() if value is None and values[key] is not None]
    extra = {} if method == "gradient" else {"whiten": whiten, "normalize_key": bool(normalize_key),
                                             "skip_if_argmax": bool(skip_if_argmax)}
    return EditSettings(method=method, variant=name, source=source if used else "given", **values, **extra)


def _check_number(value, name, variant, *, positive=False):
    if value is None:
        raise ValueError(f"no {name} for {variant!r} on this model: pass {name}= (--{name} on the command line) or "
                         "calibrate one with blens eval-counterfact --calibrate FILE")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0):
        raise ValueError(f"{name}={value!r}: expected a {'positive ' if positive else ''}finite number")
