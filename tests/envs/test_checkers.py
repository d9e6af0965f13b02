"""Gymnasium's and stable-baselines3's env checkers pass with no warnings, for every env and mode."""

from __future__ import annotations

import warnings

import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.utils.passive_env_checker import env_render_passive_checker
from stable_baselines3.common.env_checker import check_env as sb3_check_env

CASES = [
    ("state", "dense"),
    ("state", "sparse"),
    ("goal", "dense"),
    ("goal", "sparse"),
    ("rgb", "dense"),
]


def _messages(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.parametrize(("obs_mode", "reward_type"), CASES)
def test_gymnasium_check_env(env_id, make_env, obs_mode, reward_type):
    env = make_env(env_id, obs_mode=obs_mode, reward_type=reward_type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # The render check would open every declared render mode, "human" included (needs a display);
        # rgb_array rendering is checked below.
        gym_check_env(env.unwrapped, skip_render_check=True)
    assert _messages(caught) == []


@pytest.mark.parametrize("target", ["made", "unwrapped"])
@pytest.mark.parametrize(("obs_mode", "reward_type"), CASES)
def test_sb3_check_env(env_id, make_env, obs_mode, reward_type, target):
    """SB3's checker on what ``gymnasium.make`` returns (as users call it) and on the bare env.

    SB3 treats any env whose ``unwrapped`` has ``compute_reward`` as goal-conditioned, and calls
    ``env.compute_reward`` on the object it is given.
    """
    env = make_env(env_id, obs_mode=obs_mode, reward_type=reward_type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(env if target == "made" else env.unwrapped, warn=True)
    assert _messages(caught) == []


def test_rgb_array_render_passes_checker(env_id, make_env):
    env = make_env(env_id, render_mode="rgb_array", render_size=64)
    env.reset(seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env_render_passive_checker(env.unwrapped)
    assert _messages(caught) == []
