"""Evaluate fact editing on CounterFact: edit, score, revert (checked bit for bit) for each record.

Writes counterfact_eval.json and counterfact_eval.md under --out (default out/counterfact; rows of earlier runs with
other labels and the same --n are kept, so separate runs build one table). Both metric families are reported:
MEMIT-style argmax accuracy and ROME-style probability comparison, for efficacy, paraphrase and
neighborhood, plus the perplexity of true-fact sentences after each edit (fluency cost).

--method all runs the unedited model, the paper's forward shift, its normalised, whitened and
whitened + auto-scale variants, and the gradient baseline, each at its calibrated setting.
--tradeoff also sweeps each forward-shift variant across scales (margins for scale=auto) and writes
counterfact_tradeoff.json and counterfact_tradeoff.png (efficacy against neighborhood).
--calibrate FILE chooses layer and scale per variant on the given records and writes FILE (see
blens_fast.counterfact.calibrate); calibrate on records disjoint from the evaluated ones, then pass
--calibration FILE here (or calibration=FILE to blens_fast.edit). Without a calibration, a model is edited with the
documented uncalibrated default: its last layer with the scale chosen from the last position's logits.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .._ui import plural
from ._common import WINDOW_OPTIONS, add_edit_settings, add_records, edit_settings, load

OUT_DEFAULT = "out/counterfact"
OUT_HELP = "folder for counterfact_eval.json/.md (and the trade-off files)"

#: name -> (label, method, edit options)
VARIANTS = {
    "none": ("unedited", "none", {}),
    "forward_shift": ("forward shift (paper: key a_n)", "forward_shift", {}),
    "forward_shift_normalized": ("forward shift, key a_n/(a_n.a_n)", "forward_shift", {"normalize_key": True}),
    "forward_shift_normalized_auto": ("forward shift, key a_n/(a_n.a_n), scale from last-position logits",
                                      "forward_shift", {"normalize_key": True, "scale": "auto"}),
    "forward_shift_whitened": ("forward shift, whitened key C^-1 a_n/(a_n^T C^-1 a_n)", "forward_shift",
                               {"whiten": True}),
    "forward_shift_whitened_auto": ("forward shift, whitened key, scale from last-position logits", "forward_shift",
                                    {"whiten": True, "scale": "auto"}),
    "gradient": ("gradient baseline (fine-tune mlp.out of one layer)", "gradient", {}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="forward_shift",
                        help="comma-separated variant names (" + ", ".join(VARIANTS) + ") or 'all' "
                             "(default: forward_shift)")
    add_records(parser, n_default=1000, fields=False, kinds="a CounterFact JSON / JSON Lines file (EasyEdit layout)")
    add_edit_settings(parser)
    parser.add_argument("--label", default=None, help="row label (default: the variant's)")
    parser.add_argument("--no-baseline", action="store_true", help="do not add the unedited row")
    parser.add_argument("--no-fluency", action="store_true", help="skip the fluency perplexity")
    parser.add_argument("--tradeoff", action="store_true", help="also sweep scales and plot the trade-off")
    parser.add_argument("--calibrate", default=None, metavar="FILE",
                        help="calibrate layer/scale per variant on these records and write FILE (JSON)")


def _variant_runs(args) -> list[tuple[str, str, dict]]:
    names = list(VARIANTS) if args.method == "all" else [m.strip() for m in args.method.split(",")]
    unknown = [m for m in names if m not in VARIANTS]
    if unknown:
        raise ValueError(f"--method {args.method!r}: expected all, or comma-separated names among "
                         f"{', '.join(VARIANTS)}")
    runs = []
    if not args.no_baseline and "none" not in names:
        runs.append(VARIANTS["none"])
    for name in names:
        label, method, options = VARIANTS[name]
        options = dict(options)
        if len(names) == 1:
            options.update(edit_settings(args))
            if method == "forward_shift" and (args.whiten or args.normalize_key or args.scale == "auto"):
                label = "forward shift" + (", whitened" if args.whiten else ", normalised key" if args.normalize_key
                                           else "") + (", auto scale" if args.scale == "auto" else "")
            label = args.label or label
        if method == "gradient":
            options = {k: v for k, v in options.items() if k in ("layer", "lr", "steps")}
        elif method == "none":
            options = {}
        runs.append((label, method, options))
    return runs


def summary_line(row: dict) -> str:
    """One evaluated row on the terminal, every value labelled: both metric families, fluency, skipped edits, revert
    failures and the time."""
    from ..counterfact.harness import METRICS

    parts = [f"{title} " + ", ".join(f"{metric} {row[family][metric]:.1f}%" for metric in METRICS)
             for family, title in (("memit_argmax", "argmax"), ("rome_probability", "P(new) > P(true)"))]
    if row.get("fluency_ppl") is not None:
        parts.append(f"fluency perplexity {row['fluency_ppl']:.2f} (unedited {row['fluency_ppl_unedited']:.2f})")
    if row["method"] != "none":
        parts.append(f"skipped {row['skipped']} of {plural(row['n'], 'edit')}"
                     + (" (left the model unchanged)" if row["skipped"] else ""))
        parts.append(f"revert failures {row['revert_failures']}")
    return f"{row['label']}: " + "; ".join(parts) + f" ({row['seconds']:.0f} s)"


def run(args) -> int:
    from .._io import atomic_write_json, make_folder
    from ..counterfact import calibrate, evaluate_counterfact, load as load_records, run_tradeoff, write_results
    from ..counterfact.harness import edit_options
    from ..editing import calibrated_defaults, variant_name
    from ..records import check_held

    records = load_records(args.records)
    check_held(repr(args.records), len(records), args.start, args.n, WINDOW_OPTIONS)
    records = records[args.start:]
    runs = _variant_runs(args) if args.calibrate is None else []
    ctx = load(args)
    out = Path(args.out)
    if args.calibrate is not None:
        record = calibrate(ctx, records, n=args.n, start=args.start, progress=not args.quiet)
        make_folder(Path(args.calibrate).parent)
        atomic_write_json(args.calibrate, record)
        print(f"wrote {args.calibrate}")
        for name, settings in record["variants"].items():
            print(f"  {name}: {settings}")
        return 0
    if args.method == "all" or "," in args.method:  # several variants: skip the ones not calibrated
        known = calibrated_defaults(ctx, args.calibration)
        kept = []
        for label, method, options in runs:
            name = variant_name(method, whiten=bool(options.get("whiten")),
                                normalize_key=bool(options.get("normalize_key")), auto=options.get("scale") == "auto")
            if method == "none" or name in known:
                kept.append((label, method, options))
            else:
                print(f"skipping {label}: no calibrated {name!r} settings for this model")
        runs = kept
    # every variant's settings are checked before the first row runs
    runs = [(label, method, edit_options(ctx, method, options, calibration=args.calibration,
                                         progress=not args.quiet)) for label, method, options in runs]
    rows = []
    for label, method, settings in runs:
        row = evaluate_counterfact(ctx, records, method=method, n=args.n, label=label, fluency=not args.no_fluency,
                                   progress=not args.quiet, settings=settings)
        rows.append(row)
        print(summary_line(row), flush=True)
    meta = {"model": args.model, "records": args.records, "first_record": args.start, "n": args.n,
            "description": f"Records {args.start}-{args.start + args.n - 1} of {args.records}, model "
                           f"`{args.model}`; percentages. Efficacy/paraphrase: the new object wins; neighborhood: "
                           "the true object still wins. Fluency: perplexity of true-fact sentences after each edit "
                           "(unedited value in brackets)."}
    json_path, md_path = write_results(rows, out, meta=meta)
    print(f"wrote {json_path} and {md_path}")
    if args.tradeoff:
        started = time.perf_counter()
        paths = run_tradeoff(ctx, records, n=args.n, out_dir=out, progress=not args.quiet, calibration=args.calibration,
                             reference_rows=json.loads(json_path.read_text())["rows"])  # with merged rows
        print(f"wrote {', '.join(map(str, paths))} ({time.perf_counter() - started:.0f} s)")
    return 0
