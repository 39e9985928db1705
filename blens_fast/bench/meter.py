"""Time and peak memory per stage of one way of running the Backward Lens.

On CUDA: wall time (synchronised) and ``torch.cuda.max_memory_allocated``, its peak reset at each stage. On the CPU:
wall time in one pass, and in a separate pass the bytes held by torch's CPU allocator, every allocation and free
recorded by ``torch.profiler`` (``profile_memory=True``) and replayed per stage (the profiler is not running while
time is measured); the process' peak RSS (``VmHWM`` after a reset through ``/proc/self/clear_refs``) is recorded
beside it as a coarse second opinion. Peaks are bytes beyond what was allocated when the session started (the
model's weights).
"""
from __future__ import annotations

import gc
import os
import sys
import time
from contextlib import contextmanager, nullcontext

import torch

STAGES = ("gradients", "rank", "projection")
_MARKER = "blens_bench::"


class OutOfMemory(RuntimeError):
    """A stage ran out of device memory (the message names the stage)."""


class Meter:
    """Seconds and peak bytes per stage (:data:`STAGES`) over one :meth:`session`.

    ``mode="time"``: wall time per stage, and on CUDA ``max_memory_allocated`` too. ``mode="memory"`` (CPU): the stages
    are marked with ``record_function`` inside a ``torch.profiler`` session whose allocator events are replayed when
    the session ends.
    """

    def __init__(self, device: torch.device, mode: str):
        if mode not in ("time", "memory"):
            raise ValueError(f"mode={mode!r}: expected 'time' or 'memory'")
        self.device = torch.device(device)
        self.mode = mode
        self.cuda = self.device.type == "cuda"
        self.seconds = {s: 0.0 for s in STAGES}
        self.peak = {s: 0 for s in STAGES}  # bytes beyond the baseline
        self.baseline = 0
        self.rss_peak: int | None = None
        self._profiler = None

    @contextmanager
    def session(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.baseline = torch.cuda.memory_allocated()
        rss_start = reset_rss_peak()
        if self.mode == "memory" and not self.cuda:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with native_stderr_silenced():  # the profiler's C++ side logs its start and stop there
                self._profiler.start()
            try:
                yield self
            finally:
                with native_stderr_silenced():
                    self._profiler.stop()
            self._replay()
        else:
            yield self
        hwm = read_status_bytes("VmHWM")
        if hwm is not None and rss_start is not None:
            self.rss_peak = hwm - rss_start

    @contextmanager
    def stage(self, name: str):
        if name not in self.seconds:
            raise ValueError(f"stage {name!r}: expected one of {', '.join(STAGES)}")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        marker = torch.profiler.record_function(_MARKER + name) if self._profiler else nullcontext()
        start = time.perf_counter()
        with marker:
            try:
                yield
            except torch.OutOfMemoryError as error:
                raise OutOfMemory(f"out of memory in stage {name!r}: {str(error).splitlines()[0]}") from None
            if self.cuda:
                torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - start
        if self.cuda:
            self.peak[name] = max(self.peak[name], torch.cuda.max_memory_allocated() - self.baseline)

    def _replay(self) -> None:
        """Per stage, the peak of bytes held by the CPU allocator while a span of that stage ran."""
        events = self._profiler.profiler.kineto_results.events()
        spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name()[len(_MARKER):]) for e in events
                       if e.name().startswith(_MARKER))
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        current, j = 0, 0
        for start, end, name in spans:
            while j < len(memory) and memory[j][0] < start:
                current += memory[j][1]
                j += 1
            peak = current
            while j < len(memory) and memory[j][0] <= end:
                current += memory[j][1]
                peak = max(peak, current)
                j += 1
            self.peak[name] = max(self.peak[name], peak)
        self._profiler = None

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@contextmanager
def native_stderr_silenced():
    """File descriptor 2 points at /dev/null inside (what C++ libraries print there is dropped; Python's stderr is
    flushed first and works again after)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def memory_method(device: torch.device) -> str:
    """How :class:`Meter` measures memory on ``device``, for reports."""
    if torch.device(device).type == "cuda":
        return ("torch.cuda.max_memory_allocated, peak reset at the start of each stage, minus the memory "
                "allocated before the way started (the model's weights)")
    return ("torch's CPU allocator, every allocation and free recorded by torch.profiler (profile_memory=True) "
            "in a separate pass and replayed: the peak of bytes held per stage, beyond what was allocated "
            "before the way started (the model's weights). Memory that libraries allocate outside torch's "
            "allocator (e.g. LAPACK/BLAS workspaces) is not in it; rss_peak_beyond_start_bytes (VmHWM after a "
            "clear_refs reset, minus VmRSS at the start) is the coarser whole-process view")


def read_status_bytes(field: str) -> int | None:
    """A size field of ``/proc/self/status`` (``"VmRSS"``, ``"VmHWM"``) in bytes, None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_rss_peak() -> int | None:
    """Reset the process' peak RSS to its current RSS (Linux ``clear_refs``); returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return read_status_bytes("VmRSS")
