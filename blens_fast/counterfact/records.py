"""CounterFact records (EasyEdit layout) for the editing harness: their check and the queries made of them.

:func:`load` and :func:`fact_texts` are :func:`blens_fast.records.load_counterfact` and
:func:`blens_fast.records.fact_texts` (read below every layer that uses them); :func:`load` gives every record ``id``
(its ``case_id``) and ``target`` (its true object), so that CounterFact records read as (prompt, target) records
everywhere: the lens and the statistics of a fact the model knows.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .._checks import check_positive_int
from .._ui import plural
from ..records import fact_texts, load_counterfact as load

__all__ = ["FIELDS", "check_records", "fact_queries", "fact_texts", "load"]

#: every field a record needs for the editing harness
FIELDS = ("prompt", "rephrase_prompt", "locality_prompt", "locality_ground_truth", "ground_truth", "target_new")


def check_records(records, n: int | None, fields=FIELDS) -> tuple[list, int]:
    """``(records, n)`` validated for the editing harness: ``n`` (default all) records, each with every field."""
    if isinstance(records, (str, Path)):
        records = load(records)
    if not isinstance(records, (list, tuple)):
        raise TypeError(f"records must be a list of CounterFact records (dicts), got {type(records).__name__}")
    n = len(records) if n is None else check_positive_int(n, "n")
    if n > len(records):
        raise ValueError(f"n={n} but only {plural(len(records), 'record was', 'records were')} given")
    for i, record in enumerate(records[:n]):
        if not isinstance(record, dict):
            raise TypeError(f"records[{i}] must be a dict, got {type(record).__name__}")
        missing = [f for f in fields if not isinstance(record.get(f), str) or not record.get(f).strip()]
        if missing:
            raise ValueError(f"records[{i}] lacks the field(s) {', '.join(missing)} (CounterFact, EasyEdit layout)")
    return list(records), n


def fact_queries(records: Iterable[dict], kind: str = "prompt") -> tuple[list[str], list[str]]:
    """``(prompts, objects)`` of one query kind: ``prompt``, ``rephrase_prompt`` or ``locality_prompt`` with their
    true objects, each with its leading space (``" French"``)."""
    answer_key = "locality_ground_truth" if kind == "locality_prompt" else "ground_truth"
    prompts, objects = [], []
    for r in records:
        prompts.append(r[kind])
        objects.append(" " + r[answer_key])
    return prompts, objects
