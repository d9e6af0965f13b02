"""Observations stay inside ``observation_space`` and finite, whatever the actions do."""

from __future__ import annotations

import numpy as np
import pybullet as p
import pytest

from loopsim.envs.core.panda import ARM_JOINTS, ARM_LOWER, ARM_UPPER
from loopsim.envs.factory.conveyor import BELT_TOP, ConveyorTaskEnv


@pytest.fixture
def env_id(factory_env_id: str) -> str:
    """This module is written for the factory tasks (Panda, conveyor, factory sites); the warehouse
    envs have theirs in ``test_warehouse.py``."""
    return factory_env_id



def _flat(obs):
    if isinstance(obs, dict):
        return np.concatenate([np.ravel(v) for v in obs.values()])
    return np.ravel(obs)


def _check_rollout(env, policy, n_steps, seed):
    """Step ``n_steps`` (resetting at episode ends); check every observation, reward and robot state."""
    u = env.unwrapped
    space = env.observation_space
    obs, info = env.reset(seed=seed)
    assert space.contains(obs), f"reset observation outside {space}"
    resets = 0
    for t in range(n_steps):
        obs, reward, terminated, truncated, info = env.step(policy(env))
        assert space.contains(obs), f"step {t}: observation outside the space: {obs}"
        assert np.isfinite(_flat(obs).astype(np.float64)).all(), f"step {t}: non-finite observation"
        assert isinstance(reward, float) and np.isfinite(reward), f"step {t}: reward {reward!r}"
        robot = getattr(u, "robot", None)
        if robot is not None:
            states = p.getJointStates(robot.body, list(ARM_JOINTS), physicsClientId=u.sim.id)
            q = np.array([s[0] for s in states])
            assert (q >= np.array(ARM_LOWER) - 0.02).all() and (q <= np.array(ARM_UPPER) + 0.02).all(), (
                f"step {t}: arm joints {q} outside the joint limits"
            )
            ee = robot.ee_position()
            # The target is clipped to the workspace box; the arm may lag it, never stray far out of it.
            assert (ee >= robot.workspace_low - 0.1).all() and (ee <= robot.workspace_high + 0.1).all(), (
                f"step {t}: end effector {ee} far outside the workspace box"
            )
        if terminated or truncated:
            obs, info = env.reset()
            resets += 1
            assert space.contains(obs)
    return resets


POLICIES = ["random", "corners"]


def _policy(helpers, name, n, seed):
    return helpers.RandomPolicy(n, seed) if name == "random" else helpers.CornerPolicy(hold=20)


@pytest.mark.parametrize("obs_mode", ["state", "goal"])
@pytest.mark.parametrize("policy", POLICIES)
def test_short_rollouts_stay_in_space(env_id, make_env, helpers, obs_mode, policy):
    env = make_env(env_id, obs_mode=obs_mode, site="fast_conveyor", max_steps=60)
    resets = _check_rollout(env, _policy(helpers, policy, 160, 0), 160, seed=0)
    assert resets >= 2


def test_short_rgb_rollout_stays_in_space(env_id, make_env, helpers):
    env = make_env(env_id, obs_mode="rgb", image_size=32, max_steps=15)
    _check_rollout(env, helpers.RandomPolicy(40, 1), 40, seed=1)


SITES = ["lab", "fast_conveyor", "noisy_sensors", "gripper_faults", "heavy_slippery"]


@pytest.mark.slow
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("obs_mode", ["state", "goal"])
@pytest.mark.parametrize("policy", POLICIES)
def test_long_rollouts_stay_in_space(env_id, make_env, helpers, site, obs_mode, policy):
    env = make_env(env_id, obs_mode=obs_mode, site=site)
    resets = _check_rollout(env, _policy(helpers, policy, 1500, 3), 1500, seed=3)
    assert resets >= 4


@pytest.mark.slow
def test_long_rgb_rollout_stays_in_space(env_id, make_env, helpers):
    env = make_env(env_id, obs_mode="rgb", site="fast_conveyor", max_steps=100)
    _check_rollout(env, helpers.CornerPolicy(hold=15), 400, seed=2)


# Directions in which nothing stands in the arm's way (pushing down meets the belt or the fixture).
@pytest.mark.parametrize("action", [(0, 0, 1), (0, 1, 0), (0, -1, 0), (1, 0, 1), (1, 1, 0)])
def test_saturated_actions_reach_workspace_boundary(env_id, make_env, action):
    """Saturated actions really drive the arm: holding one reaches the boundary of the reachable
    workspace (``Panda.reachable``) in that direction and stays there."""
    env = make_env(env_id, max_steps=100)
    env.reset(seed=0)
    robot = env.unwrapped.robot
    for _ in range(60):
        env.step(np.array([*action, -1.0], dtype=np.float32))
    ee = robot.ee_position()
    further = np.array(robot.reachable(*(ee + 0.05 * np.asarray(action, dtype=float))))
    assert np.linalg.norm(further - ee) < 0.02, f"end effector {ee} stopped short of the boundary {further}"


@pytest.mark.parametrize(
    "dxy", [(1, 1), (1, -1), (1, 0), (-1, -1), (0, 0)], ids=["+x+y", "+x-y", "+x", "-x-y", "up"]
)
def test_upward_command_never_lowers_the_arm(env_id, make_env, dxy):
    """Holding dz=+1 (any dx, dy) must not make the end effector sink, even towards an unreachable target."""
    env = make_env(env_id, max_steps=100)
    env.reset(seed=0)
    robot = env.unwrapped.robot
    z0 = robot.ee_position()[2]
    heights = []
    for _ in range(60):
        env.step(np.array([*dxy, 1.0, -1.0], dtype=np.float32))
        heights.append(robot.ee_position()[2])
    assert min(heights) > z0 - 0.03, (
        f"commanding (dx, dy, dz) = ({dxy[0]}, {dxy[1]}, 1) the end effector sank from z={z0:.3f} m "
        f"to {min(heights):.3f} m (final position {robot.ee_position().round(3).tolist()})"
    )


SWEEPS = {
    "out-right_then_back-right-down": ((1, -1, 1), (-1, -1, -1)),
    "out-right_then_back-left-down": ((1, -1, 1), (-1, 1, -1)),
    "out-left_then_back-left-up": ((1, 1, 1), (-1, 1, 1)),
    "back-right-up_then_out-left-down": ((-1, -1, 1), (1, 1, -1)),
}


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_end_effector_stays_in_workspace_box(env_id, make_env, sweep):
    """Two saturated moves in a row (25 steps each): the end effector stays within 5 cm of its box."""
    first, second = SWEEPS[sweep]
    env = make_env(env_id, max_steps=100, site={"conveyor_speed": 0.0})
    env.reset(seed=0)
    robot = env.unwrapped.robot
    worst, where = 0.0, None
    for t in range(50):
        env.step(np.array([*(first if t < 25 else second), -1.0], dtype=np.float32))
        ee = robot.ee_position()
        below, above = robot.workspace_low - ee, ee - robot.workspace_high
        out = float(np.max(np.maximum(below, 0) + np.maximum(above, 0)))
        if out > worst:
            worst, where = out, (t, ee.round(3).tolist())
    assert worst < 0.05, f"end effector {worst:.3f} m outside the workspace box at (step, position) {where}"


def test_parts_swept_off_the_belt(env_id, make_env, helpers):
    """A part knocked off the conveyor falls to the floor; observations stay valid and the episode fails."""
    env = make_env(env_id, obs_mode="goal", max_steps=200)
    u = env.unwrapped
    if not isinstance(u, ConveyorTaskEnv):
        pytest.skip("no conveyor in this task")
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        policy = helpers.PushOffBeltPolicy()
        for _ in range(200):
            obs, reward, terminated, truncated, info = env.step(policy(env))
            assert env.observation_space.contains(obs) and np.isfinite(_flat(obs)).all()
            if terminated or truncated:
                break
        assert terminated and info["failure_mode"] == "missed", (seed, info)
        assert u.part_positions()[:, 2].min() < BELT_TOP - 0.03, "no part fell below the belt top"
