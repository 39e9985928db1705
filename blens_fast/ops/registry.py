"""One dispatch for every kernel operation: a registry of implementations per operation and one ``auto`` policy.

An :class:`Operation` lists its :class:`Implementation` s (``torch`` is always the reference). ``resolve(impl,
device, **facts)`` turns the user's ``impl=`` into one of them or raises a ``ValueError`` that says why it cannot
run here. ``impl="auto"`` takes, on a GPU, the implementation measured fastest on that GPU for the nearest shape
(:mod:`blens_fast.ops.tuning`, tables written by ``benchmarks/bench_gpu_roofline.py``) when a table exists, and
otherwise the first usable one of :data:`AUTO_ORDER` for the device type.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

#: ``impl="auto"`` without a measured table: the first usable implementation in this order
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def triton_interpreting() -> bool:
    """Whether Triton kernels run through its interpreter (``TRITON_INTERPRET=1``, on CPU tensors); the one place
    the package reads that variable."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable(device: torch.device) -> str | None:
    """Why Triton kernels cannot take tensors on ``device`` here (None when they can)."""
    if device.type == "cpu" and not triton_interpreting():
        return "Triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, set before triton loads)"
    try:
        import triton  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means: not usable
        return f"triton cannot be imported ({type(error).__name__}: {error})"
    return None


def extension_unavailable(kind: str) -> Callable[[torch.device], str | None]:
    """An availability check for the compiled ``kind`` extension (``"cpu"`` or ``"cuda"``)."""
    def check(device: torch.device) -> str | None:
        from . import _extension

        return _extension.unavailable(kind)
    return check


@dataclass(frozen=True)
class Implementation:
    """One way to run an operation: ``run`` takes the operation's arguments; ``devices`` are the device types whose
    tensors it takes; ``unavailable(device, **facts)`` says why it cannot run (None when it can)."""

    name: str
    run: Callable
    devices: tuple[str, ...]
    unavailable: Callable[..., str | None] = field(default=lambda device, **facts: None)


class Operation:
    """An operation's implementations and its dispatch."""

    def __init__(self, name: str, implementations, *, measured: Callable[..., str | None] | None = None):
        self.name = name
        self.implementations = {impl.name: impl for impl in implementations}
        self._measured = measured

    @property
    def choices(self) -> tuple[str, ...]:
        return ("auto", *self.implementations)

    def _why_not(self, impl: Implementation, device: torch.device, facts) -> str | None:
        if device.type not in impl.devices:
            return f"it takes {' or '.join(impl.devices)} tensors, got tensors on {device}"
        return impl.unavailable(device, **facts)

    def resolve(self, impl: str, device, **facts) -> Implementation:
        """The implementation ``impl`` (or the one ``"auto"`` picks) for tensors on ``device``; ``facts`` (shape,
        ``k``, dtype...) go to the availability checks and the measured table."""
        device = torch.device(device)
        if impl not in self.choices:
            raise ValueError(f"impl={impl!r} is not one of {', '.join(map(repr, self.choices))}")
        if impl != "auto":
            chosen = self.implementations[impl]
            reason = self._why_not(chosen, device, facts)
            if reason:
                raise ValueError(f"impl={impl!r} cannot run {self.name} here: {reason}")
            return chosen
        for name in self.auto_order(device, **facts):
            chosen = self.implementations.get(name)
            if chosen is not None and not self._why_not(chosen, device, facts):
                return chosen
        return self.implementations["torch"]

    def auto_order(self, device: torch.device, **facts) -> tuple[str, ...]:
        """The order ``"auto"`` tries: the measured fastest first (GPUs with a table), then :data:`AUTO_ORDER`."""
        order = AUTO_ORDER.get(device.type, ("torch",))
        if device.type == "cuda" and self._measured is not None:
            best = self._measured(self.name, torch.cuda.get_device_name(device), **facts)
            if best:
                order = (best, *order)
        return order

    def available(self, device="cpu", **facts) -> list[str]:
        """The implementations usable for tensors on ``device`` in this environment."""
        device = torch.device(device)
        return [name for name, impl in self.implementations.items() if not self._why_not(impl, device, facts)]
