"""Reading episode stores for training: several stores viewed as one, transitions and sequences.

- :class:`StoreUnion` views several :class:`~loopsim.datasets.store.EpisodeStore` objects (for example
  the shards one loop iteration's deploy jobs wrote) as one store: ``len``, :meth:`~StoreUnion.episode`,
  :meth:`~StoreUnion.metadata` (with a ``store`` column), :meth:`~StoreUnion.select` and
  :meth:`~StoreUnion.load`, with global episode indices running through the stores in order.
- :class:`TransitionDataset` is a map-style :class:`torch.utils.data.Dataset` of transitions
  ``(observation, action, reward, next_observation, terminated, truncated, extras)``.
- :class:`SequenceDataset` is a map-style dataset of fixed-length windows of ``horizon`` steps that
  never cross an episode boundary (for action chunking, diffusion policies, recurrent policies).

Both datasets decompress the chosen arrays once, at construction (``store.load``), and then index
numpy arrays in memory. A batch is one fancy-indexing gather per array: use
``dataset[indices]`` / :meth:`~TransitionDataset.get_batch`, :meth:`~TransitionDataset.sample` or
:meth:`~TransitionDataset.dataloader` (a :class:`~torch.utils.data.DataLoader` whose sampler yields
whole batches, so nothing is stacked sample by sample). ``DataLoader(dataset, batch_size=B)`` works
too: torch then calls :meth:`~TransitionDataset.__getitems__` (one gather per array, split into
samples as torch's contract wants) and stacks them again with ``default_collate``.

Where transitions come from: an episode of ``T`` steps has ``T + 1`` observation rows. Transition
``t`` of the episode has ``observation = obs[t]`` and ``next_observation = obs[t + 1]``, so the
last transition's ``next_observation`` is the episode's final observation (row ``T``), never the
next episode's reset observation.

Randomness (shuffling, :meth:`~TransitionDataset.sample`) comes only from a generator the caller
passes (``torch.Generator`` or ``numpy.random.Generator``), so runs are reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from loopsim.datasets.schema import Episode, EpisodeMetadata
from loopsim.datasets.store import EpisodeStore

__all__ = ["SequenceDataset", "StoreUnion", "TransitionDataset"]

_STEP_KEYS = ("action", "reward", "terminated", "truncated")


def _is_obs(key: str) -> bool:
    return key == "observation" or key.startswith("observation/")


# ================================================================================================ union
class StoreUnion:
    """Several episode stores with equal spaces, viewed as one read-only store.

    Global episode indices run through the stores in the order given: with stores of 3 and 2
    episodes, episode 3 of the union is episode 0 of the second store. The union reads the stores'
    current lengths at every call, so episodes a store's writer commits later (visible after
    ``store.refresh()`` or :meth:`refresh`) appear at the end of that store's range.

    Args:
        stores: The stores (:class:`EpisodeStore`, or other unions, which are flattened), at least one.
            They must have equal observation and action spaces; step extras may differ, and only the
            ones every store has are in :attr:`data_keys`.

    Raises:
        ValueError: If ``stores`` is empty or a store's observation or action space differs from the
            first store's (naming the store and both spaces).
    """

    def __init__(self, stores: Sequence[EpisodeStore | StoreUnion]) -> None:
        """Check the spaces and keep the stores (see the class docstring)."""
        flat: list[EpisodeStore] = []
        for s in stores:
            flat.extend(s.stores if isinstance(s, StoreUnion) else [s])
        if not flat:
            raise ValueError("StoreUnion needs at least one store")
        first = flat[0]
        for k, s in enumerate(flat[1:], start=1):
            for what in ("observation_space", "action_space"):
                if getattr(s, what) != getattr(first, what):
                    raise ValueError(
                        f"store {k} ({s.url}) has {what.replace('_', ' ')} {getattr(s, what)}, but store 0 "
                        f"({first.url}) has {getattr(first, what)}: a union needs equal spaces")
        self.stores: list[EpisodeStore] = flat
        self.observation_space: gym.Space = first.observation_space
        self.action_space: gym.Space = first.action_space
        common = set.intersection(*(set(s.step_extras) for s in flat))
        self.step_extras: list[str] = [e for e in first.step_extras if e in common]
        self.data_keys: list[str] = [k for k in first.data_keys if all(k in s.data_keys for s in flat)]

    @classmethod
    def open(cls, urls: Sequence[str | os.PathLike]) -> StoreUnion:
        """Open every store read-only (``EpisodeStore.open(url, mode="r")``) and view them as one.

        Args:
            urls: Store locations (local directories or fsspec URLs).

        Returns:
            The union; :meth:`close` (or ``with``) closes the stores it opened.
        """
        stores = [EpisodeStore.open(u, mode="r") for u in urls]
        try:
            return cls(stores)
        except BaseException:
            for s in stores:
                s.close()
            raise

    # ------------------------------------------------------------------------------- bookkeeping
    def _lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.stores], dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        """``(S + 1,)`` int64: store ``k`` holds global episodes ``offsets[k]:offsets[k + 1]``."""
        return np.concatenate([[0], np.cumsum(self._lengths())]).astype(np.int64)

    def locate(self, index: int) -> tuple[int, int]:
        """Map a global episode index to ``(store index, episode index within that store)``.

        Args:
            index: Global episode index (negative counts from the end).

        Returns:
            ``(k, j)``: episode ``j`` of ``self.stores[k]``.

        Raises:
            IndexError: If out of range.
        """
        offsets = self.offsets
        n = int(offsets[-1])
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"episode {index} out of range: the union has {n} episodes")
        k = int(np.searchsorted(offsets, i, side="right") - 1)
        return k, i - int(offsets[k])

    def __len__(self) -> int:
        """Number of committed episodes over all stores."""
        return int(self._lengths().sum())

    @property
    def n_episodes(self) -> int:
        """Number of committed episodes over all stores."""
        return len(self)

    @property
    def episode_ends(self) -> np.ndarray:
        """``(E,)`` int64 cumulative step counts over all stores, in global episode order."""
        lengths = [np.diff(s.episode_ends, prepend=0) for s in self.stores]
        return np.cumsum(np.concatenate(lengths), dtype=np.int64) if lengths else np.zeros(0, np.int64)

    @property
    def n_transitions(self) -> int:
        """Total steps over all stores."""
        return int(sum(s.n_transitions for s in self.stores))

    def refresh(self) -> int:
        """Re-read every store's committed state (see :meth:`EpisodeStore.refresh`).

        Returns:
            The number of episodes now visible.
        """
        for s in self.stores:
            s.refresh()
        return len(self)

    def close(self) -> None:
        """Close every store of the union."""
        for s in self.stores:
            s.close()

    def __enter__(self) -> StoreUnion:
        """Context manager: closes the stores on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the stores."""
        self.close()

    def __repr__(self) -> str:
        """Short description."""
        return (f"StoreUnion({len(self.stores)} stores, episodes={len(self)}, "
                f"transitions={self.n_transitions})")

    # ------------------------------------------------------------------------------- reading
    def episode(self, index: int) -> Episode:
        """Read one episode by global index.

        Args:
            index: Global episode index (negative counts from the end).

        Returns:
            The :class:`Episode` (with the extras of its own store).

        Raises:
            IndexError: If out of range.
        """
        k, j = self.locate(index)
        return self.stores[k].episode(j)

    def __getitem__(self, index: int) -> Episode:
        """Same as :meth:`episode`."""
        return self.episode(index)

    def __iter__(self) -> Iterator[Episode]:
        """Iterate over all episodes in global order."""
        for s in self.stores:
            yield from s

    def metadata_row(self, index: int) -> EpisodeMetadata:
        """The :class:`EpisodeMetadata` of one episode (global index)."""
        k, j = self.locate(index)
        return self.stores[k].metadata_row(j)

    def metadata(self) -> dict[str, np.ndarray]:
        """Per-episode metadata of all stores as columns, in global episode order.

        Returns:
            Mapping column -> ``(E,)`` array: every column of :meth:`EpisodeStore.metadata`, with
            ``episode`` the global index, plus ``store`` (int64, index of the store in :attr:`stores`)
            and ``store_episode`` (int64, the episode's index within its store).
        """
        parts = [s.metadata() for s in self.stores]
        cols = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        cols["store"] = np.concatenate([np.full(len(p["episode"]), k, dtype=np.int64)
                                        for k, p in enumerate(parts)])
        cols["store_episode"] = np.concatenate([p["episode"] for p in parts]).astype(np.int64)
        cols["episode"] = np.arange(len(cols["store"]), dtype=np.int64)
        return cols

    def select(self, *, site: str | Sequence[str] | None = None,
               iteration: int | Sequence[int] | None = None, policy_id: str | Sequence[str] | None = None,
               policy_version: str | Sequence[str] | None = None, success: bool | None = None,
               failure_mode: str | Sequence[str] | None = None,
               store: int | Sequence[int] | None = None) -> np.ndarray:
        """Global indices of the episodes matching every given filter.

        The filters are those of :meth:`EpisodeStore.select` (a value or a list of accepted values;
        ``failure_mode=None`` inside a list means "no failure"), applied by each store, plus ``store``
        (indices into :attr:`stores`).

        Returns:
            ``(K,)`` int64 global episode indices, ascending.
        """
        wanted = None if store is None else {int(s) for s in np.atleast_1d(store)}
        offsets = self.offsets
        out = []
        for k, s in enumerate(self.stores):
            if wanted is not None and k not in wanted:
                continue
            local = s.select(site=site, iteration=iteration, policy_id=policy_id,
                             policy_version=policy_version, success=success, failure_mode=failure_mode)
            out.append(np.asarray(local, dtype=np.int64) + offsets[k])
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)

    def load(self, keys: Sequence[str] | None = None, episodes: Sequence[int] | None = None
             ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Load whole arrays of the chosen episodes into memory, like :meth:`EpisodeStore.load`.

        Args:
            keys: Data keys (see :attr:`data_keys`); default all common keys.
            episodes: Global episode indices; they are sorted and de-duplicated (the result is in
                ascending global order). Default all.

        Returns:
            ``(arrays, episode_ends)``: each array concatenated over the chosen episodes (observation
            keys with ``T+1`` rows per episode), and the ``(E',)`` int64 cumulative step counts.

        Raises:
            KeyError: For a key not held by every store (naming the stores that lack it).
            IndexError: For an episode index out of range.
        """
        keys = list(self.data_keys if keys is None else keys)
        for key in keys:
            missing = [k for k, s in enumerate(self.stores) if key not in s.data_keys]
            if missing:
                raise KeyError(f"data key {key!r} is not in stores {missing}; keys common to all stores: "
                               f"{self.data_keys}")
        offsets = self.offsets
        n = int(offsets[-1])
        if episodes is None:
            chosen = np.arange(n, dtype=np.int64)
        else:
            chosen = np.unique(np.asarray(episodes, dtype=np.int64))
            if len(chosen) and (chosen[0] < 0 or chosen[-1] >= n):
                raise IndexError(f"episode indices out of range [0, {n})")
        parts: list[dict[str, np.ndarray]] = []
        ends: list[np.ndarray] = []
        base = 0
        for k, s in enumerate(self.stores):
            lo, hi = int(offsets[k]), int(offsets[k + 1])
            local = chosen[(chosen >= lo) & (chosen < hi)] - lo
            if not len(local):
                continue
            arrays, e = s.load(keys, None if len(local) == hi - lo else local)
            parts.append(arrays)
            ends.append(e + base)
            base += int(e[-1]) if len(e) else 0
        if not parts:
            arrays, _ = self.stores[0].load(keys, [])
            return arrays, np.zeros(0, dtype=np.int64)
        return ({key: np.concatenate([p[key] for p in parts]) for key in keys},
                np.concatenate(ends).astype(np.int64))


# ================================================================================================ datasets
Source = EpisodeStore | StoreUnion


def _as_index_array(indices: Any) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    return np.asarray(indices, dtype=np.int64)


def _random_indices(n: int, size: int, generator: torch.Generator | np.random.Generator | None) -> np.ndarray:
    if n < 1:
        raise ValueError("cannot sample from an empty dataset")
    if isinstance(generator, np.random.Generator):
        return generator.integers(0, n, size=size, dtype=np.int64)
    return torch.randint(0, n, (size,), generator=generator).numpy()


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr))


class _EpisodeArrays(Dataset):
    """Shared loading of the chosen keys and episodes into memory (base of both datasets)."""

    def __init__(self, source: Source, keys: Sequence[str] | None, episodes: Sequence[int] | None,
                 float32: bool) -> None:
        data_keys = list(source.data_keys)
        if keys is None:
            keys = data_keys
        expanded: list[str] = []
        for key in keys:
            if key == "observation" and "observation" not in data_keys:
                expanded.extend(k for k in data_keys if _is_obs(k))  # a Dict space: all of its keys
            elif key in data_keys:
                expanded.append(key)
            else:
                raise KeyError(f"unknown data key {key!r}; the source has {data_keys}")
        self.keys: list[str] = list(dict.fromkeys(expanded))
        self.observation_space: gym.Space = source.observation_space
        self.action_space: gym.Space = source.action_space
        self._dict_obs = isinstance(self.observation_space, gym.spaces.Dict)
        chosen = (np.arange(len(source), dtype=np.int64) if episodes is None
                  else np.unique(np.asarray(episodes, dtype=np.int64)))
        self.episodes: np.ndarray = chosen
        """``(E,)`` int64: the source's episode indices the dataset holds, ascending."""
        arrays, ends = source.load(self.keys, chosen)
        if float32:
            arrays = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in arrays.items()}
        self.arrays: dict[str, np.ndarray] = arrays
        """Key -> array in memory: ``(N + E, ...)`` for observation keys, ``(N, ...)`` for the others."""
        self.episode_ends: np.ndarray = np.asarray(ends, dtype=np.int64)
        """``(E,)`` int64 cumulative step counts of the held episodes."""
        self.episode_starts: np.ndarray = np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)
        """``(E,)`` int64 first step of each held episode."""
        self.episode_lengths: np.ndarray = self.episode_ends - self.episode_starts
        """``(E,)`` int64 steps ``T`` of each held episode."""
        self.n_transitions: int = int(self.episode_ends[-1]) if len(self.episode_ends) else 0
        # Episode (position in self.episodes) of every step: observation row of step t is t + that.
        self._step_episode = np.repeat(np.arange(len(self.episode_ends), dtype=np.int64),
                                       self.episode_lengths)

    def _obs(self, prefix: str, rows: np.ndarray, out: dict[str, Any]) -> None:
        """Gather observation rows into ``out[prefix]`` (a tensor, or a dict of them)."""
        obs_keys = [k for k in self.keys if _is_obs(k)]
        if not obs_keys:
            return
        if self._dict_obs:
            out[prefix] = {k.split("/", 1)[1]: _to_tensor(self.arrays[k][rows]) for k in obs_keys}
        else:
            out[prefix] = _to_tensor(self.arrays["observation"][rows])

    def _normalise(self, indices: Any) -> tuple[np.ndarray, bool]:
        """Index array and whether the request was a single int."""
        scalar_tensor = isinstance(indices, torch.Tensor) and indices.ndim == 0
        if isinstance(indices, (int, np.integer)) or scalar_tensor:
            idx = np.array([int(indices)], dtype=np.int64)
            single = True
        elif isinstance(indices, slice):
            idx = np.arange(len(self), dtype=np.int64)[indices]
            single = False
        else:
            arr = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
            idx = np.flatnonzero(arr) if arr.dtype == bool else _as_index_array(arr)
            single = False
        n = len(self)
        if idx.ndim != 1:
            raise IndexError(f"indices must be an int or a 1-D sequence of ints, got shape {idx.shape}")
        idx = np.where(idx < 0, idx + n, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range: the dataset has {n} items")
        return idx, single

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def get_batch(self, indices: Any) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getitem__(self, index: Any) -> dict[str, Any]:
        """One item (an int) or a batch (a 1-D sequence, array or tensor of ints, a boolean mask, or a slice).

        A batch has a leading batch dimension on every tensor and costs one gather per array.
        """
        idx, single = self._normalise(index)
        batch = self.get_batch(idx)
        return _unbatch(batch, 0) if single else batch

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Torch's batched fetch: one gather per array, returned as a list of samples.

        ``DataLoader(dataset, batch_size=B)`` calls this and stacks the samples back with its
        ``collate_fn``. :meth:`dataloader` avoids the split-and-stack altogether.
        """
        batch = self.get_batch(self._normalise(list(indices))[0])
        return [_unbatch(batch, i) for i in range(len(indices))]

    def sample(self, batch_size: int, generator: torch.Generator | np.random.Generator | None = None
               ) -> dict[str, Any]:
        """A batch of ``batch_size`` items drawn uniformly with replacement.

        Args:
            batch_size: Items in the batch.
            generator: Source of randomness (``torch.Generator`` or ``numpy.random.Generator``);
                ``None`` uses torch's global generator.

        Returns:
            The batch (see :meth:`get_batch`).
        """
        return self.get_batch(_random_indices(len(self), int(batch_size), generator))

    def dataloader(self, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                   generator: torch.Generator | None = None, **kwargs: Any) -> DataLoader:
        """A :class:`~torch.utils.data.DataLoader` that fetches each batch with one gather per array.

        The sampler yields whole index batches (a :class:`~torch.utils.data.BatchSampler`) and the
        loader's ``batch_size`` is ``None``, so each batch is ``dataset[indices]``: nothing is split into
        samples and stacked again.

        Args:
            batch_size: Items per batch.
            shuffle: Visit the items in random order (one epoch = each item once).
            drop_last: Drop the last, smaller batch.
            generator: ``torch.Generator`` for the shuffling (reproducible epochs).
            **kwargs: Passed to ``DataLoader`` (``num_workers``, ``pin_memory``, ...).

        Returns:
            The loader; each element is a batch dict as from :meth:`get_batch`.
        """
        base = RandomSampler(self, generator=generator) if shuffle else SequentialSampler(self)
        return DataLoader(self, sampler=BatchSampler(base, int(batch_size), drop_last), batch_size=None,
                          **kwargs)


def _unbatch(batch: Mapping[str, Any], i: int) -> dict[str, Any]:
    return {k: (_unbatch(v, i) if isinstance(v, Mapping) else v[i]) for k, v in batch.items()}


class TransitionDataset(_EpisodeArrays):
    """Transitions of an episode store (or a union of stores) as a map-style torch dataset.

    Item ``i`` is the ``i``-th step over the held episodes, in order. Each item is a dict of tensors
    (a batch has a leading ``B`` dimension on each):

    - ``observation``: ``obs_shape`` in the space's dtype (uint8 images stay uint8), or for a ``Dict``
      space a dict key -> tensor. Only if an observation key is loaded.
    - ``next_observation``: the same for the observation after the step. For the last step of an
      episode it is that episode's final observation (row ``T`` of its ``T + 1`` rows).
    - ``action``: ``action_shape``; ``reward``: ``()`` float32 (float64 if ``float32=False``);
      ``terminated``, ``truncated``: ``()`` bool; each only if loaded.
    - step extras the source has and ``keys`` includes: ``expert_action`` (``action_shape``),
      ``intervention``, ``is_success`` (``()`` bool).
    - ``episode``: ``()`` int64, the source's index of the episode; ``step``: ``()`` int64, the step
      within it.

    Args:
        source: An :class:`EpisodeStore` or :class:`StoreUnion`.
        keys: Data keys to load (see ``source.data_keys``; ``"observation"`` means every observation
            key of a ``Dict`` space). Default all. Leaving out keys you do not need saves memory.
        episodes: Episode indices of ``source`` to hold (e.g. from ``source.select(...)``); sorted and
            de-duplicated. Default all committed episodes.
        float32: Convert float64 arrays (``reward``, float64 observations) to float32 once, at load.

    Raises:
        KeyError: For an unknown key.
        IndexError: For an episode index out of range.
    """

    def __init__(self, source: Source, *, keys: Sequence[str] | None = None,
                 episodes: Sequence[int] | None = None, float32: bool = True) -> None:
        """Load the chosen arrays into memory (see the class docstring)."""
        super().__init__(source, keys, episodes, float32)

    def __len__(self) -> int:
        """Number of transitions held."""
        return self.n_transitions

    def get_batch(self, indices: Any) -> dict[str, Any]:
        """A batch of transitions: one gather per array.

        Args:
            indices: ``(B,)`` transition indices (any int sequence, array or tensor; negative allowed).

        Returns:
            Dict of tensors with a leading ``B`` dimension (see the class docstring).
        """
        t = self._normalise(indices)[0]
        ep = self._step_episode[t]
        rows = t + ep  # observation row of step t: T+1 rows per episode before it
        out: dict[str, Any] = {}
        self._obs("observation", rows, out)
        self._obs("next_observation", rows + 1, out)
        for key in self.keys:
            if not _is_obs(key):
                out[key] = _to_tensor(self.arrays[key][t])
        out["episode"] = torch.from_numpy(self.episodes[ep])
        out["step"] = torch.from_numpy(t - self.episode_starts[ep])
        return out


class SequenceDataset(_EpisodeArrays):
    """Fixed-length windows of ``horizon`` consecutive steps, never crossing an episode boundary.

    A window of episode ``e`` starting at step ``s`` covers steps ``s .. s + horizon - 1``; each step
    ``j`` contributes the observation it was taken from (``obs[j]``), its action, reward, flags and
    extras, so every tensor has ``horizon`` rows. The window starts of an episode of ``T`` steps are
    ``s = -pad_before .. T - horizon + pad_after`` (as diffusion_policy's ``SequenceSampler``).

    Padding policy, ``pad="edge"`` (default): steps outside ``0 .. T - 1`` repeat the episode's first
    or last step (observation, action, reward, flags alike; the final observation ``obs[T]`` is never
    part of a window), and ``mask`` marks the real steps. An episode shorter than ``horizon`` (more
    precisely, with ``T - horizon + pad_after < -pad_before``) still gives one window, starting at
    ``-pad_before`` and padded at the end. ``pad="none"``: no padding at all; ``pad_before`` and
    ``pad_after`` must be 0 and episodes shorter than ``horizon`` give no window (they are skipped).

    Each item is a dict of tensors (a batch adds a leading ``B`` dimension):

    - ``observation``: ``(horizon, *obs_shape)`` (a dict of those for a ``Dict`` space);
    - ``action``: ``(horizon, *action_shape)``; ``reward``: ``(horizon,)`` float32;
      ``terminated``, ``truncated``: ``(horizon,)`` bool; extras ``(horizon, ...)``; each if loaded;
    - ``mask``: ``(horizon,)`` bool, False on padded steps;
    - ``episode``: ``()`` int64, the source's episode index; ``start``: ``()`` int64, the first
      step ``s`` (negative with ``pad_before``).

    Args:
        source: An :class:`EpisodeStore` or :class:`StoreUnion`.
        horizon: Steps per window (>= 1).
        keys: Data keys to load (as for :class:`TransitionDataset`). Default all.
        episodes: Episode indices of ``source`` to hold. Default all.
        pad: ``"edge"`` or ``"none"`` (see above).
        pad_before: Windows may start this many steps before the episode's first step (edge padded).
        pad_after: Windows may end this many steps after the episode's last step (edge padded).
        float32: Convert float64 arrays to float32 once, at load.

    Raises:
        ValueError: For ``horizon < 1``, negative pads, an unknown ``pad``, or pads with ``"none"``.
        KeyError / IndexError: As for :class:`TransitionDataset`.
    """

    def __init__(self, source: Source, *, horizon: int, keys: Sequence[str] | None = None,
                 episodes: Sequence[int] | None = None, pad: str = "edge", pad_before: int = 0,
                 pad_after: int = 0, float32: bool = True) -> None:
        """Load the chosen arrays and index the windows (see the class docstring)."""
        if int(horizon) < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if pad not in ("edge", "none"):
            raise ValueError(f"pad must be 'edge' or 'none', got {pad!r}")
        if pad_before < 0 or pad_after < 0:
            raise ValueError(f"pad_before and pad_after must be >= 0, got {pad_before}, {pad_after}")
        if pad == "none" and (pad_before or pad_after):
            raise ValueError("pad='none' cannot pad: pad_before and pad_after must be 0")
        super().__init__(source, keys, episodes, float32)
        self.horizon = int(horizon)
        self.pad = pad
        self.pad_before = int(pad_before)
        self.pad_after = int(pad_after)
        first = -self.pad_before
        last = self.episode_lengths - self.horizon + self.pad_after
        if pad == "edge":
            last = np.maximum(last, first)  # short episodes: one padded window
        counts = np.maximum(last - first + 1, 0)
        self._win_episode = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._win_start = (np.arange(int(counts.sum()), dtype=np.int64)
                           - np.repeat(offsets, counts) + first)
        """``(W,)`` first step of each window, relative to its episode."""

    def __len__(self) -> int:
        """Number of windows."""
        return len(self._win_start)

    def get_batch(self, indices: Any) -> dict[str, Any]:
        """A batch of windows: one gather per array.

        Args:
            indices: ``(B,)`` window indices (any int sequence, array or tensor; negative allowed).

        Returns:
            Dict of tensors with leading ``(B, horizon)`` dimensions (``episode``, ``start``: ``(B,)``).
        """
        w = self._normalise(indices)[0]
        ep = self._win_episode[w]
        steps = self._win_start[w][:, None] + np.arange(self.horizon, dtype=np.int64)[None, :]  # (B, H)
        length = self.episode_lengths[ep][:, None]
        mask = (steps >= 0) & (steps < length)
        local = np.clip(steps, 0, length - 1)
        t = self.episode_starts[ep][:, None] + local  # global step rows
        out: dict[str, Any] = {}
        self._obs("observation", t + ep[:, None], out)
        for key in self.keys:
            if not _is_obs(key):
                out[key] = _to_tensor(self.arrays[key][t])
        out["mask"] = torch.from_numpy(mask)
        out["episode"] = torch.from_numpy(self.episodes[ep])
        out["start"] = torch.from_numpy(self._win_start[w])
        return out
