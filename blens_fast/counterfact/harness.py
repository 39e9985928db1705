"""The CounterFact harness: edit, score, revert (checked bit for bit), for each record.

Two metric families, kept apart as the literature does (all in percent):

* **MEMIT-style argmax accuracy**: is the first token of the new object the argmax at the last token of ``prompt``
  (efficacy) and of ``rephrase_prompt`` (paraphrase)? Is the first token of ``locality_ground_truth`` still the
  argmax at ``locality_prompt`` (neighborhood)?
* **ROME-style probability comparison** over whole objects (sum of token log-probabilities, objects scored with a
  leading space): ``P(new) > P(true)`` at ``prompt`` (efficacy score) and ``rephrase_prompt`` (paraphrase score);
  ``P(locality_ground_truth) > P(new)`` at ``locality_prompt`` (neighborhood score).

Fluency cost: the perplexity (``exp`` of the mean token NLL) of a fixed set of true-fact sentences, measured after
every edit and averaged over edits (``fluency_ppl``), next to its value for the unedited model.

All of one record's queries (6 prompt/object pairs) and the fluency sentences run as one right-padded batch through
the model without its LM head; the unembedding is applied only at the positions scored.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch

from .._checks import check_choice
from .._ui import progress_bar
from ..context import ModelContext, with_context
from ..editing import EditSettings, EditSkipped, edit, resolve_settings
from ..forward import forward_hidden
from .records import check_records, fact_texts

METHODS = ("none", "forward_shift", "gradient")
METRICS = ("efficacy", "paraphrase", "neighborhood")
FAMILIES = {"memit": "memit_argmax", "rome": "rome_probability"}


#: the six (prompt field, object field) pairs a record is scored on, by name, in the order of a scorer's batch
SCORED_PAIRS = {
    "new_at_prompt": ("prompt", "target_new"),
    "true_at_prompt": ("prompt", "ground_truth"),
    "new_at_rephrase": ("rephrase_prompt", "target_new"),
    "true_at_rephrase": ("rephrase_prompt", "ground_truth"),
    "new_at_locality": ("locality_prompt", "target_new"),
    "true_at_locality": ("locality_prompt", "locality_ground_truth"),
}


def scored_pairs(record) -> list[tuple[str, str]]:
    """The (prompt, object) pairs a record is scored on, in :data:`SCORED_PAIRS` order."""
    return [(record[prompt], record[target]) for prompt, target in SCORED_PAIRS.values()]


@dataclass(frozen=True)
class ScorerBatch:
    """One record's six (prompt, object) pairs (its first rows, in :data:`SCORED_PAIRS` order) and the fluency
    sentences as one right-padded batch (``ids``, ``mask``), with the scored positions: ``rows``, ``positions`` and
    the ``tokens`` read there, the pairs' first (``n_scored`` of them, pair by pair), then the fluency sentences'."""

    examples: list
    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor
    n_scored: int


class Scorer:
    """Scores one record's six (prompt, object) pairs and the fluency sentences in one forward pass."""

    def __init__(self, ctx: ModelContext, fluency_texts=()):
        self.ctx = ctx
        tokenizer = ctx.require_tokenizer()
        self.fluency = [s for s in (tuple(tokenizer(t)["input_ids"]) for t in fluency_texts) if len(s) > 1]

    def prepare(self, record) -> ScorerBatch:
        pairs = scored_pairs(record)
        examples = self.ctx.tokenize([p for p, _ in pairs], [o for _, o in pairs])
        sequences = [e.input_ids for e in examples] + list(self.fluency)
        rows, positions, tokens = [], [], []
        for row, e in enumerate(examples):
            for position, token in e.scored:
                rows.append(row)
                positions.append(position)
                tokens.append(token)
        for k, s in enumerate(self.fluency):
            rows.extend([len(examples) + k] * (len(s) - 1))
            positions.extend(range(len(s) - 1))
            tokens.extend(s[1:])
        ids, mask = self.ctx.pad(sequences)
        device = self.ctx.device
        return ScorerBatch(examples, ids, mask, torch.tensor(rows, device=device),
                           torch.tensor(positions, device=device), torch.tensor(tokens, device=device),
                           sum(len(e.target_ids) for e in examples))

    def score(self, batch: ScorerBatch, *, fluency: bool = True) -> dict:
        ids, mask, rows, positions, tokens = batch.ids, batch.mask, batch.rows, batch.positions, batch.tokens
        if not fluency:
            pairs = len(SCORED_PAIRS)
            keep = rows < pairs
            rows, positions, tokens = rows[keep], positions[keep], tokens[keep]
            width = int(mask[:pairs].sum(1).max())
            ids, mask = ids[:pairs, :width], mask[:pairs, :width]
        hidden = forward_hidden(self.ctx, ids, mask).hidden
        logits = self.ctx.lens.logits(hidden[rows, positions])
        result, token_lp = metrics(logits, batch.examples, rows, tokens, batch.n_scored)
        if fluency and len(token_lp) > batch.n_scored:
            result["fluency_nll"] = (-token_lp[batch.n_scored:].sum()).item()
            result["fluency_tokens"] = len(token_lp) - batch.n_scored
        return result


def metrics(logits, examples, rows, tokens, n_scored) -> tuple[dict, torch.Tensor]:
    """Both metric families of one record from the logits at its scored positions (pairs first, in
    :data:`SCORED_PAIRS` order)."""
    logp = logits.log_softmax(-1)
    token_lp = logp[torch.arange(len(tokens), device=logp.device), tokens]
    summed = torch.zeros(len(SCORED_PAIRS), device=logp.device, dtype=token_lp.dtype).index_add(
        0, rows[:n_scored], token_lp[:n_scored])
    object_lp = dict(zip(SCORED_PAIRS, summed.tolist()))  # each pair's whole object
    firsts, start = [], 0
    for e in examples:  # the first scored position of each pair is its prompt's last token
        firsts.append(start)
        start += len(e.target_ids)
    argmax = dict(zip(SCORED_PAIRS, logits[firsts].argmax(-1).tolist()))  # the prediction after each pair's prompt
    first_token = {name: e.target_ids[0] for name, e in zip(SCORED_PAIRS, examples)}
    return {
        "memit": {"efficacy": argmax["new_at_prompt"] == first_token["new_at_prompt"],
                  "paraphrase": argmax["new_at_rephrase"] == first_token["new_at_rephrase"],
                  # the locality prompt's prediction (either of its pairs gives it) is still the true object's
                  "neighborhood": argmax["new_at_locality"] == first_token["true_at_locality"]},
        "rome": {"efficacy": object_lp["new_at_prompt"] > object_lp["true_at_prompt"],
                 "paraphrase": object_lp["new_at_rephrase"] > object_lp["true_at_rephrase"],
                 "neighborhood": object_lp["true_at_locality"] > object_lp["new_at_locality"]},
    }, token_lp


def edit_options(ctx: ModelContext, method: str, options: dict, *, calibration=None,
                 progress: bool = True) -> EditSettings | None:
    """The complete, checked edit settings of a run (resolved once, before any record is scored; None for
    ``method="none"``); ``whiten=True`` becomes the layer's :class:`~blens_fast.editing.Whitening`, estimated once."""
    if method == "none":
        return None
    return resolve_settings(ctx, method, calibration=calibration, **options).with_whitening(ctx, progress=progress)


@with_context
def evaluate_counterfact(ctx: ModelContext, records, *, method: str = "forward_shift", n: int | None = None,
                         label: str | None = None, fluency_texts=None, fluency: bool = True, progress: bool = True,
                         details: bool = False, calibration=None, settings: EditSettings | None = None,
                         **edit_kwargs) -> dict:
    """Edit, score and revert for each of the first ``n`` records; returns one row of metrics (percent).

    Called as ``evaluate_counterfact(model, tokenizer, records)`` or ``evaluate_counterfact(ctx, records)``;
    ``records``: CounterFact records (:func:`blens_fast.counterfact.load`) or a path. ``method``: ``"none"`` (the
    unedited model), ``"forward_shift"`` or ``"gradient"``; ``edit_kwargs`` go to :func:`blens_fast.edit`
    (``layer``, ``scale``, ``whiten``, ``normalize_key``, ``margin``, ``lr``, ``steps``...); missing settings are
    resolved once before any work (``calibration=PATH`` as in :func:`blens_fast.edit`), and ``whiten=True`` is
    estimated once; ``settings``: an :class:`~blens_fast.editing.EditSettings` instead of ``edit_kwargs`` (its method
    is the run's). ``fluency_texts``: the sentences whose perplexity measures the fluency cost; default: the
    true-fact sentences of the 2 records after the evaluated ones (the first 2 when there are none). After each revert
    every ``mlp.out`` weight is compared bit for bit with a copy taken before the run (``revert_failures``; a failure
    is repaired from that copy), and all parameters' fingerprint at the end (``parameters_restored``).
    """
    method = "none" if method is None else method
    check_choice(method, "method", METHODS)
    records, n = check_records(records, n)
    if settings is None:
        settings = edit_options(ctx, method, edit_kwargs, calibration=calibration, progress=progress)
    elif not isinstance(settings, EditSettings):
        raise TypeError(f"settings must be an EditSettings (from resolve_settings), got {type(settings).__name__}")
    elif edit_kwargs or calibration is not None:
        raise ValueError("settings= already holds every setting: leave out "
                         f"{', '.join(sorted(edit_kwargs) or ['calibration'])}")
    elif settings.method != method:
        raise ValueError(f"settings= are for method={settings.method!r}: pass that method, got method={method!r}")
    else:
        settings = settings.with_whitening(ctx, progress=progress)
    if fluency_texts is None:
        fluency_texts = fact_texts(records[n:n + 2] if len(records) >= n + 2 else records[:2])
    scorer = Scorer(ctx, fluency_texts if fluency else ())
    snapshot = {l: ctx.weight(l, "mlp.out").detach().clone() for l in range(ctx.num_layers)}
    fingerprint = ctx.weights_fingerprint()
    unedited_fluency = _fluency_ppl(scorer, records[0]) if fluency and scorer.fluency else None
    totals = {family: dict.fromkeys(METRICS, 0) for family in FAMILIES}
    ntok, ppl_sum = 0, 0.0
    skipped = failures = 0
    shifts, per_record = [], []
    started = time.perf_counter()
    edit_seconds = 0.0
    for record in progress_bar(records[:n], desc=label or method, unit="rec", enabled=progress):
        prepared = scorer.prepare(record)
        applied = None
        if method != "none":
            t0 = time.perf_counter()
            with warnings.catch_warnings():  # skips are counted in the row instead
                warnings.simplefilter("ignore", EditSkipped)
                applied = edit(ctx, record["prompt"], record["target_new"], settings=settings, progress=False)
            edit_seconds += time.perf_counter() - t0
        try:
            scores = scorer.score(prepared, fluency=fluency)
        finally:
            if applied is not None:
                applied.revert()
        if applied is not None:
            skipped += not applied.updates
            if "shifts" in applied.info:
                shifts.append(applied.info["shifts"][0])
            failures += _restore(ctx, snapshot)
        for family in totals:
            for metric in METRICS:
                totals[family][metric] += scores[family][metric]
        if "fluency_nll" in scores:
            ntok += scores["fluency_tokens"]
            ppl_sum += math.exp(scores["fluency_nll"] / scores["fluency_tokens"])
        if details:
            per_record.append({"case_id": record.get("case_id"), **scores,
                               "skipped": applied is not None and not applied.updates})
    row = {
        "label": label or method,
        "method": method,
        "settings": {} if settings is None else settings.to_record(),
        "n": n,
        **{FAMILIES[family]: {m: 100.0 * totals[family][m] / n for m in METRICS} for family in FAMILIES},
        "fluency_ppl": ppl_sum / n if ntok else None,
        "fluency_ppl_unedited": unedited_fluency,
        "skipped": skipped,
        "revert_failures": failures,
        "parameters_restored": ctx.weights_fingerprint() == fingerprint,
        "seconds": round(time.perf_counter() - started, 2),
        "ms_per_edit": round(1000 * edit_seconds / n, 3) if method != "none" else None,
    }
    if shifts:
        row["median_shift"] = float(torch.tensor(shifts).median())
    if details:
        row["records"] = per_record
    return row


def _restore(ctx: ModelContext, snapshot: dict) -> int:
    """Compare every ``mlp.out`` weight with the run's snapshot bit for bit; repair and count the ones that differ."""
    failures = 0
    for layer, original in snapshot.items():
        weight = ctx.weight(layer, "mlp.out")
        if not torch.equal(weight, original):
            failures += 1
            with torch.no_grad():
                weight.copy_(original)
    return failures


def _fluency_ppl(scorer: Scorer, record) -> float:
    scores = scorer.score(scorer.prepare(record), fluency=True)
    return math.exp(scores["fluency_nll"] / scores["fluency_tokens"])
