"""Envs that never render run without PyBullet's renderer, with the very same physics."""

from __future__ import annotations

import numpy as np
import pytest


def _rollout(env, seed: int, steps: int = 120) -> np.ndarray:
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(
            rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        )
        out += [obs, np.array([reward])]
        if terminated or truncated:  # the next reset rebuilds the world, without a renderer too
            obs, _ = env.reset()
            out.append(obs)
    return np.concatenate([np.ravel(o) for o in out])


def test_state_env_without_renderer_matches_rendering_env(env_id, make_env):
    plain = make_env(env_id, max_steps=40)
    rendering = make_env(env_id, max_steps=40, render_mode="rgb_array", render_size=32)
    assert not plain.unwrapped.sim.renders and rendering.unwrapped.sim.renders
    a, b = _rollout(plain, 5), _rollout(rendering, 5)
    assert a.shape == b.shape and np.array_equal(a, b)
    assert rendering.render().std() > 5  # the rendering env still draws its scene


def test_render_call_on_env_without_renderer_is_refused(env_id, make_env):
    env = make_env(env_id)
    env.reset(seed=0)
    assert env.render() is None  # no render mode: nothing to draw, as Gymnasium specifies
    with pytest.raises(RuntimeError, match="without a renderer.*render_mode='rgb_array'"):
        env.unwrapped.sim.render(32, 32, (1, 0, 1), (0, 0, 0))


def test_rgb_observation_env_keeps_its_renderer(env_id, make_env):
    env = make_env(env_id, obs_mode="rgb", image_size=32)
    obs, _ = env.reset(seed=0)
    assert env.unwrapped.sim.renders and obs.std() > 5
