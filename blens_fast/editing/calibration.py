"""Where an edit's layer and scale come from when the caller does not give them.

In this order: the caller's ``calibration=`` file (written by ``blens eval-counterfact --calibrate FILE``), the
shipped calibration of the default model (``blens_fast/default_model/edit_defaults.json``), the paper's setting for
GPT-2 XL; each matched by the model's fingerprint. A model with none of these gets the documented uncalibrated
default, which needs no calibration run: the last layer, with the scale chosen from the last position's logits
(``scale="auto"``, margin :data:`UNCALIBRATED_MARGIN`); for ``method="gradient"`` the last layer,
:data:`UNCALIBRATED_STEPS` steps of Frobenius size :data:`UNCALIBRATED_LR_FRACTION` x ``||W||_F``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .._io import read_json
from ..context import ModelContext

DEFAULTS_FILE = Path(__file__).resolve().parents[1] / "default_model" / "edit_defaults.json"
#: the paper's setting for GPT-2 XL (48 layers, width 1600): layer 35, scale 0.24, raw keys
PAPER_SETTINGS = {("gpt2", 48, 1600): {"forward_shift": {"layer": 35, "scale": 0.24}}}
#: logit lead the uncalibrated default (scale="auto" at the last layer) gives the target
UNCALIBRATED_MARGIN = 1.0
UNCALIBRATED_STEPS = 5
#: the uncalibrated gradient step's Frobenius size, as a fraction of the edited weight's norm
UNCALIBRATED_LR_FRACTION = 0.05


def variant_name(method: str, *, whiten=False, normalize_key=False, auto=False) -> str:
    """The calibration entry a set of options reads: ``forward_shift[_normalized|_whitened][_auto]`` or
    ``gradient``."""
    if method == "gradient":
        return "gradient"
    name = "forward_shift" + ("_whitened" if whiten else "_normalized" if normalize_key else "")
    return name + ("_auto" if auto else "")


def calibrated_defaults(ctx: ModelContext, path=None) -> dict:
    """The calibration entries for the model (variant name -> settings), or ``{}`` when it has none.

    Read from ``path`` (default: ``$BLENS_FAST_EDIT_DEFAULTS`` or the shipped file) when its ``fingerprint`` matches
    the model's (a ``ValueError`` when an explicitly given file belongs to another model); else the paper's setting
    for GPT-2 XL; else nothing."""
    explicit = path is not None
    path = Path(path) if explicit else Path(os.environ.get("BLENS_FAST_EDIT_DEFAULTS", DEFAULTS_FILE))
    if explicit or path.is_file():
        record = read_json(path, "calibration file")
        if not isinstance(record, dict) or "variants" not in record:
            raise ValueError(f"calibration file {str(path)!r} has no 'variants': write one with "
                             "blens eval-counterfact --calibrate FILE")
        if record.get("fingerprint") == ctx.fingerprint():
            return record["variants"]
        if explicit:
            raise ValueError(f"calibration file {str(path)!r} was made for another model (fingerprint "
                             f"{record.get('fingerprint')}, this model's is {ctx.fingerprint()})")
    config = ctx.model.config
    key = (getattr(config, "model_type", None), getattr(config, "num_hidden_layers", None),
           getattr(config, "hidden_size", None))
    return PAPER_SETTINGS.get(key, {})


def uncalibrated_settings(ctx: ModelContext, method: str, layer: int | None = None) -> dict:
    """The documented default of a model without calibration (module docstring); ``layer`` (gradient only)
    overrides the last layer."""
    last = ctx.num_layers - 1
    if method == "gradient":
        (layer,) = ctx.check_layers([last if layer is None else layer])
        norm = float(ctx.weight(layer, "mlp.out").detach().float().norm())
        return {"layer": layer, "steps": UNCALIBRATED_STEPS, "lr": UNCALIBRATED_LR_FRACTION * norm}
    return {"layer": last, "scale": "auto", "margin": UNCALIBRATED_MARGIN}
