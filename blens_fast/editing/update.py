"""The :class:`Edit` object: low-rank weight updates written into a model and reverted bit for bit.

Every model has a stack of the edits applied to it. Edits are reverted in the reverse order of application (each
restores the weights it found); reverting one that another edit sits on is refused with an error naming that edit,
so no revert can silently leave a previous edit in the weights. A saved edit records the fingerprint of the weights it
touches as it found them, with the architecture (:meth:`~blens_fast.context.ModelContext.tensors_fingerprint`;
taken when it is saved, from the weights it keeps while applied, so edits that are never saved never pay for it), and
is applied to other weights only when forced. Every update is checked before any weight is written: finite
floating-point factors of matching rank, at a layer and module the model has, of the weight's shape; a file names
itself in every refusal.
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_save_tensors, make_folder
from ..context import ModelContext, bind

#: /3: update factors in (in, out) terms whatever the weight's layout (/2 held them in the weight's own layout), and
#: the fingerprint of the architecture and of the touched weights
FORMAT = "blens_fast.edit/3"
_FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: model -> the edits applied to it, oldest first
_STACKS: "weakref.WeakKeyDictionary[nn.Module, list[Edit]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Update:
    """One in-place step ``W += left.T @ right`` on the ``d_in x d_out`` weight of ``(layer, module)``, in (in, out)
    terms whatever layout the module stores its weight in (:meth:`~blens_fast.context.ModelContext.weight_io`).

    ``left`` is ``r x d_in`` and ``right`` is ``r x d_out`` (rank ``r``).
    """

    layer: int
    module: str
    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the weight this step writes, ``(left columns, right columns)``."""
        return (self.left.shape[1], self.right.shape[1])

    def apply_to(self, weight: torch.Tensor) -> None:
        """The step on ``weight``, a ``d_in x d_out`` tensor or view."""
        weight.addmm_(self.left.to(weight.device, weight.dtype).T, self.right.to(weight.device, weight.dtype))

    def problem(self) -> str | None:
        """Why this step cannot be applied to any model (None when it can)."""
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            return f"its layer is {self.layer!r}, expected a layer index (an int from 0)"
        if not isinstance(self.module, str):
            return f"its module is {self.module!r}, expected a module name"
        for name, factor in (("left", self.left), ("right", self.right)):
            if not isinstance(factor, torch.Tensor) or factor.dtype not in _FLOATING or factor.dim() != 2:
                kind = f"{factor.dtype} {tuple(factor.shape)}" if isinstance(factor, torch.Tensor) else type(factor)
                return f"its {name} factor is {kind}, expected a 2-D floating-point tensor"
        if self.left.shape[0] != self.right.shape[0]:
            return (f"its factors have ranks {self.left.shape[0]} and {self.right.shape[0]}: expected r x d_in and "
                    "r x d_out")
        if not (bool(torch.isfinite(self.left).all()) and bool(torch.isfinite(self.right).all())):
            return "its factors hold NaN or Inf"
        return None


def applied_edits(model) -> tuple["Edit", ...]:
    """The edits applied to ``model`` (a model or a context), oldest first."""
    model = model.model if isinstance(model, ModelContext) else model
    return tuple(_STACKS.get(model, ()))


class Edit:
    """A weight update of a model, reversible bit for bit while applied.

    ``updates``: the in-place steps, in order; ``info``: what made it (method, layer, scales, skipped facts, the
    model's fingerprint...). ``layers`` / ``modules`` / ``touched``: where it writes. ``delta(layer, module)``
    builds the dense sum of the steps (for inspection only). ``with edit(...):`` reverts on exit.
    """

    def __init__(self, updates, info: dict | None = None, *, source: str | None = None):
        self.updates: tuple[Update, ...] = tuple(updates)
        self.info: dict = dict(info or {})
        #: the file the edit was loaded from (named in its errors)
        self.source = source
        self._ctx: ModelContext | None = None
        self._originals: dict[tuple[int, str], torch.Tensor] = {}
        self._unrecorded = False  # reverted before its fingerprint was taken

    # -- description ---------------------------------------------------------------------
    @property
    def touched(self) -> tuple[tuple[int, str], ...]:
        """Every ``(layer, module)`` the edit writes, in the order of its steps."""
        return tuple(dict.fromkeys((u.layer, u.module) for u in self.updates))

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers the edit writes, sorted."""
        return tuple(sorted({u.layer for u in self.updates}))

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules the edit writes, sorted."""
        return tuple(sorted({u.module for u in self.updates}))

    @property
    def applied(self) -> bool:
        """Whether the edit is applied to a model now."""
        return self._ctx is not None

    @property
    def deltas(self) -> dict[tuple[int, str], torch.Tensor]:
        """Dense update per touched weight (float32, ``d_in x d_out``: builds those matrices)."""
        return {key: self.delta(*key) for key in self.touched}

    def delta(self, layer: int, module: str) -> torch.Tensor:
        """The dense sum of the steps on ``module`` at ``layer`` (float32, ``d_in x d_out``; for inspection)."""
        steps = [u for u in self.updates if (u.layer, u.module) == (layer, module)]
        if not steps:
            raise ValueError(f"this edit does not touch {module!r} at layer {layer}: it touches {list(self.touched)}")
        out = torch.zeros(steps[0].shape, dtype=torch.float32, device=steps[0].left.device)
        for u in steps:
            out.addmm_(u.left.float().T, u.right.float())
        return out

    def __repr__(self) -> str:
        state = "applied" if self.applied else "not applied"
        facts = self.info.get("prompts")
        what = f", fact={facts[0]!r} -> {self.info.get('targets', ['?'])[0]!r}" if facts else ""
        return (f"Edit(method={self.info.get('method')!r}{what}, touched={list(self.touched)}, "
                f"steps={len(self.updates)}, {state})")

    # -- applying and reverting ----------------------------------------------------------
    def apply(self, model, *, force: bool = False) -> "Edit":
        """Write the update into ``model`` (a model or a context; clones of the touched weights are kept); returns
        ``self``. Every step is checked first (:meth:`Update.problem`, the layer, the module, the weight's shape);
        an edit made on (or saved from) other weights is refused unless ``force``."""
        if self.applied:
            raise ValueError(f"{self!r} is already applied to a model: revert() it first")
        ctx = bind(model)
        weights = self._touched_weights(ctx)
        saved = self.info.get("fingerprint")
        if saved is None and self.source is not None and not force:
            raise ValueError(f"{self._what()} records no fingerprint of the weights it was made on: pass force=True "
                             "to apply it anyway")
        if saved is not None and not force:
            current = fingerprint(ctx, weights)
            if saved != current:
                raise ValueError(f"{self._what()} was made on another model (the fingerprint of the architecture and "
                                 f"of the weights it touches was {saved}, this model's is {current}): pass force=True "
                                 "to apply it anyway")
        self._attach(ctx, {key: w.detach().clone() for key, w in weights.items()})
        try:
            with torch.no_grad():
                for u in self.updates:
                    u.apply_to(weights[(u.layer, u.module)])
        except BaseException:
            self.revert()
            raise
        return self

    def _what(self) -> str:
        return f"edit file {self.source!r}" if self.source else "this edit"

    def _touched_weights(self, ctx: ModelContext) -> dict[tuple[int, str], torch.Tensor]:
        """The weight of every step, each step checked against the model (a ``ValueError`` naming the step)."""
        weights = {}
        for i, u in enumerate(self.updates):
            why = u.problem()
            if why is None:
                try:
                    (layer,) = ctx.check_layers([u.layer])
                    weight = weights.get((u.layer, u.module))
                    weight = ctx.weight_io(layer, u.module) if weight is None else weight
                except ValueError as error:
                    why = str(error)
                else:
                    if tuple(weight.shape) != u.shape:
                        why = (f"its update of {u.module!r} at layer {u.layer} has shape {u.shape} but the model's "
                               f"weight has shape {tuple(weight.shape)} (both d_in x d_out)")
                    weights[(u.layer, u.module)] = weight
            if why is not None:
                raise ValueError(f"{self._what()}: step {i} cannot be applied: {why}")
        return weights

    def _attach(self, ctx: ModelContext, originals: dict) -> None:
        """Record this edit as applied to ``ctx``'s model with the weights it found (the top of its stack)."""
        self._ctx = ctx
        self._originals = originals
        _STACKS.setdefault(ctx.model, []).append(self)

    def revert(self) -> None:
        """Restore every touched weight bit for bit (a no-op when not applied). Edits applied after this one must be
        reverted first: a ``ValueError`` names the one on top."""
        if self._ctx is None:
            return
        stack = _STACKS[self._ctx.model]  # an applied edit is on its model's stack
        if stack[-1] is not self:
            raise ValueError(f"cannot revert {self!r}: {stack[-1]!r} was applied after it and is still applied; "
                             "revert that one first (edits revert in the reverse order of application)")
        with torch.no_grad():
            for (layer, module), original in self._originals.items():
                self._ctx.weight_io(layer, module).copy_(original)
        stack.pop()
        self._unrecorded = "fingerprint" not in self.info
        self._ctx = None
        self._originals = {}

    def __enter__(self) -> "Edit":
        return self

    def __exit__(self, *exc) -> bool:
        self.revert()
        return False

    # -- storage -------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Store the update steps as safetensors (metadata: the ``info`` record as JSON, with the fingerprint of the
        weights the edit was made on). An edit that was applied is saved while it is applied (then it holds those
        weights) or after being applied again."""
        if "fingerprint" not in self.info:
            if self._ctx is not None:
                self.info["fingerprint"] = fingerprint(self._ctx, self._originals)
            elif self._unrecorded:
                raise ValueError(f"{self!r} was reverted before it was saved: save it while it is applied (its file "
                                 "records the fingerprint of the weights it was made on, which it holds only then)")
        tensors, steps = {}, []
        for i, u in enumerate(self.updates):
            tensors[f"update.{i}.left"] = u.left
            tensors[f"update.{i}.right"] = u.right
            steps.append({"layer": u.layer, "module": u.module})
        info = {k: v for k, v in self.info.items() if not k.startswith("_")}
        metadata = {"format": FORMAT, "steps": json.dumps(steps), "info": json.dumps(info, default=str)}
        make_folder(Path(path).parent)
        return atomic_save_tensors(path, tensors, metadata)

    @classmethod
    def load(cls, path) -> "Edit":
        """An edit saved by :meth:`save`, not applied to any model (call ``apply(model)``). A missing file raises
        ``FileNotFoundError``; a damaged or foreign one, or one whose steps cannot be applied to any model (NaN or
        Inf, factors of other ranks, dimensions or dtypes, tensors the steps do not name), a ``ValueError`` naming
        it."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such edit file: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
                steps = json.loads(metadata["steps"])
                info = json.loads(metadata.get("info", "{}"))
                if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
                    raise ValueError(f"'steps' is {type(steps).__name__}, expected a list of {{layer, module}}")
                if not isinstance(info, dict) or not isinstance(info.get("fingerprint", ""), str):
                    raise ValueError("'info' is not a record with a string fingerprint")
                names = {f"update.{i}.{side}" for i in range(len(steps)) for side in ("left", "right")}
                unexpected = sorted(set(f.keys()) - names)
                if unexpected:
                    raise ValueError(f"tensors no step names: {', '.join(unexpected[:5])}")
                updates = [Update(s["layer"], s["module"], f.get_tensor(f"update.{i}.left"),
                                  f.get_tensor(f"update.{i}.right")) for i, s in enumerate(steps)]
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{str(path)!r} is not a readable blens_fast edit file ({error})") from None
        for i, update in enumerate(updates):
            why = update.problem()
            if why is not None:
                raise ValueError(f"edit file {str(path)!r}: step {i} cannot be applied: {why}")
        return cls(updates, info, source=str(path))


def fingerprint(ctx: ModelContext, weights: dict[tuple[int, str], torch.Tensor]) -> str:
    """The fingerprint of the touched ``weights`` (``(layer, module) -> tensor``) and the model's architecture."""
    return ctx.tensors_fingerprint({f"{layer}.{module}": w for (layer, module), w in weights.items()})
