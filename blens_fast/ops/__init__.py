"""Kernels that know nothing of models: one registry + ``auto`` policy per operation (:mod:`.registry`), the torch
references beside the fast paths, one extension loader."""
from .topk import TOPK, TopBottomK, TopK, available_impls, topk_bottomk_logits, topk_logits

__all__ = ["TOPK", "TopBottomK", "TopK", "available_impls", "topk_bottomk_logits", "topk_logits"]
