"""The :class:`Policy` protocol, the :class:`BasePolicy` every loopsim policy builds on, and loading.

A policy maps observations to actions with stable-baselines3's signature::

    action, state = policy.predict(observation, deterministic=True)

``observation`` is one observation (shape ``observation_space.shape``, or a dict of those) or a batch
(a leading ``B`` axis); ``action`` is then ``(*action_shape)`` or ``(B, *action_shape)``, float32 for
Box action spaces. ``state`` is the recurrent state (always ``None`` here), as in SB3, so a loopsim
policy goes wherever SB3 expects a model (``stable_baselines3.common.evaluation.evaluate_policy``)
and an SB3 model goes wherever loopsim expects a :class:`Policy`.

Every kind saves to a checkpoint directory (:mod:`loopsim.policies.checkpoint`) and
:func:`load_policy` rebuilds it in any process from JSON metadata and safetensors weights.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
import torch

from loopsim.datasets.schema import space_from_json, space_to_json
from loopsim.policies.checkpoint import CheckpointError, read_checkpoint, write_checkpoint

__all__ = ["POLICY_KINDS", "BasePolicy", "Policy", "load_policy", "register_policy"]


@runtime_checkable
class Policy(Protocol):
    """What loopsim needs from a policy (SB3 models satisfy it too, except ``save`` semantics)."""

    observation_space: gym.Space
    action_space: gym.Space

    def predict(
        self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = False
    ) -> tuple[np.ndarray, Any]:
        """Actions for one observation or a batch; returns ``(action, state)``."""
        ...

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (reseeding the policy's own randomness when ``seed`` is given)."""
        ...

    def save(self, path: str | os.PathLike) -> Path:
        """Write a checkpoint directory."""
        ...


#: ``kind`` -> policy class; filled by :func:`register_policy`.
POLICY_KINDS: dict[str, type[BasePolicy]] = {}


def register_policy(cls: type[BasePolicy]) -> type[BasePolicy]:
    """Class decorator: make ``cls`` loadable from checkpoints whose ``kind`` is ``cls.kind``."""
    POLICY_KINDS[cls.kind] = cls
    return cls


def _batched(space: gym.Space, observation: Any) -> bool:
    """True if ``observation`` carries a leading batch axis beyond ``space``'s shape.

    Raises:
        ValueError: If the observation's shape fits neither one observation nor a batch.
    """
    if isinstance(space, gym.spaces.Dict):
        if not isinstance(observation, Mapping):
            raise ValueError(
                f"expected a dict observation with keys {sorted(space.spaces)}, got "
                f"{type(observation).__name__}"
            )
        key = next(iter(space.spaces))
        return _batched(space[key], observation[key])
    shape = tuple(space.shape or ())
    got = tuple(np.shape(observation))
    if got == shape:
        return False
    if len(got) == len(shape) + 1 and got[1:] == shape:
        return True
    raise ValueError(
        f"observation of shape {got} is neither one observation {shape} nor a batch (B, *{shape})"
    )


class BasePolicy(ABC):
    """Base of loopsim's policies: batching, clipping, checkpoints.

    Subclasses set :attr:`kind`, implement :meth:`_predict_batch`, and for checkpoints
    :meth:`_checkpoint_policy` / :meth:`_checkpoint_tensors` and :meth:`_from_checkpoint`.

    Args:
        observation_space: The env's observation space.
        action_space: The env's action space.

    Attributes:
        observation_space: As given.
        action_space: As given.
        config: The resolved config the policy was made from (saved with the checkpoint).
        provenance: Where the policy came from (training stores and episodes, timesteps...), saved
            with the checkpoint.
    """

    #: Checkpoint ``kind`` (``"expert"``, ``"random"``, ``"sb3"``, ``"bc"``...).
    kind: ClassVar[str] = ""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space) -> None:
        self.observation_space = observation_space
        self.action_space = action_space
        self.config: dict[str, Any] = {}
        self.provenance: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------- acting
    def predict(
        self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = False
    ) -> tuple[np.ndarray, None]:
        """Actions for one observation or a batch (stable-baselines3's signature).

        Args:
            observation: One observation (``observation_space.shape`` or a dict of those) or a batch
                with a leading ``B`` axis.
            state: Ignored (no recurrent state); accepted for SB3 compatibility.
            episode_start: Ignored; accepted for SB3 compatibility.
            deterministic: Act without exploration noise (mean action) when True.

        Returns:
            ``(action, None)``: ``action`` is ``(*action_shape)`` for one observation or
            ``(B, *action_shape)`` for a batch; Box actions are float32, clipped to the space.

        Raises:
            ValueError: If the observation fits neither one observation nor a batch.
        """
        batched = _batched(self.observation_space, observation)
        if isinstance(self.observation_space, gym.spaces.Dict):
            obs = {k: np.asarray(v) if batched else np.asarray(v)[None] for k, v in observation.items()}
        else:
            obs = np.asarray(observation) if batched else np.asarray(observation)[None]
        actions = np.asarray(self._predict_batch(obs, deterministic))
        if isinstance(self.action_space, gym.spaces.Box):
            actions = np.clip(actions, self.action_space.low, self.action_space.high).astype(
                self.action_space.dtype, copy=False
            )
        return (actions if batched else actions[0]), None

    @abstractmethod
    def _predict_batch(self, observation: Any, deterministic: bool) -> np.ndarray:
        """Actions ``(B, *action_shape)`` for a batch of observations ``(B, *obs_shape)`` (or dict)."""

    def reset(self, seed: int | None = None) -> None:  # noqa: B027 - optional hook
        """Start a new episode; reseed the policy's own random generator when ``seed`` is given."""

    def __call__(self, observation: Any) -> np.ndarray:
        """Shorthand for ``predict(observation, deterministic=True)[0]``."""
        return self.predict(observation, deterministic=True)[0]

    # ----------------------------------------------------------------------------------- checkpoints
    def _checkpoint_policy(self) -> dict[str, Any]:
        """Kind-specific JSON settings needed to rebuild the policy (override)."""
        return {}

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors to store (override)."""
        return {}

    @classmethod
    def _from_checkpoint(
        cls,
        observation_space: gym.Space,
        action_space: gym.Space,
        policy: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
    ) -> BasePolicy:
        """Rebuild from checkpoint contents (override)."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write the policy to a checkpoint directory (atomically; see :mod:`~loopsim.policies.checkpoint`).

        Args:
            path: Checkpoint directory; an existing checkpoint there is replaced.

        Returns:
            The checkpoint path.

        Raises:
            FileExistsError: If ``path`` holds something other than a checkpoint.
        """
        meta = {
            "kind": self.kind,
            "observation_space": space_to_json(self.observation_space),
            "action_space": space_to_json(self.action_space),
            "policy": self._checkpoint_policy(),
            "config": self.config,
            "provenance": self.provenance,
        }
        return write_checkpoint(path, meta, self._checkpoint_tensors())

    @classmethod
    def load(cls, path: str | os.PathLike, env: gym.Env | None = None) -> BasePolicy:
        """Load a checkpoint of this kind (or any kind, called on :class:`BasePolicy`).

        See :func:`load_policy`.
        """
        policy = load_policy(path, env=env)
        if cls is not BasePolicy and not isinstance(policy, cls):
            raise CheckpointError(f"{path} holds a {policy.kind!r} policy, not {cls.kind!r}")
        return policy


def load_policy(path: str | os.PathLike, env: gym.Env | None = None) -> BasePolicy:
    """Rebuild a policy from a checkpoint directory, in any process, without unpickling anything.

    Args:
        path: A checkpoint directory written by :meth:`BasePolicy.save`.
        env: The env to act in; needed only by policies that read privileged state (``expert``),
            which are bound to it.

    Returns:
        The policy, in evaluation mode.

    Raises:
        CheckpointError: If ``path`` is not a checkpoint, is damaged, of a newer format or of an
            unknown kind.
    """
    import loopsim.policies  # noqa: F401 - registers every kind

    meta, tensors = read_checkpoint(path)
    kind = meta["kind"]
    if kind not in POLICY_KINDS:
        raise CheckpointError(
            f"{path} holds a policy of unknown kind {kind!r}; known: {sorted(POLICY_KINDS)}"
        )
    try:
        obs_space = space_from_json(meta["observation_space"])
        act_space = space_from_json(meta["action_space"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the stored spaces are damaged ({exc})") from None
    settings = meta.get("policy", {})
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: the stored policy settings are damaged (not a mapping)")
    try:
        policy = POLICY_KINDS[kind]._from_checkpoint(obs_space, act_space, settings, tensors)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: cannot rebuild the {kind!r} policy from its checkpoint: {exc}"
        ) from None
    policy.config = dict(meta.get("config") or {})
    policy.provenance = dict(meta.get("provenance") or {})
    if env is not None and hasattr(policy, "bind"):
        policy.bind(env)
    return policy
