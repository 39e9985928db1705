"""Written results: one markdown table builder, one description of the machine, one result writer."""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ._io import atomic_write_json, atomic_write_text, make_folder


def markdown_table(rows, *, columns: Sequence[str] | None = None, index: bool = False, floatfmt: str = ".4g") -> str:
    """A GitHub markdown table of a DataFrame or of a list of dicts (``columns`` picks and orders them)."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if index:
        frame = frame.reset_index()
    if columns is not None:
        frame = frame[list(columns)]
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        cells = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 120) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    return buffer.getvalue()


def write_file(path, data: bytes | str) -> Path:
    """Write ``data`` to ``path``, creating its folder; returns the path."""
    path = Path(path)
    make_folder(path.parent)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device | str | None = None) -> str:
    """E.g. ``"CPU AMD EPYC, 2 cores, 1 torch threads, torch 2.13.0+cpu"`` or ``"GPU NVIDIA H100 80GB HBM3, CUDA
    12.8, torch 2.11.0"``: the GPU when ``device`` is a CUDA device (default: a GPU if there is one)."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {_cpu_name()}, {cores} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def machine_info(device=None) -> dict:
    """The machine, torch's thread count and the load average, for benchmark results."""
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"machine": machine_description(device), "threads": torch.get_num_threads(), "load_average": load}


def write_result(directory, name: str, result: Mapping, *, table_key: str | None = None, table: Sequence[str] = (),
                 echo: bool = True) -> dict[str, Path]:
    """``name.json`` (all of ``result``) and ``name.md`` (its fields as bullets, then ``table``, markdown lines built
    by the caller, usually from ``result[table_key]``) in ``directory``; prints the fields when ``echo``."""
    directory = make_folder(directory)
    paths = {"json": directory / f"{name}.json", "md": directory / f"{name}.md"}
    atomic_write_json(paths["json"], dict(result))
    lines = [f"# {name}", "", f"machine: {result.get('machine')} (load average {result.get('load_average')})", ""]
    lines += [f"- **{key}**: {value}" for key, value in result.items()
              if key not in (table_key, "machine", "load_average")]
    if table:
        lines += ["", *table]
    atomic_write_text(paths["md"], "\n".join(lines) + "\n")
    if echo:
        print(json.dumps({k: v for k, v in result.items() if k != table_key}, indent=1, default=str))
    return paths
