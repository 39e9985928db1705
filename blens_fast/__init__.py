"""blens_fast: the Backward Lens (Katz et al., 2024), fast.

Capture the factors of MLP gradients in one forward + backward, do low-rank algebra on them, read them
through the model's own lens with a fused norm + unembedding + top-k that never writes N x V logits, edit
facts with no backward pass, and run it all over datasets.
"""
import importlib

from .adapters import Adapter, Lens, get_adapter, register_adapter, supported_architectures
from .capture import Capture, capture
from . import counterfact, integrations
from .context import ModelContext, bind, load_default_model, load_model
from .counterfact import evaluate_counterfact
from .editing import Edit, edit
from .lens import LensReport, analyze, lens
from .lowrank import LowRankGradient
from .ops.topk import TopBottomK, TopK, topk_bottomk_logits, topk_logits
from .project import project

__version__ = "0.2.0"

#: public names whose modules load pandas (and with it pyarrow) at import: imported on first use, so that
#: ``import blens_fast`` (and ``import blens_fast.ops``) stays free of them
_ON_FIRST_USE = {"project_dataset": "bulk", "read_results": "bulk", "ImprintShiftReport": "imprint",
                 "imprint_shift": "imprint", "rank": "spectrum", "GradientStats": "stats", "gradient_stats": "stats",
                 "TrainingLens": "training", "read_training_lens": "training", "training_lens": "training"}


def __getattr__(name: str):
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module 'blens_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_ON_FIRST_USE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ON_FIRST_USE))

__all__ = [
    "Adapter", "analyze", "bind", "Capture", "capture", "counterfact", "Edit", "edit", "evaluate_counterfact",
    "get_adapter", "gradient_stats", "GradientStats", "imprint_shift", "ImprintShiftReport", "integrations", "Lens",
    "lens", "LensReport", "load_default_model", "load_model", "LowRankGradient", "ModelContext", "project",
    "project_dataset", "rank", "read_results", "read_training_lens", "register_adapter", "supported_architectures",
    "TopBottomK", "TopK", "topk_bottomk_logits", "topk_logits", "training_lens", "TrainingLens",
]
