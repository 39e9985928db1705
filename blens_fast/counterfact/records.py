"""CounterFact records (EasyEdit layout) and the texts and queries made of them.

Fields of a record: ``case_id``, ``prompt``, ``subject``, ``ground_truth`` (the true object), ``target_new`` (the
counterfactual object), ``rephrase_prompt``, ``locality_prompt`` and ``locality_ground_truth``. :func:`load` also
gives every record ``id`` (its ``case_id``) and ``target`` (its true object), so that CounterFact records read as
(prompt, target) records everywhere (:mod:`blens_fast.records`): the lens and the statistics of a fact the model
knows.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .._checks import check_positive_int
from .._ui import plural

#: the shipped edit file (10,000 records; see its SOURCE.md)
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "counterfact" / "counterfact-edit.json"
#: every field a record needs for the editing harness
FIELDS = ("prompt", "rephrase_prompt", "locality_prompt", "locality_ground_truth", "ground_truth", "target_new")


def load(name_or_path="counterfact", n: int | None = None) -> list[dict]:
    """The first ``n`` (default: all) records of ``"counterfact"`` (the shipped edit file) or of a JSON (a list) or
    JSON Lines file in the same layout, each with ``id`` and ``target`` added (module docstring)."""
    path = SHIPPED if str(name_or_path) == "counterfact" else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"CounterFact records {str(name_or_path)!r}: no such file (expected 'counterfact' "
                                "or a JSON / JSON Lines file)")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not JSON or JSON Lines ({error})") from None
    if n is not None:
        records = records[:check_positive_int(n, "n")]
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{str(path)!r}: record {i} is a {type(record).__name__}, expected an object")
        if "ground_truth" in record:
            record.setdefault("target", record["ground_truth"])
        record.setdefault("id", record.get("case_id", i))
    return records


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


def fact_texts(records: Iterable[dict]) -> list[str]:
    """The true-fact sentences of the records, three per record, in record order: ``prompt + " " + ground_truth``,
    ``rephrase_prompt + " " + ground_truth`` and ``locality_prompt + " " + locality_ground_truth``."""
    texts = []
    for r in records:
        texts.append(r["prompt"] + " " + r["ground_truth"])
        texts.append(r["rephrase_prompt"] + " " + r["ground_truth"])
        texts.append(r["locality_prompt"] + " " + r["locality_ground_truth"])
    return texts
