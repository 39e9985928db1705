"""``impl="auto"`` from a table measured on the device, not from a guess.

``benchmarks/bench_gpu_roofline.py`` times every implementation of an operation side by side on a GPU and writes one
JSON table per GPU name into ``blens_fast/ops/tables/`` (:func:`write_table`); :func:`measured_impl` reads them and
answers, for a device name and a problem (``d``, ``V``, ``N``, ``k``, dtype), the implementation that was fastest
on the nearest measured shape, or ``None`` when no table matches (the dispatcher then keeps its default order).

Table format (``format`` 1)::

    {"format": 1, "device_name": "NVIDIA H200", "written": "2026-12-01T10:00:00Z", "meta": {...},
     "entries": [{"op": "topk", "dtype": "bfloat16", "d": 4096, "v": 50400, "n": 4096, "k": 10,
                  "times_ms": {"cuda": 1.9, "cuda:mma": 1.9, "cuda:simple": 95.0, "triton": 8.1, "torch": 12.0},
                  "best": "cuda", "extra_ms": {"triton:fixed": 9.0, "gemm": 1.5}}]}

``times_ms`` holds only implementations the dispatcher can run by name (``impl=``, the CUDA kernel's variants
included); ``extra_ms`` anything else that was timed (fixed launch configurations, the GEMM alone), for the record.
The nearest shape is the one with the smallest sum of squared log-ratios of ``d``, ``V``, ``N`` and ``k``; entries
of another operation or dtype never match.
``BLENS_FAST_TUNING_TABLES=DIR`` reads the tables from ``DIR`` instead (an empty or missing directory: no tables).
A table that is a symbolic link, not JSON or of another format is not used, and none is written through a link.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

from .._io import atomic_write_json, make_folder, read_bytes

#: Where the tables live (one ``<slug of the GPU name>.json`` per GPU)
TABLES_DIR = Path(__file__).resolve().parent / "tables"
FORMAT = 1

_CACHE: dict[Path, tuple[float, dict]] = {}


def tables_dir() -> Path:
    override = os.environ.get("BLENS_FAST_TUNING_TABLES")
    return Path(override) if override else TABLES_DIR


def device_slug(device_name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia_h200"``: the table's file name (without ``.json``)."""
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") or "unknown"


def table_path(device_name: str, root: str | Path | None = None) -> Path:
    return Path(root if root is not None else tables_dir()) / f"{device_slug(device_name)}.json"


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` or ``"torch.bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def _load(path: Path) -> dict | None:
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    cached = _CACHE.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    try:
        table = json.loads(read_bytes(path))  # never through a symbolic link
    except (OSError, ValueError):
        return None
    if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("entries"), list):
        return None
    _CACHE[path] = (mtime, table)
    return table


def load_table(device_name: str, root: str | Path | None = None) -> dict | None:
    """The table measured on ``device_name`` (matched by its slug), or None."""
    return _load(table_path(device_name, root))


def _distance(entry: dict, facts: dict) -> float:
    total = 0.0
    for name in ("d", "v", "n", "k"):
        a, b = facts[name], entry[name]
        total += math.log(max(a, 1) / max(b, 1)) ** 2
    return total


def _fastest(times: dict) -> str | None:
    finite = {impl: ms for impl, ms in times.items() if isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0}
    return min(sorted(finite), key=finite.get) if finite else None


def nearest_entry(op: str, device_name: str, *, d: int, v: int, n: int, k: int, dtype,
                  root: str | Path | None = None) -> dict | None:
    """The measured entry of ``op`` and ``dtype`` on ``device_name`` nearest to (d, v, n, k), or None."""
    table = load_table(device_name, root)
    if table is None:
        return None
    dt = dtype_name(dtype)
    facts = {"d": d, "v": v, "n": n, "k": k}
    best, best_dist = None, math.inf
    for entry in table["entries"]:
        try:
            if entry["op"] != op or dtype_name(entry["dtype"]) != dt or not _fastest(entry.get("times_ms", {})):
                continue
            dist = _distance(entry, facts)
        except (KeyError, TypeError, ValueError):
            continue  # a malformed entry never matches
        if dist < best_dist:
            best, best_dist = entry, dist
    return best


def measured_impl(op: str, device_name: str, *, d: int | None = None, v: int | None = None, n: int | None = None,
                  k: int | None = None, dtype=None, root: str | Path | None = None, **_other) -> str | None:
    """The implementation measured fastest for ``op`` on ``device_name`` at the nearest measured shape (same dtype),
    or None when there is no table for that GPU, no entry for ``op`` / ``dtype``, or a fact is missing.

    The registry calls ``measured_impl(op, torch.cuda.get_device_name(device), **facts)`` with ``facts`` = ``k``,
    ``n``, ``d``, ``v``, ``dtype``; other facts are ignored. The answer is a name for ``impl=`` (``"cuda"``,
    ``"triton"``, ``"torch"``...); the caller still checks that it can run (``k`` limits, extension built)."""
    if None in (d, v, n, k, dtype) or not device_name:
        return None
    entry = nearest_entry(op, device_name, d=d, v=v, n=max(n, 1), k=k, dtype=dtype, root=root)
    return None if entry is None else _fastest(entry["times_ms"])


def make_entry(op: str, *, d: int, v: int, n: int, k: int, dtype, times_ms: dict, extra_ms: dict | None = None,
               **fields) -> dict:
    """One table entry (``best`` filled in); ``fields`` are kept as they are (e.g. ``lists``, ``gemm_ms``)."""
    entry = {"op": op, "dtype": dtype_name(dtype), "d": int(d), "v": int(v), "n": int(n), "k": int(k),
             "times_ms": {impl: float(ms) for impl, ms in times_ms.items()}}
    entry["best"] = _fastest(entry["times_ms"])
    if extra_ms:
        entry["extra_ms"] = {name: float(ms) for name, ms in extra_ms.items()}
    entry.update(fields)
    return entry


def write_table(device_name: str, entries, *, root: str | Path | None = None, meta: dict | None = None,
                merge: bool = True) -> Path:
    """Write the table of ``device_name`` (entries as :func:`make_entry` makes them). With ``merge``, entries of an
    existing table for other (op, dtype, d, v, n, k) are kept and the same ones replaced. Returns the path."""
    path = table_path(device_name, root)
    make_folder(path.parent, "tuning tables folder")

    def ident(e):
        return (e["op"], dtype_name(e["dtype"]), e["d"], e["v"], e["n"], e["k"])

    new = {ident(e): e for e in entries}
    old = (_load(path) or {}).get("entries", []) if merge else []
    kept = [e for e in old if isinstance(e, dict) and ident(e) not in new]
    table = {"format": FORMAT, "device_name": device_name, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "meta": meta or {}, "entries": sorted(kept + list(new.values()), key=ident)}
    atomic_write_json(path, table)
    _CACHE.pop(path, None)
    return path
