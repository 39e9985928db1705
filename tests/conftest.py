"""Shared fixtures: tiny randomly initialised configs of every supported architecture."""
import os

import torch

# Triton kernels run through the interpreter where no GPU is present; this must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
