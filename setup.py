"""blens_fast: build the package and its kernels.

Always builds the C++ CPU extension ``blens_fast._C`` (csrc/cpu/*.cpp). Builds the CUDA extension
``blens_fast._C_cuda`` (csrc/cuda/*.cu + the torch binding .cpp) only when the installed torch is a
CUDA build and nvcc is found (CUDA_HOME); set BLENS_FAST_NO_CUDA=1 to skip it. Install with
``pip install --no-build-isolation -e .`` (build isolation would fetch a different torch).
"""
import glob
import os
import re
import runpy

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# the one definition of the compiler flags, shared with the JIT build (blens_fast/ops/_extension.py)
FLAGS = runpy.run_path(os.path.join(ROOT, "blens_fast", "ops", "build_flags.py"))


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - needs torch at build time
        raise RuntimeError("blens_fast needs torch installed before building: "
                           "pip install torch, then pip install --no-build-isolation -e .") from exc
    exts = [CppExtension("blens_fast._C", sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
                         extra_compile_args={"cxx": FLAGS["CPU_CXX_FLAGS"]}, extra_link_args=FLAGS["CPU_LINK_FLAGS"])]
    if torch.version.cuda and CUDA_HOME is not None and not os.environ.get("BLENS_FAST_NO_CUDA"):
        sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) +
                         glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        exts.append(CUDAExtension("blens_fast._C_cuda", sources,
                                  extra_compile_args={"cxx": FLAGS["CUDA_CXX_FLAGS"], "nvcc": FLAGS["NVCC_FLAGS"]}))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
VERSION = re.search(r'__version__ = "([^"]+)"', open(os.path.join(ROOT, "blens_fast", "__init__.py")).read())[1]

setup(
    name="blens_fast",
    version=VERSION,
    description="The Backward Lens (Katz et al., 2024), fast: gradients as low-rank factors, fused vocabulary lens",
    packages=find_packages(include=["blens_fast", "blens_fast.*"]),
    package_data={"blens_fast": ["default_model/*.json", "default_model/*.safetensors", "default_model/tokenizer/*",
                                 "data/counterfact/*", "ops/tables/*.json", "*.md"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.3",
        "transformers",
        "safetensors",
        "pandas",
        "pyarrow",
        "matplotlib",
        "tqdm",
        "numpy",
        # Triton kernels (GPU; CPU tests use TRITON_INTERPRET=1); wheels exist for Linux x86_64 only
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["blens = blens_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
