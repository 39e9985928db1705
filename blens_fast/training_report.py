"""A training lens's timelines: one PNG and one HTML page per module, drawn from its folder.

A timeline reads at a glance: a heatmap of layers (rows) by sampled steps (columns), coloured by the step's gradient
norm (log10), each cell naming the token the step writes most strongly there (FF2: the leading direction's first
``ff2_bottom`` token, the most promoted; FF1: its first ``ff1_top`` token, the input the step imprints). With tracked
prompts a second panel draws each tracked target's rank in FF2's bottom list per layer and step, and the target's
probability. The HTML page embeds the picture and lists every layer's top tokens per step.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from ._io import atomic_write_bytes, atomic_write_text, make_folder
from ._report import figure_png, pyplot
from .training import read_training_lens

#: the list a timeline cell names, per module side
CELL_LIST = {"out": "ff2_bottom", "in": "ff1_top"}
#: at most this many step columns carry a token label (more are drawn, unlabelled)
LABELLED_STEPS = 24


def summary_table(steps: pd.DataFrame) -> str:
    """Per (module, layer, source), over the sampled steps: their count, the first and last norm, the mean stable
    rank and the largest consistency mismatch, as text."""
    if steps.empty:
        return "(no sampled step)"
    grouped = steps.assign(module=steps["module"].astype(str), source=steps["source"].astype(str)).sort_values(
        "step").groupby(["module", "layer", "source"])
    table = pd.DataFrame({"steps": grouped["step"].count(), "first_norm": grouped["norm"].first(),
                          "last_norm": grouped["norm"].last(), "mean_stable_rank": grouped["stable_rank"].mean(),
                          "max_consistency": grouped["consistency"].max()})
    return table.to_string(float_format=lambda v: f"{v:.4g}")


def write_timelines(directory, out=None) -> dict[str, Path]:
    """Draw ``timeline_<module>.png`` and ``timeline_<module>.html`` for every module of the training lens in
    ``directory`` (into ``out``, default the same folder); returns the written paths."""
    rows = read_training_lens(directory, "rows")
    if rows.empty:
        raise ValueError(f"{str(directory)!r} holds no sampled step yet: nothing to draw")
    steps = read_training_lens(directory, "steps")
    tracked = read_training_lens(directory, "tracked")
    target = make_folder(out if out is not None else directory)
    written = {}
    for module in sorted(rows["module"].astype(str).unique()):
        png = _timeline_png(module, rows, steps, tracked)
        written[f"{module}.png"] = atomic_write_bytes(target / f"timeline_{module}.png", png)
        written[f"{module}.html"] = atomic_write_text(target / f"timeline_{module}.html",
                                                      _timeline_html(module, png, rows))
    return written


def cell_tokens(rows: pd.DataFrame, module: str, source: str = "gradient") -> pd.DataFrame:
    """Per (layer, step): the token a timeline cell names (the leading direction's first token of the module's
    list)."""
    name = CELL_LIST["out" if module == "mlp.out" else "in"]
    chosen = rows[(rows["module"].astype(str) == module) & (rows["source"].astype(str) == source)
                  & (rows["list"].astype(str) == name) & (rows["direction"] == 1) & (rows["rank"] == 1)]
    return chosen.pivot_table(index="layer", columns="step", values="token", aggfunc="first")


def _timeline_png(module: str, rows: pd.DataFrame, steps: pd.DataFrame, tracked: pd.DataFrame) -> bytes:
    plt = pyplot()
    cells = cell_tokens(rows, module)
    mine = steps[(steps["module"].astype(str) == module) & (steps["source"].astype(str) == "gradient")]
    norms = mine.pivot_table(index="layer", columns="step", values="norm").reindex(index=cells.index,
                                                                                   columns=cells.columns)
    panels = 2 if (module == "mlp.out" and not tracked.empty) else 1
    width = min(22.0, max(7.0, 0.55 * len(cells.columns) + 3))
    tracked_rows = tracked[["track", "layer"]].drop_duplicates().shape[0] if panels == 2 else 0
    fig, axes = plt.subplots(panels, 1, figsize=(width, 1.2 + 0.6 * len(cells.index) + (1.2 + 0.22 * tracked_rows)
                                                 * (panels - 1)),
                             squeeze=False, height_ratios=[len(cells.index), 0.4 * tracked_rows][:panels])
    ax = axes[0, 0]
    shade = np.log10(norms.to_numpy(dtype=float).clip(min=1e-30))
    image = ax.imshow(shade, aspect="auto", cmap="viridis")
    low, high = image.get_clim()
    columns = list(cells.columns)
    stride = max(1, int(np.ceil(len(columns) / LABELLED_STEPS)))
    for ci in range(0, len(columns), stride):
        for li in range(len(cells.index)):
            token = cells.iloc[li, ci]
            if isinstance(token, str):
                bright = (shade[li, ci] - low) > 0.6 * (high - low)  # viridis is light at its top
                ax.text(ci, li, token.strip()[:9] or repr(token), ha="center", va="center", fontsize=7,
                        color="black" if bright else "white", rotation=90 if len(columns) > 12 else 0)
    ax.set_xticks(range(0, len(columns), stride), [str(columns[i]) for i in range(0, len(columns), stride)],
                  fontsize=7)
    ax.set_yticks(range(len(cells.index)), [str(layer) for layer in cells.index])
    ax.set(xlabel="step", ylabel="layer")
    what = "most promoted token (ff2_bottom, leading direction)" if module == "mlp.out" else \
        "input token imprinted (ff1_top, leading direction)"
    ax.set_title(f"{module}: {what}; colour: log10 gradient norm", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    if panels == 2:
        _tracked_panel(axes[1, 0], tracked)
    fig.tight_layout()
    return figure_png(fig, dpi=110)


def _tracked_panel(ax, tracked: pd.DataFrame) -> None:
    """A heatmap: one row per (tracked prompt, layer), one column per sampled step, coloured by the target's log10
    rank among the tokens the step promotes there (yellow: rank 1)."""
    first = tracked[tracked["rank"] == 1]
    ranks = first.pivot_table(index=["track", "layer"], columns="step", values="target_rank", aggfunc="first")
    targets = first.groupby("track")["target"].first()
    image = ax.imshow(np.log10(ranks.to_numpy(dtype=float).clip(min=1)), aspect="auto", cmap="viridis_r",
                      interpolation="nearest")
    columns = list(ranks.columns)
    stride = max(1, int(np.ceil(len(columns) / LABELLED_STEPS)))
    ax.set_xticks(range(0, len(columns), stride), [str(columns[i]) for i in range(0, len(columns), stride)],
                  fontsize=7)
    ax.set_yticks(range(len(ranks.index)), [f"#{track} {targets[track].strip()!r} L{layer}"
                                            for track, layer in ranks.index], fontsize=7)
    ax.set(xlabel="step")
    ax.set_title("tracked prompts: log10 rank of the target among the tokens the step promotes at the prompt's "
                 "last position (ff2_bottom; yellow: rank 1)", fontsize=9)
    ax.figure.colorbar(image, ax=ax, fraction=0.03)


def _timeline_html(module: str, png: bytes, rows: pd.DataFrame) -> str:
    name = CELL_LIST["out" if module == "mlp.out" else "in"]
    chosen = rows[(rows["module"].astype(str) == module) & (rows["list"].astype(str) == name)
                  & (rows["direction"] == 1)]
    listed = (chosen.sort_values(["source", "step", "layer", "rank"])
              .groupby(["source", "step", "layer"])["token"].apply(lambda t: ", ".join(map(repr, t)))
              .reset_index(name=f"{name} (leading direction)"))
    image = base64.b64encode(png).decode()
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Training lens: {html.escape(module)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>
<h1>Training lens: {html.escape(module)}</h1>
<img alt="timeline" src="data:image/png;base64,{image}">
<h3>Tokens per step and layer</h3>{listed.to_html(index=False)}
</body></html>"""
