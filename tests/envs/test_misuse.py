"""Regression tests for misuse found by adversarial testing: each case must fail loudly and lose nothing."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import threading
import warnings

import gymnasium as gym
import numpy as np
import pytest

import loopsim  # noqa: F401
from loopsim.envs import SiteError, make_expert
from loopsim.envs.core import panda


def test_env_refuses_pickle_and_copy(make_env):
    env = make_env("loopsim/FactoryPickPlace-v0")
    env.reset(seed=0)
    for copier in (copy.deepcopy, copy.copy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            copier(env)
    env.step(np.zeros(4))  # the original still works


@pytest.mark.parametrize(
    "action", [["0.5", "0", "0", "0"], [True, False, True, False], np.array([1, 0, 0, 1j]), [None] * 4]
)
def test_non_numeric_actions_are_refused(make_env, action):
    env = make_env("loopsim/FactoryPickPlace-v0")
    env.reset(seed=0)
    before = env.unwrapped.robot.ee_position()
    with pytest.raises(ValueError, match="action must"):
        env.step(action)
    np.testing.assert_array_equal(before, env.unwrapped.robot.ee_position())


def test_numpy_integers_are_accepted_for_sizes_and_params(make_env):
    env = make_env(
        "loopsim/FactorySort-v0", image_size=np.int64(32), max_steps=np.int32(7), n_parts=np.int64(2),
        obs_mode="rgb", site={"part_mass": np.float32(0.25), "action_delay": np.int64(1)},
    )
    obs, info = env.reset(seed=0)
    assert obs.shape == (32, 32, 3)
    assert info["site_params"]["action_delay"] == 1
    assert info["site_params"]["part_mass"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ({"part_mass": 10**400}, "finite number"),
        ({1: 2, "part_mass": 0.3}, "names must be strings"),
        ({"params": [("part_mass", 0.3)]}, "needs .params., a mapping"),
        ({"params": {}, "description": 3}, "must be strings"),
        ({"part_mass": True}, "finite number"),
    ],
)
def test_malformed_sites_are_refused_with_the_key(site, message):
    with pytest.raises(SiteError, match=message):
        gym.make("loopsim/FactoryPickPlace-v0", site=site)


@pytest.mark.parametrize("size", [15, 2049])
def test_image_size_bounds(size):
    with pytest.raises(ValueError, match=r"image_size.*\[16, 2048\]"):
        gym.make("loopsim/FactoryPickPlace-v0", image_size=size)


@pytest.mark.parametrize("noise", [float("nan"), float("inf"), -0.1, "0.1", None, True])
def test_expert_noise_must_be_a_finite_non_negative_number(make_env, noise):
    env = make_env("loopsim/FactoryPickPlace-v0")
    with pytest.raises(ValueError, match="noise_std"):
        make_expert(env, noise_std=noise)


def test_compute_reward_broadcasts_one_goal_against_a_batch(make_env):
    env = make_env("loopsim/FactoryPickPlace-v0", obs_mode="goal", reward_type="sparse")
    desired = np.array([[0.3, 0.38, 0.03], [1.0, 1.0, 1.0], [0.3, 0.38, 0.05]])
    rewards = env.unwrapped.compute_reward(np.array([0.3, 0.38, 0.03]), desired, None)
    np.testing.assert_array_equal(rewards, np.array([0.0, -1.0, 0.0], dtype=np.float32))
    assert env.unwrapped.compute_reward(desired[0], desired[0], None) == 0.0


@pytest.mark.parametrize(
    ("display", "refusal"),
    [
        ({}, "needs a display"),
        ({"DISPLAY": ":987"}, "cannot open the X display"),
        ({"WAYLAND_DISPLAY": "wayland-987"}, "cannot open the X display"),
    ],
    ids=["no-display", "dead-x-server", "wayland-only"],
)
def test_gui_without_a_usable_display_is_a_clear_error(display, refusal):
    """No display, or one PyBullet cannot open, is a RuntimeError, not the end of the process.

    (PyBullet prints "cannot connect to X server" and exits the interpreter with status 1: a stale
    ``DISPLAY`` over SSH or in a container, or a Wayland session without XWayland, killed the caller.)
    """
    code = (
        "import gymnasium as gym, loopsim\n"
        "try:\n"
        "    gym.make('loopsim/FactoryPickPlace-v0', render_mode='human')\n"
        "except RuntimeError as exc:\n"
        "    print('refused:', exc)\n"
        "print('alive')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, **display}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and refusal in out.stdout and "alive" in out.stdout


def test_envs_created_in_threads_leave_stdout_working(tmp_path):
    code = (
        "import threading, gymnasium as gym, loopsim\n"
        "def work():\n"
        "    for _ in range(3):\n"
        "        gym.make('loopsim/FactoryPegInsert-v0').close()\n"
        "threads = [threading.Thread(target=work) for _ in range(6)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print('stdout still works')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "stdout still works" in out.stdout
    assert "argv[0]=" not in out.stdout


def test_damaged_urdf_cache_is_rewritten_readable(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    path = panda.panda_urdf_path()
    assert os.stat(path).st_mode & 0o777 == 0o644
    with open(path, "w") as f:
        f.write("<robot")  # damaged, e.g. by a full disk
    assert panda.panda_urdf_path() == path
    text = open(path).read()
    assert len(text) > 5000 and "panda_link0" in text and 'filename="hull_link1.obj"' in text
    # a hull mesh removed (e.g. by a temp cleaner) or damaged is written again too
    folder = os.path.dirname(path)
    hull = open(os.path.join(folder, "hull_link6.obj")).read()
    os.remove(os.path.join(folder, "hull_link6.obj"))
    with open(os.path.join(folder, "hull_finger.obj"), "w") as f:
        f.write("v 0 0 0\n")
    assert panda.panda_urdf_path() == path
    assert open(os.path.join(folder, "hull_link6.obj")).read() == hull
    assert open(os.path.join(folder, "hull_finger.obj")).read().count("\nf ") == 32  # 18 vertices
    env = gym.make("loopsim/FactoryPickPlace-v0")  # loads the rewritten files
    env.reset(seed=0)
    env.close()


def test_threads_stepping_their_own_envs_agree_with_serial_runs():
    actions = np.random.default_rng(0).uniform(-1, 1, (40, 4))

    def run(out, seed):
        env = gym.make("loopsim/FactoryPickPlace-v0")
        env.reset(seed=seed)
        out[seed] = np.array([env.step(a)[0] for a in actions])
        env.close()

    threaded: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=run, args=(threaded, s)) for s in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    serial: dict[int, np.ndarray] = {}
    for s in range(3):
        run(serial, s)
    for s in range(3):
        np.testing.assert_array_equal(threaded[s], serial[s])


def _step_until_the_end(env, action, limit):
    for _ in range(limit):
        out = env.step(action)
        if out[2] or out[3]:
            return out
    raise AssertionError(f"the episode did not end within {limit} steps")


def test_step_after_the_episode_ended_warns_once(env_id, make_env):
    """Stepping an ended episode warns once (as Gymnasium's own envs do); reset() starts the next.

    (It used to go on silently: a warehouse episode that had ended in a collision reported
    ``terminated=False`` a step later, as if it went on.)
    """
    env = make_env(env_id, max_steps=2)
    hold = np.zeros(env.action_space.shape, dtype=np.float32)
    env.reset(seed=0)
    *_, terminated, truncated, info = _step_until_the_end(env, hold, 2)
    assert truncated and not terminated and info["failure_mode"] == "timeout"
    with pytest.warns(UserWarning, match=r"after the episode ended \(truncated\) without reset\(\)"):
        env.step(hold)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env.step(hold)  # once per episode
        env.reset(seed=0)
        env.step(hold)  # the next episode steps without a warning


def test_step_after_a_terminated_episode_warns(make_env):
    env = make_env("loopsim/FactoryPegInsert-v0")
    env.reset(seed=0)
    *_, terminated, truncated, info = _step_until_the_end(env, np.array([0, 0, 0, 1.0]), 30)  # opens: drops
    assert terminated and info["failure_mode"] == "dropped"
    with pytest.warns(UserWarning, match=r"after the episode ended \(terminated\)"):
        env.step(np.zeros(4))


@pytest.mark.parametrize("seed", [np.int64(7), np.uint32(7), np.int8(7)])
def test_numpy_integer_seeds_are_seeds(make_env, seed):
    """A seed taken from a NumPy array (``np.arange``, a store's seed column) is that seed."""
    env = make_env("loopsim/FactoryPegInsert-v0")
    obs, info = env.reset(seed=seed)
    assert info["seed"] == 7 and type(info["seed"]) is int
    np.testing.assert_array_equal(obs, env.reset(seed=7)[0])


@pytest.mark.parametrize("seed", [True, False, np.bool_(True), 7.0, "7", -1])
def test_bad_seeds_are_refused_naming_the_seed(make_env, seed):
    env = make_env("loopsim/FactoryPegInsert-v0")
    with pytest.raises(ValueError, match=rf"seed={seed!r} must be a non-negative integer"):
        env.reset(seed=seed)


@pytest.mark.parametrize("obs_mode", ["state", "goal", "rgb"])
def test_an_env_dropped_without_close_frees_its_physics_client_at_once(env_id, obs_mode):
    """No reference cycle keeps a dropped env (and its PyBullet client, 8-26 MB) alive until the
    cyclic garbage collector runs. (``compute_reward``, a bound method stored on the goal env itself,
    made one: 150 WarehouseNavigate goal envs made and dropped kept up to 16 clients alive.)"""
    import gc
    import weakref

    import pybullet as p

    gc.collect()
    gc.disable()
    try:
        env = gym.make(env_id, obs_mode=obs_mode, image_size=16)
        env.reset(seed=0)
        assert hasattr(env, "compute_reward") == (obs_mode == "goal")
        client, ref = env.unwrapped.sim.id, weakref.ref(env)
        del env
        assert ref() is None, "the env is kept alive by a reference cycle"
        assert not p.isConnected(physicsClientId=client)
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"takeover_steps": 2.7}, r"takeover_steps=2.7 must be an integer >= 1"),  # was truncated to 2
        ({"takeover_steps": "3"}, r"takeover_steps='3' must be an integer"),
        ({"takeover_steps": True}, r"takeover_steps=True must be an integer"),
        ({"takeover_steps": 0}, r"takeover_steps=0 must be an integer >= 1"),
        ({"threshold": True}, r"threshold=True must be a finite number > 0"),
        ({"threshold": "0.5"}, r"threshold='0.5' must be a finite number > 0"),  # was a numpy ufunc error
        ({"threshold": None}, r"threshold=None must be a finite number > 0"),
        ({"threshold": float("nan")}, r"threshold=nan must be a finite number > 0"),
    ],
)
def test_intervention_gate_arguments_are_checked(make_env, kwargs, message):
    from loopsim.envs import ExpertIntervention

    with pytest.raises(ValueError, match=message):
        ExpertIntervention(make_env("loopsim/FactoryPegInsert-v0"), **kwargs)


def test_intervention_gate_takes_numpy_numbers(make_env):
    from loopsim.envs import ExpertIntervention

    env = ExpertIntervention(make_env("loopsim/FactoryPegInsert-v0"), threshold=np.float32(0.5),
                             takeover_steps=np.int64(3))
    assert env.takeover_steps == 3 and type(env.takeover_steps) is int


@pytest.mark.parametrize(("typo", "meant"), [("obs_mod", "obs_mode"), ("max_step", "max_steps"),
                                             ("sites", "site")])
def test_kwarg_typo_names_the_closest_and_every_allowed_kwarg(env_id, typo, meant, monkeypatch):
    """Python's own TypeError named the unknown key only; now also what was meant and what is allowed,
    for every env (the task's own kwargs included), before any physics client is made."""
    from loopsim.envs.core import env as env_module

    def no_client(*args, **kwargs):
        raise AssertionError("a physics client was made for an env with a kwarg typo")

    monkeypatch.setattr(env_module, "Simulation", no_client)
    with pytest.raises(TypeError, match=rf"unknown keyword argument {typo}=1 \(did you mean '{meant}'\?\)"
                       r"; allowed: .*fresh_world, image_size, max_steps, .*reward_type, site") as err:
        gym.make(env_id, **{typo: 1})
    own = {"loopsim/FactoryPegInsert-v0": "block_gripper", "loopsim/FactoryPickPlace-v0": "n_parts",
           "loopsim/FactorySort-v0": "n_parts"}.get(env_id)
    if own:
        assert own in str(err.value)
    with pytest.raises(TypeError, match=r"unknown keyword arguments a=1, b=2; allowed"):
        gym.make(env_id, a=1, b=2)


def test_compute_reward_checks_the_goal_size(make_env) -> None:
    """Goals of another size gave NumPy's reshape error (or, one goal, a wrong reward); an empty batch
    failed the same way. Now: a ValueError naming the sizes; an empty batch gives no rewards."""
    env = make_env("loopsim/FactorySort-v0", obs_mode="goal")
    obs, _ = env.reset(seed=0)
    u = env.unwrapped
    assert u.compute_reward(np.zeros((0, 6)), np.zeros((0, 6)), None).shape == (0,)
    for achieved, desired in [(np.zeros(4), np.zeros(4)), (np.zeros((2, 3)), np.zeros((2, 6))),
                              (np.float64(1.0), np.float64(1.0))]:
        with pytest.raises(ValueError, match="goal size 6"):
            u.compute_reward(achieved, desired, None)
    one = u.compute_reward(obs["achieved_goal"], obs["desired_goal"], None)
    batch = u.compute_reward(np.stack([obs["achieved_goal"]] * 2), obs["desired_goal"], None)
    assert isinstance(one, float) and batch.tolist() == [np.float32(one)] * 2
