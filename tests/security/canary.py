"""A canary: files outside the folders a call is given, hashed before and after it, to assert nothing reached them."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


class Canary:
    """Files under ``root`` (outside every folder handed to the code under test); :meth:`check` asserts that none
    was written, deleted, replaced or added to."""

    def __init__(self, root: Path, names=("victim.txt",)):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for name in names:
            (self.root / name).write_text(f"precious {name}\n")
        self.before = self._state()

    def refresh(self) -> None:
        """Take the files now under ``root`` (after a test moved some there) as the state to keep."""
        self.before = self._state()

    def path(self, name: str = "victim.txt") -> Path:
        return self.root / name

    def _state(self) -> dict:
        return {str(p.relative_to(self.root)): (hashlib.sha256(p.read_bytes()).hexdigest(), os.stat(p).st_ino)
                for p in sorted(self.root.rglob("*")) if p.is_file()}

    def check(self) -> None:
        assert self._state() == self.before, "a file outside the given folders was changed, deleted or added"
