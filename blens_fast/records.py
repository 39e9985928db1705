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
from ._ui import plural

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


def check_window(start, n, names: tuple[str, str] = ("start", "n")) -> tuple[int, int | None]:
    """The record selection every reader of records shares (``--start``/``--n`` on the command line, ``start=``/
    ``n=`` in Python): the records at positions ``start .. start + n - 1`` of the input (0-based, bad records
    included; all from ``start`` when ``n`` is None)."""
    if isinstance(start, bool) or not isinstance(start, int):
        raise TypeError(f"{names[0]}={start!r}: expected the 0-based index of the first record, an int")
    if start < 0:
        raise ValueError(f"{names[0]}={start}: expected 0 or more (the 0-based index of the first record)")
    return start, None if n is None else check_positive_int(n, names[1])


def selection_end(start: int, n: int | None) -> int:
    """How many records of an input decide whether it holds the selection ``start``/``n`` (:func:`check_held`)."""
    return start + (1 if n is None else n)


def check_held(source: str, total: int, start: int, n: int | None, names: tuple[str, str] = ("start", "n")) -> None:
    """A ``ValueError`` when the selection asks for records ``source`` does not have (it holds ``total``): the
    selection must start inside the input and, with ``n``, end inside it. ``total`` need not count past
    :func:`selection_end`: only that many records decide."""
    if start < total and (n is None or start + n <= total):
        return
    asked = (f"{names[0]}={start}, {names[1]}={n} asks for records {start}..{start + n - 1}" if n is not None
             else f"{names[0]}={start} asks for records from {start} on")
    raise ValueError(f"{source} holds {plural(total, 'record')} (0..{total - 1}): {asked}" if total else
                     f"{source} holds no records: {asked}")
