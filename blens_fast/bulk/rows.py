"""The two tables of a bulk run as Arrow tables with one fixed schema each, so that every shard of a run (an empty
one included) has the same columns, types and dictionaries and the shard files read as one Parquet dataset.

``rows``: one row per (record, list, layer, position, rank): ``id, layer, module, position, input_token, list,
rank, token_id, token, logit, prob, target_rank, grad_norm, grad_rank, grad_tokens, degenerate`` (``module`` and
``list`` dictionary-encoded; ``degenerate``: a zero or all-tied vector whose tokens mean nothing, as in
:class:`~blens_fast.lens.LensReport`). ``records``: one row per record: ``id, line, prompt, target, target_token_id,
tokens, loss``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from ..batching import Example
from ..lens import LensReport
from ..lists import LENS_MODULES, LIST_NAMES, LISTS

_CATEGORY = pa.dictionary(pa.int32(), pa.string())
ROWS_SCHEMA = pa.schema([
    ("id", pa.string()), ("layer", pa.int16()), ("module", _CATEGORY), ("position", pa.int16()),
    ("input_token", pa.string()), ("list", _CATEGORY), ("rank", pa.int16()), ("token_id", pa.int32()),
    ("token", pa.string()), ("logit", pa.float32()), ("prob", pa.float32()), ("target_rank", pa.int32()),
    ("grad_norm", pa.float64()), ("grad_rank", pa.int32()), ("grad_tokens", pa.int32()), ("degenerate", pa.bool_()),
])
RECORDS_SCHEMA = pa.schema([
    ("id", pa.string()), ("line", pa.int64()), ("prompt", pa.string()), ("target", pa.string()),
    ("target_token_id", pa.int32()), ("tokens", pa.int32()), ("loss", pa.float64()),
])
SCHEMAS = {"rows": ROWS_SCHEMA, "records": RECORDS_SCHEMA}
_DICTIONARIES = {"module": pa.array(LENS_MODULES, pa.string()), "list": pa.array(LIST_NAMES, pa.string())}


def report_columns(example: Example, report: LensReport, modules: Sequence[str]) -> dict:
    """One record's rows as numpy columns (token ids where the table holds texts, list and module as indices into
    their dictionaries), in ``(list, layer, position, rank)`` order."""
    grads = {(int(g.layer), g.module): g for g in report.gradients.itertuples(index=False)}
    input_ids = np.asarray(example.input_ids, dtype=np.int32)
    parts = []
    for list_index, entry in enumerate(LISTS):
        name, module = entry.name, entry.module
        if module not in modules:
            continue
        indices = report.indices[name]
        n_layers, n_pos, k = indices.shape
        count = n_layers * n_pos * k
        positions = np.tile(np.repeat(np.arange(n_pos, dtype=np.int16), k), n_layers)
        per_layer = [grads[(int(layer), module)] for layer in report.layers]

        def by_layer(values, dtype):
            return np.repeat(np.asarray(values, dtype=dtype), n_pos * k)

        def by_vector(values, dtype):  # one value per (layer, position)
            return np.repeat(values.reshape(-1).numpy().astype(dtype), k)

        parts.append({
            "layer": by_layer(report.layers, np.int16),
            "module": np.full(count, LENS_MODULES.index(module), dtype=np.int32),
            "position": positions,
            "input_token_id": input_ids[positions],
            "list": np.full(count, list_index, dtype=np.int32),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int16), n_layers * n_pos),
            "token_id": indices.reshape(-1).numpy().astype(np.int32),
            "logit": report.logits[name].reshape(-1).float().numpy(),
            "prob": report.probs[name].reshape(-1).float().numpy(),
            "target_rank": by_vector(report.target_rank[name], np.int32),
            "grad_norm": by_layer([g.norm for g in per_layer], np.float64),
            "grad_rank": by_layer([g.rank for g in per_layer], np.int32),
            "grad_tokens": by_layer([g.tokens for g in per_layer], np.int32),
            "degenerate": by_vector(report.degenerate[name], np.bool_),
        })
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def rows_table(parts: Sequence[tuple[str, dict]], vocabulary: pa.Array) -> pa.Table:
    """The rows of ``(id, report_columns(...))`` pairs, in their order; ``vocabulary``: every token id's text."""
    if not parts:
        return ROWS_SCHEMA.empty_table()
    columns = {key: np.concatenate([p[key] for _, p in parts]) for key in parts[0][1]}
    ids = np.concatenate([np.full(len(p["layer"]), rid, dtype=object) for rid, p in parts])
    arrays = {
        "id": pa.array(ids, pa.string()),
        "input_token": vocabulary.take(pa.array(columns.pop("input_token_id"))),
        "token": vocabulary.take(pa.array(columns["token_id"])),
        **{name: pa.DictionaryArray.from_arrays(pa.array(columns.pop(name)), dictionary)
           for name, dictionary in _DICTIONARIES.items()},
    }
    arrays.update({name: pa.array(values) for name, values in columns.items()})
    return pa.table([arrays[f.name].cast(f.type) for f in ROWS_SCHEMA], schema=ROWS_SCHEMA)


def records_table(rows: Sequence[dict]) -> pa.Table:
    """One row per record (dicts with the :data:`RECORDS_SCHEMA` fields)."""
    return pa.Table.from_pylist(list(rows), schema=RECORDS_SCHEMA)
