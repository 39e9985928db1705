"""One forward and one backward that keep, for chosen modules, their inputs X and output VJPs Delta.

The dense ``d_in x d_out`` gradient is never formed: hooks keep ``X`` (forward inputs) and
``torch.autograd.grad`` returns ``Delta`` (gradients w.r.t. the module outputs), with no parameter
gradient computed or accumulated anywhere.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ._checks import as_str_list, check_positive_int
from .adapters import Adapter, get_adapter
from .lowrank import LowRankGradient, ranks_and_norms


@dataclass(frozen=True)
class Example:
    """One tokenized (prompt, target) pair; the model reads ``prompt_ids + target_ids[:-1]``."""

    prompt: str
    target: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.target_ids[:-1]

    @property
    def num_tokens(self) -> int:
        """Positions the model reads, all of which carry gradient."""
        return len(self.prompt_ids) + len(self.target_ids) - 1

    @property
    def loss_positions(self) -> range:
        """Positions whose next-token prediction is a target token."""
        return range(len(self.prompt_ids) - 1, self.num_tokens)


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _ids(tokenizer, text: str, *, special: bool) -> tuple[int, ...]:
    return tuple(int(i) for i in tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize_examples(tokenizer, prompts, targets, *, max_positions: int | None = None) -> list[Example]:
    """Validate and tokenize prompts and targets.

    A target that does not start with whitespace gets one leading space (CounterFact scores objects
    as `` Paris``); the target is tokenized on its own and appended to the prompt's tokens.
    """
    prompts = as_str_list(prompts, "prompts")
    targets = as_str_list(targets, "targets")
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets: expected one target per prompt")
    examples = []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        target_text = target if target[:1].isspace() else " " + target
        prompt_ids = _ids(tokenizer, prompt, special=True)
        target_ids = _ids(tokenizer, target_text, special=False)
        if not prompt_ids:
            raise ValueError(f"prompts[{i}] ({prompt!r}) tokenizes to no tokens")
        if not target_ids:
            raise ValueError(f"targets[{i}] ({target!r}) tokenizes to no tokens")
        example = Example(prompt, target, prompt_ids, target_ids)
        if max_positions is not None and example.num_tokens > max_positions:
            raise ValueError(f"example {i} is {example.num_tokens} tokens long: the model reads at most {max_positions}")
        examples.append(example)
    return examples


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for lists of token ids (right padding keeps every real
    position's index)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids.to(device), mask.to(device)


def token_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None, *,
                  by_length: bool = False) -> list[list[int]]:
    """Indices of ``lengths`` cut into batches of at most ``batch_size`` items and ``max_tokens`` padded tokens
    (items x the batch's longest; an item longer than ``max_tokens`` goes alone). ``by_length`` sorts the items
    by length first (stable), so that batches pad less; otherwise batches are consecutive in the input order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if by_length else range(len(lengths))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        wider = max(longest, lengths[i])
        if current and (len(current) == batch_size or (max_tokens is not None
                                                       and wider * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        longest = wider
    if current:
        batches.append(current)
    return batches


def batch_inputs(examples: Sequence[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples' model inputs, right-padded (see :func:`pad_right`)."""
    return pad_right([e.input_ids for e in examples], pad_id, device)


def target_log_probs(logits: torch.Tensor, examples: Sequence[Example], positions: Sequence[int] | None = None
                     ) -> torch.Tensor:
    """Per example, the sum over target tokens of ``log p(target token | everything before it)`` (float32).

    ``logits``: ``batch x positions x V``; ``positions`` names the sequence position of each logits column
    when the model computed only some (see :func:`loss_positions`), None when it computed all.
    """
    column = None if positions is None else {p: i for i, p in enumerate(positions)}
    rows, cols, tokens = [], [], []
    for row, e in enumerate(examples):
        rows.extend([row] * len(e.target_ids))
        cols.extend(e.loss_positions if column is None else (column[p] for p in e.loss_positions))
        tokens.extend(e.target_ids)
    device = logits.device
    rows_t = torch.tensor(rows, device=device)
    picked = logits[rows_t, torch.tensor(cols, device=device)].float().log_softmax(-1)
    token_lp = picked[torch.arange(len(tokens), device=device), torch.tensor(tokens, device=device)]
    return torch.zeros(len(examples), device=device, dtype=torch.float32).index_add(0, rows_t, token_lp)


def loss_positions(examples: Sequence[Example]) -> list[int]:
    """The sorted positions where some example of the batch predicts a target token."""
    return sorted({p for e in examples for p in e.loss_positions})


def loss_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, examples: Sequence[Example]
                ) -> tuple[torch.Tensor, list[int] | None]:
    """The model's logits at the batch's loss positions only (``logits_to_keep``: the unembedding runs on those
    positions instead of all of them), or at all positions for a model without that argument; with the
    positions as :func:`target_log_probs` takes them."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits, None
    keep = loss_positions(examples)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False,
                   logits_to_keep=torch.tensor(keep, device=ids.device)).logits
    return logits, keep


@contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode (no dropout), then restore every submodule's own ``training`` flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class Capture:
    """Forward inputs and VJPs of the captured modules, per example, layer and module.

    ``x[(layer, module)][example]`` is ``T x d_in`` and ``delta[(layer, module)][example]`` is
    ``T x d_out`` with ``T = examples[example].num_tokens``.
    """

    architecture: str
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    examples: tuple[Example, ...]
    losses: torch.Tensor
    layouts: dict[str, str]
    x: dict[tuple[int, str], list[torch.Tensor]] = field(repr=False)
    delta: dict[tuple[int, str], list[torch.Tensor]] = field(repr=False)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def _key(self, layer: int, module: str) -> tuple[int, str]:
        if module not in self.modules:
            raise ValueError(f"module {module!r} was not captured: captured {', '.join(self.modules)}")
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not captured: captured layers {list(self.layers)}")
        return (layer, module)

    def gradient(self, layer: int, module: str, example: int | None = None) -> LowRankGradient:
        """The gradient of ``module``'s weight at ``layer`` for one example (its factors are the capture's own
        tensors, not copies), or summed over the batch (None)."""
        key = self._key(layer, module)
        if example is None:
            return LowRankGradient(torch.cat(self.x[key]), torch.cat(self.delta[key]), self.layouts[module])
        if not -self.num_examples <= example < self.num_examples:
            raise ValueError(f"example {example} is out of range: captured {self.num_examples} examples")
        return LowRankGradient(self.x[key][example], self.delta[key][example], self.layouts[module])

    def ranks_and_norms(self, modules=None, *, tol: float | None = None, dtype: torch.dtype | None = None
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module: the numerical rank (long) and Frobenius norm (float64) of every example's gradient at every
        captured layer, as ``(layers, examples)`` tensors on the CPU. One batched call per module
        (:func:`blens_fast.lowrank.ranks_and_norms`; ``tol`` and ``dtype`` as there)."""
        out = {}
        for module in self.modules if modules is None else as_str_list(modules, "modules"):
            grads = [self.gradient(layer, module, i) for layer in self.layers for i in range(self.num_examples)]
            shape = (len(self.layers), self.num_examples)
            out[module] = tuple(t.view(shape) for t in ranks_and_norms(grads, tol, dtype=dtype))
        return out

    def __repr__(self) -> str:
        return (f"Capture({self.architecture}, examples={self.num_examples}, layers={list(self.layers)}, "
                f"modules={list(self.modules)})")


def capture(model: nn.Module, tokenizer, prompts, targets, *, layers=None, modules=("mlp.in", "mlp.out"),
            adapter: Adapter | None = None, batch_size: int | None = None) -> Capture:
    """Keep X and Delta of ``modules`` at ``layers`` for each (prompt, target) in one forward + backward.

    The loss of an example is ``-sum_j log p(target_j | prompt, target_<j)``; examples are right-padded into
    batches of ``batch_size`` (default: all at once), which gives the same factors as one at a time.
    Parameters' ``requires_grad`` and ``.grad`` are left as they were; the model runs in eval mode.
    """
    adapter = get_adapter(model, adapter)
    layer_ids = adapter.check_layers(model, layers)
    module_names = adapter.resolve_modules(modules)
    examples = tokenize_examples(tokenizer, prompts, targets, max_positions=max_positions(model))
    batch_size = len(examples) if batch_size is None else check_positive_int(batch_size, "batch_size")
    xs: dict[tuple[int, str], list[torch.Tensor]] = {(l, m): [] for l in layer_ids for m in module_names}
    deltas: dict[tuple[int, str], list[torch.Tensor]] = {(l, m): [] for l in layer_ids for m in module_names}
    losses = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        loss = _capture_batch(model, adapter, tokenizer, batch, layer_ids, module_names, xs, deltas)
        bad = (~torch.isfinite(loss)).nonzero().flatten().tolist()
        if bad:
            i = start + bad[0]
            raise ValueError(f"the loss of example {i} ({examples[i].prompt!r} -> {examples[i].target!r}) is not "
                             f"finite ({loss[bad[0]].item()}): check the model's weights and dtype")
        losses.append(loss)
    layouts = {m: adapter.weight_layout for m in module_names}
    return Capture(adapter.name, layer_ids, module_names, tuple(examples), torch.cat(losses), layouts, xs, deltas)


def _capture_batch(model, adapter, tokenizer, batch, layer_ids, module_names, xs, deltas) -> torch.Tensor:
    ids, mask = batch_inputs(batch, _pad_id(tokenizer), model_device(model))
    inputs: dict[tuple[int, str], torch.Tensor] = {}
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

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

    try:
        handles.append(model.get_submodule(adapter.embedding).register_forward_hook(start_graph))
        for layer in layer_ids:
            for name in module_names:
                module = adapter.module(model, layer, name)
                handles.append(module.register_forward_hook(keep((layer, name))))
        with eval_mode(model), torch.enable_grad():
            logits, positions = loss_logits(model, ids, mask, batch)
            loss = -target_log_probs(logits, batch, positions)
            keys = list(outputs)
            missing = [k for k in xs if k not in outputs]
            if missing:
                raise RuntimeError(f"modules {missing} did not run in the forward pass: check the adapter")
            grads = torch.autograd.grad(loss.sum(), [outputs[k] for k in keys], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    shape = (ids.shape[0], ids.shape[1], -1)  # some models (OPT) flatten (batch, position) inside the MLP
    for key, grad in zip(keys, grads):
        x = inputs[key].reshape(shape)
        grad = (torch.zeros_like(outputs[key]) if grad is None else grad).reshape(shape)
        for row, e in enumerate(batch):
            xs[key].append(x[row, : e.num_tokens].contiguous())
            deltas[key].append(grad[row, : e.num_tokens].detach().contiguous())
    return loss.detach()
