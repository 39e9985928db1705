"""Forward passes with no backward: hidden states after the final norm, the FF2 inputs of a layer, the residual
stream entering the final norm. Used by editing, the CounterFact harness and the imprint-and-shift analysis."""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from .context import ModelContext


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


class Hidden(NamedTuple):
    """``hidden``: ``B x T x d`` after the final norm; ``ff2_inputs``: ``{layer: B x T x d_ff}`` inputs of ``mlp.out``;
    ``pre_norm``: ``B x T x d`` residual stream entering the final norm (None unless asked for)."""

    hidden: torch.Tensor
    ff2_inputs: dict
    pre_norm: torch.Tensor | None


@torch.no_grad()
def forward_hidden(ctx: ModelContext, ids: torch.Tensor, mask: torch.Tensor, *, ff2_layers=(),
                   pre_norm: bool = False) -> Hidden:
    """One forward pass without the LM head, keeping the ``mlp.out`` inputs of ``ff2_layers`` and (``pre_norm``) the
    residual stream entering the final norm."""
    kept: dict = {}

    def keep(name):
        def hook(module, args):
            kept[name] = args[0].detach()
        return hook

    pre = {(layer, "mlp.out"): keep(layer) for layer in ff2_layers}
    if pre_norm:
        pre["final_norm"] = keep("final_norm")
    with ctx.hooks(pre=pre), eval_mode(ctx.model):
        out = ctx.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    shape = (ids.shape[0], ids.shape[1], -1)  # OPT flattens (batch, position) inside the MLP
    ff2 = {layer: kept[layer].reshape(shape) for layer in ff2_layers}
    return Hidden(hidden, ff2, kept["final_norm"].reshape(shape) if pre_norm else None)
