"""Trade-off sweeps of the forward-shift variants across scales (margins for ``scale="auto"``), their plots and the
result tables of the harness.

At the last layer the sweep is exact and cheap (:func:`last_layer_sweep`: one unedited forward pass per record,
the edited logits from :class:`~blens_fast.editing.auto_scale.LogitCurve`); at other layers each point is a real
edit + forward per record (:func:`sweep`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .._io import atomic_write_json, atomic_write_text, make_folder
from .._ui import progress_bar
from ..context import ModelContext
from ..editing import calibrated_defaults, ff2_whitening
from ..editing.auto_scale import LogitCurve
from ..editing.forward_shift import edit_keys
from ..forward import forward_hidden
from .harness import METRICS, Scorer, evaluate_counterfact, metrics, settings_record
from .records import check_records

#: shift sizes of the trade-off curves, as multiples of each variant's calibrated scale
SWEEP_FACTORS = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
#: margins swept for scale="auto"
MARGIN_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


def sweep(ctx: ModelContext, records, variants: dict, *, n=None, progress=True, fluency=False) -> list[dict]:
    """Evaluate each variant at each of its settings: ``variants`` maps a name to ``(edit_kwargs, key, values)``
    (e.g. ``({"layer": 3, "normalize_key": True}, "scale", [10, 30, 100])``). Returns one row per point with
    ``variant``, ``key`` and ``value`` added."""
    points = []
    for name, (kwargs, key, values) in variants.items():
        kwargs = dict(kwargs)
        if kwargs.get("whiten") is True:
            kwargs["whiten"] = ff2_whitening(ctx, kwargs["layer"], progress=progress)
        for value in values:
            row = evaluate_counterfact(ctx, records, n=n, label=f"{name} {key}={value:g}", fluency=fluency,
                                       progress=progress, **{**kwargs, key: value})
            row.update(variant=name, key=key, value=value)
            points.append(row)
    return points


def last_layer_sweep(ctx: ModelContext, records, variants: dict, *, n=None, progress=True) -> list[dict]:
    """Exact metrics of forward-shift edits at the last layer for many settings, from one unedited forward pass per
    record (no edit is applied).

    At the last layer the edit moves the residual stream entering the final norm, at every position p of every query,
    by ``scale * (key . a_p) * e_target`` and changes nothing else, so the edited logits follow from the unedited
    pre-norm residuals and FF2 inputs by :class:`LogitCurve`. ``variants`` maps a name to ``(options, key, values)``
    as in :func:`sweep` (options: ``normalize_key``, ``whiten``, ``skip_if_argmax``, ``scale="auto"`` with key
    ``"margin"``). Rows as :func:`sweep` (no fluency, no revert check: nothing is written). Tests check it against
    the real edit + forward path.
    """
    records, n = check_records(records, n)
    last = ctx.num_layers - 1
    plans = []
    for name, (options, key, values) in variants.items():
        options = dict(options)
        layer = options.pop("layer", last)
        if ctx.check_layers([layer])[0] != last:
            raise ValueError(f"last_layer_sweep: variant {name!r} is at layer {layer}, not the last layer ({last})")
        whiten = options.pop("whiten", False)
        if whiten is True:
            whiten = ff2_whitening(ctx, last, progress=progress)
        auto = options.pop("scale", None) == "auto"
        if auto != (key == "margin"):
            raise ValueError(f"variant {name!r}: sweep 'margin' with scale='auto', 'scale' otherwise")
        plans.append((name, whiten or None, bool(options.pop("normalize_key", False)),
                      options.pop("skip_if_argmax", True), auto, key, list(values)))
        if options:
            raise ValueError(f"variant {name!r}: unsupported options {sorted(options)}")
    counts = {(p[0], v): {"memit": dict.fromkeys(METRICS, 0), "rome": dict.fromkeys(METRICS, 0), "skipped": 0}
              for p in plans for v in p[6]}
    scorer = Scorer(ctx)
    started = time.perf_counter()
    for record in progress_bar(records[:n], desc="last-layer sweep", unit="rec", enabled=progress):
        prepared = scorer.prepare(record)
        rows, positions, tokens = prepared["rows"], prepared["positions"], prepared["tokens"]
        examples = prepared["examples"]
        found = forward_hidden(ctx, prepared["ids"], prepared["mask"], ff2_layers=[last], pre_norm=True)
        a = found.ff2_inputs[last][rows, positions].double()
        target = examples[0].target_ids[0]
        curve = LogitCurve(ctx, found.pre_norm[rows, positions], ctx.embedding_matrix[target])
        zeros = torch.zeros(len(rows), device=a.device)
        already = bool(curve.logits(zeros[:1], rows=torch.zeros(1, dtype=torch.long, device=a.device))[0].argmax()
                       == target)
        for name, whitening, normalize_key, skip, auto, key, values in plans:
            k = edit_keys(a[:1], torch.ones(1, dtype=torch.bool, device=a.device), whitening, normalize_key)[0]
            response = a @ k
            if auto:
                auto_shifts = dict(zip(values, curve.smallest_shifts(0, target, [float(v) for v in values])))
            for value in values:
                if auto:
                    shift = auto_shifts[value]
                    c = shift * response / response[0]
                    skipped = shift == 0
                else:
                    skipped = skip and already
                    c = zeros if skipped else float(value) * response
                result, _ = metrics(curve.logits(c.float()), examples, rows, tokens, prepared["n_scored"])
                total = counts[(name, value)]
                total["skipped"] += int(skipped)
                for family in ("memit", "rome"):
                    for metric in METRICS:
                        total[family][metric] += result[family][metric]
    seconds = round(time.perf_counter() - started, 1)
    points = []
    for name, whitening, normalize_key, skip, auto, key, values in plans:
        for value in values:
            total = counts[(name, value)]
            points.append({"variant": name, "key": key, "value": value, "n": n, "layer": last,
                           "exact_last_layer": True,
                           "memit_argmax": {m: 100.0 * total["memit"][m] / n for m in METRICS},
                           "rome_probability": {m: 100.0 * total["rome"][m] / n for m in METRICS},
                           "skipped": total["skipped"], "seconds_total_sweep": seconds})
    return points


def neighborhood_at_efficacy(points: list[dict], efficacy: float, *, family: str = "memit_argmax") -> float | None:
    """The best neighborhood accuracy a trade-off curve offers at an efficacy of at least ``efficacy``: over its sweep
    points with that efficacy and the point where the curve crosses it (linear interpolation between the two sweep
    points that bracket it). None when no point reaches ``efficacy``."""
    curve = sorted((p[family]["efficacy"], p[family]["neighborhood"]) for p in points)
    candidates = [nb for e, nb in curve if e >= efficacy]
    for (e0, n0), (e1, n1) in zip(curve, curve[1:]):
        if e0 < efficacy <= e1:
            candidates.append(n0 + (n1 - n0) * (efficacy - e0) / (e1 - e0))
    return max(candidates) if candidates else None


def plot_tradeoff(points: list[dict], path, *, rows: Sequence[dict] = (), title: str = "") -> None:
    """Efficacy against neighborhood (both families) per variant across its sweep, with reference rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    families = (("memit_argmax", "MEMIT-style argmax accuracy"), ("rome_probability", "ROME-style P(new) > P(true)"))
    variants = list(dict.fromkeys(p["variant"] for p in points))
    for ax, (family, name) in zip(axes, families):
        for variant in variants:
            pts = sorted((p for p in points if p["variant"] == variant), key=lambda p: p["value"])
            xs = [p[family]["neighborhood"] for p in pts]
            ys = [p[family]["efficacy"] for p in pts]
            (line,) = ax.plot(xs, ys, marker="o", label=variant)
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(f"{p['value']:g}", (x, y), fontsize=6, color=line.get_color(), xytext=(3, 3),
                            textcoords="offset points")
        for row in rows:
            ax.scatter([row[family]["neighborhood"]], [row[family]["efficacy"]], marker="*", s=120, zorder=5,
                       label=row["label"])
        ax.set_xlabel("neighborhood (%)  [true object still wins]")
        ax.set_ylabel("efficacy (%)")
        ax.set_title(name, fontsize=10)
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=130)
    plt.close(fig)


def results_table(rows: Sequence[dict]) -> str:
    """One markdown table of harness rows: both metric families, fluency, skips, revert failures, time per edit."""
    head = ("| | MEMIT-style argmax: Efficacy | Paraphrase | Neighborhood | ROME-style P(new)>P(true): Efficacy "
            "| Paraphrase | Neighborhood | Fluency ppl (unedited) | Skipped | Revert failures | ms / edit | Settings |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        m, p = r["memit_argmax"], r["rome_probability"]
        ppl = "-" if r.get("fluency_ppl") is None else f"{r['fluency_ppl']:.3f} ({r['fluency_ppl_unedited']:.3f})"
        settings = ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items())
        ms = "-" if r.get("ms_per_edit") is None else f"{r['ms_per_edit']:.2f}"
        lines.append(f"| {r['label']} | {m['efficacy']:.1f} | {m['paraphrase']:.1f} | {m['neighborhood']:.1f} | "
                     f"{p['efficacy']:.1f} | {p['paraphrase']:.1f} | {p['neighborhood']:.1f} | {ppl} | "
                     f"{r.get('skipped', 0)} | {r.get('revert_failures', 0)} | {ms} | {settings} |")
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[dict], out_dir, *, name: str = "counterfact_eval", meta: dict | None = None,
                  merge: bool = True) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir``. With ``merge``, rows already in the JSON with other
    labels (same ``n``) are kept, so separate runs build one table."""
    out_dir = make_folder(out_dir)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    rows = list(rows)
    if merge and json_path.is_file():
        old = json.loads(json_path.read_text())
        labels = {r["label"] for r in rows}
        same_n = {r["n"] for r in rows}
        rows = [r for r in old.get("rows", []) if r["label"] not in labels and r["n"] in same_n] + rows
        meta = {**old.get("meta", {}), **(meta or {})}
    order = {"none": 0, "forward_shift": 1, "gradient": 2}
    rows.sort(key=lambda r: order.get(r["method"], 3))
    atomic_write_json(json_path, {"meta": meta or {}, "rows": rows})
    atomic_write_text(md_path, f"# CounterFact evaluation\n\n{(meta or {}).get('description', '')}\n\n"
                               f"{results_table(rows)}")
    return json_path, md_path


def tradeoff_variants(ctx: ModelContext, calibration=None) -> dict:
    """The forward-shift variants to sweep, each at its calibrated layer: scale x :data:`SWEEP_FACTORS` (margins
    :data:`MARGIN_GRID` plus the calibrated one for scale='auto')."""
    defaults = calibrated_defaults(ctx, calibration)
    out = {}
    for name, options in (("forward_shift", {}), ("forward_shift_normalized", {"normalize_key": True}),
                          ("forward_shift_whitened", {"whiten": True})):
        if name in defaults:
            setting = defaults[name]
            out[name] = ({"layer": setting["layer"], **options}, "scale",
                         [setting["scale"] * f for f in SWEEP_FACTORS])
    for name, options in (("forward_shift_normalized_auto", {"normalize_key": True}),
                          ("forward_shift_whitened_auto", {"whiten": True})):
        if name in defaults:
            margins = sorted(set(MARGIN_GRID) | {defaults[name]["margin"]})
            out[name] = ({"layer": defaults[name]["layer"], "scale": "auto", **options}, "margin", margins)
    if not out:
        raise ValueError("this model has no calibrated forward-shift settings: run blens eval-counterfact --calibrate "
                         "FILE and pass --calibration FILE")
    return out


def run_tradeoff(ctx: ModelContext, records, *, n, out_dir, progress=True, reference_rows=(),
                 calibration=None) -> tuple[Path, Path]:
    """Sweep :func:`tradeoff_variants` on the first ``n`` records; write ``counterfact_tradeoff.json`` / ``.png`` with,
    at the paper variant's efficacy (its calibrated row in ``reference_rows``), each curve's neighborhood accuracy
    (linear interpolation)."""
    variants = tradeoff_variants(ctx, calibration)
    last = ctx.num_layers - 1
    exact = {k: v for k, v in variants.items() if v[0]["layer"] % (last + 1) == last}
    other = {k: v for k, v in variants.items() if k not in exact}
    points = last_layer_sweep(ctx, records, exact, n=n, progress=progress) if exact else []
    points += sweep(ctx, records, other, n=n, progress=progress) if other else []
    paper = next((r for r in reference_rows if r.get("label", "").startswith("forward shift (paper")), None)
    comparison = {}
    if paper is not None:
        for family in ("memit_argmax", "rome_probability"):
            eff = paper[family]["efficacy"]
            comparison[family] = {"efficacy": eff, "paper_row_neighborhood": paper[family]["neighborhood"],
                                  "neighborhood_at_that_efficacy": {
                                      name: neighborhood_at_efficacy([p for p in points if p["variant"] == name],
                                                                     eff, family=family) for name in variants}}
    out_dir = make_folder(out_dir)
    json_path, png_path = out_dir / "counterfact_tradeoff.json", out_dir / "counterfact_tradeoff.png"
    slim = [{k: v for k, v in p.items() if k in ("variant", "key", "value", "settings", "memit_argmax",
                                                 "rome_probability", "skipped", "revert_failures", "n")}
            for p in points]
    atomic_write_json(json_path, {"n": n, "variants": {k: {"options": settings_record(v[0]), "key": v[1],
                                                           "values": v[2]} for k, v in variants.items()},
                                  "comparison_at_paper_efficacy": comparison, "points": slim})
    if comparison:
        _append_comparison(out_dir / "counterfact_eval.md", comparison, variants)
    refs = [r for r in reference_rows if r["method"] in ("none", "gradient") or r is paper]
    plot_tradeoff(points, png_path, rows=refs,
                  title=f"CounterFact records 0-{n - 1}: efficacy vs neighborhood across scales (margins for auto)")
    return json_path, png_path


def _append_comparison(md: Path, comparison: dict, variants: dict) -> None:
    if not md.is_file():
        return
    lines = ["", "## Trade-off at the paper shift's efficacy", "",
             "Best neighborhood accuracy each backward-free variant offers at an efficacy at least that of the paper's "
             "forward shift at its calibrated setting (from `counterfact_tradeoff.json`, sweeps over scales / margins "
             "on the same records; see `counterfact_tradeoff.png`).", "",
             "| variant | MEMIT-style neighborhood | ROME-style neighborhood |", "|---|---|---|"]
    m, r = comparison.get("memit_argmax", {}), comparison.get("rome_probability", {})
    lines.append(f"| paper row (efficacy {m.get('efficacy', 0):.1f} / {r.get('efficacy', 0):.1f}) | "
                 f"{m.get('paper_row_neighborhood', 0):.1f} | {r.get('paper_row_neighborhood', 0):.1f} |")

    def fmt(v):
        return "not reached" if v is None else f"{v:.1f}"

    for name in variants:
        lines.append(f"| {name} | {fmt(m.get('neighborhood_at_that_efficacy', {}).get(name))} | "
                     f"{fmt(r.get('neighborhood_at_that_efficacy', {}).get(name))} |")
    text = md.read_text().split("\n## Trade-off at the paper shift's efficacy")[0].rstrip("\n") + "\n"
    atomic_write_text(md, text + "\n".join(lines) + "\n")
