"""blens_fast: the Backward Lens (Katz et al., 2024), fast.

Capture the factors of MLP gradients in one forward + backward, do low-rank algebra on them, read them
through the model's own lens with a fused norm + unembedding + top-k that never writes N x V logits, edit
facts with no backward pass, and run it all over datasets.
"""
from .adapters import Adapter, Lens, get_adapter, register_adapter, supported_architectures
from .bulk import project_dataset, read_results
from .capture import Capture, Example, capture
from .edit import Edit, edit
from .evaluate import evaluate_counterfact
from .lens import LensReport, analyze, lens
from .lowrank import LowRankGradient
from .ops.topk import TopK, topk_logits
from .project import project
from .spectrum import rank
from .stats import GradientStats, gradient_stats

__version__ = "0.1.0"

__all__ = [
    "Adapter", "Capture", "Edit", "Example", "GradientStats", "Lens", "LensReport", "LowRankGradient", "TopK",
    "analyze", "capture", "edit", "evaluate_counterfact", "get_adapter", "gradient_stats", "lens", "project",
    "project_dataset", "rank", "read_results", "register_adapter", "supported_architectures", "topk_logits",
]
