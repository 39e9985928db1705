"""blens_fast: the Backward Lens (Katz et al., 2024), fast.

Capture the factors of MLP gradients in one forward + backward, do low-rank algebra on them, read them
through the model's own lens with a fused norm + unembedding + top-k that never writes N x V logits, edit
facts with no backward pass, and run it all over datasets.
"""
from .adapters import Adapter, Lens, get_adapter, register_adapter, supported_architectures
from .bulk import project_dataset, read_results
from .capture import Capture, capture
from . import counterfact, integrations
from .context import ModelContext, bind, load_default_model, load_model
from .counterfact import evaluate_counterfact
from .editing import Edit, edit
from .imprint import ImprintShiftReport, imprint_shift
from .lens import LensReport, analyze, lens
from .lowrank import LowRankGradient
from .ops.topk import TopBottomK, TopK, topk_bottomk_logits, topk_logits
from .project import project
from .spectrum import rank
from .stats import GradientStats, gradient_stats
from .training import TrainingLens, read_training_lens, training_lens

__version__ = "0.2.0"

__all__ = [
    "Adapter", "Capture", "Edit", "GradientStats", "ImprintShiftReport", "Lens", "LensReport", "LowRankGradient", "ModelContext", "TopBottomK",
    "TopK", "analyze", "bind", "capture", "counterfact", "edit", "evaluate_counterfact", "get_adapter", "gradient_stats", "imprint_shift", "integrations", "lens", "load_default_model",
    "load_model", "project", "project_dataset", "rank", "read_results", "read_training_lens", "register_adapter", "supported_architectures", "topk_bottomk_logits",
    "topk_logits", "TrainingLens", "training_lens",
]
