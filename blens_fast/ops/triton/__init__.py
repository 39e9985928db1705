"""Triton kernels (GPU; on the CPU they run through ``TRITON_INTERPRET=1``, set before triton loads)."""
from .topk import triton_topk

__all__ = ["triton_topk"]
