"""Kernels that know nothing of models: argument checks + ``impl`` dispatch, one module per operation."""
from .topk import TopK, available_impls, topk_logits

__all__ = ["TopK", "available_impls", "topk_logits"]
