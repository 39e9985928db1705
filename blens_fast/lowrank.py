"""Gradients of linear layers kept as their factors: ``grad W = X^T Delta`` (in ``[in, out]`` terms).

A prompt of T tokens gives each linear layer a gradient of rank at most T; holding ``X`` (T x d_in,
the layer's forward inputs) and ``Delta`` (T x d_out, the VJPs at its output) costs T * (d_in + d_out)
numbers instead of d_in * d_out, and every question the Backward Lens asks of the gradient
(rank, spectrum, norm, products) is answered from them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapters import Layout


@dataclass(frozen=True)
class LowRankGradient:
    """``sum_i outer(x_i, delta_i)`` in the module weight's own layout.

    ``x``: ``T x d_in``; ``delta``: ``T x d_out``; ``layout``: ``"in_out"`` when the weight is stored
    ``[d_in, d_out]`` (GPT-2 ``Conv1D``), ``"out_in"`` for ``nn.Linear`` (``[d_out, d_in]``).
    """

    x: torch.Tensor
    delta: torch.Tensor
    layout: Layout = "out_in"

    def __post_init__(self):
        if self.x.dim() != 2 or self.delta.dim() != 2:
            raise ValueError(f"x and delta must be 2-D, got shapes {tuple(self.x.shape)} and {tuple(self.delta.shape)}")
        if self.x.shape[0] != self.delta.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} rows but delta has {self.delta.shape[0]}: one row per token each")
        if self.layout not in ("in_out", "out_in"):
            raise ValueError(f"layout={self.layout!r}: expected 'in_out' or 'out_in'")

    # -- shape -------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.x.shape[1]

    @property
    def d_out(self) -> int:
        return self.delta.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """The module weight's own shape."""
        return (self.d_in, self.d_out) if self.layout == "in_out" else (self.d_out, self.d_in)

    @property
    def _left_right(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``dense() == A.T @ B``."""
        return (self.x, self.delta) if self.layout == "in_out" else (self.delta, self.x)

    # -- algebra -----------------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        """The full gradient matrix (equal to ``module.weight.grad`` for the same loss). Costs d_in * d_out."""
        a, b = self._left_right
        return a.transpose(0, 1) @ b

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``dense() @ v`` without forming ``dense()``; ``v`` has ``shape[1]`` rows (a vector or a matrix)."""
        a, b = self._left_right
        _check_rows(v, b.shape[1], "v", "shape[1]")
        return a.transpose(0, 1) @ (b @ v)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """``dense().T @ u`` without forming ``dense()``; ``u`` has ``shape[0]`` rows."""
        a, b = self._left_right
        _check_rows(u, a.shape[1], "u", "shape[0]")
        return b.transpose(0, 1) @ (a @ u)

    def __add__(self, other: "LowRankGradient") -> "LowRankGradient":
        """Sum of two gradients of the same module: the factors are stacked (ranks add at most)."""
        if not isinstance(other, LowRankGradient):
            return NotImplemented
        if other.shape != self.shape or other.layout != self.layout:
            raise ValueError(f"cannot add gradients of shape {self.shape} ({self.layout}) and {other.shape} ({other.layout})")
        return LowRankGradient(torch.cat([self.x, other.x]), torch.cat([self.delta, other.delta]), self.layout)

    def norm(self) -> torch.Tensor:
        """Frobenius norm from the factors: ``||X^T D||_F^2 = sum((X X^T) * (D D^T))`` (float64)."""
        x, d = self.x.double(), self.delta.double()
        return ((x @ x.T) * (d @ d.T)).sum().clamp_min(0).sqrt()

    def _core(self):
        """Thin QRs ``A^T = Qa Ra``, ``B^T = Qb Rb`` so that ``dense() = Qa (Ra Rb^T) Qb^T``; all in float64."""
        a, b = self._left_right
        qa, ra = torch.linalg.qr(a.double().T)
        qb, rb = torch.linalg.qr(b.double().T)
        return qa, ra @ rb.T, qb

    def svdvals(self) -> torch.Tensor:
        """All ``min(T, d_in, d_out)`` singular values, descending, in float64."""
        if self.num_tokens == 0:
            return torch.zeros(0, dtype=torch.float64, device=self.x.device)
        return torch.linalg.svdvals(self._core()[1])

    def svd(self, k: int | None = None):
        """Leading ``k`` singular triplets ``(U, S, Vh)`` with ``dense() ~= U @ diag(S) @ Vh`` (float64)."""
        qa, core, qb = self._core()
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        k = s.shape[0] if k is None else k
        if not 1 <= k <= s.shape[0]:
            raise ValueError(f"k={k} is out of range: this gradient has {s.shape[0]} singular values")
        return qa @ u[:, :k], s[:k], vh[:k] @ qb.T

    def rank(self, tol: float | None = None) -> int:
        """Numerical rank. Default tolerance as ``torch.linalg.matrix_rank``: ``sigma_max * max(shape) * eps``
        of the factors' dtype (float32's for half-precision factors: their products are exact in float64, and
        a bfloat16 eps would call every gradient rank 0)."""
        return numerical_rank(self.svdvals(), self.shape, self.x.dtype, tol)

    def to(self, *args, **kwargs) -> "LowRankGradient":
        return LowRankGradient(self.x.to(*args, **kwargs), self.delta.to(*args, **kwargs), self.layout)

    def __repr__(self) -> str:
        return (f"LowRankGradient(shape={self.shape}, layout={self.layout!r}, tokens={self.num_tokens}, "
                f"dtype={self.x.dtype})")


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, tol: float | None = None) -> int:
    """How many singular values ``s`` (descending) exceed ``tol``, by default ``s[0] * max(shape) * eps`` with the
    eps of ``dtype`` (float32's for anything but float64), ``torch.linalg.matrix_rank``'s rule."""
    if s.numel() == 0:
        return 0
    if tol is None:
        tol = s[0].item() * max(shape) * _rank_eps(dtype)
    return int((s > tol).sum().item())


def _rank_eps(dtype: torch.dtype) -> float:
    """The eps of ``torch.linalg.matrix_rank``'s default tolerance: float64's for float64, float32's otherwise."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def spectra(grads: Sequence[LowRankGradient]) -> list[torch.Tensor]:
    """``[g.svdvals() for g in grads]`` for gradients of one shape and layout (one module, any layers), computed
    together: the factors are zero-padded to the longest, then two batched thin QRs and one batched SVD of the
    small cores (padding rows only add zero singular values, which are dropped again). Far fewer calls than one
    per gradient, which is what the time goes to on a GPU."""
    grads = _same_module(grads)
    if not grads:
        return []
    s, kept = _batched_svdvals(grads)
    return [s[i, :n] for i, n in enumerate(kept)]


def ranks_and_norms(grads: Sequence[LowRankGradient], tol: float | None = None, *,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[g.rank(tol) for g in grads]`` (long) and ``[g.norm() for g in grads]`` (float64), as two tensors on the
    CPU, for gradients of one shape and layout: one batched SVD like :func:`spectra` (the Frobenius norm is the
    root sum of squares of the singular values) and one device sync in all. ``dtype`` is the one whose eps sets
    the default tolerance (default: the factors' dtype, as :meth:`LowRankGradient.rank`)."""
    grads = _same_module(grads)
    if not grads:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    eps = _rank_eps(grads[0].x.dtype if dtype is None else dtype)
    parts = []
    for chunk in _chunks(grads):
        s, kept = _batched_svdvals(chunk)
        s = s * (torch.arange(s.shape[1], device=s.device) < torch.tensor(kept, device=s.device)[:, None])
        cut = s[:, :1] * (max(chunk[0].shape) * eps) if tol is None else torch.full_like(s[:, :1], tol)
        parts.append(torch.stack([(s > cut).sum(1).double(), s.square().sum(1).sqrt()]))
    both = torch.cat(parts, 1).cpu()
    return both[0].long(), both[1]


# float64 bytes of one batch's padded factors: cache-sized on a CPU, where a large fresh buffer costs page faults
# that outweigh the saved calls; large on a GPU, where each call costs launches and syncs
_BATCH_BYTES = {"cpu": 2 << 20, "cuda": 1 << 30}


def _chunks(grads: list[LowRankGradient]) -> list[list[LowRankGradient]]:
    a, b = grads[0]._left_right
    per_grad = max(g.num_tokens for g in grads) * (a.shape[1] + b.shape[1]) * 8
    size = max(1, _BATCH_BYTES.get(a.device.type, 1 << 30) // max(per_grad, 1))
    return [grads[i:i + size] for i in range(0, len(grads), size)]


def norms(grads: Sequence[LowRankGradient]) -> torch.Tensor:
    """``[g.norm() for g in grads]`` (float64, one tensor) for gradients of one module, computed together."""
    grads = _same_module(grads)
    if not grads:
        return torch.zeros(0, dtype=torch.float64)
    a, b, _ = _padded_factors(grads)
    gram = (a @ a.transpose(1, 2)) * (b @ b.transpose(1, 2))
    return gram.sum((1, 2)).clamp_min(0).sqrt()


def _same_module(grads) -> list[LowRankGradient]:
    grads = list(grads)
    if len({(g.shape, g.layout) for g in grads}) > 1:
        raise ValueError("gradients of different shapes or layouts: pass the gradients of one module at a time")
    return grads


def _batched_svdvals(grads: list[LowRankGradient]) -> tuple[torch.Tensor, list[int]]:
    """Singular values of every gradient as one zero-padded batch, and how many of each row are its own."""
    a, b, sizes = _padded_factors(grads)
    _, ra = torch.linalg.qr(a.transpose(1, 2), mode="r")
    _, rb = torch.linalg.qr(b.transpose(1, 2), mode="r")
    return torch.linalg.svdvals(ra @ rb.transpose(1, 2)), [min(t, *g.shape) for t, g in zip(sizes, grads)]


def _padded_factors(grads: list[LowRankGradient]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The ``(A, B)`` factors (``dense() = A.T @ B``) of every gradient as float64 batches padded with zero rows."""
    sizes = [g.num_tokens for g in grads]
    rows = max(max(sizes), 1)
    first_a, first_b = grads[0]._left_right
    a = first_a.new_zeros((len(grads), rows, first_a.shape[1]), dtype=torch.float64)
    b = first_b.new_zeros((len(grads), rows, first_b.shape[1]), dtype=torch.float64)
    for i, g in enumerate(grads):
        ga, gb = g._left_right
        a[i, :ga.shape[0]] = ga
        b[i, :gb.shape[0]] = gb
    return a, b, sizes


def _check_rows(v: torch.Tensor, expected: int, name: str, what: str) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() not in (1, 2) or v.shape[0] != expected:
        raise ValueError(f"{name} has shape {tuple(v.shape)}: expected {expected} rows ({what} of the gradient)")
