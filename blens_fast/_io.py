"""Files: atomic writes (a reader sees the old file or the new one, never half of one), digests, and the one
cache folder of the package."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """``$BLENS_FAST_CACHE``, else ``$XDG_CACHE_HOME/blens_fast``, else ``~/.cache/blens_fast``: compiled kernels
    and the whitening statistics of edits live here."""
    explicit = os.environ.get("BLENS_FAST_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "blens_fast"


def make_folder(path, name: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) if needed and check it can be written: a ``ValueError`` naming
    ``name``, the folder and why otherwise (never a bare errno)."""
    folder = Path(path)
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name} {str(path)!r}: {str(parent)!r} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{name} {str(path)!r} cannot be created: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {str(path)!r} is not writable")
    return folder


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, value, *, sort_keys: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=1, sort_keys=sort_keys, default=str) + "\n")


def atomic_write_table(path, table) -> Path:
    """A pyarrow table as a zstd-compressed Parquet file."""
    import pyarrow.parquet as pq

    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def atomic_save_tensors(path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Tensors as a safetensors file (no pickled code, unlike ``torch.save``)."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_json(path, what: str = "file"):
    """JSON from ``path``; a ``ValueError`` naming the file when it is missing, truncated or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {str(path)!r} is damaged (not valid JSON: {error}); delete it or restore it") \
            from None


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(folder) -> None:
    """Delete the temporary files a killed writer left in ``folder`` (never a finished file)."""
    for stray in Path(folder).glob(".*.tmp"):
        stray.unlink(missing_ok=True)
