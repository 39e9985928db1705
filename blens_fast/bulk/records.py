"""The input of a bulk run: records read from JSON Lines, a JSON list, Parquet, the shipped CounterFact file or a list
in memory, validated one by one, so that a bad record names its line and what is wrong with it.

A record is a mapping with a prompt field, a target field and an optional id field (or a ``(prompt, target)``
pair in memory: :mod:`blens_fast.records`). Ids default to the record's line (JSON Lines) or number (1-based).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

from .._checks import first_line
from .._io import file_sha256
from ..records import load_counterfact

#: the input name of the shipped CounterFact edit file, read through :func:`blens_fast.counterfact.load`
COUNTERFACT = "counterfact"


class BadRecord(ValueError):
    """A record that cannot be used: its source, line (1-based; the record number for JSON lists, Parquet and
    records in memory) and the reason."""

    def __init__(self, source: str, line: int, reason: str, raw=None):
        super().__init__(f"{source}:{line}: {reason}")
        self.source, self.line, self.reason, self.raw = source, line, reason, raw


@dataclass(frozen=True)
class Record:
    """One input record: valid (``error`` is None, ``id``/``prompt``/``target`` set) or bad (``error`` says why)."""

    index: int  # position in the input, bad records included: the shard plan counts these
    line: int
    id: str | None = None
    prompt: str | None = None
    target: str | None = None
    error: str | None = None
    raw: object = field(default=None, repr=False)

    def rejection(self, reason: str) -> dict:
        """The line of ``rejected.jsonl`` for this record."""
        return {"line": self.line, "index": self.index, "id": self.id, "reason": reason, "record": self.raw}


@dataclass(frozen=True)
class Fields:
    """The record fields holding the prompt, the target and the (optional) id."""

    prompt: str = "prompt"
    target: str = "target"
    id: str = "id"

    def __post_init__(self):
        for name, value in (("prompt_field", self.prompt), ("target_field", self.target), ("id_field", self.id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class RecordSource:
    """Where the records come from, readable as many times as needed: ``label`` names it in messages, ``identity``
    says what the run's fingerprint records of it (a file's path, size and sha256; a content hash in memory)."""

    label: str
    identity: dict
    _raw: Callable[[], Iterator[tuple[int, object, str | None]]] = field(repr=False)
    #: the whole input of a selection (:meth:`select`), None for a whole input
    whole: "RecordSource | None" = field(default=None, repr=False)

    def records(self, fields: Fields = Fields()) -> Iterator[Record]:
        """Every record in input order, validated: malformed JSON, a missing or non-string field, an empty prompt or
        target and a duplicate id make a bad record."""
        seen: dict[str, int] = {}
        for index, (line, value, error) in enumerate(self._raw()):
            error = error or _field_error(value, fields)
            record_id = None
            if error is None:
                raw_id = value.get(fields.id, line)
                if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                    error = f"field {fields.id!r} must be a string or an int, got {type(raw_id).__name__}"
                else:
                    record_id = str(raw_id)
                    if record_id in seen:
                        error = f"duplicate id {record_id!r} (first on line {seen[record_id]})"
                    else:
                        seen[record_id] = line
            if error is not None:
                yield Record(index, line, record_id, error=error, raw=value)
            else:
                yield Record(index, line, record_id, value[fields.prompt], value[fields.target], raw=value)

    def select(self, start: int = 0, n: int | None = None) -> "RecordSource":
        """The records at positions ``start .. start + n - 1`` of this whole input (all from ``start`` when ``n`` is
        None; bad records count) as a source of their own: positions count from 0 in it, lines stay the input's, and
        its ``identity`` records the selection."""
        if start == 0 and n is None:
            return self
        stop = None if n is None else start + n
        return replace(self, identity={**self.identity, "start": start, "n": n}, whole=self,
                       _raw=lambda: islice(self._raw(), start, stop))

    def count(self, at_most: int | None = None) -> int:
        """How many records the input holds (bad ones included), reading at most ``at_most`` of them (then the count
        is exact when it is below ``at_most``)."""
        return sum(1 for _ in islice(self._raw(), at_most))

    def bad(self, record: Record, reason: str | None = None) -> BadRecord:
        return BadRecord(self.label, record.line, reason or record.error, record.raw)


def _field_error(value, fields: Fields) -> str | None:
    if not isinstance(value, Mapping):
        return f"expected a JSON object with {fields.prompt!r} and {fields.target!r}, got {type(value).__name__}"
    for name in (fields.prompt, fields.target):
        if value.get(name) is None:
            return f"missing field {name!r} (the record has {', '.join(map(repr, value)) or 'no fields'})"
        if not isinstance(value[name], str):
            return f"field {name!r} must be a string, got {type(value[name]).__name__}"
    if not value[fields.prompt].strip():
        return f"empty prompt (field {fields.prompt!r})"
    if not value[fields.target].strip():
        return f"empty target (field {fields.target!r})"
    return None


def open_source(input, fields: Fields = Fields()) -> RecordSource:
    """The :class:`RecordSource` of ``input``: a path (``.jsonl``, ``.json`` holding a list or JSON Lines,
    ``.parquet``), ``"counterfact"`` (the shipped CounterFact edit file, as :func:`blens_fast.records.load_counterfact`
    gives it: ``id`` = case id, ``target`` = true object), or records in memory (mappings or ``(prompt, target)``
    pairs)."""
    if isinstance(input, (str, Path)) or hasattr(input, "__fspath__"):
        if str(input) == COUNTERFACT:
            return _memory(load_counterfact(COUNTERFACT), COUNTERFACT, fields)
        return _file(Path(input))
    if isinstance(input, (bytes, Mapping)) or not isinstance(input, Iterable):
        raise TypeError(f"input must be a file path, 'counterfact' or a list of records, got {type(input).__name__}")
    return _memory(list(input), "records", fields)


def _file(path: Path) -> RecordSource:
    if not path.is_file():
        raise FileNotFoundError(f"input file {str(path)!r} does not exist")
    identity = {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": file_sha256(path)}
    return RecordSource(str(path), identity, lambda: _read_file(path))


def _memory(records: list, label: str, fields: Fields) -> RecordSource:
    values = [{fields.prompt: r[0], fields.target: r[1]} if isinstance(r, (tuple, list)) and len(r) == 2 else r
              for r in records]
    text = json.dumps(values, sort_keys=True, default=str, ensure_ascii=False)
    identity = {"name": label, "records": len(values), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return RecordSource(label, identity, lambda: ((number, value, None) for number, value in enumerate(values, 1)))


def _read_file(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """``(line, value, parse_error)`` per record of a JSON Lines, JSON-list or Parquet file, streaming where the
    format allows. A line that is not UTF-8 is a bad record naming its line; a file that is not Parquet or not a
    JSON list as a whole is a ``ValueError`` naming it."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    if suffix == ".json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):
            try:
                values = json.loads(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError as error:
                raise ValueError(f"input file {str(path)!r} is not UTF-8 text (byte {error.object[error.start]:#04x} "
                                 f"at offset {error.start}): expected a JSON list of records") from None
            except json.JSONDecodeError as error:
                yield error.lineno, None, f"malformed JSON ({error.msg})"
                return
            yield from ((number, value, None) for number, value in enumerate(values, 1))
            return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield number, None, (f"not UTF-8 text (byte {error.object[error.start]:#04x} at column "
                                     f"{error.start + 1})")
                continue
            if not text.strip():
                continue
            try:
                yield number, json.loads(text), None
            except json.JSONDecodeError as error:
                yield number, text.rstrip("\n"), f"malformed JSON ({error.msg} at column {error.colno})"


def _read_parquet(path: Path) -> Iterator[tuple[int, object, None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row, None
    except (pa.ArrowException, OSError) as error:
        where = f" after record {number}" if number else ""
        raise ValueError(f"input file {str(path)!r} is not a readable Parquet file{where} ({first_line(error)})") \
            from None
