"""GPT-2 small (12 layers, d=768, random init), float32, CounterFact prompts made 16 tokens long:

- ``capture`` of ``mlp.in`` and ``mlp.out`` at every layer for 8 prompts against one ordinary forward + backward of
  the same batch and loss (the targets' log-probabilities from all logits, ``loss.backward()`` with only the MLP
  weights requiring gradients; both paths run on that model; the yardstick's tokenization is untimed);
- ``Capture.ranks_and_norms()`` (ranks and norms from the factors) of 4 prompts at layer 0, both modules (8 gradients
  of 768 x 3072), against ``torch.linalg.matrix_rank`` + ``svdvals`` of the dense gradients (formed beforehand,
  untimed).
"""
from __future__ import annotations

import functools

import pytest
import torch
from microbench import DEVICES, Case, paths

from blens_fast import capture
from blens_fast.batching import target_log_probs
from blens_fast.bench.run import build_model, make_prompts
from blens_fast.lists import LENS_MODULES as MODULES

PROMPTS, TOKENS = 8, 16
RANK_PROMPTS, RANK_LAYERS = 4, (0,)
CAPTURE_CASES = [Case(group=f"capture/{device}/gpt2-small/{PROMPTS}x{TOKENS}", device=device, rounds=3)
                 for device in DEVICES]
# the dense yardstick takes ~2.4 s a round on one thread, the factors ~4 ms
RANK_CASES = [Case(group=f"ranks_and_norms/{device}/gpt2-small/{RANK_PROMPTS}x{TOKENS}", device=device, rounds=30,
                   yardstick_rounds=3) for device in DEVICES]


@pytest.fixture(scope="module")
def gpt2_small():
    """``gpt2_small(device)``: ``(ctx, prompts, targets)``, the model with only its MLP weights requiring gradients,
    built on first use."""
    @functools.cache
    def build(device):
        ctx = build_model("gpt2-small", device=device)[0]
        ctx.model.requires_grad_(False)
        for layer in range(ctx.num_layers):
            for module in ctx.resolve_modules(MODULES):
                ctx.weight(layer, module).requires_grad_(True)
        return (ctx, *make_prompts(ctx.tokenizer, PROMPTS, TOKENS))

    return build


@paths(CAPTURE_CASES, ("forward+backward",), lambda case: ("capture",))
def bench_capture(measure, gpt2_small, case, path):
    ctx, prompts, targets = gpt2_small(case.device)
    if path == "capture":
        measure(functools.partial(capture, ctx, prompts, targets, modules=MODULES), case, path)
        return
    examples = ctx.tokenize(prompts, targets)
    ids, mask = ctx.pad([e.input_ids for e in examples])

    def forward_backward():
        logits = ctx.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        (-target_log_probs(logits, examples).sum()).backward()

    measure(forward_backward, case, path, yardstick=True, setup=lambda: ctx.model.zero_grad(set_to_none=True))


@paths(RANK_CASES, ("dense",), lambda case: ("factors",))
def bench_ranks_and_norms(measure, gpt2_small, case, path):
    ctx, prompts, targets = gpt2_small(case.device)
    cap = capture(ctx, prompts[:RANK_PROMPTS], targets[:RANK_PROMPTS], layers=RANK_LAYERS, modules=MODULES)
    if path == "factors":
        measure(cap.ranks_and_norms, case, path)
        return
    dense = [cap.gradient(layer, module, i).dense() for layer in cap.layers for module in cap.modules
             for i in range(cap.num_examples)]

    def ranks_and_norms_dense():
        return [(torch.linalg.matrix_rank(g), torch.linalg.svdvals(g)) for g in dense]

    measure(ranks_and_norms_dense, case, path, yardstick=True)
