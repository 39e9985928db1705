"""Loading a model for the command line: the shipped default, or a local transformers checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch


def load_model(spec: str = "default", *, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, tokenizer)`` in eval mode for ``spec``: ``"default"`` (the shipped model) or a local folder.

    A folder must hold a ``transformers`` causal LM saved as safetensors (``config.json`` and
    ``*.safetensors``) and its tokenizer; remote code is never run and nothing is downloaded.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one-line output on the command line
    if spec == "default":
        from .default_model import load_default_model

        return load_default_model(dtype=dtype, device=device)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--model {spec!r}: no such directory (expected 'default' or a local checkpoint folder)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {spec!r}: no config.json in that folder: expected a transformers checkpoint")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ValueError(f"--model {spec!r}: no *.safetensors weights in that folder"
                         + (f" (found {', '.join(found)}; only safetensors checkpoints are loaded)" if found else ""))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
