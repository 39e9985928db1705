"""The Backward Lens written plainly in PyTorch, one prompt at a time: the oracle of the tests and of ``blens bench``.

Everything here is what one writes without blens_fast: the prompt and target tokenized with the tokenizer's own
call, an ordinary ``loss.backward()`` that fills the parameters' ``.grad``, forward hooks keeping the MLP input
projection's inputs and ``retain_grad`` keeping the output projection's output gradients,
``torch.linalg.matrix_rank`` and ``matrix_norm`` of each dense ``weight.grad``, and the lens through the full logits
``lm_head(final_norm(vectors))`` (an ``N x V`` float32 matrix, float64 for float64 models) with ``torch.topk``. It
shares no code with the library's batching, capture, lens or kernels (the model context only says where the modules
are, and which of them a name stands for side by side), so that agreeing with it means something.

Gradient ranks follow one rule for every dtype (:class:`RankRule`): ``matrix_rank``'s default, raised to the
rounding floor of the dtype the gradient is held in, the only part of a 16-bit gradient's spectrum that is resolved.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .context import ModelContext, with_context
from .forward import eval_mode
from .lists import BY_NAME, LENS_MODULES, LIST_NAMES, by_factor

#: Two target ranks may differ by the number of tokens whose logit lies within this fraction of the row's largest
#: |logit| of the target's: rounding, batching and threads move those (:attr:`TokenList.target_slack`).
RANK_TOLERANCE = 1e-5

Stage = Callable[[str], AbstractContextManager]


def untimed(name: str) -> AbstractContextManager:
    """The default ``stage``: no timing."""
    return nullcontext()


@dataclass(frozen=True)
class RankRule:
    """Which singular values of a gradient count toward its rank: those above ``max(rtol * sigma_max, floor *
    ||G||_F)``.

    ``rtol`` is ``torch.linalg.matrix_rank``'s default, ``max(shape)`` times the eps of float32 (of float64 for
    float64 gradients; :meth:`LowRankGradient.rank` uses the same). ``floor`` is the eps of the dtype the gradient is
    held in: a dense gradient rounded entry by entry to that dtype carries an error of at most ``eps / 2 * ||G||_F``
    in spectral norm, so a singular value below ``eps * ||G||_F`` is not resolved. In float32 and float64 the floor
    lies below ``rtol * sigma_max`` (``||G||_F <= sqrt(min(shape)) * sigma_max``) and the rule is ``matrix_rank``'s;
    in bfloat16 and float16 the floor is what keeps rounding noise (which makes a dense gradient full rank) out.
    """

    rtol: float
    floor: float

    @classmethod
    def for_gradient(cls, dtype: torch.dtype, shape: Sequence[int]) -> "RankRule":
        rank_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return cls(max(shape) * torch.finfo(rank_dtype).eps, torch.finfo(dtype).eps)

    def count(self, singular_values: torch.Tensor) -> torch.Tensor:
        """Ranks of gradients from their singular values ``(..., r)``, descending (zeros past a gradient's own)."""
        s = singular_values
        cut = torch.maximum(s[..., :1] * self.rtol, s.square().sum(-1, keepdim=True).sqrt() * self.floor)
        return (s > cut).sum(-1)

    def matrix_rank(self, dense: torch.Tensor, norm: torch.Tensor) -> int:
        """The rank of a dense gradient of Frobenius norm ``norm`` by ``torch.linalg.matrix_rank``, one SVD."""
        return int(torch.linalg.matrix_rank(dense, atol=float(norm) * self.floor, rtol=self.rtol))


@dataclass(frozen=True)
class TokenList:
    """One lens list of a set of vectors (rows): ``indices`` and ``values`` (``rows x k``, best first, ties to the
    lower token id), the target's 1-based ``target_rank`` in the list's order, ``target_slack`` (how many other tokens'
    logits lie within :data:`RANK_TOLERANCE` of the target's; None where the full logits were never formed) and
    ``degenerate`` (a zero vector or all logits equal: its order means nothing)."""

    indices: torch.Tensor
    values: torch.Tensor
    target_rank: torch.Tensor
    target_slack: torch.Tensor | None
    degenerate: torch.Tensor

    @staticmethod
    def cat(parts: Sequence["TokenList"]) -> "TokenList":
        """The rows of ``parts``, one after the other."""
        slack = None if parts[0].target_slack is None else torch.cat([p.target_slack for p in parts])
        return TokenList(torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]),
                         torch.cat([p.target_rank for p in parts]), slack, torch.cat([p.degenerate for p in parts]))

    def head(self, rows: int) -> "TokenList":
        """The first ``rows`` rows."""
        slack = None if self.target_slack is None else self.target_slack[:rows]
        return TokenList(self.indices[:rows], self.values[:rows], self.target_rank[:rows], slack,
                         self.degenerate[:rows])


@dataclass(frozen=True)
class Backward:
    """What one ordinary backward kept: the ids the model read, the target's ids, and per layer FF1's forward inputs
    ``x`` (``layers x T x d_in``) and the gradients at ``mlp.out``'s outputs ``delta`` (``layers x T x d_out``)."""

    input_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    x: torch.Tensor
    delta: torch.Tensor


@dataclass(frozen=True)
class ReferenceLens:
    """The Backward Lens of one (prompt, target), the plain way: per layer and module (``mlp.in``, then ``mlp.out``)
    the dense gradient's ``ranks`` (``layers x 2``, :class:`RankRule`) and Frobenius ``norms``; per list of
    :data:`~blens_fast.lists.LISTS` a :class:`TokenList` of ``layers x T`` rows (ordered layer, position), ranking
    the target's first token; and the vectors it read (``backward``)."""

    layers: tuple[int, ...]
    modules: tuple[str, str]
    ranks: torch.Tensor
    norms: torch.Tensor
    lists: dict[str, TokenList]
    backward: Backward

    @property
    def target_id(self) -> int:
        return self.backward.target_ids[0]


def tokenize(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """The ids of ``prompt`` (with the tokenizer's special tokens, e.g. a BOS) and of ``target`` with a leading space
    (without them)."""
    target = target if target[:1].isspace() else " " + target
    return list(tokenizer(prompt)["input_ids"]), list(tokenizer(target, add_special_tokens=False)["input_ids"])


@contextmanager
def _requiring_grad(weights: Sequence[torch.Tensor]):
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        yield
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)


def backward(ctx: ModelContext, prompt: str, target: str, layers: Sequence[int]) -> Backward:
    """``loss.backward()`` of ``-sum_j log p(target_j | prompt, target_<j)`` over one unpadded prompt in eval mode.

    Every parameter that requires grad gets its ``.grad`` (the MLP weights of ``layers`` are made to for the call);
    the caller reads them and clears them (``model.zero_grad(set_to_none=True)``)."""
    model, tokenizer = ctx.model, ctx.require_tokenizer()
    prompt_ids, target_ids = tokenize(tokenizer, prompt, target)
    ids = prompt_ids + target_ids[:-1]
    ff1 = ctx.module_parts("mlp.in").parts[0]  # a gated MLP's gate and up read the same input
    inputs, outputs = {}, {}

    def keep_input(layer):
        def hook(module, args, output):
            inputs[layer] = args[0].detach()
        return hook

    def keep_output_grad(layer):
        def hook(module, args, output):
            output.retain_grad()
            outputs[layer] = output
        return hook

    hooks = {**{(layer, ff1): keep_input(layer) for layer in layers},
             **{(layer, "mlp.out"): keep_output_grad(layer) for layer in layers}}
    weights = [ctx.weight(layer, name) for layer in layers for name in ctx.resolve_modules(LENS_MODULES)]
    device = ctx.device
    with ctx.hooks(forward=hooks), eval_mode(model), _requiring_grad(weights), torch.enable_grad():
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
        positions = torch.arange(len(prompt_ids) - 1, len(ids), device=device)
        log_probs = logits[positions].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        loss = -log_probs[torch.arange(len(target_ids), device=device), torch.tensor(target_ids, device=device)].sum()
        loss.backward()
    tokens = len(ids)  # some models (OPT) flatten (batch, position) inside the MLP
    x = torch.stack([inputs[layer].reshape(tokens, -1) for layer in layers])
    delta = torch.stack([outputs[layer].grad.reshape(tokens, -1) for layer in layers])
    return Backward(tuple(ids), tuple(target_ids), x, delta)


def gradient_ranks_and_norms(ctx: ModelContext, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ranks, norms)``, ``layers x 2`` each, of the dense ``.grad`` of the lens's modules (``mlp.in``: a gated
    MLP's gate and up side by side; ``mlp.out``): ``matrix_norm`` and ``matrix_rank`` (:class:`RankRule` of the
    gradient's dtype) of a float32 copy (16-bit gradients; float64 stays float64)."""
    ranks = torch.zeros(len(layers), len(LENS_MODULES), dtype=torch.long)
    norms = torch.zeros(len(layers), len(LENS_MODULES), dtype=torch.float64)
    for li, layer in enumerate(layers):
        for mi, module in enumerate(LENS_MODULES):
            found = ctx.module_parts(module)
            grad = found.join({part: ctx.grad_io(layer, part) for part in found.parts})
            dense = grad.to(torch.promote_types(grad.dtype, torch.float32))
            norm = torch.linalg.matrix_norm(dense)
            ranks[li, mi] = RankRule.for_gradient(grad.dtype, grad.shape).matrix_rank(dense, norm)
            norms[li, mi] = float(norm)
    return ranks, norms


def _topk(logits: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` with equal values listed lower token id first (``topk`` promises no order among them): rows with
    a tie inside the selection or across its edge are taken from a stable sort instead."""
    values, indices = torch.topk(logits, k, dim=-1, largest=largest)
    kth = values[:, -1:]
    tied = (values[:, 1:] == values[:, :-1]).any(-1) | ((logits == kth).sum(-1) > (values == kth).sum(-1))
    rows = tied.nonzero().flatten()
    if rows.numel():
        order = torch.sort(logits[rows], dim=-1, descending=largest, stable=True).indices[:, :k]
        indices[rows] = order
        values[rows] = logits[rows].gather(-1, order)
    return values, indices


def token_lists(ctx: ModelContext, vectors: torch.Tensor, target_id: int, names: Sequence[str], *, k: int,
                unit_norm: bool = False) -> dict[str, TokenList]:
    """The lists ``names`` (of :data:`~blens_fast.lists.LISTS`, all reading ``vectors``, ``N x d``) through the full
    logits ``lm_head(final_norm(vectors))``: the model's own modules, the unembedding's product in float32 (float64 for
    float64 models); ``unit_norm`` scales each vector to unit length first."""
    model, adapter = ctx.model, ctx.adapter
    head = model.get_submodule(adapter.unembedding)
    with torch.no_grad():
        v = F.normalize(vectors, dim=-1) if unit_norm else vectors
        normed = model.get_submodule(adapter.final_norm)(v) if adapter.final_norm else v
        dtype = torch.promote_types(normed.dtype, torch.float32)
        logits = F.linear(normed.to(dtype), head.weight.to(dtype),
                          None if head.bias is None else head.bias.to(dtype))
    at_target = logits[:, target_id:target_id + 1]
    lower_id = torch.arange(logits.shape[1], device=logits.device) < target_id
    slack = ((logits - at_target).abs() <= RANK_TOLERANCE * logits.abs().amax(-1, keepdim=True)).sum(-1) - 1
    degenerate = (vectors == 0).all(-1) | (logits.amax(-1) == logits.amin(-1))
    found = {}
    for name in names:
        largest = BY_NAME[name].largest
        values, indices = _topk(logits, k, largest)
        ahead = (logits > at_target) if largest else (logits < at_target)
        rank = (ahead | ((logits == at_target) & lower_id)).sum(-1) + 1
        found[name] = TokenList(indices.cpu(), values.cpu(), rank.cpu(), slack.cpu(), degenerate.cpu())
    return found


@with_context
def reference_lens(ctx: ModelContext, prompt: str, target: str, *, layers=None, k: int = 10, unit_norm: bool = False,
                   stage: Stage = untimed) -> ReferenceLens:
    """The Backward Lens of one (prompt, target) the plain way (module docstring), in three stages that ``stage(name)``
    (a context manager factory: ``"gradients"``, ``"rank"``, ``"projection"``) may time. Leaves every ``.grad``
    None."""
    layers = ctx.check_layers(layers)
    with stage("gradients"):
        ctx.model.zero_grad(set_to_none=True)
        found = backward(ctx, prompt, target, layers)
    with stage("rank"):
        ranks, norms = gradient_ranks_and_norms(ctx, layers)
        ctx.model.zero_grad(set_to_none=True)
    with stage("projection"):
        lists = {}
        for (_, factor), names in by_factor().items():
            vectors = getattr(found, factor)
            lists.update(token_lists(ctx, vectors.reshape(-1, vectors.shape[-1]), found.target_ids[0], names, k=k,
                                     unit_norm=unit_norm))
    return ReferenceLens(layers, LENS_MODULES, ranks, norms, {name: lists[name] for name in LIST_NAMES}, found)
