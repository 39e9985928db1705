"""Reading a bulk run's results back, each file checked against the size and sha256 it was committed with."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .._checks import check_choice
from .._io import read_json
from .rows import SCHEMAS
from .shards import (STATS_TABLES, ShardEntry, manifest_entries, manifest_outputs, plan_shards, read_manifest,
                     read_segments, shard_count, shard_file)

TABLES = ("rows", "records", "rejected", *(f"stats_{name}" for name in STATS_TABLES.values()))
_REJECTED_COLUMNS = ["line", "index", "id", "reason", "record"]


def read_results(directory, table: str = "rows", *, columns: Sequence[str] | None = None,
                 partial: bool = False) -> pd.DataFrame:
    """The results of :func:`~blens_fast.bulk.project_dataset` in ``directory`` as one DataFrame, shards in input order.

    ``table``: ``"rows"`` (the lens rows), ``"records"`` (one row per record), ``"rejected"``, or
    ``"stats_summary"`` / ``"stats_spectrum"`` / ``"stats_norms"`` (runs with ``stats=True``). ``columns`` limits
    what is read. Every file is checked against the size and sha256 it was committed with: a damaged one raises a
    ``ValueError`` naming it. An unfinished run raises unless ``partial=True`` (then the shards committed so far are
    read).
    """
    out = Path(directory)
    check_choice(table, "table", TABLES)
    if not (out / "run.json").is_file():
        raise FileNotFoundError(f"{str(out)!r} holds no project-dataset results (no run.json)")
    run = read_json(out / "run.json", "run file")
    manifest = read_manifest(out)
    if table.startswith("stats_"):
        return _stats_table(out, manifest, table, columns)
    if manifest is not None:
        entries = manifest_entries(manifest, out)
    elif partial:
        entries = _committed_entries(out, run)
    else:
        raise ValueError(f"the run in {str(out)!r} is not finished (no manifest.json): run it again with the same "
                         "arguments to resume, or pass partial=True to read the shards done so far")
    if table == "rejected":
        return pd.DataFrame([r for entry in entries for r in entry.rejected], columns=_REJECTED_COLUMNS)
    tables = []
    for entry in entries:
        why = entry.problem(out, (table,))
        if why:
            raise ValueError(f"{why}: the results are damaged; run project-dataset again with the same arguments "
                             "to recompute the shard")
        tables.append(pq.read_table(shard_file(out, table, entry.shard), columns=columns))
    if not tables:
        empty = SCHEMAS[table].empty_table()
        tables = [empty if columns is None else empty.select(list(columns))]
    return pa.concat_tables(tables).to_pandas()


def _committed_entries(out: Path, run: dict) -> list[ShardEntry]:
    """The verified committed shards of an unfinished run, in shard order."""
    done = plan_shards(out, read_segments(out), shard_count(run["records"], run["shard_size"]),
                       run.get("stats") is not None).done
    return [done[j] for j in sorted(done)]


def _stats_table(out: Path, manifest: dict | None, table: str, columns) -> pd.DataFrame:
    name = next(file for file, short in STATS_TABLES.items() if f"stats_{short}" == table)
    digest = manifest_outputs(manifest, out).get(name) if manifest is not None else None
    if digest is None:
        raise FileNotFoundError(f"{str(out / name)!r} does not exist: was the run made with stats=True (--stats) "
                                "and finished?")
    why = digest.problem(out / name)
    if why:
        raise ValueError(f"{str(out / name)!r} {why}: run project-dataset again with the same arguments to write it "
                         "again")
    return pq.read_table(out / name, columns=columns).to_pandas()
