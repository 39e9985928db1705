"""The gradient baseline ("fine-tuning one MLP"): ``steps`` normalised gradient-descent steps on one layer's
``mlp.out`` weight, ``W -= lr * G / ||G||_F``, where ``G = X^T Delta`` comes as factors from the capture and is
applied with one in-place ``addmm_``: the dense gradient is never formed apart from that update."""
from __future__ import annotations

import math

import torch

from ..capture import capture_examples
from ..context import ModelContext
from .update import Edit, Update


def gradient_edit(ctx: ModelContext, examples, layer: int, steps: int, lr: float, info: dict) -> Edit:
    """Apply the steps (arguments already checked); returns the applied :class:`Edit` (reverted on any error)."""
    weight = ctx.weight_io(layer, "mlp.out")
    result = Edit([], info)
    result._attach(ctx, {(layer, "mlp.out"): weight.detach().clone()})
    updates: list[Update] = []
    losses = []
    try:
        for _ in range(steps):
            cap = capture_examples(ctx, examples, (layer,), ("mlp.out",))
            losses.append(cap.losses.sum().item())
            grad = cap.gradient(layer, "mlp.out")
            norm = grad.norm().item()
            if not math.isfinite(norm):
                raise ValueError(f"the gradient at layer {layer} is not finite: check the model's weights")
            if norm == 0:
                break
            cdt = torch.float64 if grad.x.dtype == torch.float64 else torch.float32
            update = Update(layer, "mlp.out", (grad.x.to(cdt) * (-lr / norm)).contiguous(),
                            grad.delta.to(cdt).contiguous())
            with torch.no_grad():
                update.apply_to(weight)
            updates.append(update)
            result.updates = tuple(updates)
    except BaseException:
        result.revert()
        raise
    result.info.update(steps=steps, lr=lr, losses=losses)
    return result
