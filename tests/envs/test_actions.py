"""Action checks: NaN, inf and wrong shapes are refused before any physics; out-of-range is clipped."""

from __future__ import annotations

import numpy as np
import pytest

BAD_VALUES = [np.nan, np.inf, -np.inf]


def _state(env, helpers):
    u = env.unwrapped
    return helpers.physics_snapshot(u.sim.id), u.np_random.bit_generator.state, u._elapsed


@pytest.mark.filterwarnings("ignore:.*step\\(\\) after the episode ended")  # PegInsert ends early
@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("index", [0, 3])
def test_non_finite_action_raises_and_changes_nothing(env_id, make_env, helpers, bad, index):
    actions = helpers.random_actions(12, seed=4, dim=helpers.action_dim(env_id))
    site = helpers.noisy_site(env_id)  # per-step draws (factory: also action lag): any slip shows
    reference = make_env(env_id, site=site)
    env = make_env(env_id, site=site)
    reference.reset(seed=2)
    env.reset(seed=2)
    for a in actions[:6]:
        reference.step(a)
        env.step(a)
    before = _state(env, helpers)
    bad_action = actions[6].copy()
    bad_action[min(index, len(bad_action) - 1)] = bad
    with pytest.raises(ValueError, match="finite") as excinfo:
        env.step(bad_action)
    assert "action" in str(excinfo.value)
    after = _state(env, helpers)
    assert after[0] == before[0], "the physics state changed"
    assert after[1] == before[1], "the env's random generator advanced"
    assert after[2] == before[2], "the step counter advanced"
    # The refused action left no trace: the env continues exactly like one that never saw it.
    for a in actions[6:]:
        o1, r1, te1, tr1, i1 = reference.step(a)
        o2, r2, te2, tr2, i2 = env.step(a)
        assert helpers.obs_equal(o1, o2) and r1 == r2 and (te1, tr1) == (te2, tr2) and i1 == i2


@pytest.mark.parametrize(
    "action",
    [np.zeros(3), np.zeros(5), np.zeros((1, 4)), np.zeros((2, 2)), np.float32(0.0), [], [0.0, 0.0, 0.0]],
    ids=["(3,)", "(5,)", "(1,4)", "(2,2)", "scalar", "empty", "list3"],
)
def test_wrong_shape_raises(env_id, make_env, helpers, action):
    env = make_env(env_id)
    env.reset(seed=0)
    before = _state(env, helpers)
    with pytest.raises(ValueError, match="shape"):
        env.step(action)
    assert _state(env, helpers) == before


def test_non_numeric_action_raises(env_id, make_env):
    env = make_env(env_id)
    env.reset(seed=0)
    with pytest.raises((ValueError, TypeError)):
        env.step(["a", "b", "c", "d"])


@pytest.mark.parametrize("where", ["int list", "float list", "tuple", "nested"])
def test_a_bool_inside_a_list_action_is_refused(env_id, make_env, helpers, where):
    """A bool array was refused but NumPy reads ``[True, 0, 0, 0]`` as integers and ``[True, 0.5]``
    as floats, so True stepped as 1.0; the step docstring refuses bools."""
    dim = helpers.action_dim(env_id)
    action = {
        "int list": [True] + [0] * (dim - 1),
        "float list": [0.5] * (dim - 1) + [np.True_],
        "tuple": (0.0, False) + (0.0,) * (dim - 2),
        "nested": [[0.0] * (dim - 1) + [True]],  # also the wrong shape; the bool is named first
    }[where]
    env = make_env(env_id)
    env.reset(seed=0)
    before = _state(env, helpers)
    with pytest.raises(ValueError, match="got a bool in"):
        env.step(action)
    assert _state(env, helpers) == before


@pytest.mark.filterwarnings("ignore:.*step\\(\\) after the episode ended")  # PegInsert ends early
def test_out_of_range_actions_are_clipped(env_id, make_env, helpers):
    """An action outside [-1, 1] behaves exactly like its clipped value."""
    actions = helpers.random_actions(20, seed=5, dim=helpers.action_dim(env_id))
    scaled = actions * np.float32(3.0)
    a, b = make_env(env_id), make_env(env_id)
    a.reset(seed=1)
    b.reset(seed=1)
    for big in scaled:
        o1, r1, *_ = a.step(big)
        o2, r2, *_ = b.step(np.clip(big, -1.0, 1.0))
        assert helpers.obs_equal(o1, o2) and r1 == r2


def test_action_dtypes_and_lists_accepted(env_id, make_env, helpers):
    """float32, float64 and plain lists of the same values give the same step."""
    action = helpers.random_actions(1, seed=6, dim=helpers.action_dim(env_id))[0]
    results = []
    for variant in (action, action.astype(np.float64), action.tolist()):
        env = make_env(env_id)
        env.reset(seed=3)
        results.append(env.step(variant)[0])
    assert helpers.obs_equal(results[0], results[1]) and helpers.obs_equal(results[0], results[2])


def test_step_before_reset_raises(env_id):
    from loopsim.envs import env_class

    env = env_class(env_id)()
    try:
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(4, dtype=np.float32))
    finally:
        env.close()
