"""FactoryPegInsert with ``block_gripper=True``: 3-D actions, fingers held closed on the peg.

The values asserted here were measured with this physics (lab site): random actions in the
unblocked env drop the peg within 2 to 9 steps (30 of 30 seeds); blocked, no seed of this test's
action stream dropped it within 50 steps (the first drop came at step 61, after the peg was levered
against the fixture or the floor and turned in the grip). Other action streams drop it sooner now
and then (actions drawn from the episode seed: 4 of 30 episodes, first at step 22).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from loopsim.envs import make_expert
from loopsim.envs.factory.peg_insert import GRIP_SQUEEZE, PEG_HALF

ENV_ID = "loopsim/FactoryPegInsert-v0"
#: Opening of the fingers closed on the peg at reset [m] (19.6 mm).
GRIP_WIDTH = 2 * PEG_HALF - GRIP_SQUEEZE


def test_action_space_is_3d_and_default_unchanged(make_env):
    blocked = make_env(ENV_ID, block_gripper=True)
    assert blocked.action_space == gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    assert blocked.unwrapped.block_gripper is True
    default = make_env(ENV_ID)
    assert default.action_space == gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    assert default.unwrapped.block_gripper is False
    blocked.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        blocked.step(np.zeros(4, dtype=np.float32))


@pytest.mark.parametrize("value", ["yes", 1, 0, None, 1.0, [True]])
def test_non_bool_block_gripper_is_refused(value):
    with pytest.raises(ValueError, match="block_gripper"):
        gym.make(ENV_ID, block_gripper=value)


def test_numpy_bool_is_accepted(make_env):
    env = make_env(ENV_ID, block_gripper=np.bool_(True))
    assert env.unwrapped.block_gripper is True and env.action_space.shape == (3,)


@pytest.mark.parametrize("site", ["lab", "gripper_faults", "heavy_slippery"])
def test_blocked_episode_equals_closed_gripper_commands(make_env, helpers, site):
    """A blocked episode is the unblocked one with ``g = -1``, bit for bit (faults included)."""
    actions = helpers.random_actions(60, seed=7, dim=3)
    blocked = make_env(ENV_ID, site=site, block_gripper=True)
    closed = make_env(ENV_ID, site=site)
    faults = 0
    for seed in (3, 11):
        o1, i1 = blocked.reset(seed=seed)
        o2, i2 = closed.reset(seed=seed)
        assert helpers.obs_equal(o1, o2) and i1 == i2
        for a in actions:
            o1, r1, te1, tr1, i1 = blocked.step(a)
            o2, r2, te2, tr2, i2 = closed.step(np.append(a, np.float32(-1.0)))
            assert helpers.obs_equal(o1, o2) and r1 == r2 and (te1, tr1) == (te2, tr2) and i1 == i2
            faults += blocked.unwrapped._fault_steps > 0  # a gripper fault is under way
            if te1 or tr1:
                break
    assert (faults > 0) == (site == "gripper_faults"), faults  # faults still apply when blocked


def test_fingers_stay_closed_on_the_peg_without_contact(make_env):
    """Random actions that never push down: the fingers keep the grasp width, the peg is held."""
    env = make_env(ENV_ID, block_gripper=True)
    u = env.unwrapped
    rng = np.random.default_rng(0)
    for seed in range(4):
        env.reset(seed=seed)
        for _ in range(40):
            a = rng.uniform(-1.0, 1.0, size=3).astype(np.float32)
            a[2] = abs(a[2])  # up only: no contact with the fixture or the floor
            _, _, terminated, truncated, info = env.step(a)
            assert abs(u.robot.width - GRIP_WIDTH) < 2e-4, u.robot.width
            assert not terminated and not truncated, info
        assert u.peg_tilt() < np.radians(2.0)


def test_random_actions_do_not_drop_the_peg(make_env):
    """Uniform random actions for 40 steps: blocked, the peg stays in the grip; unblocked, it falls."""
    blocked = make_env(ENV_ID, block_gripper=True)
    free = make_env(ENV_ID)
    rng = np.random.default_rng(0)
    for seed in range(8):
        blocked.reset(seed=seed)
        for _ in range(40):
            _, _, terminated, truncated, info = blocked.step(rng.uniform(-1, 1, size=3).astype(np.float32))
            assert not truncated and info.get("failure_mode") is None, (seed, info)
            assert not terminated or info["is_success"]
            if terminated:
                break
        free.reset(seed=seed)
        steps, terminated = 0, False
        while not terminated and steps < 40:
            _, _, terminated, _, info = free.step(rng.uniform(-1, 1, size=4).astype(np.float32))
            steps += 1
        assert info["failure_mode"] == "dropped" and steps <= 15, (seed, steps, info)


@pytest.mark.parametrize("obs_mode", ["state", "goal"])
def test_expert_succeeds_with_3d_actions(make_env, obs_mode):
    env = make_env(ENV_ID, block_gripper=True, obs_mode=obs_mode)
    expert = make_expert(env)
    for seed in range(5):
        env.reset(seed=seed)
        expert.reset(seed=seed)
        for _ in range(env.unwrapped.max_steps):
            action = expert.act()
            assert action.shape == (3,) and action.dtype == np.float32
            _, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        assert info["is_success"], (seed, info)


def test_expert_intervention_wrapper_with_3d_actions(make_env):
    from loopsim.envs.core.wrappers import ExpertIntervention

    env = ExpertIntervention(make_env(ENV_ID, block_gripper=True), threshold=0.5, takeover_steps=5)
    env.reset(seed=1)
    _, _, _, _, info = env.step(np.array([1.0, 1.0, 1.0], dtype=np.float32))  # far from the expert's
    assert info["intervention"] and info["executed_action"].shape == (3,)


@pytest.mark.parametrize("obs_mode", ["state", "goal"])
def test_check_env_gymnasium_and_sb3(make_env, obs_mode):
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = make_env(ENV_ID, block_gripper=True, obs_mode=obs_mode)
    gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=True)
