"""The :class:`Edit` object: low-rank weight updates written into a model and reverted bit for bit.

Every model has a stack of the edits applied to it. Edits are reverted in the reverse order of application (each
restores the weights it found); reverting one that another edit sits on is refused with an error naming that edit,
so no revert can silently leave a previous edit in the weights. A saved edit records the model's fingerprint
(:meth:`~blens_fast.context.ModelContext.fingerprint`) and is applied to another model only when forced.
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

FORMAT = "blens_fast.edit/2"

#: model -> the edits applied to it, oldest first
_STACKS: "weakref.WeakKeyDictionary[nn.Module, list[Edit]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Update:
    """One in-place step ``weight.addmm_(left.T, right)`` on ``(layer, module)``, in the weight's own layout.

    ``left`` is ``r x weight.shape[0]`` and ``right`` is ``r x weight.shape[1]`` (rank ``r``).
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
        """Add ``left^T @ right`` to ``weight`` in place (in its device and dtype)."""
        weight.addmm_(self.left.to(weight.device, weight.dtype).T, self.right.to(weight.device, weight.dtype))


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

    def __init__(self, updates, info: dict | None = None):
        self.updates: tuple[Update, ...] = tuple(updates)
        self.info: dict = dict(info or {})
        self._ctx: ModelContext | None = None
        self._originals: dict[tuple[int, str], torch.Tensor] = {}

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
        """Dense update per touched weight (float32, the weight's layout). Builds d_in x d_out matrices."""
        return {key: self.delta(*key) for key in self.touched}

    def delta(self, layer: int, module: str) -> torch.Tensor:
        """The dense sum of the steps on ``module`` at ``layer`` (float32, the weight's layout; for inspection)."""
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
        ``self``. An edit made on (or saved from) another model is refused unless ``force``."""
        if self.applied:
            raise ValueError(f"{self!r} is already applied to a model: revert() it first")
        ctx = bind(model)
        saved = self.info.get("fingerprint")
        if saved is not None and not force and saved != ctx.fingerprint():
            raise ValueError(f"this edit was made on another model (fingerprint {saved}, this model's is "
                             f"{ctx.fingerprint()}): pass force=True to apply it anyway")
        weights = {}
        for layer, module in self.touched:
            (layer,) = ctx.check_layers([layer])
            ctx.resolve_modules([module])
            weight = ctx.weight(layer, module)
            expected = next(u.shape for u in self.updates if (u.layer, u.module) == (layer, module))
            if tuple(weight.shape) != expected:
                raise ValueError(f"the edit's update of {module!r} at layer {layer} has shape {expected} but the "
                                 f"model's weight has shape {tuple(weight.shape)}")
            weights[(layer, module)] = weight
        self._attach(ctx, {key: w.detach().clone() for key, w in weights.items()})
        try:
            with torch.no_grad():
                for u in self.updates:
                    u.apply_to(weights[(u.layer, u.module)])
        except BaseException:
            self.revert()
            raise
        return self

    def _attach(self, ctx: ModelContext, originals: dict) -> None:
        """Record this edit as applied to ``ctx``'s model with the weights it found (the top of its stack)."""
        self._ctx = ctx
        self._originals = originals
        self.info.setdefault("fingerprint", ctx.fingerprint())
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
                self._ctx.weight(layer, module).copy_(original)
        stack.pop()
        self._ctx = None
        self._originals = {}

    def __enter__(self) -> "Edit":
        return self

    def __exit__(self, *exc) -> bool:
        self.revert()
        return False

    # -- storage -------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Store the update steps as safetensors (metadata: the ``info`` record as JSON, with the model's
        fingerprint)."""
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
        ``FileNotFoundError``; a damaged or foreign one a ``ValueError`` naming it."""
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
                updates = [Update(int(s["layer"]), str(s["module"]), f.get_tensor(f"update.{i}.left"),
                                  f.get_tensor(f"update.{i}.right")) for i, s in enumerate(steps)]
                info = json.loads(metadata.get("info", "{}"))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{str(path)!r} is not a readable blens_fast edit file ({error})") from None
        return cls(updates, info)
