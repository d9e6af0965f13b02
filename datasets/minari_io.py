"""Export an episode store to a Minari dataset, and import a Minari dataset into an episode store.

Datasets live under Minari's root (``$MINARI_DATASETS_PATH``, default ``~/.minari/datasets``) and are
named ``(namespace/)name-v<version>``, as everywhere in Minari; they are written with Minari's own
storage API (:class:`minari.dataset.minari_storage.MinariStorage`, HDF5 by default) and read back
with :func:`minari.load_dataset`, so any Minari user can load an exported store. (Not through
:func:`minari.create_dataset_from_buffers`: given an env it ``gym.make``-s one, a PyBullet client it
never closes, only to read spaces the store already records; without one it drops the env spec.)
Minari episode ``i`` is the ``i``-th exported episode (the store's episode ``i`` when exporting all).

What maps where (store -> Minari):

=================================  =================================================================
episode store                      Minari dataset
=================================  =================================================================
observations (``T + 1`` rows,      ``observations`` (a ``Dict`` space stays a dict of arrays)
``Dict`` or not)
actions, rewards                   ``actions``, ``rewards``
terminated, truncated              ``terminations``, ``truncations``
metadata ``seed``                  the episode's ``seed`` (Minari's own field; absent when unknown)
other metadata columns             per-episode metadata ``loopsim/<column>`` (``site``,
                                   ``policy_id``, ``policy_version``, ``iteration``, ``return``,
                                   ``length``, ``success``, ``failure_mode`` (``""`` = none),
                                   ``interventions``, ``wall_time``; ``site_params`` and ``tags``
                                   as JSON strings); read them with
                                   ``dataset.storage.get_episode_metadata(...)[i]["loopsim"]``.
                                   Minari's ``rewards_sum/mean/std/max/min`` are added too, as the
                                   ``DataCollector`` does.
step extras                        ``infos[<name>]`` with ``T + 1`` rows, following the
                                   ``DataCollector`` convention that info row ``k`` goes with
                                   observation row ``k`` (row 0 is the reset info):
                                   ``expert_action`` and ``intervention`` (about the action chosen
                                   at observation ``t``) are at row ``t``, their last row is zero
                                   padding; ``is_success`` (after step ``t``) is at row ``t + 1``,
                                   row 0 is ``False``.
store attributes                   dataset metadata ``loopsim``: ``env_id``, ``env_kwargs``,
                                   ``step_extras``, ``schema_version``, ``loopsim_version``,
                                   ``created``, ``user`` (the store's ``attrs``) and ``source``
                                   (the store's URL)
env id + env kwargs                the dataset's ``env_spec`` (the registered spec with the store's
                                   kwargs), so ``dataset.recover_environment()`` rebuilds the env;
                                   omitted when the env id is not registered
=================================  =================================================================

What is lost: the store's chunking and compression; only committed episodes are exported (a killed
writer's uncommitted tail never is). Image observations stay lossless because the export disables
Minari's JPEG encoding by default (``jpeg_encoding=True`` trades that for size). An imported store
gets its own ``created`` time and ``loopsim_version`` (the originals stay in the Minari metadata).

Import of a dataset that loopsim did not write: observations, actions, rewards, flags and seeds are
taken as they are (a seed outside int64, as Minari's 64-bit auto-seeds can be, goes to the tag
``minari_seed``); ``is_success`` is kept as a step extra (and gives ``success``) when the first
episode's infos carry it with ``T + 1`` rows; ``policy_id`` is the dataset's ``algorithm_name``; each
episode is tagged with its Minari dataset id and episode id. Other infos are not imported.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.dataset.minari_storage import MinariStorage
from minari.namespace import create_namespace, list_local_namespaces
from minari.storage import get_dataset_path

from loopsim.datasets.schema import STEP_EXTRAS, Episode, EpisodeMetadata, check_space
from loopsim.datasets.store import EpisodeStore, _is_local, _local_path

__all__ = ["export_to_minari", "import_from_minari", "minari_dataset_path"]

_META_PREFIX = "loopsim"
_ACTION_ALIGNED = ("expert_action", "intervention")
"""Step extras about the action chosen at observation ``t``: info row ``t`` (last row is padding)."""
_INT64_MAX = int(np.iinfo(np.int64).max)


def minari_dataset_path(dataset_id: str) -> Path:
    """Where Minari keeps (or would keep) a local dataset.

    Args:
        dataset_id: ``(namespace/)name-v<version>``.

    Returns:
        The dataset's directory under Minari's root (``$MINARI_DATASETS_PATH`` or
        ``~/.minari/datasets``); the data itself is in its ``data/`` folder.

    Raises:
        ValueError: If ``dataset_id`` is not a valid Minari dataset id.
    """
    _parse_id(dataset_id)
    return Path(get_dataset_path(dataset_id))


def _parse_id(dataset_id: str) -> tuple[str | None, str, int]:
    try:
        return parse_dataset_id(dataset_id)
    except (TypeError, ValueError):  # TypeError: Minari's int(None) when "-v<version>" is missing
        raise ValueError(f"{dataset_id!r} is not a Minari dataset id: use (namespace/)name-v<version>, "
                         "e.g. loopsim/pick-place-v0") from None


def _is_minari_dataset(path: Path) -> bool:
    return (path / "data" / "metadata.json").is_file()


def export_to_minari(
    store: EpisodeStore | str | os.PathLike,
    dataset_id: str,
    *,
    overwrite: bool = False,
    episodes: Sequence[int] | None = None,
    author: str | set[str] | None = None,
    author_email: str | set[str] | None = None,
    code_permalink: str | None = None,
    algorithm_name: str | None = None,
    description: str | None = None,
    requirements: Sequence[str] | None = None,
    data_format: str = "hdf5",
    jpeg_encoding: bool = False,
    batch_episodes: int = 64,
    on_episodes: Callable[[int], None] | None = None,
) -> minari.MinariDataset:
    """Write the committed episodes of a store as a new local Minari dataset.

    The dataset is built in a hidden staging folder next to its final place and moved there only
    when complete, so a failed export leaves no half-written dataset (and, with ``overwrite``, the
    old dataset in place). See the module docstring for what maps where.

    Args:
        store: An open :class:`EpisodeStore` or its URL (opened read-only and closed again).
        dataset_id: Minari id, ``(namespace/)name-v<version>``; a missing namespace is created.
        overwrite: Replace an existing Minari dataset with this id. Never replaces anything that is
            not a Minari dataset.
        episodes: Indices of the episodes to export (default: all committed episodes).
        author: Minari metadata ``author``.
        author_email: Minari metadata ``author_email``.
        code_permalink: Minari metadata ``code_permalink``.
        algorithm_name: Minari metadata ``algorithm_name`` (default: the store's policy ids, e.g.
            ``"loopsim: expert, bc"``).
        description: Minari metadata ``description`` (default: where the data came from).
        requirements: Minari metadata ``requirements`` (pip-style; default ``["loopsim"]`` for loopsim
            envs).
        data_format: Minari storage format (``"hdf5"``; ``"arrow"`` needs pyarrow).
        jpeg_encoding: Let Minari JPEG-encode image observations (lossy). Default False (lossless).
        batch_episodes: Episodes handed to Minari per write, bounding memory.
        on_episodes: Called with the number of episodes just written (e.g. to advance a progress bar).

    Returns:
        The new dataset, loaded with :func:`minari.load_dataset`.

    Raises:
        ValueError: For a malformed ``dataset_id``.
        FileExistsError: If the dataset exists and ``overwrite`` is False, or the path holds
            something that is not a Minari dataset.
        FileNotFoundError / StoreError: If ``store`` is a URL that is not a readable store.
    """
    namespace = _parse_id(dataset_id)[0]
    final = Path(get_dataset_path(dataset_id))
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"Minari dataset {dataset_id} already exists at {final}; pass "
                                  "overwrite=True (--overwrite) to replace it")
        if not _is_minari_dataset(final):
            raise FileExistsError(f"{final} exists but is not a Minari dataset; refusing to replace it")
    own = not isinstance(store, EpisodeStore)
    src = EpisodeStore.open(store, mode="r") if own else store
    try:
        return _export(src, dataset_id, namespace, final, episodes=episodes, author=author,
                       author_email=author_email, code_permalink=code_permalink,
                       algorithm_name=algorithm_name, description=description,
                       requirements=requirements, data_format=data_format, jpeg_encoding=jpeg_encoding,
                       batch_episodes=max(1, int(batch_episodes)), on_episodes=on_episodes)
    finally:
        if own:
            src.close()


def _env_spec(env_id: str, env_kwargs: Mapping[str, Any]) -> gym.envs.registration.EnvSpec | None:
    if not env_id:
        return None
    try:
        spec = gym.spec(env_id)
    except gym.error.Error:
        return None
    return replace(spec, kwargs={**spec.kwargs, **dict(env_kwargs)})


def _export(store: EpisodeStore, dataset_id: str, namespace: str | None, final: Path, *,
            episodes: Sequence[int] | None, author: str | set[str] | None,
            author_email: str | set[str] | None, code_permalink: str | None, algorithm_name: str | None,
            description: str | None, requirements: Sequence[str] | None, data_format: str,
            jpeg_encoding: bool, batch_episodes: int,
            on_episodes: Callable[[int], None] | None) -> minari.MinariDataset:
    indices = (np.arange(len(store), dtype=np.int64) if episodes is None
               else np.asarray(episodes, dtype=np.int64).reshape(-1))
    if len(indices) and (indices.min() < -len(store) or indices.max() >= len(store)):
        raise IndexError(f"episode indices out of range: the store has {len(store)} episodes")
    cols = store.metadata()
    if algorithm_name is None:
        ids = sorted({str(p) for p in cols["policy_id"][indices] if p}) if len(indices) else []
        algorithm_name = "loopsim: " + ", ".join(ids) if ids else "loopsim"
    if description is None:
        description = (f"Exported by loopsim from the episode store {store.url} (env "
                       f"{store.env_id or 'unknown'}, {len(indices)} episodes).")
    if requirements is None:
        requirements = ["loopsim"] if store.env_id.startswith("loopsim/") else []
    metadata: dict[str, Any] = {
        "dataset_id": dataset_id,
        "minari_version": minari.__version__,
        "algorithm_name": algorithm_name,
        "description": description,
        "requirements": list(requirements),
        _META_PREFIX: {
            "env_id": store.env_id,
            "env_kwargs": store.env_kwargs,
            "step_extras": list(store.step_extras),
            "schema_version": store.schema_version,
            "loopsim_version": store.loopsim_version,
            "created": str(store.info.get("created", "")),
            "user": store.attrs,
            "source": store.url,
        },
    }
    if author is not None:
        metadata["author"] = {author} if isinstance(author, str) else set(author)
    if author_email is not None:
        metadata["author_email"] = {author_email} if isinstance(author_email, str) else set(author_email)
    if code_permalink is not None:
        metadata["code_permalink"] = code_permalink

    if namespace is not None and namespace not in list_local_namespaces():
        create_namespace(namespace)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.loopsim-export-{uuid.uuid4().hex[:12]}"
    try:
        staging.mkdir()
        storage = MinariStorage.new(staging / "data", observation_space=store.observation_space,
                                    action_space=store.action_space,
                                    env_spec=_env_spec(store.env_id, store.env_kwargs),
                                    data_format=data_format, jpeg_encoding=jpeg_encoding)
        storage.update_metadata(metadata)
        reward_stats = minari.EpisodeMetadataCallback()
        written = 0
        for batch in _batches(indices, batch_episodes):
            eps = [store.episode(int(i)) for i in batch]
            storage.update_episodes([_to_buffer(store, ep) for ep in eps])
            storage.update_episode_metadata(
                [{**reward_stats({"rewards": np.asarray(ep.rewards, dtype=np.float64)}),
                  **_flat_metadata(ep.metadata)} for ep in eps],
                range(written, written + len(eps)))
            written += len(eps)
            if on_episodes is not None:
                on_episodes(len(eps))
        trash = None
        if final.exists():
            trash = final.parent / f".{final.name}.loopsim-old-{uuid.uuid4().hex[:12]}"
            final.rename(trash)
        staging.rename(final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return minari.load_dataset(dataset_id)


def _batches(indices: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), size):
        yield indices[start:start + size]


def _to_buffer(store: EpisodeStore, episode: Episode) -> EpisodeBuffer:
    infos: dict[str, np.ndarray] = {}
    for name in store.step_extras:
        values = np.asarray(episode.extras[name])
        pad = np.zeros((1, *values.shape[1:]), dtype=values.dtype)
        infos[name] = (np.concatenate([values, pad]) if name in _ACTION_ALIGNED
                       else np.concatenate([pad, values]))
    obs = episode.observations
    observations: Any = ({k: np.asarray(v) for k, v in obs.items()} if isinstance(obs, Mapping)
                         else np.asarray(obs))
    seed = episode.metadata.seed
    return EpisodeBuffer(
        seed=None if seed is None else int(seed),
        observations=observations,
        actions=np.asarray(episode.actions),
        rewards=np.asarray(episode.rewards, dtype=np.float64),
        terminations=np.asarray(episode.terminated, dtype=bool),
        truncations=np.asarray(episode.truncated, dtype=bool),
        infos=infos or None,
    )


def _flat_metadata(meta: EpisodeMetadata) -> dict[str, Any]:
    row = json.loads(meta.to_json())
    return {f"{_META_PREFIX}/{k}": v for k, v in {
        "site": str(meta.site),
        "site_params": json.dumps(row["site_params"]),
        "policy_id": str(meta.policy_id),
        "policy_version": str(meta.policy_version),
        "iteration": int(meta.iteration),
        "return": float(meta.episode_return),
        "length": int(meta.length),
        "success": bool(meta.success),
        "failure_mode": meta.failure_mode or "",
        "interventions": int(meta.interventions),
        "wall_time": float(meta.wall_time),
        "tags": json.dumps(row["tags"]),
    }.items()}


def _metadata_from_minari(row: Mapping[str, Any], seed: int | None) -> EpisodeMetadata:
    def get(name: str, default: Any) -> Any:
        value = row.get(name, default)
        return value.item() if isinstance(value, np.generic) else value

    return EpisodeMetadata(
        seed=seed,
        site=str(get("site", "")),
        site_params=json.loads(str(get("site_params", "{}"))),
        policy_id=str(get("policy_id", "")),
        policy_version=str(get("policy_version", "")),
        iteration=int(get("iteration", 0)),
        episode_return=float(get("return", 0.0)),
        length=int(get("length", 0)),
        success=bool(get("success", False)),
        failure_mode=str(get("failure_mode", "")) or None,
        interventions=int(get("interventions", 0)),
        wall_time=float(get("wall_time", 0.0)),
        tags=json.loads(str(get("tags", "{}"))),
    )


def import_from_minari(
    dataset_id: str | minari.MinariDataset,
    url: str | os.PathLike,
    *,
    overwrite: bool = False,
    flush_every: int = 256,
    on_episodes: Callable[[int], None] | None = None,
) -> EpisodeStore:
    """Create an episode store holding the episodes of a local Minari dataset.

    A dataset written by :func:`export_to_minari` comes back with identical arrays, metadata, step
    extras, env id, env kwargs and user attributes; any other dataset is imported as described in
    the module docstring. The env id is the dataset's ``env_spec`` id when it has one. If the import
    fails midway, a local store it created is removed again (a store replaced with ``overwrite`` is
    gone already).

    Args:
        dataset_id: A local Minari dataset id (or an already loaded :class:`minari.MinariDataset`).
        url: Where to create the store (see :class:`EpisodeStore`).
        overwrite: Replace an existing loopsim store at ``url`` (never anything else).
        flush_every: Passed to :meth:`EpisodeStore.create`.
        on_episodes: Called with the number of episodes just added (e.g. to advance a progress bar).

    Returns:
        The new store, open for reading.

    Raises:
        ValueError: For a malformed id, or episodes the store cannot hold (naming the episode).
        FileNotFoundError: If the dataset is not in Minari's local root.
        FileExistsError: If ``url`` exists and ``overwrite`` is False.
        TypeError: For observation or action spaces the store does not support.
    """
    if isinstance(dataset_id, minari.MinariDataset):
        dataset = dataset_id
    else:
        _parse_id(dataset_id)
        if not _is_minari_dataset(Path(get_dataset_path(dataset_id))):
            raise FileNotFoundError(f"no local Minari dataset {dataset_id} under "
                                    f"{get_dataset_path()} (MINARI_DATASETS_PATH)")
        dataset = minari.load_dataset(dataset_id)
    check_space(dataset.observation_space, "observation")
    check_space(dataset.action_space, "action")
    raw = dataset.storage.metadata
    ours = raw.get(_META_PREFIX) if isinstance(raw.get(_META_PREFIX), Mapping) else None
    spec = dataset.env_spec
    env_id = spec.id if spec is not None else (str(ours.get("env_id", "")) if ours else "")
    if ours is not None:
        env_kwargs = dict(ours.get("env_kwargs", {}))
    else:
        env_kwargs = _jsonable_kwargs(spec.kwargs) if spec is not None else {}
    indices = [int(i) for i in dataset.episode_indices]
    ep_meta = list(dataset.storage.get_episode_metadata(indices)) if indices else []
    episodes = dataset.iterate_episodes(indices) if indices else iter(())
    first = next(episodes, None)
    if ours is not None:
        extras = [e for e in STEP_EXTRAS if e in set(ours.get("step_extras", []))]
        attrs = dict(ours.get("user", {}))
    else:
        info = (first.infos or {}) if first is not None else {}
        flag = np.asarray(info.get("is_success", ()))
        extras = ["is_success"] if first is not None and flag.shape == (len(first) + 1,) else []
        attrs = {"minari_dataset_id": dataset.id, "minari_version": dataset.minari_version}
    # What a failed import removes again: a store it created (not one it overwrote). The directory
    # itself only if the import made it: a directory that was there held nothing or only what an
    # interrupted create left (create refuses anything else without overwrite).
    local = _is_local(url)
    dir_existed = local and _local_path(url).exists()
    store_existed = local and (_local_path(url) / "zarr.json").exists()
    out = EpisodeStore.create(url, observation_space=dataset.observation_space,
                              action_space=dataset.action_space, env_id=env_id, env_kwargs=env_kwargs,
                              step_extras=extras, overwrite=overwrite, flush_every=flush_every,
                              attrs=attrs)
    try:
        pairs = zip(indices, ep_meta, _chain(first, episodes), strict=True)
        for minari_id, meta_row, data in pairs:
            episode = _episode_from_minari(data, meta_row, minari_id, extras, ours is not None,
                                           dataset, raw.get("algorithm_name"))
            try:
                out.add_episode(episode)
            except ValueError as exc:
                raise ValueError(f"Minari episode {minari_id} of {dataset.id}: {exc}") from None
            if on_episodes is not None:
                on_episodes(1)
        out.close()
    except BaseException:
        out.close()
        if local and not store_existed:
            if not dir_existed:
                shutil.rmtree(_local_path(url), ignore_errors=True)
            else:
                for child in _local_path(url).iterdir():
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
        raise
    return EpisodeStore.open(url, mode="r")


def _chain(first: Any, rest: Iterator[Any]) -> Iterable[Any]:
    if first is not None:
        yield first
    yield from rest


def _jsonable_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in kwargs.items():
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[str(key)] = value
    return out


def _episode_from_minari(data: Any, meta_row: Mapping[str, Any], minari_id: int, extras: Sequence[str],
                         from_loopsim: bool, dataset: minari.MinariDataset,
                         algorithm_name: Any) -> Episode:
    t = len(data.rewards)
    infos = data.infos or {}
    step: dict[str, np.ndarray] = {}
    for name in extras:
        if name not in infos:
            raise ValueError(f"Minari episode {minari_id} of {dataset.id} has no infos[{name!r}], which "
                             "the first episode has")
        values = np.asarray(infos[name])
        if len(values) != t + 1:
            raise ValueError(f"Minari episode {minari_id} of {dataset.id}: infos[{name!r}] has "
                             f"{len(values)} rows, expected {t + 1} (one per observation)")
        step[name] = values[:t] if name in _ACTION_ALIGNED else values[1:]
    raw_seed = meta_row.get("seed")
    seed = None if raw_seed is None else int(raw_seed)
    if from_loopsim:
        meta = _metadata_from_minari(meta_row.get(_META_PREFIX, {}), seed)
    else:
        tags: dict[str, Any] = {"minari_dataset": dataset.id, "minari_episode": minari_id}
        if seed is not None and not 0 <= seed <= _INT64_MAX:
            tags["minari_seed"] = seed
            seed = None
        success = bool(step["is_success"][-1]) if "is_success" in step else False
        meta = EpisodeMetadata(seed=seed, success=success, tags=tags,
                               policy_id=str(algorithm_name) if isinstance(algorithm_name, str) else "")
    obs = data.observations
    observations: Any = ({k: np.asarray(v) for k, v in obs.items()} if isinstance(obs, Mapping)
                         else np.asarray(obs))
    return Episode(observations=observations, actions=np.asarray(data.actions),
                   rewards=np.asarray(data.rewards, dtype=np.float64),
                   terminated=np.asarray(data.terminations, dtype=bool),
                   truncated=np.asarray(data.truncations, dtype=bool), extras=step, metadata=meta)
