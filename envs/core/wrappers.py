"""Wrappers that expose expert knowledge through ``info``, so that recorders and vector envs see it."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["ExpertActionInfo"]


class ExpertActionInfo(gym.Wrapper):
    """Put the scripted expert's action for the current state into ``info["expert_action"]``.

    After ``reset`` and after every ``step``, the wrapper asks the task's (noise-free) expert what it
    would do in the state just reached and returns it as ``info["expert_action"]`` (``(4,)``
    float32 in ``[-1, 1]``). That is the label of the state where the *next* action is taken: the
    episode recorder (:mod:`loopsim.datasets.recorder`) stores it beside that action as the
    ``expert_action`` step extra, which is what DAgger relabelling needs. Experts are reactive
    (their action depends on the current simulator state only) and draw no random numbers from the
    env, so labelling does not change the episode. Works inside vector envs (each sub-env labels its
    own state, also in subprocesses).

    Args:
        env: A loopsim env with a scripted expert (possibly wrapped).

    Raises:
        TypeError: If the env's task has no scripted expert.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        from loopsim.envs import make_expert

        self.expert = make_expert(env, noise_std=0.0)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[Any, dict[str, Any]]:
        """Reset the env; ``info["expert_action"]`` labels the reset state."""
        observation, info = self.env.reset(seed=seed, options=options)
        info["expert_action"] = self._label()
        return observation, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Step the env; ``info["expert_action"]`` labels the state reached."""
        observation, reward, terminated, truncated, info = self.env.step(action)
        info["expert_action"] = self._label()
        return observation, reward, terminated, truncated, info

    def _label(self) -> np.ndarray:
        return np.asarray(self.expert.act(), dtype=np.float32)
