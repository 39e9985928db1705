"""Loading the compiled kernels.

``blens_fast._C`` (C++, CPU) and ``blens_fast._C_cuda`` (CUDA) are built by ``setup.py``
(``pip install --no-build-isolation -e .``). When the CPU extension was not built (a plain source
checkout), :func:`cpu_extension` JIT-compiles ``csrc/cpu/topk_cpu.cpp`` once with
``torch.utils.cpp_extension.load`` into a cache directory (``$BLENS_FAST_CACHE`` or
``~/.cache/blens_fast``) and reuses it afterwards. The CUDA extension is never JIT-built here.
"""
from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

_CACHE: dict[str, object] = {}
_ERRORS: dict[str, str] = {}

_REPO = Path(__file__).resolve().parents[2]
# every C++ source setup.py compiles into blens_fast._C (the top-k kernel defines the Python module)
CPU_SOURCES = sorted((_REPO / "csrc" / "cpu").glob("*.cpp")) or [_REPO / "csrc" / "cpu" / "topk_cpu.cpp"]


def cache_dir() -> Path:
    import torch

    root = Path(os.environ.get("BLENS_FAST_CACHE", Path.home() / ".cache" / "blens_fast"))
    return root / f"torch-{torch.__version__.replace('+', '_')}"


def _jit_build_cpu():
    from torch.utils import cpp_extension

    missing = [str(p) for p in CPU_SOURCES if not p.exists()]
    if missing:
        raise RuntimeError(f"blens_fast._C is not built and its sources are missing ({', '.join(missing)}); "
                           "reinstall with `pip install --no-build-isolation -e .` from a source checkout")
    build = cache_dir() / "blens_fast_C"
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name="blens_fast_C", sources=[str(p) for p in CPU_SOURCES],
                              extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                              build_directory=str(build), verbose=False)


def cpu_extension(required: bool = True):
    """The C++ CPU extension, JIT-built if needed; ``None`` (with one warning) when unavailable and not ``required``."""
    if "cpu" not in _CACHE and "cpu" not in _ERRORS:
        try:
            _CACHE["cpu"] = importlib.import_module("blens_fast._C")
        except ImportError:
            if os.environ.get("BLENS_FAST_NO_JIT"):
                _ERRORS["cpu"] = "blens_fast._C is not built and BLENS_FAST_NO_JIT is set"
            else:
                try:
                    _CACHE["cpu"] = _jit_build_cpu()
                except Exception as exc:  # compiler missing, headers missing, ...
                    _ERRORS["cpu"] = f"building the C++ extension failed: {type(exc).__name__}: {exc}"
                    if not required:
                        warnings.warn(f"blens_fast: {_ERRORS['cpu']}; using the torch implementation", stacklevel=3)
    if "cpu" in _CACHE:
        return _CACHE["cpu"]
    if required:
        raise RuntimeError(f"impl='cpu' is unavailable: {_ERRORS['cpu']}. Build it with "
                           "`pip install --no-build-isolation -e .` (needs a C++ compiler), or use impl='torch'")
    return None


def cuda_extension(required: bool = True):
    """The CUDA extension built by setup.py; ``None`` when absent (or no GPU) and not ``required``."""
    import torch

    if "cuda" not in _CACHE and "cuda" not in _ERRORS:
        if not torch.cuda.is_available():
            _ERRORS["cuda"] = "no CUDA device is available"
        else:
            try:
                _CACHE["cuda"] = importlib.import_module("blens_fast._C_cuda")
            except ImportError as exc:
                _ERRORS["cuda"] = (f"blens_fast._C_cuda is not built ({exc}); build with a CUDA torch and nvcc: "
                                   "`pip install --no-build-isolation -e .`")
    if "cuda" in _CACHE:
        return _CACHE["cuda"]
    if required:
        raise RuntimeError(f"impl='cuda' is unavailable: {_ERRORS['cuda']}")
    return None
