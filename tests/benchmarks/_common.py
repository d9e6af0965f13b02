"""Helpers shared by the benchmark scripts in this folder (run as scripts, so imported as ``_common``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version


@contextlib.contextmanager
def silence_c_stdout() -> Iterator[None]:
    """Send C-level stdout to /dev/null (a PyBullet client prints its ``argv`` when it connects).

    Yields:
        Nothing; stdout is restored (and C's buffer flushed into /dev/null) on exit.
    """
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)


def summary(values: list[float]) -> dict[str, float]:
    """Median, min and max of one figure over the repeats."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def cell(values: list[float] | None, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    """Median on the first line, ``min-max`` (dim) on the second; ``-`` when there is no value."""
    if not values:
        return "-"
    v = [x * scale for x in values]
    med = format(statistics.median(v), fmt) + suffix
    if len(v) == 1:
        return med
    return f"{med}\n[dim]{format(min(v), fmt)}-{format(max(v), fmt)}[/dim]"


def verdict(ok: bool) -> str:
    """Coloured PASS/FAIL."""
    return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"


def package_version(name: str) -> str:
    """Installed version of ``name`` or ``"not installed"``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
