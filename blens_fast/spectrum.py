"""Rank tables: how many directions each example's gradient really has, per layer and module."""
from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from ._checks import as_str_list, check_positive_int
from .capture import capture
from .lowrank import norms, numerical_rank, spectra


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
        batch = []
        for layer in cap.layers:
            for module in cap.modules:
                grads = [cap.gradient(layer, module, i) for i in range(cap.num_examples)]
                for i, (grad, s, norm) in enumerate(zip(grads, spectra(grads), norms(grads).tolist())):
                    example, max_rank = cap.examples[i], min(grad.num_tokens, *grad.shape)
                    r = numerical_rank(s, grad.shape, grad.x.dtype, tol)
                    batch.append(dict(example=start + i, prompt=example.prompt, target=example.target, layer=layer,
                                      module=module, tokens=grad.num_tokens, rank=r, max_rank=max_rank,
                                      full_rank=r == max_rank, norm=norm))
        rows.extend(sorted(batch, key=lambda row: row["example"]))  # example, then layer and module
    return pd.DataFrame(rows)
