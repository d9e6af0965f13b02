"""Policies without learned weights: the task's scripted expert and uniform random actions."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from loopsim.policies.base import BasePolicy, register_policy

__all__ = ["ExpertPolicy", "RandomPolicy"]


def _check_noise(noise_std: Any) -> float:
    if (
        isinstance(noise_std, bool)
        or not isinstance(noise_std, numbers.Real)
        or not math.isfinite(noise_std)
        or noise_std < 0
    ):
        raise ValueError(f"noise_std={noise_std!r} must be a finite number >= 0")
    return float(noise_std)


@register_policy
class ExpertPolicy(BasePolicy):
    """The task's scripted expert (:mod:`loopsim.envs.core.expert`) as a :class:`~loopsim.policies.Policy`.

    The expert reads privileged simulator state, not the observation, so the policy must be bound to
    the env it acts in (:meth:`bind`, or ``load_policy(path, env=env)``); a batch of ``B``
    observations needs ``B`` bound envs, row ``i`` acting in env ``i``.

    Args:
        observation_space: The env's observation space.
        action_space: The env's action space (Box ``(4,)`` in ``[-1, 1]`` for factory tasks).
        noise_std: Std of Gaussian noise on the motion part of the action [action units], applied when
            ``predict(..., deterministic=False)``; the gripper command is never noised.
        env: Env(s) to bind at once (optional).

    Raises:
        ValueError: If ``noise_std`` is negative or not finite.
    """

    kind = "expert"

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        noise_std: float = 0.0,
        env: gym.Env | Sequence[gym.Env] | None = None,
    ) -> None:
        super().__init__(observation_space, action_space)
        self.noise_std = _check_noise(noise_std)
        self._experts: list[Any] = []
        self._rng = np.random.default_rng()
        if env is not None:
            self.bind(env)

    @classmethod
    def for_env(cls, env: gym.Env, noise_std: float = 0.0) -> ExpertPolicy:
        """An expert policy bound to ``env`` (spaces taken from it)."""
        return cls(env.observation_space, env.action_space, noise_std=noise_std, env=env)

    def bind(self, env: gym.Env | Sequence[gym.Env]) -> None:
        """Act in ``env`` (or in each of a sequence of envs, one per batch row).

        Raises:
            TypeError: If an env's task has no scripted expert.
        """
        from loopsim.envs import make_expert

        envs = list(env) if isinstance(env, Sequence) else [env]
        self._experts = [make_expert(e, noise_std=0.0) for e in envs]

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode; reseed the noise generator when ``seed`` is given."""
        if seed is not None:
            self._rng = np.random.default_rng(seed)

    def _predict_batch(self, observation: Any, deterministic: bool) -> np.ndarray:
        first = observation[next(iter(observation))] if isinstance(observation, Mapping) else observation
        n = len(first)
        if not self._experts:
            raise RuntimeError(
                "the expert policy is not bound to an env: call bind(env) (it reads the "
                "simulator state, not the observation)"
            )
        if n != len(self._experts):
            raise ValueError(
                f"a batch of {n} observations needs {n} bound envs, the expert has {len(self._experts)}"
            )
        actions = np.stack([np.asarray(e.act(), dtype=np.float64) for e in self._experts])
        if self.noise_std > 0 and not deterministic:
            # motion commands only (the factory's gripper command gets none): the expert's motion_dims
            k = self._experts[0].motion_dims
            actions[:, :k] += self._rng.normal(0.0, self.noise_std, size=(n, k))
        return actions.astype(np.float32)

    def _checkpoint_policy(self) -> dict[str, Any]:
        return {"noise_std": self.noise_std}

    @classmethod
    def _from_checkpoint(
        cls,
        observation_space: gym.Space,
        action_space: gym.Space,
        policy: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
    ) -> ExpertPolicy:
        return cls(observation_space, action_space, noise_std=policy.get("noise_std", 0.0))


@register_policy
class RandomPolicy(BasePolicy):
    """Uniformly random actions from the action space (a floor baseline for benchmarks).

    Args:
        observation_space: The env's observation space.
        action_space: The env's action space.
        seed: Seed of the action sampler; :meth:`reset` with a seed reseeds it.
    """

    kind = "random"

    def __init__(
        self, observation_space: gym.Space, action_space: gym.Space, seed: int | None = None
    ) -> None:
        super().__init__(observation_space, action_space)
        self._space = copy.deepcopy(action_space)  # never reseed the env's own space
        self._space.seed(seed)

    def reset(self, seed: int | None = None) -> None:
        """Reseed the sampler when ``seed`` is given."""
        if seed is not None:
            self._space.seed(seed)

    def _predict_batch(self, observation: Any, deterministic: bool) -> np.ndarray:
        first = observation[next(iter(observation))] if isinstance(observation, Mapping) else observation
        return np.stack([self._space.sample() for _ in range(len(first))])

    @classmethod
    def _from_checkpoint(
        cls,
        observation_space: gym.Space,
        action_space: gym.Space,
        policy: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
    ) -> RandomPolicy:
        return cls(observation_space, action_space)
