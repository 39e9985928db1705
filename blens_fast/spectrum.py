"""Rank tables: how many directions each example's gradient really has, per layer and module."""
from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from ._checks import as_str_list, check_positive_int
from .capture import capture


def rank(model, tokenizer, prompts, targets, *, layers=None, modules=("mlp.in", "mlp.out"), tol: float | None = None,
         batch_size: int = 8, adapter=None, progress: bool = True) -> pd.DataFrame:
    """A table with one row per example, layer and module: token count, gradient rank, Frobenius norm.

    Columns: ``example, prompt, target, layer, module, tokens, rank, max_rank, full_rank, norm``, where
    ``max_rank = min(tokens, d_in, d_out)`` and ``full_rank`` says whether the rank reaches it. Examples are
    captured ``batch_size`` at a time; ``tol`` is passed to :meth:`LowRankGradient.rank`.
    """
    prompts = as_str_list(prompts, "prompts")
    targets = as_str_list(targets, "targets")
    check_positive_int(batch_size, "batch_size")
    rows = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="rank", unit="batch", disable=not progress or len(starts) < 2):
        cap = capture(model, tokenizer, prompts[start:start + batch_size], targets[start:start + batch_size],
                      layers=layers, modules=modules, adapter=adapter)
        found = cap.ranks_and_norms(tol=tol)
        for i, example in enumerate(cap.examples):  # example, then layer and module
            for li, layer in enumerate(cap.layers):
                for module in cap.modules:
                    widths = (cap.x[layer, module][i].shape[1], cap.delta[layer, module][i].shape[1])
                    r, max_rank = int(found[module][0][li, i]), min(example.num_tokens, *widths)
                    rows.append(dict(example=start + i, prompt=example.prompt, target=example.target, layer=layer,
                                     module=module, tokens=example.num_tokens, rank=r, max_rank=max_rank,
                                     full_rank=r == max_rank, norm=float(found[module][1][li, i])))
    return pd.DataFrame(rows)
