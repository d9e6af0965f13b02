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
    pending/<index>.episode           write-ahead episodes: committed, not yet merged into the arrays
    .loopsim-writer.lock              the writer's lock (local stores)

Episode ``i`` owns steps ``episode_ends[i-1]:episode_ends[i]`` and observation rows
``episode_ends[i-1] + i : episode_ends[i] + i + 1`` (``episode_ends[-1] = 0``).

Commit protocol (why a kill loses at most the episode in flight, and why recording is cheap):

1. :meth:`EpisodeStore.add_episode` writes the whole episode as one ``pending/<index>.episode`` object.
   Zarr's ``LocalStore`` writes every object to a temporary file and renames it into place (and
   object stores' PUTs are atomic), so the object either exists whole or not at all: its
   appearance is the commit. One small write per episode keeps recording off the rollout's back.
2. Every ``flush_every`` episodes (and on :meth:`~EpisodeStore.flush` / :meth:`~EpisodeStore.close`)
   the pending episodes are merged into the chunked, compressed arrays, in this order: ``data/*``,
   then ``meta/*`` columns, then ``meta/episode_ends`` last, then the pending objects are deleted.
   Episodes are thus written many at a time, so chunks hold many episodes, not one each.
3. A reader takes the longest valid (strictly increasing, positive) prefix of ``episode_ends``, then
   the pending objects that continue it without a gap. Rows beyond the prefix (a merge killed midway)
   are ignored and overwritten by the next merge; pending objects already covered are ignored.

Zarr rewrites a chunk by writing a whole new object and renaming it over the old one, so a chunk
shared by committed episodes and the tail being merged is never seen half written.
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
import threading
import time
import uuid
import warnings
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
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import ZarrUserWarning
from zarr.storage import FsspecStore, LocalStore

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
PENDING = "pending"
CHUNK_BYTES = 1 << 20
"""Target uncompressed bytes per data chunk (1 MiB): large enough that a chunk holds many
episodes and compresses well, small enough that rewriting the partial last chunk at each merge is
cheap."""
MAX_CHUNK_ROWS = 16384
META_CHUNK_ROWS = 1024
PENDING_SUFFIX = ".episode"
_PENDING_RE = re.compile(r"^pending/(\d{12})\.episode$")
PENDING_MAGIC = b"LOOPSIM-EPISODE-1\n"
"""First bytes of a pending object; then a little-endian uint64 header length, the JSON header
(``{"metadata": {...}, "arrays": [{"key", "dtype", "shape", "offset", "nbytes"}, ...]}``) and the
arrays' raw C-order bytes. (``np.savez``'s zip container cost ~5x more than the write itself.)"""


def _loopsim_version() -> str:
    try:
        return version("loopsim")
    except PackageNotFoundError:  # pragma: no cover - running from a tree without an install
        return "0+unknown"


def _is_local(url: str | os.PathLike) -> bool:
    return isinstance(url, os.PathLike) or "://" not in str(url) or str(url).startswith("file://")


def _local_path(url: str | os.PathLike) -> Path:
    """The directory of a local store: a path, ``~/...``, or ``file:///abs`` / ``file://localhost/abs``."""
    text = os.fspath(url)
    if text.startswith("file://"):
        rest = text[len("file://"):]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        elif not rest.startswith("/"):
            raise ValueError(f"{text}: a file URL must be file:///absolute/path (or file://localhost/...)")
        text = rest
    return Path(text).expanduser()


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
            index entries never completed, pending objects already merged, temporary files).
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

    def __init__(self, url: str | os.PathLike, *, _mode: str, _flush_every: int = 256,
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
        self._zstore = self._make_zarr_store(read_only=_mode == "r")

    # ----------------------------------------------------------------- construction

    def _make_zarr_store(self, read_only: bool) -> Any:
        if _is_local(self.url):
            return LocalStore(_local_path(self.url), read_only=read_only)
        return FsspecStore.from_url(self.url, read_only=read_only)

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
        flush_every: int = 256,
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
                this many episodes, or sooner when they hold 16 MiB (e.g. camera images).
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
                raise FileExistsError(f"{self.url} already exists; open it with EpisodeStore.open(url, "
                                      "mode='a') to append, or pass overwrite=True to replace it")
            cls._read_root_attrs(self._zstore, self.url)  # refuses non-stores: never delete them
        self._acquire_lock()
        try:
            if existing:
                self._wipe()
            step_extras = [e for e in STEP_EXTRAS if e in set(step_extras)]
            # The root zarr.json is written once, with the loopsim attributes ("w" would delete the
            # lock file): a kill after it leaves a recognisable store that overwrite=True replaces.
            group = zarr.open_group(self._zstore, mode="a", attributes={"loopsim": {
                "schema_version": SCHEMA_VERSION,
                "loopsim_version": _loopsim_version(),
                "env_id": env_id,
                "env_kwargs": dict(env_kwargs or {}),
                "observation_space": space_to_json(observation_space),
                "action_space": space_to_json(action_space),
                "step_extras": step_extras,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "user": dict(attrs or {}),
            }})
            created = self._create_arrays(group, observation_space, action_space, step_extras)
            # The new, empty store's state is known: no need to read back what was just written.
            self.info = group.attrs.asdict()["loopsim"]
            self.observation_space = observation_space
            self.action_space = action_space
            self.step_extras = step_extras
            self.data_keys = _data_keys(observation_space, step_extras)
            self._group = group
            self._arrays = created
            self._ends = np.zeros(0, dtype=np.int64)
            self._n_merged = 0
            self._n_pending = 0
        except BaseException:
            self._release_lock()
            raise
        return self

    @classmethod
    def open(cls, url: str | os.PathLike, mode: str = "r", *, flush_every: int = 256) -> EpisodeStore:
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
            raise FileNotFoundError(f"no episode store at {self.url}")
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
        except BaseException:
            self._release_lock()
            raise
        return self

    # ----------------------------------------------------------------- small helpers

    def _exists(self) -> bool:
        if _is_local(self.url):
            path = _local_path(self.url)
            # A directory holding only our lock file (a create killed at its start) counts as empty.
            return path.exists() and (not path.is_dir() or any(c.name != LOCK_NAME for c in path.iterdir()))
        return bool(sync(self._zstore.exists("zarr.json")))

    @staticmethod
    def _read_root_attrs(zstore: Any, url: str) -> dict[str, Any]:
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
        """Delete an existing loopsim store's content (create with overwrite=True only)."""
        if _is_local(self.url):
            root = _local_path(self.url)
            for child in root.iterdir():
                if child.name == LOCK_NAME:
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:  # every key but our lock
            async def wipe() -> None:
                keys = [k async for k in self._zstore.list_prefix("") if k != LOCK_NAME]
                await asyncio.gather(*(self._zstore.delete(k) for k in keys))

            sync(wipe())

    def _create_arrays(self, group: zarr.Group, obs_space: gym.Space, act_space: gym.Space,
                       step_extras: Sequence[str]) -> dict[str, zarr.Array]:
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
                                     "compressors": ZstdCodec(level=3), "fill_value": 0}
        for key, dtype in META_COLUMNS.items():
            if dtype == "str":
                arrays[f"meta/{key}"] = {"shape": (0,), "chunks": (META_CHUNK_ROWS,), "dtype": str}
            else:
                arrays[f"meta/{key}"] = {"shape": (0,), "chunks": (META_CHUNK_ROWS,), "dtype": dtype,
                                         "compressors": ZstdCodec(level=3), "fill_value": 0}
        arrays["meta/episode_ends"] = {"shape": (0,), "chunks": (META_CHUNK_ROWS,), "dtype": "int64",
                                       "compressors": ZstdCodec(level=3), "fill_value": 0}
        group.require_group("data")
        group.require_group("meta")

        async def create_all() -> list[Any]:  # concurrently: one event-loop round trip, not one per array
            return await asyncio.gather(*(group._async_group.create_array(name, **spec)
                                          for name, spec in arrays.items()))

        return {name: zarr.Array(a) for name, a in zip(arrays, sync(create_all()), strict=True)}

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
            self._arrays[key] = node
        self._scan_committed()

    def _scan_committed(self) -> None:
        """Compute the committed episodes: valid prefix of episode_ends + consecutive pending objects."""
        garbage: list[str] = []
        for _attempt in range(20):
            garbage = []
            pending = self._pending_indices_all()
            ends_arr = zarr.open_array(self._zstore, path="meta/episode_ends", mode="r")
            ends = np.asarray(_read(self.url, "meta/episode_ends", ends_arr, slice(None)), dtype=np.int64)
            n_merged = _valid_prefix(ends)
            # Opened after the index read, so their shapes cover every committed row; they replace
            # the arrays opened earlier, whose cached shapes may predate a concurrent merge.
            mode = "r" if self.mode == "r" else "r+"
            fresh = {f"{d}/{k}": zarr.open_array(self._zstore, path=f"{d}/{k}", mode=mode)
                     for d, keys in (("data", self.data_keys), ("meta", META_COLUMNS)) for k in keys}
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
                # A merge may have deleted pending objects between our listing and the index read:
                # then the next attempt sees a consistent pair.
                continue
            past = [k for k, n in lengths.items() if n > (steps + n_merged if _is_obs(k) else steps)]
            past += [k for k, n in {**meta_len, "episode_ends": len(ends)}.items() if n > n_merged]
            if past and not tail:
                # Rows past the index exist only while (or after a kill during) a merge, whose
                # pending objects are deleted after the index is written: else the index is garbage.
                garbage = past
                continue
            try:
                for i in tail:
                    if i not in self._pending_meta:
                        self._pending_meta[i] = (self._pending[i].metadata if i in self._pending
                                                 else self._read_pending(i, metadata_only=True))
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

    def _pending_indices_all(self) -> list[int]:
        """Indices of all ``pending/`` objects (a directory listing for local stores)."""
        if _is_local(self.url):
            folder = _local_path(self.url) / PENDING
            keys = [f"{PENDING}/{name}" for name in os.listdir(folder)] if folder.is_dir() else []
        else:
            async def _list() -> list[str]:
                return [k async for k in self._zstore.list_prefix(f"{PENDING}/")]
            keys = sync(_list())
        out = []
        for key in keys:
            m = _PENDING_RE.match(key)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def _pending_indices(self) -> list[int]:
        return list(range(self._n_merged, self._n_merged + self._n_pending))

    def _read_pending(self, index: int, metadata_only: bool = False) -> Any:
        key = f"{PENDING}/{index:012d}{PENDING_SUFFIX}"
        raw = sync(self._zstore.get(key, prototype=default_buffer_prototype()))
        if raw is None:
            raise KeyError(index)
        try:
            meta_json, arrays = _decode_pending(raw.to_bytes(), metadata_only)
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
        """Committed episodes not yet merged into the chunked arrays (``pending/`` objects)."""
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
        """Commit one episode (one atomic object write) and return its index.

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
        self._put_pending(index, _encode_pending(meta_json, arrays))
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
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loopsim-merge")
            self._merge_future = self._executor.submit(self._merge, sorted(self._pending))

    def _finish_merge(self) -> None:
        """Wait for the background merge in flight; re-raise its error (the pending objects stay)."""
        future, self._merge_future = self._merge_future, None
        if future is not None:
            future.result()

    def _put_pending(self, index: int, payload: bytes) -> None:
        """Write one pending object atomically: whole or not at all (the episode's commit).

        Local stores: a temporary file in ``pending/`` renamed into place (what zarr's ``LocalStore``
        does, minus its thread hop, which cost ~10x the write itself). Other stores: one ``set``.
        """
        key = f"{PENDING}/{index:012d}{PENDING_SUFFIX}"
        if not _is_local(self.url):
            sync(self._zstore.set(key, default_buffer_prototype().buffer.from_bytes(payload)))
            return
        if self._pending_dir is None:  # resolved and created once: each file-system call counts here
            self._pending_dir = _local_path(self.url) / PENDING
            self._pending_dir.mkdir(exist_ok=True)
        path = self._pending_dir / key.rpartition("/")[2]
        tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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
        already committed as pending objects, so a merge is only a reorganisation): the rollout does
        not wait for the compression. ``flush`` waits for a merge in flight and merges the rest.

        Raises:
            StoreError: If the store is not open for writing.
        """
        if not self.writable:
            raise StoreError(f"{self.url} is not open for writing")
        self._finish_merge()
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
        """Delete the pending objects that the index already covers (all at once)."""
        stale = [i for i in self._pending_indices_all() if i < self._n_merged]

        keys = [f"{PENDING}/{i:012d}{PENDING_SUFFIX}" for i in stale]

        async def delete_all() -> None:
            await asyncio.gather(*(self._zstore.delete(k) for k in keys))

        with self._state:
            for i in stale:
                self._pending_meta.pop(i, None)
        if stale and _is_local(self.url):
            root = _local_path(self.url)
            for key in keys:
                (root / key).unlink(missing_ok=True)
        elif stale:
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
            arrays[key] = _read(self.url, f"data/{key}", arr, rows)
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
            cache = {k: (np.asarray(_read(self.url, f"meta/{k}", self._arrays[f"meta/{k}"], slice(0, n))) if n
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
                             slice(0, steps_m + (self._n_merged if is_obs else 0)))
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
        stale = [i for i in self._pending_indices_all() if i < n]
        if stale:
            uncommitted.append(f"{len(stale)} pending objects already merged: {stale[:5]}")
        partial = self._temporary_files()
        if partial:
            uncommitted.append(f"{len(partial)} temporary files of interrupted writes: {partial[:3]}")
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
        root = _local_path(self.url) if _is_local(self.url) else None
        if root is not None:
            for rel in self._temporary_files():
                (root / rel).unlink(missing_ok=True)
        return self.check()


def _read(url: str, key: str, arr: zarr.Array, rows: slice) -> np.ndarray:
    """``arr[rows]``, with a damaged chunk (truncated, garbage) reported as :class:`StoreDamagedError`."""
    try:
        return arr[rows]
    except Exception as exc:
        raise StoreDamagedError(f"{url}: cannot read {key} (a damaged chunk?): {exc}") from None


def _encode_pending(meta_json: str, arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialize one episode for ``pending/`` (format: :data:`PENDING_MAGIC`)."""
    entries, offset = [], 0
    for key, arr in arrays.items():
        entries.append({"key": key, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset,
                        "nbytes": arr.nbytes})
        offset += arr.nbytes
    header = json.dumps({"metadata": json.loads(meta_json), "arrays": entries}).encode()
    parts = [PENDING_MAGIC, len(header).to_bytes(8, "little"), header]
    parts += [np.ascontiguousarray(a).tobytes() for a in arrays.values()]
    return b"".join(parts)


def _decode_pending(raw: bytes, metadata_only: bool = False) -> tuple[str, dict[str, np.ndarray]]:
    """Inverse of :func:`_encode_pending`; raises ``ValueError`` on anything malformed."""
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
