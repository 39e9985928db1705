"""What the micro-benchmark modules share: the cases (one group of paths each), the implementations timed per
device, and the (case, path) parameters, ordered so that a group's paths run one after another."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

#: implementations timed per device: the torch reference on both, the C++ kernel on the CPU, Triton and CUDA on a GPU
FAST_PATHS = {"cpu": ("torch", "cpu"), "cuda": ("torch", "triton", "cuda")}
DEVICES = tuple(FAST_PATHS)
#: timed and warm-up rounds of every path on a GPU, where a call takes milliseconds
GPU_ROUNDS = (20, 3)


@dataclass(frozen=True, kw_only=True)
class Case:
    """One group: the fast paths and yardsticks timed together. ``group`` names it (``operation/device/...``); on
    the CPU each fast path runs ``warmup_rounds`` untimed calls, then ``rounds`` timed ones, and each yardstick
    ``yardstick_rounds`` (default: ``rounds``); on a GPU every path runs :data:`GPU_ROUNDS`."""

    group: str
    device: str
    rounds: int
    warmup_rounds: int = 1
    yardstick_rounds: int | None = None

    def rounds_of(self, yardstick: bool) -> tuple[int, int]:
        """``(rounds, warm-up rounds)`` of a path of this case."""
        if self.device != "cpu":
            return GPU_ROUNDS
        return (self.yardstick_rounds or self.rounds) if yardstick else self.rounds, self.warmup_rounds


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def paths(cases, yardsticks, fast_paths=lambda case: FAST_PATHS[case.device]):
    """``parametrize("case, path")`` over every case's yardsticks, then its fast paths (default: the implementations
    of its device); the cases of a GPU are skipped where there is none."""
    params = []
    for case in cases:
        marks = [pytest.mark.skip(reason="no GPU")] if case.device == "cuda" and not torch.cuda.is_available() else []
        params += [pytest.param(case, path, id=f"{case.group}:{path}", marks=marks)
                   for path in (*yardsticks, *fast_paths(case))]
    return pytest.mark.parametrize(("case", "path"), params)


def require(impl: str, available) -> None:
    """Skip the test when implementation ``impl`` is not among ``available`` (e.g. the extension is not built)."""
    if impl not in available:
        pytest.skip(f"implementation {impl!r} is not available here (available: {', '.join(available)})")
