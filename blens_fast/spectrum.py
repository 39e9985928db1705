"""Rank tables: how many directions each example's gradient really has, per layer and module."""
from __future__ import annotations

import pandas as pd

from ._checks import check_positive_int
from ._ui import progress_bar
from .capture import capture_examples
from .context import ModelContext, with_context
from .lists import LENS_MODULES


@with_context
def rank(ctx: ModelContext, prompts, targets, *, layers=None, modules=LENS_MODULES, tol: float | None = None,
         batch_size: int = 8, progress: bool = True, loss: str = "teacher_forced") -> pd.DataFrame:
    """A table with one row per example, layer and module: token count, gradient rank, Frobenius norm.

    Called as ``rank(model, tokenizer, prompts, targets)`` or ``rank(ctx, prompts, targets)``. Columns:
    ``example, prompt, target, layer, module, tokens, rank, max_rank, full_rank, norm``, where
    ``max_rank = min(tokens, d_in, d_out)`` and ``full_rank`` says whether the rank reaches it. Examples are
    captured ``batch_size`` at a time; ``tol`` is passed to :meth:`LowRankGradient.rank`.
    """
    check_positive_int(batch_size, "batch_size")
    examples = ctx.tokenize(prompts, targets, loss=loss)
    layer_ids, module_names = ctx.check_layers(layers), ctx.check_modules(modules)
    rows = []
    starts = range(0, len(examples), batch_size)
    for start in progress_bar(starts, desc="rank", unit="batch", enabled=progress and len(starts) > 1):
        cap = capture_examples(ctx, examples[start:start + batch_size], layer_ids, module_names)
        grads = {module: cap.gradients(module) for module in cap.modules}
        found = {module: (g.max_rank, *g.ranks_and_norms(tol)) for module, g in grads.items()}
        for i, example in enumerate(cap.examples):  # example, then layer and module
            for li, layer in enumerate(cap.layers):
                for module in cap.modules:
                    max_ranks, ranks, norms = found[module]
                    r, max_rank = int(ranks[li, i]), int(max_ranks[li, i])
                    rows.append(dict(example=start + i, prompt=example.prompt, target=example.target, layer=layer,
                                     module=module, tokens=example.num_tokens, rank=r, max_rank=max_rank,
                                     full_rank=r == max_rank, norm=float(norms[li, i])))
    return pd.DataFrame(rows)
