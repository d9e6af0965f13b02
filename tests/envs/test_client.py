"""Each env owns its PyBullet client: envs do not disturb each other, and close() releases the client."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pybullet as p
import pytest


@pytest.mark.filterwarnings("ignore:.*step\\(\\) after the episode ended")  # PegInsert ends early
@pytest.mark.parametrize("site", ["lab", "noisy"])
def test_interleaved_envs_match_solo_runs(env_id, make_env, helpers, site):
    """Two envs stepped alternately in one process give exactly the streams each gives alone."""
    n = 60
    site = helpers.noisy_site(env_id) if site == "noisy" else site
    dim = helpers.action_dim(env_id)
    plans = [(1, helpers.random_actions(n, 10, dim)), (2, helpers.random_actions(n, 20, dim))]
    solo = []
    for seed, actions in plans:
        env = make_env(env_id, site=site, obs_mode="goal", max_steps=n)
        env.reset(seed=seed)
        solo.append([env.step(a) for a in actions])
    a_env = make_env(env_id, site=site, obs_mode="goal", max_steps=n)
    b_env = make_env(env_id, site=site, obs_mode="goal", max_steps=n)
    assert a_env.unwrapped.sim.id != b_env.unwrapped.sim.id
    b_env.reset(seed=2)  # reset out of order, too
    a_env.reset(seed=1)
    for t in range(n):
        for k, env in enumerate((a_env, b_env)):
            obs, reward, terminated, truncated, info = env.step(plans[k][1][t])
            s_obs, s_reward, s_term, s_trunc, s_info = solo[k][t]
            assert helpers.obs_equal(obs, s_obs), f"env {k} step {t}: observation differs from its solo run"
            assert (reward, terminated, truncated, info) == (s_reward, s_term, s_trunc, s_info)


def test_close_is_idempotent_and_releases_client(env_id):
    env = gym.make(env_id)
    env.reset(seed=0)
    cid = env.unwrapped.sim.id
    assert p.getConnectionInfo(physicsClientId=cid)["isConnected"] == 1
    env.close()
    env.close()
    env.unwrapped.close()
    assert p.getConnectionInfo(physicsClientId=cid)["isConnected"] == 0


def test_step_and_reset_after_close_raise(env_id):
    env = gym.make(env_id)
    env.reset(seed=0)
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.unwrapped.reset(seed=0)
    with pytest.raises(RuntimeError, match="closed"):
        env.unwrapped.step(np.zeros(4, dtype=np.float32))
    with pytest.raises(RuntimeError):
        env.reset(seed=0)


@pytest.mark.filterwarnings("ignore:.*step\\(\\) after the episode ended")  # PegInsert ends early
def test_close_one_env_leaves_the_other_running(env_id, make_env, helpers):
    a, b, c = make_env(env_id), make_env(env_id), make_env(env_id)
    a.reset(seed=4)
    b.reset(seed=4)
    c.reset(seed=4)
    b.close()
    for action in helpers.random_actions(10, 3, helpers.action_dim(env_id)):
        o1 = a.step(action)[0]
        o2 = c.step(action)[0]
        assert helpers.obs_equal(o1, o2)


def test_close_without_reset_and_unwrapped_direct(env_id):
    from loopsim.envs import env_class

    env = env_class(env_id)()
    cid = env.sim.id
    env.close()
    env.close()
    assert p.getConnectionInfo(physicsClientId=cid)["isConnected"] == 0


def _connected() -> set[int]:
    return {i for i in range(256) if p.getConnectionInfo(physicsClientId=i)["isConnected"]}


def test_one_client_per_env_and_none_left_after_close(env_id, make_env):
    """Making an env connects exactly one client, its own; closing disconnects exactly that one."""
    before = _connected()
    envs = [gym.make(env_id, obs_mode=mode) for mode in ("state", "goal", "rgb")]
    try:
        for e in envs:
            e.reset(seed=0)
            e.step(e.action_space.sample())
        ids = [e.unwrapped.sim.id for e in envs]
        assert len(set(ids)) == 3
        assert _connected() - before == set(ids)
    finally:
        for e in envs:
            e.close()
    assert _connected() == before
