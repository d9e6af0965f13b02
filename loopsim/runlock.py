"""One process at a time per output directory: a non-blocking file lock (filelock) or a clear error."""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["acquire_or_refuse"]


def acquire_or_refuse(directory: Path, lock_name: str, command: str, option: str,
                      error: type[Exception]) -> FileLock:
    """Take ``directory/lock_name`` at once, or raise ``error`` naming the command holding it.

    Args:
        directory: The output directory (must exist).
        lock_name: File name of the lock inside it.
        command: The command that uses such directories (``"loopsim loop"``), for the message.
        option: The option that picks another directory (``"--run-dir"``), for the message.
        error: Exception class raised when another process holds the lock.

    Returns:
        The acquired lock; the caller releases it.

    Raises:
        error: If another process holds the lock.
    """
    lock = FileLock(directory / lock_name)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise error(
            f"{directory} is in use by another `{command}` (its lock {directory / lock_name} is held); "
            f"wait for it to finish, or give another {option}"
        ) from None
    return lock
