"""The output folder of a bulk run: the shard committer (atomic writes, segments, each shard's size and sha256), the
manifest, the folder lock, and the plan (which shards a session finds done and which it must compute).

Layout::

    run.json                       the run's arguments (another run with other arguments is refused)
    rows/part-000012.parquet       the lens rows of shard 12     two Parquet datasets, each in its own folder:
    records/part-000012.parquet    the records of shard 12       pd.read_parquet(out / "rows") reads them as they are
    segments/seg-<session>-r<rank>.json                the shards one process committed, with sizes and sha256s
    segments/stats-<session>-r<rank>-<n>.safetensors   that process's cumulative gradient sketches (--stats)
    manifest.json                  every shard with its ids, sizes and sha256s, written once all are done
    summary.json  rejected.jsonl  stats/{summary,spectrum,norms}.parquet  stats/state.safetensors
    .lock-r<rank>                  the lock of each process, naming its holder

Commit protocol (nothing lost, nothing twice). A shard's Parquet files are written to temporary names and renamed;
then (``--stats``) the process's cumulative sketch state goes to a new file; then its segment file, which lists the
shards it has finished with their sizes and hashes and names its current state file, is replaced atomically: the
commit. A kill at any moment leaves either the old segment (the shard is redone, under the same file names) or the
new one. File names read from a segment are accepted only as plain names inside ``segments/``, and states are
safetensors files: nothing in the folder is ever executed.
"""
from __future__ import annotations

import dataclasses
import fcntl
import math
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .._io import atomic_write_json, atomic_write_table, file_sha256, read_json

FORMAT = 2
SHARD_TABLES = ("rows", "records")
SEGMENTS = "segments"
#: the merged statistics of a run with ``stats=True``: file name -> GradientStats table
STATS_TABLES = {"stats/summary.parquet": "summary", "stats/spectrum.parquet": "spectrum",
                "stats/norms.parquet": "norms"}
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def shard_file(out: Path, table: str, shard: int) -> Path:
    return out / table / f"part-{shard:06d}.parquet"


# -- fault injection (tests) ------------------------------------------------------------------------------------
# BLENS_FAULT="point:n" SIGKILLs this process the n-th time it reaches `point` ("point:n:raise" raises InjectedFault
# instead, for in-process tests). Points: after_rows, after_records, after_stats, after_commit.
_fault_counts: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """Raised at a fault point when BLENS_FAULT asks for it (tests of the commit protocol)."""


def reset_faults() -> None:
    _fault_counts.clear()


def fault(point: str) -> None:
    name, _, rest = os.environ.get("BLENS_FAULT", "").partition(":")
    if name != point:
        return
    count, _, mode = rest.partition(":")
    _fault_counts[point] = _fault_counts.get(point, 0) + 1
    if _fault_counts[point] >= int(count or 1):
        if mode == "raise":
            raise InjectedFault(f"injected fault at {point} (#{_fault_counts[point]})")
        os.kill(os.getpid(), signal.SIGKILL)


# -- digests -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Digest:
    """A file's size and sha256, as committed."""

    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> "Digest":
        return cls(path.stat().st_size, file_sha256(path))

    def problem(self, path: Path) -> str | None:
        """Why ``path`` is not the committed file (None when it is)."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "is missing"
        if size != self.size:
            return f"has {size} bytes, {self.size} were committed (truncated or replaced)"
        if file_sha256(path) != self.sha256:
            return "differs from the committed file (sha256 mismatch: replaced or corrupted)"
        return None

    def to_json(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, value, where: str) -> "Digest":
        if not (isinstance(value, dict) and isinstance(value.get("size"), int)
                and isinstance(value.get("sha256"), str)):
            raise ValueError(f"{where}: expected a file digest {{'size': int, 'sha256': str}}, got {value!r}")
        return cls(value["size"], value["sha256"])


def plain_name(name, where: str) -> str:
    """``name`` when it is a plain file name (no folder, no leading dot); a ``ValueError`` otherwise."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise ValueError(f"{where} names the file {name!r}: expected a plain file name inside the run's "
                         f"{SEGMENTS}/ folder; refusing to read it")
    return name


# -- shards and segments ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardEntry:
    """A committed shard: its record ids (input order), rejected records, row count, files' digests, and whether
    its examples are in its segment's gradient statistics (a shard recomputed only because its files were damaged
    is not: its statistics were counted by the segment that first committed it)."""

    shard: int
    ids: tuple[str, ...]
    rejected: tuple[dict, ...]
    rows: int
    files: dict
    stats: bool

    def problem(self, out: Path, tables=SHARD_TABLES) -> str | None:
        """Why the shard's files (of ``tables``) on disk are not the committed ones (None when they are)."""
        for table in tables:
            path = shard_file(out, table, self.shard)
            why = self.files[table].problem(path)
            if why:
                return f"shard {self.shard}: {str(path)!r} {why}"
        return None

    def to_json(self) -> dict:
        return {"shard": self.shard, "ids": list(self.ids), "rejected": list(self.rejected), "rows": self.rows,
                "files": {t: d.to_json() for t, d in self.files.items()}, "stats": self.stats}

    @classmethod
    def from_json(cls, value: dict, where: str) -> "ShardEntry":
        try:
            files = {t: Digest.from_json(value["files"][t], f"its {t} file") for t in SHARD_TABLES}
            return cls(int(value["shard"]), tuple(str(i) for i in value["ids"]), tuple(value["rejected"]),
                       int(value["rows"]), files, bool(value["stats"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: a shard entry is malformed ({error})") from None


@dataclass(frozen=True)
class Segment:
    """The commits of one process in one session: its shards and its cumulative statistics file."""

    name: str
    session: str
    rank: int
    shards: tuple[ShardEntry, ...] = ()
    stats_file: str | None = None
    stats_digest: Digest | None = None

    def stats_problem(self, out: Path) -> str | None:
        """Why the statistics this segment names cannot be used (None when they can)."""
        if self.stats_file is None:
            return "names no statistics file"
        return self.stats_digest.problem(out / SEGMENTS / self.stats_file)

    def to_json(self) -> dict:
        return {"session": self.session, "rank": self.rank, "shards": [e.to_json() for e in self.shards],
                "stats": None if self.stats_file is None else {"file": self.stats_file,
                                                               **self.stats_digest.to_json()}}

    @classmethod
    def from_json(cls, value, path: Path) -> "Segment":
        where = str(path)
        if not (isinstance(value, dict) and isinstance(value.get("shards"), list) and isinstance(value.get("rank"), int)
                and isinstance(value.get("stats"), (dict, type(None)))):
            raise ValueError(f"{where} is not a project-dataset segment (expected 'session', 'rank', 'shards' and "
                             "'stats')")
        segment = cls(path.name, str(value.get("session")), value["rank"],
                      tuple(ShardEntry.from_json(e, where) for e in value["shards"]))
        stats = value["stats"]
        if stats is None:
            return segment
        return dataclasses.replace(segment, stats_file=plain_name(stats.get("file"), where),
                                   stats_digest=Digest.from_json(stats, where))


def read_segments(out: Path, log=None) -> list[Segment]:
    """Every segment of the run, by name. A segment that is not JSON (damaged) is left out, with a log line: its
    shards count as not done and are recomputed."""
    segments = []
    for path in sorted((out / SEGMENTS).glob("seg-*.json")):
        try:
            value = read_json(path, "segment")
        except ValueError as error:
            if log is not None:
                log(f"blens project-dataset: {error}; its shards will be recomputed")
            continue
        segments.append(Segment.from_json(value, path))
    return segments


class ShardCommitter:
    """One process's commits in one session (see the module docstring for the protocol)."""

    def __init__(self, out: Path, session: str, rank: int, accumulator=None):
        self.out = out
        self.accumulator = accumulator
        self.segment = Segment(f"seg-{session}-r{rank}.json", session, rank)

    def commit(self, shard: int, tables: dict, ids, rejected, *, stats: bool) -> ShardEntry:
        """Write the shard's tables, then (``stats``: the accumulator holds its examples) the state, then commit."""
        files = {}
        for table in SHARD_TABLES:
            path = atomic_write_table(shard_file(self.out, table, shard), tables[table])
            files[table] = Digest.of(path)
            fault(f"after_{table}")
        entry = ShardEntry(shard, tuple(ids), tuple(rejected), tables["rows"].num_rows, files, stats)
        old_stats = self.segment.stats_file
        segment = dataclasses.replace(self.segment, shards=(*self.segment.shards, entry))
        if stats:
            name = f"stats-{segment.session}-r{segment.rank}-{len(segment.shards):06d}.safetensors"
            path = self.accumulator.save(self.out / SEGMENTS / name)
            segment = dataclasses.replace(segment, stats_file=name, stats_digest=Digest.of(path))
            fault("after_stats")
        atomic_write_json(self.out / SEGMENTS / segment.name, segment.to_json())  # the commit
        self.segment = segment
        fault("after_commit")
        if stats and old_stats:
            (self.out / SEGMENTS / old_stats).unlink(missing_ok=True)
        return entry


# -- the lock ----------------------------------------------------------------------------------------------
LOCK_PREFIX = ".lock-r"


class FolderLock:
    """An exclusive lock on the output folder for one process (one lock file per rank under torchrun): ``flock`` on
    a file that names its holder. The kernel releases it when the process ends, however it ends, so a killed run
    never blocks a restart."""

    def __init__(self, out: Path, rank: int):
        self.out = out
        self.path = out / f"{LOCK_PREFIX}{rank}"
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "a process that has not named itself yet"
            os.close(fd)
            raise ValueError(f"output folder {str(self.out)!r} is in use by another project-dataset run ({holder}): "
                             "wait for it to end, or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                     .encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def holds_results(path: Path) -> bool:
    """Whether ``path`` (an entry of an output folder) is more than a lock file."""
    return not path.name.startswith(LOCK_PREFIX)


# -- the manifest ------------------------------------------------------------------------------------------
def read_manifest(out: Path) -> dict | None:
    """The manifest of a finished run (None before it is finished); a ``ValueError`` naming it when damaged."""
    path = out / "manifest.json"
    if not path.exists():
        return None
    manifest = read_json(path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("shards"),
                                                                                            list):
        raise ValueError(f"manifest {str(path)!r} is not a project-dataset manifest of format {FORMAT}")
    return manifest


def manifest_entries(manifest: dict, out: Path) -> list[ShardEntry]:
    return [ShardEntry.from_json(e, str(out / "manifest.json")) for e in manifest["shards"]]


def manifest_outputs(manifest: dict, out: Path) -> dict[str, Digest]:
    return {name: Digest.from_json(d, str(out / "manifest.json")) for name, d in manifest.get("outputs", {}).items()}


def shard_count(records: int, shard_size: int) -> int:
    return max(1, math.ceil(records / shard_size))


@dataclass(frozen=True)
class Plan:
    """What a session finds and has to do: ``done``: verified committed shards; ``todo``: ``(shard, with
    statistics)`` still to compute, ascending; ``void``: segments whose statistics are unusable; ``notes``: what
    was found damaged (log lines)."""

    done: dict
    todo: tuple[tuple[int, bool], ...]
    void: tuple[Segment, ...]
    notes: tuple[str, ...]


def plan_shards(out: Path, segments: list[Segment], shard_count: int, with_stats: bool) -> Plan:
    """Which shards are done and which must be computed (see "Resume" in :mod:`.run`); reads and hashes the files."""
    notes, void, valid = [], [], []
    for segment in segments:
        why = segment.stats_problem(out) if with_stats and any(e.stats for e in segment.shards) else None
        if why:
            notes.append(f"segment {segment.name}: its statistics file {why}; its shards will be recomputed")
            void.append(segment)
        else:
            valid.append(segment)
    counted = {e.shard for s in valid for e in s.shards if e.stats or not with_stats}
    done: dict[int, ShardEntry] = {}
    problems: dict[int, str] = {}
    for entry in (e for s in valid for e in s.shards):
        if entry.shard in done or entry.shard not in counted:
            continue
        why = entry.problem(out)
        if why:
            problems[entry.shard] = why
        else:
            done[entry.shard] = entry
    notes += [f"{problems[j]}: recomputing it" for j in sorted(set(problems) - set(done))]
    todo = tuple((j, with_stats and j not in counted) for j in range(shard_count) if j not in done)
    return Plan(done, todo, tuple(void), tuple(notes))
