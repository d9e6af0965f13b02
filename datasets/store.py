"""The episode store: a crash-safe Zarr v3 group of episodes.

On-disk tree (``N`` = total steps, ``E`` = episodes; shapes with time first)::

    <store>/zarr.json                 attrs["loopsim"]: schema_version, loopsim_version, env_id,
                                      env_kwargs, observation_space, action_space (Minari's JSON),
                                      step_extras, created (ISO 8601 UTC)
    data/observation                  (N + E, *obs_shape)   T+1 rows per episode (Box, Discrete...)
    data/observation/<key>            (N + E, *shape)       instead, for a Dict observation space
    data/action                       (N, *action_shape)
    data/reward                       (N,) float64
    data/terminated, data/truncated   (N,) bool
    data/expert_action                (N, *action_shape)    optional step extras, declared at creation
    data/intervention, data/is_success (N,) bool            optional step extras
    meta/episode_ends                 (E,) int64            cumulative step counts: THE COMMIT INDEX
    meta/seed (int64, -1 = unknown), meta/site (str), meta/site_params (str, JSON),
    meta/policy_id (str), meta/policy_version (str), meta/iteration (int64), meta/return (float64),
    meta/length (int64), meta/success (bool), meta/failure_mode (str, "" = none),
    meta/interventions (int64), meta/wall_time (float64, seconds), meta/tags (str, JSON)
    pending/<first>.log               write-ahead log of committed episodes not yet merged into the
                                      arrays (local stores; ``<first>.<n>.log`` if that name is taken)
    pending/<index>.episode           the same, one object per episode (remote stores, and local stores
                                      written by loopsim versions before the log; both are read)
    .loopsim-writer.lock              the writer's lock (local stores)

Episode ``i`` owns steps ``episode_ends[i-1]:episode_ends[i]`` and observation rows
``episode_ends[i-1] + i : episode_ends[i] + i + 1`` (``episode_ends[-1] = 0``).

Commit protocol (why a kill loses at most the episode in flight, and why recording is cheap):

0. :meth:`EpisodeStore.create` takes the lock, writes the ``data``/``meta`` group and array
   documents, and the root ``zarr.json`` (the loopsim attributes) last: that write makes the
   directory a store. A kill before it leaves no store: ``open`` says so (``FileNotFoundError``)
   and ``create`` replaces the leftovers (only files such a create writes; anything else in the
   directory, a symbolic link or another key under a remote prefix, makes it not a leftover, never
   deleted). ``create`` looks again under the lock before deleting them: another process may have
   finished a store there meanwhile. ``overwrite=True`` first marks the old root document
   (``overwriting``) and deletes it last, so a killed overwrite leaves a store that ``open`` refuses
   (never one read as whole with part of its files gone) and the next overwrite replaces.
1. :meth:`EpisodeStore.add_episode` commits the whole episode with one write. Its payload is a
   *pending object*: :data:`PENDING_MAGIC`, a u64 header length, a JSON header (metadata, array
   dtypes and shapes), the arrays' raw bytes.

   - Local stores: a writer session appends each episode as one framed *record* to a segment
     ``pending/<first index>.log`` that it created and keeps open (``O_APPEND``), with one ``writev``
     call: :data:`RECORD_MAGIC`, the episode index (u64), the payload length (u64), a CRC32 of those
     and the payload (u32), then the payload. A record is committed once it is whole and its CRC
     matches: a kill during the write leaves a torn tail that every reader ignores. (One new file
     per episode, written and renamed, cost 2-4x this append here: creating the file dominated.)
   - Remote (fsspec) stores: one ``pending/<index>.episode`` object, one PUT, atomic by nature.

   ``add_episode`` returning means the bytes are in the operating system's page cache: they survive
   the process being killed (SIGKILL, a crash). Nothing is fsync'ed, so a power cut or a kernel
   crash may lose the last seconds of episodes (and leave a torn tail, handled as above).
2. Every ``flush_every`` episodes (and on :meth:`~EpisodeStore.flush` / :meth:`~EpisodeStore.close`)
   the writer closes its segment (the next episode starts a new one) and a background thread merges
   the pending episodes into the chunked, compressed arrays, in this order: ``data/*``, then
   ``meta/*`` columns, then ``meta/episode_ends`` last, then it deletes the segments (and objects)
   whose episodes the index now holds. Episodes are thus written many at a time, so chunks hold
   many episodes, not one each.
3. A reader takes the longest valid (strictly increasing, positive) prefix of ``episode_ends``, then
   the pending episodes that continue it without a gap. Segments are read in order of their first
   index, each up to its first invalid record (cut short, bad CRC, unexpected index): with one
   writer at a time a torn record can only be a segment's last, and a writer resuming after a kill
   starts a new segment at the next index, so there is no gap and no duplicate. Rows beyond the
   prefix (a merge killed midway) are ignored and overwritten by the next merge; pending episodes
   already covered by the index are ignored. A gap (an episode missing before later ones) is
   damage: opening refuses the store. So is an invalid record followed by a whole record with a
   matching CRC (a flipped bit in the middle of the log, not a kill): treating it as a torn tail
   would hide, and ``repair`` would delete, committed episodes after it.

Zarr rewrites a chunk by writing a whole new object and renaming it over the old one, so a chunk
shared by committed episodes and the tail being merged is never seen half written. Opening a store
(to read or to append) never changes a file; :meth:`EpisodeStore.check` reports a killed writer's
leftovers (rows past the index, merged segments, a segment's torn or invalid tail, ``*.partial``
files) and :meth:`EpisodeStore.repair` removes them (truncating a torn tail after the last whole
record).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import json
import operator
import os
import re
import shutil
import socket
import struct
import sys
import threading
import time
import urllib.parse
import uuid
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import filelock
import gymnasium as gym
import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import ZarrUserWarning
from zarr.storage import FsspecStore, LocalStore, StorePath

from loopsim.atomic import atomic_write
from loopsim.datasets.schema import (
    SCHEMA_VERSION,
    STEP_EXTRAS,
    Episode,
    EpisodeMetadata,
    NotAStoreError,
    StoreDamagedError,
    StoreError,
    StoreLockedError,
    StoreSchemaError,
    check_space,
    flatten_observation,
    space_from_json,
    space_to_json,
    to_plain,
)

__all__ = ["META_COLUMNS", "EpisodeStore", "StoreCheck"]

META_COLUMNS: dict[str, str] = {
    "seed": "int64", "site": "str", "site_params": "str", "policy_id": "str", "policy_version": "str",
    "iteration": "int64", "return": "float64", "length": "int64", "success": "bool",
    "failure_mode": "str", "interventions": "int64", "wall_time": "float64", "tags": "str",
}
"""The per-episode metadata columns under ``meta/`` and their dtypes (``str`` = Zarr string)."""

LOCK_NAME = ".loopsim-writer.lock"
_DOC_PARTIAL = re.compile(r"\.zarr\.json\.[0-9a-f]+\.partial")  # atomic_write's temporary zarr.json
_GROUP_DOC: dict[str, Any] = {"attributes": {}, "zarr_format": 3, "node_type": "group"}
"""The Zarr v3 document of a group without attributes (what zarr 3.1 writes for ``data``, ``meta``)."""
_OVERWRITING = "overwriting"
"""Root attribute (``loopsim`` group) an overwrite sets before deleting the old store's files."""
PENDING = "pending"
CHUNK_BYTES = 1 << 20
"""Target uncompressed bytes per data chunk (1 MiB): large enough that a chunk holds many
episodes and compresses well, small enough that rewriting the partial last chunk at each merge is
cheap."""
MAX_CHUNK_ROWS = 16384
FLUSH_EVERY = 1024
"""Default episodes per merge (or 16 MiB of them, whichever comes first). Each merge rewrites every
array's metadata document and last partial chunk (~40 small objects) and, in a background thread,
competes with the writer for the interpreter: on 2 busy cores, writing 1000 episodes, four merges of
~256 took ~3x the time of one merge of 1000 and slowed the writer's own ``add_episode`` calls ~1.5x.
Committed episodes wait in the append-only pending log, so merging less often costs no safety (a
writer holds its unmerged episodes in memory: 16 MiB at most, 32 MiB while a merge is running)."""
META_CHUNK_ROWS = 1024
#: Every chunk is zstd-compressed with zstd's content checksum (xxhash64 of the chunk, verified by
#: every read): a flipped bit or a chunk cut short reads as an error (``StoreDamagedError``), not as
#: other numbers. Stores created before 2026-12-01 have no checksums and read as before.
_ZSTD = ZstdCodec(level=3, checksum=True)
_ZSTD_STR = ZstdCodec(level=0, checksum=True)  # level 0: zarr's default for strings
#: Root attribute (True) of stores whose writers write every chunk, also one that is all zeros (zarr
#: skips those by default and reads a missing chunk as zeros): a chunk missing from such a store's
#: committed rows is damage, which :meth:`EpisodeStore.check` reports.
_ALL_CHUNKS = "all_chunks_written"


def _writing(array: zarr.Array) -> zarr.Array:
    """``array`` writing every chunk, also one of fill values only (see :data:`_ALL_CHUNKS`)."""
    return array.with_config({"write_empty_chunks": True})
PENDING_SUFFIX = ".episode"
_PENDING_RE = re.compile(r"^pending/(\d{12})\.episode$")
PENDING_MAGIC = b"LOOPSIM-EPISODE-1\n"
"""First bytes of a pending object; then a little-endian uint64 header length, the JSON header
(``{"metadata": {...}, "arrays": [{"key", "dtype", "shape", "offset", "nbytes"}, ...]}``) and the
arrays' raw C-order bytes. (``np.savez``'s zip container cost ~5x more than the write itself.)"""
SEGMENT_SUFFIX = ".log"
_SEGMENT_RE = re.compile(r"^(\d{12})(?:\.(\d+))?\.log$")
RECORD_MAGIC = b"LSEPREC1"
_RECORD_HEAD = struct.Struct("<8sQQI")
"""A pending-log record: :data:`RECORD_MAGIC`, the episode index (u64), the payload length (u64), the
CRC32 of those 24 bytes followed by the payload (u32), all little-endian; then the payload, which is
a whole pending object (:data:`PENDING_MAGIC` ...)."""


def _loopsim_version() -> str:
    try:
        return version("loopsim")
    except PackageNotFoundError:  # pragma: no cover - running from a tree without an install
        return "0+unknown"


def _creation_key(key: str) -> bool:
    """Whether ``key`` is one that :meth:`EpisodeStore.create` writes before the root document."""
    return key == LOCK_NAME or (key.startswith(("data/", "meta/")) and key.endswith("/zarr.json"))


def _is_local(url: str | os.PathLike) -> bool:
    return isinstance(url, os.PathLike) or "://" not in str(url) or str(url).startswith("file://")


def _local_path(url: str | os.PathLike) -> Path:
    """The directory of a local store: a path, ``~/...``, or ``file:///abs`` / ``file://localhost/abs``.

    A file URL's path is percent-decoded (RFC 8089, as ``Path.as_uri()`` writes it: a space is ``%20``).
    """
    text = os.fspath(url)
    if text.startswith("file://"):
        rest = text[len("file://"):]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        elif not rest.startswith("/"):
            raise ValueError(f"{text}: a file URL must be file:///absolute/path (or file://localhost/...)")
        return Path(urllib.parse.unquote(rest))
    return Path(text).expanduser()


class _InlineLocalStore(LocalStore):
    """zarr's ``LocalStore`` doing its file I/O inline on zarr's event loop, not one thread hop per call.

    ``LocalStore`` sends every get/set/delete through ``asyncio.to_thread``; on a busy 2-core machine
    the hop cost more than the small write itself (creating a store and the final merge at ``close``
    are ~20 small objects each: array metadata documents, metadata-column chunks). The files are the
    same: every object is written to a temporary ``*.partial`` file and renamed into place, as
    ``LocalStore`` does (only the parent directories are created on demand, not checked per write).
    """

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Buffer | None:
        """Read ``key`` (``None`` if absent), inline (byte ranges, unused by the store, as zarr does)."""
        if byte_range is not None:
            return await super().get(key, prototype, byte_range)
        if not self._is_open:
            await self._open()
        try:
            data = (self.root / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(data)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Buffer | None]:
        """Read several keys / byte ranges, inline."""
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def set(self, key: str, value: Buffer) -> None:
        """Write ``key`` atomically (temporary file + rename), inline."""
        await self._set(key, value)

    async def _set(self, key: str, value: Buffer, exclusive: bool = False) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(f"LocalStore.set(): value must be a Buffer, got {type(value)}")
        path = self.root / key
        if exclusive and path.exists():  # set_if_not_exists (we are the only writer: the lock)
            return
        atomic_write(path, value.as_buffer_like())

    async def delete(self, key: str) -> None:
        """Delete ``key`` (a directory: recursively), inline."""
        self._check_writable()
        path = self.root / key
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    async def exists(self, key: str) -> bool:
        """Whether ``key`` is a file."""
        return (self.root / key).is_file()


def _array_metadata(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Zarr v3 metadata document zarr 3.1 writes for an array spec of ``_create_arrays``.

    Covers the store's arrays: zstd-compressed little-endian bool / int / uint / float arrays with a
    zero fill value, and zstd-compressed strings (``vlen-utf8``). ``None`` for anything else (zarr then
    creates the array). ``tests/datasets/test_store.py`` checks the documents against
    zarr's own for every dtype the store creates.
    """
    chunks = [int(c) for c in spec["chunks"]]
    common = {"shape": [int(n) for n in spec["shape"]],
              "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
              "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
              "attributes": {}, "zarr_format": 3, "node_type": "array", "storage_transformers": []}
    compressors = spec.get("compressors")
    if not isinstance(compressors, ZstdCodec):
        return None
    zstd = {"name": "zstd", "configuration": {"level": compressors.level, "checksum": compressors.checksum}}
    if spec["dtype"] is str:
        return {**common, "data_type": "string", "fill_value": "",
                "codecs": [{"name": "vlen-utf8", "configuration": {}}, zstd]}
    dtype = np.dtype(spec["dtype"])
    if (dtype.kind not in "biuf" or dtype.itemsize not in (1, 2, 4, 8) or not dtype.isnative
            or spec.get("fill_value") != 0):
        return None
    fill: Any = False if dtype.kind == "b" else 0.0 if dtype.kind == "f" else 0
    raw: dict[str, Any] = ({"name": "bytes"} if dtype.itemsize == 1
                           else {"name": "bytes", "configuration": {"endian": sys.byteorder}})
    return {**common, "data_type": dtype.name, "fill_value": fill, "codecs": [raw, zstd]}


def _data_keys(observation_space: gym.Space, step_extras: Sequence[str]) -> list[str]:
    obs = ([f"observation/{k}" for k in observation_space.spaces]
           if isinstance(observation_space, gym.spaces.Dict) else ["observation"])
    return [*obs, "action", "reward", "terminated", "truncated", *step_extras]


def _is_obs(key: str) -> bool:
    return key == "observation" or key.startswith("observation/")


def _locked(method: Any) -> Any:
    """Run a reading method under the store's state lock (a writer's merge thread updates that state)."""
    @functools.wraps(method)
    def wrapper(self: EpisodeStore, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise StoreError(f"{self.url}: the store is closed")
        with self._state:
            return method(self, *args, **kwargs)
    return wrapper


class StoreCheck:
    """Result of :meth:`EpisodeStore.check`.

    Attributes:
        episodes: Committed episodes.
        problems: Damage that :meth:`EpisodeStore.repair` cannot undo (data and metadata disagree).
        uncommitted: Leftovers of a killed writer that ``repair`` removes (rows past the index,
            index entries never completed, pending objects or log segments already merged, a log
            segment's torn or invalid tail, temporary files).
    """

    def __init__(self, episodes: int, problems: list[str], uncommitted: list[str]) -> None:
        """Hold the findings (see the class attributes)."""
        self.episodes = episodes
        self.problems = problems
        self.uncommitted = uncommitted

    @property
    def ok(self) -> bool:
        """True when there is neither damage nor an uncommitted tail."""
        return not self.problems and not self.uncommitted


class EpisodeStore:
    """A Zarr v3 group of episodes with a crash-safe commit protocol (see the module docstring).

    Make one with :meth:`create` (a new store, the only writer) or :meth:`open` (``mode="r"`` to
    read, ``"a"`` to append). Use it as a context manager, or call :meth:`close`: a writer's close
    merges the pending episodes into the arrays and releases the lock.

    Reading: ``len(store)`` episodes, :meth:`episode` (random access), :meth:`metadata` (columns),
    :meth:`select` (queries), :meth:`load` (whole arrays for training), :meth:`refresh` (see episodes
    committed by a concurrent writer).

    Args:
        url: Local directory (``str`` or path) or any fsspec URL zarr understands (``memory://x``,
            ``s3://bucket/x`` ...).
    """

    def __init__(self, url: str | os.PathLike, *, _mode: str, _flush_every: int = FLUSH_EVERY,
                 _flush_bytes: int = 16 << 20) -> None:
        """Use :meth:`create` or :meth:`open` instead."""
        self.url = os.fspath(url)
        if not str(self.url).strip():
            raise ValueError("an episode store needs a path or URL, got an empty string")
        if isinstance(_flush_every, bool) or int(_flush_every) < 1:
            raise ValueError(f"flush_every must be an integer >= 1, got {_flush_every!r}")
        self.mode = _mode
        self.flush_every = int(_flush_every)
        self.flush_bytes = int(_flush_bytes)
        self._lock: filelock.BaseFileLock | None = None
        self._remote_lock: str | bool = False  # the owner record we wrote, for remote stores
        self._closed = False
        self._pending: dict[int, Episode] = {}          # writer: committed, not yet merged
        self._pending_bytes = 0
        self._pending_meta: dict[int, EpisodeMetadata] = {}  # reader cache of pending metadata
        # Writers merge in a background thread (see flush); this lock guards the committed-state
        # fields (_ends, _n_merged, _n_pending, _pending, _pending_meta) that the merge updates.
        self._state = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        self._merge_future: Future | None = None
        self._pending_dir: Path | None = None  # local stores: pending/ once resolved and created
        # Where each committed, unmerged episode is: ("obj", key) for a pending object, ("log", name,
        # offset, length, crc) for a record of a local pending-log segment (see _list_pending).
        self._pending_locs: dict[int, tuple[Any, ...]] = {}
        self._segment_cache: dict[str, _Segment] = {}  # parsed segments, re-read from their valid end
        # Writer (local stores): the segment being appended to, and every segment this session knows
        # with the last episode index it holds (-1: none), to delete them once merged.
        self._seg_fd: int | None = None
        self._seg_name: str | None = None
        self._seg_size = 0
        self._segments: dict[str, int] = {}
        self._zstore = self._make_zarr_store(read_only=_mode == "r")

    # ----------------------------------------------------------------- construction

    def _make_zarr_store(self, read_only: bool) -> Any:
        if _is_local(self.url):
            return _InlineLocalStore(_local_path(self.url), read_only=read_only)
        try:
            return FsspecStore.from_url(self.url, read_only=read_only)
        except ImportError as exc:  # fsspec names the package to install, e.g. "Install s3fs to access S3"
            raise StoreError(f"{self.url}: {exc}") from None
        except ValueError as exc:  # e.g. "Protocol not known: foo"
            raise StoreError(f"{self.url} is not a URL fsspec can open ({exc})") from None

    @classmethod
    def create(
        cls,
        url: str | os.PathLike,
        *,
        observation_space: gym.Space,
        action_space: gym.Space,
        env_id: str = "",
        env_kwargs: Mapping[str, Any] | None = None,
        step_extras: Sequence[str] = (),
        overwrite: bool = False,
        flush_every: int = FLUSH_EVERY,
        attrs: Mapping[str, Any] | None = None,
    ) -> EpisodeStore:
        """Create a new, empty store and open it for writing (holding the writer lock).

        Args:
            url: Where (see the class docstring).
            observation_space: Space of the observations (Box, Discrete, MultiDiscrete, MultiBinary,
                or a Dict of those).
            action_space: Space of the actions (Box, Discrete, MultiDiscrete, MultiBinary).
            env_id: Gymnasium id of the env the episodes come from.
            env_kwargs: The kwargs the env was made with (JSON-able), so that it can be rebuilt.
            step_extras: Optional per-step arrays every episode will carry; any of
                :data:`~loopsim.datasets.schema.STEP_EXTRAS`.
            overwrite: Replace an existing loopsim store at ``url``. Never replaces anything else.
            flush_every: Merge the pending episodes into the arrays (in a background thread) every
                this many episodes, or sooner when they hold 16 MiB (e.g. camera images). Until then
                they are committed in the pending log (and held in memory for the merge).
            attrs: Extra JSON-able attributes stored under ``attrs["loopsim"]["user"]``.

        Returns:
            The store, open for writing.

        Raises:
            FileExistsError: If ``url`` already holds a store (or anything) and ``overwrite`` is False.
            NotAStoreError: If ``overwrite`` is True but ``url`` holds something that is not a loopsim
                store (it is left untouched).
            StoreLockedError: If another writer holds the existing store.
            TypeError / ValueError: For an unsupported space, unknown extra or non-JSON kwargs.
        """
        check_space(observation_space, "observation")
        check_space(action_space, "action")
        unknown = sorted(set(step_extras) - set(STEP_EXTRAS))
        if unknown:
            raise ValueError(f"unknown step_extras {unknown}; allowed: {sorted(STEP_EXTRAS)}")
        if int(flush_every) < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        try:
            json.dumps(dict(env_kwargs or {}))
            json.dumps(dict(attrs or {}))
        except TypeError as exc:
            raise TypeError(f"env_kwargs and attrs must be JSON-able: {exc}") from None

        self = cls(url, _mode="w", _flush_every=flush_every)
        existing = self._exists()
        if existing:
            if not overwrite:
                try:
                    cls._read_root_attrs(self._zstore, self.url, overwrite=True)
                except NotAStoreError as exc:  # neither suggestion below would work
                    raise FileExistsError(f"{self.url} already exists: {exc}; EpisodeStore.create writes "
                                          "only into a new or empty directory: choose another path") from None
                except StoreError:  # a store, damaged or newer: open() says how
                    pass
                raise FileExistsError(f"{self.url} already exists; open it with EpisodeStore.open(url, "
                                      "mode='a') to append, or pass overwrite=True to replace it")
            cls._read_root_attrs(self._zstore, self.url, overwrite=True)  # refuses non-stores
        self._acquire_lock()
        try:
            if not existing and self._exists():
                # Another process created a store (or wrote anything) here between the look above and
                # the lock: look again, under the lock, before deleting anything as leftovers.
                if not overwrite:
                    raise FileExistsError(f"{self.url} was created by another writer meanwhile; open it "
                                          "with EpisodeStore.open(url, mode='a') to append")
                cls._read_root_attrs(self._zstore, self.url, overwrite=True)
                existing = True
            if existing:
                self._wipe()
            else:
                self._wipe_interrupted_create()
            step_extras = [e for e in STEP_EXTRAS if e in set(step_extras)]
            docs = self._array_documents(observation_space, action_space, step_extras)
            info = {
                "schema_version": SCHEMA_VERSION,
                "loopsim_version": _loopsim_version(),
                "env_id": env_id,
                "env_kwargs": dict(env_kwargs or {}),
                "observation_space": space_to_json(observation_space),
                "action_space": space_to_json(action_space),
                "step_extras": step_extras,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "user": dict(attrs or {}),
                _ALL_CHUNKS: True,
            }
            # Creation commits like an episode does: the group and array documents first, the root
            # zarr.json (with the loopsim attributes, what makes the directory a store) last, in one
            # atomic write. A kill before it leaves no store, only leftovers that create() replaces
            # and open() reports as no store; a kill after it leaves a whole, empty store.
            self._write_documents({**{f"{g}/zarr.json": _GROUP_DOC for g in ("data", "meta")},
                                   **{f"{name}/zarr.json": doc for name, doc in docs.items()}})
            self._write_documents({"zarr.json": {**_GROUP_DOC, "attributes": {"loopsim": info}}})
            group = zarr.open_group(self._zstore, mode="r+")
            # The new, empty store's state is known: no need to read back what was just written.
            self.info = info
            self.observation_space = observation_space
            self.action_space = action_space
            self.step_extras = step_extras
            self.data_keys = _data_keys(observation_space, step_extras)
            self._group = group
            self._arrays = {name: _writing(zarr.Array(zarr.AsyncArray(metadata=doc, store_path=StorePath(
                self._zstore, name)))) for name, doc in docs.items()}
            self._ends = np.zeros(0, dtype=np.int64)
            self._n_merged = 0
            self._n_pending = 0
        except BaseException:
            self._release_lock()
            raise
        return self

    @classmethod
    def open(cls, url: str | os.PathLike, mode: str = "r", *, flush_every: int = FLUSH_EVERY) -> EpisodeStore:
        """Open an existing store to read (``"r"``) or append (``"a"``). Never changes committed data.

        Args:
            url: Where (see the class docstring).
            mode: ``"r"`` (read only; any number of readers, also while a writer appends) or ``"a"``
                (append; takes the writer lock).
            flush_every: For ``"a"``: merge pending episodes every this many episodes (or 16 MiB).

        Returns:
            The store.

        Raises:
            FileNotFoundError: If nothing exists at ``url``.
            NotAStoreError: If ``url`` is not a loopsim episode store.
            StoreSchemaError: If the store was written by a newer schema version.
            StoreDamagedError: If its files are inconsistent beyond what a killed writer leaves.
            StoreLockedError: For ``"a"``, if another writer holds the lock.
            ValueError: For another ``mode``.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' (read) or 'a' (append), got {mode!r}; "
                             "use EpisodeStore.create(...) for a new store")
        self = cls(url, _mode=mode, _flush_every=flush_every)
        if not self._exists():
            left = ((not _is_local(self.url) or _local_path(self.url).is_dir())
                    and self._interrupted_create())
            raise FileNotFoundError(f"no episode store at {self.url}" + (
                " (only what an interrupted EpisodeStore.create left there; create() replaces it)"
                if left else ""))
        cls._read_root_attrs(self._zstore, self.url)
        if mode == "a":
            self._load_layout()  # refuse a damaged store before the lock file is created in it
            self._acquire_lock()
        try:
            self._load_layout()
            if mode == "a":
                for i in self._pending_indices():
                    self._pending[i] = self._read_pending(i)
                    self._pending_bytes += _episode_nbytes(self._pending[i])
                self._segments = {seg.name: seg.last for seg in self._list_pending()[1]}
        except BaseException:
            self._release_lock()
            raise
        return self

    # ----------------------------------------------------------------- small helpers

    def _exists(self) -> bool:
        """Whether ``url`` holds a store or anything else (what ``create`` must not write over).

        What an interrupted :meth:`create` leaves (see :meth:`_interrupted_create`) counts as nothing.
        """
        if _is_local(self.url):
            path = _local_path(self.url)
            return path.exists() and (not path.is_dir() or self._interrupted_create() is None)
        return bool(sync(self._zstore.exists("zarr.json"))) or self._interrupted_create() is None

    def _interrupted_create(self) -> list[Any] | None:
        """What a killed :meth:`create` left at ``url``, or ``None`` if it holds anything else.

        ``create`` writes the lock, then group and array documents (``data/**/zarr.json``,
        ``meta/**/zarr.json``), and the root ``zarr.json`` last (locally, each through a ``*.partial``
        temporary file that a kill may leave). A place holding nothing but those, without the root
        document, is such a leftover (an empty directory, or no key at all, too); anything else, a
        root ``zarr.json`` or a symbolic link (``create`` writes none) makes it not one.

        Returns:
            Local stores: the leftover files (``Path``); remote stores: the leftover keys (``str``).
        """
        if not _is_local(self.url):
            async def keys() -> list[str]:
                return [k async for k in self._zstore.list_prefix("")]

            found = sync(keys())
            return None if any(not _creation_key(k) for k in found) else found
        root = _local_path(self.url)
        if os.path.lexists(root / "zarr.json"):  # a store (or not one): no need to list its files
            return None
        files: list[Path] = []

        def refuse(exc: OSError) -> None:  # an unreadable folder: what it holds is unknown
            raise exc

        for child in root.iterdir():
            if child.is_symlink():
                return None
            if child.name == LOCK_NAME or _DOC_PARTIAL.fullmatch(child.name):
                if not child.is_file():
                    return None
                files.append(child)  # the lock, or the root document's temporary file
            elif child.name in ("data", "meta") and child.is_dir():
                for folder, dirs, names in os.walk(child, onerror=refuse):
                    if any(os.path.islink(os.path.join(folder, d)) for d in dirs):
                        return None
                    for name in names:
                        path = Path(folder) / name
                        if ((name != "zarr.json" and not _DOC_PARTIAL.fullmatch(name))
                                or path.is_symlink() or not path.is_file()):
                            return None
                        files.append(path)
            else:
                return None
        return files

    def _wipe_interrupted_create(self) -> None:
        """Delete what an interrupted :meth:`create` left (only that: never data of anything else).

        Called by ``create`` under the writer lock, after it found only such leftovers there.

        Raises:
            FileExistsError: If ``url`` now holds anything else (nothing is deleted).
        """
        left = self._interrupted_create()
        if left is None:
            raise FileExistsError(f"{self.url} holds files that EpisodeStore.create does not write; "
                                  "not replacing them")
        if _is_local(self.url):
            root = _local_path(self.url)
            for path in left:
                if path.name != LOCK_NAME:
                    path.unlink(missing_ok=True)
            for name in ("data", "meta"):  # then their folders, now empty (rmdir: never a file)
                if (root / name).is_dir():
                    for folder, _, _ in os.walk(root / name, topdown=False):
                        os.rmdir(folder)
            return

        async def wipe() -> None:
            await asyncio.gather(*(self._zstore.delete(k) for k in left if k != LOCK_NAME))

        sync(wipe())

    @staticmethod
    def _read_root_attrs(zstore: Any, url: str, *, overwrite: bool = False) -> dict[str, Any]:
        """The root document's ``loopsim`` attributes, refusing anything that is not a usable store.

        Args:
            zstore: The zarr store.
            url: Its URL, for messages.
            overwrite: For ``create(overwrite=True)``: accept a store an interrupted overwrite was
                deleting (marked in its root document, see :meth:`_wipe`), which ``open`` refuses.

        Raises:
            NotAStoreError, StoreDamagedError, StoreSchemaError: See :meth:`open`.
        """
        if _is_local(url) and _local_path(url).is_file():
            raise NotAStoreError(f"{url} is a file, not a loopsim episode store (a directory)")
        raw = sync(zstore.get("zarr.json", prototype=default_buffer_prototype()))
        if raw is None:
            raise NotAStoreError(f"{url} is not a loopsim episode store: it has no zarr.json")
        try:
            meta = json.loads(raw.to_bytes())
        except (ValueError, UnicodeDecodeError):
            raise StoreDamagedError(f"{url}/zarr.json is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
            raise NotAStoreError(f"{url} is not a loopsim episode store: not a Zarr v3 group")
        info = meta.get("attributes", {}).get("loopsim")
        if not isinstance(info, dict) or "schema_version" not in info:
            raise NotAStoreError(f"{url} is a Zarr group but not a loopsim episode store "
                                 "(no 'loopsim' attributes)")
        if not isinstance(info["schema_version"], int):
            raise StoreDamagedError(f"{url}: schema_version {info['schema_version']!r} is not an integer")
        if _OVERWRITING in info and not overwrite:
            raise StoreDamagedError(
                f"{url}: an interrupted overwrite (EpisodeStore.create(..., overwrite=True), started "
                f"{info[_OVERWRITING]}) was deleting this store's files; create it again with "
                "overwrite=True (collect mode=overwrite) to replace it")
        if info["schema_version"] > SCHEMA_VERSION:
            raise StoreSchemaError(
                f"{url} has schema version {info['schema_version']} (written by loopsim "
                f"{info.get('loopsim_version', '?')}); this loopsim ({_loopsim_version()}) reads up to "
                f"version {SCHEMA_VERSION}: upgrade loopsim to read it")
        return info

    def _acquire_lock(self) -> None:
        if _is_local(self.url):
            path = _local_path(self.url)
            path.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(path / LOCK_NAME, timeout=0)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise StoreLockedError(
                    f"{self.url} is open for writing by another writer (lock {path / LOCK_NAME}); "
                    "one writer at a time. Readers may open it with mode='r'.") from None
            self._lock = lock
            return
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                            "token": uuid.uuid4().hex})
        buf = default_buffer_prototype().buffer.from_bytes(owner.encode())
        try:
            sync(self._zstore.set_if_not_exists(LOCK_NAME, buf))
        except NotImplementedError:  # pragma: no cover - stores without conditional writes
            pass
        got = sync(self._zstore.get(LOCK_NAME, prototype=default_buffer_prototype()))
        if got is None or got.to_bytes().decode() != owner:
            held = got.to_bytes().decode() if got is not None else "?"
            raise StoreLockedError(f"{self.url} is open for writing by another writer ({held}); remove "
                                   f"the key {LOCK_NAME!r} if that writer is dead")
        self._remote_lock = owner

    def writer_active(self) -> bool | None:
        """Whether a writer (another process, or this object) holds the store's writer lock now.

        Returns:
            ``True``/``False`` for local stores (the lock file is tried without waiting and released at
            once); for remote stores ``True`` when the lock key exists (its writer may be dead), else
            ``False``; ``None`` when it cannot be told (e.g. a read-only directory).
        """
        if self._lock is not None or self._remote_lock:
            return True
        if not _is_local(self.url):
            got = sync(self._zstore.get(LOCK_NAME, prototype=default_buffer_prototype()))
            return got is not None
        lock_file = _local_path(self.url) / LOCK_NAME
        if not lock_file.exists():
            return False
        probe = filelock.FileLock(lock_file, timeout=0)
        try:
            probe.acquire()
        except filelock.Timeout:
            return True
        except OSError:
            return None
        probe.release()
        return False

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._remote_lock:
            held = sync(self._zstore.get(LOCK_NAME, prototype=default_buffer_prototype()))
            if held is not None and held.to_bytes().decode() == self._remote_lock:  # only our own lock
                sync(self._zstore.delete(LOCK_NAME))
            self._remote_lock = False

    def _wipe(self) -> None:
        """Delete an existing loopsim store's content (create with overwrite=True only).

        First the root ``zarr.json`` is marked (the attribute ``overwriting``), and it goes last: a
        wipe killed midway leaves a recognisable store that ``open`` refuses (never a store missing
        some of its files, read as if whole) and ``overwrite=True`` replaces again, never an anonymous
        directory nothing would touch.
        """
        info = self._read_root_attrs(self._zstore, self.url, overwrite=True)
        now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        marked = {**_GROUP_DOC, "attributes": {"loopsim": {**info, _OVERWRITING: now}}}
        self._write_documents({"zarr.json": marked})
        if _is_local(self.url):
            root = _local_path(self.url)
            for child in root.iterdir():
                if child.name in (LOCK_NAME, "zarr.json"):
                    continue
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            (root / "zarr.json").unlink(missing_ok=True)
        else:  # every key but our lock
            async def wipe() -> None:
                keys = [k async for k in self._zstore.list_prefix("") if k not in (LOCK_NAME, "zarr.json")]
                await asyncio.gather(*(self._zstore.delete(k) for k in keys))
                await self._zstore.delete("zarr.json")

            sync(wipe())

    @staticmethod
    def _array_documents(obs_space: gym.Space, act_space: gym.Space,
                         step_extras: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The Zarr v3 metadata document of every array of a new store, by array path."""
        subspaces = obs_space.spaces if isinstance(obs_space, gym.spaces.Dict) else {"": obs_space}
        specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for key, sub in subspaces.items():
            specs[f"observation/{key}" if key else "observation"] = (sub.shape, sub.dtype)
        specs["action"] = (act_space.shape, act_space.dtype)
        specs["reward"] = ((), np.dtype(np.float64))
        specs["terminated"] = ((), np.dtype(bool))
        specs["truncated"] = ((), np.dtype(bool))
        for extra in step_extras:
            specs[extra] = ((act_space.shape, act_space.dtype) if extra == "expert_action"
                            else ((), np.dtype(bool)))
        arrays: dict[str, dict[str, Any]] = {}
        for key, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            row = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            rows = int(max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // row)))
            # zstd for images too: on rendered 84x84 frames it was ~7x faster than Blosc-zstd with
            # bitshuffle and compressed twice as well (tests/benchmarks/store_throughput.py), and it is
            # built into zarr, so any process that has zarr decodes it.
            arrays[f"data/{key}"] = {"shape": (0, *shape), "chunks": (rows, *shape), "dtype": dtype,
                                     "compressors": _ZSTD, "fill_value": 0}
        for key, dtype in META_COLUMNS.items():
            if dtype == "str":
                arrays[f"meta/{key}"] = {"shape": (0,), "chunks": (META_CHUNK_ROWS,), "dtype": str,
                                         "compressors": _ZSTD_STR}
            else:
                arrays[f"meta/{key}"] = {"shape": (0,), "chunks": (META_CHUNK_ROWS,), "dtype": dtype,
                                         "compressors": _ZSTD, "fill_value": 0}
        arrays["meta/episode_ends"] = {"shape": (0,), "chunks": (META_CHUNK_ROWS,), "dtype": "int64",
                                       "compressors": _ZSTD, "fill_value": 0}
        docs = {name: _array_metadata(spec) for name, spec in arrays.items()}
        # The documents are built directly: zarr's create_array cost ~2 ms of checks per array, most
        # of a new store's creation (a recorder creates one per job). zarr builds any other one.
        scratch = None
        for name, doc in docs.items():
            if doc is None:
                scratch = scratch or zarr.open_group(zarr.storage.MemoryStore(), mode="w")
                docs[name] = scratch.create_array(name, **arrays[name]).metadata.to_dict()
        return docs  # type: ignore[return-value]

    def _write_documents(self, docs: Mapping[str, Mapping[str, Any]]) -> None:
        """Write JSON documents by key, each atomically (local: temporary file + rename; remote: a PUT)."""
        proto = default_buffer_prototype()

        async def put_all() -> None:  # concurrently: one event-loop round trip, not one per document
            await asyncio.gather(*(self._zstore.set(key, proto.buffer.from_bytes(
                json.dumps(doc, indent=2).encode())) for key, doc in docs.items()))

        sync(put_all())

    def _load_layout(self) -> None:
        """(Re)open the group and arrays and compute the committed state."""
        info = self._read_root_attrs(self._zstore, self.url)
        self.info: dict[str, Any] = info
        try:
            self.observation_space: gym.Space = space_from_json(info["observation_space"])
            self.action_space: gym.Space = space_from_json(info["action_space"])
        except Exception as exc:
            raise StoreDamagedError(f"{self.url}: cannot read the stored spaces: {exc}") from None
        self.step_extras: list[str] = list(info.get("step_extras", []))
        self.data_keys = _data_keys(self.observation_space, self.step_extras)
        group = zarr.open_group(self._zstore, mode="r" if self.mode == "r" else "r+")
        self._group = group
        self._arrays: dict[str, zarr.Array] = {}
        for key in [f"data/{k}" for k in self.data_keys] + [f"meta/{k}" for k in META_COLUMNS] + [
                "meta/episode_ends"]:
            try:
                node = group[key]
            except KeyError:
                raise StoreDamagedError(f"{self.url}: missing array {key}") from None
            except Exception as exc:  # e.g. its zarr.json is not valid JSON
                raise StoreDamagedError(f"{self.url}: cannot open array {key}: {exc}") from None
            if not isinstance(node, zarr.Array):
                raise StoreDamagedError(f"{self.url}: {key} is not an array")
            self._arrays[key] = node if self.mode == "r" else _writing(node)
        self._scan_committed()

    def _scan_committed(self) -> None:
        """Compute the committed episodes: valid prefix of episode_ends + consecutive pending episodes."""
        garbage: list[str] = []
        for _attempt in range(20):
            garbage = []
            locs, _segments, metas = self._list_pending()
            pending = sorted(locs)
            ends_arr = zarr.open_array(self._zstore, path="meta/episode_ends", mode="r")
            ends = np.asarray(_read(self.url, "meta/episode_ends", ends_arr, slice(None)), dtype=np.int64)
            n_merged = _valid_prefix(ends)
            # Opened after the index read, so their shapes cover every committed row; they replace
            # the arrays opened earlier, whose cached shapes may predate a concurrent merge.
            mode = "r" if self.mode == "r" else "r+"
            fresh = {f"{d}/{k}": zarr.open_array(self._zstore, path=f"{d}/{k}", mode=mode)
                     for d, keys in (("data", self.data_keys), ("meta", META_COLUMNS)) for k in keys}
            if mode != "r":
                fresh = {k: _writing(a) for k, a in fresh.items()}
            lengths = {k: fresh[f"data/{k}"].shape[0] for k in self.data_keys}
            meta_len = {k: fresh[f"meta/{k}"].shape[0] for k in META_COLUMNS}
            steps = int(ends[n_merged - 1]) if n_merged else 0
            for key, n in lengths.items():
                need = steps + n_merged if _is_obs(key) else steps
                if n < need:
                    raise StoreDamagedError(f"{self.url}: data/{key} has {n} rows but the index commits "
                                            f"{need}")
            for key, n in meta_len.items():
                if n < n_merged:
                    raise StoreDamagedError(f"{self.url}: meta/{key} has {n} rows but the index commits "
                                            f"{n_merged} episodes")
            tail = [i for i in pending if i >= n_merged]
            expected = list(range(n_merged, n_merged + len(tail)))
            if tail != expected:
                # A merge may have deleted pending segments between our listing and the index read:
                # then the next attempt sees a consistent pair.
                continue
            past = [k for k, n in lengths.items() if n > (steps + n_merged if _is_obs(k) else steps)]
            past += [k for k, n in {**meta_len, "episode_ends": len(ends)}.items() if n > n_merged]
            if past and not tail:
                # Rows past the index exist only while (or after a kill during) a merge, whose
                # pending episodes are deleted after the index is written: else the index is garbage.
                garbage = past
                continue
            self._pending_locs = locs
            try:
                for i in tail:
                    if i not in self._pending_meta:
                        self._pending_meta[i] = (self._pending[i].metadata if i in self._pending
                                                 else self._read_pending(i, metadata_only=True,
                                                                         meta_json=metas.get(i)))
            except KeyError:
                continue
            for i in [i for i in self._pending_meta if i < n_merged]:
                del self._pending_meta[i]
            self._arrays.update(fresh)
            self._ends = ends[:n_merged]
            self._n_merged = n_merged
            self._n_pending = len(tail)
            return
        if garbage:
            raise StoreDamagedError(f"{self.url}: meta/episode_ends is damaged: it commits {n_merged} "
                                    f"episodes but {garbage[:3]} hold rows past them and no merge was "
                                    "in flight")
        raise StoreDamagedError(f"{self.url}: pending episodes {pending} do not continue the index "
                                f"({n_merged} merged episodes)")

    def _pending_keys(self) -> list[str]:
        """Names of the ``pending/`` objects and segments (one directory listing for local stores)."""
        if _is_local(self.url):
            folder = _local_path(self.url) / PENDING
            try:
                return os.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                return []

        async def _list() -> list[str]:
            return [k.rpartition("/")[2] async for k in self._zstore.list_prefix(f"{PENDING}/")]
        return sync(_list())

    def _list_pending(self) -> tuple[dict[int, tuple[Any, ...]], list[_Segment], dict[int, str]]:
        """Every committed episode under ``pending/``: its location, the parsed segments, metadata.

        Returns:
            ``(locations, segments, metadata)``: episode index -> location (see ``_pending_locs``);
            the local log segments in order (first index, then sequence number), each parsed up to
            its first invalid record; episode index -> metadata JSON for the segments' records.
        """
        locs: dict[int, tuple[Any, ...]] = {}
        metas: dict[int, str] = {}
        named: list[tuple[int, int, str]] = []
        for name in self._pending_keys():
            if name.endswith(PENDING_SUFFIX):
                m = _PENDING_RE.match(f"{PENDING}/{name}")
                if m:
                    locs[int(m.group(1))] = ("obj", f"{PENDING}/{name}")
            elif _is_local(self.url):
                m = _SEGMENT_RE.match(name)
                if m:
                    named.append((int(m.group(1)), int(m.group(2) or 0), name))
        segments = []
        folder = _local_path(self.url) / PENDING if named else None
        for first, _seq, name in sorted(named):
            try:
                seg = _parse_segment(folder / name, name, first, self._segment_cache.get(name))
            except FileNotFoundError:  # merged and deleted since the listing
                self._segment_cache.pop(name, None)
                continue
            self._segment_cache[name] = seg
            if seg.damaged:
                raise StoreDamagedError(
                    f"{self.url}: pending/{name} is damaged: the record at byte {seg.end} {seg.error}, but "
                    "whole committed records follow it (not the torn tail of a killed writer). Nothing was "
                    "changed; the episodes before that byte are intact.")
            segments.append(seg)
            for index, offset, length, crc, meta_json in seg.records:
                if index not in locs:
                    locs[index] = ("log", name, offset, length, crc)
                    metas[index] = meta_json
        for name in set(self._segment_cache) - {seg.name for seg in segments}:
            del self._segment_cache[name]
        return locs, segments, metas

    def _pending_indices(self) -> list[int]:
        return list(range(self._n_merged, self._n_merged + self._n_pending))

    def _read_pending(self, index: int, metadata_only: bool = False, meta_json: str | None = None) -> Any:
        """A pending episode (or only its metadata); ``KeyError`` if it is gone (merged meanwhile)."""
        if metadata_only and meta_json is not None:
            try:
                return EpisodeMetadata.from_json(meta_json)
            except Exception as exc:
                raise StoreDamagedError(f"{self.url}: pending episode {index} is unreadable: {exc}") from None
        loc = self._pending_locs.get(index, ("obj", f"{PENDING}/{index:012d}{PENDING_SUFFIX}"))
        if loc[0] == "log":
            _, name, offset, length, crc = loc
            try:
                with open(_local_path(self.url) / PENDING / name, "rb") as f:
                    f.seek(offset)
                    raw = f.read(length)
            except FileNotFoundError:
                raise KeyError(index) from None
            if len(raw) != length or zlib.crc32(raw, crc[0]) != crc[1]:
                raise StoreDamagedError(f"{self.url}: pending episode {index} (pending/{name} at byte "
                                        f"{offset}) changed after it was committed")
        else:
            got = sync(self._zstore.get(loc[1], prototype=default_buffer_prototype()))
            if got is None:
                raise KeyError(index)
            raw = got.to_bytes()
        try:
            meta_json, arrays = _decode_pending(raw, metadata_only)
            meta = EpisodeMetadata.from_json(meta_json)
        except Exception as exc:  # bad magic, truncated, bad JSON...
            raise StoreDamagedError(f"{self.url}: pending episode {index} is unreadable: {exc}") from None
        return meta if metadata_only else self._episode_from_arrays(arrays, meta)

    def _episode_from_arrays(self, arrays: Mapping[str, np.ndarray], meta: EpisodeMetadata) -> Episode:
        if isinstance(self.observation_space, gym.spaces.Dict):
            obs: Any = {k: arrays[f"observation/{k}"] for k in self.observation_space.spaces}
        else:
            obs = arrays["observation"]
        return Episode(observations=obs, actions=arrays["action"], rewards=arrays["reward"],
                       terminated=arrays["terminated"], truncated=arrays["truncated"],
                       extras={k: arrays[k] for k in self.step_extras}, metadata=meta)

    # ----------------------------------------------------------------- properties

    @property
    def env_id(self) -> str:
        """Gymnasium id of the env the episodes come from (``""`` if not recorded)."""
        return str(self.info.get("env_id", ""))

    @property
    def env_kwargs(self) -> dict[str, Any]:
        """Kwargs the env was made with."""
        return dict(self.info.get("env_kwargs", {}))

    @property
    def schema_version(self) -> int:
        """On-disk schema version of this store."""
        return int(self.info["schema_version"])

    @property
    def loopsim_version(self) -> str:
        """Version of loopsim that created the store."""
        return str(self.info.get("loopsim_version", ""))

    @property
    def attrs(self) -> dict[str, Any]:
        """The user attributes given at creation."""
        return dict(self.info.get("user", {}))

    def make_env(self, **overrides: Any) -> gym.Env:
        """Rebuild the env the episodes came from: ``gymnasium.make(env_id, **env_kwargs)``.

        ``loopsim/...`` ids are made through Gymnasium's ``module:id`` form, so this works without
        importing :mod:`loopsim.envs` first. A store may hold episodes of several sites under one set
        of kwargs (``loopsim expert --store`` does): to replay episode ``i`` exactly, make the env at
        its site, ``make_env(site=store.metadata_row(i).site)``, then ``reset(seed=...seed)`` and
        step the stored actions.

        Args:
            **overrides: Kwargs that replace stored ones (e.g. ``render_mode="rgb_array"``).

        Returns:
            A fresh env.

        Raises:
            ValueError: If the store has no env id.
        """
        if not self.env_id:
            raise ValueError(f"{self.url} records no env id, so its env cannot be rebuilt")
        env_id = f"loopsim:{self.env_id}" if self.env_id.startswith("loopsim/") else self.env_id
        return gym.make(env_id, **{**self.env_kwargs, **overrides})

    @property
    def writable(self) -> bool:
        """True for a store opened with :meth:`create` or ``mode="a"`` and not closed."""
        return self.mode in ("w", "a") and not self._closed

    def __len__(self) -> int:
        """Number of committed episodes."""
        with self._state:
            return self._n_merged + self._n_pending

    @property
    def n_episodes(self) -> int:
        """Number of committed episodes."""
        return len(self)

    @property
    def episode_ends(self) -> np.ndarray:
        """``(E,)`` int64 cumulative step counts of the committed episodes."""
        with self._state:
            lengths = [len(self._pending[i]) if i in self._pending else self._pending_meta[i].length
                       for i in self._pending_indices()]
            base = int(self._ends[-1]) if len(self._ends) else 0
            return np.concatenate([self._ends, base + np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)

    @property
    def n_pending(self) -> int:
        """Committed episodes not yet merged into the chunked arrays (``pending/`` log records or objects)."""
        return self._n_pending

    @property
    def n_transitions(self) -> int:
        """Total steps (transitions) over the committed episodes."""
        ends = self.episode_ends
        return int(ends[-1]) if len(ends) else 0

    def __repr__(self) -> str:
        """Short description."""
        return (f"EpisodeStore({self.url!r}, mode={self.mode!r}, env_id={self.env_id!r}, "
                f"episodes={len(self)}, transitions={self.n_transitions})")

    # ----------------------------------------------------------------- writing

    def add_episode(self, episode: Episode) -> int:
        """Commit one episode (one record appended to the pending log, or one object) and return its index.

        ``metadata.length``, ``metadata.episode_return`` and (with the ``intervention`` extra)
        ``metadata.interventions`` are filled in from the data.

        Args:
            episode: The episode; checked against the store's spaces and extras first.

        Returns:
            The episode's index in the store.

        Raises:
            StoreError: If the store is not open for writing.
            ValueError: If the episode does not match the store (nothing is written).
        """
        if not self.writable:
            raise StoreError(f"{self.url} is not open for writing (mode={self.mode!r}, "
                             f"closed={self._closed})")
        episode.validate(self.observation_space, self.action_space, self.step_extras)
        arrays = self._episode_arrays(episode)
        meta = episode.metadata
        meta.length = len(episode)
        meta.episode_return = float(np.sum(arrays["reward"]))
        if "intervention" in arrays:
            meta.interventions = int(np.count_nonzero(arrays["intervention"]))
        # Copies: the caller may reuse its buffers and metadata once add_episode returns.
        meta_json = meta.to_json()
        stored = self._episode_from_arrays({k: v.copy() for k, v in arrays.items()},
                                           EpisodeMetadata.from_json(meta_json))
        index = len(self)
        parts = _encode_parts(meta_json, arrays)
        if _is_local(self.url):
            self._append_record(index, parts)
        else:
            self._put_pending(index, b"".join(parts))
        with self._state:
            self._pending[index] = stored
            self._pending_meta[index] = stored.metadata
            self._pending_bytes += _episode_nbytes(stored)
            self._n_pending += 1
        self._maybe_merge()
        return index

    def _maybe_merge(self) -> None:
        """Start a background merge when enough episodes are pending (back-pressure at 4x)."""
        future = self._merge_future
        if future is not None:
            if not future.done() and (len(self._pending) < 4 * self.flush_every
                                      and self._pending_bytes < 2 * self.flush_bytes):
                return  # one merge at a time; the next starts after this one
            self._finish_merge()
        if len(self._pending) >= self.flush_every or self._pending_bytes >= self.flush_bytes:
            self._close_segment()  # the merge deletes the segments it covers; append to a new one
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loopsim-merge")
            self._merge_future = self._executor.submit(self._merge, sorted(self._pending))

    def _finish_merge(self) -> None:
        """Wait for the background merge in flight; re-raise its error (the pending episodes stay)."""
        future, self._merge_future = self._merge_future, None
        if future is not None:
            future.result()

    def _append_record(self, index: int, parts: Sequence[Any]) -> None:
        """Commit one episode to a local store: one framed record appended to the pending log.

        The record (:data:`_RECORD_HEAD`, then the pending object ``parts``) goes to the session's
        segment ``pending/<first index>.log`` in one ``writev`` call. A record counts once it is whole
        and its CRC matches, so a kill during the write leaves an invalid tail that readers ignore.
        If the write fails (e.g. a full disk) the segment is truncated back and left: the next episode
        starts a new segment, so a valid record never follows an invalid one in a segment.
        """
        length = sum(len(p) for p in parts)
        head = RECORD_MAGIC + struct.pack("<QQ", index, length)
        crc = zlib.crc32(head)
        for part in parts:
            crc = zlib.crc32(part, crc)
        fd = self._seg_fd if self._seg_fd is not None else self._open_segment(index)
        total = _RECORD_HEAD.size + length
        try:
            _write_all(fd, [head + struct.pack("<I", crc), *parts], total)
        except BaseException:
            try:
                os.ftruncate(fd, self._seg_size)
            except OSError:
                pass
            self._close_segment()
            raise
        self._seg_size += total
        with self._state:
            self._segments[self._seg_name] = index  # type: ignore[index]

    def _open_segment(self, index: int) -> int:
        """Create this session's next segment, named after its first episode (never an existing file)."""
        if self._pending_dir is None:  # resolved and created once: each file-system call counts here
            self._pending_dir = _local_path(self.url) / PENDING
            self._pending_dir.mkdir(exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        seq = 0
        while True:  # <index>.log exists only as a killed writer's empty or torn segment: next name
            name = f"{index:012d}{SEGMENT_SUFFIX}" if seq == 0 else f"{index:012d}.{seq}{SEGMENT_SUFFIX}"
            try:
                fd = os.open(self._pending_dir / name, flags, 0o644)
                break
            except FileExistsError:
                seq += 1
        with self._state:
            self._seg_fd, self._seg_name, self._seg_size = fd, name, 0
            self._segments[name] = -1
        return fd

    def _close_segment(self) -> None:
        """Stop appending to the current segment (the next episode opens a new one)."""
        with self._state:
            fd, self._seg_fd, self._seg_name = self._seg_fd, None, None
        if fd is not None:
            os.close(fd)

    def _put_pending(self, index: int, payload: bytes) -> None:
        """Commit one episode to a remote (fsspec) store: one ``pending/<index>.episode`` object.

        A PUT is atomic: the object exists whole or not at all. (Local stores append to the pending
        log instead, :meth:`_append_record`.)
        """
        key = f"{PENDING}/{index:012d}{PENDING_SUFFIX}"
        sync(self._zstore.set(key, default_buffer_prototype().buffer.from_bytes(payload)))

    def _episode_arrays(self, episode: Episode) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for key, arr in flatten_observation(self.observation_space, episode.observations).items():
            arrays[key] = np.ascontiguousarray(arr, dtype=self._arrays[f"data/{key}"].dtype)
        arrays["action"] = np.ascontiguousarray(episode.actions, dtype=self.action_space.dtype)
        arrays["reward"] = np.ascontiguousarray(episode.rewards, dtype=np.float64)
        arrays["terminated"] = np.ascontiguousarray(episode.terminated, dtype=bool)
        arrays["truncated"] = np.ascontiguousarray(episode.truncated, dtype=bool)
        for key in self.step_extras:
            dtype = self.action_space.dtype if key == "expert_action" else bool
            arrays[key] = np.ascontiguousarray(episode.extras[key], dtype=dtype)
        return arrays

    def _pending_episode(self, index: int) -> Episode:
        return self._pending[index]

    def flush(self) -> None:
        """Merge all pending episodes into the chunked arrays now (see the commit protocol).

        Merges normally run in a background thread every ``flush_every`` episodes (the episodes are
        already committed in ``pending/``, so a merge is only a reorganisation): the rollout does
        not wait for the compression. ``flush`` waits for a merge in flight and merges the rest.

        Raises:
            StoreError: If the store is not open for writing.
        """
        if not self.writable:
            raise StoreError(f"{self.url} is not open for writing")
        self._finish_merge()
        self._close_segment()
        if self._pending:
            self._merge(sorted(self._pending))
        else:
            self._delete_stale_pending()

    def _merge(self, indices: list[int]) -> None:
        """Merge the pending episodes ``indices`` (consecutive, starting at ``_n_merged``)."""
        with self._state:
            episodes = [self._pending[i] for i in indices]
            first = self._n_merged
            steps0 = int(self._ends[-1]) if len(self._ends) else 0
        assert indices == list(range(first, first + len(indices))), (indices[:3], first)
        lengths = np.array([len(e) for e in episodes], dtype=np.int64)
        n_new = len(episodes)
        data = {}
        for key in self.data_keys:
            block = np.concatenate([_episode_key(e, key) for e in episodes])
            data[f"data/{key}"] = (steps0 + first if _is_obs(key) else steps0, block)
        columns = _meta_columns([e.metadata for e in episodes])
        meta = {f"meta/{key}": (first, columns[key]) for key in META_COLUMNS}
        new_ends = steps0 + np.cumsum(lengths)
        # Order is the protocol: all data, then all metadata, then the index (the commit point).
        sync(self._write_blocks(data))
        sync(self._write_blocks(meta))
        sync(self._write_blocks({"meta/episode_ends": (first, new_ends)}))
        with self._state:
            self._ends = np.concatenate([self._ends, new_ends])
            self._n_merged += n_new
            self._n_pending -= n_new
            for i, episode in zip(indices, episodes, strict=True):
                del self._pending[i]
                self._pending_bytes -= _episode_nbytes(episode)
        self._delete_stale_pending()

    async def _write_blocks(self, blocks: Mapping[str, tuple[int, np.ndarray]]) -> None:
        """Resize each array to end at its block and write the block there, all arrays concurrently.

        Uses the ``AsyncArray`` behind each ``zarr.Array`` so that the chunk writes of different
        arrays overlap (one event-loop round trip instead of two per array).
        """
        async def put(key: str, start: int, block: np.ndarray) -> None:
            arr = self._arrays[key]._async_array
            await arr.resize((start + len(block), *arr.shape[1:]))
            await arr.setitem(slice(start, start + len(block)), block)

        await asyncio.gather(*(put(k, start, block) for k, (start, block) in blocks.items()))

    def _delete_stale_pending(self) -> None:
        """Delete the pending objects and segments that the index already covers.

        Segments: those this session knows whose records the index all holds (also a killed writer's
        segment whose valid records are merged, with its torn tail), never the one being appended to.
        """
        names = self._pending_keys()
        with self._state:
            n = self._n_merged
            objects = [f"{PENDING}/{name}" for name in names if name.endswith(PENDING_SUFFIX)]
            stale = [k for k in objects if (m := _PENDING_RE.match(k)) and int(m.group(1)) < n]
            segments = [name for name, last in self._segments.items() if last < n and name != self._seg_name]
            for name in segments:
                del self._segments[name]
            for i in [i for i in self._pending_meta if i < n]:
                del self._pending_meta[i]
        if _is_local(self.url):
            folder = _local_path(self.url) / PENDING
            for name in [k.rpartition("/")[2] for k in stale] + segments:
                (folder / name).unlink(missing_ok=True)
        elif stale:
            async def delete_all() -> None:
                await asyncio.gather(*(self._zstore.delete(k) for k in stale))

            sync(delete_all())

    def close(self) -> None:
        """Merge pending episodes (writers), release the lock. Idempotent."""
        if self._closed:
            return
        try:
            if self.mode in ("w", "a"):
                self.flush()
        finally:
            self._closed = True
            self._close_segment()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._release_lock()

    def __enter__(self) -> EpisodeStore:
        """Context manager: closes on exit (merging pending episodes if writing)."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the store."""
        self.close()

    def __del__(self) -> None:
        """Release a local lock if the store is garbage collected while open (no merge).

        A remote store's lock key is left in place: deleting it needs zarr's event loop, which may be
        gone at interpreter shutdown (and waiting for it there would hang). Close remote writers.
        """
        fd = getattr(self, "_seg_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass
        lock = getattr(self, "_lock", None)
        if lock is not None:
            try:
                lock.release()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    # ----------------------------------------------------------------- reading

    def refresh(self) -> int:
        """Re-read the committed state (for a reader polling a store being written).

        Returns:
            The number of committed episodes now visible.
        """
        if self.mode == "r":
            self._load_layout()
        return len(self)

    def _check_index(self, index: int) -> int:
        n = len(self)
        try:
            i = operator.index(index)  # ints and numpy integers; 1.5 or "1" are refused
        except TypeError:
            raise TypeError(f"episode index must be an integer, got {index!r}") from None
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"episode {index} out of range: the store has {n} episodes")
        return i

    @_locked
    def episode(self, index: int) -> Episode:
        """Read one committed episode.

        Args:
            index: Episode index (negative counts from the end).

        Returns:
            The :class:`Episode` (arrays are fresh numpy copies).

        Raises:
            IndexError: If out of range.
        """
        i = self._check_index(index)
        if i >= self._n_merged:
            if i in self._pending:  # a copy: callers must not be able to alter what will be merged
                ep = self._pending[i]
                return self._episode_from_arrays(
                    {k: _episode_key(ep, k).copy() for k in self.data_keys},
                    EpisodeMetadata.from_json(ep.metadata.to_json()))
            try:
                return self._read_pending(i)
            except KeyError:  # a concurrent merge moved it into the arrays and deleted the object
                if self.mode == "r":  # (a writer's own merge updated its state before deleting)
                    self._load_layout()
                if i >= self._n_merged:
                    raise StoreDamagedError(f"{self.url}: pending episode {i} vanished") from None
        start = int(self._ends[i - 1]) if i else 0
        stop = int(self._ends[i])
        arrays = {}
        for key in self.data_keys:
            arr = self._arrays[f"data/{key}"]
            rows = slice(start + i, stop + i + 1) if _is_obs(key) else slice(start, stop)
            arrays[key] = _read(self.url, f"data/{key}", arr, rows, self._complete)
        meta = self.metadata_row(i)
        return self._episode_from_arrays(arrays, meta)

    def __getitem__(self, index: int) -> Episode:
        """Same as :meth:`episode`."""
        return self.episode(index)

    def __iter__(self) -> Iterator[Episode]:
        """Iterate over the committed episodes in order."""
        for i in range(len(self)):
            yield self.episode(i)

    @_locked
    def metadata_row(self, index: int) -> EpisodeMetadata:
        """The :class:`EpisodeMetadata` of one episode."""
        i = self._check_index(index)
        if i >= self._n_merged:  # a copy: callers must not be able to alter what will be merged
            return EpisodeMetadata.from_json(self._pending_meta[i].to_json())
        cols = self._merged_meta()
        return _meta_from_row({k: cols[k][i] for k in META_COLUMNS})

    @_locked
    def _merged_meta(self) -> dict[str, np.ndarray]:
        """Metadata columns of the merged episodes, read once and kept (they never change)."""
        n = self._n_merged
        cache = getattr(self, "_meta_cache", None)
        if cache is None or len(cache["seed"]) != n:
            cache = {k: (np.asarray(_read(self.url, f"meta/{k}", self._arrays[f"meta/{k}"], slice(0, n),
                                          self._complete)) if n
                         else np.zeros(0, dtype=_np_dtype(d)))
                     for k, d in META_COLUMNS.items()}
            cache = {k: (v.astype(object) if META_COLUMNS[k] == "str" else v) for k, v in cache.items()}
            self._meta_cache = cache
        return cache

    @_locked
    def metadata(self) -> dict[str, np.ndarray]:
        """All per-episode metadata as columns over the committed episodes.

        Returns:
            Mapping column name -> ``(E,)`` array: the :data:`META_COLUMNS` (``site_params`` and
            ``tags`` as JSON strings, ``failure_mode`` ``""`` for none, ``seed`` -1 for unknown) and
            ``episode`` (the indices).
        """
        cols = dict(self._merged_meta())
        if self._n_pending:
            tail = _meta_columns([self._pending_meta[i] for i in self._pending_indices()])
            cols = {k: np.concatenate([cols[k], tail[k]]) for k in cols}
        cols = {k: (v.astype(str) if META_COLUMNS[k] == "str" else v) for k, v in cols.items()}
        cols["episode"] = np.arange(len(self), dtype=np.int64)
        return cols

    def select(self, *, site: str | Sequence[str] | None = None, iteration: int | Sequence[int] | None = None,
               policy_id: str | Sequence[str] | None = None,
               policy_version: str | Sequence[str] | None = None,
               success: bool | None = None, failure_mode: str | Sequence[str] | None = None) -> np.ndarray:
        """Indices of the episodes matching every given filter (a value or a list of accepted values).

        A filter left at ``None`` does not filter. ``failure_mode`` matches the stored mode; to select
        episodes without one (successes, or failures no mode was given for) pass ``""`` or ``[None]``.

        Returns:
            ``(K,)`` int64 episode indices, ascending.
        """
        cols = self.metadata()
        keep = np.ones(len(self), dtype=bool)
        for name, wanted in (("site", site), ("iteration", iteration), ("policy_id", policy_id),
                             ("policy_version", policy_version), ("failure_mode", failure_mode)):
            if wanted is None:
                continue
            values = [wanted] if isinstance(wanted, (str, int, np.integer)) else list(wanted)
            if name == "failure_mode":
                values = ["" if v is None else v for v in values]
            keep &= np.isin(cols[name], np.asarray(values, dtype=cols[name].dtype))
        if success is not None:
            keep &= cols["success"] == bool(success)
        return np.flatnonzero(keep).astype(np.int64)

    def site_params(self) -> dict[str, np.ndarray]:
        """The sampled site parameters as float64 columns over all episodes (NaN where absent)."""
        rows = [json.loads(s) for s in self.metadata()["site_params"]]
        names = sorted({k for r in rows for k in r})
        return {k: np.array([float(r.get(k, np.nan)) for r in rows], dtype=np.float64) for k in names}

    @_locked
    def load(self, keys: Sequence[str] | None = None, episodes: Sequence[int] | None = None
             ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Load whole arrays into memory (decompressing each chunk once), e.g. for training.

        Args:
            keys: Data keys (see :attr:`data_keys`); default all.
            episodes: Episode indices to keep (ascending); default all committed episodes.

        Returns:
            ``(arrays, episode_ends)``: each array concatenated over the chosen episodes (observation
            keys with ``T+1`` rows per episode), and the ``(E',)`` int64 cumulative step counts.
        """
        keys = list(self.data_keys if keys is None else keys)
        bad = [k for k in keys if k not in self.data_keys]
        if bad:
            raise KeyError(f"unknown data keys {bad}; the store has {self.data_keys}")
        n_all = len(self)
        chosen = np.arange(n_all) if episodes is None else np.asarray(episodes, dtype=np.int64).reshape(-1)
        if len(chosen) and (chosen.min() < 0 or chosen.max() >= n_all):
            raise IndexError(f"episode indices out of range [0, {n_all})")
        if np.any(np.diff(chosen) <= 0):
            raise ValueError("episodes must be strictly ascending (sort them, e.g. np.unique(indices))")
        ends_all = self.episode_ends
        starts_all = np.concatenate([[0], ends_all[:-1]]).astype(np.int64)
        merged = chosen[chosen < self._n_merged]
        pend = chosen[chosen >= self._n_merged]
        out: dict[str, np.ndarray] = {}
        steps_m = int(self._ends[-1]) if self._n_merged else 0
        for key in keys:
            is_obs = _is_obs(key)
            parts = []
            if len(merged):
                full = _read(self.url, f"data/{key}", self._arrays[f"data/{key}"],
                             slice(0, steps_m + (self._n_merged if is_obs else 0)), self._complete)
                if len(merged) == self._n_merged:
                    parts.append(full)
                else:
                    shift = 1 if is_obs else 0
                    idx = [np.arange(starts_all[i] + i * shift, ends_all[i] + (i + 1) * shift)
                           for i in merged]
                    parts.append(full[np.concatenate(idx)])
            for i in pend:
                parts.append(_episode_key(self.episode(int(i)), key))
            dtype = self._arrays[f"data/{key}"].dtype
            shape = self._arrays[f"data/{key}"].shape[1:]
            out[key] = np.concatenate(parts) if parts else np.zeros((0, *shape), dtype=dtype)
        lengths = ends_all[chosen] - starts_all[chosen]
        return out, np.cumsum(lengths, dtype=np.int64)

    # ----------------------------------------------------------------- verification

    def check(self) -> StoreCheck:
        """Verify the store: index, lengths, flags, and metadata against data.

        Returns:
            A :class:`StoreCheck` with ``problems`` (damage) and ``uncommitted`` (a killed writer's
            leftovers, removable by :meth:`repair`).
        """
        if self.writable:
            self._finish_merge()
        with self._state:
            return self._check()

    def _check(self) -> StoreCheck:
        """:meth:`check`, under the state lock."""
        problems: list[str] = []
        uncommitted: list[str] = []
        ends_full = np.asarray(self._arrays["meta/episode_ends"][:], dtype=np.int64)
        n = self._n_merged
        if len(ends_full) > n:
            uncommitted.append(f"meta/episode_ends has {len(ends_full) - n} entries after the last valid one")
        steps = int(self._ends[-1]) if n else 0
        for key in self.data_keys:
            rows = self._arrays[f"data/{key}"].shape[0]
            want = steps + (n if _is_obs(key) else 0)
            if rows > want:
                uncommitted.append(f"data/{key} has {rows - want} rows past the index")
        for key in META_COLUMNS:
            rows = self._arrays[f"meta/{key}"].shape[0]
            if rows > n:
                uncommitted.append(f"meta/{key} has {rows - n} rows past the index")
        objects = [m for name in self._pending_keys() if (m := _PENDING_RE.match(f"{PENDING}/{name}"))]
        stale = sorted(int(m.group(1)) for m in objects if int(m.group(1)) < n)
        if stale:
            uncommitted.append(f"{len(stale)} pending objects already merged: {stale[:5]}")
        merged_segments = []
        for seg in self._list_pending()[1]:
            if seg.name == self._seg_name:
                continue
            if seg.records and seg.last < n:
                merged_segments.append(seg.name)
            elif seg.size > seg.end:
                uncommitted.append(f"pending/{seg.name}: the {seg.size - seg.end} bytes after its last whole "
                                   f"record are not committed (the record at byte {seg.end} {seg.error}: "
                                   "a write cut short by a killed writer, or damage)")
            elif not seg.records:
                uncommitted.append(f"pending/{seg.name} is an empty pending-log segment")
        if merged_segments:
            uncommitted.append(f"{len(merged_segments)} pending-log segments already merged: "
                               f"{merged_segments[:3]}")
        partial = self._temporary_files()
        if partial:
            uncommitted.append(f"{len(partial)} temporary files of interrupted writes: {partial[:3]}")
        chunk_problems = self._check_chunks()
        if chunk_problems:  # the checks below would read the damaged chunks again
            return StoreCheck(len(self), [*problems, *chunk_problems], uncommitted)
        if len(self):
            try:
                cols = self.metadata()
                arrays, ends = self.load(["reward", "terminated", "truncated"]
                                         + (["intervention"] if "intervention" in self.step_extras else []))
            except StoreDamagedError as exc:  # a damaged chunk
                return StoreCheck(len(self), [*problems, str(exc)], uncommitted)
            starts = np.concatenate([[0], ends[:-1]])
            lengths = ends - starts
            if np.any(lengths < 1):
                problems.append(f"episodes with no steps: {np.flatnonzero(lengths < 1)[:5].tolist()}")
            if not np.array_equal(cols["length"], lengths):
                bad = np.flatnonzero(cols["length"] != lengths)
                problems.append(f"meta/length disagrees with episode_ends for episodes {bad[:5].tolist()}")
            returns = np.add.reduceat(arrays["reward"], starts) if len(starts) else np.zeros(0)
            if not np.allclose(returns, cols["return"], rtol=1e-9, atol=1e-9, equal_nan=True):
                close = np.isclose(returns, cols["return"], rtol=1e-9, atol=1e-9, equal_nan=True)
                bad = np.flatnonzero(~close)
                problems.append(f"meta/return differs from the summed rewards for episodes "
                                f"{bad[:5].tolist()}")
            for flag in ("terminated", "truncated"):
                inner = arrays[flag].copy()
                inner[ends - 1] = False
                if inner.any():
                    problems.append(f"data/{flag} is True before an episode's last step at steps "
                                    f"{np.flatnonzero(inner)[:5].tolist()}")
            if "intervention" in arrays:
                counts = np.add.reduceat(arrays["intervention"].astype(np.int64), starts)
                if not np.array_equal(counts, cols["interventions"]):
                    problems.append("meta/interventions disagrees with data/intervention")
        return StoreCheck(len(self), problems, uncommitted)

    @property
    def _complete(self) -> bool:
        """Whether this store's writers write every chunk (:data:`_ALL_CHUNKS`): a missing one is damage."""
        return self.info.get(_ALL_CHUNKS) is True

    def _committed_rows(self) -> dict[str, int]:
        """Array key -> the number of its rows the merged episodes commit."""
        n = self._n_merged
        steps = int(self._ends[-1]) if n else 0
        rows = {f"data/{k}": steps + (n if _is_obs(k) else 0) for k in self.data_keys}
        return {**rows, **{f"meta/{k}": n for k in META_COLUMNS}, "meta/episode_ends": n}

    def _check_chunks(self) -> list[str]:
        """Read every chunk of the committed rows; in a store that writes every chunk, find missing ones.

        A read decompresses the chunk and verifies its zstd checksum (stores created from 2026-12-01
        on; earlier ones have none, so only a chunk that no longer decompresses is found there). A
        missing chunk reads as zeros: in a store with :data:`_ALL_CHUNKS` it is reported, in an older
        one it may be a chunk of zeros that zarr did not write. One chunk at a time, so memory stays
        one chunk per array.

        Returns:
            One problem per damaged or missing chunk (at most 5 per array, then a count).
        """
        problems: list[str] = []
        complete = self._complete
        for key, rows in self._committed_rows().items():
            arr = self._arrays[key]
            step = int(arr.chunks[0])
            found: list[str] = []
            for i in _missing_chunks(self.url, arr, slice(0, rows)) if complete else []:
                last = min(rows, (i + 1) * step) - 1
                found.append(f"{key}: chunk {_chunk_key(arr, i)} (rows {i * step}-{last}) is missing "
                             "(it would read as zeros)")
            for start in range(0, rows, step):
                try:
                    arr[start:min(rows, start + step)]
                except Exception as exc:  # noqa: BLE001 - zstd, checksum, shape errors alike
                    found.append(f"{key}: rows {start}-{min(rows, start + step) - 1} cannot be read (a "
                                 f"damaged chunk): {type(exc).__name__}: {exc}")
            problems += found[:5] + ([f"{key}: {len(found) - 5} more damaged or missing chunks"]
                                     if len(found) > 5 else [])
        return problems

    def _temporary_files(self) -> list[str]:
        if not _is_local(self.url):
            return []
        root = _local_path(self.url)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*.partial"))

    def repair(self) -> StoreCheck:
        """Drop a killed writer's uncommitted tail; never touches committed episodes.

        Requires the writer lock (a store opened with ``mode="a"``).

        Returns:
            The :meth:`check` after the repair.

        Raises:
            StoreError: If the store is not open for appending.
        """
        if self.writable:
            self._finish_merge()
        with self._state:
            return self._repair()

    def _repair(self) -> StoreCheck:
        """:meth:`repair`, under the state lock."""
        if not self.writable:
            raise StoreError("repair needs the writer lock: open the store with mode='a'")
        n = self._n_merged
        steps = int(self._ends[-1]) if n else 0
        ends = self._arrays["meta/episode_ends"]
        if ends.shape[0] > n:
            ends.resize((n,))
        for key in self.data_keys:
            arr = self._arrays[f"data/{key}"]
            want = steps + (n if _is_obs(key) else 0)
            if arr.shape[0] > want:
                arr.resize((want, *arr.shape[1:]))
        for key in META_COLUMNS:
            arr = self._arrays[f"meta/{key}"]
            if arr.shape[0] > n:
                arr.resize((n,))
        self._delete_stale_pending()
        if _is_local(self.url):
            folder = _local_path(self.url) / PENDING
            for seg in self._list_pending()[1]:
                if seg.name == self._seg_name:
                    continue
                if not seg.records or seg.last < n:  # merged, or no whole record: nothing committed
                    (folder / seg.name).unlink(missing_ok=True)
                    self._segments.pop(seg.name, None)
                elif seg.size > seg.end:  # a torn or invalid tail after committed records
                    os.truncate(folder / seg.name, seg.end)
        root = _local_path(self.url) if _is_local(self.url) else None
        if root is not None:
            for rel in self._temporary_files():
                (root / rel).unlink(missing_ok=True)
        return self.check()


def _read(url: str, key: str, arr: zarr.Array, rows: slice, complete: bool = False) -> np.ndarray:
    """``arr[rows]``, with a damaged chunk (truncated, garbage) reported as :class:`StoreDamagedError`.

    Args:
        url: The store's URL, for messages.
        key: The array's key (``data/action``), for messages.
        arr: The array.
        rows: Rows along the first axis.
        complete: The store writes every chunk (:data:`_ALL_CHUNKS`): a missing chunk among those
            ``rows`` touch is damage, not zeros (zarr reads it as fill values). One existence query
            per chunk (a ``stat`` for a local store), so a deleted chunk never trains a policy on zeros.

    Raises:
        StoreDamagedError: If a chunk cannot be read, or (``complete``) is missing.
    """
    if complete:
        missing = _missing_chunks(url, arr, rows)
        if missing:
            raise StoreDamagedError(f"{url}: {key}: chunk {_chunk_key(arr, missing[0])} is missing (it would "
                                    "read as zeros); the store is damaged: see loopsim store check")
    try:
        return arr[rows]
    except Exception as exc:
        raise StoreDamagedError(f"{url}: cannot read {key} (a damaged chunk?): {exc}") from None


def _chunk_key(arr: zarr.Array, i: int) -> str:
    """The key of chunk ``i`` along the first axis, relative to the array (``c/<i>/0/...``)."""
    return f"c/{i}" + "/0" * (arr.ndim - 1)


def _missing_chunks(url: str, arr: zarr.Array, rows: slice) -> list[int]:
    """Indices (along the first axis) of the chunks ``arr[rows]`` touches that the store does not hold.

    A local store is asked with ``os.path.exists`` (~2 us a chunk; zarr's async ``exists`` through its
    event loop cost ~0.2 ms, +28% on reading a 50-step episode here), another one through zarr.
    """
    start, stop, _ = rows.indices(arr.shape[0])
    if stop <= start:
        return []
    step = int(arr.chunks[0])
    chunks = range(start // step, (stop - 1) // step + 1)
    store, base = arr.store_path.store, arr.store_path.path
    if _is_local(url):
        folder = _local_path(url) / base
        return [i for i in chunks if not os.path.exists(folder / _chunk_key(arr, i))]

    async def probe() -> list[bool]:
        return list(await asyncio.gather(*(store.exists(f"{base}/{_chunk_key(arr, i)}") for i in chunks)))

    return [i for i, there in zip(chunks, sync(probe()), strict=True) if not there]


def _encode_parts(meta_json: str, arrays: Mapping[str, np.ndarray]) -> list[Any]:
    """One episode in the ``pending/`` format (:data:`PENDING_MAGIC`) as buffers, arrays not copied.

    Returns:
        The magic, header length and header as one ``bytes``, then each array's bytes (a uint8 view).
    """
    entries, offset = [], 0
    for key, arr in arrays.items():
        entries.append({"key": key, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset,
                        "nbytes": arr.nbytes})
        offset += arr.nbytes
    header = json.dumps({"metadata": json.loads(meta_json), "arrays": entries}).encode()
    return [PENDING_MAGIC + len(header).to_bytes(8, "little") + header,
            *(np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays.values())]


def _write_all(fd: int, buffers: list[Any], total: int) -> None:
    """Write ``buffers`` (``total`` bytes) to ``fd`` with one ``writev``; finish a short write."""
    if hasattr(os, "writev"):
        done = os.writev(fd, buffers)
    else:  # pragma: no cover - platforms without writev (Windows)
        done = os.write(fd, b"".join(buffers))
    if done < total:  # rare (a signal, a full disk): write the rest
        rest = memoryview(b"".join(bytes(b) for b in buffers))[done:]
        while rest:
            rest = rest[os.write(fd, rest):]


class _Segment:
    """A pending-log segment parsed up to its first invalid record (see :func:`_parse_segment`).

    Attributes:
        name: File name in ``pending/``. first: The episode index its name gives.
        ident: ``(st_dev, st_ino)``, to notice a replaced file. size: Bytes seen at the last parse.
        end: Offset just past the last valid record. error: Why the bytes after ``end`` are invalid.
        damaged: True when a whole, valid record follows the invalid one: the bytes after ``end`` are
            then damage in the middle of the log, not the torn tail a killed writer leaves.
        records: ``(index, payload offset, payload length, (crc seed, crc), metadata JSON)`` each.
    """

    __slots__ = ("damaged", "end", "error", "first", "ident", "name", "records", "size")

    def __init__(self, name: str, first: int, ident: tuple[int, int]) -> None:
        """An empty parse of the segment ``name``."""
        self.name, self.first, self.ident = name, first, ident
        self.size = self.end = 0
        self.error = ""
        self.damaged = False
        self.records: list[tuple[int, int, int, tuple[int, int], str]] = []

    @property
    def last(self) -> int:
        """Index of its last valid record (-1 if none)."""
        return self.records[-1][0] if self.records else -1


def _parse_segment(path: Path, name: str, first: int, cached: _Segment | None) -> _Segment:
    """Parse a segment's records in order, stopping at the first invalid one (torn or corrupt).

    A record is valid when its header is whole, its index is the next one (the segment's name gives
    the first), its payload is whole and the CRC matches. A segment only grows (one writer appends),
    so a ``cached`` parse of the same file continues from its valid end.

    Raises:
        FileNotFoundError: If the segment is gone (merged and deleted since it was listed).
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        ident = (st.st_dev, st.st_ino)
        seg = (cached if cached is not None and cached.ident == ident and st.st_size >= cached.end
               else _Segment(name, first, ident))
        seg.size, seg.error, seg.damaged = st.st_size, "", False
        if st.st_size == seg.end:
            return seg
        f.seek(seg.end)
        data = f.read(st.st_size - seg.end)
    view = memoryview(data)
    pos, head = 0, _RECORD_HEAD.size
    expect = seg.last + 1 if seg.records else first
    while pos < len(data):
        if len(data) - pos < head:
            seg.error = "is cut short"
            break
        magic, index, length, crc = _RECORD_HEAD.unpack_from(data, pos)
        if magic != RECORD_MAGIC:
            seg.error = "has no record header (bad magic bytes)"
            break
        if index != expect:
            seg.error = f"holds episode {index} where episode {expect} was due"
            break
        if len(data) - pos - head < length:
            seg.error = "is cut short"
            break
        seed = zlib.crc32(view[pos:pos + 24])
        payload = view[pos + head:pos + head + length]
        if zlib.crc32(payload, seed) != crc:
            seg.error = "fails its CRC check"
            break
        try:
            meta_json = _decode_pending_metadata(payload)
        except (ValueError, KeyError) as exc:
            seg.error = f"is unreadable ({exc})"
            break
        seg.records.append((index, seg.end + pos + head, length, (seed, crc), meta_json))
        expect += 1
        pos += head + length
    if seg.error:
        seg.damaged = _valid_record_after(data, pos + 1)
    seg.end += pos
    return seg


def _valid_record_after(data: bytes, start: int) -> bool:
    """True if a whole record with a matching CRC starts anywhere at or after ``start`` in ``data``.

    A killed writer tears at most the record it was writing, the last bytes of its segment (a failed
    write is truncated back by the writer), so a valid record after an invalid one means damage.
    """
    head = _RECORD_HEAD.size
    view = memoryview(data)
    at = data.find(RECORD_MAGIC, start)
    while at != -1:
        if len(data) - at >= head:
            _, _, length, crc = _RECORD_HEAD.unpack_from(data, at)
            if len(data) - at - head >= length:
                seed = zlib.crc32(view[at:at + 24])
                if zlib.crc32(view[at + head:at + head + length], seed) == crc:
                    return True
        at = data.find(RECORD_MAGIC, at + 1)
    return False


def _decode_pending_metadata(payload: memoryview) -> str:
    """The metadata JSON of a pending object, reading only its header."""
    n = len(PENDING_MAGIC)
    if bytes(payload[:n]) != PENDING_MAGIC:
        raise ValueError("not a loopsim pending episode (bad magic bytes)")
    size = int.from_bytes(payload[n:n + 8], "little")
    if n + 8 + size > len(payload):
        raise ValueError("truncated header")
    return json.dumps(json.loads(bytes(payload[n + 8:n + 8 + size]))["metadata"])


def _decode_pending(raw: bytes, metadata_only: bool = False) -> tuple[str, dict[str, np.ndarray]]:
    """Inverse of :func:`_encode_parts` (joined); raises ``ValueError`` on anything malformed."""
    if not raw.startswith(PENDING_MAGIC):
        raise ValueError("not a loopsim pending episode (bad magic bytes)")
    start = len(PENDING_MAGIC) + 8
    size = int.from_bytes(raw[len(PENDING_MAGIC):start], "little")
    if start + size > len(raw):
        raise ValueError("truncated header")
    header = json.loads(raw[start:start + size])
    meta_json = json.dumps(header["metadata"])
    if metadata_only:
        return meta_json, {}
    body = memoryview(raw)[start + size:]
    arrays = {}
    for e in header["arrays"]:
        if e["offset"] + e["nbytes"] > len(body):
            raise ValueError(f"truncated array {e['key']}")
        flat = np.frombuffer(body[e["offset"]:e["offset"] + e["nbytes"]], dtype=np.dtype(e["dtype"]))
        arrays[e["key"]] = flat.reshape(e["shape"]).copy()
    return meta_json, arrays


def _valid_prefix(ends: np.ndarray) -> int:
    """Length of the longest prefix of ``ends`` that is positive and strictly increasing."""
    if len(ends) == 0:
        return 0
    ok = np.concatenate([[ends[0] > 0], np.diff(ends) > 0])
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if len(bad) else len(ends)


def _episode_key(episode: Episode, key: str) -> np.ndarray:
    if key == "observation":
        return np.asarray(episode.observations)
    if key.startswith("observation/"):
        return np.asarray(episode.observations[key.split("/", 1)[1]])
    if key == "action":
        return np.asarray(episode.actions)
    if key == "reward":
        return np.asarray(episode.rewards)
    if key in ("terminated", "truncated"):
        return np.asarray(getattr(episode, key))
    return np.asarray(episode.extras[key])


def _episode_nbytes(episode: Episode) -> int:
    obs = episode.observations
    obs_bytes = (sum(np.asarray(v).nbytes for v in obs.values()) if isinstance(obs, dict)
                 else np.asarray(obs).nbytes)
    return int(obs_bytes + np.asarray(episode.actions).nbytes + sum(np.asarray(v).nbytes
                                                                     for v in episode.extras.values()))


def _np_dtype(name: str) -> Any:
    return object if name == "str" else np.dtype(name)


def _meta_columns(metas: Sequence[EpisodeMetadata]) -> dict[str, np.ndarray]:
    """Turn metadata rows into the ``meta/`` column arrays."""
    def strings(values: list[str]) -> np.ndarray:
        return np.array(values, dtype=object)

    return {
        "seed": np.array([-1 if m.seed is None else int(m.seed) for m in metas], dtype=np.int64),
        "site": strings([m.site for m in metas]),
        "site_params": strings([json.dumps(to_plain(m.site_params)) for m in metas]),
        "policy_id": strings([m.policy_id for m in metas]),
        "policy_version": strings([m.policy_version for m in metas]),
        "iteration": np.array([m.iteration for m in metas], dtype=np.int64),
        "return": np.array([m.episode_return for m in metas], dtype=np.float64),
        "length": np.array([m.length for m in metas], dtype=np.int64),
        "success": np.array([m.success for m in metas], dtype=bool),
        "failure_mode": strings([m.failure_mode or "" for m in metas]),
        "interventions": np.array([m.interventions for m in metas], dtype=np.int64),
        "wall_time": np.array([m.wall_time for m in metas], dtype=np.float64),
        "tags": strings([json.dumps(to_plain(m.tags)) for m in metas]),
    }


def _meta_from_row(row: Mapping[str, Any]) -> EpisodeMetadata:
    seed = int(row["seed"])
    return EpisodeMetadata(
        seed=None if seed < 0 else seed, site=str(row["site"]),
        site_params=json.loads(str(row["site_params"])),
        policy_id=str(row["policy_id"]), policy_version=str(row["policy_version"]),
        iteration=int(row["iteration"]), episode_return=float(row["return"]), length=int(row["length"]),
        success=bool(row["success"]), failure_mode=str(row["failure_mode"]) or None,
        interventions=int(row["interventions"]), wall_time=float(row["wall_time"]),
        tags=json.loads(str(row["tags"])))


warnings.filterwarnings("ignore", message="Object at pending is not recognized", category=ZarrUserWarning)
