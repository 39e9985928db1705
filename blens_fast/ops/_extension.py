"""The one loader of the compiled kernels.

``blens_fast._C`` (C++, CPU: the fused projection and the low-rank sketch op) and ``blens_fast._C_cuda`` (CUDA) are
built by ``setup.py`` (``pip install --no-build-isolation -e .``). When ``_C`` was not built (a plain source
checkout) it is JIT-compiled once from every ``csrc/cpu/*.cpp`` with ``torch.utils.cpp_extension.load`` into the
package's cache folder (:func:`blens_fast._io.cache_folder`; a build folder holding links is refused) and reused
afterwards; ``BLENS_FAST_NO_JIT=1`` forbids that. The CUDA extension is never JIT-built. Importing an extension
also registers its ``torch.library`` ops.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from .build_flags import CPU_CXX_FLAGS, CPU_LINK_FLAGS

_LOADED: dict[str, object] = {}
_ERRORS: dict[str, str] = {}

_REPO = Path(__file__).resolve().parents[2]
#: every C++ source setup.py compiles into blens_fast._C
CPU_SOURCES = sorted((_REPO / "csrc" / "cpu").glob("*.cpp"))


def build_dir() -> Path:
    """The JIT build's folder in the cache, created: a ``ValueError`` when a symbolic link stands in it or on the way
    to it (the build would write, and load the module, through it)."""
    import torch

    from .._io import cache_folder, refuse_symlinks

    folder = cache_folder(f"torch-{torch.__version__.replace('+', '_')}", "blens_fast_C")
    refuse_symlinks(folder, "kernel build folder")
    return folder


def _jit_build_cpu():
    from torch.utils import cpp_extension

    if not CPU_SOURCES:
        raise RuntimeError(f"the C++ sources are missing ({_REPO / 'csrc' / 'cpu'}); reinstall with "
                           "`pip install --no-build-isolation -e .` from a source checkout")
    folder = build_dir()
    return cpp_extension.load(name="blens_fast_C", sources=[str(p) for p in CPU_SOURCES],
                              extra_cflags=CPU_CXX_FLAGS, extra_ldflags=CPU_LINK_FLAGS,
                              build_directory=str(folder), verbose=False)


def _load(kind: str) -> None:
    if kind in _LOADED or kind in _ERRORS:
        return
    if kind == "cpu":
        try:
            _LOADED["cpu"] = importlib.import_module("blens_fast._C")
        except ImportError:
            if os.environ.get("BLENS_FAST_NO_JIT"):
                _ERRORS["cpu"] = "blens_fast._C is not built and BLENS_FAST_NO_JIT is set"
                return
            try:
                _LOADED["cpu"] = _jit_build_cpu()
            except Exception as error:  # noqa: BLE001 - compiler or headers missing: report, fall back to torch
                _ERRORS["cpu"] = f"building the C++ extension failed ({type(error).__name__}: {error})"
        return
    import torch

    if not torch.cuda.is_available():
        _ERRORS["cuda"] = "no CUDA device is available"
        return
    _load("cpu")  # the CUDA kernels register into the op schema the C++ extension defines
    try:
        _LOADED["cuda"] = importlib.import_module("blens_fast._C_cuda")
    except ImportError as error:
        _ERRORS["cuda"] = (f"blens_fast._C_cuda is not built ({error}); build it with a CUDA torch and nvcc: "
                           "`pip install --no-build-isolation -e .`")


def unavailable(kind: str) -> str | None:
    """Why the ``kind`` extension (``"cpu"`` or ``"cuda"``) cannot be used here, or None when it can."""
    _load(kind)
    return _ERRORS.get(kind) if kind not in _LOADED else None


def extension(kind: str):
    """The loaded ``kind`` extension module; a ``RuntimeError`` saying why when it cannot be loaded."""
    reason = unavailable(kind)
    if reason:
        raise RuntimeError(f"the {kind} extension is unavailable: {reason}. Build it with "
                           "`pip install --no-build-isolation -e .`, or use impl='torch'")
    return _LOADED[kind]
