"""A plain-PyTorch reading of one training step, written independently of the training lens: the dense ``.grad``
(or weight change) of each watched module in (in, out) terms, its SVD, the step's mean live input for the sign, and
full float64 logits + ``torch.topk`` for the lists. Module paths and weight layouts come from transformers' own
classes here, not from the package's adapters."""
from __future__ import annotations

import torch
from torch import nn

from ..helpers import lens_logits64

#: model_type -> (blocks path, {public name: path in a block})
MODULE_PATHS = {
    "gpt2": ("transformer.h", {"mlp.in": "mlp.c_fc", "mlp.out": "mlp.c_proj"}),
    "gptj": ("transformer.h", {"mlp.in": "mlp.fc_in", "mlp.out": "mlp.fc_out"}),
    "gpt_neox": ("gpt_neox.layers", {"mlp.in": "mlp.dense_h_to_4h", "mlp.out": "mlp.dense_4h_to_h"}),
    "gpt_neo": ("transformer.h", {"mlp.in": "mlp.c_fc", "mlp.out": "mlp.c_proj"}),
    "opt": ("model.decoder.layers", {"mlp.in": "fc1", "mlp.out": "fc2"}),
    "llama": ("model.layers", {"mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.out": "mlp.down_proj"}),
}
for _name in ("mistral", "qwen2"):
    MODULE_PATHS[_name] = MODULE_PATHS["llama"]


def module_of(model, layer: int, name: str) -> nn.Module:
    blocks, paths = MODULE_PATHS[model.config.model_type]
    return model.get_submodule(blocks)[layer].get_submodule(paths[name])


def in_out(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (d_in, d_out): nn.Linear stores (out, in), GPT-2's Conv1D (in, out)."""
    return tensor.T if isinstance(module, nn.Linear) else tensor


class LiveInputs:
    """Full backward hooks (another mechanism than the lens's) that sum each module's input rows whose output
    gradient is not zero, and count them."""

    def __init__(self, model, keys):
        self.sums = {key: 0.0 for key in keys}
        self.counts = {key: 0 for key in keys}
        self.inputs = {}
        self.handles = []
        for key in keys:
            module = module_of(model, *key)
            self.handles.append(module.register_forward_hook(self._keep(key)))
            self.handles.append(module.register_full_backward_hook(self._add(key)))

    def _keep(self, key):
        def hook(module, args, output):
            if output.requires_grad:
                self.inputs.setdefault(key, []).append(args[0].detach().double())
        return hook

    def _add(self, key):
        def hook(module, grad_input, grad_output):
            x = self.inputs[key].pop()
            x = x.reshape(-1, x.shape[-1])
            g = grad_output[0].reshape(x.shape[0], -1).double()
            live = (g != 0).any(-1)
            self.sums[key] = self.sums[key] + x[live].sum(0)
            self.counts[key] += int(live.sum())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def svd(matrix: torch.Tensor):
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u, s, vh.T


def oriented(u: torch.Tensor, v: torch.Tensor, mean_input: torch.Tensor, r: int):
    """The first ``r`` pairs, each flipped so that the mean input has a non-negative projection on ``u``."""
    signs = torch.where(mean_input.double() @ u[:, :r] < 0, -1.0, 1.0)
    return u[:, :r] * signs, v[:, :r] * signs


def lists(model, vectors: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Token ids of the top (bottom) ``k`` of each column vector's float64 logits through the model's lens."""
    logits = lens_logits64(model, vectors.T)
    return logits, torch.topk(logits, k, dim=-1, largest=largest).indices
