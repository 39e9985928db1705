"""What the default model's scripts share: which CounterFact records trained it, and its first-token accuracy.

Scripts run as ``python scripts/<script>.py``, which puts this folder on ``sys.path``: they ``import _default_model``.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

TRAIN_RECORDS = 2000  # records [0, 2000) of the edit file are the training facts
UNSEEN_RECORDS = (2000, 3000)  # records never seen in training, for the quality report


@torch.no_grad()
def first_token_top1(
    model,
    tokenizer,
    prompts: Sequence[str],
    objects: Sequence[str],
    batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
) -> list[bool]:
    """For each prompt, whether the model's argmax next token is the first token of its object.

    Batched with right padding (exact for a causal model: real tokens never attend to the
    padding on their right); the LM head is applied only at each prompt's last token.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits: list[bool] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch_prompts = list(prompts[start : start + batch_size])
            enc = tokenizer(batch_prompts, padding=True, return_tensors="pt")
            ids = enc.input_ids.to(device)
            last = enc.attention_mask.sum(1).to(device) - 1
            targets = torch.tensor(
                [tokenizer(o).input_ids[0] for o in objects[start : start + batch_size]], device=device
            )
            ctx = (
                torch.autocast(device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                mask = enc.attention_mask.to(device)
                hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
                h_last = hidden[torch.arange(ids.shape[0], device=device), last]
                logits = model.lm_head(h_last)
            hits.extend((logits.argmax(-1) == targets).tolist())
    finally:
        model.train(was_training)
    return hits
