"""Portable, safe policy checkpoints: a directory with JSON metadata and safetensors weights.

On disk::

    <checkpoint>/
        policy.json            # {"format": "loopsim-policy", "format_version": 1, "kind": ...,
                               #  "loopsim_version", "observation_space", "action_space" (Minari JSON),
                               #  "policy": {kind-specific settings}, "config": {resolved config},
                               #  "provenance": {stores, episodes, timesteps...}}
        weights.safetensors    # named tensors (network weights, normalisation statistics); optional

Loading never unpickles anything: JSON is parsed with :func:`json.loads`, tensors with
:func:`safetensors.torch.load_file` (a format that holds only tensors, by design). A checkpoint is
written into a temporary sibling directory and moved into place with two renames (the old checkpoint
aside, the new one in), so a crash never leaves a half-written checkpoint: a kill between the two
renames leaves the old checkpoint in a ``.<name>.old-*`` sibling, which :func:`read_checkpoint` reads
until the next write puts a new checkpoint in place. Each write also removes the leftovers
(``.<name>.tmp-*``, ``.<name>.old-*``) of earlier killed writes. One writer per checkpoint path at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "is_checkpoint",
    "read_checkpoint",
    "write_checkpoint",
]

CHECKPOINT_FORMAT = "loopsim-policy"
#: Bumped when the layout changes incompatibly; newer checkpoints are refused with a clear message.
CHECKPOINT_FORMAT_VERSION = 1
_META = "policy.json"
_WEIGHTS = "weights.safetensors"


class CheckpointError(Exception):
    """A path is not a loopsim policy checkpoint, is damaged, or was written by a newer format."""


def _loopsim_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loopsim")
    except PackageNotFoundError:  # pragma: no cover - source checkout without install
        return "0+unknown"


def _finite_json(value: Any) -> Any:
    """Refuse NaN/inf in metadata (JSON has no such numbers; ``json.dumps`` would write invalid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"checkpoint metadata holds a non-finite number {value!r}")
    if isinstance(value, Mapping):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory with a loopsim ``policy.json``."""
    meta = Path(path) / _META
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == CHECKPOINT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_checkpoint(
    path: str | os.PathLike, metadata: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None
) -> Path:
    """Write a checkpoint directory atomically (replacing an existing checkpoint at ``path``).

    Args:
        path: The checkpoint directory. If it exists it must be a loopsim checkpoint (or empty).
        metadata: JSON-able mapping; must contain ``"kind"``. ``format``, ``format_version``,
            ``loopsim_version`` and (with tensors) ``weights_sha256``, checked by
            :func:`read_checkpoint`, are added.
        tensors: Named tensors to store in ``weights.safetensors`` (moved to CPU, made contiguous).

    Returns:
        The checkpoint path.

    Raises:
        ValueError: If ``metadata`` lacks ``kind`` or holds non-finite numbers, or a floating-point
            tensor holds NaN or infinite values (a diverged policy); nothing is written.
        TypeError: If ``metadata`` is not JSON-able.
        FileExistsError: If ``path`` exists and is neither a checkpoint nor an empty directory
            (nothing is changed).
        OSError: If writing fails (e.g. a full disk; safetensors' own I/O error is raised as one);
            the previous checkpoint at ``path`` is kept.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if "kind" not in metadata:
        raise ValueError("checkpoint metadata needs a 'kind'")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "loopsim_version": _loopsim_version(),
        **_finite_json(dict(metadata)),
    }
    bad = _non_finite_tensors(dict(tensors or {}))
    if bad:  # a diverged policy: its first action would be NaN, refused by every env
        raise ValueError(
            f"the policy's weights {bad} hold NaN or infinite values (training diverged: e.g. lower the "
            f"learning rate); no checkpoint was written to {path}"
        )
    if path.exists() and not (is_checkpoint(path) or (path.is_dir() and not any(path.iterdir()))):
        raise FileExistsError(f"{path} exists and is not a loopsim policy checkpoint; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if tensors:
            try:
                save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                          str(tmp / _WEIGHTS))
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - SafetensorError wraps I/O errors (a full disk)
                if "I/O error" not in str(exc):
                    raise
                # an OSError, as every other write's failure is: the commands print it as one line
                raise OSError(f"cannot write the checkpoint {path}: {exc}") from None
            # safetensors checks the header, not the numbers: a flipped bit in a weight went unseen
            meta["weights_sha256"] = hashlib.sha256((tmp / _WEIGHTS).read_bytes()).hexdigest()
        text = json.dumps(meta, indent=2, sort_keys=False)
        with open(tmp / _META, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _share_as_umask_allows(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            old.rmdir()
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _process_umask() -> int:
    """This process's umask (Linux: read from ``/proc``; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - not Linux
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def _share_as_umask_allows(folder: Path) -> None:
    """Give a checkpoint folder and its files the modes ``mkdir`` and ``open`` would have given them.

    ``tempfile.mkdtemp`` makes the folder 0700 and safetensors writes the weights 0600, whatever the
    umask: a checkpoint written under umask 022 could not be read by anyone else, so a "portable"
    checkpoint could not be deployed by another user or a service account.
    """
    mask = _process_umask()
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)


def _leftovers(path: Path, kind: str) -> list[Path]:
    return sorted(p for p in path.parent.glob(f".{path.name}.{kind}-*") if p.is_dir() and not p.is_symlink())


def _clean_leftovers(path: Path) -> None:
    """Before a write: restore an old checkpoint orphaned by a kill between the renames, drop temporaries."""
    olds = [p for p in _leftovers(path, "old") if is_checkpoint(p)]
    if not path.exists() and olds:
        os.replace(olds[-1], path)
    for p in _leftovers(path, "tmp") + _leftovers(path, "old"):
        shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a checkpoint's metadata and tensors without unpickling anything.

    Args:
        path: The checkpoint directory.

    Returns:
        ``(metadata, tensors)``; ``tensors`` is empty when the checkpoint has no weights.

    Raises:
        CheckpointError: If ``path`` is missing, not a checkpoint, damaged (weights holding NaN or
            infinite values included), or of a newer format.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        # A writer killed between its two renames left the previous checkpoint aside: read that one.
        olds = [p for p in _leftovers(path, "old") if is_checkpoint(p)]
        if olds:
            path = olds[-1]
    meta_file = path / _META
    if not meta_file.is_file():
        # a training run or a loop iteration folder: its checkpoint is inside
        hint = f"; it holds one: {path / 'checkpoint'}" if is_checkpoint(path / "checkpoint") else ""
        raise CheckpointError(f"{path} is not a loopsim policy checkpoint (no {_META}){hint}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta_file} is damaged: {exc}") from None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != CHECKPOINT_FORMAT
        or not isinstance(meta.get("kind"), str)
    ):
        raise CheckpointError(f"{meta_file} is not loopsim policy metadata")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written with checkpoint format {version!r} (loopsim {meta.get('loopsim_version')}); "
            f"this loopsim reads format <= {CHECKPOINT_FORMAT_VERSION}: upgrade loopsim"
        )
    tensors: dict[str, torch.Tensor] = {}
    weights = path / _WEIGHTS
    if "weights_sha256" in meta and not weights.exists():
        raise CheckpointError(f"{weights} is missing ({meta_file.name} records its sha256)")
    if weights.exists():
        recorded = meta.get("weights_sha256")  # absent from checkpoints of older loopsim versions
        try:
            if recorded is not None and hashlib.sha256(weights.read_bytes()).hexdigest() != recorded:
                raise CheckpointError(
                    f"{weights} is damaged: its sha256 differs from the one {meta_file.name} records"
                )
            tensors = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights} is damaged: {exc}") from None
    bad = _non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(
            f"{weights} holds NaN or infinite values in {bad}: the policy's training diverged (or the "
            "file was damaged); it cannot act"
        )
    return meta, tensors


def _non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [
        k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
