"""Calibration: choose each edit variant's layer and scale (``margin`` for ``scale="auto"``, ``lr`` for the gradient)
on CounterFact records disjoint from the evaluated ones. The record it returns is what ``edit(...,
calibration=PATH)`` and ``blens eval-counterfact --calibration PATH`` read."""
from __future__ import annotations

import time

import torch

from ..context import ModelContext, with_context
from ..editing import ff2_whitening
from ..forward import forward_hidden
from .harness import evaluate_counterfact
from .records import check_records
from .tradeoff import MARGIN_GRID, Sweep, last_layer_sweep

#: efficacy (MEMIT-style argmax, percent) a calibrated setting must reach on the calibration records
CALIBRATION_EFFICACY = 95.0
#: shift sizes (residual-stream units, i.e. the normalised key's scale) tried at the last layer (exact sweep)
SHIFT_GRID = tuple(float(8 * 2 ** k) for k in range(9))  # 8 ... 2048
#: the coarser grid tried at the other layers (real edit + forward per record)
SHIFT_GRID_COARSE = (8.0, 32.0, 128.0, 512.0, 2048.0)
LR_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _harmonic(m: dict) -> float:
    values = [m[k] for k in ("efficacy", "paraphrase", "neighborhood")]
    return 0.0 if min(values) <= 0 else len(values) / sum(1.0 / v for v in values)


def select(points: list[dict]) -> dict:
    """Among points reaching :data:`CALIBRATION_EFFICACY`, the best harmonic mean of efficacy, paraphrase and
    neighborhood (MEMIT-style); without any, the most efficacious point."""
    ok = [p for p in points if p["memit_argmax"]["efficacy"] >= CALIBRATION_EFFICACY]
    if ok:
        return max(ok, key=lambda p: (_harmonic(p["memit_argmax"]), p["memit_argmax"]["neighborhood"]))
    return max(points, key=lambda p: (p["memit_argmax"]["efficacy"], p["memit_argmax"]["neighborhood"]))


def median_key_norm(ctx: ModelContext, records, layer: int) -> float:
    """Median of ``a_n . a_n`` (FF2 input at the prompt's last token) over the records' prompts."""
    examples = ctx.tokenize([r["prompt"] for r in records], [r["target_new"] for r in records])
    ids, mask = ctx.pad([e.prompt_ids for e in examples])
    ff2 = forward_hidden(ctx, ids, mask, ff2_layers=[layer]).ff2_inputs[layer]
    a = ff2[torch.arange(len(examples)), mask.sum(1) - 1].double()
    return float((a * a).sum(-1).median())


@with_context
def calibrate(ctx: ModelContext, records, *, n: int | None = None, start: int = 0, progress: bool = True,
              n_other_layers: int = 100, n_gradient: int = 50) -> dict:
    """Choose ``layer`` and ``scale`` (``margin`` for scale='auto', ``lr`` for the gradient) per variant.

    ``records`` must be disjoint from the evaluated ones (``start`` only labels where they begin). Last layer: the
    exact sweep (:func:`~.tradeoff.last_layer_sweep`) on the first ``n`` records, shift sizes :data:`SHIFT_GRID` (the
    paper's raw key: divided by the layer's median ``a_n . a_n``) and margins :data:`~.tradeoff.MARGIN_GRID`. Other
    layers: the real edit + forward on the first ``n_other_layers`` records with :data:`SHIFT_GRID_COARSE` (paper
    and whitened keys). Gradient: the last two layers, step sizes :data:`LR_GRID` x 5 steps on ``n_gradient``
    records. Per layer the real-path values go up until efficacy reaches 99%. Selection: :func:`select`. Returns
    the calibration record (``fingerprint``, ``variants``, ``how``, and ``grid`` with every point).
    """
    records, n = check_records(records, n)
    last = ctx.num_layers - 1
    n_other, n_grad = min(n_other_layers, n), min(n_gradient, n)
    started = time.perf_counter()
    grid: dict[str, list[dict]] = {}

    def keep(name, layer, key, value, row):
        grid.setdefault(name, []).append({"layer": layer, key: value, "n": row["n"],
                                          "memit_argmax": row["memit_argmax"],
                                          "rome_probability": row["rome_probability"]})

    key_norms = {layer: median_key_norm(ctx, records[:n_other], layer) for layer in range(last + 1)}
    variants = {
        "forward_shift": Sweep({"layer": last}, "scale", tuple(s / key_norms[last] for s in SHIFT_GRID)),
        "forward_shift_whitened": Sweep({"layer": last, "whiten": True}, "scale", SHIFT_GRID),
        "forward_shift_normalized_auto": Sweep({"layer": last, "normalize_key": True, "scale": "auto"}, "margin",
                                               MARGIN_GRID),
        "forward_shift_whitened_auto": Sweep({"layer": last, "whiten": True, "scale": "auto"}, "margin", MARGIN_GRID),
    }
    for point in last_layer_sweep(ctx, records, variants, n=n, progress=progress):
        keep(point["variant"], last, point["key"], point["value"], point)

    def real(name, method, kwargs, key, values, count):
        for value in values:
            row = evaluate_counterfact(ctx, records, method=method, n=count, fluency=False, progress=progress,
                                       label=f"{name} layer={kwargs['layer']} {key}={value:g}",
                                       **{**kwargs, key: value})
            keep(name, kwargs["layer"], key, value, row)
            if row["memit_argmax"]["efficacy"] >= 99.0:
                break

    for layer in range(last):
        real("forward_shift", "forward_shift", {"layer": layer}, "scale",
             [s / key_norms[layer] for s in SHIFT_GRID_COARSE], n_other)
        real("forward_shift_whitened", "forward_shift",
             {"layer": layer, "whiten": ff2_whitening(ctx, layer, progress=progress)}, "scale", SHIFT_GRID_COARSE,
             n_other)
    for layer in sorted({last, max(last - 1, 0)}):
        real("gradient", "gradient", {"layer": layer, "steps": 5}, "lr", LR_GRID, n_grad)
    chosen = {}
    for name, points in grid.items():
        best = select(points)
        settings = {k: v for k, v in best.items() if k not in ("memit_argmax", "rome_probability", "n")}
        if name == "gradient":
            settings["steps"] = 5
        settings["calibration_memit_argmax"] = best["memit_argmax"]
        settings["calibration_records"] = best["n"]
        chosen[name] = settings
    return {
        "fingerprint": ctx.fingerprint(),
        "variants": chosen,
        "how": (f"`blens eval-counterfact --calibrate FILE --start {start} --n {n}`: records {start}-{start + n - 1} of "
                "the CounterFact edit file, disjoint from the evaluated records. Last layer: exact sweep "
                f"(last_layer_sweep) on all {n} records, shift sizes {[round(x, 2) for x in SHIFT_GRID]} (the paper's "
                f"raw key a_n: divided by the layer's median a_n.a_n), margins {list(MARGIN_GRID)} for "
                f"scale='auto'. Other layers: real edit + forward on the first {n_other} records, shift sizes "
                f"{list(SHIFT_GRID_COARSE)} (paper and whitened keys). Gradient baseline: the last two layers, lr "
                f"{list(LR_GRID)} x 5 steps on the first {n_grad} records. Real-path values go up until efficacy "
                f"reaches 99%. Chosen per variant: among settings with MEMIT-style efficacy >= "
                f"{CALIBRATION_EFFICACY}%, the best harmonic mean of efficacy, paraphrase and neighborhood "
                "(MEMIT-style); if none reaches it, the most efficacious."),
        "median_key_norm": {str(k): v for k, v in key_norms.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "grid": grid,
    }
