"""Argument checks shared by the public calls: each names the bad value and what was expected."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def as_str_list(value, name: str) -> list[str]:
    """A string or a sequence of strings as a list of non-empty strings."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = list(value)
    else:
        raise TypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    if not items:
        raise ValueError(f"{name} is empty: expected at least one string")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(item).__name__}: {item!r}")
        if not item.strip():
            raise ValueError(f"{name}[{i}] is empty ({item!r}): expected a non-empty string")
    return items


def check_positive_int(value, name: str, *, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < 1 or (upper is not None and value > upper):
        bound = f"between 1 and {upper}" if upper is not None else "at least 1"
        raise ValueError(f"{name}={value} is out of range: expected {bound}")
    return value


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def check_tensor(value, name: str, *, ndim: int | None = None, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value
