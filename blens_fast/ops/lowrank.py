"""Fused low-rank accumulation: per-example gradient norms and streaming sketches of the summed gradient.

``sketch_update(a, b, offsets, right, left_t, y, w, impl="auto") -> norms_sq``

For examples whose factors are stacked row-wise (example ``e`` owns rows ``offsets[e]:offsets[e+1]``;
``A`` is ``N x p``, ``B`` is ``N x q``, the gradient of example ``e`` is ``A_e^T B_e``):

* returns ``norms_sq[e] = ||A_e^T B_e||_F^2 = sum((A_e A_e^T) * (B_e B_e^T))`` (float64, one per example);
* adds, in place, ``A^T (B right)`` to ``y`` (``p x s1``) and ``(A left_t)^T B`` to ``w`` (``s2 x q``).

No ``p x q`` matrix is formed: the cost is ``O(N (p + q) (s1 + s2))`` for the sketches plus
``O(sum_e T_e^2 (p + q))`` for the norms. ``impl``: ``"torch"`` (the reference, products in the accumulators'
dtype), ``"cpu"`` (the C++ kernel, the compiled op ``blens_fast::lowrank_sketch_update``), ``"cuda"`` (the same op's
CUDA kernel), ``"triton"``, or ``"auto"`` (the registry's policy, :mod:`blens_fast.ops.registry`). Every impl
returns what ``"torch"`` returns, to float32 rounding.

As for the projection (:mod:`.topk`), the dispatch runs inside a ``torch.library`` op, ``blens_fast::sketch_update``
(it writes ``y`` and ``w`` in place), with its fake implementation beside it, so the call traces under fake tensors
and ``torch.compile``.
"""
from __future__ import annotations

import functools

import torch

from .._checks import check_tensor
from . import _extension
from .lowrank_reference import sketch_update_reference
from .registry import Implementation, Operation, triton_unavailable

#: the compiled kernels' op (csrc/cpu/lowrank_binding.cpp defines it, csrc/cuda/lowrank_binding.cpp adds its CUDA kernel)
_KERNEL = "lowrank_sketch_update"


@functools.lru_cache(maxsize=None)
def _has_kernel(dispatch_key: str) -> bool:
    """Whether the compiled op has a kernel for ``dispatch_key`` (loading the extensions first)."""
    _extension.unavailable("cpu")
    if dispatch_key == "CUDA":
        _extension.unavailable("cuda")
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"blens_fast::{_KERNEL}", dispatch_key)
    except RuntimeError:  # the op is not registered at all
        return False


def _kernel_check(dispatch_key: str):
    def check(device, **facts):
        if _has_kernel(dispatch_key):
            return None
        kind = "cpu" if dispatch_key == "CPU" else "cuda"
        return _extension.unavailable(kind) or f"the compiled extension has no {dispatch_key} kernel of {_KERNEL}"
    return check


def _compiled(a, b, offsets, right, left_t, y, w):
    return getattr(torch.ops.blens_fast, _KERNEL)(a, b, offsets.to(a.device), right, left_t, y, w)


def _triton(a, b, offsets, right, left_t, y, w):
    from .triton.lowrank import sketch_update_triton

    return sketch_update_triton(a, b, offsets.to(a.device), right, left_t, y, w)


def _torch(a, b, offsets, right, left_t, y, w):
    return sketch_update_reference(a, b, offsets, right, left_t, y, w, compute_dtype=torch.float32)


SKETCH = Operation("sketch_update", [
    Implementation("torch", _torch, ("cpu", "cuda")),
    Implementation("cpu", _compiled, ("cpu",), _kernel_check("CPU")),
    Implementation("triton", _triton, ("cuda", "cpu"), lambda device, **facts: triton_unavailable(device)),
    Implementation("cuda", _compiled, ("cuda",), _kernel_check("CUDA")),
])


# -- the torch.library op ------------------------------------------------------------------
@torch.library.custom_op("blens_fast::sketch_update", mutates_args=("y", "w"))
def _sketch_update_op(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, right: torch.Tensor,
                      left_t: torch.Tensor, y: torch.Tensor, w: torch.Tensor, impl: str) -> torch.Tensor:
    """One update by implementation ``impl`` (resolved, not "auto"): ``y`` and ``w`` in place, the norms returned."""
    return SKETCH.implementations[impl].run(a, b, offsets, right, left_t, y, w)


@_sketch_update_op.register_fake
def _(a, b, offsets, right, left_t, y, w, impl):
    return a.new_empty((offsets.shape[0] - 1,), dtype=torch.float64)


def check_sketch_args(a, b, offsets, right, left_t, y, w) -> None:
    """Validate shapes, dtypes and devices; every message names the bad value and what was expected."""
    check_tensor(a, "a", ndim=2)
    check_tensor(b, "b", ndim=2)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a has {a.shape[0]} rows but b has {b.shape[0]}: one row per token each")
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.dtype != torch.int64:
        raise TypeError(f"offsets must be a 1-D int64 tensor (E + 1 row boundaries), got "
                        f"{type(offsets).__name__ if not isinstance(offsets, torch.Tensor) else offsets.dtype}")
    if offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != a.shape[0]:
        raise ValueError(f"offsets must start at 0 and end at the row count {a.shape[0]}, got {offsets.tolist()}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"offsets must be non-decreasing, got {offsets.tolist()}")
    p, q = a.shape[1], b.shape[1]
    for name, t, rows in (("right", right, q), ("left_t", left_t, p)):
        check_tensor(t, name, ndim=2)
        if t.shape[0] != rows:
            raise ValueError(f"{name} has {t.shape[0]} rows but {'b' if name == 'right' else 'a'} has {rows} columns")
    check_tensor(y, "y", ndim=2)
    check_tensor(w, "w", ndim=2)
    if tuple(y.shape) != (p, right.shape[1]):
        raise ValueError(f"y has shape {tuple(y.shape)}: expected {(p, right.shape[1])} (a's columns x right's columns)")
    if tuple(w.shape) != (left_t.shape[1], q):
        raise ValueError(f"w has shape {tuple(w.shape)}: expected {(left_t.shape[1], q)} (left_t's columns x b's columns)")
    for name, t in (("right", right), ("left_t", left_t), ("y", y), ("w", w)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (the accumulators and test matrices), got {t.dtype}")
    if not (y.is_contiguous() and w.is_contiguous()):
        raise ValueError("y and w must be contiguous: they are updated in place")
    devices = {t.device for t in (a, b, right, left_t, y, w)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def sketch_update(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, right: torch.Tensor,
                  left_t: torch.Tensor, y: torch.Tensor, w: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Add the batch's sketches to ``y`` and ``w`` in place; return its per-example ``||A_e^T B_e||_F^2``."""
    check_sketch_args(a, b, offsets, right, left_t, y, w)
    chosen = SKETCH.resolve(impl, a.device)
    return torch.ops.blens_fast.sketch_update(a, b, offsets, right, left_t, y, w, chosen.name)
