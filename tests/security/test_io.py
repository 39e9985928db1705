"""The file rules every writer shares (blens_fast._io): opens that never follow a link or block on a FIFO, writes
that never go through a link or into a hard-linked file, deletes that never leave the folder."""
import os

import pytest

from blens_fast._io import (atomic_write_text, make_folder, open_regular, read_bytes, refuse_symlinks, remove_inside,
                            symlinks_below)


def test_open_regular_refuses_links_fifos_and_hard_links(tmp_path, canary):
    (tmp_path / "link").symlink_to(canary.path())
    with pytest.raises(ValueError, match="link' is a symbolic link .*victim.txt"):
        open_regular(tmp_path / "link", os.O_RDWR | os.O_CREAT)
    assert read_bytes(tmp_path / "link", follow=True) == canary.path().read_bytes()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="fifo' is not a regular file"):
        read_bytes(tmp_path / "fifo")
    os.link(canary.path(), tmp_path / "hard")
    assert read_bytes(tmp_path / "hard") == canary.path().read_bytes()  # reading one is harmless
    with pytest.raises(ValueError, match="hard' has 1 other hard link"):
        open_regular(tmp_path / "hard", os.O_RDWR)
    fd = open_regular(tmp_path / "new", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    assert (tmp_path / "new").is_file() and not (tmp_path / "new").is_symlink()
    canary.check()


def test_atomic_writes_never_go_through_a_link(tmp_path, canary):
    (tmp_path / "out.txt").symlink_to(canary.path())
    with pytest.raises(ValueError, match="out.txt' is a symbolic link"):
        atomic_write_text(tmp_path / "out.txt", "overwritten")
    os.link(canary.path(), tmp_path / "hard.txt")
    atomic_write_text(tmp_path / "hard.txt", "mine")  # replaces the entry: the other link keeps its content
    assert (tmp_path / "hard.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.txt", "out.txt", "outside"]  # no temporary left
    canary.check()


def test_deletes_never_leave_the_folder(tmp_path, canary):
    folder = make_folder(tmp_path / "run")
    (folder / "segments").symlink_to(canary.root)
    with pytest.raises(ValueError, match="refusing to delete .*victim.txt'.*outside"):
        remove_inside(folder, folder / "segments" / "victim.txt")
    (folder / "own").symlink_to(canary.path())
    remove_inside(folder, folder / "own")  # the link itself, never what it points to
    assert not (folder / "own").is_symlink()
    canary.check()


def test_links_are_found_at_any_depth(tmp_path, canary):
    folder = tmp_path / "run"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "b" / "deep").symlink_to(canary.path())
    (folder / "top").symlink_to(canary.root)
    assert symlinks_below(folder) == [folder / "a" / "b" / "deep", folder / "top"]
    with pytest.raises(ValueError, match=r"holds symbolic links \('a/b/deep' -> .*, 'top' -> "):
        refuse_symlinks(folder)
    with pytest.raises(ValueError, match="is a file"):
        make_folder(canary.path())
    canary.check()
