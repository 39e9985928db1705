"""A forward-shift edit and its revert (``edit(ctx, prompt, target).revert()``: the calibrated paper variant on the
shipped default model, CounterFact record 0) against one forward pass of the prompt (``model(input_ids)``, logits at
every position, no gradients)."""
from __future__ import annotations

import functools

import pytest
import torch
from microbench import DEVICES, Case, paths

from blens_fast import edit, load_default_model
from blens_fast.counterfact import load

CASES = [Case(group=f"edit/{device}/default-model", device=device, rounds=50, warmup_rounds=5) for device in DEVICES]


@pytest.fixture(scope="module")
def default_models():
    """``default_models(device)``: the shipped model's context, loaded on first use."""
    return functools.cache(lambda device: load_default_model(device=device))


@paths(CASES, ("forward",), lambda case: ("forward_shift+revert",))
def bench_edit(measure, default_models, case, path):
    ctx = default_models(case.device)
    (record,) = load("counterfact", 1)
    if path == "forward":
        ids = torch.tensor([ctx.tokenizer(record["prompt"])["input_ids"]], device=case.device)
        fn = torch.no_grad()(functools.partial(ctx.model, input_ids=ids))
    else:
        def fn():
            edit(ctx, record["prompt"], record["target_new"], progress=False).revert()
    measure(fn, case, path, yardstick=path == "forward")
