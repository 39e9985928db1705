"""The whitened key of the forward shift: ``C^-1 a_n / (a_n^T C^-1 a_n)`` with ``C`` the (uncentred) second moment
of FF2 inputs at the edited layer, estimated from forward passes over a text set.

The estimate takes one pass over the texts (every layer's ``C`` at once, with a progress bar) and is cached in
memory and on disk under ``<cache>/ff2_whitening`` (:func:`blens_fast._io.cache_dir`: ``$BLENS_FAST_CACHE``, else
``$XDG_CACHE_HOME/blens_fast``), keyed by the model's weights fingerprint, the texts and the ridge. A cache entry
that is damaged, of the wrong shape, not finite or a symbolic link is recomputed (with a warning); a cache folder that
is a symbolic link is not used.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._checks import as_str_list
from .._io import atomic_save_tensors, cache_folder, read_bytes, remove_inside
from .._ui import progress_bar
from ..context import ModelContext, with_context
from ..forward import eval_mode
from ..records import fact_texts, load_counterfact


@dataclass(frozen=True)
class Whitening:
    """``inverse = (C + ridge * tr(C)/d * I)^-1`` for the FF2-input second moment ``C`` at ``layer``."""

    layer: int
    inverse: torch.Tensor = field(repr=False)
    ridge: float
    num_tokens: int
    key: str = ""


_CACHE: dict[str, Whitening] = {}


def default_whitening_texts() -> list[str]:
    """True-fact sentences of records 2,000-3,999 of the shipped CounterFact edit file (6,000 sentences): outside
    both the evaluated records (0-999) and the default model's calibration records (1,000-1,999)."""
    return fact_texts(load_counterfact()[2000:4000])


@with_context
def ff2_whitening(ctx: ModelContext, layer: int, texts=None, *, ridge: float = 1e-2, batch_size: int = 64,
                  file_cache: bool = True, progress: bool = True) -> Whitening:
    """Estimate ``C = E[a a^T]`` of ``mlp.out`` inputs at ``layer`` over every token of ``texts`` and invert it.

    Called as ``ff2_whitening(model, tokenizer, layer)`` or ``ff2_whitening(ctx, layer)``.
    ``texts`` default to :func:`default_whitening_texts`. Cached in memory and (``file_cache``) on disk (module
    docstring). One pass over the texts estimates every layer's ``C`` (all are cached), so other layers are free
    afterwards.
    """
    (layer,) = ctx.check_layers([layer])
    texts = default_whitening_texts() if texts is None else as_str_list(texts, "texts")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
        raise ValueError(f"ridge={ridge!r}: expected a positive number")
    h = hashlib.sha256(f"{ctx.weights_fingerprint()};ridge={ridge!r};".encode())
    h.update("\x00".join(texts).encode())
    base = h.hexdigest()[:24]
    keys = {l: f"{base}-layer{l}" for l in range(ctx.num_layers)}
    if keys[layer] in _CACHE:
        return _CACHE[keys[layer]]
    folder = _cache_folder() if file_cache else None
    if folder is not None:
        width = ctx.gradient_shape(layer, "mlp.out")[0]  # FF2's input width
        found = _read_entry(folder, folder / f"{keys[layer]}.safetensors", width)
        if found is not None:
            inverse, count = found
            _CACHE[keys[layer]] = Whitening(layer, inverse.to(ctx.device), ridge, count, keys[layer])
            return _CACHE[keys[layer]]
    moments, count = _ff2_moments(ctx, texts, batch_size, progress)
    for l, moment in moments.items():
        moment /= count
        moment.diagonal().add_(ridge * moment.diagonal().sum() / moment.shape[0])
        inverse = torch.linalg.inv(moment).float()
        _CACHE[keys[l]] = Whitening(l, inverse, ridge, count, keys[l])
        if folder is not None:
            try:
                atomic_save_tensors(folder / f"{keys[l]}.safetensors",
                                    {"inverse": inverse, "num_tokens": torch.tensor(count)})
            except (OSError, ValueError) as error:  # the cache is an optimisation only
                warnings.warn(f"whitening statistics not cached ({error})", stacklevel=3)
    return _CACHE[keys[layer]]


def _cache_folder() -> Path | None:
    """``<cache>/ff2_whitening``, or None (with a warning) when it cannot be used: a symbolic link or a file stands in
    its place, or it cannot be created."""
    try:
        return cache_folder("ff2_whitening")
    except ValueError as error:
        warnings.warn(f"whitening statistics are not read from or written to the cache: {error}", stacklevel=3)
        return None


def _read_entry(folder: Path, path: Path, width: int) -> tuple[torch.Tensor, int] | None:
    """The cached ``(inverse, token count)`` at ``path``, or None when there is none. A damaged entry (not a
    safetensors file, not a regular file, another shape, not finite) is deleted with a warning: it is recomputed."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not (path.exists() or path.is_symlink()):
        return None
    try:
        data = load(read_bytes(path))  # one read, never through a link
        inverse, count = data["inverse"], data["num_tokens"]
        if inverse.dtype != torch.float32 or tuple(inverse.shape) != (width, width):
            raise ValueError(f"inverse is {inverse.dtype} {tuple(inverse.shape)}, expected float32 ({width}, {width})")
        if not bool(torch.isfinite(inverse).all()):
            raise ValueError("inverse holds NaN or Inf")
        if count.dtype != torch.int64 or count.numel() != 1 or int(count) < 1:
            raise ValueError(f"num_tokens is {count.dtype} {tuple(count.shape)}, expected a positive int64")
    except (SafetensorError, ValueError, KeyError, OSError) as error:
        warnings.warn(f"whitening cache entry {str(path)!r} is damaged ({error}): recomputing it", stacklevel=4)
        remove_inside(folder, path)
        return None
    return inverse, int(count)


@torch.no_grad()
def _ff2_moments(ctx: ModelContext, texts, batch_size: int, progress: bool):
    """Sum over every real token of ``a a^T`` per layer (float64) and the token count, in one pass."""
    tokenizer = ctx.require_tokenizer()
    limit = ctx.max_positions
    token_lists = [t for t in (tuple(tokenizer(text)["input_ids"])[:limit] for text in texts) if t]
    layers = range(ctx.num_layers)
    moments: dict[int, torch.Tensor] = {}
    kept: dict[int, torch.Tensor] = {}
    pre = {(l, "mlp.out"): (lambda m, args, l=l: kept.__setitem__(l, args[0].detach())) for l in layers}
    count = 0
    starts = range(0, len(token_lists), batch_size)
    with ctx.hooks(pre=pre), eval_mode(ctx.model):
        for start in progress_bar(starts, desc="whitening statistics", unit="batch", enabled=progress):
            ids, mask = ctx.pad(token_lists[start:start + batch_size])
            ctx.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.bool().reshape(-1)
            for l in layers:
                a = kept[l].reshape(real.shape[0], -1)[real].float()
                part = (a.T @ a).double()
                moments[l] = part if l not in moments else moments[l].add_(part)
            count += int(real.sum())
    if count == 0:
        raise ValueError("texts gave no tokens to estimate the FF2-input covariance from")
    return moments, count
