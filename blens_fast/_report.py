"""Small helpers for written results: markdown tables and a description of the machine."""
from __future__ import annotations

import json
import os
import platform

from pathlib import Path

import pandas as pd
import torch


def markdown_table(frame: pd.DataFrame, *, index: bool = False, floatfmt: str = ".4g") -> str:
    """A GitHub markdown table of ``frame`` (no optional dependency needed)."""
    if index:
        frame = frame.reset_index()
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        cells = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_description() -> str:
    """E.g. ``"CPU x86_64, 2 cores, torch 2.13.0+cpu"`` or the GPU's name."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def machine_info() -> dict:
    """The machine, torch's thread count and the load average, for benchmark results."""
    return {"machine": machine_description(), "threads": torch.get_num_threads(), "load_average": os.getloadavg()}


def write_result(directory, name: str, result: dict, *, table_key: str | None = None, table: list[str] = ()) -> None:
    """``name.json`` (all of ``result``) and ``name.md`` (its fields as bullets, then ``table`` built by the caller
    from ``result[table_key]``) in ``directory``; prints the fields."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    lines = [f"# {name}", "", f"machine: {result.get('machine')} (load average {result.get('load_average')})", ""]
    lines += [f"- **{key}**: {value}" for key, value in result.items()
              if key not in (table_key, "machine", "load_average")]
    if table:
        lines += ["", *table]
    (directory / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != table_key}, indent=1, default=str))
