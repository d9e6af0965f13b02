"""The conveyor belt never runs out: past ``BELT_SHIFT_AT`` of travel its slab is shifted back, unseen."""

from __future__ import annotations

import numpy as np
import pybullet as p

from loopsim.envs.factory.conveyor import BELT_SHIFT, BELT_SHIFT_AT, BELT_TOP, BELT_X, PART_HALF

SORT = "loopsim/FactorySort-v0"
FAST = {"conveyor_speed": 0.3}  # the top of the allowed range: 0.012 m of belt travel per control step


def _hover(u, y: float) -> None:
    """Hold part 0 at rest 1 cm above the belt at ``y`` (as if still in a hand): it cannot be missed."""
    body = u.parts[0]
    p.resetBasePositionAndOrientation(
        body, [BELT_X, y, BELT_TOP + PART_HALF + 0.01], [0, 0, 0, 1], physicsClientId=u.sim.id
    )
    p.resetBaseVelocity(body, [0, 0, 0], [0, 0, 0], physicsClientId=u.sim.id)


def _belt(u) -> tuple[float, float]:
    """Belt travel (joint position) [m] and speed [m/s]."""
    return p.getJointState(u.conveyor, 0, physicsClientId=u.sim.id)[:2]


def test_part_put_on_the_belt_late_in_a_fast_episode_rides(make_env):
    """Regression: the 3.2 m slab used to run out after 2.65 m of travel (step 221 at 0.3 m/s); a part
    put down upstream after that lay on the static frame and the episode ended ``timeout``."""
    env = make_env(SORT, site=FAST, n_parts=1, max_steps=400)
    u = env.unwrapped
    env.reset(seed=0)
    hold = u._hold_action()
    release = 260  # belt travel 3.12 m: the old slab's trailing end was at y = -0.08 m
    for t in range(400):
        if t < release:
            _hover(u, -0.3)
        obs, _, terminated, truncated, info = env.step(hold)
        assert env.observation_space.contains(obs)
        if t == release + 20:
            pos, vel = u.part_positions()[0], u.part_velocities()[0]
            assert abs(pos[2] - (BELT_TOP + PART_HALF)) < 2e-3, f"part not on the belt: z = {pos[2]:.4f} m"
            assert abs(vel[1] - 0.3) < 0.01, f"part not riding: vy = {vel[1]:.4f} m/s"
        if terminated or truncated:
            break
        assert t < release or u.part_positions()[0][1] <= 0.56
    # As on an endless belt: the part rides out of the reachable stretch (0.85 m at 0.3 m/s ~ 71 steps).
    assert terminated and info["failure_mode"] == "missed", info
    assert release + 65 < t + 1 < release + 85


def test_belt_shift_keeps_belt_and_riding_part_velocity_continuous(make_env):
    """The slab is shifted back once its travel passes BELT_SHIFT_AT (step 168 at 0.3 m/s); the belt's
    speed, a riding part's velocity and its progress per step carry straight through; deterministic."""
    records = []
    for _ in range(2):
        env = make_env(SORT, site=FAST, n_parts=1, max_steps=300)
        u = env.unwrapped
        env.reset(seed=3)
        hold = u._hold_action()
        rows = []  # (travel, belt speed, part y, part vy, part z) after each step
        for t in range(205):
            if t < 150:
                _hover(u, -0.3)
            elif t == 150:  # put down riding, as at reset
                p.resetBaseVelocity(u.parts[0], [0, 0.3, 0], [0, 0, 0], physicsClientId=u.sim.id)
            _, _, terminated, truncated, _ = env.step(hold)
            assert not (terminated or truncated)
            pos, vel = u.part_positions()[0], u.part_velocities()[0]
            rows.append((*_belt(u), pos[1], vel[1], pos[2]))
        records.append(np.array(rows))
    np.testing.assert_array_equal(records[0], records[1])
    travel, speed, y, vy, z = records[0].T
    shifts = np.flatnonzero(np.diff(travel) < -1.0) + 1
    assert len(shifts) == 1, f"shifts after steps {shifts + 1}"
    s = shifts[0]
    assert 160 < s < 175
    assert np.all(np.diff(travel[:s]) > 0) and travel[s - 1] > BELT_SHIFT_AT - 0.012
    assert abs(travel[s] - (travel[s - 1] + 0.012 - BELT_SHIFT)) < 1e-4  # one step on, BELT_SHIFT back
    np.testing.assert_allclose(speed, 0.3, atol=1e-4)
    riding = slice(160, 205)  # from 10 steps after the part was put down, across the shift
    np.testing.assert_allclose(vy[riding], 0.3, atol=1e-3)
    np.testing.assert_allclose(np.diff(y[riding]), 0.012, atol=1e-4)
    np.testing.assert_allclose(z[riding], BELT_TOP + PART_HALF, atol=2e-3)
