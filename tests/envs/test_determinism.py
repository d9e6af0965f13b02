"""``reset(seed=s)`` fully determines an episode: bit-identical in any process, after any prior episode."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from loopsim.envs import available_sites


@pytest.fixture
def env_id(factory_env_id: str) -> str:
    """This module is written for the factory tasks (Panda, conveyor, factory sites); the warehouse
    envs have theirs in ``test_warehouse.py``."""
    return factory_env_id


# Sites whose parameters are drawn at reset and, for some, every step (fast_conveyor: belt jitter;
# noisy_sensors: sensor noise and actuator lag; gripper_faults: fault draws).
SITES = ["lab", "fast_conveyor", "noisy_sensors", "gripper_faults", "heavy_slippery"]
N_STEPS = 50


def test_sites_under_test_exist():
    assert set(SITES) <= set(available_sites("factory"))


def _case(env_id, site, obs_mode, policy, seed, n_steps=60, max_steps=40):
    # max_steps < n_steps: every rollout crosses an unseeded reset.
    return {
        "env_id": env_id,
        "kwargs": {"site": site, "obs_mode": obs_mode, "max_steps": max_steps},
        "seed": seed,
        "n_steps": n_steps,
        "policy": policy,
    }


def _short_cases(env_id):
    return [
        _case(env_id, "lab", "state", "random", 100),
        _case(env_id, "lab", "goal", "expert", 101),
        _case(env_id, "fast_conveyor", "state", "random", 102),
        _case(env_id, "noisy_sensors", "goal", "expert", 103),
        _case(env_id, "gripper_faults", "state", "expert", 104),
        _case(env_id, "heavy_slippery", "goal", "random", 105),
        _case(env_id, "noisy_sensors", "rgb", "random", 106, n_steps=12, max_steps=8),
    ]


def _long_cases(env_id):
    return [
        _case(env_id, site, obs_mode, policy, 200 + k, n_steps=400, max_steps=150)
        for k, site in enumerate(SITES)
        for obs_mode, policy in (("state", "random"), ("goal", "expert"))
    ] + [_case(env_id, "fast_conveyor", "rgb", "expert", 7, n_steps=80, max_steps=60)]


def _check_fresh_processes(cases, run_python, helpers):
    first, second = run_python(Path(helpers.__file__), json.dumps(cases), procs=2, timeout=900)
    here = [helpers.run_case(case) for case in cases]  # and this (pytest) process, after other tests
    for case, a, b, c in zip(cases, first, second, here, strict=True):
        assert a == b == c, f"{case}: {a} / {b} / {c}"
    assert all(r["resets"] > 0 for r in here), "some rollout never crossed an episode end"


@pytest.mark.timeout(600)
def test_bit_identical_in_fresh_processes(env_id, run_python, helpers):
    _check_fresh_processes(_short_cases(env_id), run_python, helpers)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bit_identical_in_fresh_processes_long(env_id, run_python, helpers):
    _check_fresh_processes(_long_cases(env_id), run_python, helpers)


@pytest.mark.timeout(600)
def test_bit_identical_whatever_simd_kernels(env_id, run_python, helpers):
    """Episodes do not depend on the kernels NumPy and OpenBLAS pick for the CPU (regression)."""
    cases = [
        _case(env_id, "lab", "goal", "expert", 101, n_steps=120, max_steps=100),
        _case(env_id, "gripper_faults", "state", "expert", 104, n_steps=120, max_steps=100),
        _case(env_id, "heavy_slippery", "state", "random", 105, n_steps=120, max_steps=100),
        _case(env_id, "noisy_sensors", "goal", "expert", 103, n_steps=120, max_steps=100),  # lag
    ]
    helpers.check_whatever_simd_kernels(cases, run_python)


def _record(helpers, env, seed, policy="random", n=N_STEPS, action_seed=None):
    """One episode (at most ``n`` steps) from ``reset(seed=seed)``; actions seeded by ``action_seed``."""
    action_seed = seed if action_seed is None else action_seed
    assert action_seed is not None
    return helpers.rollout(env, seed, helpers.make_policy(policy, env, n, action_seed), n, reset_on_end=False)


#: Episodes run in an env before it is reset with seed 1 again: (seed, policy, steps).
PRIORS = {
    "other_seed": [(2, "random", N_STEPS)],
    "same_seed": [(1, "random", N_STEPS)],
    "same_seed_one_step": [(1, "random", 1)],  # what gymnasium's check_step_determinism does
    "several": [(5, "expert", N_STEPS), (None, "random", 30), (1, "expert", 3), (3, "random", 20)],
}


def _check_after_priors(env_id, make_env, helpers, site, policy):
    kwargs = {"site": site, "obs_mode": "goal", "max_steps": N_STEPS}
    reference = _record(helpers, make_env(env_id, **kwargs), 1, policy)
    failures = {}
    for name, prior in PRIORS.items():
        env = make_env(env_id, **kwargs)
        for seed, prior_policy, n in prior:
            _record(helpers, env, seed, prior_policy, n, action_seed=77)
        diff = helpers.first_difference(reference, _record(helpers, env, 1, policy))
        if diff is not None:
            failures[name] = diff
    assert failures == {}, f"reset(seed=1) after prior episodes differs from a fresh env: {failures}"


@pytest.mark.parametrize(
    ("site", "policy"),
    [("lab", "random"), ("lab", "expert"), ("fast_conveyor", "random"), ("noisy_sensors", "random")],
)
def test_same_seed_after_prior_episodes(env_id, make_env, helpers, site, policy):
    """Seed 1 in a fresh env == seed 1 after other episodes (other seeds, or seed 1 itself) in one env."""
    _check_after_priors(env_id, make_env, helpers, site, policy)


@pytest.mark.slow
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("policy", ["random", "expert"])
def test_same_seed_after_prior_episodes_all_sites(env_id, make_env, helpers, site, policy):
    _check_after_priors(env_id, make_env, helpers, site, policy)


@pytest.mark.parametrize("site", ["lab", "fast_conveyor", "noisy_sensors"])
def test_seeded_then_unseeded_reset_reproducible(env_id, make_env, helpers, site):
    """Two envs doing reset(seed=s), steps, reset(), steps, reset(), steps agree exactly."""
    records = []
    for _ in range(2):
        env = make_env(env_id, site=site, obs_mode="goal", max_steps=N_STEPS)
        recs = [_record(helpers, env, 11, "random", 40)]
        recs += [_record(helpers, env, None, "random", 40, action_seed=k) for k in range(2)]
        records.append(recs)
    for k, (a, b) in enumerate(zip(*records, strict=True)):
        assert helpers.first_difference(a, b) is None, f"episode {k}: {helpers.first_difference(a, b)}"
    # The unseeded resets continue the stream: three different episodes.
    starts = [r.obs[0]["observation"] for r in records[0]]
    assert not np.array_equal(starts[0], starts[1]) and not np.array_equal(starts[1], starts[2])
    if site != "lab":
        params = [json.dumps(r.infos[0]["site_params"], sort_keys=True) for r in records[0]]
        assert len(set(params)) == 3, f"site parameters not redrawn at unseeded resets: {params}"


def test_different_seeds_differ(env_id, make_env):
    """Sanity check that the determinism tests can fail: the seed does change the episode."""
    env = make_env(env_id, site="noisy_sensors")
    starts = [env.reset(seed=s) for s in range(4)]
    for (o1, _), (o2, _) in zip(starts, starts[1:], strict=False):
        assert not np.array_equal(o1, o2)
    assert len({json.dumps(i["site_params"], sort_keys=True) for _, i in starts}) > 1


def test_global_rngs_do_not_matter(env_id, make_env, helpers):
    """Only reset(seed) matters, not numpy's or Python's global random state."""
    np.random.seed(1)  # noqa: NPY002  (the legacy global state is what must not matter)
    random.seed(1)
    a = _record(helpers, make_env(env_id, site="fast_conveyor"), 3)
    np.random.seed(12345)  # noqa: NPY002
    random.seed(999)
    b = _record(helpers, make_env(env_id, site="fast_conveyor"), 3)
    assert helpers.first_difference(a, b) is None, helpers.first_difference(a, b)


# ------------------------------------------------------------- whole episodes after a varied history
class _HoldPolicy:
    """The env's "hold still" action every step (the peg stays in the hand until the time limit)."""

    def __call__(self, env):
        return env.unwrapped._hold_action()


class _ReleasePolicy:
    """Lifts the hand with the gripper open: a held peg falls (``dropped``)."""

    def __call__(self, env):
        return np.array([0.0, 0.0, 0.5, 1.0], dtype=np.float32)


class _GraspPolicy:
    """Conveyor tasks: the expert until a part is in the hand, then lift it and hold it (``timeout``),
    or carry it towards the robot and open the hand over the floor (``dropped``)."""

    def __init__(self, helpers, env, seed, then):
        self.expert = helpers.ExpertPolicy(env, noise_std=0.0, seed=seed)
        self.then = then
        self.t = None  # steps since the grasp

    def __call__(self, env):
        u = env.unwrapped
        if self.t is None and not any(u.grasped(i) for i in range(u.n_parts)):
            return self.expert(env)
        self.t = 0 if self.t is None else self.t + 1
        if self.then == "hold" or self.t < 12:
            return np.array([-1.0 if self.then == "drop" else 0.0, 0.0, 0.5, -1.0], dtype=np.float32)
        return np.array([0.0, 0.0, 0.0, 1.0], dtype=np.float32)


#: Per env: the site, and a pair of seeds (prior, target) of noisy-expert episodes run to their end.
#: With the old reset (a snapshot restored into the world that ran the episodes before) PickPlace's
#: target episode right after its prior differed from the same episode in a fresh env from step 23
#: (by 3e-5 m; found by running 30 seeds in shuffled orders in one env): Bullet's broadphase pair
#: cache, its cleanup cursor and the order of the contact manifolds (the order the solver treats
#: contacts in) survive ``restoreState``. No such pair was found for Sort (20 seeds) and PegInsert
#: (25 seeds): their cases check the same property without a known failure of the old reset.
HISTORY_CASES = {
    "loopsim/FactoryPickPlace-v0": ("fast_conveyor", 24, 25),
    "loopsim/FactorySort-v0": ("lab", 3, 4),
    "loopsim/FactoryPegInsert-v0": ("lab", 22, 23),
}
EXPERT_NOISE = 0.3


def _to_end(helpers, env, seed, policy):
    """One episode from ``reset(seed=seed)`` to its end (the env's time limit at the latest)."""
    return helpers.rollout(env, seed, policy, 10_000, reset_on_end=False)


def _noisy_expert(helpers, env, seed):
    return helpers.ExpertPolicy(env, noise_std=EXPERT_NOISE, seed=seed)


def _ending(rec):
    if not (rec.terminated[-1] or rec.truncated[-1]):
        return "abandoned"
    return "success" if rec.infos[-1]["is_success"] else rec.infos[-1]["failure_mode"]


@pytest.mark.timeout(900)
def test_episode_to_its_end_after_varied_history(env_id, make_env, helpers):
    """A whole episode (every observation, reward, flag and info) is the same after any history.

    In one env: a noisy expert episode, the target episode (checked), then episodes ending in each
    way (part pushed off the belt or peg released; a part carried off and dropped; held until the
    time limit), one abandoned after a few steps and an unseeded one, and the target again (checked).
    """
    site, prior_seed, seed = HISTORY_CASES.get(env_id, ("lab", 1, 2))
    env = make_env(env_id, site=site)
    reference = _to_end(helpers, env, seed, _noisy_expert(helpers, env, seed))
    assert len(reference.rewards) > 10, "the target episode should be a real one"

    env = make_env(env_id, site=site)
    history = [_to_end(helpers, env, prior_seed, _noisy_expert(helpers, env, prior_seed))]
    got = _to_end(helpers, env, seed, _noisy_expert(helpers, env, seed))
    diff = helpers.first_difference(reference, got)
    assert diff is None, f"seed {seed} right after seed {prior_seed}: {diff}"

    if hasattr(env.unwrapped, "part_positions"):  # conveyor tasks
        enders = [helpers.PushOffBeltPolicy(), _GraspPolicy(helpers, env, 12, "drop"),
                  _GraspPolicy(helpers, env, 13, "hold")]
    else:
        enders = [_ReleasePolicy(), _HoldPolicy()]
    history += [_to_end(helpers, env, 11 + k, policy) for k, policy in enumerate(enders)]
    history += [
        helpers.rollout(env, 17, helpers.RandomPolicy(7, 17), 7, reset_on_end=False),
        helpers.rollout(env, None, helpers.RandomPolicy(30, 18), 30, reset_on_end=False),
    ]
    endings = [_ending(r) for r in history]
    assert {"success", "dropped", "timeout", "abandoned"} <= set(endings), endings
    got = _to_end(helpers, env, seed, _noisy_expert(helpers, env, seed))
    diff = helpers.first_difference(reference, got)
    assert diff is None, f"seed {seed} after episodes ending {endings}: {diff}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("site", ["lab", "fast_conveyor", "heavy_slippery"])
def test_seeds_in_any_order_give_the_same_episodes(env_id, make_env, helpers, site):
    """Noisy-expert episodes of 12 seeds run to their end, forwards in one env and backwards in
    another: every seed's episode is bit-identical (what worker processes of a collection see)."""
    seeds = list(range(40, 52))
    digests = []
    for order in (seeds, seeds[::-1]):
        env = make_env(env_id, site=site)
        digests.append({s: helpers.digest(_to_end(helpers, env, s, _noisy_expert(helpers, env, s)))
                        for s in order})
    differ = [s for s in seeds if digests[0][s] != digests[1][s]]
    assert differ == [], f"seeds whose episode depends on the episodes run before it: {differ}"


def test_fresh_world_false_only_restores_the_snapshot(make_env, helpers):
    """``fresh_world=False`` (the old reset, for throughput) starts like a fresh env but carries
    Bullet's collision caches over: the known pair of PickPlace episodes then differs, which is
    what the default rebuild prevents."""
    env_id = "loopsim/FactoryPickPlace-v0"
    site, prior_seed, seed = HISTORY_CASES[env_id]
    with pytest.raises(ValueError, match="fresh_world='yes' must be True or False"):
        make_env(env_id, fresh_world="yes")
    env = make_env(env_id, site=site)
    reference = _to_end(helpers, env, seed, _noisy_expert(helpers, env, seed))
    fast = make_env(env_id, site=site, fresh_world=False)
    first = _to_end(helpers, fast, seed, _noisy_expert(helpers, fast, seed))
    assert helpers.first_difference(reference, first) is None  # a new env: nothing to carry over
    _to_end(helpers, fast, prior_seed, _noisy_expert(helpers, fast, prior_seed))
    again = _to_end(helpers, fast, seed, _noisy_expert(helpers, fast, seed))
    assert helpers.first_difference(reference, again) is not None, (
        "restoring the snapshot into a used world no longer changes this episode: check whether this "
        "PyBullet still keeps collision caches across restoreState (the default rebuild may be moot)"
    )
