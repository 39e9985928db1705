"""Fused low-rank accumulation: per-example gradient norms and streaming sketches of the summed gradient.

``sketch_update(a, b, offsets, right, left_t, y, w, impl="auto") -> norms_sq``

For examples whose factors are stacked row-wise (example ``e`` owns rows ``offsets[e]:offsets[e+1]``;
``A`` is ``N x p``, ``B`` is ``N x q``, the gradient of example ``e`` is ``A_e^T B_e``):

* returns ``norms_sq[e] = ||A_e^T B_e||_F^2 = sum((A_e A_e^T) * (B_e B_e^T))`` (float64, one per example);
* adds, in place, ``A^T (B right)`` to ``y`` (``p x s1``) and ``(A left_t)^T B`` to ``w`` (``s2 x q``).

No ``p x q`` matrix is formed: the cost is ``O(N (p + q) (s1 + s2))`` for the sketches plus
``O(sum_e T_e^2 (p + q))`` for the norms. ``impl``: ``"torch"`` (the reference, products in the
accumulators' dtype), ``"cpu"`` (C++ op ``torch.ops.blens_fast.lowrank_sketch_update``), ``"cuda"`` (the same
op's CUDA kernel), ``"triton"``, or ``"auto"`` (CUDA tensors: the CUDA op if built, else Triton; CPU
tensors: the C++ op if built, else torch). Every impl returns what ``"torch"`` returns, to float32
rounding.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from .._checks import check_choice, check_tensor
from .lowrank_reference import sketch_update_reference

IMPLS = ("auto", "cuda", "triton", "cpu", "torch")
_OP_NAME = "lowrank_sketch_update"
_REPO = Path(__file__).resolve().parents[2]


def _op_registered() -> bool:
    try:
        return hasattr(torch.ops.blens_fast, _OP_NAME)
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def _load_extensions() -> bool:
    """Load the compiled extensions (importing them registers the op); True when the op exists afterwards.

    Order: ``blens_fast._C`` and ``_C_cuda`` through the package's loader (``blens_fast.ops._extension``,
    which may JIT-build ``_C``; both, even when the op is already registered: ``_C`` alone registers it
    without its CUDA kernel); then, unless ``BLENS_FAST_NO_JIT`` is set, a JIT build of
    ``csrc/cpu/lowrank_cpu.cpp`` alone (a source checkout whose ``_C`` lacks this op).
    """
    try:
        from . import _extension

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _extension.cpu_extension(required=False)
            if torch.cuda.is_available():
                _extension.cuda_extension(required=False)
    except Exception:  # noqa: BLE001 - a missing build only narrows the choice of impl
        pass
    if not _op_registered() and not os.environ.get("BLENS_FAST_NO_JIT"):
        try:
            _jit_build()
        except Exception:  # noqa: BLE001
            pass
    return _op_registered()


def _jit_build() -> None:
    from torch.utils.cpp_extension import load

    source = _REPO / "csrc" / "cpu" / "lowrank_cpu.cpp"
    if not source.is_file():
        return
    root = Path(os.environ.get("BLENS_FAST_CACHE", Path.home() / ".cache" / "blens_fast"))
    build_dir = root / f"torch-{torch.__version__.replace('+', '_')}" / "blens_fast_lowrank_cpu"
    build_dir.mkdir(parents=True, exist_ok=True)
    load(name="blens_fast_lowrank_cpu", sources=[str(source)], extra_cflags=["-O3"], is_python_module=False,
         build_directory=str(build_dir), verbose=False)


def build_cpu_extension_jit() -> bool:
    """Make sure the C++ op is available (JIT-building ``csrc/cpu/lowrank_cpu.cpp`` if needed); True if it is."""
    if _load_extensions():
        return True
    _jit_build()
    _load_extensions.cache_clear()
    return _load_extensions()


def has_cpu_op() -> bool:
    return _load_extensions() and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"blens_fast::{_OP_NAME}", "CPU")


def has_cuda_op() -> bool:
    return _load_extensions() and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"blens_fast::{_OP_NAME}", "CUDA")


def _triton_available(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


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


def resolve_impl(impl: str, device: torch.device) -> str:
    check_choice(impl, "impl", IMPLS)
    if impl != "auto":
        return impl
    if device.type == "cuda":
        return "cuda" if has_cuda_op() else "triton"
    return "cpu" if has_cpu_op() else "torch"


def sketch_update(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, right: torch.Tensor,
                  left_t: torch.Tensor, y: torch.Tensor, w: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Add the batch's sketches to ``y`` and ``w`` in place; return its per-example ``||A_e^T B_e||_F^2``."""
    check_sketch_args(a, b, offsets, right, left_t, y, w)
    impl = resolve_impl(impl, a.device)
    if impl == "torch":
        return sketch_update_reference(a, b, offsets, right, left_t, y, w, compute_dtype=torch.float32)
    if impl == "triton":
        if not _triton_available(a.device):
            raise ValueError("impl='triton' needs a CUDA device or TRITON_INTERPRET=1 (set before triton is imported)")
        from .triton.lowrank import sketch_update_triton

        return sketch_update_triton(a, b, offsets.to(a.device), right, left_t, y, w)
    if impl == "cpu":
        if a.device.type != "cpu":
            raise ValueError(f"impl='cpu' needs CPU tensors, got {a.device}")
        if not has_cpu_op():
            raise ValueError("impl='cpu' needs the compiled extension blens_fast._C (build with "
                             "`pip install --no-build-isolation -e .`), or call "
                             "blens_fast.ops.lowrank.build_cpu_extension_jit() once")
    if impl == "cuda":
        if a.device.type != "cuda":
            raise ValueError(f"impl='cuda' needs CUDA tensors, got {a.device}")
        if not has_cuda_op():
            raise ValueError("impl='cuda' needs the compiled extension blens_fast._C_cuda (built when setup.py "
                             "finds a CUDA torch)")
    return torch.ops.blens_fast.lowrank_sketch_update(a, b, offsets.to(a.device), right, left_t, y, w)
