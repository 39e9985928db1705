"""The compiler flags of the compiled kernels, in one place: ``setup.py`` reads this file (by path, without importing
the package) and so does the JIT build of :mod:`blens_fast.ops._extension`. Plain constants only.

Portable flags only (no ``-march=native``: the SIMD paths are chosen at run time in the sources).
``-ffp-contract=off``: the compiler never fuses ``a * b + c`` on its own, so the C++ kernel's vector and scalar code
compute the same bits (the kernel writes its fused multiply-adds explicitly; see csrc/cpu/topk_kernel.cpp).
"""

#: C++ flags of the CPU extension ``blens_fast._C`` (the C++ standard is torch's own default)
CPU_CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
#: linker flags of the CPU extension
CPU_LINK_FLAGS = ["-fopenmp"]
#: host C++ flags of the CUDA extension ``blens_fast._C_cuda``
CUDA_CXX_FLAGS = ["-O3"]
#: nvcc flags of the CUDA extension: sm_80 and sm_90 images
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
              "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
