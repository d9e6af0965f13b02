"""loopsim.atomic: files written whole or not at all, with no temporary file left behind."""

import os
import stat
import threading

import numpy as np
import pytest

from loopsim.atomic import atomic_open, atomic_path, atomic_write


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


def test_atomic_write_text_bytes_and_buffers(tmp_path):
    assert atomic_write(tmp_path / "a.txt", "héllo\n") == tmp_path / "a.txt"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    atomic_write(tmp_path / "c.bin", np.arange(3, dtype=np.uint8))  # any buffer
    atomic_write(tmp_path / "d.bin", memoryview(b"xyz"))
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01\x02"
    assert (tmp_path / "d.bin").read_bytes() == b"xyz"
    atomic_write(tmp_path / "a.txt", "second", fsync=True)  # replaces
    assert (tmp_path / "a.txt").read_text() == "second"
    assert _leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(target, "w", newline="") as f:
        f.write("half of the new")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "v.mp4") as tmp:  # Ctrl-C too
        tmp.write_bytes(b"partial video")
        raise KeyboardInterrupt
    assert not (tmp_path / "v.mp4").exists() and _leftovers(tmp_path) == []


def test_folders_are_made_only_when_asked(tmp_path):
    atomic_write(tmp_path / "x" / "y" / "z.json", "{}")
    assert (tmp_path / "x" / "y" / "z.json").read_text() == "{}"
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "z.json", "{}", mkdir=False)
    assert not (tmp_path / "missing").exists()


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="str or bytes-like, got int"):
        atomic_write(tmp_path / "a", 3)
    with pytest.raises(ValueError, match="mode='a' must be 'w' or 'wb'"), atomic_open(tmp_path / "a", "a"):
        pass
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):  # a directory is not replaced by a file
        atomic_write(tmp_path / "dir", "text")
    assert (tmp_path / "dir").is_dir() and _leftovers(tmp_path) == []


def test_temporary_names_keep_the_suffix_for_format_detection(tmp_path):
    with atomic_path(tmp_path / "episode.gif") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".gif" and tmp.name.startswith(".episode.")
        tmp.write_bytes(b"GIF89a")
    assert (tmp_path / "episode.gif").read_bytes() == b"GIF89a"


def test_files_get_the_umask_permissions_as_open_gives(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a", "x")
        (tmp_path / "b").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o644


def test_concurrent_writers_never_mix_their_files(tmp_path):
    target = tmp_path / "shared.txt"
    texts = [str(i) * 50_000 for i in range(8)]
    errors = []

    def write(text):
        try:
            for _ in range(20):
                atomic_write(target, text)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text() in texts
    assert _leftovers(tmp_path) == []
