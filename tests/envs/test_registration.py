"""Registration: every id in the registry is makeable by name, by ``module:id`` and as a vector env."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import loopsim
from loopsim.envs import ENV_ENTRY_POINTS, env_class, make_expert, register_envs
from loopsim.envs.core.env import RobotTaskEnv

ENV_IDS = sorted(ENV_ENTRY_POINTS)


def test_ids_follow_naming_scheme():
    assert ENV_IDS, "no env registered"
    for env_id in ENV_IDS:
        namespace, _, rest = env_id.partition("/")
        assert namespace == "loopsim", env_id
        assert rest.endswith("-v0") or rest.rsplit("-v", 1)[1].isdigit(), env_id


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_entry_point_imports(env_id):
    """Every registered id must resolve to a RobotTaskEnv subclass (fails while a module is missing)."""
    cls = env_class(env_id)
    assert isinstance(cls, type) and issubclass(cls, RobotTaskEnv)
    assert gym.spec(env_id).entry_point == ENV_ENTRY_POINTS[env_id]


def test_import_loopsim_registers_every_id():
    for env_id in ENV_IDS:
        assert env_id in gym.registry, env_id
    register_envs()  # idempotent: no error, no duplicate
    assert sum(k.startswith("loopsim/") for k in gym.registry) == len(ENV_IDS)
    assert isinstance(loopsim.__version__, str) and loopsim.__version__


def test_env_class_unknown_id_lists_valid_ids():
    with pytest.raises(KeyError) as excinfo:
        env_class("loopsim/FactoryNope-v0")
    for env_id in ENV_IDS:
        assert env_id in str(excinfo.value)


def test_make_by_id(env_id, make_env):
    env = make_env(env_id)
    assert isinstance(env.unwrapped, env_class(env_id))
    assert env.spec is not None and env.spec.id == env_id
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs)
    assert isinstance(reward, float)


def test_make_pickplace_by_name(make_env):
    env = make_env("loopsim/FactoryPickPlace-v0")
    assert type(env.unwrapped).__name__ == "FactoryPickPlaceEnv"


_FRESH_MAKE = """
import json, sys
before = sorted(m for m in sys.modules if m == "loopsim" or m.startswith("loopsim."))
import gymnasium as gym
env = gym.make(sys.argv[1])
obs, info = env.reset(seed=0)
obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
print(json.dumps({
    "before": before,
    "cls": type(env.unwrapped).__name__,
    "module": type(env.unwrapped).__module__,
    "contains": bool(env.observation_space.contains(obs)),
    "after": "loopsim" in sys.modules,
}))
env.close()
"""


def test_make_module_colon_id_in_fresh_process(env_id, run_python):
    out = run_python(_FRESH_MAKE, f"loopsim:{env_id}")
    assert out["before"] == [], "the child had imported loopsim before gymnasium.make"
    assert out["after"] is True
    assert out["cls"] == env_class(env_id).__name__
    assert out["module"] == env_class(env_id).__module__
    assert out["contains"] is True


def test_make_vec_sync(env_id):
    envs = gym.make_vec(env_id, num_envs=2, vectorization_mode="sync", max_steps=5)
    try:
        single = envs.single_observation_space
        obs, infos = envs.reset(seed=[3, 4])
        assert obs.shape == (2, *single.shape) and obs.dtype == single.dtype
        assert not np.array_equal(obs[0], obs[1]), "two seeds gave the same first observation"
        assert envs.observation_space.contains(obs)
        ended = np.zeros(2, dtype=bool)
        for _ in range(5):  # max_steps=5: each sub-env's first episode ends by step 5
            obs, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
            assert obs.shape == (2, *single.shape)
            assert rewards.shape == (2,) and np.isfinite(rewards).all()
            assert envs.observation_space.contains(obs)
            ended |= terminated | truncated
        assert ended.all()
        obs, *_ = envs.step(envs.action_space.sample())  # autoreset step
        assert envs.observation_space.contains(obs)
    finally:
        envs.close()


def test_make_vec_sync_obs_modes_and_kwargs(env_id, helpers):
    site = helpers.noisy_site(env_id)
    envs = gym.make_vec(env_id, num_envs=2, vectorization_mode="sync", obs_mode="goal", site=site)
    try:
        obs, infos = envs.reset(seed=0)
        assert set(obs) == {"observation", "achieved_goal", "desired_goal"}
        assert obs["observation"].shape[0] == 2
        obs, *_ = envs.step(envs.action_space.sample())
        assert envs.observation_space.contains(obs)
        assert list(infos["site"]) == [site, site]
    finally:
        envs.close()


def test_make_expert_refuses_foreign_env():
    env = gym.make("CartPole-v1")
    try:
        with pytest.raises(TypeError, match="no scripted expert"):
            make_expert(env)
    finally:
        env.close()


def test_registration_kwargs_are_json_serializable(env_id):
    """Stores record env kwargs; the registered spec must round-trip through JSON."""
    spec = gym.spec(env_id)
    assert json.loads(json.dumps(spec.kwargs)) == spec.kwargs


def test_env_kwargs_with_defaults_makes_the_same_env_compare_equal():
    from loopsim.envs import env_kwargs_with_defaults

    peg = "loopsim/FactoryPegInsert-v0"
    full = env_kwargs_with_defaults(peg, {})
    # the subclass's own keyword and the base class's, with their defaults; not the site
    assert full["block_gripper"] is False and full["obs_mode"] == "state" and full["image_size"] == 84
    assert "site" not in full
    assert env_kwargs_with_defaults(peg, {"obs_mode": "state", "block_gripper": False}) == full
    assert env_kwargs_with_defaults(peg, {"block_gripper": True}) != full
    # a default that stands for "the task's own" is not resolved: None and 150 stay apart
    assert env_kwargs_with_defaults(peg, {"max_steps": 150}) != full
    with pytest.raises(KeyError, match="unknown env id"):
        env_kwargs_with_defaults("loopsim/Nope-v0", {})
