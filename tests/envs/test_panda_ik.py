"""The Panda's plain-float damped-least-squares IK: agrees with NumPy, factorises at singular poses,
and its damping is checked before anything is loaded."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from loopsim.envs.core.panda import (
    ARM_LOWER,
    ARM_UPPER,
    DAMPING_RANGE,
    Panda,
    _cholesky_solve,
    _damped_gram_cholesky,
)
from loopsim.envs.core.sim import Simulation

#: Elbow straight (joint 4 at its upper limit 0) with joints 2 and 6 at 0: a singular arm Jacobian
#: (found by a break-it pass: a damping of 1e-9 failed the Cholesky here).
STRAIGHT = [2.3, 0.0, -0.915, 0.0, 0.949, 0.0, 2.689]


@pytest.fixture
def sim():
    s = Simulation(1 / 240, 10, renderer=False)
    yield s
    s.close()


def _jacobian(arm: Panda, q) -> list[list[float]]:
    """The arm Jacobian (6 x 7) at joint positions ``q`` (7 floats [rad], fingers at 0.02 m), from the
    same PyBullet call the arm's IK uses."""
    lin, ang = arm._jacobian([*q, 0.02, 0.02], arm._zeros, arm._zeros)
    return [list(row[:7]) for row in (*lin, *ang)]


def _solve(jac, damping: float, rhs) -> np.ndarray:
    return np.array(_cholesky_solve(_damped_gram_cholesky(jac, damping * damping), rhs))


def test_solve_is_backward_stable_on_random_and_singular_jacobians(sim):
    """``y`` solves ``(J J^T + lambda^2 I) y = b`` to a backward error of a few eps (a NumPy solve's own),
    and is close to NumPy's where the system is well conditioned."""
    rng = np.random.default_rng(0)
    arm = Panda(sim)
    jacs = [rng.normal(size=(6, 7)) for _ in range(100)]
    jacs += [(rng.normal(size=(6, 3)) @ rng.normal(size=(3, 7))) for _ in range(100)]  # rank 3
    poses = [STRAIGHT] + [rng.uniform(ARM_LOWER, ARM_UPPER) for _ in range(100)]
    for q in poses[1:51]:
        q[3] = 0.0  # straight elbow
    jacs += [np.array(_jacobian(arm, q)) for q in poses]
    worst_backward = worst_forward = 0.0
    for jac in jacs:
        for damping in (DAMPING_RANGE[0], 0.02, 1.0):
            a = jac @ jac.T + damping**2 * np.eye(6)
            rhs = rng.normal(size=6) * 10.0 ** rng.uniform(-6, 1)
            got = _solve(jac.tolist(), damping, rhs.tolist())
            assert np.all(np.isfinite(got))
            worst_backward = max(worst_backward, np.linalg.norm(a @ got - rhs) / (
                np.linalg.norm(a, 2) * np.linalg.norm(got) + np.linalg.norm(rhs)))
            if np.linalg.cond(a) < 1e4:
                ref = np.linalg.solve(a, rhs)
                worst_forward = max(worst_forward, np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert worst_backward < 1e-15
    assert worst_forward < 1e-12


def test_smallest_damping_factorises_at_straight_elbows(sim):
    rng = np.random.default_rng(1)
    arm = Panda(sim)
    smallest = float("inf")
    for t in range(300):
        q = STRAIGHT if t == 0 else rng.uniform(ARM_LOWER, ARM_UPPER)
        q = list(q)
        q[3] = 0.0
        if t % 2:
            q[5] = 0.0  # wrist aligned too
        if t % 3 == 0:
            q[1] = 0.0
        chol = _damped_gram_cholesky(_jacobian(arm, q), DAMPING_RANGE[0] ** 2)
        smallest = min(smallest, *(row[-1] for row in chol))
    # a singular pose leaves a pivot of ~lambda = 1e-4, far above the rounding errors (~1e-7 here)
    assert DAMPING_RANGE[0] / 2 < smallest < 1e-3


def test_arm_at_a_straight_elbow_moves_with_the_smallest_damping(sim):
    arm = Panda(sim, damping=DAMPING_RANGE[0])
    for j, v in enumerate(STRAIGHT):
        sim.bc.resetJointState(arm.body, j, v)
    arm.read_state(forward_kinematics=True)
    error = np.array([0.01, -0.005, 0.002])
    targets = arm._ik_step(error.tolist(), max_step=0.1)
    assert all(math.isfinite(v) for v in targets)
    dq = np.array(targets) - STRAIGHT
    assert np.abs(dq).max() > 1e-3  # it moves...
    linear = np.array(_jacobian(arm, STRAIGHT))[:3]
    assert (linear @ dq) @ error > 0.5 * error @ error  # ...towards the target, to first order


class _FloatComparesTrue(float):
    """A float whose comparisons all say True (Python tries a subclass's reflected ones first)."""

    def __le__(self, other):
        return True

    __ge__ = __lt__ = __gt__ = __le__


class _FloatConvertsElsewhere(float):
    """A float whose ``float()`` is another value (1e-12) than the one it compares as."""

    def __float__(self):
        return 1e-12


@pytest.mark.parametrize(
    "damping",
    [0, -0.0, -0.02, float("nan"), float("inf"), 1e-9, 1e-200, 1e3, 1e200, True, np.bool_(True), "0.02",
     None, 10**400, Fraction(1, 10**400), np.float32(1e-4), _FloatConvertsElsewhere(0.02),
     _FloatComparesTrue(1e-9), _FloatComparesTrue(1e300)],
)
def test_bad_damping_is_refused_before_the_arm_is_loaded(sim, damping):
    with pytest.raises(ValueError, match=r"damping=.* must be a real number in \[0\.0001, 100\]"):
        Panda(sim, damping=damping)
    assert sim.bc.getNumBodies() == 0


@pytest.mark.parametrize(
    "damping",
    [np.float32(0.02), np.float64(0.5), np.int64(1), Fraction(1, 50), DAMPING_RANGE[0], DAMPING_RANGE[1]],
)
def test_any_real_damping_in_range_is_accepted(sim, damping):
    arm = Panda(sim, damping=damping)
    arm.read_state(forward_kinematics=True)
    targets = arm._ik_step((0.01, -0.005, 0.002), max_step=0.1)
    assert type(arm.damping) is float and all(type(v) is float and math.isfinite(v) for v in targets)
