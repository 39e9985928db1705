"""The project's embedded default model: a small GPT-2 trained on true CounterFact facts.

No model hub is reachable from this project, so it ships its own small model: a 4-layer,
256-wide GPT-2 (tied embeddings, the public GPT-2 tokenizer) trained from scratch, as plain
next-token language modelling, on the true facts of the first 2,000 records of the shipped
CounterFact edit file (``blens_fast/data/counterfact/counterfact-edit.json``).

Load it with :func:`blens_fast.load_default_model`; train it with ``python -m blens_fast.default_model.train``
and measure it with ``python -m blens_fast.default_model.quality``.

The model was trained WITHOUT a leading BOS token: feed it the tokenizer's plain output.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

MODEL_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = MODEL_DIR / "tokenizer"
WEIGHTS_FILE = "model.safetensors"

TRAIN_RECORDS = 2000  # records [0, 2000) of the edit file are the training facts
UNSEEN_RECORDS = (2000, 3000)  # records never seen in training, for the quality report
VOCAB_SIZE = 50257
TRAIN_COMMAND = "python -m blens_fast.default_model.train"

__all__ = [
    "MODEL_DIR",
    "TRAIN_RECORDS",
    "UNSEEN_RECORDS",
    "TRAIN_COMMAND",
    "load_default_tokenizer",
    "first_token_top1",
]


def load_default_tokenizer():
    """Return the shipped GPT-2 tokenizer (pad token = ``<|endoftext|>``, right padding)."""
    from transformers import GPT2TokenizerFast

    # NB: in transformers 5 the keywords vocab_file=/merges_file= silently give an empty vocabulary.
    tok = GPT2TokenizerFast(
        vocab=str(TOKENIZER_DIR / "vocab.json"),
        merges=str(TOKENIZER_DIR / "merges.txt"),
    )
    if len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"default tokenizer has {len(tok)} tokens, expected {VOCAB_SIZE}")
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


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
                hidden = model.transformer(input_ids=ids, attention_mask=enc.attention_mask.to(device)).last_hidden_state
                h_last = hidden[torch.arange(ids.shape[0], device=device), last]
                logits = model.lm_head(h_last)
            hits.extend((logits.argmax(-1) == targets).tolist())
    finally:
        model.train(was_training)
    return hits


def default_threads() -> int:
    """Thread count for CPU work here: ``BLENS_THREADS`` or all visible cores."""
    env = os.environ.get("BLENS_THREADS")
    if env:
        return max(1, int(env))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
