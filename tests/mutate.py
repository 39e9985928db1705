"""Mutation testing of the core (``make mutate``): mutmut over the files that ``setup.cfg`` names, time-boxed and
resumable, then a report of every surviving mutant.

    python -m tests.mutate run --minutes 75   # mutmut run, stopped cleanly at the deadline; rerun to go on
    python -m tests.mutate run --survivors    # test again the unexplained survivors (after writing tests for them)
    python -m tests.mutate report             # tests/MUTATION.md from mutants/**/*.meta
    python -m tests.mutate planted            # issue 18's five bugs planted one at a time (MUTATION_PLANTED.md)

mutmut keeps each mutant's verdict under ``mutants/``, so a run that hits its deadline loses nothing: the next run
starts where it stopped. A survivor is either killed by a new test or explained in ``tests/mutation_explained.toml``
(an equivalent mutant, or a change no test can or should observe: an entry names the function and the line before
and after, so it survives renumbering); the report lists the unexplained ones first.
"""
from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "tests" / "MUTATION.md"
PLANTED_REPORT = ROOT / "tests" / "MUTATION_PLANTED.md"
EXPLAINED = ROOT / "tests" / "mutation_explained.toml"

# mutmut's exit codes, grouped: a timeout counts as caught (the mutant made the tests hang, which a run notices)
CAUGHT = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -11: "crashed", -9: "crashed"}
MISSED = {0: "survived", 5: "no tests", 33: "no tests"}


def run(minutes: float, workers: int, only_survivors: bool = False) -> int:
    """``mutmut run`` until it finishes or ``minutes`` pass; then an interrupt, which mutmut answers by saving.
    ``only_survivors``: test again only the mutants that survived or had no test and are not explained (after new tests
    were written for them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    names = unexplained_survivors() if only_survivors else []
    if only_survivors and not names:
        print("mutate: no survivors to test again")
        return 0
    process = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(workers), *names],
                               cwd=ROOT, env=env, start_new_session=True)
    try:
        return process.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        print(f"\nmutate: {minutes:g} minutes passed; stopping (run again to go on where this stopped)", flush=True)
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        return 0


def core_files() -> list[str]:
    """The files mutated (``only_mutate`` in setup.cfg)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config.get("mutmut", "only_mutate").split()


def verdicts() -> dict[str, tuple[str, int | None]]:
    """Every mutant of the core files: name -> (source file, exit code or None when not yet run)."""
    found = {}
    for source in core_files():
        meta = ROOT / "mutants" / f"{source}.meta"
        if not meta.exists():
            continue
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            found[name] = (source, code)
    return found


def status(code: int | None) -> str:
    if code is None:
        return "not run"
    return CAUGHT.get(code) or MISSED.get(code) or f"suspicious ({code})"


def diff(name: str, source: str) -> str:
    cwd = os.getcwd()
    os.chdir(ROOT)  # mutmut reads its configuration and mutants from the working directory
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        return "\n".join(line for line in get_diff_for_mutant(name, path=source).splitlines()
                         if line.startswith(("-", "+")) and not line.startswith(("---", "+++")))
    finally:
        os.chdir(cwd)


def load_explained() -> list[dict]:
    return tomllib.loads(EXPLAINED.read_text())["explained"] if EXPLAINED.exists() else []


def survivors() -> list[tuple[str, str, str, str, str | None]]:
    """Every survivor (or mutant without tests) as ``(name, source, verdict, diff, reason or None)``."""
    explained = load_explained()
    found = []
    for name, (source, code) in verdicts().items():
        if code in MISSED:
            change = diff(name, source)
            found.append((name, source, status(code), change, explanation(key(name, change), explained)))
    return found


def unexplained_survivors() -> list[str]:
    return [name for name, _, _, _, why in survivors() if not why]


def key(name: str, change: str) -> tuple[str, str, str]:
    """``(function, original line, mutant line)`` of a mutant: its function without mutmut's number (which shifts
    when the function changes) and the first line its diff removes and adds, stripped."""
    original = next((line[1:].strip() for line in change.splitlines() if line.startswith("-")), "")
    mutant = next((line[1:].strip() for line in change.splitlines() if line.startswith("+")), "")
    return re.sub(r"__mutmut_\d+$", "", name), original, mutant


def entry_key(entry: dict) -> tuple[str, str, str]:
    return entry["function"], entry["original"], entry["mutant"]


def explanation(mutant_key: tuple[str, str, str], explained: list[dict]) -> str | None:
    """The reason recorded for a survivor: the entry of its function whose lines match the mutant's diff."""
    return next((entry["why"].strip() for entry in explained if entry_key(entry) == mutant_key), None)


def report() -> int:
    found = verdicts()
    if not found:
        print("mutate: no results under mutants/; run `make mutate` first", file=sys.stderr)
        return 2
    explained = load_explained()
    by_file: dict[str, Counter] = {}
    for source, code in found.values():
        by_file.setdefault(source, Counter())[status(code)] += 1
    missed = survivors()  # (name, source, verdict, diff, why)
    total = Counter()
    for counts in by_file.values():
        total.update(counts)
    checked = sum(v for k, v in total.items() if k != "not run")
    caught = total["killed"] + total["timeout"] + total["crashed"]
    equivalent = sum(1 for survivor in missed if survivor[4])
    unexplained = [survivor for survivor in missed if not survivor[4]]

    lines = [
        "# Mutation testing of the core",
        "",
        f"`make mutate` (mutmut, files in `setup.cfg`), report written {time.strftime('%Y-%m-%d')} by "
        "`python -m tests.mutate report`. A timeout counts as caught. Score = caught / checked; "
        "the second score leaves out the survivors explained below as equivalent or unobservable.",
        "",
        "Scope: the files `only_mutate` lists in `setup.cfg`, less what they mark `# pragma: no mutate` (the lens "
        "report's text, PNG and HTML; in `bulk/run.py` everything but the resume decisions; in `stats.py` everything "
        "but the merge and the saved state) and less the wording of `raise` and `log(...)` messages "
        "(`do_not_mutate_patterns`). Tests: the default suite's tests of the core without the Triton-interpreter "
        "ones. The five bugs issue 18 found missed are planted one at a time by `python -m tests.mutate planted` "
        "([MUTATION_PLANTED.md](MUTATION_PLANTED.md)).",
        "",
        f"- mutants: {sum(total.values())}, checked: {checked}, not yet run: {total['not run']}",
        f"- caught: {caught} (killed {total['killed']}, timeout {total['timeout']}, crashed {total['crashed']})",
        f"- survived: {total['survived']}, no tests: {total['no tests']}, explained: {equivalent}, "
        f"unexplained: {len(unexplained)}",
        f"- **score: {caught / max(checked, 1):.1%}**; without the explained survivors: "
        f"**{caught / max(checked - equivalent, 1):.1%}**",
        "",
        "| file | mutants | caught | survived | no tests | not run | score |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, counts in sorted(by_file.items()):
        done = sum(v for k, v in counts.items() if k != "not run")
        hit = counts["killed"] + counts["timeout"] + counts["crashed"]
        lines.append(f"| `{source}` | {sum(counts.values())} | {hit} | {counts['survived']} | {counts['no tests']} "
                     f"| {counts['not run']} | {hit / max(done, 1):.1%} |")
    for title, group in (("Unexplained survivors", unexplained),
                         ("Explained survivors", [survivor for survivor in missed if survivor[4]])):
        lines += ["", f"## {title} ({len(group)})", ""]
        for name, source, verdict, change, why in sorted(group, key=lambda survivor: (survivor[1], survivor[0])):
            lines += [f"### `{name}` ({verdict})", ""]
            if why:
                lines += [why, ""]
            lines += ["```diff", change, "```", ""]
    used = {key(name, change) for name, _, _, change, why in missed if why}
    stale = [e for e in explained if entry_key(e) not in used]
    if stale:  # the code changed under them, or a test now kills the mutant: delete them from the file
        lines += ["", f"## Explanations that match no survivor ({len(stale)})", ""]
        lines += [f"- `{e['function']}`: `{e['original']}` -> `{e['mutant']}`" for e in stale]
    REPORT.write_text("\n".join(lines))
    print("\n".join(lines[4:9]))
    print(f"written: {REPORT}")
    return 0


#: the five bugs issue 18 found the suite missing: (what, file, line as it is, line with the bug, tests that must fail)
PLANTED = [
    ("the lens's ff2_bottom list read as a top list", "blens_fast/lens.py",
     '    "ff2_bottom": ("out", "delta", False),', '    "ff2_bottom": ("out", "delta", True),',
     ["tests/pipeline/test_lens.py"]),
    ("resume skips every shard below the highest finished one", "blens_fast/bulk/shards.py",
     "for j in range(shard_count) if j not in done)", "for j in range(max(done, default=-1) + 1, shard_count) if j not in done)",
     ["tests/pipeline/test_bulk.py"]),
    ("auto scale without dividing by the key's response", "blens_fast/editing/forward_shift.py",
     "shifts / response, torch.zeros_like(shifts)", "shifts, torch.zeros_like(shifts)",
     ["tests/pipeline/test_edit.py"]),
    ("token counts lost when statistics are merged", "blens_fast/stats.py",
     "        self.tokens += other.tokens\n", "        pass\n", ["tests/pipeline/test_stats.py", "tests/pipeline/test_bulk.py"]),
    ("batched rank tolerance from min(shape)", "blens_fast/lowrank.py",
     "cut_scale = max(self.shape) * eps", "cut_scale = min(self.shape) * eps", ["tests/pipeline/test_lowrank.py"]),
]


def planted() -> int:
    """Plant each bug of :data:`PLANTED` alone, run its tests, restore the file; write the table to
    tests/MUTATION_PLANTED.md. Fails when a planted bug passes the tests."""
    rows, missed = [], 0
    for what, source, before, after, tests in PLANTED:
        path = ROOT / source
        text = path.read_text()
        if text.count(before) != 1:
            raise SystemExit(f"mutate: {source} no longer holds the line to plant {what!r} in: update PLANTED")
        try:
            path.write_text(text.replace(before, after))
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                    cwd=ROOT, capture_output=True, text=True)
        finally:
            path.write_text(text)
        failed = next((line.split(" - ")[0].removeprefix("FAILED ") for line in result.stdout.splitlines()
                       if line.startswith("FAILED ")), None)
        missed += result.returncode == 0
        rows.append(f"| {what} | `{source}` | {'caught by `' + failed + '`' if failed else '**missed**'} |")
        print(rows[-1], flush=True)
    PLANTED_REPORT.write_text("\n".join([
        "# The five bugs of issue 18, planted one at a time", "",
        f"Written {time.strftime('%Y-%m-%d')} by `python -m tests.mutate planted`: each bug alone in the code, its "
        "test files run with `-x`, the file restored.", "",
        "| bug | file | result |", "|---|---|---|", *rows, ""]))
    print(f"written: {PLANTED_REPORT}")
    return 1 if missed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("run", help="run mutmut, time-boxed")
    start.add_argument("--minutes", type=float, default=75.0, help="stop after this long (default: 75)")
    start.add_argument("--workers", type=int, default=2, help="mutants tested at once (default: 2)")
    start.add_argument("--survivors", action="store_true",
                       help="test again only the unexplained survivors (after writing new tests for them)")
    commands.add_parser("report", help=f"write {REPORT.relative_to(ROOT)}")
    commands.add_parser("planted", help=f"plant issue 18's five bugs one at a time; write {PLANTED_REPORT.name}")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.minutes, args.workers, args.survivors)
    return planted() if args.command == "planted" else report()


if __name__ == "__main__":
    raise SystemExit(main())
