"""What the user reads while work runs: one progress bar style (on stderr) and counted nouns."""
from __future__ import annotations

import sys


def progress_bar(iterable=None, *, total=None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 leave: bool = False):
    """A tqdm bar on stderr (a no-op bar with the same methods when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, initial=initial, leave=leave,
                file=sys.stderr, dynamic_ncols=True)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``"1 prompt"``, ``"3 prompts"``, ``"0 records"`` (``nouns``: an irregular plural)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
