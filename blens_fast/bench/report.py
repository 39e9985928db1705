"""The bench's files: ``<stem>.json`` (everything), ``<stem>.md`` (tables and how to read them), ``<stem>.png``."""
from __future__ import annotations

from pathlib import Path

from .._io import atomic_write_bytes, atomic_write_json, atomic_write_text, make_folder
from .._report import figure_png, markdown_table, pyplot
from .._ui import plural
from ..lens_reference import RANK_TOLERANCE
from .meter import STAGES

_KEYS = STAGES + ("end_to_end",)
_COLORS = {"naive": "#c0504d", "blens_fast": "#4f81bd"}


def output_stem(report: dict) -> str:
    """``bench_<device>_<model>`` (``_<dtype>`` unless float32)."""
    stem = f"bench_{report['device']}_{report['model']['name']}"
    return stem if report["dtype"] == "float32" else f"{stem}_{report['dtype']}"


def partial_path(directory, device, model_name: str) -> Path:
    """Where the runs done so far are kept until the report is written."""
    return Path(directory) / f"bench_{device.type}_{model_name}.partial.json"


def write_report(report: dict, directory) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``directory``."""
    directory = make_folder(directory)
    stem = output_stem(report)
    paths = {kind: directory / f"{stem}.{kind}" for kind in ("json", "md", "png")}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], markdown_report(report, png_name=paths["png"].name))
    plot_report(report, paths["png"])
    return paths


def _main_run(report: dict) -> dict:
    return next(r for r in report["runs"] if r["main"])


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f}"


def _number(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


AGREEMENT_NOTE = (
    "The \"same vectors\" fields project the naive way's own vectors of its first prompt with the fused kernel (the "
    "kernels alone, without the capture's numerics). \"Target rank equal\" accepts two ranks that differ by at most "
    f"the number of tokens whose logit lies within {RANK_TOLERANCE:g} x the row's largest |logit| of the target's "
    "(\"exactly equal\" is shown beside it). Gradient ranks: both ways count the singular values above "
    "max(sigma_max x max(shape) x eps(float32), eps(dtype) x ||G||_F): torch.linalg.matrix_rank's default rule, "
    "raised to the rounding floor of the dtype the gradient is held in. In float32 that is matrix_rank's rule itself. "
    "In bfloat16 and float16 autograd forms the naive way's dense gradient in that dtype and rounds each entry by up "
    "to eps/2 of it, an error of up to eps/2 x ||G||_F in spectral norm that makes the dense matrix full rank under "
    "matrix_rank's default rule; only the singular values above eps x ||G||_F are resolved, and both ways count "
    "those (blens_fast's float64 SVD of the factors resolves more: `blens_fast_without_floor` in the JSON, beside "
    "every gradient's and every row's rank by both ways under `runs[].ranks`, with the rule's numbers). The gradient "
    "norms are compared with `torch.linalg.matrix_norm` of the dense gradient (float32; 16-bit gradients are rounded "
    "to their dtype first); on the CPU its float32 reduction over d x 4d entries is itself off by up to about 1% at "
    "GPT-J dims (pytorch/pytorch#169237), while blens_fast's norms are float64 from the factors. In float32 every "
    "\"equal\" field decides; in 16-bit dtypes the gradient ranks and the same-vector lists decide, and the "
    "end-to-end lists are reported: 16-bit activations of a padded batch and of a single prompt round differently, "
    "which moves near-tied tokens after many layers.")


def markdown_report(report: dict, *, png_name: str | None = None) -> str:
    main = _main_run(report)
    naive, fast = main["ways"]["naive"], main["ways"]["blens_fast"]
    cfg = report["config"]
    t = main["tokens"]
    lines = [
        f"# Backward Lens benchmark: {report['model']['about']}",
        "",
        f"- machine: {report['machine']}",
        f"- torch {report['torch']}, device {report['device']}, dtype {report['dtype']}, "
        f"{plural(report['threads'], 'thread')}",
        f"- N = {plural(main['prompts'], 'CounterFact prompt')}, "
        + (f"T = {t} positions each" if t else f"CounterFact length ({main['positions_mean']:.1f} positions on "
                                              f"average, at most {main['positions_max']})")
        + f"; layers analysed: {report['model']['depth']} (FF1's input projection and mlp.out); k = {cfg['k']}"
        + (", unit-norm vectors" if cfg["unit_norm"] else ""),
        f"- model weights: {_mib(report['weights_bytes'])} MiB",
        f"- naive: {report['naive_method']}",
        f"- blens_fast: {report['fast_method']}",
        f"- memory: {report['memory_method']}",
    ]
    if naive.get("time_from_profiled_pass"):
        lines.append("- the naive way ran once, under the memory profiler, and its times are from that pass "
                     "(few, large ops: the profiler's per-op overhead is negligible there)")
    for way, rec in (("naive", naive), ("blens_fast", fast)):
        if rec.get("seconds_profiled_pass") and not rec.get("time_from_profiled_pass"):
            lines.append(f"- {way}: {rec['seconds_measured']:.3g} s in the timed pass, "
                         f"{rec['seconds_profiled_pass']:.3g} s in the profiled memory pass over "
                         f"{plural(rec['memory_prompts'], 'prompt')}")
    if naive.get("extrapolated"):
        lines.append(f"- **the naive way ran on {naive['prompts_run']} of the {plural(main['prompts'], 'prompt')}**: "
                     "its times are its measured time x N / prompts run (a loop over prompts, so linear in N); its "
                     "memory is the peak over the prompts it ran (per prompt, so flat in N)")
    longest = " (the longest ones)" if report["device"] == "cpu" and cfg.get("memory_prompts") else ""
    lines.append(f"- memory pass over {plural(fast.get('memory_prompts'), 'prompt')} (blens_fast) and "
                 f"{naive.get('memory_prompts')} (naive){longest}")
    if naive.get("error"):
        lines += ["", f"**naive way failed: {naive['error']}**"]
    lines += ["", "## Time and peak memory per stage", "", markdown_table(_stage_rows(main))]
    if naive.get("rss_peak_beyond_start_bytes") is not None and report["device"] == "cpu":
        lines += ["", f"Whole-process peak RSS beyond the start of each way's memory pass (coarse: pages freed by "
                      f"earlier passes in this process are reused without raising RSS, so later passes read low): "
                      f"naive {_mib(naive['rss_peak_beyond_start_bytes'])} MiB, blens_fast "
                      f"{_mib(fast['rss_peak_beyond_start_bytes'])} MiB."]
    if "agreement" in main:
        a = main["agreement"]
        lines += ["", f"## Agreement ({'PASS' if main['agree'] else 'FAIL'} at >= {cfg['agreement']:.3g})", "",
                  f"On the {plural(a['prompts_compared'], 'prompt')} both ways ran ({a['rows_compared']} projected "
                  "rows in all; in rows whose list holds exactly equal logits, e.g. a zero vector, the order of tied "
                  "tokens is undefined and the values are compared instead): "
                  + ", ".join(f"{key.replace('_', ' ')} {v:.4g}" for key, v in a.items() if key != "prompts_compared"),
                  "", AGREEMENT_NOTE]
    if len(report["runs"]) > 1:
        lines += ["", "## Scaling (blens_fast)", "", markdown_table(_scaling_rows(report["runs"]))]
    if png_name:
        lines += ["", f"![memory and time per stage]({png_name})"]
    load = report.get("load_average")
    lines += ["", f"Total wall time of the benchmark: {report['wall_seconds']:.0f} s"
              + (f"; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)"
                 if load else "") + ".", ""]
    return "\n".join(lines)


def _stage_rows(main: dict) -> list[dict]:
    naive, fast = main["ways"]["naive"], main["ways"]["blens_fast"]
    ratios = main.get("ratios") or {}

    def get(rec, key, stage):
        return None if rec.get("error") else rec.get(key, {}).get(stage)

    def ratio(kind, stage):
        v = ratios.get(kind, {}).get(stage)
        return "n/a" if v is None else f"{v:.3g}x"

    return [{"stage": s.replace("_", " "), "naive s": _number(get(naive, "seconds", s)),
             "blens_fast s": _number(get(fast, "seconds", s)), "time ratio": ratio("time", s),
             "naive MiB beyond weights": _mib(get(naive, "peak_bytes_beyond_weights", s)),
             "blens_fast MiB beyond weights": _mib(get(fast, "peak_bytes_beyond_weights", s)),
             "memory ratio (beyond weights)": ratio("memory_beyond_weights", s),
             "naive MiB total": _mib(get(naive, "peak_bytes_total", s)),
             "blens_fast MiB total": _mib(get(fast, "peak_bytes_total", s)),
             "memory ratio (total)": ratio("memory_total", s)} for s in _KEYS]


def _scaling_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        f = r["ways"]["blens_fast"]
        seconds = f["seconds"]["end_to_end"]
        rows.append({"N": r["prompts"], "T": r["tokens"] or "CF", "positions (mean)": f"{r['positions_mean']:.1f}",
                     "seconds": _number(seconds), "s per prompt": _number(seconds / r["prompts"]),
                     "peak MiB beyond weights": _mib(f["peak_bytes_beyond_weights"]["end_to_end"])})
    return rows


def plot_report(report: dict, path) -> Path:
    """Peak memory and time per stage of both ways (log scale), and blens_fast's scaling with N and T."""
    main = _main_run(report)
    sweeps = [(s, key, label) for s, key, label in (
        ([r for r in report["runs"] if r["tokens"] == main["tokens"]], "prompts", "N (prompts)"),
        ([r for r in report["runs"] if r["prompts"] == main["prompts"]], "tokens", "T (positions)")) if len(s) > 1]
    fig, axes = pyplot().subplots(1, 2 + len(sweeps), figsize=(5.2 * (2 + len(sweeps)), 4.2), squeeze=False)
    axes = axes[0]
    for ax, (field, unit, scale, title) in zip(axes[:2], (
            ("peak_bytes_beyond_weights", "MiB", 2**20, "peak memory beyond weights"),
            ("seconds", "s", 1.0, "time"))):
        _stage_bars(ax, main, field, scale)
        ax.set_ylabel(unit)
        ax.set_title(f"{title} (N={main['prompts']})", fontsize=10)
    for ax, (sweep, key, label) in zip(axes[2:], sweeps):
        _scaling_panel(ax, main, sweep, key, label)
    fig.suptitle(f"{report['model']['about']} | {report['dtype']} | {report['machine']}", fontsize=8)
    fig.tight_layout()
    return atomic_write_bytes(path, figure_png(fig, dpi=110))


def _stage_bars(ax, main: dict, field: str, scale: float) -> None:
    for j, way in enumerate(("naive", "blens_fast")):
        rec = main["ways"][way]
        if rec.get("error"):
            continue
        values = [max(rec[field][s] / scale, 1e-6) for s in _KEYS]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(_KEYS))]
        scaled = way == "naive" and rec["extrapolated"] and field == "seconds"
        bars = ax.bar(xs, values, 0.38, label=way + (" (scaled)" if scaled else ""), color=_COLORS[way])
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * 8)
    ax.set_xticks(range(len(_KEYS)), [k.replace("_", " ") for k in _KEYS])
    ax.legend(fontsize=8, loc="upper left")


def _scaling_panel(ax, main: dict, sweep: list[dict], key: str, label: str) -> None:
    xs = [r[key] if r[key] is not None else r["positions_mean"] for r in sweep]
    seconds = [r["ways"]["blens_fast"]["seconds"]["end_to_end"] for r in sweep]
    mib = [r["ways"]["blens_fast"]["peak_bytes_beyond_weights"]["end_to_end"] / 2**20 for r in sweep]
    ax.plot(xs, seconds, "o-", color=_COLORS["blens_fast"], label="blens_fast time (s)")
    naive = main["ways"]["naive"]
    if key == "prompts" and not naive.get("error"):
        per_prompt = naive["seconds"]["end_to_end"] / main["prompts"]
        ax.plot(xs, [per_prompt * x for x in xs], "--", color=_COLORS["naive"], label="naive time (s), per-prompt x N")
        ax.set_xscale("log")  # both ways visible at once; time linear in N is a slope of 1
        ax.set_yscale("log")
        label += ", log-log"
    ax.set_xlabel(label)
    ax.set_ylabel("s")
    twin = ax.twinx()
    twin.plot(xs, mib, "s:", color="#9bbb59", label="blens_fast peak MiB beyond weights")
    twin.set_ylabel("MiB")
    twin.set_ylim(0, max(mib) * 1.3 + 1e-9)
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = twin.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, fontsize=7, loc="upper left")
    ax.set_title(f"scaling with {label}", fontsize=10)
