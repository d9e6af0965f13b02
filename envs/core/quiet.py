"""Keep PyBullet's C-level ``argv[0]=`` print on connect off stdout (its import banner goes to stderr).

PyBullet writes with C ``printf``, which a Python redirect cannot catch: the file descriptor itself is
pointed at ``/dev/null`` for the block, and the C library's buffers are flushed *before* it is restored
(when stdout is a pipe or a file, C stdio buffers the text and would otherwise write it later, to
the real stdout, e.g. into a piped CLI table).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["stdout_to_devnull"]

_STDOUT_LOCK = threading.Lock()

try:  # the C library of this process (fflush(NULL) flushes every C stdio stream)
    _fflush = ctypes.CDLL(None).fflush
except (OSError, AttributeError):  # pragma: no cover - e.g. Windows without a global C library handle
    _fflush = None


def _flush_c_stdio() -> None:
    if _fflush is not None:
        _fflush(None)


@contextlib.contextmanager
def stdout_to_devnull() -> Iterator[None]:
    """Send file descriptor 1 to ``/dev/null`` for the block, C stdio buffers included.

    Serialised by a lock, so envs created from several threads restore stdout correctly; output
    another thread writes to fd 1 during the block (sub-millisecond for a connect) is lost. Without a
    real stdout (e.g. captured by a test runner) the block runs as is.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    with _STDOUT_LOCK:
        sys.stdout.flush()
        _flush_c_stdio()
        saved = os.dup(fd)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
            yield
        finally:
            _flush_c_stdio()  # what PyBullet printed goes to /dev/null now, not later to stdout
            os.dup2(saved, fd)
            os.close(saved)
            os.close(devnull)
