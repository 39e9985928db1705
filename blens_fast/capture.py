"""One forward and one backward that keep, for chosen modules, their inputs X and output VJPs Delta.

The dense ``d_in x d_out`` gradient is never formed: hooks keep ``X`` (forward inputs) and
``torch.autograd.grad`` returns ``Delta`` (gradients w.r.t. the module outputs), with no parameter
gradient computed or accumulated anywhere.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import as_str_list, check_positive_int
from ._ui import plural
from .batching import Example, loss_positions, target_log_probs
from .context import ModelContext, with_context
from .forward import eval_mode
from .lists import LENS_MODULES
from .lowrank import LowRankGradient


@dataclass(frozen=True)
class Capture:
    """Forward inputs and VJPs of the captured modules, per example, layer and module.

    ``x[(layer, module)][example]`` is ``T x d_in`` and ``delta[(layer, module)][example]`` is ``T x d_out`` with
    ``T = examples[example].num_tokens``.
    """

    architecture: str
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    examples: tuple[Example, ...]
    losses: torch.Tensor
    x: dict[tuple[int, str], list[torch.Tensor]] = field(repr=False)
    delta: dict[tuple[int, str], list[torch.Tensor]] = field(repr=False)

    @property
    def num_examples(self) -> int:
        """How many examples (prompt + target pairs) were captured."""
        return len(self.examples)

    def _key(self, layer: int, module: str) -> tuple[int, str]:
        if module not in self.modules:
            raise ValueError(f"module {module!r} was not captured: captured {', '.join(self.modules)}")
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not captured: captured layers {list(self.layers)}")
        return (layer, module)

    def gradient(self, layer: int, module: str, example: int | None = None) -> LowRankGradient:
        """The gradient of ``module``'s weight at ``layer``, ``d_in x d_out``, for one example (its factors are the
        capture's own tensors, not copies), or summed over the batch (None)."""
        key = self._key(layer, module)
        if example is None:
            return LowRankGradient(torch.cat(self.x[key]), torch.cat(self.delta[key]))
        if not -self.num_examples <= example < self.num_examples:
            raise ValueError(f"example {example} is out of range: captured {plural(self.num_examples, 'example')}")
        return LowRankGradient(self.x[key][example], self.delta[key][example])

    def gradients(self, module: str) -> LowRankGradient:
        """Every example's gradient of ``module`` at every captured layer as one batch, ``(layers, examples)``."""
        grads = [self.gradient(layer, module, i) for layer in self.layers for i in range(self.num_examples)]
        stacked = LowRankGradient.stack(grads)
        shape = (len(self.layers), self.num_examples)
        return LowRankGradient(stacked.x.reshape(*shape, *stacked.x.shape[1:]),
                               stacked.delta.reshape(*shape, *stacked.delta.shape[1:]), stacked.lengths.reshape(shape))

    def ranks_and_norms(self, modules=None, *, tol: float | None = None, dtype: torch.dtype | None = None
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module: the numerical rank (long) and Frobenius norm (float64) of every example's gradient at every
        captured layer, as ``(layers, examples)`` tensors on the CPU, from one batched SVD per module
        (:meth:`LowRankGradient.ranks_and_norms`; ``tol`` and ``dtype`` as there)."""
        names = self.modules if modules is None else as_str_list(modules, "modules")
        return {module: self.gradients(module).ranks_and_norms(tol, dtype=dtype) for module in names}

    def rows(self, module: str, factor: str) -> torch.Tensor:
        """All rows of one factor (``"x"`` or ``"delta"``) of ``module``, ordered example, layer, position."""
        store = {"x": self.x, "delta": self.delta}[factor]
        return torch.cat([store[(layer, module)][i] for i in range(self.num_examples) for layer in self.layers])

    def __repr__(self) -> str:
        return (f"Capture({self.architecture}, examples={self.num_examples}, layers={list(self.layers)}, "
                f"modules={list(self.modules)})")


@with_context
def capture(ctx: ModelContext, prompts, targets, *, layers=None, modules=LENS_MODULES,
            batch_size: int | None = None, loss: str = "teacher_forced") -> Capture:
    """Keep X and Delta of ``modules`` at ``layers`` for each (prompt, target) in one forward + backward.

    Called as ``capture(model, tokenizer, prompts, targets)`` or ``capture(ctx, prompts, targets)``. The loss of an
    example is ``-sum_j log p(target_j | prompt, target_<j)`` (``loss="last_position"``: every target token scored
    at the prompt's last position; see :mod:`blens_fast.batching`); examples are right-padded into batches of
    ``batch_size`` (default: all at once), which gives the same factors as one at a time. Parameters'
    ``requires_grad`` and ``.grad`` are left as they were; the model runs in eval mode. Non-finite losses or factors
    raise a ``ValueError`` naming the example and the first (layer, module) affected. ``modules`` are public names,
    held and asked for as given: a gated MLP's ``mlp.in`` is gate and up side by side, GPT-2's ``attn.q`` its
    columns of the fused matrix (:mod:`blens_fast.adapters`).
    """
    examples = ctx.tokenize(prompts, targets, loss=loss)
    batch_size = len(examples) if batch_size is None else check_positive_int(batch_size, "batch_size")
    return capture_examples(ctx, examples, ctx.check_layers(layers), ctx.check_modules(modules),
                            batch_size=batch_size)


def capture_examples(ctx: ModelContext, examples: Sequence[Example], layers: Sequence[int], modules: Sequence[str],
                     *, batch_size: int | None = None) -> Capture:
    """:func:`capture` of already tokenized examples at validated ``layers`` and checked public ``modules``."""
    batch_size = batch_size or len(examples)
    parts = {name: ctx.module_parts(name) for name in modules}
    keys = [(layer, name) for layer in layers for name in modules]
    xs: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in keys}
    deltas: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in keys}
    losses = [_capture_batch(ctx, examples[start:start + batch_size], layers, parts, xs, deltas)
              for start in range(0, len(examples), batch_size)]
    return Capture(ctx.adapter.name, tuple(layers), tuple(modules), tuple(examples), torch.cat(losses), xs, deltas)


def _capture_batch(ctx: ModelContext, batch: Sequence[Example], layers: Sequence[int], parts: dict, xs: dict,
                   deltas: dict) -> torch.Tensor:
    """One padded forward + backward of ``batch``: appends each example's factors of every ``(layer, module)`` of
    ``layers`` and ``parts`` (public name -> :class:`~blens_fast.adapters.ModuleParts`) to ``xs`` / ``deltas``;
    returns the examples' losses. Each of the model's matrices is hooked once, and an input several names read is
    kept once."""
    ids, mask = ctx.pad([e.input_ids for e in batch])
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    outputs: dict[tuple[int, str], torch.Tensor] = {}

    def keep(key):
        def hook(module, args, output):
            if key in outputs:
                raise RuntimeError(f"module {key[1]!r} at layer {key[0]} ran twice in one forward pass: "
                                   "shared modules are not supported")
            inputs[key] = args[0].detach()
            outputs[key] = output
        return hook

    def start_graph(module, args, output):
        # Cut the graph at the embeddings so that the VJPs exist even for frozen parameters.
        return output.detach().requires_grad_(True)

    hooked = [(layer, part) for layer in layers for part in dict.fromkeys(p for m in parts.values() for p in m.parts)]
    if not hooked:
        raise ValueError("nothing to capture: expected at least one layer and module")
    with ctx.hooks(forward={"embedding": start_graph, **{key: keep(key) for key in hooked}}):
        with eval_mode(ctx.model), torch.enable_grad():
            logits, positions = loss_logits(ctx.model, ids, mask, batch)
            loss = -target_log_probs(logits, batch, positions)
            missing = [k for k in hooked if k not in outputs]
            if missing:
                raise RuntimeError(f"modules {missing} did not run in the forward pass: check the adapter")
            grads = torch.autograd.grad(loss.sum(), [outputs[k] for k in hooked], allow_unused=True)
    shape = (ids.shape[0], ids.shape[1], -1)  # some models (OPT) flatten (batch, position) inside the MLP
    grads = {key: (torch.zeros_like(outputs[key]) if grad is None else grad.detach()).reshape(shape)
             for key, grad in zip(hooked, grads)}

    def per_example(tensor):
        return [tensor[row, : e.num_tokens].contiguous() for row, e in enumerate(batch)]

    finite = [torch.isfinite(loss).all()]
    rows_of_input = {}
    keys = [(layer, name) for layer in layers for name in parts]
    for layer, name in keys:
        found = parts[name]
        x, delta = found.factors({p: inputs[(layer, p)].reshape(shape) for p in found.parts},
                                 {p: grads[(layer, p)] for p in found.parts})
        finite += [torch.isfinite(x).all(), torch.isfinite(delta).all()]
        read = (layer, found.parts[0])
        if read not in rows_of_input:
            rows_of_input[read] = per_example(x)
        xs[(layer, name)].extend(rows_of_input[read])
        deltas[(layer, name)].extend(per_example(delta))
    if not bool(torch.stack(finite).all()):  # one device sync for the whole batch
        _raise_not_finite(loss.detach(), batch, len(xs[keys[0]]) - len(batch), keys, xs, deltas)
    return loss.detach()


def _raise_not_finite(losses, batch, start, keys, xs, deltas) -> None:
    """A ``ValueError`` for the first example whose loss or factors are not finite (an overflow inside the model, in
    fp16 say), naming it and the first (layer, module) affected (padding alone being non-finite is no error)."""
    for row, e in enumerate(batch):
        where = f"example {start + row} ({e.prompt!r} -> {e.target!r})"
        if not torch.isfinite(losses[row]):
            raise ValueError(f"the loss of {where} is not finite ({losses[row].item()}): check the model's weights "
                             "and dtype")
        for key in keys:
            for name, store in (("x", xs), ("delta", deltas)):
                if not bool(torch.isfinite(store[key][start + row]).all()):
                    raise ValueError(f"the {name} factor of {key[1]} at layer {key[0]} is not finite for {where}: "
                                     "the model overflows in its dtype (try float32 or bfloat16) or its weights "
                                     "hold NaN/inf")


def loss_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, examples: Sequence[Example]
                ) -> tuple[torch.Tensor, list[int] | None]:
    """The model's logits at the batch's loss positions only (``logits_to_keep``: the unembedding runs on those
    positions instead of all of them), or at all positions for a model without that argument; with the
    positions as :func:`~blens_fast.batching.target_log_probs` takes them."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits, None
    keep = loss_positions(examples)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False,
                   logits_to_keep=torch.tensor(keep, device=ids.device)).logits
    return logits, keep
