"""ExpertActionInfo: expert labels in info, without changing the episode; info["seed"] replays episodes."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from loopsim.envs import ExpertActionInfo, make_expert


def _rollout(env: gym.Env, seed: int, actions: np.ndarray) -> tuple[list[np.ndarray], list[dict]]:
    obs, info = env.reset(seed=seed)
    observations, infos = [obs], [info]
    for action in actions:
        obs, _, terminated, truncated, info = env.step(action)
        observations.append(obs)
        infos.append(info)
        if terminated or truncated:
            break
    return observations, infos


def test_labels_are_the_experts_action_and_do_not_change_the_episode(env_id: str, make_env) -> None:
    actions = np.random.default_rng(5).uniform(-1, 1, size=(25, 4)).astype(np.float32)
    plain_obs, _ = _rollout(make_env(env_id), 11, actions)
    wrapped = ExpertActionInfo(make_env(env_id))
    reference = make_expert(wrapped, noise_std=0.0)
    obs, info = wrapped.reset(seed=11)
    assert np.array_equal(obs, plain_obs[0])
    assert info["expert_action"].dtype == np.float32 and info["expert_action"].shape == (4,)
    assert np.array_equal(info["expert_action"], reference.act())
    for t, action in enumerate(actions[: len(plain_obs) - 1]):
        obs, _, _, _, info = wrapped.step(action)
        assert np.array_equal(obs, plain_obs[t + 1]), f"labelling changed the episode at step {t}"
        assert np.array_equal(info["expert_action"], reference.act())
        assert np.all(np.abs(info["expert_action"]) <= 1.0)


def test_following_the_labels_solves_the_task_at_lab(env_id: str, make_env) -> None:
    env = ExpertActionInfo(make_env(env_id))
    _, info = env.reset(seed=3)
    for _ in range(env.unwrapped.max_steps):
        _, _, terminated, truncated, info = env.step(info["expert_action"])
        if terminated or truncated:
            break
    assert info["is_success"] is True


def test_unseeded_reset_reports_a_seed_that_replays_the_episode(env_id: str, make_env) -> None:
    env = make_env(env_id)
    env.reset(seed=0)
    actions = np.random.default_rng(1).uniform(-1, 1, size=(10, 4)).astype(np.float32)
    first_obs, first_infos = _rollout(env, None, actions)  # type: ignore[arg-type]
    seed = first_infos[0]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**31
    replay_obs, replay_infos = _rollout(make_env(env_id), seed, actions)
    assert replay_infos[0]["seed"] == seed
    assert len(first_obs) == len(replay_obs)
    for a, b in zip(first_obs, replay_obs, strict=True):
        assert np.array_equal(a, b)


def test_explicit_seed_is_reported(make_env) -> None:
    _, info = make_env("loopsim/FactoryPickPlace-v0").reset(seed=123)
    assert info["seed"] == 123


def test_wrapper_refuses_envs_without_expert() -> None:
    with pytest.raises(TypeError, match="no scripted expert"):
        ExpertActionInfo(gym.make("CartPole-v1"))
