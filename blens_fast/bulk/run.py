"""The bulk run: the :class:`RunOptions` asked for, the frozen :class:`RunSpec` they resolve to and its
fingerprint, the capture/commit loop, ``torchrun`` ranks, and the final merge.

Plan. Shard ``j`` holds the input records ``j * shard_size .. (j + 1) * shard_size - 1`` (by position, bad ones
included); inside a shard the valid records are sorted by token count and cut into batches of at most
``batch_size`` records and ``max_tokens`` padded tokens. The default shard size, ``clamp(ceil(records / 32), 8,
256)``, depends on the record count only: the plan is a pure function of the input and the arguments, never of the
number of processes or of earlier interrupted runs, so every record is computed in the same batch whatever happens,
and the results are identical.

Resume. A shard is done when a segment commits it and its files on disk have the committed sizes and sha256s, and
(``--stats``) when its examples are in a segment's statistics whose file is intact. Any other shard is computed,
whatever the shards around it: a shard whose files alone were damaged is recomputed without adding its examples to
the statistics again; a segment whose statistics file is damaged is dropped and its shards are computed again.

Ranks. Under ``torchrun`` (``WORLD_SIZE`` > 1; gloo carries the few control messages) rank 0 plans and sends the
shards to do to every rank, which deals them round-robin; every rank reads the input (only a shard's owner
tokenizes and computes it) and holds its own lock; rank 0 merges the manifest and the statistics after a barrier.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import pyarrow as pa
import torch

from .._checks import check_positive_int, parse_layers
from .._io import (atomic_write_json, atomic_write_table, atomic_write_text, make_folder, read_json, refuse_symlinks,
                   remove_inside, remove_stale_temporaries)
from .._ui import plural, progress_bar
from ..batching import token_batches
from ..capture import capture_examples
from ..context import ModelContext, load_model, with_context
from ..lens import analyze
from ..lists import LENS_MODULES
from ..records import check_held, check_window, selection_end
from ..stats import StatsAccumulator, module_shapes, sketch_sizes
from .records import Fields, Record, RecordSource, open_source
from .rows import records_table, report_columns, rows_table
from .shards import (FORMAT, SEGMENTS, SHARD_TABLES, STATS_TABLES, Digest, FolderLock, Plan, Segment, ShardCommitter,
                     holds_results, manifest_outputs, plan_shards, read_manifest, read_segments,
                     reset_faults, shard_count)

#: the default shard size gives at least this many shards (when each holds at least MIN_AUTO_SHARD_SIZE and at most
#: MAX_AUTO_SHARD_SIZE records)
AUTO_SHARDS = 32
#: a shard is a commit and a pair of Parquet files: tiny inputs get a few shards, not a file per record
MIN_AUTO_SHARD_SIZE = 8
MAX_AUTO_SHARD_SIZE = 256
STATS_STATE = "stats/state.safetensors"
REJECTED = "rejected.jsonl"


def auto_shard_size(records: int) -> int:
    """``clamp(ceil(records / 32), 8, 256)``: shards of at least 8 records (20 records make 3 shards, not 20
    one-record files), 32 shards from 256 records on (every rank of up to 32 gets work), and large inputs get shards
    of 256 records."""
    return min(MAX_AUTO_SHARD_SIZE, max(MIN_AUTO_SHARD_SIZE, math.ceil(records / AUTO_SHARDS)))


# -- what is asked ---------------------------------------------------------------------------------------------
#: keywords of :func:`project_dataset` that set :attr:`RunOptions.fields`
FIELD_KEYWORDS = {"prompt_field": "prompt", "target_field": "target", "id_field": "id"}


@dataclass(frozen=True)
class RunOptions:
    """Every setting of a bulk run besides its model, input and output folder, as one typed value checked when made
    (what needs the model is checked when the run starts). The keywords of :func:`project_dataset` build one."""

    layers: tuple[int, ...] | None = None
    modules: tuple[str, ...] = LENS_MODULES
    k: int = 10
    batch_size: int = 16
    max_tokens: int | None = None
    shard_size: int | str = "auto"
    fields: Fields = Fields()
    start: int = 0
    n: int | None = None
    skip_bad: bool = False
    unit_norm: bool = False
    impl: str = "auto"
    stats: bool = False
    stats_rank: int = 8
    stats_seed: int = 0

    def __post_init__(self):
        def set_(name, value):  # frozen: normalised once, here
            object.__setattr__(self, name, value)

        set_("layers", parse_layers(self.layers))
        modules = self.modules
        modules = tuple(m.strip() for m in modules.split(",")) if isinstance(modules, str) else tuple(modules)
        if not modules:
            raise ValueError("modules is empty: expected mlp.in, mlp.out or both")
        for name in modules:
            if name not in LENS_MODULES:
                raise ValueError(f"module {name!r} has no lens list: expected a subset of {', '.join(LENS_MODULES)}")
        set_("modules", modules)
        check_positive_int(self.k, "k")
        check_positive_int(self.batch_size, "batch_size")
        if self.max_tokens is not None:
            check_positive_int(self.max_tokens, "max_tokens")
        if self.shard_size != "auto":
            check_positive_int(self.shard_size, "shard_size (or 'auto')")
        if not isinstance(self.fields, Fields):
            raise TypeError(f"fields must be a blens_fast.bulk.records.Fields, got {type(self.fields).__name__}")
        check_window(self.start, self.n)
        for name in ("skip_bad", "unit_norm", "stats"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}: "
                                f"{getattr(self, name)!r}")

    @classmethod
    def of(cls, options: "RunOptions | None" = None, **keywords) -> "RunOptions":
        """``options`` (default: the defaults) with ``keywords`` replacing its fields; ``prompt_field``,
        ``target_field`` and ``id_field`` set ``fields``. An unknown keyword is a ``TypeError`` naming it."""
        names = {f.name for f in dataclasses.fields(cls)} | set(FIELD_KEYWORDS)
        unknown = sorted(set(keywords) - names)
        if unknown:
            raise TypeError(f"project_dataset() got an unexpected keyword argument {unknown[0]!r}: expected "
                            f"{', '.join(sorted(names))}, device, dtype, progress or log")
        base = cls() if options is None else options
        if not isinstance(base, cls):
            raise TypeError(f"options must be a RunOptions, got {type(base).__name__}")
        renamed = {FIELD_KEYWORDS[key]: keywords.pop(key) for key in list(keywords) if key in FIELD_KEYWORDS}
        if renamed:
            keywords["fields"] = dataclasses.replace(keywords.get("fields", base.fields), **renamed)
        return dataclasses.replace(base, **keywords) if keywords else base


# -- the run's identity ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatsSpec:
    """Gradient statistics settings of a run (:func:`blens_fast.gradient_stats`)."""

    rank: int
    sizes: tuple[int, int, int]
    seed: int
    modules: tuple[str, ...]


@dataclass(frozen=True)
class RunSpec:
    """Everything a run's results depend on: the input and the model's identities and every argument. Its
    :meth:`fingerprint` goes to ``run.json``; a run into a folder whose ``run.json`` differs is refused."""

    input: dict
    model: dict
    records: int
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    k: int
    batch_size: int
    max_tokens: int | None
    shard_size: int
    fields: Fields
    skip_bad: bool
    unit_norm: bool
    impl: str
    stats: StatsSpec | None

    @property
    def shard_count(self) -> int:
        return shard_count(self.records, self.shard_size)

    def shard_records(self, shard: int) -> int:
        return min(self.shard_size, self.records - shard * self.shard_size)

    def fingerprint(self) -> dict:
        """The spec as JSON values (what ``run.json`` holds)."""
        return json.loads(json.dumps({"format": FORMAT, **dataclasses.asdict(self)}))

    def check_same_run(self, out: Path) -> None:
        """A ``ValueError`` naming the differences when ``out/run.json`` holds another run."""
        old = read_json(out / "run.json", "run file")
        differences = _differences(old, self.fingerprint())
        if differences:
            raise ValueError(f"output folder {str(out)!r} holds a run with different arguments "
                             f"({'; '.join(differences[:4])}{'; ...' if len(differences) > 4 else ''}): "
                             "resume with the same arguments or choose another output folder")


def _differences(old, new, prefix: str = "") -> list[str]:
    """``'<setting> was <old>, now <new>'`` per differing entry of two run settings (nested dicts by dotted name)."""
    if not isinstance(old, dict) or not isinstance(new, dict):  # only the whole file (recursion is on dicts)
        return [] if old == new else [f"run was {old!r}, now {new!r}"]
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            found.append(f"{prefix}{key} was {a!r}, now {b!r}")
    return found


# Outside mutation testing's core (setup.cfg), which here is the resume decisions (what a restart finds, keeps and
# redoes: _prepare and what it calls; plan_shards and shard commits are in shards.py): the run's settings, torchrun
# plumbing, the lens batches, argument handling, and the orchestration after the plan (_compute, _finish).
# pragma: no mutate start
def build_spec(ctx: ModelContext, source: RecordSource, options: RunOptions) -> RunSpec:
    """Check ``options`` against the model and count the records of ``source`` (already narrowed to the options'
    selection; a ``BadRecord`` for the first bad one unless ``skip_bad``) into a :class:`RunSpec`."""
    check_positive_int(options.k, "k", upper=ctx.vocab_size)
    stats_spec = None
    if options.stats:
        stats_spec = StatsSpec(options.stats_rank, sketch_sizes(options.stats_rank), options.stats_seed,
                               ctx.check_modules(options.modules))
    records = 0
    for record in source.records(options.fields):
        if record.error is not None and not options.skip_bad:
            raise source.bad(record)
        records += 1
    if source.whole is not None and (records == 0 or records != (options.n or records)):
        check_held(f"input {source.label!r}", source.whole.count(selection_end(options.start, options.n)),
                   options.start, options.n)
    if records == 0:
        raise ValueError(f"input {source.label!r} holds no records")
    model = {"architecture": ctx.adapter.name, "weights": ctx.weights_fingerprint(),
             "dtype": str(ctx.dtype).removeprefix("torch.")}
    shard_size = auto_shard_size(records) if options.shard_size == "auto" else options.shard_size
    return RunSpec(source.identity, model, records, ctx.check_layers(options.layers), options.modules, options.k,
                   options.batch_size, options.max_tokens, shard_size, options.fields, options.skip_bad,
                   options.unit_norm, options.impl, stats_spec)


# -- ranks ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one). Collectives are no-ops without an
    initialized process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @staticmethod
    def _group() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        if self.world > 1 and self._group():
            torch.distributed.barrier()

    def from_rank0(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.world > 1 and self._group():
            box = [value]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]
        return value

    def device(self, device):
        """``device`` for this rank: a bare ``"cuda"`` means the rank's own GPU under ``torchrun``."""
        if self.world > 1 and device is not None and str(device) == "cuda":
            return f"cuda:{self.local_rank}"
        return device


@contextmanager
def process_group():
    """The :class:`Ranks` of this process, with a gloo process group under ``torchrun`` (destroyed on exit when
    made here)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Ranks()
        return
    import torch.distributed as dist

    made_here = not dist.is_initialized()
    if made_here:
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=12))
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        if made_here and dist.is_initialized():
            dist.destroy_process_group()

# pragma: no mutate end


@dataclass(frozen=True)
class Work:
    """What rank 0 sends every rank: the session, the shards to do, or that the run is complete, or an error."""

    session: str = ""
    todo: tuple[tuple[int, bool], ...] = ()
    complete: bool = False
    error: str | None = None


# -- computing shards ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardResult:
    tables: dict
    ids: tuple[str, ...]
    rejected: tuple[dict, ...]
    tokens: int


# pragma: no mutate start
def batches_by_length(items: list, batch_size: int, max_tokens: int | None) -> list[list]:
    """``(record, example)`` pairs sorted by token count (stable) and cut into batches of at most ``batch_size``
    pairs and ``max_tokens`` padded tokens."""
    lengths = [example.num_tokens for _, example in items]
    return [[items[i] for i in batch] for batch in token_batches(lengths, batch_size, max_tokens, by_length=True)]


class ShardWorker:
    """Computes shards: tokenize, batch by length, capture, lens, rows (and statistics when given an accumulator)."""

    def __init__(self, ctx: ModelContext, spec: RunSpec, source: RecordSource):
        self.ctx, self.spec, self.source = ctx, spec, source
        self.capture_modules = ctx.check_modules(LENS_MODULES)
        self.vocabulary = pa.array(ctx.vocabulary, pa.string())

    def tokenize(self, records: list[Record]) -> tuple[list, list[dict]]:
        """``(record, example)`` pairs of the usable records and the rejections of the others (a ``BadRecord``
        for the first bad one unless ``skip_bad``)."""
        good, rejected = [], []
        for record in records:
            reason = record.error
            if reason is None:
                try:
                    good.append((record, self.ctx.tokenize([record.prompt], [record.target])[0]))
                    continue
                except ValueError as error:
                    reason = (str(error).replace("example 0 is", "the record is").replace("prompts[0]", "prompt")
                              .replace("targets[0]", "target"))
            if not self.spec.skip_bad:
                raise self.source.bad(record, reason)
            rejected.append(record.rejection(reason))
        return good, rejected

    def lens_batch(self, batch: list, accumulator: StatsAccumulator | None = None) -> dict:
        """One batch's rows and record rows, ``{record index: (id, columns, record row)}``."""
        spec = self.spec
        examples = [example for _, example in batch]
        cap = capture_examples(self.ctx, examples, spec.layers, self.capture_modules)
        reports = analyze(self.ctx, cap, k=spec.k, unit_norm=spec.unit_norm, impl=spec.impl)
        if accumulator is not None:
            accumulator.update(cap, [record.id for record, _ in batch])
        out = {}
        for (record, example), report, loss in zip(batch, reports, cap.losses.tolist()):
            columns = report_columns(example, report, spec.modules)
            out[record.index] = (record.id, columns, dict(
                id=record.id, line=record.line, prompt=record.prompt, target=record.target,
                target_token_id=example.rank_token, tokens=example.num_tokens, loss=float(loss)))
        return out

    def shard(self, records: list[Record], accumulator: StatsAccumulator | None = None, bar=None) -> ShardResult:
        good, rejected = self.tokenize(records)
        parts: dict = {}
        for batch in batches_by_length(good, self.spec.batch_size, self.spec.max_tokens):
            parts.update(self.lens_batch(batch, accumulator))
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.update(len(rejected))
        order = [parts[i] for i in sorted(parts)]
        tables = {"rows": rows_table([(rid, columns) for rid, columns, _ in order], self.vocabulary),
                  "records": records_table([row for _, _, row in order])}
        return ShardResult(tables, tuple(rid for rid, _, _ in order), tuple(rejected),
                           sum(example.num_tokens for _, example in good))


# -- the run -------------------------------------------------------------------------------------------------
def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def project_dataset(model, *args, options: RunOptions | None = None, device=None, dtype=None, progress: bool = True,
                    log=None, **keywords) -> Path:
    """Run the Backward Lens over every record of ``input`` into the folder ``out``; return ``out`` as a Path.

    Called as ``project_dataset(ctx, input, out, ...)``, ``project_dataset(model, tokenizer, input, out, ...)`` or
    ``project_dataset("default" or FOLDER, input, out, device=None, dtype=None, ...)`` (the model is loaded with
    :func:`blens_fast.load_model`; under ``torchrun`` a bare ``device="cuda"`` means each rank's own GPU).

    ``input``: a JSON Lines file, a JSON file holding a list, a Parquet file, ``"counterfact"`` (the shipped
    CounterFact edit file as :func:`blens_fast.counterfact.load` gives it) or a list of records (mappings, or
    ``(prompt, target)`` pairs). Fields: ``prompt_field``, ``target_field``, ``id_field`` (ids default to the
    record's line or number and must be unique). ``start`` and ``n``: the records at positions ``start .. start +
    n - 1`` (0-based, bad ones included; default: all), as ``--start``/``--n`` select them on the command line.

    Settings, as keywords or as one :class:`RunOptions` (``options=``; keywords replace its fields): ``layers``
    (default all; ``[0, 2]`` or ``"0-3"``), ``modules`` (``"mlp.in"``: FF1's forward input, top tokens;
    ``"mlp.out"``: FF2's VJP, bottom and top tokens; default both), ``k=10``, ``batch_size=16``, ``max_tokens``
    (padded tokens per batch), ``shard_size="auto"`` (``clamp(ceil(records / 32), 8, 256)``), ``unit_norm``,
    ``impl``, ``skip_bad`` (bad records go to ``rejected.jsonl`` with their line and reason instead of stopping the
    run), ``stats`` (also :func:`blens_fast.gradient_stats` of rank ``stats_rank`` with seed ``stats_seed`` into
    ``out/stats``). ``progress``: a bar and the summary on stderr (``False``: nothing is printed); ``log``: a function
    taking each message (default: print to stderr when ``progress``).

    Output: ``out/rows`` and ``out/records`` are Parquet datasets (one ``part-NNNNNN.parquet`` per shard), readable
    as they are by pandas, pyarrow.dataset and Hugging Face ``datasets``; the rows hold, per record, list, layer,
    position and rank: the token with its logit and probability, the target's rank in that list, whether the vector
    is ``degenerate`` (zero or all-tied), and the gradient's norm and rank. Started again with the same arguments,
    a run resumes and ends with every record exactly once; files found damaged (size or sha256 not as committed)
    are recomputed; other arguments into the same folder are refused. Each process holds an exclusive lock on the
    folder: a second run into it fails with a ``ValueError`` naming the holder.
    """
    reset_faults()
    options = RunOptions.of(options, **keywords)
    if log is None:
        log = log_to_stderr if progress else _silent
    with process_group() as ranks:
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model, device=ranks.device(device), dtype=dtype)
        elif device is not None or dtype is not None:
            raise ValueError("device= and dtype= apply to a model given by name or folder: move or cast a loaded "
                             "model before passing it")
        return _project_dataset(model, *args, options=options, ranks=ranks, progress=progress, log=log)


@with_context
def _project_dataset(ctx: ModelContext, input, out, *, options: RunOptions, ranks: Ranks, progress: bool,
                     log) -> Path:
    ctx.require_tokenizer()
    source = open_source(input, options.fields).select(options.start, options.n)
    spec = build_spec(ctx, source, options)
    return execute(ctx, spec, source, Path(out), ranks, progress=progress, log=log)


def _silent(message: str) -> None:
    """The log of a run with ``progress=False``: nothing is printed."""


def execute(ctx: ModelContext, spec: RunSpec, source: RecordSource, out: Path, ranks: Ranks = Ranks(), *,
            progress: bool = True, log=log_to_stderr) -> Path:
    """Run ``spec`` into ``out`` as one rank of ``ranks``: lock, plan (rank 0), compute this rank's shards,
    finish (rank 0). A folder holding symbolic links is refused before anything is read or written."""
    make_folder(out)
    refuse_symlinks(out)
    with FolderLock(out, ranks.rank):
        plan = None
        if ranks.rank == 0:
            try:
                plan, work = _prepare(out, spec, log)
            except ValueError as error:
                ranks.from_rank0(Work(error=str(error)))
                raise
        else:
            work = None
        work = ranks.from_rank0(work)
        if work.error:
            raise ValueError(work.error)
        if ranks.rank != 0:
            spec.check_same_run(out)
        if work.complete:
            return out
        started = time.perf_counter()
        counters = _compute(ctx, spec, source, out, ranks, work, progress)
        elapsed = time.perf_counter() - started
        ranks.barrier()
        if ranks.rank == 0:
            _finish(out, spec, plan, work.session, log, counters, elapsed, ranks.world)
        ranks.barrier()
    return out


# pragma: no mutate end
def _prepare(out: Path, spec: RunSpec, log) -> tuple[Plan, Work]:
    """Rank 0 before any work: clear a killed run's temporaries, check or write ``run.json``, plan."""
    remove_stale_temporaries(out)
    if (out / "run.json").exists():
        spec.check_same_run(out)
    elif any(holds_results(p) for p in out.iterdir()):
        raise ValueError(f"output folder {str(out)!r} is not empty and holds no blens project-dataset run (no "
                         "run.json): choose an empty or new folder")
    else:
        atomic_write_json(out / "run.json", spec.fingerprint(), sort_keys=True)
    for folder in (out / name for name in (*SHARD_TABLES, SEGMENTS, "stats")):
        remove_stale_temporaries(make_folder(folder, "the run's folder"))
    manifest = read_manifest(out)
    plan = plan_shards(out, read_segments(out, log), spec.shard_count, spec.stats is not None)
    for note in plan.notes:
        log(f"blens project-dataset: {note}")
    if manifest is not None:
        damaged = _output_problems(out, manifest)
        if not plan.todo and not damaged:
            log(f"blens project-dataset: {out} is already complete ({_summary_line(manifest)})")
            return plan, Work(complete=True)
        for note in damaged:
            log(f"blens project-dataset: {note}: writing it again")
        remove_inside(out, out / "manifest.json")
    for segment in plan.void:
        remove_inside(out, out / SEGMENTS / segment.name)
    _remove_unused_states(out)
    if plan.done:
        log(f"blens project-dataset: resuming: {len(plan.done)} of {spec.shard_count} shards done, "
            f"{len(plan.todo)} to compute")
    session = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
    return plan, Work(session, plan.todo)


def _remove_unused_states(out: Path) -> None:
    """Delete statistics states no live segment names: those of void segments and those a kill left between a
    state's write and its commit, or between a commit and the removal of the state it replaced."""
    live = {s.stats_file for s in read_segments(out)}
    for path in (out / SEGMENTS).glob("stats-*.safetensors"):
        if path.name not in live:
            remove_inside(out, path)


def _output_problems(out: Path, manifest: dict) -> list[str]:
    problems = []
    for name, digest in manifest_outputs(manifest, out).items():
        why = digest.problem(out / name)
        if why:
            problems.append(f"{str(out / name)!r} {why}")
    return problems


# pragma: no mutate start
def _compute(ctx, spec: RunSpec, source: RecordSource, out: Path, ranks: Ranks, work: Work, progress: bool) -> dict:
    """This rank's shards of ``work.todo`` (dealt round-robin), each committed as soon as it is computed."""
    mine = {shard: with_stats for i, (shard, with_stats) in enumerate(work.todo) if i % ranks.world == ranks.rank}
    accumulator = None
    if spec.stats is not None and any(mine.values()):
        shapes = module_shapes(ctx, spec.layers, spec.stats.modules)
        k, l, m = spec.stats.sizes
        accumulator = StatsAccumulator(shapes, rank=spec.stats.rank, sketch_size=k, cosketch_size=l,
                                       residual_size=m, seed=spec.stats.seed, device=ctx.device)
    worker = ShardWorker(ctx, spec, source)
    committer = ShardCommitter(out, work.session, ranks.rank, accumulator)
    counters = {"records": 0, "tokens": 0, "shards": 0}
    desc = "project-dataset" + (f" (rank 0 of {ranks.world})" if ranks.world > 1 else "")
    with progress_bar(desc=desc, unit="rec", total=sum(spec.shard_records(s) for s in mine),
                      enabled=progress and ranks.rank == 0) as bar:
        for shard, records in groupby(source.records(spec.fields), key=lambda r: r.index // spec.shard_size):
            if shard not in mine:
                continue
            with_stats = mine[shard]
            result = worker.shard(list(records), accumulator if with_stats else None, bar)
            committer.commit(shard, result.tables, result.ids, result.rejected, stats=with_stats)
            counters["records"] += len(result.ids)
            counters["tokens"] += result.tokens
            counters["shards"] += 1
    return counters


def _finish(out: Path, spec: RunSpec, plan: Plan, session: str, log, counters: dict, elapsed: float,
            world: int) -> None:
    """Rank 0 once every rank is done: check every shard is committed once, merge the statistics, write the
    rejected records, the manifest and the summary."""
    segments = read_segments(out)  # a damaged segment was reported when the run started
    entries = dict(plan.done)
    for segment in segments:
        if segment.session == session:
            entries.update({e.shard: e for e in segment.shards})
    missing = [j for j in range(spec.shard_count) if j not in entries]
    if missing:
        raise RuntimeError(f"shards {missing[:10]} are not done after every rank finished: run the command again")
    shards = [entries[j] for j in range(spec.shard_count)]
    ids = [rid for entry in shards for rid in entry.ids]
    if len(set(ids)) != len(ids):
        raise RuntimeError("a record id appears in two shards: the segments are inconsistent")
    outputs = {}
    rejected = [r for entry in shards for r in entry.rejected]
    if rejected:
        text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rejected)
        outputs[REJECTED] = atomic_write_text(out / REJECTED, text)
    if spec.stats is not None:
        outputs.update(_merge_stats(out, segments, ids))
    manifest = {"complete": True, "format": FORMAT, "run": spec.fingerprint(),
                "shards": [entry.to_json() for entry in shards], "records": len(ids), "rejected": len(rejected),
                "rows": sum(entry.rows for entry in shards), "segments": [s.name for s in segments],
                "outputs": {name: Digest.of(path).to_json() for name, path in outputs.items()}}
    atomic_write_json(out / "manifest.json", manifest)
    summary = {"this_session": {"records": counters["records"], "tokens": counters["tokens"],
                                "shards": counters["shards"], "seconds": elapsed, "processes": world,
                                "records_per_s_rank0": counters["records"] / elapsed if elapsed > 0 else 0.0},
               "total": {"records": len(ids), "rejected": len(rejected), "rows": manifest["rows"],
                         "shards": spec.shard_count}}
    atomic_write_json(out / "summary.json", summary)
    log(f"blens project-dataset: {_summary_line(manifest)} -> {out}; this run: {counters['records']} records on "
        f"rank 0 in {elapsed:.1f}s ({world} process{'es' if world > 1 else ''})")


def _merge_stats(out: Path, segments: list[Segment], ids: list[str]) -> dict[str, Path]:
    """Merge every segment's statistics (safetensors states) and write the tables and the merged state."""
    merged = None
    for segment in segments:
        if segment.stats_file is None:
            continue
        part = StatsAccumulator.load(out / SEGMENTS / segment.stats_file, impl="torch")
        if merged is None:
            merged = part
        else:
            merged.merge(part)
    if merged is None:  # every record was rejected
        return {}
    result = merged.finalize(order=ids)
    written = {}
    for name, table in STATS_TABLES.items():
        frame = result.to_pandas(table)
        if table == "norms":
            frame["id"] = frame["id"].astype(str)
        written[name] = atomic_write_table(out / name, pa.Table.from_pandas(frame, preserve_index=False))
    written[STATS_STATE] = merged.save(out / STATS_STATE)
    return written


def _summary_line(manifest: dict) -> str:
    return (f"{plural(manifest['records'], 'record')} ({manifest['rejected']} rejected), {manifest['rows']} rows in "
            f"{plural(len(manifest['shards']), 'shard')}")
# pragma: no mutate end
