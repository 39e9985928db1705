"""Compare fresh micro-benchmark ratios with the committed ones (``make bench-check``).

    python benchmarks/check_micro.py FRESH [--committed DIR] [--margin 0.15] [--short-margin 0.35]

FRESH: a ``micro_<machine>.json`` written by ``python -m pytest benchmarks/micro --micro-results DIR``, or that
folder (holding one). It is compared with the committed file of the same name in ``--committed`` (default
benchmarks/results). Where this machine has none, the committed file of the same kind of device (CPU or GPU) that
shares the most ratios stands in, and the output says so: ratios move less between machines than times, but a
failure there may be the machine, so the message says how to record this one's.

Exit status 1 when a ratio (fast path / yardstick, lower is better) is more than the margin above the committed
one, or when a ratio committed for this machine is missing from the fresh run; 2 when there is nothing to compare
with. Margins come from two back-to-back runs on a quiet 2-core Xeon (benchmarks/micro/README.md): every ratio whose
fast path takes 5 ms or more moved by at most 11% (``--margin``, 15%); the one path under 5 ms (a 1.4 ms sketch
update) moved by 28% (``--short-margin``, 35%, for fast paths under 5 ms in the committed run).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import RESULTS, markdown_table

MARGIN = 0.15
SHORT_MARGIN = 0.35
SHORT_PATH_S = 0.005


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def ratios(result: dict) -> dict[str, float]:
    """``{"group: path / yardstick": ratio}``."""
    return {ratio_key(r): r["ratio"] for r in result["ratios"]}


def ratio_key(row: dict) -> str:
    return f"{row['group']}: {row['path']} / {row['yardstick']}"


def margins(result: dict, margin: float, short_margin: float) -> dict[str, float]:
    """Each committed ratio's margin: ``short_margin`` where its fast path took under 5 ms, else ``margin``."""
    return {ratio_key(r): short_margin if r["path_min_s"] < SHORT_PATH_S else margin for r in result["ratios"]}


def fresh_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    found = sorted(path.glob("micro_*.json"))
    if len(found) != 1:
        raise SystemExit(f"{path}: expected one micro_*.json, found {len(found)}: run "
                         f"`python -m pytest benchmarks/micro --micro-results {path}` into an empty folder first")
    return found[0]


def committed_file(fresh: Path, result: dict, folder: Path) -> tuple[Path, bool]:
    """``(committed file, whether it is this machine's)``: the same name, else the closest (module docstring)."""
    own = folder / fresh.name
    if own.is_file():
        return own, True
    kind = result["machine"].split()[0]
    wanted = set(ratios(result))
    shared = {path: len(wanted & set(ratios(read(path)))) for path in sorted(folder.glob("micro_*.json"))
              if read(path)["machine"].split()[0] == kind}
    if not any(shared.values()):
        print(f"no committed micro-benchmark ratios in {folder} to compare with ({result['machine']}): run "
              f"`make bench` on this machine and commit {folder / fresh.name}", file=sys.stderr)
        raise SystemExit(2)
    return max(shared, key=shared.get), False


def compare(fresh: dict[str, float], committed: dict[str, float], margin: dict[str, float], own: bool) -> list[dict]:
    """One row per ratio, committed ones first, each with its verdict: ``ok``, ``faster``, ``SLOWER`` (failing),
    ``MISSING`` (failing: committed for this machine, not in the fresh run), ``not run here`` (another machine's) or
    ``new``."""
    rows = []
    for key, before in committed.items():
        now = fresh.get(key)
        if now is None:
            rows.append({"ratio": key, "committed": f"{before:.4g}", "fresh": "", "change": "",
                         "verdict": "MISSING" if own else "not run here"})
            continue
        change = now / before - 1
        allowed = margin[key]
        rows.append({"ratio": key, "committed": f"{before:.4g}", "fresh": f"{now:.4g}", "change": f"{change:+.1%}",
                     "margin": f"{allowed:.0%}",
                     "verdict": "SLOWER" if change > allowed else "faster" if change < -allowed else "ok"})
    return rows + [{"ratio": key, "committed": "", "fresh": f"{now:.4g}", "change": "", "verdict": "new"}
                   for key, now in fresh.items() if key not in committed]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fresh", type=Path, help="a fresh micro_<machine>.json or the folder holding it")
    parser.add_argument("--committed", type=Path, default=RESULTS, help=f"committed results (default: {RESULTS})")
    parser.add_argument("--margin", type=float, default=MARGIN,
                        help=f"largest allowed rise of a ratio, as a fraction (default: {MARGIN})")
    parser.add_argument("--short-margin", type=float, default=SHORT_MARGIN,
                        help=f"the same for fast paths under {SHORT_PATH_S * 1e3:g} ms (default: {SHORT_MARGIN})")
    args = parser.parse_args(argv)
    fresh_path = fresh_file(args.fresh)
    fresh = read(fresh_path)
    committed_path, own = committed_file(fresh_path, fresh, args.committed)
    committed = read(committed_path)
    if not own:
        print(f"no committed ratios for this machine ({fresh['machine']}): comparing with {committed_path.name} "
              f"({committed['machine']})")
    rows = compare(ratios(fresh), ratios(committed), margins(committed, args.margin, args.short_margin), own)
    print(markdown_table(rows))
    slower = sum(r["verdict"] == "SLOWER" for r in rows)
    missing = sum(r["verdict"] == "MISSING" for r in rows)
    if slower or missing:
        advice = ("" if own else f"; if this machine is just different, run `make bench` here and commit "
                  f"{args.committed / fresh_path.name}")
        print(f"FAILED: {slower} ratio(s) worse than the committed ones by more than their margin, "
              f"{missing} missing from the fresh run{advice}")
        return 1
    print(f"ok: no ratio worse than the committed ones ({committed_path}) by more than its margin")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
