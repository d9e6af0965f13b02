"""What an episode store holds: episodes, their metadata, the supported spaces and the errors.

Vocabulary and semantics follow Gymnasium and Minari: an episode of ``T`` steps has ``T`` actions,
rewards, ``terminated`` and ``truncated`` flags and ``T + 1`` observations (the reset observation,
then one per step).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from minari.serialization import deserialize_space, serialize_space

__all__ = [
    "SCHEMA_VERSION",
    "STEP_EXTRAS",
    "Episode",
    "EpisodeMetadata",
    "StoreDamagedError",
    "StoreError",
    "StoreLockedError",
    "StoreSchemaError",
    "NotAStoreError",
    "check_space",
    "flatten_observation",
    "space_from_json",
    "space_to_json",
    "to_plain",
]

SCHEMA_VERSION = 1
"""Version of the on-disk layout written by this loopsim. Stores with a newer version are refused."""

STEP_EXTRAS: dict[str, str] = {
    "expert_action": "the expert's action at each visited state (same space as the action), for DAgger",
    "intervention": "bool, True where the expert took over from the policy",
    "is_success": "bool, info['is_success'] after each step",
}
"""Optional per-step arrays a store may declare at creation, with what each holds."""


class StoreError(Exception):
    """Base class of every episode-store error."""


class NotAStoreError(StoreError):
    """The path exists but is not a loopsim episode store (nothing was changed)."""


class StoreDamagedError(StoreError):
    """The store's files are inconsistent in a way the commit protocol cannot explain."""


class StoreSchemaError(StoreError):
    """The store was written by a newer, unknown schema version of loopsim."""


class StoreLockedError(StoreError):
    """Another writer holds the store's lock."""


_SUPPORTED = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


def check_space(space: gym.Space, what: str) -> None:
    """Refuse spaces the store cannot hold.

    Supported: ``Box``, ``Discrete``, ``MultiDiscrete``, ``MultiBinary`` and a ``Dict`` of those (one
    level, as in goal-conditioned observations).

    Args:
        space: The observation or action space.
        what: ``"observation"`` or ``"action"``, for the message.

    Raises:
        TypeError: For any other space, naming it and the supported ones.
    """
    if isinstance(space, gym.spaces.Dict) and what == "observation":
        for key, sub in space.spaces.items():
            if not isinstance(sub, _SUPPORTED):
                raise TypeError(f"observation space key {key!r} is {type(sub).__name__}; supported: "
                                f"{', '.join(t.__name__ for t in _SUPPORTED)}")
            if "/" in key:
                raise TypeError(f"observation space key {key!r} contains '/', which the store uses as "
                                "separator")
        return
    if not isinstance(space, _SUPPORTED):
        allowed = ", ".join(t.__name__ for t in _SUPPORTED) + (", Dict" if what == "observation" else "")
        raise TypeError(f"{what} space {type(space).__name__} is not supported; supported: {allowed}")


def space_to_json(space: gym.Space) -> str:
    """Serialize a space with Minari's JSON format (``minari.serialization.serialize_space``)."""
    return serialize_space(space)


def space_from_json(text: str) -> gym.Space:
    """Inverse of :func:`space_to_json`."""
    return deserialize_space(text)


def flatten_observation(space: gym.Space, observation: Any) -> dict[str, np.ndarray]:
    """Split an observation (or a stack of them) into named arrays, as stored under ``data/``.

    Args:
        space: The observation space.
        observation: One array (``Box`` etc.) or a mapping key -> array (``Dict``).

    Returns:
        ``{"observation": array}``, or ``{"observation/<key>": array}`` for each key of a ``Dict``.

    Raises:
        ValueError: If a ``Dict`` observation lacks a key of the space or has an extra one.
    """
    if isinstance(space, gym.spaces.Dict):
        if not isinstance(observation, Mapping) or set(observation) != set(space.spaces):
            got = sorted(observation) if isinstance(observation, Mapping) else type(observation).__name__
            raise ValueError(f"observation keys {got} do not match the space's {sorted(space.spaces)}")
        return {f"observation/{k}": np.asarray(observation[k]) for k in space.spaces}
    return {"observation": np.asarray(observation)}


def to_plain(value: Any, *, strict: bool = True) -> Any:
    """Numpy scalars and arrays inside ``value`` (mappings, lists, tuples) as plain Python values.

    Args:
        value: Metadata such as ``site_params`` or ``tags``.
        strict: Raise for anything JSON cannot hold; with False such values are passed through.

    Returns:
        The same structure with ``dict``/``list``/``bool``/``int``/``float``/``str``/``None``.

    Raises:
        TypeError: If ``strict`` and a value is not JSON-able.
    """
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, strict=strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, strict=strict) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)) or not strict:
        return value
    raise TypeError(f"{value!r} ({type(value).__name__}) cannot be stored as JSON metadata")


@dataclass
class EpisodeMetadata:
    """Per-episode metadata, one row of the store's ``meta/`` columns.

    Attributes:
        seed: The ``reset`` seed that reproduces the episode, or ``None`` when unknown (stored as -1).
        site: Name of the site the episode ran at (``""`` when unknown).
        site_params: The site parameters sampled for the episode (``info["site_params"]``).
        policy_id: Which policy acted (e.g. ``"expert"``, a run name).
        policy_version: Version of that policy (e.g. a checkpoint step or hash).
        iteration: Loop iteration that gathered the episode (0 outside the loop).
        episode_return: Sum of rewards (filled in from the data when recorded).
        length: Number of steps ``T`` (filled in from the data).
        success: ``info["is_success"]`` after the last step.
        failure_mode: ``info["failure_mode"]`` at the end of a failed episode, else ``None``.
        interventions: Number of steps where the expert took over (filled in from the ``intervention``
            extra when the store has it).
        wall_time: Seconds of wall-clock time the episode took to run.
        tags: Free-form JSON-able mapping (e.g. ``{"operator": "night shift"}``).
    """

    seed: int | None = None
    site: str = ""
    site_params: dict[str, Any] = field(default_factory=dict)
    policy_id: str = ""
    policy_version: str = ""
    iteration: int = 0
    episode_return: float = 0.0
    length: int = 0
    success: bool = False
    failure_mode: str | None = None
    interventions: int = 0
    wall_time: float = 0.0
    tags: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check that every field fits its ``meta/`` column; normalises numpy integers to ``int``.

        Raises:
            ValueError: For a seed outside ``[0, 2**63)``, an iteration outside int64, a string that is
                not valid Unicode (e.g. a lone surrogate), a non-finite wall time, or metadata
                (``site_params``, ``tags``) that is not JSON-able.
        """
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
                raise ValueError(f"seed must be an int or None, got {self.seed!r}")
            if not 0 <= int(self.seed) < 2**63:
                raise ValueError(f"seed {self.seed} is outside [0, 2**63) (stored as int64; -1 means "
                                 "unknown)")
            self.seed = int(self.seed)
        if isinstance(self.iteration, bool) or not isinstance(self.iteration, (int, np.integer)) or not (
                -(2**63) <= int(self.iteration) < 2**63):
            raise ValueError(f"iteration must be an int64, got {self.iteration!r}")
        self.iteration = int(self.iteration)
        for name in ("site", "policy_id", "policy_version", "failure_mode"):
            value = getattr(self, name)
            if value is None and name == "failure_mode":
                continue
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a str, got {value!r}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{name} {value!r} is not valid Unicode text") from None
        if not math.isfinite(float(self.wall_time)):
            raise ValueError(f"wall_time must be finite, got {self.wall_time!r}")
        for name in ("site_params", "tags"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
            try:
                to_plain(value)
            except TypeError as exc:
                raise ValueError(f"{name}: {exc}") from None

    def to_json(self) -> str:
        """The metadata as one JSON object (used in the write-ahead files)."""
        return json.dumps({
            "seed": self.seed, "site": self.site, "site_params": to_plain(self.site_params),
            "policy_id": self.policy_id, "policy_version": self.policy_version,
            "iteration": int(self.iteration), "episode_return": float(self.episode_return),
            "length": int(self.length), "success": bool(self.success), "failure_mode": self.failure_mode,
            "interventions": int(self.interventions), "wall_time": float(self.wall_time),
            "tags": to_plain(self.tags),
        }, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> EpisodeMetadata:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


@dataclass
class Episode:
    """One episode: ``T`` transitions and ``T + 1`` observations.

    Attributes:
        observations: ``(T+1, *obs_shape)`` array, or for a ``Dict`` space a mapping key ->
            ``(T+1, *shape)`` array. Row 0 is the reset observation.
        actions: ``(T, *action_shape)`` array.
        rewards: ``(T,)`` float64.
        terminated: ``(T,)`` bool; at most the last entry is True.
        truncated: ``(T,)`` bool; at most the last entry is True.
        extras: Optional per-step arrays, each ``(T, ...)``: ``expert_action``, ``intervention``,
            ``is_success`` (see :data:`STEP_EXTRAS`).
        metadata: The episode's :class:`EpisodeMetadata`.
    """

    observations: np.ndarray | dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: EpisodeMetadata = field(default_factory=EpisodeMetadata)

    def __len__(self) -> int:
        """Number of steps ``T``."""
        return int(len(self.actions))

    @property
    def transitions(self) -> int:
        """Number of transitions (same as ``len(episode)``)."""
        return len(self)

    def validate(self, observation_space: gym.Space, action_space: gym.Space,
                 step_extras: Sequence[str]) -> None:
        """Check shapes, dtypes and flags against the store's spaces before anything is written.

        Args:
            observation_space: The store's observation space.
            action_space: The store's action space.
            step_extras: The extras the store declares; the episode must carry exactly these.

        Raises:
            ValueError: Naming the first array that is wrong and what was expected.
        """
        t = len(self)
        if t < 1:
            raise ValueError("an episode needs at least one step (T >= 1 actions)")
        obs = flatten_observation(observation_space, self.observations)
        spaces = (observation_space.spaces if isinstance(observation_space, gym.spaces.Dict)
                  else {"": observation_space})
        for (name, arr), sub in zip(obs.items(), spaces.values(), strict=True):
            _check_array(name, arr, (t + 1, *sub.shape), sub.dtype, sub)
        _check_array("actions", self.actions, (t, *action_space.shape), action_space.dtype, action_space)
        _check_array("rewards", self.rewards, (t,), None)
        for flag in ("terminated", "truncated"):
            arr = np.asarray(getattr(self, flag))
            _check_array(flag, arr, (t,), None)
            if arr[:-1].any():
                raise ValueError(f"{flag} is True before the last step: an episode ends at its first "
                                 "terminated or truncated step")
        if set(self.extras) != set(step_extras):
            raise ValueError(f"episode extras {sorted(self.extras)} differ from the store's declared "
                             f"step_extras {sorted(step_extras)}")
        for name, arr in self.extras.items():
            if name == "expert_action":
                _check_array(name, arr, (t, *action_space.shape), action_space.dtype, action_space)
            else:
                _check_array(name, arr, (t,), None)
        if not np.all(np.isfinite(np.asarray(self.rewards, dtype=np.float64))):
            raise ValueError("rewards contain NaN or infinite values")
        self.metadata.validate()


def _check_array(name: str, arr: Any, shape: tuple[int, ...], dtype: np.dtype | None,
                 space: gym.Space | None = None) -> None:
    """Shape, dtype, and values the stored dtype can hold (no silent wrap-around or overflow to inf)."""
    arr = np.asarray(arr)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape}, expected {tuple(shape)}")
    if dtype is None:
        return
    dtype = np.dtype(dtype)
    if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
        raise ValueError(f"{name} has dtype {arr.dtype}, expected {dtype}")
    if arr.size == 0 or arr.dtype == dtype:
        pass
    elif dtype.kind in "iu" and arr.dtype.kind in "iub":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise ValueError(f"{name} has values in [{arr.min()}, {arr.max()}], outside what the stored "
                             f"dtype {dtype} holds [{info.min}, {info.max}]")
    elif dtype.kind == "f" and arr.dtype.kind == "f":
        with np.errstate(over="ignore"):
            overflow = np.isfinite(arr) & ~np.isfinite(arr.astype(dtype))
        if overflow.any():
            raise ValueError(f"{name} has finite values too large for the stored dtype {dtype} "
                             f"(e.g. {arr[overflow].flat[0]!r})")
    integer_spaces = (gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)
    if isinstance(space, integer_spaces) and arr.size:
        if isinstance(space, gym.spaces.Discrete):
            low, high = np.int64(space.start), np.int64(space.start + space.n - 1)
        elif isinstance(space, gym.spaces.MultiDiscrete):
            low, high = space.start, space.start + space.nvec - 1
        else:
            low, high = 0, 1
        if np.any(arr < low) or np.any(arr > high):
            raise ValueError(f"{name} has values outside the space {space}")
