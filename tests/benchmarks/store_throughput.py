"""Episode-store throughput: writing, random-batch sampling and recording cost, against baselines, in one run.

Run::

    python tests/benchmarks/store_throughput.py [--episodes N] [--steps T] [--obs-dim D]
        [--repeats R] [--batch-size B] [--batches K] [--rollout-episodes M] [--env ID ...] [--no-rgb]
        [--json out.json]

The defaults (``--episodes 1000 --steps 50 --repeats 5 --rollout-episodes 30``) take about 8-12 minutes
on 2 busy cores; ``--episodes 300 --repeats 3`` about 3-4. The script is informative: it prints the
tables and the goals' pass/fail and exits 0 unless a measurement crashed.

Goals (from the issue): recording adds <= 5 % to a rollout's wall time; write throughput >= the best
alternative's; sampling batches of 256 transitions faster than h5py. All three must hold together with
the store's crash promise (a kill loses at most the episode in flight).

**Synthetic episodes** (the same arrays for every backend, generated once, not timed): ``--episodes``
episodes of ``--steps`` steps; ``observation`` ``(T+1, D)`` float32 (standard normal, so it compresses
poorly, like real state), ``action`` ``(T, 4)`` float32, ``reward`` ``(T,)`` float64, ``terminated`` and
``truncated`` ``(T,)`` bool (one of them True at the last step). Every backend stores ``T+1``
observation rows per episode (no duplicated ``next_obs`` array) and the episode ends.

**Write backends** (each repeat writes into a fresh directory under ``--dir``; the backends' order
rotates between repeats; time = create/open + every episode + close, so the final merge or flush is
included):

- ``loopsim``: ``EpisodeStore.create`` (default ``flush_every``, 1024 episodes or 16 MiB),
  ``add_episode`` per episode, ``close``. Crash guarantee: a kill at any moment loses at most the
  episode in flight (each ``add_episode`` appends one CRC-checked record to the store's pending log
  with one ``writev``: a record cut short by a kill is ignored; merges into the compressed arrays
  commit with ``episode_ends`` last). With the default ``--episodes 1000`` every merge is the one in
  ``close`` (``merge ms/ep``); with more episodes, merges also run in a background thread.
- ``h5py``: one file, one resizable chunked dataset per array (``maxshape=(None, ...)``, h5py's own
  chunk shape, no compression), one ``resize`` + slice write per array per episode (the pattern of
  robomimic-style recorders that append to one file), ``flush`` + close at the end. Crash guarantee:
  none; a kill mid-write can leave the file unreadable (HDF5 metadata is cached and written back
  lazily), and even a clean kill between episodes loses everything not yet flushed.
- ``npz``: one ``np.savez`` (uncompressed) per episode into a directory, written to a temporary name
  and renamed into place (``os.replace``), so each file is atomic: a kill loses at most the episode
  in flight. (Without the rename, a kill can leave a truncated file.) No merging: the data stays as
  many small files.

Columns: ``ms/episode`` (total / episodes), ``episodes/s``, ``add p50 / max`` (per-episode call, ms:
the max shows a periodic merge or the first call), ``x best alt``: our episodes/s over the best
alternative's in the same repeat (then the median); ``disk MB``.

**Sampling** (after each repeat's writes, from the files just written): ``--batches`` batches of
``--batch-size`` transitions, ``(observation, action, reward, next_observation)``, each returned as
torch tensors. The transition indices are drawn beforehand (uniform, without replacement within a
batch) and are the same for every backend. Each backend stops early after ``--sample-seconds``
(at least 5 batches), so the slow ones do not dominate the run. Variants:

- ``loopsim``: ``TransitionDataset(store, keys=[observation, action, reward])`` then
  ``dataset.get_batch(indices)`` (one numpy gather per array). The one-time load (open +
  decompress into memory) is reported separately (``load s``).
- ``zarr chunks``: straight from the store's compressed chunks (``zarr.Array.oindex`` with the sorted
  rows), no load: why the dataset loads first.
- ``h5py file``: straight from the HDF5 file, as robomimic does without a cache: the indices sorted,
  one fancy read per dataset (observation rows for ``obs`` and ``next_obs`` fetched in one read of the
  sorted union). ``h5py rows``: the same with one read per row (``read_direct``-free plain slicing);
  the faster of the two is the h5py baseline of the goal.
- ``h5py memory``: every dataset read into memory (``load s``), then the same numpy gather as ours.
- ``npz files``: on demand, one ``np.load`` per distinct episode in the batch (what a per-episode
  file layout gives without a cache). ``npz memory``: every file loaded and concatenated once
  (``load s``), then the same numpy gather.

**Recording cost during a real rollout** (``--env``, default ``loopsim/FactoryPickPlace-v0``; also
with ``obs_mode="rgb", image_size=84`` unless ``--no-rgb``): the task's scripted expert
(``loopsim.envs.make_expert``, as ``loopsim.evaluation.run_expert`` runs it) for
``--rollout-episodes`` episodes with seeds ``0..M-1``, once plain and once through
``loopsim.datasets.recorder.RecordEpisodes`` into a fresh store (default ``flush_every``). Both
conditions use the same env instance; they alternate, the order flipping every repeat. Two measures:

- **attributed** (headline, robust to load): inside the recorded rollout, the recorder's own time is
  the wrapper's ``step``/``reset`` time minus the wrapped env's (every ``add_episode`` is in it);
  ``attributed loop`` = recorder time / (rollout wall time - recorder time), ``attributed total``
  adds the store's ``create`` and ``close`` (final merge) to the numerator. Both times come from the
  same seconds, so the load of other jobs mostly cancels (as ``% roll`` in ``env_throughput.py``).
  The goal is judged on ``attributed total``, the stricter one: with ``M`` episodes per store,
  ``create`` + ``close`` is paid once per ``M`` episodes (a deploy job's shard).
- **wall**: recorded wall time / plain wall time - 1 (``loop`` without, ``total`` with create and
  close). A cross-check; on a loaded machine its spread is tens of percent.

Columns: ``recorder ms/ep`` (the recorder's time per episode), ``create + close ms`` (once per store).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
import torch
import zarr
from _common import cell, package_version, silence_c_stdout, summary, verdict  # noqa: E402  (this folder)
from rich.console import Console
from rich.table import Table

import loopsim  # noqa: F401  (registers the env ids)
from loopsim.datasets import Episode, EpisodeMetadata, EpisodeStore
from loopsim.datasets.sampling import TransitionDataset
from loopsim.envs import make_expert

GOAL_RECORD = 0.05
ACTION_DIM = 4
KEYS = ("observation", "action", "reward", "terminated", "truncated")
WRITE_BACKENDS = ("loopsim", "h5py", "npz")
SAMPLE_BACKENDS = (
    "loopsim",
    "zarr chunks",
    "h5py file",
    "h5py rows",
    "h5py memory",
    "npz files",
    "npz memory",
)
MIN_BATCHES = 5

try:  # the recorder wrapper (datasets/recorder.py)
    from loopsim.datasets.recorder import RecordEpisodes
except ImportError:  # pragma: no cover - fallback while the recorder is being written
    # TODO: remove this fallback once loopsim.datasets.recorder is importable everywhere: the rollout
    # then always goes through RecordEpisodes (see record_rollout).
    RecordEpisodes = None


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def timed_methods(obj: Any, names: tuple[str, ...], acc: list[float]) -> Iterator[None]:
    """Shadow ``obj.<name>`` for each name by a wrapper adding the seconds of each call to ``acc[0]``.

    The instance attributes are removed on exit, so nothing of ``obj`` is changed afterwards.

    Args:
        obj: The object (an env or wrapper).
        names: Method names (``"step"``, ``"reset"``).
        acc: ``[seconds]``, updated in place.

    Yields:
        Nothing.
    """
    clock = time.perf_counter
    saved = {n: vars(obj).get(n) for n in names}

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return method(*args, **kwargs)
            finally:
                acc[0] += clock() - t0

        return timed

    for n in names:
        setattr(obj, n, wrap(getattr(obj, n)))
    try:
        yield
    finally:
        for n, old in saved.items():
            if old is None:
                delattr(obj, n)
            else:
                setattr(obj, n, old)


def du_mb(path: Path) -> float:
    """Disk usage of a file or directory tree [MB] (sum of file sizes)."""
    if path.is_file():
        return path.stat().st_size / 1e6
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


@dataclass
class Metrics:
    """One figure per repeat for each metric name of one backend (or rollout condition)."""

    values: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, **values: float) -> None:
        """Append one repeat's value of each metric."""
        for key, value in values.items():
            self.values.setdefault(key, []).append(float(value))

    def get(self, key: str) -> list[float] | None:
        """The values of ``key`` (``None`` if never measured)."""
        return self.values.get(key)


# ---------------------------------------------------------------------------------------------- data
def make_episodes(n: int, steps: int, obs_dim: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Synthetic episodes (see the module docstring).

    Args:
        n: Episodes.
        steps: Steps ``T`` per episode.
        obs_dim: Observation dimension ``D``.
        seed: Seed of the generator.

    Returns:
        One dict per episode: ``observation`` ``(T+1, D)`` float32, ``action`` ``(T, 4)`` float32,
        ``reward`` ``(T,)`` float64, ``terminated`` / ``truncated`` ``(T,)`` bool.
    """
    rng = np.random.default_rng(seed)
    out = []
    for e in range(n):
        term = np.zeros(steps, dtype=bool)
        trunc = np.zeros(steps, dtype=bool)
        (term if e % 2 else trunc)[-1] = True
        out.append(
            {
                "observation": rng.standard_normal((steps + 1, obs_dim), dtype=np.float32),
                "action": rng.uniform(-1, 1, (steps, ACTION_DIM)).astype(np.float32),
                "reward": rng.standard_normal(steps),
                "terminated": term,
                "truncated": trunc,
            }
        )
    return out


def spaces(obs_dim: int) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """Observation and action spaces of the synthetic episodes."""
    obs = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    return obs, gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)


# ---------------------------------------------------------------------------------------------- writing
@dataclass
class WriteResult:
    """Timings of writing every episode with one backend.

    Attributes:
        total: Seconds from create/open to close [s].
        calls: Seconds of each per-episode write call.
        parts: Named parts of ``total`` [s] (loopsim: ``create``, ``merge`` = time in ``flush``
            including the final one in ``close``).
    """

    total: float
    calls: list[float]
    parts: dict[str, float] = field(default_factory=dict)


def write_loopsim(path: Path, episodes: list[dict[str, np.ndarray]], obs_dim: int) -> WriteResult:
    """``EpisodeStore.create`` + ``add_episode`` per episode + ``close``."""
    obs_space, act_space = spaces(obs_dim)
    items = [
        Episode(
            observations=ep["observation"],
            actions=ep["action"],
            rewards=ep["reward"],
            terminated=ep["terminated"],
            truncated=ep["truncated"],
            metadata=EpisodeMetadata(seed=i, site="lab", policy_id="bench"),
        )
        for i, ep in enumerate(episodes)
    ]
    clock = time.perf_counter
    calls = []
    t0 = clock()
    store = EpisodeStore.create(path, observation_space=obs_space, action_space=act_space, env_id="bench")
    create = clock() - t0
    merge = [0.0]
    with timed_methods(store, ("flush",), merge):
        for item in items:
            t1 = clock()
            store.add_episode(item)
            calls.append(clock() - t1)
        store.close()
    return WriteResult(clock() - t0, calls, {"create": create, "merge": merge[0]})


def write_h5py(path: Path, episodes: list[dict[str, np.ndarray]], obs_dim: int) -> WriteResult:
    """One resizable dataset per array, one ``resize`` + write per array per episode, flush at the end."""
    clock = time.perf_counter
    calls = []
    t0 = clock()
    with h5py.File(path, "w") as f:
        first = episodes[0]
        dsets = {
            k: f.create_dataset(
                k,
                shape=(0, *first[k].shape[1:]),
                maxshape=(None, *first[k].shape[1:]),
                dtype=first[k].dtype,
                chunks=True,
            )
            for k in KEYS
        }
        ends = f.create_dataset("episode_ends", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=True)
        steps = 0
        for i, ep in enumerate(episodes):
            t1 = clock()
            for k in KEYS:
                d = dsets[k]
                n = d.shape[0]
                d.resize(n + len(ep[k]), axis=0)
                d[n:] = ep[k]
            steps += len(ep["action"])
            ends.resize(i + 1, axis=0)
            ends[i] = steps
            calls.append(clock() - t1)
        f.flush()
    return WriteResult(clock() - t0, calls)


def write_npz(path: Path, episodes: list[dict[str, np.ndarray]], obs_dim: int) -> WriteResult:
    """One uncompressed ``np.savez`` per episode, temporary name then ``os.replace`` (atomic)."""
    clock = time.perf_counter
    calls = []
    t0 = clock()
    path.mkdir(parents=True)
    for i, ep in enumerate(episodes):
        t1 = clock()
        final = path / f"{i:08d}.npz"
        tmp = path / f".{i:08d}.npz.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **ep)
        os.replace(tmp, final)
        calls.append(clock() - t1)
    return WriteResult(clock() - t0, calls)


WRITERS: dict[str, Callable[[Path, list[dict[str, np.ndarray]], int], WriteResult]] = {
    "loopsim": write_loopsim,
    "h5py": write_h5py,
    "npz": write_npz,
}
WRITE_PATHS = {"loopsim": "store", "h5py": "data.h5", "npz": "npz"}


# ---------------------------------------------------------------------------------------------- sampling
def step_episode(ends: np.ndarray) -> np.ndarray:
    """``(N,)`` int64: the episode of every step, given the ``(E,)`` cumulative ends."""
    lengths = np.diff(ends, prepend=0)
    return np.repeat(np.arange(len(ends), dtype=np.int64), lengths)


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy batch -> torch tensors (as a training step would take them)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class MemoryGather:
    """Numpy gather from arrays in memory: the same code for h5py and npz loaded into memory.

    Args:
        arrays: ``observation`` ``(N+E, D)``, ``action`` ``(N, 4)``, ``reward`` ``(N,)``.
        ends: ``(E,)`` cumulative step counts.
    """

    def __init__(self, arrays: dict[str, np.ndarray], ends: np.ndarray) -> None:
        """Keep the arrays and the step -> episode map."""
        self.arrays = arrays
        self.step_ep = step_episode(ends)

    def __call__(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Batch of transitions ``idx``."""
        rows = idx + self.step_ep[idx]
        obs = self.arrays["observation"]
        return to_torch(
            {
                "observation": obs[rows],
                "next_observation": obs[rows + 1],
                "action": self.arrays["action"][idx],
                "reward": self.arrays["reward"][idx],
            }
        )


def sampler_loopsim(path: Path) -> tuple[Callable[[np.ndarray], Any], Callable[[], None]]:
    """Open the store and load a ``TransitionDataset`` (the timed load)."""
    store = EpisodeStore.open(path / "store")
    ds = TransitionDataset(store, keys=["observation", "action", "reward"])
    return ds.get_batch, store.close


def sampler_zarr(path: Path) -> tuple[Callable[[np.ndarray], Any], Callable[[], None]]:
    """Random batches straight from the store's compressed chunks."""
    store = EpisodeStore.open(path / "store")
    group = zarr.open_group(str(path / "store"), mode="r")
    obs, act, rew = group["data/observation"], group["data/action"], group["data/reward"]
    step_ep = step_episode(store.episode_ends)

    def batch(idx: np.ndarray) -> dict[str, torch.Tensor]:
        s = np.sort(idx)
        rows = s + step_ep[s]
        obs_rows = np.union1d(rows, rows + 1)
        o = obs.oindex[obs_rows]
        return to_torch(
            {
                "observation": o[np.searchsorted(obs_rows, rows)],
                "next_observation": o[np.searchsorted(obs_rows, rows + 1)],
                "action": act.oindex[s],
                "reward": rew.oindex[s],
            }
        )

    return batch, store.close


def sampler_h5py_file(
    path: Path, per_row: bool = False
) -> tuple[Callable[[np.ndarray], Any], Callable[[], None]]:
    """Random batches straight from the HDF5 file (sorted fancy reads, or one read per row)."""
    f = h5py.File(path / "data.h5", "r")
    obs, act, rew = f["observation"], f["action"], f["reward"]
    step_ep = step_episode(f["episode_ends"][:])

    def fancy(idx: np.ndarray) -> dict[str, torch.Tensor]:
        s = np.sort(idx)
        rows = s + step_ep[s]
        obs_rows = np.union1d(rows, rows + 1)
        o = obs[obs_rows]
        return to_torch(
            {
                "observation": o[np.searchsorted(obs_rows, rows)],
                "next_observation": o[np.searchsorted(obs_rows, rows + 1)],
                "action": act[s],
                "reward": rew[s],
            }
        )

    def rows_(idx: np.ndarray) -> dict[str, torch.Tensor]:
        rows = idx + step_ep[idx]
        pairs = np.stack([obs[r : r + 2] for r in rows])  # obs and next_obs in one read
        return to_torch(
            {
                "observation": pairs[:, 0],
                "next_observation": pairs[:, 1],
                "action": np.stack([act[i] for i in idx]),
                "reward": np.array([rew[i] for i in idx]),
            }
        )

    return (rows_ if per_row else fancy), f.close


def sampler_h5py_memory(path: Path) -> tuple[Callable[[np.ndarray], Any], Callable[[], None]]:
    """Every dataset read into memory, then :class:`MemoryGather`."""
    with h5py.File(path / "data.h5", "r") as f:
        arrays = {k: f[k][:] for k in ("observation", "action", "reward")}
        ends = f["episode_ends"][:]
    return MemoryGather(arrays, ends), lambda: None


def sampler_npz_files(path: Path) -> tuple[Callable[[np.ndarray], Any], Callable[[], None]]:
    """On demand: one ``np.load`` per distinct episode of the batch (episode lengths from a first pass)."""
    files = sorted((path / "npz").glob("*.npz"))
    lengths = []
    for p in files:  # the index a per-episode layout needs: counted in the load time
        with np.load(p) as z:
            lengths.append(len(z["reward"]))
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = ends - np.asarray(lengths)
    step_ep = step_episode(ends)

    def batch(idx: np.ndarray) -> dict[str, torch.Tensor]:
        eps = step_ep[idx]
        local = idx - starts[eps]
        order = np.argsort(eps, kind="stable")
        out = {"observation": [], "next_observation": [], "action": [], "reward": []}
        pos = []
        for e in np.unique(eps):
            sel = order[eps[order] == e]
            with np.load(files[e]) as z:
                o, a, r = z["observation"], z["action"], z["reward"]
            t = local[sel]
            out["observation"].append(o[t])
            out["next_observation"].append(o[t + 1])
            out["action"].append(a[t])
            out["reward"].append(r[t])
            pos.append(sel)
        inv = np.argsort(np.concatenate(pos))
        return to_torch({k: np.concatenate(v)[inv] for k, v in out.items()})

    return batch, lambda: None


def sampler_npz_memory(path: Path) -> tuple[Callable[[np.ndarray], Any], Callable[[], None]]:
    """Every file loaded and concatenated once, then :class:`MemoryGather`."""
    parts: dict[str, list[np.ndarray]] = {"observation": [], "action": [], "reward": []}
    for p in sorted((path / "npz").glob("*.npz")):
        with np.load(p) as z:
            for k in parts:
                parts[k].append(z[k])
    ends = np.cumsum([len(r) for r in parts["reward"]], dtype=np.int64)
    return MemoryGather({k: np.concatenate(v) for k, v in parts.items()}, ends), lambda: None


SAMPLERS: dict[str, Callable[[Path], tuple[Callable[[np.ndarray], Any], Callable[[], None]]]] = {
    "loopsim": sampler_loopsim,
    "zarr chunks": sampler_zarr,
    "h5py file": sampler_h5py_file,
    "h5py rows": lambda p: sampler_h5py_file(p, per_row=True),
    "h5py memory": sampler_h5py_memory,
    "npz files": sampler_npz_files,
    "npz memory": sampler_npz_memory,
}
LOADS = {"loopsim", "h5py memory", "npz memory"}


def check_batch(
    batch: dict[str, torch.Tensor], idx: np.ndarray, episodes: list[dict[str, np.ndarray]], ends: np.ndarray
) -> None:
    """Verify a batch against the source episodes (order-insensitive: compares sorted by reward).

    Raises:
        AssertionError: If any transition is wrong, e.g. a next observation from the wrong episode.
    """
    step_ep = step_episode(ends)
    starts = ends - np.diff(ends, prepend=0)
    want_r = np.array([episodes[step_ep[i]]["reward"][i - starts[step_ep[i]]] for i in idx])
    want_n = np.stack([episodes[step_ep[i]]["observation"][i - starts[step_ep[i]] + 1] for i in idx])
    got_r = batch["reward"].numpy().astype(np.float64)
    o1, o2 = np.argsort(want_r), np.argsort(got_r)
    assert np.allclose(want_r[o1], got_r[o2]), "rewards differ"
    assert np.array_equal(want_n[o1], batch["next_observation"].numpy()[o2]), "next observations differ"


def measure_sampling(
    name: str,
    path: Path,
    batches: list[np.ndarray],
    seconds: float,
    episodes: list[dict[str, np.ndarray]],
    ends: np.ndarray,
    m: Metrics,
) -> None:
    """Time the load (if any) and random batches of one sampling backend."""
    clock = time.perf_counter
    t0 = clock()
    fetch, close = SAMPLERS[name](path)
    load = clock() - t0
    try:
        check_batch(fetch(batches[0]), batches[0], episodes, ends)
        done, t0 = 0, clock()
        for idx in batches:
            fetch(idx)
            done += 1
            if done >= MIN_BATCHES and clock() - t0 > seconds:
                break
        elapsed = clock() - t0
    finally:
        close()
    m.add(batches_per_s=done / elapsed, ms_per_batch=elapsed / done * 1e3, batches=done)
    if name in LOADS or name == "npz files":
        m.add(load_s=load)


# ---------------------------------------------------------------------------------------------- rollout
@dataclass
class RolloutTarget:
    """One env (state or rgb) measured plain and recorded.

    Attributes:
        label: Row label.
        env: The env (``gymnasium.make``), shared by both conditions.
        plain: Metrics of the plain rollouts.
        recorded: Metrics of the recorded rollouts.
        overhead: Per-repeat overheads (``attributed_loop``, ``attributed_total``, ``wall_loop``,
            ``wall_total``; see :func:`record_rollout`).
    """

    label: str
    env: gym.Env
    plain: Metrics = field(default_factory=Metrics)
    recorded: Metrics = field(default_factory=Metrics)
    overhead: Metrics = field(default_factory=Metrics)


def run_episodes(env: gym.Env, expert: Any, n: int) -> int:
    """Run the expert for ``n`` episodes with seeds ``0..n-1``; return the steps taken."""
    steps = 0
    for s in range(n):
        env.reset(seed=s)
        expert.reset(seed=s)
        while True:
            _, _, terminated, truncated, _ = env.step(expert.act())
            steps += 1
            if terminated or truncated:
                break
    return steps


class _ManualRecorder(gym.Wrapper):
    """Fallback recorder while ``loopsim.datasets.recorder`` is unavailable: builds ``Episode`` objects.

    TODO: delete once ``RecordEpisodes`` is importable (the benchmark then uses it, see the import).
    """

    def __init__(self, env: gym.Env, store: EpisodeStore) -> None:
        super().__init__(env)
        self.store = store
        self._obs: list[np.ndarray] = []

    def reset(self, **kwargs: Any) -> Any:
        obs, info = self.env.reset(**kwargs)
        self._obs, self._act, self._rew, self._seed = [np.array(obs)], [], [], kwargs.get("seed")
        self._site = info.get("site", "")
        return obs, info

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._obs.append(np.array(obs))
        self._act.append(np.array(action))
        self._rew.append(float(reward))
        if terminated or truncated:
            t = len(self._act)
            term = np.zeros(t, bool)
            trunc = np.zeros(t, bool)
            term[-1], trunc[-1] = terminated, truncated
            self.store.add_episode(
                Episode(
                    np.stack(self._obs),
                    np.stack(self._act),
                    np.array(self._rew),
                    term,
                    trunc,
                    metadata=EpisodeMetadata(
                        seed=self._seed,
                        site=str(self._site),
                        success=bool(info.get("is_success", False)),
                        failure_mode=info.get("failure_mode"),
                    ),
                )
            )
        return obs, reward, terminated, truncated, info


def record_rollout(target: RolloutTarget, n: int, workdir: Path, repeat: int) -> None:
    """One repeat: plain and recorded rollouts of ``n`` expert episodes (order flips every repeat).

    In the recorded rollout the time inside the recorder is measured directly: the wrapper's
    ``step``/``reset`` time minus the wrapped env's ``step``/``reset`` time (every ``add_episode`` is in
    it). ``attributed`` overheads divide the recorder's time (plus ``create`` and ``close`` for the
    total) by the rest of the same rollout's wall time, so the load of other jobs, which changes the
    env's speed from one minute to the next, cancels. ``wall`` overheads compare the recorded rollout
    with the plain one (a cross-check, noisy on a loaded machine).
    """
    env = target.env
    clock = time.perf_counter
    expert = make_expert(env, seed=0)
    plain_loop = 0.0
    for cond in ("plain", "recorded") if repeat % 2 == 0 else ("recorded", "plain"):
        if cond == "plain":
            t0 = clock()
            steps = run_episodes(env, expert, n)
            plain_loop = clock() - t0
            target.plain.add(loop_s=plain_loop, ms_per_episode=plain_loop / n * 1e3, steps=steps)
            continue
        path = workdir / f"rollout-{target.label.replace('/', '_').replace(' ', '_')}-{repeat}"
        t0 = clock()
        store = EpisodeStore.create(
            path,
            observation_space=env.observation_space,
            action_space=env.action_space,
            env_id=env.spec.id if env.spec else "",
        )
        create = clock() - t0
        wrapped = (
            RecordEpisodes(env, store, policy_id="expert")
            if RecordEpisodes is not None
            else _ManualRecorder(env, store)
        )
        outer, inner = [0.0], [0.0]
        with timed_methods(wrapped, ("step", "reset"), outer), timed_methods(env, ("step", "reset"), inner):
            t1 = clock()
            steps = run_episodes(wrapped, expert, n)
            loop = clock() - t1
        t2 = clock()
        store.close()
        close = clock() - t2
        assert len(EpisodeStore.open(path)) == n, "recorded store is missing episodes"
        shutil.rmtree(path)
        recorder = outer[0] - inner[0]
        target.recorded.add(
            loop_s=loop,
            ms_per_episode=loop / n * 1e3,
            steps=steps,
            create_ms=create * 1e3,
            close_ms=close * 1e3,
            recorder_ms_per_episode=recorder / n * 1e3,
        )
        rest = loop - recorder  # the same rollout without the recorder's own time
        target.overhead.add(
            attributed_loop=recorder / rest, attributed_total=(recorder + create + close) / rest
        )
        rec_total = loop + create + close
    target.overhead.add(wall_loop=loop / plain_loop - 1, wall_total=rec_total / plain_loop - 1)


# ---------------------------------------------------------------------------------------------- report
def per_repeat_ratio(ours: list[float], others: list[list[float]]) -> list[float]:
    """``ours[r] / max(other[r] for other in others)`` per repeat."""
    return [o / max(x[r] for x in others) for r, o in enumerate(ours)]


def print_report(
    console: Console,
    write: dict[str, Metrics],
    sample: dict[str, Metrics],
    rollouts: list[RolloutTarget],
    args: argparse.Namespace,
    elapsed: float,
) -> dict[str, Any]:
    """Print the three tables and return the goals' results."""
    goals: dict[str, Any] = {}
    t = Table(
        title=f"Write: {args.episodes} episodes x {args.steps} steps, obs {args.obs_dim} float32, "
        f"action 4 ({args.repeats} repeats; median, min-max below)",
        show_lines=True,
    )
    for col in (
        "backend",
        "ms/episode",
        "episodes/s",
        "add p50 ms",
        "add max ms",
        "create ms",
        "merge ms/ep",
        "disk MB",
        "x best alt",
        "goal >= 1x",
    ):
        t.add_column(col, justify="left" if col == "backend" else "right")
    alts = [write[b].values["eps"] for b in WRITE_BACKENDS if b != "loopsim" and write[b].get("eps")]
    ratios = (
        per_repeat_ratio(write["loopsim"].values["eps"], alts) if alts and write["loopsim"].get("eps") else []
    )
    for b in WRITE_BACKENDS:
        m = write[b]
        is_ours = b == "loopsim"
        ok = bool(ratios) and statistics.median(ratios) >= 1.0
        t.add_row(
            b,
            cell(m.get("ms_per_episode"), ".2f"),
            cell(m.get("eps"), ".0f"),
            cell(m.get("call_p50_ms"), ".2f"),
            cell(m.get("call_max_ms"), ".1f"),
            cell(m.get("create_ms"), ".0f"),
            cell(m.get("merge_ms_per_episode"), ".2f"),
            cell(m.get("disk_mb"), ".1f"),
            cell(ratios, ".2f", suffix="x") if is_ours else "",
            verdict(ok) if is_ours and ratios else ("(reference)" if not is_ours else "-"),
        )
    if ratios:
        goals["write_vs_best_alternative"] = {
            "ratio_median": statistics.median(ratios),
            "pass": statistics.median(ratios) >= 1.0,
        }
    console.print(t)

    t = Table(
        title=f"Sample: random batches of {args.batch_size} transitions (obs, action, reward, next_obs) "
        "as torch tensors; batches/s (median, min-max)",
        show_lines=True,
    )
    for col in ("backend", "batches/s", "ms/batch", "load s", "x h5py\n(best file)", "goal > 1x"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    h5 = [
        sample[b].values["batches_per_s"]
        for b in ("h5py file", "h5py rows")
        if sample[b].get("batches_per_s")
    ]
    s_ratios = (
        per_repeat_ratio(sample["loopsim"].values["batches_per_s"], h5)
        if h5 and sample["loopsim"].get("batches_per_s")
        else []
    )
    for b in SAMPLE_BACKENDS:
        m = sample[b]
        is_ours = b == "loopsim"
        ratio_cell = ""
        if h5 and m.get("batches_per_s"):
            rr = per_repeat_ratio(m.values["batches_per_s"], h5)
            ratio_cell = cell(rr, ".2f", suffix="x")
        ok = bool(s_ratios) and statistics.median(s_ratios) > 1.0
        t.add_row(
            b,
            cell(m.get("batches_per_s"), ".0f"),
            cell(m.get("ms_per_batch"), ".3f"),
            cell(m.get("load_s"), ".3f"),
            ratio_cell,
            verdict(ok) if is_ours and s_ratios else "",
        )
    if s_ratios:
        goals["sample_vs_h5py"] = {
            "ratio_median": statistics.median(s_ratios),
            "pass": statistics.median(s_ratios) > 1.0,
        }
    console.print(t)

    if rollouts:
        t = Table(
            title=f"Recording cost: scripted expert, {args.rollout_episodes} episodes per condition "
            f"({args.repeats} interleaved repeats; recorder: "
            f"{'RecordEpisodes' if RecordEpisodes is not None else 'manual Episode fallback'})",
            show_lines=True,
        )
        for col in (
            "env",
            "steps/ep",
            "plain\nms/ep",
            "recorded\nms/ep",
            "recorder\nms/ep",
            "create +\nclose ms",
            "attributed\nloop",
            "attributed\ntotal",
            "wall\nloop",
            "wall\ntotal",
            f"goal <= {GOAL_RECORD:.0%}\n(attr. total)",
        ):
            t.add_column(col, justify="left" if col == "env" else "right")
        for r in rollouts:
            o, rec = r.overhead, r.recorded
            if not o.get("attributed_total"):
                t.add_row(r.label, "[red]error[/red]", *["-"] * 9)
                continue
            med = statistics.median(o.values["attributed_total"])
            goals[f"recording {r.label}"] = {
                "attributed_total_median": med,
                "attributed_loop_median": statistics.median(o.values["attributed_loop"]),
                "wall_total_median": statistics.median(o.values["wall_total"]),
                "pass": med <= GOAL_RECORD,
            }
            setup = [c + z for c, z in zip(rec.values["create_ms"], rec.values["close_ms"], strict=True)]
            t.add_row(
                r.label,
                f"{statistics.median(r.plain.values['steps']) / args.rollout_episodes:.0f}",
                cell(r.plain.get("ms_per_episode"), ".1f"),
                cell(rec.get("ms_per_episode"), ".1f"),
                cell(rec.get("recorder_ms_per_episode"), ".2f"),
                cell(setup, ".0f"),
                cell(o.get("attributed_loop"), "+.2f", 100, "%"),
                cell(o.get("attributed_total"), "+.2f", 100, "%"),
                cell(o.get("wall_loop"), "+.1f", 100, "%"),
                cell(o.get("wall_total"), "+.1f", 100, "%"),
                verdict(med <= GOAL_RECORD),
            )
        console.print(t)
    load = os.getloadavg()
    console.print(
        f"[dim]Wall time {elapsed:.0f} s; load average now {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}. Work directory: {args.dir or 'a temporary directory (removed)'}.[/dim]"
    )
    return goals


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=1000, help="synthetic episodes (default 1000)")
    parser.add_argument("--steps", type=int, default=50, help="steps per synthetic episode (default 50)")
    parser.add_argument("--obs-dim", type=int, default=32, help="observation dimension (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--batch-size", type=int, default=256, help="transitions per batch (default 256)")
    parser.add_argument(
        "--batches", type=int, default=500, help="batches per backend and repeat (default 500)"
    )
    parser.add_argument(
        "--sample-seconds",
        type=float,
        default=2.0,
        help="stop a backend's batches after this many seconds (default 2)",
    )
    parser.add_argument(
        "--rollout-episodes",
        type=int,
        default=30,
        help="expert episodes per condition and repeat (default 30; 0 skips the rollout)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=None,
        help="env id for the rollout (repeatable; default loopsim/FactoryPickPlace-v0)",
    )
    parser.add_argument("--no-rgb", action="store_true", help="skip the obs_mode='rgb' rollout")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and batches")
    parser.add_argument("--dir", type=str, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--json", type=str, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    for name in ("episodes", "steps", "obs_dim", "repeats", "batch_size", "batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size > args.episodes * args.steps:
        parser.error("--batch-size exceeds the number of transitions")
    return args


def main(argv: list[str] | None = None) -> int:
    """Write, sample and record in interleaved repeats, print the report.

    Returns:
        0, or 1 if a measurement crashed (its traceback is printed).
    """
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 170)
    console.print(
        f"loopsim {package_version('loopsim')}, zarr {zarr.__version__}, h5py {h5py.__version__} "
        f"(HDF5 {h5py.version.hdf5_version}), numpy {np.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="store-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    episodes = make_episodes(args.episodes, args.steps, args.obs_dim, args.seed)
    ends = np.cumsum([len(e["action"]) for e in episodes], dtype=np.int64)
    n_trans = int(ends[-1])
    rng = np.random.default_rng(args.seed + 1)
    batches = [rng.choice(n_trans, args.batch_size, replace=False) for _ in range(args.batches)]

    rollouts: list[RolloutTarget] = []
    if args.rollout_episodes > 0:
        for env_id in args.env or ["loopsim/FactoryPickPlace-v0"]:
            variants = [(env_id, {})] + (
                [] if args.no_rgb else [(f"{env_id} rgb", {"obs_mode": "rgb", "image_size": 84})]
            )
            for label, kw in variants:
                with silence_c_stdout():
                    env = gym.make(env_id, **kw)
                run_episodes(env, make_expert(env, seed=0), 1)  # warm-up, untimed
                rollouts.append(RolloutTarget(label, env))

    write = {b: Metrics() for b in WRITE_BACKENDS}
    sample = {b: Metrics() for b in SAMPLE_BACKENDS}
    crashed = False
    start = time.perf_counter()
    try:
        for repeat in range(args.repeats):
            rdir = base / f"repeat-{repeat}"
            rdir.mkdir()
            order = WRITE_BACKENDS[repeat % 3 :] + WRITE_BACKENDS[: repeat % 3]
            for b in order:
                try:
                    res = WRITERS[b](rdir / WRITE_PATHS[b], episodes, args.obs_dim)
                except Exception:  # noqa: BLE001 - report, keep measuring the others
                    crashed = True
                    write[b].errors.append(traceback.format_exc())
                    console.print(f"[red]write {b} crashed[/red]\n{write[b].errors[-1]}")
                    continue
                calls = np.array(res.calls) * 1e3
                write[b].add(
                    ms_per_episode=res.total / args.episodes * 1e3,
                    eps=args.episodes / res.total,
                    call_p50_ms=float(np.median(calls)),
                    call_max_ms=float(calls.max()),
                    disk_mb=du_mb(rdir / WRITE_PATHS[b]),
                )
                if res.parts:
                    write[b].add(
                        create_ms=res.parts["create"] * 1e3,
                        merge_ms_per_episode=res.parts["merge"] / args.episodes * 1e3,
                    )
            console.print(
                "[dim]repeat {}/{} write: {}[/dim]".format(
                    repeat + 1,
                    args.repeats,
                    ", ".join(
                        f"{b} {write[b].values['ms_per_episode'][-1]:.2f} ms/ep"
                        for b in WRITE_BACKENDS
                        if write[b].get("ms_per_episode")
                        and len(write[b].values["ms_per_episode"]) == repeat + 1
                    ),
                )
            )
            s_order = (
                SAMPLE_BACKENDS[repeat % len(SAMPLE_BACKENDS) :]
                + SAMPLE_BACKENDS[: repeat % len(SAMPLE_BACKENDS)]
            )
            for b in s_order:
                try:
                    measure_sampling(b, rdir, batches, args.sample_seconds, episodes, ends, sample[b])
                except Exception:  # noqa: BLE001
                    crashed = True
                    sample[b].errors.append(traceback.format_exc())
                    console.print(f"[red]sample {b} crashed[/red]\n{sample[b].errors[-1]}")
            console.print(
                "[dim]repeat {}/{} sample: {}[/dim]".format(
                    repeat + 1,
                    args.repeats,
                    ", ".join(
                        f"{b} {sample[b].values['batches_per_s'][-1]:.0f}/s"
                        for b in SAMPLE_BACKENDS
                        if sample[b].get("batches_per_s")
                    ),
                )
            )
            shutil.rmtree(rdir)
            for r in rollouts:
                try:
                    with silence_c_stdout():
                        record_rollout(r, args.rollout_episodes, base, repeat)
                except Exception:  # noqa: BLE001
                    crashed = True
                    r.overhead.errors.append(traceback.format_exc())
                    console.print(f"[red]rollout {r.label} crashed[/red]\n{r.overhead.errors[-1]}")
                    continue
                o = r.overhead.values
                console.print(
                    f"[dim]repeat {repeat + 1}/{args.repeats} rollout {r.label}: recorder "
                    f"{r.recorded.values['recorder_ms_per_episode'][-1]:.2f} ms/ep, overhead "
                    f"attributed {o['attributed_loop'][-1]:+.2%} (total {o['attributed_total'][-1]:+.2%}), "
                    f"wall {o['wall_loop'][-1]:+.1%}[/dim]"
                )
        elapsed = time.perf_counter() - start
        goals = print_report(console, write, sample, rollouts, args, elapsed)
    finally:
        for r in rollouts:
            with contextlib.suppress(Exception):
                r.env.close()
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    if args.json:
        out = {
            "args": vars(args),
            "versions": {n: package_version(n) for n in ("loopsim", "zarr", "h5py", "numpy", "torch")},
            "cpus": os.cpu_count(),
            "load_average_end": list(os.getloadavg()),
            "wall_time_s": elapsed,
            "recorder": "RecordEpisodes" if RecordEpisodes is not None else "manual",
            "goals": goals,
            "write": {
                b: {
                    "per_repeat": m.values,
                    "summary": {k: summary(v) for k, v in m.values.items()},
                    "errors": m.errors,
                }
                for b, m in write.items()
            },
            "sample": {
                b: {
                    "per_repeat": m.values,
                    "summary": {k: summary(v) for k, v in m.values.items()},
                    "errors": m.errors,
                }
                for b, m in sample.items()
            },
            "rollout": {
                r.label: {
                    k: {"per_repeat": m.values, "summary": {n: summary(v) for n, v in m.values.items()}}
                    for k, m in (("plain", r.plain), ("recorded", r.recorded), ("overhead", r.overhead))
                }
                for r in rollouts
            },
        }
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        console.print(f"wrote {args.json}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
