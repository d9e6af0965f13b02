"""Scripted experts: controllers that solve a task from privileged simulator state.

An expert is the stand-in for a human demonstrator or operator. Experts in loopsim are *reactive*:
the action depends only on the current simulator state, never on a memory of earlier steps, so the
expert can label any state a learner visits (what DAgger relabelling needs) and can take over from a
policy mid-episode (interventions).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["Expert"]


def _checked_seed(seed: Any) -> int | None:
    """``seed`` as an ``int`` (or ``None``); :class:`ValueError` naming it for anything else."""
    if seed is None:
        return None
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed={seed!r} must be None or an integer >= 0")
    return int(seed)


class Expert:
    """Base class of scripted experts, bound to one env.

    Args:
        env: The env to act in (any wrapper of it; the expert reads ``env.unwrapped``).
        noise_std: Std of Gaussian noise added to the motion part of each action (the first
            ``motion_dims`` components: not the factory's gripper command), in action units, for
            data diversity; actions stay clipped to ``[-1, 1]``.
        seed: Seed of the expert's own noise generator (independent of the env's).

    Raises:
        ValueError: If ``noise_std`` is negative or not finite, or ``seed`` is not ``None`` or an
            integer >= 0 (bools refused, as the env's ``reset`` refuses them).
        TypeError: If the env is not of the task this expert solves.
    """

    #: The env class (or base class) this expert solves.
    env_type: type = gym.Env
    #: Leading action components that get motion noise (the factory's gripper command does not).
    motion_dims: int = 3

    def __init__(self, env: gym.Env, noise_std: float = 0.0, seed: int | None = None) -> None:
        if (
            isinstance(noise_std, bool)
            or not isinstance(noise_std, numbers.Real)
            or not math.isfinite(noise_std)
            or noise_std < 0
        ):
            raise ValueError(f"noise_std={noise_std!r} must be a finite number >= 0")
        self.env = env.unwrapped
        if not isinstance(self.env, self.env_type):
            raise TypeError(
                f"{type(self).__name__} solves {self.env_type.__name__}, not {type(self.env).__name__}"
            )
        self.noise_std = float(noise_std)
        self.rng = np.random.default_rng(_checked_seed(seed))

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (reseeds the noise generator when ``seed`` is given).

        Raises:
            ValueError: If ``seed`` is not ``None`` or an integer >= 0 (bools refused).
        """
        if seed is not None:
            self.rng = np.random.default_rng(_checked_seed(seed))

    def act(self) -> np.ndarray:
        """The expert's action for the env's current state.

        Returns:
            ``(action_dim,)`` float32 in ``[-1, 1]``.

        Raises:
            RuntimeError: Before the env's first ``reset()`` or after its ``close()`` (as the env's
                ``step`` does): there is no state to act on, and an expert reading cached values
                would label it silently.
        """
        env = self.env
        if env.sim.closed:
            raise RuntimeError(f"{type(self).__name__}.act() on a closed env")
        if not env._has_reset:
            raise RuntimeError(f"{type(self).__name__}.act() before the env's reset()")
        a = np.asarray(self._act(), dtype=np.float64)
        if self.noise_std > 0:
            k = self.motion_dims
            a[:k] += self.rng.normal(0.0, self.noise_std, size=k)
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def __call__(self, observation: Any = None) -> np.ndarray:
        """Same as :meth:`act`; the observation is ignored (the expert reads privileged state)."""
        return self.act()

    def _act(self) -> np.ndarray:
        raise NotImplementedError
