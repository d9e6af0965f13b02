"""``loopsim/FactoryPegInsert-v0``: insert a held square peg into a tight hole, to a target depth.

Scene (world frame, metres): a fixture block stands on the floor, its top face at ``z = FIXTURE_TOP``,
with a square blind hole of side ``2 * HOLE_HALF`` and depth ``HOLE_DEPTH`` through the centre of its
top face, the hole's sides parallel to the world axes. The fixture is one static body made of boxes
(a base under the hole and four walls around it). The peg is a square bar of side ``2 * PEG_HALF``
and length ``2 * PEG_HALF_LENGTH``; it starts held between the Panda's fingers (which close along
world y), grasped near its upper end so that more than the target depth can go into the hole.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pybullet as p

from loopsim.envs.core.env import Evaluation
from loopsim.envs.core.expert import Expert
from loopsim.envs.factory.base import MAX_DISPLACEMENT, FactoryEnv

__all__ = ["FactoryPegInsertEnv", "FactoryPegInsertExpert"]

#: Height of the fixture's top face above the floor [m].
FIXTURE_TOP = 0.10
#: Half side of the fixture block [m].
FIXTURE_HALF = 0.05
#: Half side of the square hole [m] (24 mm hole).
HOLE_HALF = 0.012
#: Depth of the hole below the fixture top [m].
HOLE_DEPTH = 0.035
#: Half side of the square peg [m] (20 mm peg: 2 mm clearance per side).
PEG_HALF = 0.01
#: Half length of the peg [m] (90 mm peg).
PEG_HALF_LENGTH = 0.045
#: Radial clearance between the peg and the hole walls [m].
CLEARANCE = HOLE_HALF - PEG_HALF
#: Depth of the peg tip below the fixture top that counts as inserted [m].
TARGET_DEPTH = 0.03
#: Tolerance on the depth [m]: inserted means ``depth >= TARGET_DEPTH - DEPTH_TOL``.
DEPTH_TOL = 0.002
#: Largest tilt of the peg axis from vertical that counts as aligned [rad] (5 degrees).
MAX_TILT = math.radians(5.0)
_COS_MAX_TILT = math.cos(MAX_TILT)
#: Largest distance of the tip from the hole axis, in x and in y, that counts as inserted [m].
AXIS_TOL = CLEARANCE + 0.0005
#: Squeeze of the fingers into the peg at reset [m]: the width they settle at under grip force.
GRIP_SQUEEZE = 0.0004
#: Distance between the peg centre and the end effector beyond which the peg is out of the grip [m]
#: (nominally 0.010 to 0.025 m).
DROP_DISTANCE = 0.05
#: Fixture position range: centre x and y [m].
FIXTURE_X, FIXTURE_Y = (0.45, 0.60), (-0.15, 0.15)
#: Where the peg and the fixture are built (and sit in the scene snapshot), clear of everything [m].
PEG_PARK, FIXTURE_PARK = (1.5, 0.0, 0.5), (1.5, 0.5, FIXTURE_TOP)


class FactoryPegInsertEnv(FactoryEnv):
    """Insert a square peg held in the gripper into a square hole with 2 mm clearance per side.

    **Description.** A Franka Panda holds a 20 x 20 x 90 mm square peg (red) between its closed
    fingers, above a fixture block (grey, 100 x 100 mm, 100 mm tall) on the floor. The fixture has a
    24 x 24 mm square hole, 35 mm deep, in the centre of its top face, its sides parallel to the world
    axes (the gripper's yaw is fixed, so peg and hole are always square to each other). The robot must
    bring the peg tip over the hole, align it within the 2 mm clearance and push it in to a depth of
    30 mm, upright. Contact with the rim tilts the peg in the grip or wedges it; slippery or heavy pegs
    slip in the fingers.

    **Randomizations** (from ``env.np_random`` at reset): fixture centre x in [0.45, 0.60] m, y in
    [-0.15, 0.15] m; end-effector start 0.08 to 0.15 m above the fixture top and up to 0.10 m off the
    hole axis in x and y; the grasp: peg offset along the fingers (x) in [-4, 4] mm and its top
    20 to 35 mm above the end effector; plus every site parameter (see ``loopsim envs`` and
    ``configs/sites/factory/``; ``part_mass`` and ``part_friction`` are the peg's).

    **Success.** The peg tip (centre of its lower face) is at least 28 mm (30 mm minus a 2 mm
    tolerance) below the fixture top, within 2.5 mm (the clearance plus 0.5 mm) of the hole axis in
    x and in y, and the peg axis is within 5 degrees of vertical. The peg need not still be held.

    **Episode end.** ``terminated`` on success or on the unrecoverable failure ``dropped`` (the peg
    left the grip: its centre is more than 0.05 m from the end effector). ``truncated`` after
    ``max_steps`` (default 100 control steps = 4 s) with failure mode ``jammed`` when the peg tip is
    over the hole mouth (peg footprint overlapping the hole) and at most 10 mm above the fixture top,
    stuck on the rim or wedged part-way in, else ``timeout``.

    **Observation** (``state``, float32, ``(22,)``): end-effector position (3) [m], velocity (3)
    [m/s], finger opening (1) [m]; peg tip position (3) [m]; peg tip relative to the hole target (3)
    [m]; peg tip relative to the end effector (3) [m]; peg axis, the unit vector from tip to top (3)
    [-]; hole target, the point on the hole axis at the target depth (3) [m]. Positions of the peg
    tip and of the hole carry the site's sensor noise (the hole is perceived, not known); the peg axis
    is noise-free. All world frame. ``goal`` mode: ``achieved_goal`` = peg tip position,
    ``desired_goal`` = hole target, ``(3,)`` [m]. ``rgb``: a fixed oblique camera on the fixture area.

    **Action** ``(4,)`` in [-1, 1]: end-effector displacement (dx, dy, dz) x 0.02 m and the gripper
    opening ``0.04 * (g + 1)`` m (keep it closed, ``g = -1``, to hold the peg). With
    ``block_gripper=True`` the action is ``(3,)``, (dx, dy, dz) x 0.02 m, and the fingers are always
    commanded closed with the site's grip force (the action ``g = -1``, bit for bit): the policy cannot
    open the gripper. The peg can still leave the grip physically: pushed hard against the fixture or
    the floor it slides up or turns in the fingers (and can wedge them apart), and a gripper fault
    (``gripper_fault_prob``) removes the grip force for 3 steps. Under uniform random actions at
    ``lab`` it is seldom lost (4 of 30 episodes, seeds 0-29 with actions drawn from the episode seed,
    dropped it, at steps 22, 59, 78 and 86), where the unblocked env drops it within 2 to 9 steps.

    **Rewards.** ``dense``: minus the distance from the peg tip to the hole target [m]; ``sparse``: 0
    when the tip is within 2.5 mm of the hole axis in x and y and within 7 mm of the target depth
    (23 mm deep down to the hole bottom), else -1; every successful state has sparse reward 0.

    **Version history.** v0: initial version; ``block_gripper`` added (default ``False`` leaves every
    episode unchanged).
    """

    expert_entry_point: ClassVar[str] = "loopsim.envs.factory.peg_insert:FactoryPegInsertExpert"
    default_max_steps: ClassVar[int] = 100
    #: A closer, oblique camera than the conveyor tasks': the fixture and peg fill the 84 px image.
    camera: ClassVar[tuple[tuple[float, float, float], tuple[float, float, float], float]] = (
        (1.0, 0.25, 0.6),
        (0.52, 0.0, 0.08),
        40.0,
    )
    goal_distance_threshold: ClassVar[float] = 0.006
    #: Sparse-reward tolerance around the hole target (x, y, z) [m]: the success tolerance on the axis,
    #: and the depth from the target to the hole bottom plus 2 mm (contact penetration), plus 0.1 mm
    #: for float32 goals, so every successful state has sparse reward 0.
    goal_box: ClassVar[tuple[float, float, float]] = (
        AXIS_TOL + 1e-4,
        AXIS_TOL + 1e-4,
        HOLE_DEPTH - TARGET_DEPTH + 0.002 + 1e-4,
    )

    def __init__(self, *args: Any, block_gripper: bool = False, **kwargs: Any) -> None:
        """Build the env; ``block_gripper`` is this task's own keyword, the rest are :class:`RobotTaskEnv`'s.

        Args:
            *args: Positional arguments of :class:`loopsim.envs.core.env.RobotTaskEnv`.
            block_gripper: Hold the gripper closed on the peg and drop the gripper command from the
                action, which becomes ``(3,)`` float32 in ``[-1, 1]``: end-effector displacement
                (dx, dy, dz) x 0.02 m (panda-gym's ``Panda(block_gripper=True)``; the usual
                formulation of insertion for RL). The fingers are commanded closed (target opening
                0 m) with the site's ``gripper_force`` [N] at every step, exactly as the action
                ``g = -1`` does: a blocked episode is bit-identical to the unblocked one whose
                actions end in ``-1``. The site's ``gripper_fault_prob`` still applies (a fault
                drops the finger force to 0 N for 3 control steps), so the peg can still slip or
                fall (``dropped``) at ``gripper_faults`` or with heavy, slippery pegs.
            **kwargs: Keyword arguments of :class:`loopsim.envs.core.env.RobotTaskEnv`.

        Raises:
            ValueError: If ``block_gripper`` is not a bool (or NumPy bool); and what
                :class:`RobotTaskEnv` raises.
        """
        if not isinstance(block_gripper, bool | np.bool_):
            raise ValueError(f"block_gripper={block_gripper!r} must be True or False")
        self.block_gripper = bool(block_gripper)
        self.action_dim = 3 if self.block_gripper else 4
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ scene
    def _load_task_scene(self) -> None:
        # Fixture: a base slab under the hole and four walls around it; origin at the centre of the
        # top face. The two walls along x span the full width; the two along y fill the gap between.
        base_h = 0.5 * (FIXTURE_TOP - HOLE_DEPTH)
        wall_h = 0.5 * HOLE_DEPTH
        wall_t = 0.5 * (FIXTURE_HALF - HOLE_HALF)  # half thickness of a wall
        wall_c = HOLE_HALF + wall_t  # wall centre offset from the hole axis
        boxes = [
            ((FIXTURE_HALF, FIXTURE_HALF, base_h), (0.0, 0.0, -HOLE_DEPTH - base_h)),
            ((FIXTURE_HALF, wall_t, wall_h), (0.0, wall_c, -wall_h)),
            ((FIXTURE_HALF, wall_t, wall_h), (0.0, -wall_c, -wall_h)),
            ((wall_t, HOLE_HALF, wall_h), (wall_c, 0.0, -wall_h)),
            ((wall_t, HOLE_HALF, wall_h), (-wall_c, 0.0, -wall_h)),
        ]
        self.fixture = self.sim.create_compound(
            boxes, FIXTURE_PARK, rgba=(0.45, 0.47, 0.5, 1.0), lateral_friction=0.6
        )
        self.peg = self.sim.create_box(
            (PEG_HALF, PEG_HALF, PEG_HALF_LENGTH), PEG_PARK, mass=0.1, rgba=(0.85, 0.2, 0.15, 1.0)
        )
        cid = self.sim.id
        self._get_pose = functools.partial(p.getBasePositionAndOrientation, self.peg, physicsClientId=cid)
        self._reset_pose = functools.partial(p.resetBasePositionAndOrientation, physicsClientId=cid)
        self._reset_velocity = functools.partial(p.resetBaseVelocity, physicsClientId=cid)
        self._change_dynamics = functools.partial(p.changeDynamics, physicsClientId=cid)
        # A placeholder episode so spaces and goals can be computed before the first reset.
        self._set_hole(FIXTURE_PARK[0], FIXTURE_PARK[1])
        self._read_task_state()

    def _set_hole(self, x: float, y: float) -> None:
        """Record the hole of the episode: axis at (x, y) [m], world frame."""
        self._hole_t = (x, y, FIXTURE_TOP)
        self._desired_t = (x, y, FIXTURE_TOP - TARGET_DEPTH)
        self._hole = np.array(self._hole_t)
        self._desired = np.array(self._desired_t)

    def _apply_task_site(self, params: Mapping[str, float | int]) -> None:
        self._change_dynamics(
            self.peg,
            -1,
            mass=float(params["part_mass"]),
            lateralFriction=float(params["part_friction"]),
            spinningFriction=0.001,
            rollingFriction=0.0001,
        )

    def _initialize_episode(self, rng: np.random.Generator) -> None:
        hx, hy = rng.uniform(*FIXTURE_X), rng.uniform(*FIXTURE_Y)
        self._reset_pose(self.fixture, [hx, hy, FIXTURE_TOP], [0.0, 0.0, 0.0, 1.0])
        self._set_hole(hx, hy)
        ee = (hx + rng.uniform(-0.1, 0.1), hy + rng.uniform(-0.1, 0.1), FIXTURE_TOP + rng.uniform(0.08, 0.15))
        self.robot.reset_joints(ee, finger_width=2 * PEG_HALF - GRIP_SQUEEZE)
        ex, ey, ez = self.robot.ee_pos_list
        grasp_x = rng.uniform(-0.004, 0.004)
        top = rng.uniform(0.02, 0.035)
        self._reset_pose(self.peg, [ex + grasp_x, ey, ez + top - PEG_HALF_LENGTH], [0.0, 0.0, 0.0, 1.0])
        self._reset_velocity(self.peg, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0])

    def _read_task_state(self) -> None:
        (cx, cy, cz), (qx, qy, qz, qw) = self._get_pose()
        # Peg axis: third column of the rotation matrix of the quaternion.
        ax = 2.0 * (qx * qz + qw * qy)
        ay = 2.0 * (qy * qz - qw * qx)
        az = 1.0 - 2.0 * (qx * qx + qy * qy)
        h = PEG_HALF_LENGTH
        self._center = (cx, cy, cz)
        self._axis = (ax, ay, az)
        self._tip_t = (cx - h * ax, cy - h * ay, cz - h * az)  # floats: cheap to use every step
        self._tip = np.array(self._tip_t)
        # What the robot perceives: tip and hole target with the site's sensor noise, drawn once per step.
        if self._sensor_noise > 0:
            self._seen_tip, self._seen_goal = self._noisy(np.array([self._tip_t, self._desired_t]))
        else:
            self._seen_tip, self._seen_goal = self._tip, self._desired

    # ------------------------------------------------------------------ state
    def peg_tip(self) -> np.ndarray:
        """True (noise-free) position of the peg tip, the centre of its lower face, ``(3,)`` float64 [m]."""
        return self._tip

    def peg_axis(self) -> tuple[float, float, float]:
        """Unit vector along the peg from tip to top, world frame (x, y, z) [-]."""
        return self._axis

    def peg_center(self) -> tuple[float, float, float]:
        """True position of the peg's centre of mass (x, y, z) [m], world frame."""
        return self._center

    def hole_position(self) -> np.ndarray:
        """Centre of the hole mouth (on the fixture top), ``(3,)`` float64 [m], world frame."""
        return self._hole

    def peg_tilt(self) -> float:
        """Angle between the peg axis and the vertical [rad], in [0, pi]."""
        return math.acos(min(1.0, max(-1.0, self._axis[2])))

    def insertion_depth(self) -> float:
        """Depth of the peg tip below the fixture top [m] (negative above it)."""
        return FIXTURE_TOP - float(self._tip[2])

    def _evaluate(self) -> Evaluation:
        (tx, ty, tz), (hx, hy, _) = self._tip_t, self._hole_t
        inserted = (
            FIXTURE_TOP - tz >= TARGET_DEPTH - DEPTH_TOL
            and abs(tx - hx) <= AXIS_TOL
            and abs(ty - hy) <= AXIS_TOL
            and self._axis[2] >= _COS_MAX_TILT
        )
        if inserted:
            return Evaluation(success=True, failure=None)
        (cx, cy, cz), (x, y, z) = self._center, self.robot.ee_pos_list
        ex, ey, ez = cx - x, cy - y, cz - z
        if ex * ex + ey * ey + ez * ez > DROP_DISTANCE * DROP_DISTANCE:
            return Evaluation(success=False, failure="dropped")
        return Evaluation(success=False, failure=None)

    def _timeout_failure_mode(self) -> str:
        (tx, ty, tz), (hx, hy, _) = self._tip_t, self._hole_t
        reach = HOLE_HALF + PEG_HALF  # the peg's footprint overlaps the hole mouth
        if abs(tx - hx) < reach and abs(ty - hy) < reach and tz <= FIXTURE_TOP + 0.01:
            return "jammed"
        return "timeout"

    def _state_observation(self) -> np.ndarray:
        tx, ty, tz = self._seen_tip.tolist()
        gx, gy, gz = self._seen_goal.tolist()
        ex, ey, ez = self.robot.ee_pos_list
        obs = self._robot_observation()
        obs += (tx, ty, tz, tx - gx, ty - gy, tz - gz, tx - ex, ty - ey, tz - ez, *self._axis, gx, gy, gz)
        return np.array(obs)

    def _state_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._robot_bounds()
        lo = lo + [-2.0, -2.0, -1.0] + [-3.0] * 3 + [-3.0] * 3 + [-1.0] * 3 + [-1.0] * 3
        hi = hi + [2.0, 2.0, 2.0] + [3.0] * 3 + [3.0] * 3 + [1.0] * 3 + [1.0] * 3
        return np.array(lo, dtype=np.float32), np.array(hi, dtype=np.float32)

    def achieved_goal(self) -> np.ndarray:
        """Perceived position of the peg tip (with the site's sensor noise), ``(3,)`` float64 [m]."""
        return self._seen_tip

    def desired_goal(self) -> np.ndarray:
        """Perceived hole target, ``(3,)`` float64 [m].

        On the hole axis, ``TARGET_DEPTH`` below the fixture top, with the site's sensor noise.
        """
        return self._seen_goal

    def _hold_action(self) -> np.ndarray:
        if self.block_gripper:
            return np.zeros(3, dtype=np.float32)
        return np.array([0.0, 0.0, 0.0, -1.0], dtype=np.float32)


class FactoryPegInsertExpert(Expert):
    """Brings the peg tip over the hole, aligns it, straightens the peg if it tilted, pushes it in.

    Reactive rules on privileged state (true peg tip and axis, hole position, end effector and the
    actions still in the actuator queue, which give where the tip is about to be), gripper always
    closed (``(4,)`` actions ending in -1; ``(3,)`` actions when the env has ``block_gripper=True``).
    Motion is steered by the peg tip, not the end effector, so the peg's actual offset in the grip
    (it slips, turns and tilts) is compensated; the hand never moves faster than ``SPEED``, as a jerk
    turns a heavy or slippery peg in the fingers.

    1. Above the fixture the tip goes to ``HOVER`` over the hole axis; once within ``ALIGN_TOL`` of
       the axis it descends quickly to ``MOUTH`` above the fixture, then at ``INSERT_SPEED`` to just
       past the target depth, centring on the axis as it goes (inside the hole, whatever the error).
    2. A tip at the mouth but more than ``ENTER_TOL`` off the axis rises back to ``HOVER``, straight
       up if it may be resting on the rim, before realigning.
    3. A peg tilted by more than ``TILT_FIX`` in the grip (from rim contact) is straightened before
       it goes deeper than ``STRAIGHTEN_DEPTH``: its tip is put ``PIVOT_DEPTH`` into the hole, where
       the walls hold it, and the hand moves over the tip, pivoting the peg upright in the fingers.
    4. A peg that does not turn in the fingers (wedged between them, or leaning along the direction
       they close in, where it would have to turn against the finger pads) is not straightened by
       the pivot, which then either pushes its tip into a corner of the square hole (inside the
       hole, within the clearance of both walls, but farther from the axis than the round test of
       rules 1 and 3 accepts) or presses it against a wall with the hand stopped (tip at least
       ``PINNED_OFFSET`` off the axis, hand slower than ``STALL_SPEED`` sideways). In either state,
       deeper than half ``PIVOT_DEPTH``, a peg tilted by no more than ``TILT_OK`` (what success
       tolerates) is pushed straight in where it is, the walls guiding it, instead of being lifted
       out to pivot again from the same place (a cycle until the time limit) or pushed sideways
       without end. A more tilted peg is straightened as before. Like the others, the rule reads
       only the current state.
    """

    env_type = FactoryPegInsertEnv
    #: Height of the tip above the fixture top while aligning [m].
    HOVER = 0.006
    #: Largest xy error of the tip from the hole axis to start descending [m].
    ALIGN_TOL = 0.0012
    #: Largest xy error of the tip from the hole axis to keep pushing in once at the mouth [m].
    ENTER_TOL = 0.0015
    #: Height above the fixture top below which the tip counts as at the mouth [m].
    MOUTH = 0.003
    #: Height above the fixture top below which a tip off the axis may rest on the rim [m].
    RIM = 0.001
    #: The descent aims this far past the target depth [m].
    OVERSHOOT = 0.003
    #: Feedback gain [fraction of the error per control step].
    GAIN = 0.6
    #: Largest speed of the hand [action units; 1 = 0.02 m per control step]: faster, a heavy or
    #: slippery peg turns in the grip.
    SPEED = 0.5
    #: Largest descent speed inside the hole [action units; 1 = 0.02 m per control step].
    INSERT_SPEED = 0.3
    #: Tilt of the peg above which it is straightened before insertion [rad].
    TILT_FIX = math.radians(2.5)
    #: Depth of the tip in the hole while straightening [m].
    PIVOT_DEPTH = 0.006
    #: Largest tilt that is pushed in as it is once the pivot has failed to straighten the peg [rad]:
    #: the task's success tolerance (5 degrees), so a peg this upright needs no straightening.
    TILT_OK = MAX_TILT
    #: Offset of the tip from the hole axis, in x or in y, from which it counts as pressed against a
    #: wall while straightening [m] (the clearance is 2 mm).
    PINNED_OFFSET = 0.0015
    #: Horizontal hand speed below which a pivot pressing the tip against a wall has stalled [m/s]
    #: (a pivoting hand moves at 15 to 40 mm/s).
    STALL_SPEED = 0.002
    #: Largest hand speed while straightening [action units].
    PIVOT_SPEED = 0.3
    #: Straighten only while the tip is less deep than this [m] (deeper, the walls keep it upright).
    STRAIGHTEN_DEPTH = 0.015

    def _act(self) -> np.ndarray:
        # (dx, dy, dz, g) with the gripper closed; (dx, dy, dz) when the env blocks the gripper.
        a = self._act_with_gripper()
        return a[:3] if self.env.block_gripper else a

    def _act_with_gripper(self) -> np.ndarray:
        env: FactoryPegInsertEnv = self.env
        tip, hole = env.peg_tip(), env.hole_position()
        # Where the actions still in the actuator queue (``action_delay``) will take the end effector,
        # hence the tip: steering from there keeps the loop stable under actuator lag.
        # (an explicit loop, not sum(): Python 3.12's sum() of floats compensates, 3.11's does not)
        queued = [0.0, 0.0, 0.0]
        for a in env.pending_actions:
            queued = [queued[0] + a[0], queued[1] + a[1], queued[2] + a[2]]
        pending = [v * MAX_DISPLACEMENT for v in queued]
        tip = tip + pending
        err_xy = hole[:2] - tip[:2]
        planar = math.hypot(err_xy[0], err_xy[1])
        height = tip[2] - FIXTURE_TOP  # of the tip above the fixture top [m]
        k = self.GAIN / MAX_DISPLACEMENT
        tilt = env.peg_tilt()
        pinned = False  # straightening has failed and the tilt is acceptable: push straight in
        if tilt > self.TILT_FIX and height > -self.STRAIGHTEN_DEPTH:
            pivot_z = FIXTURE_TOP - self.PIVOT_DEPTH
            in_hole = height < -0.5 * self.PIVOT_DEPTH
            off = max(abs(err_xy[0]), abs(err_xy[1]))  # the hole is square: the walls bound x and y
            if in_hole and off <= CLEARANCE + 0.001 and tilt <= self.TILT_OK:
                # The pivot has not turned the peg upright (it is wedged in the fingers): its tip is
                # in a corner of the hole, beyond the round test below (rising from there, then
                # realigning, repeats the same pivot), or pressed against a wall with the hand
                # stopped (the pivot pushes on and nothing moves).
                vx, vy, _ = env.robot.ee_vel_t
                pinned = planar > CLEARANCE + 0.001 or (
                    off >= self.PINNED_OFFSET and math.hypot(vx, vy) < self.STALL_SPEED
                )
            if in_hole and planar <= CLEARANCE + 0.001 and not pinned:  # held by the walls
                # Move the hand by the tip-to-grasp lever times the lean, back over the tip.
                ax, ay, _ = env.peg_axis()
                lever = math.dist(env.robot.ee_pos_list, env.peg_tip())
                s = self.PIVOT_SPEED
                return np.array(
                    [
                        min(max(-ax * lever * k, -s), s),
                        min(max(-ay * lever * k, -s), s),
                        min(max((pivot_z - tip[2]) * k, -s), s),
                        -1.0,
                    ]
                )
            target_z = FIXTURE_TOP - TARGET_DEPTH - self.OVERSHOOT if pinned else pivot_z
        else:
            target_z = FIXTURE_TOP - TARGET_DEPTH - self.OVERSHOOT
        inside = height < -self.MOUTH and planar <= CLEARANCE + 0.001  # the walls hold the tip
        if pinned:  # straight down where it is, the walls holding the tip
            goal, vz = (tip[0], tip[1], target_z), self.INSERT_SPEED
        elif inside or (height < self.MOUTH and planar <= self.ENTER_TOL):  # centre and push in, slowly
            goal, vz = (hole[0], hole[1], target_z), self.INSERT_SPEED
        elif height < self.MOUTH:  # at the mouth but off the axis: rise (straight up if on the rim)
            xy = tip if height < self.RIM else hole
            goal, vz = (xy[0], xy[1], FIXTURE_TOP + self.HOVER), 1.0
        elif planar <= self.ALIGN_TOL:  # aligned above the hole: descend to the mouth, then slowly in
            goal, vz = (hole[0], hole[1], target_z), self.INSERT_SPEED
        else:  # align at hover height
            goal, vz = (hole[0], hole[1], FIXTURE_TOP + self.HOVER), 1.0
        s = self.SPEED
        dz = (goal[2] - tip[2]) * k
        if goal[2] < tip[2] and height > self.MOUTH:  # quickly down to the mouth, then slowly in
            dz = max(dz, (self.MOUTH - height) / MAX_DISPLACEMENT - vz, -s)
        else:
            dz = max(dz, -vz)
        dx, dy = (goal[0] - tip[0]) * k, (goal[1] - tip[1]) * k
        return np.array([min(max(dx, -s), s), min(max(dy, -s), s), min(dz, s), -1.0])
