"""Write files whole or not at all: a temporary file in the same folder, renamed into place.

Every file loopsim writes into a store, a run directory or its model cache goes through here, so a
crash (an exception, Ctrl-C, a killed process) leaves either the previous file or the new one, never
a truncated one, and no temporary file behind unless the process itself is killed mid-write (then
a ``.<name>.<hex>.partial`` file may remain next to the target; it is never read).

The rename is ``os.replace``, atomic on POSIX file systems when source and target are in the same
folder (POSIX ``rename(2)``). Temporary names are unique per call (``uuid4``), so concurrent writers
of the same target (processes or threads) never write into each other's file: the last rename wins
with a whole file. Files are created with the process umask, as ``open`` would.

This module imports nothing from the rest of loopsim, so ``loopsim.envs`` and ``loopsim.datasets``
can use it without importing the CLI or training modules.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_path", "atomic_write"]


def _temporary(path: Path, keep_suffix: bool) -> Path:
    tag = uuid.uuid4().hex[:12]
    if keep_suffix:  # writers that pick the format from the file name (imageio) see the same suffix
        return path.with_name(f".{path.stem}.{tag}.partial{path.suffix}")
    return path.with_name(f".{path.name}.{tag}.partial")


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, keep_suffix: bool = True, mkdir: bool = True
) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block ends cleanly.

    For writers that take a file name (e.g. ``imageio.imwrite``). The temporary file is removed if the
    block raises (or never created it: then ``path`` is left as it was).

    Args:
        path: The target file.
        keep_suffix: Give the temporary name the target's suffix (``.mp4``, ``.gif``...).
        mkdir: Create the target's folder first if it does not exist.

    Yields:
        The temporary path (not yet created).

    Raises:
        FileNotFoundError: If the block ends without having written the temporary file.
        OSError: From the rename (e.g. ``path`` is a directory); the temporary file is removed.
    """
    path = path if isinstance(path, Path) else Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, keep_suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:  # also Ctrl-C; no unlink after a successful rename (a wasted syscall)
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "w", *, fsync: bool = False, mkdir: bool = True, **kwargs: Any
) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; rename it onto ``path`` when the block ends cleanly.

    Args:
        path: The target file.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        fsync: Flush the file to the disk before the rename (survives a power cut, not only a crash of
            the process; costs a disk round trip).
        mkdir: Create the target's folder if it does not exist (only then: one failed ``open`` first).
        **kwargs: Passed to ``open`` (``encoding``, ``newline``...); text mode defaults to UTF-8.

    Yields:
        The open file object.

    Raises:
        ValueError: If ``mode`` is not ``"w"`` or ``"wb"``.
        OSError: From creating, writing or renaming the file; the temporary file is removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r} must be 'w' or 'wb'")
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    path = path if isinstance(path, Path) else Path(path)
    tmp = _temporary(path, keep_suffix=False)
    exclusive = mode.replace("w", "x")
    try:
        f = open(tmp, exclusive, **kwargs)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        if not mkdir:
            raise
        # The folder is made only when missing: most writes go to existing folders, and a store
        # writes many small files, so no mkdir call is paid per file.
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, exclusive, **kwargs)  # noqa: SIM115
    try:
        with f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(
    path: str | os.PathLike[str], data: str | bytes | Any, *, fsync: bool = False, mkdir: bool = True
) -> Path:
    """Write ``data`` (text as UTF-8, or any bytes-like object) to ``path`` whole or not at all.

    Args:
        path: The target file.
        data: The whole content: ``str``, or ``bytes`` / ``bytearray`` / ``memoryview`` / any object
            with the buffer protocol (e.g. a NumPy array's or zarr buffer's bytes).
        fsync: See :func:`atomic_open`.
        mkdir: Create the target's folder if it does not exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: If ``data`` is neither ``str`` nor bytes-like.
        OSError: From creating, writing or renaming the file; ``path`` is then unchanged.
    """
    if not isinstance(data, str):
        try:
            data = memoryview(data)
        except TypeError:
            raise TypeError(f"data must be str or bytes-like, got {type(data).__name__}") from None
    path = path if isinstance(path, Path) else Path(path)
    with atomic_open(path, "w" if isinstance(data, str) else "wb", fsync=fsync, mkdir=mkdir) as f:
        f.write(data)
    return path
