"""CounterFact harness: edit, score, revert (checked bit for bit), for each record.

Two metric families, kept apart as the literature does (all in percent):

* **MEMIT-style argmax accuracy**: is the first token of the new object the argmax at the last token of
  ``prompt`` (efficacy) and of ``rephrase_prompt`` (paraphrase)? Is the first token of
  ``locality_ground_truth`` still the argmax at ``locality_prompt`` (neighborhood)?
* **ROME-style probability comparison** over whole objects (sum of token log-probabilities, objects scored
  with a leading space): ``P(new) > P(true)`` at ``prompt`` (efficacy score) and ``rephrase_prompt``
  (paraphrase score); ``P(locality_ground_truth) > P(new)`` at ``locality_prompt`` (neighborhood score).

Fluency cost: the perplexity (``exp`` of the mean token NLL) of a fixed set of true-fact sentences, measured
after every edit and averaged over edits (``fluency_ppl``), next to its value for the unedited model.

All of one record's queries (6 prompt/object pairs) and the fluency sentences run as one right-padded
batch through the model without its LM head; the unembedding is applied only at the positions scored.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ._checks import check_choice, check_positive_int
from .adapters import Adapter, get_adapter
from .capture import _pad_id, model_device, pad_right, tokenize_examples
from .edit import Whitening, _hash_tensor, edit, ff2_whitening, forward_hidden, lens_logits, variant_name

METHODS = ("none", "forward_shift", "gradient")
FIELDS = ("prompt", "rephrase_prompt", "locality_prompt", "locality_ground_truth", "ground_truth", "target_new")
METRICS = ("efficacy", "paraphrase", "neighborhood")


def _check_records(records, n):
    if isinstance(records, (str, Path)):
        from .default_model import load_counterfact

        records = load_counterfact(records)
    if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
        raise TypeError(f"records must be a list of CounterFact records (dicts), got {type(records).__name__}")
    n = len(records) if n is None else check_positive_int(n, "n")
    if n > len(records):
        raise ValueError(f"n={n} but only {len(records)} records were given")
    for i, record in enumerate(records[:n]):
        if not isinstance(record, dict):
            raise TypeError(f"records[{i}] must be a dict, got {type(record).__name__}")
        missing = [f for f in FIELDS if not isinstance(record.get(f), str) or not record.get(f).strip()]
        if missing:
            raise ValueError(f"records[{i}] lacks the field(s) {', '.join(missing)} (CounterFact, EasyEdit layout)")
    return records, n


class _Scorer:
    """Scores one record's six (prompt, object) pairs and the fluency sentences in one forward pass."""

    def __init__(self, model, tokenizer, adapter, fluency_texts):
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.pad = _pad_id(tokenizer)
        self.device = model_device(model)
        self.fluency = [tuple(tokenizer(t)["input_ids"]) for t in fluency_texts]
        self.fluency = [t for t in self.fluency if len(t) > 1]

    def prepare(self, record):
        r = record
        pairs = [(r["prompt"], r["target_new"]), (r["prompt"], r["ground_truth"]),
                 (r["rephrase_prompt"], r["target_new"]), (r["rephrase_prompt"], r["ground_truth"]),
                 (r["locality_prompt"], r["target_new"]), (r["locality_prompt"], r["locality_ground_truth"])]
        examples = tokenize_examples(self.tokenizer, [p for p, _ in pairs], [o for _, o in pairs])
        sequences = [e.input_ids for e in examples] + list(self.fluency)
        rows, positions, tokens = [], [], []
        for row, e in enumerate(examples):
            rows.extend([row] * len(e.target_ids))
            positions.extend(e.loss_positions)
            tokens.extend(e.target_ids)
        for k, s in enumerate(self.fluency):
            rows.extend([len(examples) + k] * (len(s) - 1))
            positions.extend(range(len(s) - 1))
            tokens.extend(s[1:])
        ids, mask = pad_right(sequences, self.pad, self.device)
        t = lambda v: torch.tensor(v, device=self.device)  # noqa: E731
        return {"examples": examples, "ids": ids, "mask": mask, "rows": t(rows), "positions": t(positions),
                "tokens": t(tokens), "n_scored": sum(len(e.target_ids) for e in examples)}

    def score(self, prepared, *, fluency: bool = True) -> dict:
        ids, mask = prepared["ids"], prepared["mask"]
        n_scored = prepared["n_scored"]
        rows, positions, tokens = prepared["rows"], prepared["positions"], prepared["tokens"]
        if not fluency:
            ids, mask = ids[:6], mask[:6]
            keep = rows < 6
            rows, positions, tokens = rows[keep], positions[keep], tokens[keep]
            ids, mask = ids[:, : int(mask.sum(1).max())], mask[:, : int(mask.sum(1).max())]
        hidden, _, _ = forward_hidden(self.model, self.adapter, ids, mask)
        logits = lens_logits(self.model, self.adapter, hidden[rows, positions])
        result, token_lp = _metrics(logits, prepared["examples"], rows, tokens, n_scored)
        if fluency and len(token_lp) > n_scored:
            result["fluency_nll"] = (-token_lp[n_scored:].sum()).item()
            result["fluency_tokens"] = len(token_lp) - n_scored
        return result


def _metrics(logits, examples, rows, tokens, n_scored):
    """Both metric families of one record from the logits at its scored positions (pairs first, in order)."""
    logp = logits.log_softmax(-1)
    token_lp = logp[torch.arange(len(tokens), device=logp.device), tokens]
    object_lp = torch.zeros(6, device=logp.device, dtype=token_lp.dtype).index_add(
        0, rows[:n_scored], token_lp[:n_scored])
    firsts, start = [], 0
    for e in examples:  # the first scored position of each pair is its prompt's last token
        firsts.append(start)
        start += len(e.target_ids)
    argmax = logits[firsts].argmax(-1)
    first_token = [e.target_ids[0] for e in examples]
    result = {
        "memit": {"efficacy": bool(argmax[0] == first_token[0]), "paraphrase": bool(argmax[2] == first_token[2]),
                  "neighborhood": bool(argmax[4] == first_token[5])},
        "rome": {"efficacy": bool(object_lp[0] > object_lp[1]), "paraphrase": bool(object_lp[2] > object_lp[3]),
                 "neighborhood": bool(object_lp[5] > object_lp[4])},
    }
    return result, token_lp


def evaluate_counterfact(model: nn.Module, tokenizer, records, *, method: str = "forward_shift", n: int | None = None,
                         label: str | None = None, fluency_texts=None, fluency: bool = True, progress: bool = True,
                         adapter: Adapter | None = None, details: bool = False, **edit_kwargs) -> dict:
    """Edit, score and revert for each of the first ``n`` records; returns one row of metrics (percent).

    ``method``: ``"none"`` (the unedited model), ``"forward_shift"`` or ``"gradient"``; ``edit_kwargs`` go to
    :func:`blens_fast.edit` (``layer``, ``scale``, ``whiten``, ``normalize``, ``margin``, ``lr``, ``steps``...).
    ``whiten=True`` is estimated once here (:func:`blens_fast.edit.ff2_whitening`) and reused for every record.
    ``fluency_texts``: the sentences whose perplexity measures the fluency cost; default: the true-fact
    sentences of the 2 records after the evaluated ones (``records[n:n+2]``; the first 2 when there are none).
    After each revert every ``mlp.out`` weight is compared bit for bit with a copy taken before the run
    (``revert_failures``; a failure is repaired from that copy), and all parameters' fingerprints at the end.
    """
    adapter = get_adapter(model, adapter)
    method = "none" if method is None else method
    check_choice(method, "method", METHODS)
    records, n = _check_records(records, n)
    if fluency_texts is None:
        from .default_model import fact_texts

        fluency_texts = fact_texts(records[n:n + 2] if len(records) >= n + 2 else records[:2])
    scorer = _Scorer(model, tokenizer, adapter, fluency_texts if fluency else [])
    whiten = edit_kwargs.get("whiten", False)
    if method == "forward_shift" and whiten is True:
        layer = edit_kwargs.get("layer")
        if layer is None:
            from .edit import calibrated_defaults

            name = variant_name("forward_shift", whiten=True, auto=edit_kwargs.get("scale") == "auto")
            layer = calibrated_defaults(model, adapter).get(name, {}).get("layer")
            if layer is None:
                raise ValueError(f"no calibrated {name!r} settings for this model: pass layer= explicitly")
        edit_kwargs["whiten"] = ff2_whitening(model, tokenizer, layer, adapter=adapter)
    if method != "none" and "defaults" not in edit_kwargs:  # read the calibration record once, not per edit
        from .edit import calibrated_defaults

        name = variant_name(method, whiten=edit_kwargs.get("whiten", False) is not False,
                            normalize=bool(edit_kwargs.get("normalize")), auto=edit_kwargs.get("scale") == "auto")
        edit_kwargs["defaults"] = calibrated_defaults(model, adapter).get(name, {})
    snapshot = {l: adapter.weight(model, l, "mlp.out").detach().clone() for l in range(adapter.num_layers(model))}
    fingerprint = _params_fingerprint(model)
    unedited_fluency = None
    if fluency and scorer.fluency:
        unedited_fluency = _fluency_ppl(scorer, records[0])
    totals = {family: dict.fromkeys(METRICS, 0) for family in ("memit", "rome")}
    nll, ntok, ppl_sum = 0.0, 0, 0.0
    skipped = failures = edited_facts = 0
    shifts, per_record = [], []
    bar = _progress(n, f"{label or method}", progress)
    started = time.perf_counter()
    edit_seconds = 0.0
    try:
        for i in range(n):
            record = records[i]
            prepared = scorer.prepare(record)
            applied = None
            if method != "none":
                t0 = time.perf_counter()
                applied = edit(model, tokenizer, record["prompt"], record["target_new"], method=method,
                               adapter=adapter, **edit_kwargs)
                edit_seconds += time.perf_counter() - t0
            try:
                scores = scorer.score(prepared, fluency=fluency)
            finally:
                if applied is not None:
                    applied.revert()
            if applied is not None:
                if not applied.updates:
                    skipped += 1
                else:
                    edited_facts += 1
                if "shifts" in applied.info:
                    shifts.append(applied.info["shifts"][0])
                for l, original in snapshot.items():
                    weight = adapter.weight(model, l, "mlp.out")
                    if not torch.equal(weight, original):
                        failures += 1
                        with torch.no_grad():
                            weight.copy_(original)
            for family in totals:
                for metric in METRICS:
                    totals[family][metric] += scores[family][metric]
            if "fluency_nll" in scores:
                nll += scores["fluency_nll"]
                ntok += scores["fluency_tokens"]
                ppl_sum += math.exp(scores["fluency_nll"] / scores["fluency_tokens"])
            if details:
                per_record.append({"case_id": record.get("case_id"), **scores,
                                   "skipped": applied is not None and not applied.updates})
            bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    row = {
        "label": label or method,
        "method": method,
        "settings": _settings(edit_kwargs),
        "n": n,
        "memit_argmax": {m: 100.0 * totals["memit"][m] / n for m in METRICS},
        "rome_probability": {m: 100.0 * totals["rome"][m] / n for m in METRICS},
        "fluency_ppl": ppl_sum / n if ntok else None,
        "fluency_ppl_unedited": unedited_fluency,
        "skipped": skipped,
        "revert_failures": failures,
        "parameters_restored": _params_fingerprint(model) == fingerprint,
        "seconds": round(seconds, 2),
        "ms_per_edit": round(1000 * edit_seconds / n, 3) if method != "none" else None,
    }
    if shifts:
        row["median_shift"] = float(torch.tensor(shifts).median())
    if details:
        row["records"] = per_record
    return row


def _fluency_ppl(scorer: _Scorer, record) -> float:
    scores = scorer.score(scorer.prepare(record), fluency=True)
    return math.exp(scores["fluency_nll"] / scores["fluency_tokens"])


def _params_fingerprint(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for _, p in sorted(model.named_parameters()):
        _hash_tensor(h, p)
    return h.hexdigest()


def _settings(edit_kwargs) -> dict:
    out = {}
    for key, value in edit_kwargs.items():
        if key == "defaults":
            out.update({k: v for k, v in value.items() if k not in out and not isinstance(v, dict)})
        elif isinstance(value, Whitening):
            out[key] = f"Whitening(layer={value.layer}, ridge={value.ridge}, tokens={value.num_tokens})"
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[key] = value
        else:
            out[key] = repr(value)
    return out


class _NoBar:
    def update(self, k):
        pass

    def close(self):
        pass


def _progress(total, desc, enabled):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rec", leave=False)


# ----------------------------------------------------------------------------------------------
# trade-off sweeps, calibration and reports
# ----------------------------------------------------------------------------------------------
def sweep(model, tokenizer, records, variants: dict, *, n=None, progress=True, fluency=False) -> list[dict]:
    """Evaluate each variant at each of its settings: ``variants`` maps a name to ``(edit_kwargs, key, values)``
    (e.g. ``({"layer": 3, "normalize": True}, "scale", [10, 30, 100])``). Returns one row per point with
    ``variant`` and ``value`` added."""
    points = []
    for name, (kwargs, key, values) in variants.items():
        kwargs = dict(kwargs)
        if kwargs.get("whiten") is True:
            kwargs["whiten"] = ff2_whitening(model, tokenizer, kwargs["layer"])
        for value in values:
            row = evaluate_counterfact(model, tokenizer, records, n=n, label=f"{name} {key}={value:g}",
                                       fluency=fluency, progress=progress, **{**kwargs, key: value})
            row.update(variant=name, key=key, value=value)
            points.append(row)
    return points


def last_layer_sweep(model, tokenizer, records, variants: dict, *, n=None, progress=True, adapter=None) -> list[dict]:
    """Exact metrics of forward-shift edits at the last layer for many settings, from one unedited forward pass
    per record (no edit is applied).

    At the last layer the edit moves the residual stream entering the final norm, at every position p of every
    query, by ``scale * (key . a_p) * e_target`` and changes nothing else, so the edited logits follow from the
    unedited pre-norm residuals and FF2 inputs by :class:`blens_fast.edit.LogitCurve`. ``variants`` maps a
    name to ``(options, key, values)`` as in :func:`sweep` (options: ``normalize``, ``whiten``,
    ``skip_if_argmax``, ``scale="auto"`` with key ``"margin"``). Rows as :func:`sweep` (no fluency, no
    revert check: nothing is written). Tests check it against the real edit + forward path.
    """
    from .edit import LogitCurve, _keys

    adapter = get_adapter(model, adapter)
    records, n = _check_records(records, n)
    last = adapter.num_layers(model) - 1
    plans = []
    for name, (options, key, values) in variants.items():
        options = dict(options)
        layer = options.pop("layer", last)
        if adapter.check_layers(model, [layer])[0] != last:
            raise ValueError(f"last_layer_sweep: variant {name!r} is at layer {layer}, not the last layer ({last})")
        whiten = options.pop("whiten", False)
        if whiten is True:
            whiten = ff2_whitening(model, tokenizer, last, adapter=adapter)
        auto = options.pop("scale", None) == "auto"
        if auto != (key == "margin"):
            raise ValueError(f"variant {name!r}: sweep 'margin' with scale='auto', 'scale' otherwise")
        plans.append((name, whiten or None, bool(options.pop("normalize", False)), options.pop("skip_if_argmax", True),
                      auto, key, list(values)))
        if options:
            raise ValueError(f"variant {name!r}: unsupported options {sorted(options)}")
    counts = {(p[0], v): {"memit": dict.fromkeys(METRICS, 0), "rome": dict.fromkeys(METRICS, 0), "skipped": 0}
              for p in plans for v in p[6]}
    scorer = _Scorer(model, tokenizer, adapter, [])
    embedding = adapter.embedding_matrix(model)
    bar = _progress(n, "last-layer sweep", progress)
    started = time.perf_counter()
    for record in records[:n]:
        prepared = scorer.prepare(record)
        rows, positions, tokens = prepared["rows"], prepared["positions"], prepared["tokens"]
        examples = prepared["examples"]
        _, ff2, pre = forward_hidden(model, adapter, prepared["ids"], prepared["mask"], ff2_layer=last, residual=True)
        a = ff2[rows, positions].double()
        target = examples[0].target_ids[0]
        curve = LogitCurve(model, adapter, pre[rows, positions], embedding[target])
        zeros = torch.zeros(len(rows), device=a.device)
        already = bool(curve.logits(zeros[:1], rows=torch.zeros(1, dtype=torch.long, device=a.device))[0].argmax()
                       == target)
        for name, whitening, normalize, skip, auto, key, values in plans:
            k = _keys(a[:1], torch.ones(1, dtype=torch.bool, device=a.device), whitening, normalize)[0]
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
                result, _ = _metrics(curve.logits(c.float()), examples, rows, tokens, prepared["n_scored"])
                total = counts[(name, value)]
                total["skipped"] += int(skipped)
                for family in ("memit", "rome"):
                    for metric in METRICS:
                        total[family][metric] += result[family][metric]
        bar.update(1)
    bar.close()
    points = []
    for name, whitening, normalize, skip, auto, key, values in plans:
        for value in values:
            total = counts[(name, value)]
            points.append({"variant": name, "key": key, "value": value, "n": n, "layer": last, "exact_last_layer": True,
                           "memit_argmax": {m: 100.0 * total["memit"][m] / n for m in METRICS},
                           "rome_probability": {m: 100.0 * total["rome"][m] / n for m in METRICS},
                           "skipped": total["skipped"]})
    for p in points:
        p["seconds_total_sweep"] = round(time.perf_counter() - started, 1)
    return points


def neighborhood_at_efficacy(points: list[dict], efficacy: float, *, family: str = "memit_argmax") -> float | None:
    """The best neighborhood accuracy a trade-off curve offers at an efficacy of at least ``efficacy``: over its
    sweep points with that efficacy and the point where the curve crosses it (linear interpolation between the
    two sweep points that bracket it). None when no point reaches ``efficacy``."""
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
                ax.annotate(f"{p['value']:g}", (x, y), fontsize=6, color=line.get_color(),
                            xytext=(3, 3), textcoords="offset points")
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


def markdown_table(rows: Sequence[dict]) -> str:
    """One markdown table: both metric families, fluency, skips, revert failures, time per edit."""
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
                  merge: bool = True):
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir``. With ``merge``, rows already in the JSON with
    other labels (same ``n``) are kept, so separate runs build one table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    rows = list(rows)
    if merge and json_path.is_file():
        old = json.loads(json_path.read_text())
        labels = {r["label"] for r in rows}
        same_n = {r["n"] for r in rows}
        kept = [r for r in old.get("rows", []) if r["label"] not in labels and r["n"] in same_n]
        rows = kept + rows
        meta = {**old.get("meta", {}), **(meta or {})}
    order = {"none": 0, "forward_shift": 1, "gradient": 2}
    rows.sort(key=lambda r: order.get(r["method"], 3))
    json_path.write_text(json.dumps({"meta": meta or {}, "rows": rows}, indent=1) + "\n")
    text = f"# CounterFact evaluation\n\n{(meta or {}).get('description', '')}\n\n{markdown_table(rows)}"
    md_path.write_text(text)
    return json_path, md_path


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------
#: efficacy (MEMIT-style argmax, percent) a calibrated setting must reach on the calibration records
CALIBRATION_EFFICACY = 95.0
#: shift sizes (residual-stream units, i.e. the normalised key's scale) tried at the last layer (exact sweep)
SHIFT_GRID = tuple(float(8 * 2 ** k) for k in range(9))  # 8 ... 2048
#: the coarser grid tried at the other layers (real edit + forward per record)
SHIFT_GRID_COARSE = (8.0, 32.0, 128.0, 512.0, 2048.0)
MARGIN_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
LR_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _harmonic(m: dict) -> float:
    values = [m[k] for k in METRICS]
    return 0.0 if min(values) <= 0 else len(values) / sum(1.0 / v for v in values)


def _select(points: list[dict]) -> dict:
    """Among points reaching CALIBRATION_EFFICACY, the best harmonic mean of efficacy, paraphrase and
    neighborhood (MEMIT-style); without any, the most efficacious point."""
    ok = [p for p in points if p["memit_argmax"]["efficacy"] >= CALIBRATION_EFFICACY]
    if ok:
        return max(ok, key=lambda p: (_harmonic(p["memit_argmax"]), p["memit_argmax"]["neighborhood"]))
    return max(points, key=lambda p: (p["memit_argmax"]["efficacy"], p["memit_argmax"]["neighborhood"]))


def median_key_norm(model, tokenizer, records, layer: int, *, adapter=None) -> float:
    """Median of ``a_n . a_n`` (FF2 input at the prompt's last token) over the records' prompts."""
    adapter = get_adapter(model, adapter)
    examples = tokenize_examples(tokenizer, [r["prompt"] for r in records], [r["target_new"] for r in records])
    ids, mask = pad_right([e.prompt_ids for e in examples], _pad_id(tokenizer), model_device(model))
    _, ff2, _ = forward_hidden(model, adapter, ids, mask, ff2_layer=layer)
    a = ff2[torch.arange(len(examples)), mask.sum(1) - 1].double()
    return float((a * a).sum(-1).median())


def calibrate(model, tokenizer, records, *, n: int | None = None, start: int = 0, progress: bool = True,
              n_other_layers: int = 100, n_gradient: int = 50) -> dict:
    """Choose ``layer`` and ``scale`` (``margin`` for scale='auto', ``lr`` for the gradient) per variant.

    ``records`` must be disjoint from the evaluated ones. Last layer: the exact sweep
    (:func:`last_layer_sweep`) on the first ``n`` records, shift sizes :data:`SHIFT_GRID` (the paper's raw
    key: divided by the layer's median ``a_n . a_n``) and margins :data:`MARGIN_GRID`. Other layers: the real
    edit + forward on the first ``n_other_layers`` records with :data:`SHIFT_GRID_COARSE` (paper and whitened
    keys). Gradient: the last two layers, step sizes :data:`LR_GRID` x 5 steps on ``n_gradient`` records.
    Per layer the real-path values go up until efficacy reaches 99%. Selection: :func:`_select`. Returns the calibration record
    (``fingerprint``, ``variants``, ``how``, and ``grid`` with every point).
    """
    from .edit import model_fingerprint

    adapter = get_adapter(model)
    records, n = _check_records(records, n)
    last = adapter.num_layers(model) - 1
    n_other = min(n_other_layers, n)
    n_grad = min(n_gradient, n)
    started = time.perf_counter()
    grid: dict[str, list[dict]] = {}

    def keep(name, layer, key, value, row):
        grid.setdefault(name, []).append({"layer": layer, key: value, "n": row["n"],
                                          "memit_argmax": row["memit_argmax"],
                                          "rome_probability": row["rome_probability"]})

    key_norms = {layer: median_key_norm(model, tokenizer, records[:n_other], layer, adapter=adapter)
                 for layer in range(last + 1)}
    variants = {
        "forward_shift": ({}, "scale", [s / key_norms[last] for s in SHIFT_GRID]),
        "forward_shift_whitened": ({"whiten": True}, "scale", list(SHIFT_GRID)),
        "forward_shift_normalized_auto": ({"normalize": True, "scale": "auto"}, "margin", list(MARGIN_GRID)),
        "forward_shift_whitened_auto": ({"whiten": True, "scale": "auto"}, "margin", list(MARGIN_GRID)),
    }
    for point in last_layer_sweep(model, tokenizer, records, variants, n=n, progress=progress, adapter=adapter):
        keep(point["variant"], last, point["key"], point["value"], point)

    def real(name, method, kwargs, key, values, count):
        for value in values:
            row = evaluate_counterfact(model, tokenizer, records, method=method, n=count, fluency=False,
                                       progress=progress, label=f"{name} layer={kwargs['layer']} {key}={value:g}",
                                       adapter=adapter, **{**kwargs, key: value})
            keep(name, kwargs["layer"], key, value, row)
            if row["memit_argmax"]["efficacy"] >= 99.0:
                break

    for layer in range(last):
        real("forward_shift", "forward_shift", {"layer": layer}, "scale",
             [s / key_norms[layer] for s in SHIFT_GRID_COARSE], n_other)
        real("forward_shift_whitened", "forward_shift",
             {"layer": layer, "whiten": ff2_whitening(model, tokenizer, layer, adapter=adapter)}, "scale",
             SHIFT_GRID_COARSE, n_other)
    for layer in sorted({last, max(last - 1, 0)}):
        real("gradient", "gradient", {"layer": layer, "steps": 5}, "lr", LR_GRID, n_grad)
    chosen = {}
    for name, points in grid.items():
        best = _select(points)
        settings = {k: v for k, v in best.items() if k not in ("memit_argmax", "rome_probability", "n")}
        if name == "gradient":
            settings["steps"] = 5
        settings["calibration_memit_argmax"] = best["memit_argmax"]
        settings["calibration_records"] = best["n"]
        chosen[name] = settings
    return {
        "fingerprint": model_fingerprint(model, adapter),
        "variants": chosen,
        "how": (f"`blens eval-counterfact --calibrate FILE --start {start} --n {n}`: records {start}-{start + n - 1} "
                "of "
                "the CounterFact edit file, disjoint from the evaluated records 0-999. Last layer: exact sweep "
                f"(last_layer_sweep) on all {n} records, shift sizes {[round(x, 2) for x in SHIFT_GRID]} (the paper's "
                "raw key a_n: divided by the layer's median a_n.a_n), margins "
                f"{list(MARGIN_GRID)} for scale='auto'. Other layers: real edit + forward on the first {n_other} "
                f"records, shift sizes {list(SHIFT_GRID_COARSE)} (paper and whitened keys). Gradient baseline: "
                "the last "
                f"two layers, lr {list(LR_GRID)} "
                f"x 5 steps on the first {n_grad} records. Real-path values go up until efficacy reaches 99%. "
                f"Chosen per variant: among settings with MEMIT-style efficacy >= {CALIBRATION_EFFICACY}%, the best "
                "harmonic mean of efficacy, paraphrase and neighborhood (MEMIT-style); if none reaches it, the "
                "most efficacious."),
        "median_key_norm": {str(k): v for k, v in key_norms.items()},
        "seconds": round(time.perf_counter() - started, 1),
        "grid": grid,
    }


# ----------------------------------------------------------------------------------------------
# the trade-off curves
# ----------------------------------------------------------------------------------------------
SWEEP_FACTORS = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)


def tradeoff_variants(model, adapter=None) -> dict:
    """The forward-shift variants to sweep, each at its calibrated layer: scale x :data:`SWEEP_FACTORS`
    (margins :data:`MARGIN_GRID` plus the calibrated one for scale='auto')."""
    from .edit import calibrated_defaults

    defaults = calibrated_defaults(model, adapter)
    out = {}
    for name, options in (("forward_shift", {}), ("forward_shift_normalized", {"normalize": True}),
                          ("forward_shift_whitened", {"whiten": True})):
        if name in defaults:
            setting = defaults[name]
            out[name] = ({"layer": setting["layer"], **options}, "scale",
                         [setting["scale"] * f for f in SWEEP_FACTORS])
    for name, options in (("forward_shift_normalized_auto", {"normalize": True}),
                          ("forward_shift_whitened_auto", {"whiten": True})):
        if name in defaults:
            margins = sorted(set(MARGIN_GRID) | {defaults[name]["margin"]})
            out[name] = ({"layer": defaults[name]["layer"], "scale": "auto", **options}, "margin", margins)
    if not out:
        raise ValueError("this model has no calibrated forward-shift settings: run blens eval-counterfact --calibrate")
    return out


def run_tradeoff(model, tokenizer, records, *, n, out_dir, progress=True, reference_rows=()) -> tuple[Path, Path]:
    """Sweep :func:`tradeoff_variants` on the first ``n`` records; write ``counterfact_tradeoff.json`` / ``.png``
    with, at the paper variant's efficacy (its calibrated row in ``reference_rows``), each curve's
    neighborhood accuracy (linear interpolation)."""
    variants = tradeoff_variants(model)
    last = get_adapter(model).num_layers(model) - 1
    exact = {k: v for k, v in variants.items() if v[0]["layer"] % (last + 1) == last}
    other = {k: v for k, v in variants.items() if k not in exact}
    points = last_layer_sweep(model, tokenizer, records, exact, n=n, progress=progress) if exact else []
    points += sweep(model, tokenizer, records, other, n=n, progress=progress) if other else []
    paper = next((r for r in reference_rows if r.get("label", "").startswith("forward shift (paper")), None)
    comparison = {}
    if paper is not None:
        for family in ("memit_argmax", "rome_probability"):
            eff = paper[family]["efficacy"]
            comparison[family] = {"efficacy": eff, "paper_row_neighborhood": paper[family]["neighborhood"],
                                  "neighborhood_at_that_efficacy": {
                                      name: neighborhood_at_efficacy([p for p in points if p["variant"] == name],
                                                                     eff, family=family) for name in variants}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "counterfact_tradeoff.json", out_dir / "counterfact_tradeoff.png"
    slim = [{k: v for k, v in p.items() if k in ("variant", "key", "value", "settings", "memit_argmax",
                                                 "rome_probability", "skipped", "revert_failures", "n")}
            for p in points]
    json_path.write_text(json.dumps({"n": n, "variants": {k: {"options": _settings(v[0]), "key": v[1],
                                                              "values": v[2]} for k, v in variants.items()},
                                     "comparison_at_paper_efficacy": comparison, "points": slim}, indent=1) + "\n")
    if comparison:
        lines = ["", "## Trade-off at the paper shift's efficacy", "",
                 "Best neighborhood accuracy each backward-free variant offers at an efficacy at least that of the "
                 "paper's forward shift at its calibrated setting (from `counterfact_tradeoff.json`, sweeps over "
                 "scales / margins on the same records; see `counterfact_tradeoff.png`).", "",
                 "| variant | MEMIT-style neighborhood | ROME-style neighborhood |", "|---|---|---|"]
        m, r = comparison.get("memit_argmax", {}), comparison.get("rome_probability", {})
        lines.append(f"| paper row (efficacy {m.get('efficacy', 0):.1f} / {r.get('efficacy', 0):.1f}) | "
                     f"{m.get('paper_row_neighborhood', 0):.1f} | {r.get('paper_row_neighborhood', 0):.1f} |")
        fmt = lambda v: "not reached" if v is None else f"{v:.1f}"  # noqa: E731
        for name in variants:
            lines.append(f"| {name} | {fmt(m.get('neighborhood_at_that_efficacy', {}).get(name))} | "
                         f"{fmt(r.get('neighborhood_at_that_efficacy', {}).get(name))} |")
        md = out_dir / "counterfact_eval.md"
        if md.is_file():
            text = md.read_text().split("\n## Trade-off at the paper shift's efficacy")[0].rstrip("\n") + "\n"
            md.write_text(text + "\n".join(lines) + "\n")
    refs = [r for r in reference_rows if r["method"] in ("none", "gradient") or r is paper]
    plot_tradeoff(points, png_path, rows=refs,
                  title=f"CounterFact records 0-{n - 1}: efficacy vs neighborhood across scales (margins for auto)")
    return json_path, png_path
