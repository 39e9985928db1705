"""The lens while training: what each optimizer step writes into the model, read through the model's own lens.

:class:`TrainingLens` watches a training loop (any PyTorch loop through :func:`training_lens`, the ``transformers``
``Trainer`` through :class:`blens_fast.integrations.BackwardLensCallback`) with hooks on the training's **own** forward
and backward: no extra forward or backward pass of the batch, and the training is numerically unchanged (its loss
curve and final weights are bit-identical with and without the lens; tested). Steps are counted from 1 like the
Trainer's ``global_step``; a step is *sampled* when ``step % every == 0``, and only sampled steps have hooks.

On a sampled step, for every watched (layer, module):

* **The step's gradient from its factors.** A forward hook keeps the module's input ``X`` and hooks its output's
  gradient; when the backward computes ``Delta`` the rows' ``X^T Delta`` enter the module's streaming sketch
  (:mod:`blens_fast.stats`, its fused update op), so no ``d_in x d_out`` matrix is formed. Micro-batches of gradient
  accumulation add up into one step; rows whose ``Delta`` is zero (padding, positions before any label that is not
  -100) add nothing and are not counted in ``tokens``. Under gradient checkpointing each micro-batch is counted once:
  only a forward output that receives a gradient is read (a reentrant checkpoint's recomputation, a non-reentrant
  checkpoint's first pass). Under ``torchrun`` DDP each rank sketches its own
  tokens and the sketches are summed over the ranks at the step (one ``all_reduce``); rank 0 reads and writes.
* **Matched to what the optimizer reads.** At the optimizer's step (a global optimizer pre-hook) the sketch is
  compared with the weight's ``.grad`` on the sketch's residual probes: ``scale`` is the one number between the two
  (gradient clipping, a GradScaler's loss scale, DDP's average over ranks; 1 in plain float32 training) and
  ``consistency`` their relative mismatch beyond it (about 1e-7 in float32, 1e-3 with bfloat16 gradients). A
  mismatch above 1e-2 means the hooks did not see the whole gradient (a micro-batch outside the lens, a gradient
  changed entry by entry): it is warned about and kept in the ``steps`` table.
* **Norm and spectrum.** ``norm`` is the exact ``||grad||_F`` (read from ``.grad`` in row blocks). The top-``rank``
  singular values and directions come from the sketch of the step's factors: its range (``2 rank + 1`` columns) is
  refined by one power iteration on the ``.grad`` the optimizer reads (``refine=True``, the default: ``.grad`` is read
  twice more in row blocks, never copied), and the step's gradient projected on that subspace gives them, with the
  exact ``error_bar = ||G - P G||_F`` (it bounds every singular value's error, Weyl); ``refine=False`` keeps the
  sketch's own single-pass reading and its expected error. Either way the values and vectors are the dense SVD's (to
  rounding) when the step's gradient has rank ``<= 2 rank + 1``. Each direction's ``angle_bound`` =
  ``min(1, error_bar / gap)`` (the gap to its neighbouring singular values) is Wedin's bound on the sine of its angle
  to the dense gradient's direction: near 1, the reading does not pin that direction down and its lists are not the
  dense direction's. ``stable_rank = norm^2 / sigma_1^2`` is the effective rank. The change's norm is estimated from
  the sketch's Gaussian samples, with its standard error as ``norm_error``.
* **The update's lens.** Each singular direction ``(u_j, v_j)`` is oriented so that the step's mean input ``x`` has
  ``x . u_j >= 0`` (the direction as the step's own tokens fire it) and read through the model's current lens (as
  it is after the step: the lens the next forward uses) with the package's fused projection, as
  :mod:`blens_fast.lens` reads factors: FF1's input side ``u_j`` as ``ff1_top``,
  FF2's output side ``v_j`` as ``ff2_bottom`` and ``ff2_top``. The sign follows the descent direction: a gradient step
  (for SGD the update is ``-lr * grad``) adds ``-lr s_j (x . u_j) v_j`` to FF2's output, so ``ff2_bottom`` lists the
  tokens the step **promotes** and ``ff2_top`` those it **demotes**, exactly as the Backward Lens's lists of one
  prompt. ``score = singular_value * logit`` (with the logit's sign flipped for bottom lists: larger = written more
  strongly).
* **Tracked prompts** (``track=[(prompt, target), ...]``): before a sampled step one no-grad eval forward of those
  few prompts (not of the batch) gives FF2's input ``x_t`` at each prompt's last position and ``P(target)``; during the
  backward ``x_t G`` is accumulated exactly from the factors (what the step writes at that position) and read as
  ``ff2_bottom``, with the target's rank in it (its first token; 1 = the most promoted token).
* **The actual parameter change** (``change="auto"``: every optimizer but plain SGD, whose change is ``-lr * grad``
  exactly): an adaptive optimizer's change leaves the factors' span (Adam rescales each entry: 53-82% of an AdamW
  step of the shipped model lies in the span of its inputs, ``benchmarks/bench_training_lens.py accuracy``), so it is
  read from a **sketch of the difference**: the weight's sketch before the step is subtracted from its sketch after
  it (the same test matrices; linear, so it is the sketch of ``W_after - W_before``, read in row blocks, never
  copied). Its lists read ``-(W_after - W_before)`` so that the names mean the same for both sources (``ff2_bottom``
  = promoted); ``source`` says which. Adam's change is nearly full rank with a flat spectrum: its norm and singular
  values are read well, its directions rarely (their angle bounds say so).

Results: :meth:`TrainingLens.to_pandas` (``rows``, ``steps``, ``spectrum``, ``tracked``), Parquet datasets under
``out`` (``rows/`` etc., one fixed schema per table: readable as they are by ``pandas.read_parquet`` and
``pyarrow.dataset``), :attr:`TrainingLens.scalars` (the
last sampled step's summaries, which the Trainer callback puts into ``logs``), and a PNG + HTML timeline per module
(:mod:`blens_fast.training_report`).
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ._checks import check_choice, check_positive_int
from ._io import atomic_write_json, atomic_write_table, make_folder, read_json, refuse_symlinks, remove_inside
from .adapters import MODULE_NAMES
from .bulk.shards import shard_file
from .context import ModelContext, bind
from .forward import forward_hidden
from .lists import LIST_NAMES, LISTS
from .ops.topk import TOPK
from .project import project_lists
from .stats import BLOCK_ROWS, StatsAccumulator, block_rows, sketch_sizes, skinny_product

__all__ = ["SCHEMAS", "TABLES", "TrainingLens", "TrainingLensSettings", "read_training_lens", "training_lens"]

FORMAT = "blens_fast.training_lens/1"
SOURCES = ("gradient", "change")
CHANGE_MODES = ("auto", "always", "never")
#: relative mismatch between the hooks' factor sum and ``.grad`` above which a step is warned about
CONSISTENCY_WARNING = 1e-2
#: the share of ||G||^2 outside the refined subspace above which the error bar is a difference of squares
DIFFERENCE_OF_SQUARES = 1e-2

_CATEGORY = pa.dictionary(pa.int32(), pa.string())
_KEY = [("step", pa.int64()), ("layer", pa.int16()), ("module", _CATEGORY), ("source", _CATEGORY)]
SCHEMAS = {
    "rows": pa.schema(_KEY + [
        ("direction", pa.int16()), ("singular_value", pa.float64()), ("error_bar", pa.float64()),
        ("angle_bound", pa.float64()), ("list", _CATEGORY),
        ("rank", pa.int16()), ("token_id", pa.int32()), ("token", pa.string()), ("logit", pa.float32()),
        ("score", pa.float64())]),
    "steps": pa.schema(_KEY + [
        ("tokens", pa.int64()), ("lr", pa.float64()), ("norm", pa.float64()), ("norm_error", pa.float64()),
        ("top_singular_value", pa.float64()), ("error_bar", pa.float64()), ("stable_rank", pa.float64()),
        ("energy_share", pa.float64()), ("scale", pa.float64()), ("consistency", pa.float64())]),
    "spectrum": pa.schema(_KEY + [("index", pa.int16()), ("singular_value", pa.float64()),
                                  ("error_bar", pa.float64()), ("angle_bound", pa.float64())]),
    "tracked": pa.schema([
        ("step", pa.int64()), ("track", pa.int16()), ("prompt", pa.string()), ("target", pa.string()),
        ("target_token", pa.string()), ("layer", pa.int16()), ("target_prob", pa.float64()),
        ("target_rank", pa.int32()), ("rank", pa.int16()), ("token_id", pa.int32()), ("token", pa.string()),
        ("logit", pa.float32())]),
}
TABLES = tuple(SCHEMAS)
#: the lenses started and not closed (their hooks are live)
_STARTED: "weakref.WeakSet[TrainingLens]" = weakref.WeakSet()
_DICTIONARIES = {"module": MODULE_NAMES, "source": SOURCES, "list": LIST_NAMES}


@dataclass(frozen=True)
class TrainingLensSettings:
    """What a :class:`TrainingLens` watches and how (written to ``run.json``)."""

    architecture: str
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    every: int
    k: int
    rank: int
    sketch: tuple[int, int, int]
    seed: int
    change: str
    track: tuple[tuple[str, str], ...]
    flush_every: int
    refine: bool


def training_lens(model, tokenizer=None, **options) -> "TrainingLens":
    """A :class:`TrainingLens` to use as a context manager around any PyTorch training loop::

        with bl.training_lens(model, tokenizer, modules=("mlp.in", "mlp.out"), every=10, k=10, out="out/tlens") as tl:
            for batch in loader:
                model(**batch).loss.backward(); opt.step(); opt.zero_grad()
        tl.to_pandas("rows")

    ``model`` may be a ``DistributedDataParallel`` wrapper or a :class:`~blens_fast.context.ModelContext`; options as
    :class:`TrainingLens`."""
    return TrainingLens(model, tokenizer, **options)


def _unwrap(model):
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _distributed() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _blocks(n: int):
    return range(0, n, BLOCK_ROWS)


def _frobenius(matrix: torch.Tensor) -> float:
    """``||matrix||_F``, read in blocks of at most an eighth of its rows (a 16-bit matrix is never copied whole)."""
    if matrix.dtype == torch.float32:
        return float(torch.linalg.vector_norm(matrix))
    rows = block_rows(matrix.shape[0])
    return math.sqrt(sum(float(torch.linalg.vector_norm(matrix[s:s + rows], dtype=torch.float32)) ** 2
                         for s in range(0, matrix.shape[0], rows)))


def _plain_sgd(optimizer) -> bool:
    """A ``torch.optim.SGD`` without momentum or weight decay: its change is ``-lr * grad`` exactly."""
    return type(optimizer) is torch.optim.SGD and all(
        not group.get("momentum") and not group.get("weight_decay") for group in optimizer.param_groups)


class _StepFactors:
    """What the hooks gathered during one step, per (layer, module): the sketch lives in the accumulator; here the
    sum of the live input rows (for the orientation), their count, and the tracked prompts' ``x_t G``."""

    def __init__(self, lens: "TrainingLens"):
        device = lens.ctx.device
        shapes = {key: tuple(lens._weight_io(key).shape) for key in lens.keys}
        self.x_sum = {key: torch.zeros(shapes[key][0], dtype=torch.float32, device=device) for key in lens.keys}
        self.tokens = {key: torch.zeros((), dtype=torch.int64, device=device) for key in lens.keys}
        self.tracked = {key: torch.zeros(len(lens.settings.track), shapes[key][1], dtype=torch.float32, device=device)
                        for key in lens.tracked_keys}
        self.seen: set = set()

    def tensors(self) -> list[torch.Tensor]:
        return [*self.x_sum.values(), *self.tracked.values()]


class TrainingLens:
    """Hooks on a training loop's own forward, backward and optimizer steps that read what each sampled step writes.

    Arguments: ``model`` (a causal LM of a supported architecture, a ``DistributedDataParallel`` wrapper of one, or a
    :class:`~blens_fast.context.ModelContext`) and its ``tokenizer``; ``modules`` (public names, default FF1 and FF2)
    at ``layers`` (default all); ``every`` (sample steps ``step % every == 0``); ``k`` tokens per list; ``rank``
    singular directions per module (the sketch keeps ``2 rank + 1``, see :func:`blens_fast.stats.sketch_sizes`;
    ``sketch_size`` overrides it); ``track`` (``(prompt, target)`` pairs, needs ``mlp.out``); ``change``
    (``"auto"``: the lens of the actual parameter change for every optimizer but plain SGD; ``"always"``,
    ``"never"``); ``out`` (a folder for the Parquet tables, ``run.json`` and the timelines; None keeps the results
    in memory); ``flush_every`` (sampled steps per Parquet part); ``refine`` (one power iteration on the optimizer's
    ``.grad`` from the sketch's range, module docstring); ``start_step`` (steps already done, e.g. a resumed
    Trainer's ``global_step``); ``seed`` (the sketch's test matrices); ``impl`` (the projection's implementation, as in
    :func:`~blens_fast.ops.topk.topk_logits`).

    Use as a context manager (:func:`training_lens`) or call :meth:`start` and :meth:`close`. See the module docstring
    for what is read and how.
    """

    def __init__(self, model, tokenizer=None, *, modules=("mlp.in", "mlp.out"), layers=None, every: int = 10,
                 k: int = 10, rank: int = 4, track: Sequence = (), change: str = "auto", out=None,
                 flush_every: int = 10, refine: bool = True, start_step: int = 0, sketch_size: int | None = None,
                 seed: int = 0, impl: str = "auto", adapter=None):
        self.ctx: ModelContext = bind(_unwrap(model) if not isinstance(model, ModelContext) else model, tokenizer,
                                      adapter=adapter)
        self.ctx.require_tokenizer()
        check_positive_int(every, "every")
        check_positive_int(k, "k", upper=self.ctx.vocab_size)
        check_positive_int(flush_every, "flush_every")
        check_choice(change, "change", CHANGE_MODES)
        if not isinstance(refine, bool):
            raise TypeError(f"refine must be a bool, got {type(refine).__name__}: {refine!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step={start_step!r}: expected an int >= 0")
        layer_ids = self.ctx.check_layers(layers)
        names = self.ctx.resolve_modules(modules)
        self.keys = [(layer, name) for layer in layer_ids for name in names]
        track = self._check_track(track, names)
        sizes = sketch_sizes(rank, sketch_size)
        self.settings = TrainingLensSettings(self.ctx.adapter.name, layer_ids, names, every, k, rank, sizes, seed,
                                             change, track, flush_every, refine)
        self.tracked_keys = [key for key in self.keys if key[1] == "mlp.out"] if track else []
        self._track_examples = self.ctx.tokenize([p for p, _ in track], [t for _, t in track]) if track else []
        # the watched parameters, looked up once (the lens reads and hooks these objects for its whole life)
        self._params = {key: self.ctx.weight(*key) for key in self.keys}
        for key in self.keys:
            if not self._params[key].requires_grad:
                raise ValueError(f"the weight of {key[1]} at layer {key[0]} does not require grad: the lens reads what "
                                 "the optimizer writes into trained weights (leave frozen modules out of modules=)")
        shapes = {key: tuple(self._weight_io(key).shape) for key in self.keys}
        # one singular value more than is read: the gap below the last direction read
        self._acc = StatsAccumulator(shapes, rank=min(rank + 1, sizes[0]), sketch_size=sizes[0], cosketch_size=sizes[1],
                                     residual_size=sizes[2], seed=seed, device=self.ctx.device)
        TOPK.resolve(impl, self.ctx.device)  # a ValueError naming an unknown or unavailable implementation now
        self.impl = impl
        self._weights = {id(param) for param in self._params.values()}
        self.rank_in_group, self.world_size = _distributed()
        self.writes = self.rank_in_group == 0
        self.out = Path(out) if out is not None else None
        self.step = start_step
        self.scalars: dict[str, float] = {}
        self._fresh_scalars = False
        self._handles: list = []
        self._optimizer_hooks: list = []
        self._paused = False
        self._depth = 0
        self._factors: _StepFactors | None = None
        self._pending: dict | None = None
        self._track_x: dict = {}
        self._track_prob: torch.Tensor | None = None
        self._buffers: dict[str, list[pa.Table]] = {name: [] for name in TABLES}
        self._memory: dict[str, list[pa.Table]] = {name: [] for name in TABLES}
        self._buffered_steps: list[int] = []
        self._warned: set = set()

    # -- arguments ---------------------------------------------------------------------------------------------
    @staticmethod
    def _check_track(track, modules) -> tuple[tuple[str, str], ...]:
        if isinstance(track, (str, bytes)) or not isinstance(track, Sequence):
            raise TypeError(f"track must be a list of (prompt, target) pairs, got {type(track).__name__}")
        pairs = []
        for i, pair in enumerate(track):
            if not (isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2
                    and all(isinstance(s, str) and s.strip() for s in pair)):
                raise ValueError(f"track[{i}] = {pair!r}: expected a (prompt, target) pair of non-empty strings")
            pairs.append((pair[0], pair[1]))
        if pairs and "mlp.out" not in modules:
            raise ValueError(f"track= reads FF2's lists: add 'mlp.out' to modules (got {list(modules)})")
        return tuple(pairs)

    # -- life cycle --------------------------------------------------------------------------------------------
    def __enter__(self) -> "TrainingLens":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close(report=exc[0] is None)

    def start(self) -> "TrainingLens":
        """Install the optimizer hooks (and the module hooks when the next step is sampled); write ``run.json``, or
        check it against these settings and drop the rows of steps after ``start_step`` (they are taken again)."""
        if self._optimizer_hooks:
            raise RuntimeError("this TrainingLens is already started")
        for other in _STARTED:
            if other._weights & self._weights:
                # two lenses on one weight would both hook each step (a run interrupted without close(), then
                # started again): each would read the other's steps and write its own rows of them
                raise RuntimeError(f"another TrainingLens (out={other.out}) is still started on these weights: "
                                   "close it first (lens.close(); a with-block or the Trainer callback does it)")
        if self.out is not None and self.writes:
            self._prepare_out()
        self._optimizer_hooks = [register_optimizer_step_pre_hook(self._pre_step),
                                 register_optimizer_step_post_hook(self._post_step)]
        _STARTED.add(self)
        self._arm_for_next_step()
        return self

    def close(self, *, report: bool = True) -> None:
        """Remove every hook, write what is buffered and (``report``) the timelines into ``out``."""
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks = []
        _STARTED.discard(self)
        self._disarm()
        self._flush()
        if report and self.out is not None and self.writes and self._has_rows():
            from .training_report import write_timelines  # the drawing sits above this module

            write_timelines(self.out)

    def set_step(self, step: int) -> None:
        """Set the count of steps done (a Trainer's ``global_step``, which also counts steps a GradScaler skipped) and
        arm the hooks for the next one accordingly."""
        if step != self.step:
            self.step = step
            self._arm_for_next_step()

    @property
    def next_step_sampled(self) -> bool:
        """Whether the next optimizer step is one the lens reads (``(step + 1) % every == 0``)."""
        return (self.step + 1) % self.settings.every == 0

    def _prepare_out(self) -> None:
        make_folder(self.out, "training lens folder")
        refuse_symlinks(self.out, "training lens folder")
        described = {"format": FORMAT, **asdict(self.settings)}
        described = {key: (list(value) if isinstance(value, tuple) else value) for key, value in described.items()}
        described["track"] = [list(pair) for pair in self.settings.track]
        described["sketch"] = list(self.settings.sketch)
        found = self.out / "run.json"
        if found.exists():
            old = read_json(found, "training lens run file", follow=False)
            if old != described:
                raise ValueError(f"{str(self.out)!r} holds a training lens run with other settings ({str(found)!r}): "
                                 "use another out folder or the same settings")
            self._drop_steps_after_start()
        else:
            atomic_write_json(found, described)

    def _weight_io(self, key) -> torch.Tensor:
        """The watched weight as a ``(d_in, d_out)`` view (:meth:`ModelContext.weight_io` of the parameter looked up
        once)."""
        return self.ctx.adapter.as_io(self._params[key])

    def _grad_io(self, key) -> torch.Tensor | None:
        """Its ``.grad`` as a ``(d_in, d_out)`` view, or None."""
        grad = self._params[key].grad
        return None if grad is None else self.ctx.adapter.as_io(grad)

    def _drop_steps_after_start(self) -> None:
        """Rows of steps after :attr:`step` (a run resumed from an earlier checkpoint, or started again from 0) are
        taken again by this run: drop them now, so that the folder never mixes the old and the new (parts are named by
        their first step, and new parts would replace some old ones and not others)."""
        dropped = set()
        for table in TABLES:
            for part in sorted((self.out / table).glob("part-*.parquet")):
                steps = pq.read_table(part, columns=["step"], schema=SCHEMAS[table]).column("step")
                if len(steps) == 0 or pc.max(steps).as_py() <= self.step:
                    continue
                dropped.update(s for s in steps.to_pylist() if s > self.step)
                if pc.min(steps).as_py() > self.step:
                    remove_inside(self.out, part)
                else:  # a part that holds steps on both sides: keep those up to the start
                    kept = pq.read_table(part, schema=SCHEMAS[table])
                    atomic_write_table(part, kept.filter(pc.less_equal(kept.column("step"), self.step)))
        if dropped:
            warnings.warn(f"training lens: {str(self.out)!r} held {len(dropped)} sampled steps after this lens's start "
                          f"(steps {min(dropped)}-{max(dropped)}, start {self.step}: a run resumed from an earlier "
                          "checkpoint, or started again); their rows are dropped and written again as the steps are "
                          "taken", stacklevel=4)

    # -- module hooks ------------------------------------------------------------------------------------------
    def _arm_for_next_step(self) -> None:
        if not self._optimizer_hooks:
            return
        if not self.next_step_sampled:
            self._disarm()
            return
        self._factors = _StepFactors(self)
        self._acc.reset()
        if self.settings.track:
            self._read_tracked_prompts()
        if not self._handles:
            self._handles = [self.ctx.module(*key).register_forward_hook(functools.partial(self._forward_hook, key))
                             for key in self.keys]

    def _disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._factors = None

    def _forward_hook(self, key, module, args, output) -> None:
        # Only an output that carries a gradient is hooked, and its hook fires once, when the backward reaches it.
        # Under gradient checkpointing that counts each micro-batch once: a reentrant checkpoint's first pass runs
        # without grad (its recomputation in the backward is the hooked one); a non-reentrant checkpoint's first
        # pass is the hooked one and its recomputation only restores saved tensors, so no gradient reaches the
        # recomputed output (its hook never fires and goes with that tensor).
        if self._paused or self._factors is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        # The input is handed over in a list that the hook empties: the hook stays on the graph's node until the
        # graph is freed (often after the next forward), and the input must not stay with it.
        output.register_hook(functools.partial(self._gradient_hook, key, [args[0].detach()]))

    @torch.no_grad()
    def _gradient_hook(self, key, held: list, delta: torch.Tensor) -> None:
        factors = self._factors
        if self._paused or factors is None or not held:
            return
        x = held.pop()
        if key not in factors.seen:
            factors.seen.add(key)
        elif self._params[key].grad is None:
            # .grad was emptied with no optimizer step in between (a step a GradScaler skipped): start again
            self._restart(key)
        x = x.reshape(-1, x.shape[-1])
        delta = delta.reshape(-1, delta.shape[-1])
        self._acc.add_rows(key, x, delta)
        track_x = self._track_x.get(key)
        for start in _blocks(x.shape[0]):
            rows = x[start:start + BLOCK_ROWS].float()
            deltas = delta[start:start + BLOCK_ROWS].float()
            live = deltas.ne(0).any(-1).float()
            factors.x_sum[key] += live @ rows
            factors.tokens[key] += live.sum().to(torch.int64)
            if track_x is not None:
                factors.tracked[key] += (rows @ track_x.T).T @ deltas

    def _restart(self, key) -> None:
        self._acc.sketches[key].clear()
        factors = self._factors
        factors.x_sum[key].zero_()
        factors.tokens[key].zero_()
        if key in factors.tracked:
            factors.tracked[key].zero_()

    def _read_tracked_prompts(self) -> None:
        """One no-grad eval forward of the tracked prompts at the current weights: FF2's input at each prompt's last
        position and the target's probability there."""
        examples = self._track_examples
        ids, mask = self.ctx.pad([e.prompt_ids for e in examples])
        layers = [layer for layer, _ in self.tracked_keys]
        self._paused = True
        try:
            hidden = forward_hidden(self.ctx, ids, mask, ff2_layers=layers)
        finally:
            self._paused = False
        rows = torch.arange(len(examples), device=ids.device)
        last = torch.tensor([len(e.prompt_ids) - 1 for e in examples], device=ids.device)
        self._track_x = {(layer, "mlp.out"): hidden.ff2_inputs[layer][rows, last].float() for layer in layers}
        logits = self.ctx.lens.logits(hidden.hidden[rows, last])
        targets = torch.tensor([e.target_ids[0] for e in examples], device=ids.device)
        self._track_prob = logits.log_softmax(-1)[rows, targets].exp().double().cpu()

    # -- optimizer hooks ---------------------------------------------------------------------------------------
    def _owns(self, optimizer) -> bool:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        found = self._weights & held
        if found and found != self._weights:
            missing = [key for key in self.keys if id(self._params[key]) not in held]
            raise ValueError(f"the optimizer that stepped holds {len(found)} of the {len(self._weights)} watched "
                             f"weights (not {missing[:3]}): the lens reads one optimizer's step; watch the modules "
                             "of one optimizer")
        return bool(found)

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if not self._owns(optimizer):
            return
        self._depth += 1
        if self._depth > 1 or self._factors is None:
            return  # a wrapper's inner optimizer (accelerate's), or a step that is not sampled
        self._sum_over_ranks()
        if not self.writes:
            return
        gradient, extra = self._finish_gradient(optimizer)
        self._pending = {"gradient": gradient, **extra, "optimizer": optimizer,
                         "change": self.settings.change == "always" or (self.settings.change == "auto"
                                                                        and not _plain_sgd(optimizer))}
        if self._pending["change"]:
            self._acc.reset()
            for key in self.keys:
                y, w = self._acc.sketch_matrix(key, self._weight_io(key).detach())
                sketch = self._acc.sketches[key]
                sketch.y.sub_(y)
                sketch.w.sub_(w)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if not self._owns(optimizer):
            return
        self._depth -= 1
        if self._depth > 0:
            return
        self.step += 1
        pending, self._pending = self._pending, None
        if pending is not None:
            sources = {"gradient": pending.pop("gradient")}
            if pending["change"]:
                for key in self.keys:
                    y, w = self._acc.sketch_matrix(key, self._weight_io(key).detach())
                    sketch = self._acc.sketches[key]
                    sketch.y.add_(y)
                    sketch.w.add_(w)
                pending["change_norm"] = {key: _sampled_norm(s.y, s.w) for key, s in self._acc.sketches.items()}
                sources["change"] = {key: self._read(key, pending["x_sum"][key], negate=True) for key in self.keys}
            self._store(self.step, sources, pending)
        self._arm_for_next_step()

    def _sum_over_ranks(self) -> None:
        if self.world_size == 1:
            return
        tensors = [t for s in self._acc.sketches.values() for t in (s.y, s.w)] + self._factors.tensors()
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(part.view_as(tensor))
        tokens = torch.stack(list(self._factors.tokens.values()))
        torch.distributed.all_reduce(tokens)
        for value, total in zip(self._factors.tokens.values(), tokens):
            value.copy_(total)

    def _finish_gradient(self, optimizer) -> tuple[dict, dict]:
        """Scale each sketch to the ``.grad`` the optimizer reads and do the sketch's small exact step."""
        factors = self._factors
        m = self.settings.sketch[2]
        scales, consistency, norms = {}, {}, {}
        for key in self.keys:
            grad = self._grad_io(key)
            sketch = self._acc.sketches[key]
            if grad is None:
                scales[key], consistency[key] = float(self.world_size), math.nan
                norms[key] = math.nan
            else:
                probes, _ = self._acc.sketch_matrix(key, grad.detach(), probes_only=True)
                scales[key], consistency[key] = _match(sketch.y[:, -m:], probes)
                norms[key] = _frobenius(grad.detach())
            if consistency[key] > CONSISTENCY_WARNING and key not in self._warned:
                self._warned.add(key)
                warnings.warn(f"training lens, step {self.step + 1}: the gradient of {key[1]} at layer {key[0]} is not "
                              f"the sum of the factors the hooks saw (relative mismatch {consistency[key]:.3g} beyond "
                              f"one scale): was a micro-batch run outside the lens, or the gradient changed entry by "
                              "entry (clip_grad_value_)? Its rows are written with this consistency", stacklevel=3)
            scale = scales[key] if scales[key] != 0 and math.isfinite(scales[key]) else 1.0
            sketch.y.div_(scale)
            sketch.w.div_(scale)
            if key in factors.tracked:
                factors.tracked[key].div_(scale)
        reads = {}
        for key in self.keys:
            grad = self._grad_io(key)
            if self.settings.refine and grad is not None and consistency[key] <= CONSISTENCY_WARNING:
                sketch = self._acc.sketches[key]
                start = sketch.y[:, :self.settings.sketch[0]]
                found = _refined(grad.detach(), start, "out" if sketch.swap else "in", norms[key])
                reads[key] = _Read.of(*found, factors.x_sum[key], self._sides(key), self.settings.rank, negate=False)
            else:
                reads[key] = self._read(key, factors.x_sum[key], negate=False)
        lr = {key: _learning_rate(optimizer, self._params[key]) for key in self.keys}
        return reads, {"scale": scales, "consistency": consistency, "norm": norms, "lr": lr,
                       "x_sum": dict(factors.x_sum), "tokens": {key: int(v) for key, v in factors.tokens.items()},
                       "tracked": dict(factors.tracked), "track_prob": self._track_prob}

    # -- reading and writing -----------------------------------------------------------------------------------
    def _store(self, step: int, sources: dict, pending: dict) -> None:
        """Build one sampled step's tables from its reads (``{source: {key: _Read}}``; every direction read through the
        lens in one projection), buffer them (written every ``flush_every`` sampled steps), update the scalars."""
        steps_rows, spectrum_rows, directions = [], [], []
        for source, reads in sources.items():
            for key in self.keys:
                read: _Read = reads[key]
                directions.append((source, key, read))
                steps_rows.append(self._step_row(step, source, key, read, pending))
                spectrum_rows += [dict(step=step, layer=key[0], module=key[1], source=source, index=j + 1,
                                       singular_value=float(s), error_bar=read.error_bar, angle_bound=float(a))
                                  for j, (s, a) in enumerate(zip(read.singular_values.tolist(),
                                                                 read.angle_bound.tolist()))]
        tables = {"rows": self._lens_rows(step, directions), "steps": _table("steps", pd.DataFrame(steps_rows)),
                  "spectrum": _table("spectrum", pd.DataFrame(spectrum_rows, columns=SCHEMAS["spectrum"].names))}
        if self.settings.track:
            tables["tracked"] = self._tracked_rows(step, pending)
        self._update_scalars(step, tables)
        for name, table in tables.items():
            self._buffers[name].append(table)
        self._buffered_steps.append(step)
        if len(self._buffered_steps) >= self.settings.flush_every:
            self._flush()

    def _step_row(self, step: int, source: str, key, read: "_Read", pending: dict) -> dict:
        s = read.singular_values.double()
        top = float(s[0]) if len(s) else 0.0
        if source == "change":
            norm, norm_error = pending["change_norm"][key]
        elif math.isfinite(pending["norm"][key]):
            norm, norm_error = pending["norm"][key], 0.0
        else:
            norm, norm_error = read.frobenius, read.error_bar
        return dict(step=step, layer=key[0], module=key[1], source=source, tokens=pending["tokens"][key],
                    lr=pending["lr"][key], norm=norm, norm_error=norm_error, top_singular_value=top,
                    error_bar=read.error_bar, stable_rank=norm ** 2 / top ** 2 if top > 0 else math.nan,
                    energy_share=min(1.0, float((s ** 2).sum()) / norm ** 2) if norm > 0 else 1.0,
                    scale=pending["scale"][key] if source == "gradient" else 1.0,
                    consistency=pending["consistency"][key] if source == "gradient" else math.nan)

    def _read(self, key, x_sum: torch.Tensor, *, negate: bool) -> "_Read":
        """The sketch's own reading (its small exact step)."""
        stats = self._acc.finalize_module(key)
        return _Read.of(stats.singular_values, stats.u, stats.v, stats.frobenius,
                        stats.approximation_error * stats.frobenius, x_sum, self._sides(key), self.settings.rank,
                        negate=negate)

    def _sides(self, key) -> set[str]:
        return {factor for _, factor, _ in self._lists(key[1])}

    def _lists(self, module: str) -> list[tuple[str, str, bool]]:
        """``(list, factor, largest)`` of the lens lists that read ``module``'s side in the model's width."""
        return [(entry.name, entry.factor, entry.largest) for entry in LISTS
                if module in self.ctx.resolve_modules(entry.module)]

    def _lens_rows(self, step: int, directions: list) -> pa.Table:
        """Every direction's lists (``directions``: ``(source, key, read)``), all read through the lens in one pass
        over the vocabulary (input sides and output sides together; top and bottom lists from that one pass)."""
        k = self.settings.k
        wanted = []  # (source, key, read, [(list, largest)], vectors)
        for source, key, read in directions:
            for factor, vectors in (("x", read.u), ("delta", read.v)):
                lists = [(name, largest) for name, side, largest in self._lists(key[1]) if side == factor]
                if lists and vectors is not None and vectors.shape[1]:
                    wanted.append((source, key, read, lists, vectors))
        if not wanted:
            return SCHEMAS["rows"].empty_table()
        orders = {largest for *_, lists, _ in wanted for _, largest in lists}
        vectors = torch.cat([v.T for *_, v in wanted]).to(self.ctx.device)
        projected = project_lists(self.ctx, vectors, k=k, top=True in orders, bottom=False in orders,
                                  impl=self.impl)
        parts, row = [], 0
        for source, key, read, lists, chosen in wanted:
            count = chosen.shape[1]
            s = read.singular_values.double()[:count]
            for name, largest in lists:
                part = projected.top if largest else projected.bottom
                values = part.values[row:row + count].float().cpu()
                parts.append(dict(
                    step=np.full(count * k, step), layer=np.full(count * k, key[0]), module=key[1], source=source,
                    direction=np.repeat(np.arange(1, count + 1), k), singular_value=np.repeat(s.numpy(), k),
                    error_bar=np.full(count * k, read.error_bar), angle_bound=np.repeat(read.angle_bound.numpy(), k),
                    list=name, rank=np.tile(np.arange(1, k + 1), count),
                    token_id=part.indices[row:row + count].reshape(-1).cpu().numpy().astype(np.int32),
                    logit=values.reshape(-1).numpy(),
                    score=(s[:, None] * values.double() * (1 if largest else -1)).reshape(-1).numpy()))
            row += count
        return _table("rows", _concat(parts, SCHEMAS["rows"].names), self.ctx.token_texts)

    def _tracked_rows(self, step: int, pending: dict) -> pa.Table:
        k = self.settings.k
        examples = self._track_examples
        targets = [e.target_ids[0] for e in examples]
        vectors = torch.cat([pending["tracked"][key] for key in self.tracked_keys])
        read = project_lists(self.ctx, vectors, k=k, top=False, bottom=True, impl=self.impl,
                             targets=torch.tensor(targets * len(self.tracked_keys), device=vectors.device))
        n = len(examples)
        ranks = read.target_rank_bottom.reshape(len(self.tracked_keys), n).cpu()
        indices = read.bottom.indices.reshape(len(self.tracked_keys), n, k).cpu()
        logits = read.bottom.values.reshape(len(self.tracked_keys), n, k).float().cpu()
        rows = []
        texts = self.ctx.token_texts
        for li, (layer, _) in enumerate(self.tracked_keys):
            for i, e in enumerate(examples):
                for r in range(k):
                    rows.append(dict(step=step, track=i, prompt=e.prompt, target=e.target,
                                     target_token=texts([targets[i]])[0], layer=layer,
                                     target_prob=float(pending["track_prob"][i]), target_rank=int(ranks[li, i]),
                                     rank=r + 1, token_id=int(indices[li, i, r]), token=texts([indices[li, i, r]])[0],
                                     logit=float(logits[li, i, r])))
        return _table("tracked", pd.DataFrame(rows))

    def _update_scalars(self, step: int, tables: dict) -> None:
        scalars = {"blens/step": float(step)}
        for row in tables["steps"].to_pylist():
            prefix = f"blens/L{row['layer']}/{row['module']}"
            if row["source"] == "gradient":
                scalars[f"{prefix}/grad_norm"] = row["norm"]
                scalars[f"{prefix}/top_singular_value"] = row["top_singular_value"]
                scalars[f"{prefix}/stable_rank"] = row["stable_rank"]
                scalars[f"{prefix}/error_bar"] = row["error_bar"]
            else:
                scalars[f"{prefix}/change_norm"] = row["norm"]
        if "tracked" in tables:
            for row in tables["tracked"].to_pylist():
                if row["rank"] == 1:
                    scalars[f"blens/track{row['track']}/L{row['layer']}/target_rank"] = float(row["target_rank"])
                    scalars[f"blens/track{row['track']}/target_prob"] = row["target_prob"]
        self.scalars = scalars
        self._fresh_scalars = True

    def pop_scalars(self) -> dict[str, float]:
        """The last sampled step's summaries if they are new since the last call, else ``{}`` (for loggers)."""
        if not self._fresh_scalars:
            return {}
        self._fresh_scalars = False
        return dict(self.scalars)

    def _flush(self) -> None:
        if not self._buffered_steps:
            return
        first = self._buffered_steps[0]
        for name, tables in self._buffers.items():
            if not tables:
                continue
            table = pa.concat_tables(tables)
            if self.out is not None and self.writes:
                path = shard_file(self.out, name, first)
                make_folder(path.parent, "training lens folder")
                atomic_write_table(path, table)
            else:
                self._memory[name].append(table)
            tables.clear()
        self._buffered_steps = []

    def _has_rows(self) -> bool:
        return self.out is not None and (self.out / "rows").is_dir()

    def to_pandas(self, table: str = "rows") -> pd.DataFrame:
        """One of :data:`TABLES` as a DataFrame: from ``out`` when the lens writes there, else from memory (what is
        not yet written included)."""
        check_choice(table, "table", TABLES)
        if self.out is not None:
            self._flush()
            if not self.writes:
                raise ValueError(f"rank {self.rank_in_group} does not write: read the results on rank 0")
            return read_training_lens(self.out, table)
        tables = self._memory[table] + self._buffers[table]
        return (pa.concat_tables(tables) if tables else SCHEMAS[table].empty_table()).to_pandas()


def read_training_lens(directory, table: str = "rows") -> pd.DataFrame:
    """One table of a training lens's ``out`` folder (``rows``, ``steps``, ``spectrum`` or ``tracked``) as a
    DataFrame sorted by step; a ``ValueError`` naming the folder when it holds no training lens."""
    check_choice(table, "table", TABLES)
    out = Path(directory)
    if out.is_dir():
        refuse_symlinks(out, "training lens folder")
    if not (out / "run.json").is_file():
        raise ValueError(f"{str(out)!r} holds no training lens (no run.json): expected the out= folder of a "
                         "TrainingLens or BackwardLensCallback")
    folder = out / table
    files = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if not files:
        return SCHEMAS[table].empty_table().to_pandas()
    frame = pq.read_table(folder, schema=SCHEMAS[table]).to_pandas()
    return frame.sort_values("step", kind="stable").reset_index(drop=True)


# -- the small maths ---------------------------------------------------------------------------------------------
def _match(from_factors: torch.Tensor, from_grad: torch.Tensor) -> tuple[float, float]:
    """The scale ``c`` with ``from_factors ~ c * from_grad`` (least squares) and the relative mismatch beyond it."""
    a, b = from_factors.double(), from_grad.double()
    bb = float((b * b).sum())
    aa = float((a * a).sum())
    if bb == 0.0:
        return 1.0, 0.0 if aa == 0.0 else 1.0
    scale = float((a * b).sum()) / bb
    return scale, float((a - scale * b).norm()) / math.sqrt(aa) if aa > 0 else 1.0


def _learning_rate(optimizer, weight) -> float:
    for group in optimizer.param_groups:
        if any(p is weight for p in group["params"]):
            lr = group.get("lr", math.nan)
            return float(lr) if not isinstance(lr, torch.Tensor) else float(lr.item())
    return math.nan


@dataclass(frozen=True)
class _Read:
    """One sketch's small exact step, kept compact until the step's rows are written: the singular values, the
    directions that the lens reads as float32 (``u``: ``d_in x r`` when ``"x"`` is in ``sides``, ``v``: ``d_out x r``
    when ``"delta"`` is; else None) with each pair's sign chosen so that the step's mean input has ``x . u_j >= 0``
    (``negate``: ``v`` of the matrix's negative), the Frobenius estimate, the error bar (the sketch's expected
    ``||G - Q B||_F``, a bound on each singular value's error by Weyl's inequality) and each direction's
    ``angle_bound``: ``min(1, error_bar / gap)`` with the gap to its neighbouring singular values, Wedin's bound on the
    sine of the angle between the sketched direction and the dense gradient's (0 when the step's rank fits the sketch;
    near 1: the sketch does not pin that direction down, and its lists are not the dense direction's)."""

    singular_values: torch.Tensor
    u: torch.Tensor | None
    v: torch.Tensor | None
    frobenius: float
    error_bar: float
    angle_bound: torch.Tensor

    @classmethod
    def of(cls, s: torch.Tensor, u: torch.Tensor, v: torch.Tensor, frobenius: float, error_bar: float,
           x_sum: torch.Tensor, sides, rank: int, *, negate: bool) -> "_Read":
        """From singular values ``s`` and vectors ``u``, ``v`` (any float dtype, on the CPU; one value more than
        ``rank`` gives the last gap)."""
        s = s.double()
        r = min(rank, s.numel())
        below = torch.cat([s[1:r + 1], s.new_zeros(max(0, r + 1 - s.numel()))])[:r]
        above = torch.cat([s.new_full((1,), math.inf), s[:r - 1]])[:r]
        gap = torch.minimum(above - s[:r], s[:r] - below)
        angle = torch.where(gap > 0, error_bar / gap.clamp_min(1e-300), torch.ones_like(gap)).clamp(max=1.0)
        if error_bar == 0:
            angle = torch.zeros_like(angle)
        signs = torch.where(x_sum.cpu().double() @ u[:, :r].double() < 0, -1.0, 1.0)
        u_read = (u[:, :r].double() * signs).float() if "x" in sides else None
        v_read = (v[:, :r].double() * signs * (-1.0 if negate else 1.0)).float() if "delta" in sides else None
        return cls(s[:r], u_read, v_read, frobenius, error_bar, angle)


def _refined(grad: torch.Tensor, start: torch.Tensor, side: str, norm: float):
    """A power iteration on the optimizer's ``.grad`` (``G``, ``d_in x d_out``, read in row blocks, never copied)
    started from the sketch's range (``start``: its ``y`` columns, spanning the ``"in"`` or ``"out"`` side): ``T`` =
    ``orth(G^T S)`` (after ``S <- orth(G S)`` when ``S`` spans outputs) spans outputs, and the projection ``G T T^T``
    gives ``(s, u, v, norm, error_bar)`` with the exact ``error_bar = ||G - G T T^T||_F`` (it bounds every singular
    value's error, Weyl): ``||G||^2 - ||G T||^2`` when that holds at least :data:`DIFFERENCE_OF_SQUARES` of
    ``||G||^2`` (float32 rounding, ~1e-6 of ``||G||^2``, then moves it by under 1e-3 of itself), else computed
    directly, in row blocks (a step whose rank fits the subspace, where the difference would be rounding)."""
    basis = torch.linalg.qr(start.double()).Q.float()
    if side == "out":
        basis = torch.linalg.qr(skinny_product(grad, basis, transpose=False).double()).Q.float()
    outputs = torch.linalg.qr(skinny_product(grad, basis, transpose=True).double()).Q.float()
    outputs = outputs.to(grad.device)
    w = skinny_product(grad, outputs, transpose=False)
    residual_sq = norm ** 2 - float(torch.linalg.vector_norm(w.double())) ** 2
    if residual_sq < DIFFERENCE_OF_SQUARES * norm ** 2:  # most of G is in the subspace: its rounding would dominate
        rows = block_rows(grad.shape[0])
        residual_sq = sum(float(torch.linalg.vector_norm(grad[first:first + rows].float()
                                                         - w[first:first + rows] @ outputs.T)) ** 2
                          for first in range(0, grad.shape[0], rows))
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return s.cpu(), u.cpu(), (outputs.double() @ vh.T).cpu(), norm, math.sqrt(residual_sq)


def _sampled_norm(y: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """``||G||_F`` from a sketch's Gaussian samples and its standard error: every column of ``y = G Omega`` and row
    of ``w = Psi G`` has ``E ||.||^2 = ||G||_F^2``, so their mean squared norm is unbiased and its spread is measured
    (for the change of an adaptive optimizer, whose spectrum is flat, it is sharper than the range-based estimate)."""
    samples = torch.cat([y.double().square().sum(0), w.double().square().sum(1)])
    mean = float(samples.mean())
    error = float(samples.std() / math.sqrt(samples.numel())) if samples.numel() > 1 else mean
    norm = math.sqrt(max(mean, 0.0))
    return norm, error / (2 * norm) if norm > 0 else 0.0


def _concat(parts: list[dict], columns) -> dict:
    if not parts:
        return {}
    out = {}
    for name in columns:
        if name == "token":
            continue
        values = [p[name] if isinstance(p[name], np.ndarray) else np.full(len(p["rank"]), p[name], dtype=object)
                  for p in parts]
        out[name] = np.concatenate(values)
    return out


def _table(name: str, columns, token_texts=None) -> pa.Table:
    """An Arrow table of :data:`SCHEMAS` ``[name]`` from a DataFrame or a dict of columns; dictionary columns use the
    fixed dictionaries (every part of a dataset alike); ``token_texts`` (ids -> texts) fills ``token``."""
    schema = SCHEMAS[name]
    frame = columns if isinstance(columns, pd.DataFrame) else None
    length = len(frame) if frame is not None else len(next(iter(columns.values()), []))
    if length == 0:
        return schema.empty_table()
    arrays = []
    for field in schema:
        if field.name == "token" and token_texts is not None:
            arrays.append(pa.array(token_texts(columns["token_id"]), pa.string()))
            continue
        values = np.asarray(frame[field.name] if frame is not None else columns[field.name])
        if field.name in _DICTIONARIES:
            dictionary = _DICTIONARIES[field.name]
            index = {value: i for i, value in enumerate(dictionary)}
            codes = np.fromiter((index[v] for v in values), dtype=np.int32, count=len(values))
            arrays.append(pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(dictionary, pa.string())))
        else:
            arrays.append(pa.array(values).cast(field.type))
    return pa.table(arrays, schema=schema)
