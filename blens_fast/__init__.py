"""blens_fast: the Backward Lens (Katz et al., 2024), fast.

Capture the factors of MLP gradients in one forward + backward, do low-rank algebra on them, and read
them through the model's own lens with a fused norm + unembedding + top-k that never writes N x V logits.
"""
from .adapters import Adapter, Lens, get_adapter, register_adapter, supported_architectures
from .capture import Capture, Example, capture
from .lowrank import LowRankGradient
from .spectrum import rank

__version__ = "0.1.0"

__all__ = [
    "Adapter", "Capture", "Example", "Lens", "LowRankGradient", "capture", "get_adapter", "rank",
    "register_adapter", "supported_architectures",
]
