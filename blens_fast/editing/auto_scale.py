"""``scale="auto"``: the smallest shift at the last layer that gives the target a wanted logit lead, found from one
forward pass.

At the last layer a shift ``c * e`` of the residual stream entering the final norm changes nothing else, so the
last position's logits after the edit are an exact function of ``c`` (:class:`LogitCurve`); a grid and a bisection
on V-vectors find the smallest ``c`` with the wanted lead, with no extra forward pass.
"""
from __future__ import annotations

import math

import torch

from ..context import ModelContext

#: the smallest logit lead scale="auto" aims for (margin=0 means: just the argmax, by this much)
MIN_LEAD = 1e-3
#: the largest shift scale="auto" tries, in units of |pre-norm residual| / |target embedding|
MAX_SHIFT = 10.0


class LogitCurve:
    """Exact logits of pre-norm residuals ``P`` (N x d) shifted along one direction ``e``: ``P + c * e``.

    With ``x = P + c e`` the final norm gives ``g * centre(x) / sigma(c) + beta`` (no centring for RMSNorm, no norm
    at all when the lens has none), so the logits are ``(A + c B) / sigma(c) + const`` with ``A = W (g * centre(P))``,
    ``B = W (g * centre(e))``, ``const = W beta + b`` and ``sigma(c)^2`` a quadratic in ``c``: after two unembedding
    products, any shift costs O(V) per row. Used for ``scale="auto"`` and the exact last-layer sweeps of the
    CounterFact harness.
    """

    @torch.no_grad()
    def __init__(self, ctx: ModelContext, pre: torch.Tensor, e: torch.Tensor):
        lens = ctx.lens
        w = lens.weight.float()
        self.kind = lens.norm_kind
        pre, e = pre.float(), e.float()
        if self.kind == "layernorm":
            pre = pre - pre.mean(-1, keepdim=True)
            e = e - e.mean()
        g = lens.norm_weight.float() if lens.norm_weight is not None else torch.ones_like(e)
        ab = torch.cat([pre * g, (e * g)[None]]) @ w.T
        self.a, self.b = ab[:-1], ab[-1]
        const = torch.zeros(w.shape[0], device=w.device)
        if lens.norm_bias is not None:
            const = const + w @ lens.norm_bias.float()
        if lens.bias is not None:
            const = const + lens.bias.float()
        self.const = const
        self.hh = (pre * pre).mean(-1)
        self.hx = (pre * e).mean(-1)
        self.he = (e * e).mean()
        self.eps = lens.eps if self.kind is not None else 0.0
        self.unit = pre.norm(dim=-1) / e.norm().clamp_min(1e-12)

    def sigma(self, rows: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The final norm's divisor of rows ``rows`` shifted by ``c`` (1 without a norm)."""
        if self.kind is None:
            return torch.ones_like(c)
        return (self.hh[rows] + 2 * c * self.hx[rows] + c * c * self.he + self.eps).sqrt()

    def _columns(self, rows, c, columns=None) -> torch.Tensor:
        """Logits (``len(c) x len(columns)``, all columns by default) of ``rows`` shifted by ``c``."""
        a, b, const = (self.a[rows], self.b, self.const) if columns is None else (
            self.a[rows][:, columns], self.b[columns], self.const[columns])
        return (a + c[:, None] * b[None]) / self.sigma(rows, c)[:, None] + const[None]

    @torch.no_grad()
    def logits(self, c: torch.Tensor, rows=None) -> torch.Tensor:
        """Logits (``len(c) x V``) of rows ``rows`` (default: all, in order) shifted by ``c`` (one per row)."""
        rows = torch.arange(len(self.a), device=self.a.device) if rows is None else rows
        return self._columns(rows, c.to(self.a.dtype))

    def _leads(self, row: int, shifts: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """The lead of ``columns[0]`` over the other ``columns``, for each shift of row ``row``."""
        z = self._columns(torch.full((len(shifts),), row, device=self.a.device), shifts, columns)
        return z[:, 0] - z[:, 1:].max(-1).values

    def _all_columns(self, token: int) -> torch.Tensor:
        """The target first, then every other token."""
        others = torch.arange(self.a.shape[1], device=self.a.device)
        return torch.cat([torch.tensor([token], device=self.a.device), others[others != token]])

    def lead(self, row: int, token: int, c: torch.Tensor) -> torch.Tensor:
        """The target's logit minus the best other logit, for each shift in ``c`` (row ``row``)."""
        return self._leads(row, c.to(self.a.dtype), self._all_columns(token))

    def smallest_shift(self, row: int, token: int, margin: float, **kwargs) -> float:
        """The smallest ``c >= 0`` giving ``token`` a lead >= ``margin`` (see :meth:`smallest_shifts`)."""
        return self.smallest_shifts(row, token, [margin], **kwargs)[0]

    @torch.no_grad()
    def smallest_shifts(self, row: int, token: int, margins, *, grid: int = 41, iters: int = 24,
                        candidates: int = 64, cap: float = MAX_SHIFT) -> list[float]:
        """Per margin, the smallest ``c >= 0`` giving ``token`` a logit lead >= ``margin`` over every other token (0 if
        it already has it): a geometric grid from 1e-3 to ``cap`` times ``|P|/|e|`` (:data:`MAX_SHIFT`), then
        bisection inside the bracketing grid step against the ``candidates`` strongest rivals, then a check of the
        result against the whole vocabulary (a bisection over the whole vocabulary if it fails). When no shift up
        to the cap reaches the margin: the smallest one that makes the target the argmax, and when none does, 0 (no
        edit: a larger push would only damage the model). Margins are at least :data:`MIN_LEAD`, so that rounding
        in the edited forward pass cannot undo a tie break."""
        device = self.a.device
        margins = [max(float(m), MIN_LEAD) for m in margins]
        shifts = torch.cat([torch.zeros(1, device=device),
                            self.unit[row] * torch.logspace(-3, math.log10(cap), grid, device=device)])
        everything = self._all_columns(token)
        z0 = self.logits(torch.zeros(1, device=device), torch.full((1,), row, device=device))[0]
        rivals = torch.cat([z0.topk(4 * candidates).indices, self.b.topk(4 * candidates).indices]).unique()
        restricted = torch.cat([torch.tensor([token], device=device), rivals[rivals != token]])
        # the restricted lead is never below the full lead: a restricted answer that passes the full check is exact
        found = self._search(row, restricted, everything, shifts, margins, iters, candidates)
        if found is None:
            found = self._search(row, everything, everything, shifts, margins, iters, candidates)
        return found

    def _search(self, row, columns, everything, shifts, margins, iters, candidates) -> list[float] | None:
        """Grid then bisection over ``columns`` (``everything``, or a restricted set of rivals); every result is
        checked against ``everything``. None when a restricted search cannot answer (the caller then searches
        everything)."""
        restricted = columns is not everything
        leads = self._leads(row, shifts, columns)
        device = self.a.device
        out = []
        for margin in margins:
            ok = (leads >= margin).nonzero().flatten()
            if len(ok) == 0 and not restricted:  # nothing reaches the margin: settle for the argmax
                margin = MIN_LEAD
                ok = (leads >= margin).nonzero().flatten()
            if len(ok) == 0:
                if restricted:
                    return None
                out.append(0.0)
                continue
            j = int(ok[0])
            hi = 0.0
            if j > 0:
                cols = columns
                if not restricted:  # bisect against the rivals strongest at the bracket's ends first
                    ends = self._columns(torch.full((2,), row, device=device), shifts[j - 1:j + 1])
                    strongest = ends.topk(candidates, dim=-1).indices.flatten().unique()
                    cols = torch.cat([columns[:1], strongest[strongest != columns[0]]])
                hi = self._bisect(row, cols, margin, float(shifts[j - 1]), float(shifts[j]), iters)
            if self._leads(row, torch.tensor([hi], device=device), everything).item() < margin:
                if restricted:
                    return None
                hi = self._bisect(row, everything, margin, float(shifts[j - 1]), float(shifts[j]), iters)
            out.append(hi)
        return out

    def _bisect(self, row, columns, margin, lo, hi, iters) -> float:
        """The upper end of a bisection of the lead of ``columns[0]`` over the other ``columns`` on ``[lo, hi]``."""
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if self._leads(row, torch.tensor([mid], device=self.a.device), columns).item() >= margin:
                hi = mid
            else:
                lo = mid
        return hi


def auto_shifts(ctx: ModelContext, pre: torch.Tensor, embed: torch.Tensor, tokens: torch.Tensor, margin: float
                ) -> torch.Tensor:
    """Per fact, the smallest shift along its target embedding added to its pre-norm residual that gives the target a
    logit lead >= ``margin`` over every other token (0 when it already has it)."""
    out = torch.zeros(pre.shape[0], device=pre.device)
    for i in range(pre.shape[0]):
        curve = LogitCurve(ctx, pre[i:i + 1], embed[i])
        out[i] = curve.smallest_shift(0, int(tokens[i]), margin)
    return out
