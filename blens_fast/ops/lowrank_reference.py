"""Pure-PyTorch references for the fused low-rank accumulation (``blens_fast.ops.lowrank``).

Every fast path (C++ CPU, Triton, CUDA) is tested against these. The operation, for a batch of
examples whose factors are concatenated row-wise (``offsets`` marks where each example starts):

* per example ``e`` with rows ``s:t``: ``norms_sq[e] = ||A_e^T B_e||_F^2 = sum((A_e A_e^T) * (B_e B_e^T))``
  (the squared Frobenius norm of its gradient, from the factors alone);
* for the whole batch, in place: ``y += A^T (B right)`` and ``w += (A left_t)^T B``: a right sketch
  ``G right`` and a left sketch ``left_t^T G`` of the summed gradient ``G = A^T B`` (``p x q``),
  never forming ``G``.

``A`` is ``N x p`` and ``B`` is ``N x q``; ``right`` is ``q x s1``, ``left_t`` is ``p x s2``, ``y`` is
``p x s1`` and ``w`` is ``s2 x q``.
"""
from __future__ import annotations

import torch


def gram_norms_sq_reference(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``||A_e^T B_e||_F^2`` per example from the Gram matrices, in float64."""
    bounds = offsets.tolist()
    out = torch.zeros(len(bounds) - 1, dtype=torch.float64, device=a.device)
    for e, (s, t) in enumerate(zip(bounds[:-1], bounds[1:])):
        if t > s:
            ae, be = a[s:t].double(), b[s:t].double()
            out[e] = ((ae @ ae.T) * (be @ be.T)).sum()
    return out.clamp_min(0)


def sketch_update_reference(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, right: torch.Tensor,
                            left_t: torch.Tensor, y: torch.Tensor, w: torch.Tensor, *,
                            compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Update ``y`` and ``w`` in place and return the per-example ``norms_sq`` (float64).

    The sketch products are computed in ``compute_dtype`` (float64 by default: the ground truth the
    kernels are held to) and added to the accumulators in their own dtype.
    """
    ac, bc = a.to(compute_dtype), b.to(compute_dtype)
    y.add_((ac.T @ (bc @ right.to(compute_dtype))).to(y.dtype))
    w.add_(((ac @ left_t.to(compute_dtype)).T @ bc).to(w.dtype))
    return gram_norms_sq_reference(a, b, offsets)


def dense_sum_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The dense summed gradient ``A^T B`` (``p x q``) in float64; only for tests on small shapes."""
    return a.double().T @ b.double()
