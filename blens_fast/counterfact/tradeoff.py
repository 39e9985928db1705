"""Trade-off sweeps of the forward-shift variants across scales (margins for ``scale="auto"``), their plots and the
result tables of the harness.

At the last layer the sweep is exact and cheap (:func:`last_layer_sweep`: one unedited forward pass per record,
the edited logits from :class:`~blens_fast.editing.auto_scale.LogitCurve`); at other layers each point is a real
edit + forward per record (:func:`sweep`).
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import atomic_write_bytes, atomic_write_json, atomic_write_text, make_folder, read_bytes, read_json
from .._report import figure_png, markdown_table, pyplot
from .._ui import progress_bar
from ..context import ModelContext
from ..editing import EditSettings, calibrated_defaults, resolve_settings
from ..editing.auto_scale import LogitCurve
from ..editing.forward_shift import edit_keys, shift_scales
from ..forward import forward_hidden
from .harness import METRICS, Scorer, evaluate_counterfact, metrics
from .records import check_records

#: shift sizes of the trade-off curves, as multiples of each variant's calibrated scale
SWEEP_FACTORS = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
#: margins swept for scale="auto"
MARGIN_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Sweep:
    """One variant's sweep: the keywords of :func:`blens_fast.edit` it keeps (``options``, e.g.
    ``{"layer": 3, "normalize_key": True}``) and the setting it varies (``key``: ``"scale"``, or ``"margin"`` with
    ``scale="auto"`` in ``options``) over ``values``."""

    options: Mapping
    key: str
    values: tuple[float, ...]

    def resolved(self, ctx: ModelContext, *, progress: bool = True) -> list[EditSettings]:
        """The resolved settings of every point, in order (``whiten=True`` estimated once)."""
        options, out = dict(self.options), []
        for value in self.values:
            out.append(resolve_settings(ctx, **{**options, self.key: value}).with_whitening(ctx, progress=progress))
            options["whiten"] = out[-1].whiten
        return out


def sweep(ctx: ModelContext, records, variants: Mapping[str, Sweep], *, n=None, progress=True,
          fluency=False) -> list[dict]:
    """Evaluate each variant (name -> :class:`Sweep`) at each of its values with real edits. Returns one row per
    point with ``variant``, ``key`` and ``value`` added."""
    points = []
    for name, plan in variants.items():
        for value, settings in zip(plan.values, plan.resolved(ctx, progress=progress)):
            row = evaluate_counterfact(ctx, records, n=n, label=f"{name} {plan.key}={value:g}", fluency=fluency,
                                       progress=progress, settings=settings)
            row.update(variant=name, key=plan.key, value=value)
            points.append(row)
    return points


def last_layer_sweep(ctx: ModelContext, records, variants: Mapping[str, Sweep], *, n=None,
                     progress=True) -> list[dict]:
    """Exact metrics of forward-shift edits at the last layer for many settings, from one unedited forward pass per
    record (no edit is applied).

    At the last layer the edit moves the residual stream entering the final norm, at every position p of every query,
    by ``scale * (key . a_p) * e_target`` and changes nothing else, so the edited logits follow from the unedited
    pre-norm residuals and FF2 inputs by :class:`LogitCurve`. ``variants`` maps a name to a :class:`Sweep` at the
    last layer (the default of its ``layer``). Rows as :func:`sweep` (no fluency, no revert check: nothing is
    written). Tests check it against the real edit + forward path.
    """
    records, n = check_records(records, n)
    last = ctx.num_layers - 1
    resolved = {}  # name -> the settings of each value, in order
    for name, plan in variants.items():
        if (plan.key == "margin") != (plan.options.get("scale") == "auto"):
            raise ValueError(f"variant {name!r}: sweep 'margin' with scale='auto', 'scale' otherwise")
        resolved[name] = Sweep({"layer": last, **plan.options}, plan.key, plan.values).resolved(ctx, progress=progress)
        for point in resolved[name]:
            if point.layer != last:
                raise ValueError(f"last_layer_sweep: variant {name!r} is at layer {point.layer}, not the last layer "
                                 f"({last})")
    counts = {(name, value): {"memit": dict.fromkeys(METRICS, 0), "rome": dict.fromkeys(METRICS, 0), "skipped": 0}
              for name, plan in variants.items() for value in plan.values}
    scorer = Scorer(ctx)
    started = time.perf_counter()
    for record in progress_bar(records[:n], desc="last-layer sweep", unit="rec", enabled=progress):
        batch = scorer.prepare(record)
        found = forward_hidden(ctx, batch.ids, batch.mask, ff2_layers=[last], pre_norm=True)
        a = found.ff2_inputs[last][batch.rows, batch.positions].double()
        target = batch.examples[0].target_ids[0]  # the edited fact, new_at_prompt: row 0, scored first
        curve = LogitCurve(ctx, found.pre_norm[batch.rows, batch.positions], ctx.embedding_matrix[target])
        first = torch.zeros(1, dtype=torch.long, device=a.device)
        already = curve.logits(torch.zeros(1, device=a.device), rows=first).argmax(-1) == target  # (1,)
        for name, points in resolved.items():
            if not points:
                continue
            # the points of a variant share its key; for scale="auto" one search gives every margin's shift
            key = edit_keys(a[:1], torch.ones(1, dtype=torch.bool, device=a.device), points[0].whiten or None,
                            points[0].normalize_key)
            response = a @ key[0]
            shifts = curve.smallest_shifts(0, target, list(variants[name].values)) if points[0].auto else None
            for i, (value, settings) in enumerate(zip(variants[name].values, points)):
                wanted = None if shifts is None else torch.tensor([shifts[i]], dtype=a.dtype, device=a.device)
                scales, keep = shift_scales(settings, key, a[:1], already, wanted)
                result, _ = metrics(curve.logits((scales[0] * response).float()), batch.examples, batch.rows,
                                    batch.tokens, batch.n_scored)
                total = counts[(name, value)]
                total["skipped"] += int(not keep[0])
                for family in ("memit", "rome"):
                    for metric in METRICS:
                        total[family][metric] += result[family][metric]
    seconds = round(time.perf_counter() - started, 1)
    return [{"variant": name, "key": variants[name].key, "value": value, "n": n, "layer": last,
             "exact_last_layer": True,
             "memit_argmax": {m: 100.0 * total["memit"][m] / n for m in METRICS},
             "rome_probability": {m: 100.0 * total["rome"][m] / n for m in METRICS},
             "skipped": total["skipped"], "seconds_total_sweep": seconds} for (name, value), total in counts.items()]


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
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 5))
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
    atomic_write_bytes(path, figure_png(fig, dpi=130))


#: the columns of :func:`results_table` (the ROME-style family repeats the metric names)
RESULT_COLUMNS = ("", "MEMIT-style argmax: Efficacy", "Paraphrase", "Neighborhood",
                  "ROME-style P(new)>P(true): Efficacy", "Paraphrase", "Neighborhood", "Fluency ppl (unedited)",
                  "Skipped", "Revert failures", "ms / edit", "Settings")


def results_table(rows: Sequence[dict]) -> str:
    """One markdown table of harness rows: both metric families, fluency, skips, revert failures, time per edit."""
    import pandas as pd

    lines = []
    for r in rows:
        m, p = r["memit_argmax"], r["rome_probability"]
        ppl = "-" if r.get("fluency_ppl") is None else f"{r['fluency_ppl']:.3f} ({r['fluency_ppl_unedited']:.3f})"
        lines.append([r["label"], *(f"{family[metric]:.1f}" for family in (m, p) for metric in METRICS), ppl,
                      r.get("skipped", 0), r.get("revert_failures", 0),
                      "-" if r.get("ms_per_edit") is None else f"{r['ms_per_edit']:.2f}",
                      ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items())])
    return markdown_table(pd.DataFrame(lines, columns=list(RESULT_COLUMNS))) + "\n"


def write_results(rows: Sequence[dict], out_dir, *, name: str = "counterfact_eval", meta: dict | None = None,
                  merge: bool = True) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir``. With ``merge``, rows already in the JSON with other
    labels (same ``n``) are kept, so separate runs build one table."""
    out_dir = make_folder(out_dir)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    rows = list(rows)
    if merge and (json_path.exists() or json_path.is_symlink()):
        old = read_json(json_path, "earlier results file", follow=False)
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


def tradeoff_variants(ctx: ModelContext, calibration=None) -> dict[str, Sweep]:
    """The forward-shift variants to sweep, each at its calibrated layer: scale x :data:`SWEEP_FACTORS` (margins
    :data:`MARGIN_GRID` plus the calibrated one for scale='auto')."""
    defaults = calibrated_defaults(ctx, calibration)
    out = {}
    for name, options in (("forward_shift", {}), ("forward_shift_normalized", {"normalize_key": True}),
                          ("forward_shift_whitened", {"whiten": True})):
        if name in defaults:
            setting = defaults[name]
            out[name] = Sweep({"layer": setting["layer"], **options}, "scale",
                              tuple(setting["scale"] * f for f in SWEEP_FACTORS))
    for name, options in (("forward_shift_normalized_auto", {"normalize_key": True}),
                          ("forward_shift_whitened_auto", {"whiten": True})):
        if name in defaults:
            margins = sorted(set(MARGIN_GRID) | {defaults[name]["margin"]})
            out[name] = Sweep({"layer": defaults[name]["layer"], "scale": "auto", **options}, "margin",
                              tuple(margins))
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
    exact = {k: v for k, v in variants.items() if v.options["layer"] % (last + 1) == last}
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
    atomic_write_json(json_path, {"n": n, "variants": {k: {"options": dict(v.options), "key": v.key,
                                                           "values": list(v.values)} for k, v in variants.items()},
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
    m, r = comparison.get("memit_argmax", {}), comparison.get("rome_probability", {})

    def fmt(v):
        return "not reached" if v is None else f"{v:.1f}"

    table = [[f"paper row (efficacy {m.get('efficacy', 0):.1f} / {r.get('efficacy', 0):.1f})",
              fmt(m.get("paper_row_neighborhood", 0)), fmt(r.get("paper_row_neighborhood", 0))]]
    table += [[name, fmt(m.get("neighborhood_at_that_efficacy", {}).get(name)),
               fmt(r.get("neighborhood_at_that_efficacy", {}).get(name))] for name in variants]
    lines = ["", "## Trade-off at the paper shift's efficacy", "",
             "Best neighborhood accuracy each backward-free variant offers at an efficacy at least that of the paper's "
             "forward shift at its calibrated setting (from `counterfact_tradeoff.json`, sweeps over scales / margins "
             "on the same records; see `counterfact_tradeoff.png`).", "",
             markdown_table([dict(zip(("variant", "MEMIT-style neighborhood", "ROME-style neighborhood"), row))
                             for row in table])]
    text = read_bytes(md).decode("utf-8").split("\n## Trade-off at the paper shift's efficacy")[0].rstrip("\n") + "\n"
    atomic_write_text(md, text + "\n".join(lines) + "\n")
