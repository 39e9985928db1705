"""Gradients of linear layers kept as their factors: ``grad W = X^T Delta``, a ``d_in x d_out`` matrix.

A prompt of T tokens gives each linear layer a gradient of rank at most T; holding ``X`` (T x d_in, the layer's
forward inputs) and ``Delta`` (T x d_out, the VJPs at its output) costs T * (d_in + d_out) numbers instead of
d_in * d_out, and every question the Backward Lens asks of the gradient (rank, spectrum, norm, products) is
answered from them.

:class:`LowRankGradient` may carry leading batch dimensions (e.g. layers x examples): the factors are then
zero-padded to the longest example and ``lengths`` says how many rows each example owns. One set of methods serves
one gradient and a batch of them; on a batch they run as batched linear algebra (a few calls instead of one per
gradient, which is what the time goes to on a GPU).

A gradient is always in (in, out) terms, whatever layout the module stores its weight in:
:meth:`~blens_fast.context.ModelContext.grad_io` gives the ``.grad`` that :meth:`LowRankGradient.dense` equals.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# float64 bytes of one batch of padded factors in a batched SVD: cache-sized on a CPU, where a large fresh buffer
# costs page faults that outweigh the saved calls; large on a GPU, where each call costs launches and syncs
_BATCH_BYTES = {"cpu": 2 << 20}
_DEFAULT_BATCH_BYTES = 1 << 30


@dataclass(frozen=True)
class LowRankGradient:
    """``sum_i outer(x_i, delta_i)``, a ``d_in x d_out`` matrix, for one gradient or a batch of them.

    ``x``: ``(*batch, T, d_in)``; ``delta``: ``(*batch, T, d_out)``; ``lengths``: ``(*batch)`` token counts when the
    rows are padded (rows past a length are ignored), else None.
    Results of one gradient are scalars (``rank()`` an int, ``norm()`` a 0-d tensor); of a batch, tensors shaped
    like the batch.
    """

    x: torch.Tensor
    delta: torch.Tensor
    lengths: torch.Tensor | None = None

    def __post_init__(self):
        if self.x.dim() < 2 or self.x.dim() != self.delta.dim():
            raise ValueError(f"x and delta must be (..., T, d) with the same batch dimensions, got shapes "
                             f"{tuple(self.x.shape)} and {tuple(self.delta.shape)}")
        if self.x.shape[:-1] != self.delta.shape[:-1]:
            raise ValueError(f"x has shape {tuple(self.x.shape)} but delta has {tuple(self.delta.shape)}: one row per "
                             "token each, with the same batch dimensions")
        if self.lengths is not None and tuple(self.lengths.shape) != self.batch_shape:
            raise ValueError(f"lengths has shape {tuple(self.lengths.shape)}: expected the batch shape "
                             f"{self.batch_shape}")

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def stack(cls, grads: Sequence["LowRankGradient"]) -> "LowRankGradient":
        """One batch (a leading dimension) of single gradients of one module, their factors zero-padded."""
        grads = list(grads)
        if not grads:
            raise ValueError("stack needs at least one gradient")
        if any(g.batch_shape for g in grads):
            raise ValueError("stack takes single gradients, not batches")
        if len({g.shape for g in grads}) > 1:
            raise ValueError("gradients of different shapes: stack the gradients of one module at a time")
        sizes = [g.num_tokens for g in grads]
        rows = max(sizes)
        first = grads[0]
        x = first.x.new_zeros((len(grads), rows, first.d_in))
        delta = first.delta.new_zeros((len(grads), rows, first.d_out))
        for i, g in enumerate(grads):
            x[i, :g.num_tokens] = g.x
            delta[i, :g.num_tokens] = g.delta
        return cls(x, delta, torch.tensor(sizes, dtype=torch.long))

    # -- shape -------------------------------------------------------------------------------------
    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading batch dimensions (``()`` for one gradient)."""
        return tuple(self.x.shape[:-2])

    @property
    def d_in(self) -> int:
        """The weight's input width (the length of each ``x_i``)."""
        return self.x.shape[-1]

    @property
    def d_out(self) -> int:
        """The weight's output width (the length of each ``delta_i``)."""
        return self.delta.shape[-1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_in, d_out)``."""
        return (self.d_in, self.d_out)

    @property
    def num_tokens(self):
        """Rows per gradient: an int for one gradient, a ``(*batch)`` tensor for a batch."""
        if not self.batch_shape:
            return self.x.shape[-2] if self.lengths is None else int(self.lengths)
        if self.lengths is None:
            return torch.full(self.batch_shape, self.x.shape[-2], dtype=torch.long)
        return self.lengths

    @property
    def max_rank(self):
        """``min(tokens, d_in, d_out)``, the largest rank each gradient can have (int or tensor, as ``num_tokens``)."""
        tokens = self.num_tokens
        limit = min(self.d_in, self.d_out)
        return min(tokens, limit) if isinstance(tokens, int) else tokens.clamp_max(limit)

    def __getitem__(self, index) -> "LowRankGradient":
        """The gradients at ``index`` of the batch dimensions (one gradient: its own rows, no padding)."""
        if not self.batch_shape:
            raise IndexError("a single gradient has no batch dimensions to index")
        x, delta = self.x[index], self.delta[index]
        lengths = None if self.lengths is None else self.lengths[index]
        if x.dim() == 2 and lengths is not None:
            n = int(lengths)
            return LowRankGradient(x[:n], delta[:n])
        return LowRankGradient(x, delta, lengths)

    def _left_right(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, Delta)`` (``dense() == X^T @ Delta`` per gradient), padding rows zeroed."""
        a, b = self.x, self.delta
        if self.lengths is None:
            return a, b
        keep = torch.arange(a.shape[-2], device=a.device) < self.lengths.to(a.device)[..., None]
        return a * keep[..., None].to(a.dtype), b * keep[..., None].to(b.dtype)

    # -- algebra -----------------------------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        """The full ``d_in x d_out`` gradient matrix (equal to :meth:`~blens_fast.context.ModelContext.grad_io`, the
        module's ``.grad`` in (in, out) terms, for the same loss). Costs d_in * d_out each."""
        a, b = self._left_right()
        return a.transpose(-1, -2) @ b

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``dense() @ v`` without forming ``dense()``; ``v`` has ``shape[1]`` rows (a vector or a matrix)."""
        a, b = self._left_right()
        _check_rows(v, self.shape[1], "v", "shape[1]")
        return _chain(a.transpose(-1, -2), b, v)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """``dense().T @ u`` without forming ``dense()``; ``u`` has ``shape[0]`` rows."""
        a, b = self._left_right()
        _check_rows(u, self.shape[0], "u", "shape[0]")
        return _chain(b.transpose(-1, -2), a, u)

    def __add__(self, other: "LowRankGradient") -> "LowRankGradient":
        """Sum of two single gradients of the same module: the factors are stacked (ranks add at most)."""
        if not isinstance(other, LowRankGradient):
            return NotImplemented
        if other.shape != self.shape:
            raise ValueError(f"cannot add gradients of shape {self.shape} and {other.shape}")
        if self.batch_shape or other.batch_shape:
            raise ValueError("+ adds single gradients; index a batch first")
        (x1, d1), (x2, d2) = self._rows(), other._rows()
        return LowRankGradient(torch.cat([x1, x2]), torch.cat([d1, d2]))

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.num_tokens
        return self.x[:n], self.delta[:n]

    @functools.cached_property
    def _spectrum(self) -> torch.Tensor:
        """Every gradient's singular values, ``(*batch, min(T_max, d_in, d_out))`` float64 on the factors' device,
        zeros past each one's own count: the one SVD that :meth:`svdvals`, :meth:`norm`, :meth:`rank` and
        :meth:`ranks_and_norms` share, computed on first use. A gradient is frozen (its factors cannot be rebound),
        so the cache never describes other factors; changing the factor tensors in place is not supported."""
        return self._batched(_svdvals)

    def norm(self) -> torch.Tensor:
        """Frobenius norm, the root sum of squared singular values (the cached SVD), in float64: a 0-d tensor, or
        shaped like the batch."""
        return self._spectrum.square().sum(-1).sqrt()

    def svdvals(self) -> torch.Tensor:
        """Singular values, descending, in float64: all ``min(T, d_in, d_out)`` of one gradient; for a batch,
        ``(*batch, min(T_max, d_in, d_out))`` with zeros past each gradient's own count."""
        s = self._spectrum
        return s[: self.max_rank] if not self.batch_shape else s

    def svd(self, k: int | None = None):
        """Leading ``k`` singular triplets ``(U, S, Vh)`` with ``dense() ~= U @ diag(S) @ Vh`` (float64)."""
        a, b = self._left_right()
        qa, ra = torch.linalg.qr(a.double().transpose(-1, -2))
        qb, rb = torch.linalg.qr(b.double().transpose(-1, -2))
        u, s, vh = torch.linalg.svd(ra @ rb.transpose(-1, -2), full_matrices=False)
        k = s.shape[-1] if k is None else k
        if not 1 <= k <= s.shape[-1]:
            raise ValueError(f"k={k} is out of range: this gradient has {s.shape[-1]} singular values")
        return qa @ u[..., :k], s[..., :k], vh[..., :k, :] @ qb.transpose(-1, -2)

    def rank(self, tol: float | None = None, *, dtype: torch.dtype | None = None):
        """Numerical rank (an int for one gradient, a long tensor for a batch). Default tolerance as
        ``torch.linalg.matrix_rank``: ``sigma_max * max(shape) * eps`` with the eps of ``dtype`` (default: the
        factors' dtype; float32's for half precision: their products are exact in float64, and a bfloat16 eps would
        call every gradient rank 0)."""
        return self.ranks_and_norms(tol, dtype=dtype)[0]

    def ranks_and_norms(self, tol: float | None = None, *, dtype: torch.dtype | None = None):
        """``(rank, norm)`` from the cached SVD (the norm is the root sum of squared singular values): an int and a
        0-d float64 tensor for one gradient; for a batch a long and a float64 tensor on the CPU, one device sync."""
        eps = rank_eps(self.x.dtype if dtype is None else dtype)
        s = self._spectrum
        cut = s[..., :1] * (max(self.shape) * eps) if tol is None else torch.full_like(s[..., :1], tol)
        found = torch.stack([(s > cut).sum(-1).double(), self.norm()], -1).cpu()
        ranks, norms = found[..., 0].long(), found[..., 1]
        if not self.batch_shape:
            return int(ranks), norms
        return ranks, norms

    def _batched(self, compute) -> torch.Tensor:
        """``compute(A, B, kept)`` over the flattened batch (``A, B``: ``n x T x p`` float64, padding zeroed;
        ``kept``: each item's ``min(tokens, d_in, d_out)``), cut into chunks sized for the device; results reshaped to
        the batch shape."""
        a, b = self._left_right()
        batch = self.batch_shape
        items = math.prod(batch)
        a = a.reshape(items, *a.shape[-2:])
        b = b.reshape(items, *b.shape[-2:])
        kept = torch.as_tensor(self.max_rank, dtype=torch.long).reshape(-1).to(a.device)
        per_item = max(1, a.shape[-2] * (a.shape[-1] + b.shape[-1]) * 8)
        size = max(1, _BATCH_BYTES.get(a.device.type, _DEFAULT_BATCH_BYTES) // per_item)
        # an empty batch still runs once, on no items: its result has the per-item shape, with 0 items
        parts = [compute(a[i:i + size].double(), b[i:i + size].double(), kept[i:i + size])
                 for i in range(0, max(items, 1), size)]
        out = torch.cat(parts)
        return out.reshape(*batch, *out.shape[1:])

    def to(self, *args, **kwargs) -> "LowRankGradient":
        """The gradient with both factors moved or cast as ``torch.Tensor.to`` does."""
        return LowRankGradient(self.x.to(*args, **kwargs), self.delta.to(*args, **kwargs), self.lengths)

    def __repr__(self) -> str:
        batch = f"batch={self.batch_shape}, " if self.batch_shape else ""
        return f"LowRankGradient({batch}shape={self.shape}, tokens={self.x.shape[-2]}, dtype={self.x.dtype})"


def _svdvals(a: torch.Tensor, b: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Singular values of ``A_i^T B_i`` for a batch of float64 factors: thin R factors of ``A^T`` and ``B^T``
    (``A^T B = Qa (Ra Rb^T) Qb^T``), then the SVD of the small core; values past ``kept[i]`` (where only padding
    rows are left) set to exactly zero."""
    ra = torch.linalg.qr(a.transpose(1, 2), mode="r")[1]
    rb = torch.linalg.qr(b.transpose(1, 2), mode="r")[1]
    s = torch.linalg.svdvals(ra @ rb.transpose(1, 2))
    return s * (torch.arange(s.shape[1], device=s.device) < kept[:, None])


def rank_eps(dtype: torch.dtype) -> float:
    """The eps of ``torch.linalg.matrix_rank``'s default tolerance: float64's for float64, float32's otherwise."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _chain(outer: torch.Tensor, inner: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``outer @ (inner @ v)`` per gradient; a vector ``v`` is a one-column matrix (a batch's matmul would take
    ``inner @ v``, one vector per gradient, for a matrix)."""
    if v.dim() == 1:
        return (outer @ (inner @ v.unsqueeze(-1))).squeeze(-1)
    return outer @ (inner @ v)


def _check_rows(v: torch.Tensor, expected: int, name: str, what: str) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() not in (1, 2) or v.shape[0] != expected:
        raise ValueError(f"{name} has shape {tuple(v.shape)}: expected {expected} rows ({what} of the gradient)")
