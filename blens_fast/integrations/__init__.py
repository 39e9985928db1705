"""Integrations of the training lens with training frameworks: :class:`BackwardLensCallback` for the ``transformers``
``Trainer`` (imported on first use, so ``import blens_fast`` does not import ``transformers.Trainer``)."""
from __future__ import annotations

__all__ = ["BackwardLensCallback"]


def __getattr__(name):
    if name == "BackwardLensCallback":
        from .transformers import BackwardLensCallback

        return BackwardLensCallback
    raise AttributeError(f"module 'blens_fast.integrations' has no attribute {name!r}")
