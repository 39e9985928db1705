"""Shared fixtures: tiny randomly initialised configs of every supported architecture."""
import os

import pytest
import torch

# Triton kernels run through the interpreter where no GPU is present; this must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

from blens_fast.default_model import TOKENIZER_DIR, load_default_tokenizer  # noqa: E402

VOCAB = 50257  # the shipped GPT-2 tokenizer's size, so that tiny models read real tokens

TINY_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB),
    "gptj": lambda: transformers.GPTJConfig(n_layer=2, n_embd=32, n_head=4, n_positions=64, rotary_dim=4,
                                            vocab_size=VOCAB),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                   intermediate_size=64, vocab_size=VOCAB),
    "gpt_neo": lambda: transformers.GPTNeoConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=VOCAB,
                                                 attention_types=[[["global", "local"], 1]], max_position_embeddings=64),
    "opt": lambda: transformers.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                          word_embed_proj_dim=32, vocab_size=VOCAB, max_position_embeddings=64),
    "llama": lambda: transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                              intermediate_size=48, vocab_size=VOCAB),
    "mistral": lambda: transformers.MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB),
    "qwen2": lambda: transformers.Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB),
}
ARCHITECTURES = list(TINY_CONFIGS)


def make_tiny_model(arch: str, dtype=torch.float32, seed: int = 0):
    """A tiny randomly initialised causal LM of a real architecture, in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).to(dtype)
    if getattr(model, "lm_head", None) is not None and arch == "gptj":
        torch.nn.init.normal_(model.lm_head.bias, std=0.1)  # make the unembedding bias matter
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return load_default_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_without_pad():
    """The raw GPT-2 tokenizer, which has no pad token."""
    return transformers.GPT2TokenizerFast(vocab=str(TOKENIZER_DIR / "vocab.json"),
                                          merges=str(TOKENIZER_DIR / "merges.txt"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A tiny GPT-2 saved as a local checkpoint (safetensors + tokenizer), as `--model PATH` reads it."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    make_tiny_model("gpt2").save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
