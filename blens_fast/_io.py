"""Files: atomic writes (a reader sees the old file or the new one, never half of one), digests, the one cache
folder of the package, and the rules that keep a folder from being turned against its user: files are opened
without following symbolic links, a folder holding links is refused (naming them), and nothing outside a folder is
deleted on its behalf."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
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


# -- opening files safely ---------------------------------------------------------------------------------
_NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a planted FIFO cannot block the open


def open_regular(path, flags: int = os.O_RDONLY, *, follow: bool = False, mode: int = 0o644) -> int:
    """A file descriptor of the regular file ``path``: never through a symbolic link (unless ``follow``), never a
    FIFO or device. With ``os.O_CREAT`` in ``flags`` a missing file is created with ``O_EXCL`` (so the file opened
    is the one created) and an existing one is opened as it is; a file opened for writing must have no other hard
    link (writing it would change a file elsewhere). Anything else is a ``ValueError`` naming the path."""
    path = str(path)
    extra = (os.O_CLOEXEC | os.O_NONBLOCK) if follow else _NO_FOLLOW
    try:
        if flags & os.O_CREAT:
            try:
                fd = os.open(path, flags | os.O_EXCL | extra, mode)
            except FileExistsError:
                fd = os.open(path, flags & ~os.O_CREAT | extra)
        else:
            fd = os.open(path, flags | extra)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError(f"{path!r} is a symbolic link (to {os.readlink(path)!r}): refusing to follow it; "
                             "remove it") from None
        raise
    info = os.fstat(fd)
    writing = flags & (os.O_WRONLY | os.O_RDWR)
    why = ("is not a regular file" if not stat.S_ISREG(info.st_mode) else
           f"has {info.st_nlink - 1} other hard link(s), which writing it would change" if writing and info.st_nlink > 1
           else None)
    if why:
        os.close(fd)
        raise ValueError(f"{path!r} {why}: refusing to open it; remove it")
    os.set_blocking(fd, True)
    return fd


def read_bytes(path, *, follow: bool = False) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`)."""
    with os.fdopen(open_regular(path, follow=follow), "rb") as f:
        return f.read()


def symlinks_below(folder) -> list[Path]:
    """Every symbolic link inside ``folder``, at any depth (links are not followed), sorted."""
    found, pending = [], [Path(folder)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    found.append(Path(entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
    return sorted(found)


def resolves_inside(folder, path) -> bool:
    """Whether ``path``, with every symbolic link on it resolved, lies inside ``folder`` (resolved too)."""
    root = os.path.realpath(folder)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def named_links(folder, links: list[Path], most: int = 5) -> str:
    """``'a/b' -> 'target', ...`` for the links inside ``folder`` (the first ``most``, then how many more)."""
    named = ", ".join(f"{str(p.relative_to(folder))!r} -> {os.readlink(p)!r}" for p in links[:most])
    return named + (f" and {len(links) - most} more" if len(links) > most else "")


def refuse_symlinks(folder, what: str = "output folder") -> None:
    """A ``ValueError`` naming the symbolic links inside ``folder``: reads and writes through them would reach
    files outside it."""
    links = symlinks_below(folder)
    if links:
        raise ValueError(f"{what} {str(folder)!r} holds symbolic links ({named_links(folder, links)}): refusing to "
                         "read or write through them; remove them or choose another folder")


def make_folder(path, what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) if needed and check it can be written: a ``ValueError`` naming
    ``what``, the folder and why otherwise (never a bare errno)."""
    folder = Path(path)
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{what} {str(path)!r} cannot be created: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r} is not writable")
    return folder


def cache_folder(*names: str) -> Path:
    """The folder ``names`` (one level each) inside :func:`cache_dir`, created: a ``ValueError`` when it, or a folder
    between it and the cache folder, is a symbolic link or a file (what the package writes or builds there would land
    elsewhere). The cache folder itself may be a link: the user chose it."""
    folder = make_folder(cache_dir(), "cache folder")
    for name in names:
        folder = folder / name
        if folder.is_symlink():
            raise ValueError(f"cache folder {str(folder)!r} is a symbolic link (to {os.readlink(folder)!r}): refusing "
                             "to read, write or build through it; remove it")
        make_folder(folder, "cache folder")
    return folder


def remove_inside(folder, path) -> None:
    """Delete the file ``path`` (a link itself, never what it points to) when its folder lies inside ``folder``; a
    ``ValueError`` when it resolves outside."""
    parent = Path(path).parent
    if not resolves_inside(folder, parent):
        raise ValueError(f"refusing to delete {str(path)!r}: it resolves to {os.path.realpath(parent)!r}, outside "
                         f"{str(folder)!r}")
    Path(path).unlink(missing_ok=True)


# -- atomic writes -----------------------------------------------------------------------------------------
def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path`` (created here, exclusively), flush it to disk, then
    rename it over ``path``. A symbolic link at ``path`` is refused, never written through or replaced."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{str(path)!r} is a symbolic link (to {os.readlink(path)!r}): refusing to write through or "
                         "replace it; remove it or choose another path")
    tmp = _temporary(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o644))
        write(tmp)
        fd = open_regular(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
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


def read_json(path, what: str = "file", *, follow: bool = True):
    """JSON from the regular file ``path`` (through a symbolic link only when ``follow``); a ``ValueError`` naming
    the file when it is missing, truncated or not JSON."""
    path = Path(path)
    try:
        return json.loads(read_bytes(path, follow=follow).decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {str(path)!r} is damaged (not valid JSON: {error}); delete it or restore it") \
            from None


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with os.fdopen(open_regular(path, follow=True), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(folder) -> None:
    """Delete the temporary files a killed writer left in ``folder`` (never a finished file)."""
    for stray in Path(folder).glob(".*.tmp"):
        remove_inside(folder, stray)
