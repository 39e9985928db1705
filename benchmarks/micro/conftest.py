"""The micro-benchmark plugin: each group times fast paths and their yardsticks in one run (pytest-benchmark's
``benchmark`` fixture in pedantic mode, one torch thread), and this plugin turns the groups into ratios, fast path /
yardstick, writes them to ``<results>/micro_<machine>.json`` and ``.md`` and prints them at the end.

Ratios divide the minima over the rounds: other processes only ever add time, so the fastest round is the least
disturbed one, and with one to three rounds per path a median is not more robust (it is the mean of two rounds, or
the one round). The medians are written beside them (``ratio_of_medians``).

Slowdown hook (to see ``make bench-check`` fail): ``BLENS_BENCH_SLOWDOWN=PATTERN`` makes every fast path whose
``group:path`` matches the shell-style ``PATTERN`` run twice per timed round, e.g.
``BLENS_BENCH_SLOWDOWN='topk_logits/cpu/*:cpu'``. Yardsticks are never slowed.
"""
from __future__ import annotations

import fnmatch
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from blens_fast._report import machine_info, markdown_table, write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"
SLOWDOWN_ENV = "BLENS_BENCH_SLOWDOWN"


@dataclass(frozen=True)
class Timing:
    """One path's times over its rounds."""

    group: str
    path: str
    yardstick: bool
    median_s: float
    min_s: float
    rounds: int


TIMINGS = pytest.StashKey[list]()
LOAD_AT_START = pytest.StashKey[list]()
REPORT = pytest.StashKey[tuple]()


def pytest_addoption(parser):
    parser.addoption("--micro-results", type=Path, default=RESULTS, metavar="DIR",
                     help=f"folder for micro_<machine>.json and .md (default: {RESULTS})")


def pytest_configure(config):
    config.stash[TIMINGS] = []
    config.stash[LOAD_AT_START] = list(os.getloadavg())


@contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


def slowed(group: str, path: str) -> bool:
    """Whether the slowdown hook (module docstring) applies to this fast path."""
    pattern = os.environ.get(SLOWDOWN_ENV)
    return bool(pattern) and fnmatch.fnmatchcase(f"{group}:{path}", pattern)


@pytest.fixture
def measure(benchmark, request):
    """``measure(fn, case, path, yardstick=False, setup=None)``: time ``fn()`` as ``path`` of ``case``'s group
    (rounds from :meth:`microbench.Case.rounds_of`; ``setup()`` runs untimed before each round) and record it."""
    timings = request.config.stash[TIMINGS]

    def run(fn, case, path: str, *, yardstick: bool = False, setup=None):
        calls = 2 if not yardstick and slowed(case.group, path) else 1
        sync = torch.cuda.synchronize if case.device == "cuda" else None

        def target():
            for _ in range(calls):
                fn()
            if sync is not None:
                sync()

        rounds, warmup_rounds = case.rounds_of(yardstick)
        benchmark.group = case.group
        benchmark.extra_info.update(path=path, yardstick=yardstick)
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds)
        if benchmark.enabled:
            stats = benchmark.stats.stats
            timings.append(Timing(case.group, path, yardstick, stats.median, stats.min, stats.rounds))

    return run


def ratio_rows(timings: list[Timing]) -> list[dict]:
    """One row per (fast path, yardstick) of each group."""
    rows = []
    for group in dict.fromkeys(t.group for t in timings):
        found = [t for t in timings if t.group == group]
        for fast in (t for t in found if not t.yardstick):
            for base in (t for t in found if t.yardstick):
                rows.append({"group": group, "path": fast.path, "yardstick": base.path,
                             "ratio": fast.min_s / base.min_s, "ratio_of_medians": fast.median_s / base.median_s,
                             "path_min_s": fast.min_s, "yardstick_min_s": base.min_s,
                             "path_median_s": fast.median_s, "yardstick_median_s": base.median_s,
                             "path_rounds": fast.rounds, "yardstick_rounds": base.rounds})
    return rows


def ratio_table(rows: list[dict]) -> str:
    return markdown_table([{"group": r["group"], "path": r["path"], "yardstick": r["yardstick"],
                            "ratio": f"{r['ratio']:.4g}", "ratio of medians": f"{r['ratio_of_medians']:.4g}",
                            "path min ms": f"{1e3 * r['path_min_s']:.2f}",
                            "yardstick min ms": f"{1e3 * r['yardstick_min_s']:.2f}",
                            "rounds (path/yardstick)": f"{r['path_rounds']}/{r['yardstick_rounds']}"} for r in rows])


def results_name(machine: str) -> str:
    """``micro_<machine slug>``: the machine as :func:`blens_fast._report.machine_description` names it."""
    return "micro_" + re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    config = session.config
    rows = ratio_rows(config.stash[TIMINGS])
    if not rows:
        return
    with torch_threads(1):  # the thread count the cases ran with, as the machine's description names it
        info = machine_info()
    result = {**info, "load_average_start": config.stash[LOAD_AT_START], "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "statistic": "min over rounds",
              "slowdown": os.environ.get(SLOWDOWN_ENV), "ratios": rows}
    table = ratio_table(rows)
    written = write_result(config.getoption("micro_results"), results_name(info["machine"]), result,
                           table_key="ratios", table=["Fast path / yardstick, lower is better.", "", table],
                           echo=False)
    config.stash[REPORT] = (table, written["json"])


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, config):
    if REPORT in config.stash:
        table, path = config.stash[REPORT]
        terminalreporter.section("ratios: fast path / yardstick (min over rounds; lower is better)")
        terminalreporter.write_line(table)
        terminalreporter.write_line(f"written: {path} (and .md)")
