"""The Backward Lens's lists, defined once.

A *list* is one of the lens's token lists: the ``k`` tokens a factor of a module's gradient ranks first when it is
read through the model's own lens (final norm + unembedding), with the target's rank in the same order. Every
layer above (the lens report, the plain-PyTorch reference, the bulk Parquet rows, the bench) reads this table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LensList:
    """One list: its ``name``, the public ``module`` whose gradient factor it reads, that ``factor`` (``"x"``: the
    forward inputs, ``"delta"``: the VJPs at the output) and its direction (``largest``: top tokens, else bottom)."""

    name: str
    module: str
    factor: str
    largest: bool


#: The paper's lists, in report order: FF1's forward inputs' top tokens (what the FF1 gradient writes through its
#: rows); FF2's VJPs' bottom tokens (gradient descent subtracts delta, so what an update promotes) and top tokens
#: (what it demotes).
LISTS: tuple[LensList, ...] = (
    LensList("ff1_top", "mlp.in", "x", True),
    LensList("ff2_bottom", "mlp.out", "delta", False),
    LensList("ff2_top", "mlp.out", "delta", True),
)
#: list name -> :class:`LensList`
BY_NAME: dict[str, LensList] = {entry.name: entry for entry in LISTS}
#: the list names, in report order
LIST_NAMES: tuple[str, ...] = tuple(BY_NAME)
#: the modules the lists read, in report order
LENS_MODULES: tuple[str, ...] = tuple(dict.fromkeys(entry.module for entry in LISTS))


def by_factor() -> dict[tuple[str, str], tuple[str, ...]]:
    """The list names grouped by the ``(module, factor)`` they read, in report order: every group is one set of
    vectors, read in one pass over the vocabulary."""
    groups: dict[tuple[str, str], list[str]] = {}
    for entry in LISTS:
        groups.setdefault((entry.module, entry.factor), []).append(entry.name)
    return {key: tuple(names) for key, names in groups.items()}
