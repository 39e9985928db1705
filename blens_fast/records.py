"""One record convention for every call that reads many facts.

A record is a mapping with a prompt field, a target field and an optional id field (by default ``prompt``,
``target`` and ``id``; :func:`blens_fast.counterfact.load` gives CounterFact records with ``target`` = the true
object and ``id`` = the case id), or a ``(prompt, target)`` pair. Ids default to the record's position.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import islice


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
