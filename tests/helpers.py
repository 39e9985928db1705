"""What many tests need: tiny random models of every supported architecture, independent references (float64
logits through the model's own modules, an autograd gradient from the model's own loss), and one check of a top-k
result against such a reference. Nothing here calls the code under test."""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import transformers

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
CUDA = torch.cuda.is_available()


def make_tiny_model(arch: str, dtype=torch.float32, seed: int = 0):
    """A tiny randomly initialised causal LM of a real architecture, in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).to(dtype)
    if getattr(model, "lm_head", None) is not None and arch == "gptj":
        torch.nn.init.normal_(model.lm_head.bias, std=0.1)  # make the unembedding bias matter
    return model.eval()


@contextmanager
def threads(n: int = 1):
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP waits that dominate small ops."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- independent references -------------------------------------------------------------------------------
def prompt_target_ids(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and of its target with a leading space, tokenized here (not by the package)."""
    target = target if target[:1].isspace() else " " + target
    return list(tokenizer(prompt)["input_ids"]), list(tokenizer(target, add_special_tokens=False)["input_ids"])


def autograd_loss(model, tokenizer, prompt: str, target: str) -> torch.Tensor:
    """``-sum_j log p(target_j | prompt, target_<j)`` of one unpadded example through the model's own forward:
    log_softmax, gather, sum (the teacher-forced loss, written independently of the package)."""
    p, t = prompt_target_ids(tokenizer, prompt, target)
    ids = torch.tensor([p + t[:-1]], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0]
    positions = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=ids.device)
    logp = logits[positions].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    return -logp[torch.arange(len(t), device=ids.device), torch.tensor(t, device=ids.device)].sum()


def lens_modules(model):
    """The model's own final norm (or None) and unembedding module, found through transformers' API."""
    head = model.get_output_embeddings()
    base = model.get_submodule({"gpt2": "transformer", "gptj": "transformer", "gpt_neo": "transformer",
                                "gpt_neox": "gpt_neox", "opt": "model.decoder"}.get(model.config.model_type, "model"))
    norm = next(getattr(base, n) for n in ("ln_f", "final_layer_norm", "norm") if hasattr(base, n))
    return norm, head


def lens_logits64(model, vectors: torch.Tensor, *, final_norm: bool = True, unit_norm: bool = False):
    """float64 logits of ``vectors`` read through the model's own final-norm and unembedding modules (copies in
    float64): the ground truth of the projection."""
    norm, head = lens_modules(model)
    h = vectors.detach().double()
    if unit_norm:
        h = torch.nn.functional.normalize(h, dim=-1)
    if final_norm:
        h = copy.deepcopy(norm).double().to(h.device)(h)
    logits = h @ head.weight.detach().double().T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias.detach().double()
    return logits


def float64_logits(h, w, b=None):
    logits = h.double() @ w.double().T
    return logits + b.double() if b is not None else logits


def check_topk(values, indices, logsumexp, truth, k: int, largest: bool, tol: float):
    """A top-k result is right when its values are the truth's logits at its indices, it is a valid top-k of the
    truth (each selected logit within ``tol`` of the k-th) with distinct indices in order, and its log-sum-exp is the
    row's."""
    vals, idx, lse = values.cpu().double(), indices.cpu(), logsumexp.cpu().double()
    truth = truth.cpu()
    n = truth.shape[0]
    assert vals.shape == (n, k) and idx.shape == (n, k)
    diffs = vals[:, 1:] - vals[:, :-1]
    assert (diffs <= 0).all() if largest else (diffs >= 0).all()
    assert all(len(set(r)) == k for r in idx.tolist())
    assert (vals - truth.gather(1, idx)).abs().max().item() <= tol
    kth = torch.topk(truth, k, dim=1, largest=largest).values[:, -1:]
    picked = truth.gather(1, idx)
    assert ((picked >= kth - tol) if largest else (picked <= kth + tol)).all()
    assert (lse - torch.logsumexp(truth, dim=1)).abs().max().item() <= tol
