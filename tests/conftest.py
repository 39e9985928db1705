"""Shared fixtures (the models and helpers themselves are in tests/helpers.py)."""
import os

import pytest
import torch

# Triton kernels run through the interpreter where no GPU is present; this must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from blens_fast.default_model import TOKENIZER_DIR, load_default_tokenizer  # noqa: E402

from .helpers import make_tiny_model, threads  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return load_default_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_without_pad():
    """The raw GPT-2 tokenizer, which has no pad token."""
    import transformers

    return transformers.GPT2TokenizerFast(vocab=str(TOKENIZER_DIR / "vocab.json"),
                                          merges=str(TOKENIZER_DIR / "merges.txt"))


@pytest.fixture(scope="module")
def one_thread():
    """Use with ``pytestmark = pytest.mark.usefixtures("one_thread")`` in modules of many small-op tests."""
    with threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A tiny GPT-2 saved as a local checkpoint (safetensors + tokenizer), as `--model PATH` reads it."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    make_tiny_model("gpt2").save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
