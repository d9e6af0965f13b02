"""``rgb`` observations and ``rgb_array`` rendering: shapes, content, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def env_id(factory_env_id: str) -> str:
    """This module is written for the factory tasks (Panda, conveyor, factory sites); the warehouse
    envs have theirs in ``test_warehouse.py``."""
    return factory_env_id



def _n_colours(img: np.ndarray) -> int:
    return len(np.unique(img.reshape(-1, 3), axis=0))


def test_rgb_observation_default(env_id, make_env):
    env = make_env(env_id, obs_mode="rgb")
    assert env.observation_space.shape == (84, 84, 3)
    assert env.observation_space.dtype == np.uint8
    obs, _ = env.reset(seed=0)
    assert obs.shape == (84, 84, 3) and obs.dtype == np.uint8
    assert obs.std() > 20, f"frame nearly blank (std {obs.std():.1f})"
    assert _n_colours(obs) >= 20, f"only {_n_colours(obs)} distinct colours"
    obs2, *_ = env.step(env.action_space.sample())
    assert obs2.shape == (84, 84, 3) and obs2 is not obs


@pytest.mark.parametrize("size", [16, 48, 128])
def test_rgb_image_size(env_id, make_env, size):
    env = make_env(env_id, obs_mode="rgb", image_size=size)
    assert env.observation_space.shape == (size, size, 3)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (size, size, 3) and obs.dtype == np.uint8
    assert env.observation_space.contains(obs)
    assert obs.std() > 10


@pytest.mark.filterwarnings("ignore:.*step\\(\\) after the episode ended")  # PegInsert ends early
def test_rgb_shows_the_arm_moving(env_id, make_env):
    """The camera sees the scene change: moving the arm changes the frame, holding still does not much."""
    env = make_env(env_id, obs_mode="rgb", site={"conveyor_speed": 0.0})
    first, _ = env.reset(seed=0)
    for _ in range(15):
        moved, *_ = env.step(np.array([0.0, 1.0, 0.0, 0.0], dtype=np.float32))
    changed = np.abs(moved.astype(int) - first.astype(int)).max(axis=-1) > 30
    assert changed.mean() > 0.005, f"only {changed.mean():.4f} of the pixels changed after moving the arm"


def test_rgb_shows_the_parts_in_their_colours(env_id, make_env):
    """Conveyor tasks: red cubes / blue cylinders are visible in the frame."""
    env = make_env(env_id, obs_mode="rgb", image_size=128)
    u = env.unwrapped
    if not hasattr(u, "kinds"):
        pytest.skip("no coloured parts in this task")
    obs, _ = env.reset(seed=0)
    img = obs.astype(int)
    red = (img[..., 0] > 140) & (img[..., 1] < 90) & (img[..., 2] < 90)
    blue = (img[..., 2] > 140) & (img[..., 0] < 90) & (img[..., 1] < 130)
    if 0 in u.kinds:
        assert red.sum() >= 5, "no red cube pixels"
    if 1 in u.kinds:
        assert blue.sum() >= 5, "no blue cylinder pixels"


def test_rgb_same_seed_same_frames_in_process(env_id, make_env, helpers):
    frames = []
    for _ in range(2):
        env = make_env(env_id, obs_mode="rgb", site="noisy_sensors")
        rec = helpers.rollout(env, 5, helpers.RandomPolicy(10, 5), 10)
        frames.append(rec)
    assert helpers.first_difference(*frames) is None
    env = make_env(env_id, obs_mode="rgb")
    other, _ = env.reset(seed=6)
    assert not np.array_equal(other, frames[0].obs[0]), "two seeds gave the same first frame"


def test_rgb_identical_across_fresh_processes(env_id, run_python, helpers):
    case = {"env_id": env_id, "kwargs": {"obs_mode": "rgb", "image_size": 64}, "seed": 3, "n_steps": 8,
            "policy": "random"}
    first, second = run_python(Path(helpers.__file__), json.dumps([case]), procs=2)
    assert first == second == [helpers.run_case(case)]


def test_render_rgb_array(env_id, make_env):
    env = make_env(env_id, render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert isinstance(frame, np.ndarray)
    assert frame.shape == (480, 480, 3) and frame.dtype == np.uint8
    assert frame.std() > 20 and _n_colours(frame) >= 50


def test_render_size_configurable(env_id, make_env):
    env = make_env(env_id, render_mode="rgb_array", render_size=100, obs_mode="rgb", image_size=32)
    obs, _ = env.reset(seed=0)
    assert env.render().shape == (100, 100, 3)
    assert obs.shape == (32, 32, 3)


def test_render_without_mode_returns_none(env_id, make_env):
    env = make_env(env_id)
    env.reset(seed=0)
    assert env.render() is None


def test_render_fps_matches_control_rate(env_id, make_env):
    u = make_env(env_id).unwrapped
    assert u.metadata["render_fps"] == round(1.0 / u.sim.control_dt)
    assert "rgb_array" in u.metadata["render_modes"]
