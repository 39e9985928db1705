"""The project's embedded default model: a small GPT-2 trained on true CounterFact facts.

No model hub is reachable from this project, so it ships its own small model: a 4-layer,
256-wide GPT-2 (tied embeddings, the public GPT-2 tokenizer) trained from scratch, as plain
next-token language modelling, on the true facts of the first 2,000 records of the shipped
CounterFact edit file (``blens_fast/data/counterfact/counterfact-edit.json``).

Load it with :func:`blens_fast.load_default_model`. The package keeps the weights and the loader; the scripts that
trained and measured it live outside it: ``python scripts/train_default_model.py`` and
``python scripts/default_model_quality.py``.

The model was trained WITHOUT a leading BOS token: feed it the tokenizer's plain output.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = MODEL_DIR / "tokenizer"
WEIGHTS_FILE = "model.safetensors"
VOCAB_SIZE = 50257

__all__ = ["MODEL_DIR", "TOKENIZER_DIR", "load_default_tokenizer"]


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
