"""One record convention for every call that reads many facts.

A record is a mapping with a prompt field, a target field and an optional id field (by default ``prompt``,
``target`` and ``id``; :func:`load_counterfact` gives CounterFact records with ``target`` = the true object and
``id`` = the case id), or a ``(prompt, target)`` pair. Ids default to the record's position.

The shipped CounterFact edit file is read here, below every layer that uses its records or sentences (the lens, the
whitening statistics of edits, the CounterFact harness, bulk runs): fields ``case_id``, ``prompt``, ``subject``,
``ground_truth`` (the true object), ``target_new`` (the counterfactual object), ``rephrase_prompt``,
``locality_prompt`` and ``locality_ground_truth`` (EasyEdit layout).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path

from ._checks import check_positive_int

#: the shipped CounterFact edit file (10,000 records; see its SOURCE.md)
COUNTERFACT_FILE = Path(__file__).resolve().parent / "data" / "counterfact" / "counterfact-edit.json"


def id_prompt_target(records, *, prompt_field: str = "prompt", target_field: str = "target",
                     id_field: str = "id") -> Iterator[tuple[object, str, str]]:
    """``(id, prompt, target)`` per record; a ``ValueError``/``TypeError`` naming the first bad record."""
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise TypeError(f"records must be a list (or iterable) of records, got {type(records).__name__}")
    for i, record in enumerate(records):
        if isinstance(record, Mapping):
            missing = [f for f in (prompt_field, target_field) if f not in record]
            if missing:
                raise ValueError(f"records[{i}] has no {missing[0]!r} field: expected {prompt_field!r} and "
                                 f"{target_field!r} (and an optional {id_field!r}), got keys {sorted(record)}")
            yield record.get(id_field, i), record[prompt_field], record[target_field]
        elif isinstance(record, (tuple, list)) and len(record) == 2:
            yield i, record[0], record[1]
        else:
            raise TypeError(f"records[{i}] must be a mapping with {prompt_field!r} and {target_field!r} or a "
                            f"(prompt, target) pair, got {type(record).__name__}")


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of at most ``size`` items."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def load_counterfact(name_or_path="counterfact", n: int | None = None) -> list[dict]:
    """The first ``n`` (default: all) records of ``"counterfact"`` (the shipped edit file) or of a JSON (a list) or
    JSON Lines file in the same layout, each with ``id`` (its ``case_id``) and ``target`` (its true object) added."""
    path = COUNTERFACT_FILE if str(name_or_path) == "counterfact" else Path(name_or_path)
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


def fact_texts(records: Iterable[dict]) -> list[str]:
    """The true-fact sentences of the records, three per record, in record order: ``prompt + " " + ground_truth``,
    ``rephrase_prompt + " " + ground_truth`` and ``locality_prompt + " " + locality_ground_truth``."""
    texts = []
    for r in records:
        texts.append(r["prompt"] + " " + r["ground_truth"])
        texts.append(r["rephrase_prompt"] + " " + r["ground_truth"])
        texts.append(r["locality_prompt"] + " " + r["locality_ground_truth"])
    return texts
