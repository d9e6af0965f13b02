"""Wrappers that expose expert knowledge through ``info``, so that recorders and vector envs see it."""

from __future__ import annotations

import math
import numbers
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["ExpertActionInfo", "ExpertIntervention"]


class ExpertActionInfo(gym.Wrapper):
    """Put the scripted expert's action for the current state into ``info["expert_action"]``.

    After ``reset`` and after every ``step``, the wrapper asks the task's (noise-free) expert what it
    would do in the state just reached and returns it as ``info["expert_action"]`` (``(action_dim,)``
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


class ExpertIntervention(gym.Wrapper):
    """The scripted expert takes over from the policy when it goes wrong (HG-DAgger-style gating).

    At each step the wrapper asks the task's (noise-free) expert for its action in the current state
    and compares it with the policy's action on the motion part (the first three components,
    end-effector displacement in action units). The gate (after Kelly et al. 2019, "HG-DAgger:
    Interactive Imitation Learning with Human Experts", where the human takes control when the robot
    strays and hands it back once it has recovered):

    - when the Euclidean distance between the two motion commands exceeds ``threshold``, or their
      gripper commands have opposite signs, the expert takes over: it acts for this step and the next
      ``takeover_steps - 1`` steps;
    - then control returns to the policy.

    The executed action is reported as ``info["executed_action"]`` (so an episode recorder stores what
    really happened and replay reproduces it) and ``info["intervention"]`` is True when it was the
    expert's. :attr:`interventions` counts the expert's steps in the current episode.

    Args:
        env: A loopsim env with a scripted expert (possibly wrapped).
        threshold: Distance between motion commands that triggers a takeover [action units, > 0];
            the motion part lives in ``[-1, 1]^3``, so distances range over ``[0, 2 * sqrt(3)]``.
        takeover_steps: Control steps the expert keeps control once it took over (>= 1).

    Raises:
        TypeError: If the env's task has no scripted expert.
        ValueError: For a ``threshold`` that is not a finite number > 0 or a ``takeover_steps`` that
            is not an integer >= 1 (bools and strings are refused), before anything else.
    """

    def __init__(self, env: gym.Env, threshold: float = 0.6, takeover_steps: int = 10) -> None:
        # Python or NumPy numbers, not bools or strings; an integer count (2.7 was truncated to 2)
        if (
            isinstance(threshold, bool | np.bool_)
            or not isinstance(threshold, numbers.Real)
            or not math.isfinite(threshold)
            or threshold <= 0
        ):
            raise ValueError(f"threshold={threshold!r} must be a finite number > 0 [action units]")
        if (
            isinstance(takeover_steps, bool | np.bool_)
            or not isinstance(takeover_steps, numbers.Integral)
            or takeover_steps < 1
        ):
            raise ValueError(f"takeover_steps={takeover_steps!r} must be an integer >= 1 [control steps]")
        super().__init__(env)
        from loopsim.envs import make_expert

        self.threshold = float(threshold)
        self.takeover_steps = int(takeover_steps)
        self.expert = make_expert(env, noise_std=0.0)
        self._left = 0
        self.interventions = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[Any, dict[str, Any]]:
        """Reset the env; the policy starts in control."""
        self._left = 0
        self.interventions = 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Execute the policy's action, or the expert's when the gate says so.

        The gate compares the policy's action as the env would apply it (clipped to ``[-1, 1]``).

        Raises:
            ValueError: For an action the env would refuse (wrong shape, not numeric, NaN or
                infinite), whoever is in control; nothing is stepped then.
        """
        # what the env would apply (checked and clipped: the gate compares what would be executed, and
        # a malformed action is refused even while the expert is in control, as the env alone does)
        policy_action = np.asarray(self.env.unwrapped.checked_action(action), dtype=np.float32)
        expert_action = np.asarray(self.expert.act(), dtype=np.float32)
        if self._left == 0:
            deviation = math.dist(policy_action[:3], expert_action[:3])
            # The gripper command, when the action has one (not the warehouse's or a blocked gripper's).
            flipped = len(expert_action) > 3 and bool(policy_action[3] * expert_action[3] < 0)
            if deviation > self.threshold or flipped:
                self._left = self.takeover_steps
        intervene = self._left > 0
        if intervene:
            self._left -= 1
            self.interventions += 1
        executed = expert_action if intervene else policy_action
        observation, reward, terminated, truncated, info = self.env.step(executed)
        info["executed_action"] = executed
        info["intervention"] = intervene
        return observation, reward, terminated, truncated, info
