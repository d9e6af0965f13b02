"""The conveyor workcell shared by FactoryPickPlace and FactorySort, and its scripted expert.

Scene (world frame, metres): a belt conveyor runs along +y at ``x = BELT_X``, its top surface at
``z = BELT_TOP``; the stretch within the robot's reach is ``|y| <= BELT_END``. The belt is a real
body: a long slab on a prismatic joint driven by a velocity motor, so parts ride on it by friction
(heavy or slippery parts lag and slide, a jittery belt shakes them). The belt never runs out: the slab
starts centred at each reset (joint position 0) and, whenever it has travelled more than
``BELT_SHIFT_AT`` downstream, it is moved back by ``BELT_SHIFT`` (``resetJointState``, keeping its
velocity and motor target). Its surface is uniform, so the shift is seen only in Bullet refreshing the
contact points of whatever lies on it (a riding part's velocity moves by a few 1e-4 m/s, then carries
on); an episode whose belt travels less than ``BELT_SHIFT_AT`` never shifts (every one at the bundled
sites with the default ``max_steps`` and number of parts: at most ~1.8 m; Sort with 3 or 4 parts at
``fast_conveyor`` gets 450 or 600 steps, up to ~2.7 m or ~3.6 m, and can shift). Open bins stand on
the floor on the robot's side of the belt.

Parts: ``cube`` (kind 0, red, 40 mm) and ``cylinder`` (kind 1, blue, 40 mm diameter, 40 mm tall).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pybullet as p

from loopsim.envs.core.env import Evaluation
from loopsim.envs.core.expert import Expert
from loopsim.envs.core.panda import FINGER_JOINTS
from loopsim.envs.factory.base import MAX_DISPLACEMENT, FactoryEnv

__all__ = ["ConveyorTaskEnv", "ConveyorExpert", "Bin"]

#: Belt centre line [m] and top surface height [m].
BELT_X, BELT_TOP = 0.55, 0.10
#: Belt half width [m] and the end of the reachable stretch [m] (a part past it is missed).
BELT_HALF_WIDTH, BELT_END = 0.12, 0.55
#: Half length of the moving slab [m]. It covers y in [travel - 3.2, travel + 3.2] [m] for a belt
#: travel (joint position) ``travel``; the shift below keeps travel in [0, ~2.0] m, so the slab always
#: covers y in [-1.2, 3.2] m: the reachable stretch and every part's start (y >= -1.05 m).
BELT_HALF_LENGTH = 3.2
#: Belt travel [m] past which the slab is shifted back (checked before each control step's physics)
#: and the distance it is shifted back by [m], for any episode length.
BELT_SHIFT_AT, BELT_SHIFT = 2.0, 2.0
#: Part half height [m] (cube half side; cylinder half height) and cube half side / cylinder radius [m].
PART_HALF = 0.02
KIND_NAMES = ("cube", "cylinder")
KIND_COLORS = ((0.85, 0.2, 0.15, 1.0), (0.15, 0.35, 0.85, 1.0))
#: Bin inner half width [m], wall height above the floor [m], wall thickness [m], floor thickness [m].
BIN_INNER, BIN_HEIGHT, BIN_WALL, BIN_FLOOR = 0.08, 0.09, 0.01, 0.01
#: A part resting in a bin is moving slower than this [m/s].
REST_SPEED = 0.05
#: Where unused parts wait, off the workcell [m].
PARK_X = 3.0


@dataclass(frozen=True)
class Bin:
    """An open bin on the floor.

    Attributes:
        x: Centre x [m], world frame.
        y: Centre y [m], world frame.
        kind: Part kind the bin is for (``None``: any kind).
        rgba: Colour of the walls.
    """

    x: float
    y: float
    kind: int | None = None
    rgba: tuple[float, float, float, float] = (0.35, 0.35, 0.38, 1.0)

    def contains(self, pos) -> bool:
        """Whether a point (x, y, z) [m] is inside the bin's walls and below its rim."""
        return bool(
            abs(pos[0] - self.x) < BIN_INNER and abs(pos[1] - self.y) < BIN_INNER and pos[2] < BIN_HEIGHT
        )

    @property
    def target(self) -> np.ndarray:
        """Centre of a part resting on the bin floor (x, y, z) [m], ``(3,)`` float64."""
        return np.array([self.x, self.y, BIN_FLOOR + PART_HALF])


class ConveyorTaskEnv(FactoryEnv):
    """Parts ride a conveyor past a Panda; each must be picked and placed into its bin.

    Subclasses set ``bins``, ``n_parts_default`` and the kind drawing; see FactoryPickPlace and
    FactorySort for the task documentation.

    Args:
        n_parts: Parts per episode (``None``: the task default).
        **kwargs: See :class:`~loopsim.envs.core.env.RobotTaskEnv`. Without ``max_steps`` the time
            limit grows with the parts beyond the task's default number: ``default_max_steps *
            n_parts / n_parts_default`` control steps, never fewer than ``default_max_steps``.

    Raises:
        ValueError: If ``n_parts`` is not an integer in ``[1, 4]``.
    """

    bins: ClassVar[tuple[Bin, ...]] = (Bin(0.30, 0.38),)
    n_parts_default: ClassVar[int] = 1
    #: Unused by the conveyor tasks' sparse reward (``goal_box`` is set); kept for the base class's API.
    goal_distance_threshold: ClassVar[float] = 0.06
    #: Sparse-reward tolerance: the bin's inside (half widths, and rim height above a resting part) [m],
    #: plus 0.1 mm for float32 goals, so every successful state has sparse reward 0.
    goal_box: ClassVar[tuple[float, float, float]] = (
        BIN_INNER + 1e-4,
        BIN_INNER + 1e-4,
        BIN_HEIGHT - BIN_FLOOR - PART_HALF + 1e-4,
    )

    def __init__(self, n_parts: int | None = None, **kwargs) -> None:
        n_parts = self.n_parts_default if n_parts is None else n_parts
        if (
            isinstance(n_parts, bool | np.bool_)
            or not isinstance(n_parts, numbers.Integral)
            or not 1 <= n_parts <= 4
        ):
            raise ValueError(f"n_parts={n_parts!r} must be an integer in [1, 4]")
        self.n_parts = int(n_parts)
        if kwargs.get("max_steps") is None and self.n_parts > self.n_parts_default:
            # one part's time per part (PickPlace with 2 parts and 150 steps timed out every episode:
            # the expert needs 151-167 steps for two)
            kwargs["max_steps"] = self.default_max_steps * self.n_parts // self.n_parts_default
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ scene
    def _load_task_scene(self) -> None:
        bc = self.sim.bc
        # Conveyor: a static frame (base) and the belt slab on a prismatic joint along +y.
        frame_half = [BELT_HALF_WIDTH + 0.02, BELT_END + 0.05, 0.5 * (BELT_TOP - 0.03)]
        slab_half = [BELT_HALF_WIDTH, BELT_HALF_LENGTH, 0.01]
        self.conveyor = bc.createMultiBody(
            baseMass=0.0,
            baseCollisionShapeIndex=bc.createCollisionShape(bc.GEOM_BOX, halfExtents=frame_half),
            baseVisualShapeIndex=bc.createVisualShape(
                bc.GEOM_BOX, halfExtents=frame_half, rgbaColor=[0.3, 0.32, 0.35, 1]
            ),
            basePosition=[BELT_X, 0.0, frame_half[2]],
            linkMasses=[5.0],
            linkCollisionShapeIndices=[bc.createCollisionShape(bc.GEOM_BOX, halfExtents=slab_half)],
            linkVisualShapeIndices=[
                bc.createVisualShape(bc.GEOM_BOX, halfExtents=slab_half, rgbaColor=[0.12, 0.12, 0.12, 1])
            ],
            linkPositions=[[0.0, 0.0, BELT_TOP - 0.01 - frame_half[2]]],
            linkOrientations=[[0, 0, 0, 1]],
            linkInertialFramePositions=[[0, 0, 0]],
            linkInertialFrameOrientations=[[0, 0, 0, 1]],
            linkParentIndices=[0],
            linkJointTypes=[bc.JOINT_PRISMATIC],
            linkJointAxis=[[0, 1, 0]],
        )
        bc.changeDynamics(self.conveyor, 0, lateralFriction=1.0)
        self._belt_motor = functools.partial(
            p.setJointMotorControl2,
            self.conveyor,
            0,
            p.VELOCITY_CONTROL,
            force=5000.0,
            physicsClientId=self.sim.id,
        )
        for b in self.bins:
            h = BIN_HEIGHT / 2
            walls = [
                ((BIN_INNER + BIN_WALL, BIN_INNER + BIN_WALL, BIN_FLOOR / 2), (0, 0, BIN_FLOOR / 2 - h)),
                ((BIN_WALL / 2, BIN_INNER + BIN_WALL, h), (BIN_INNER + BIN_WALL / 2, 0, 0)),
                ((BIN_WALL / 2, BIN_INNER + BIN_WALL, h), (-BIN_INNER - BIN_WALL / 2, 0, 0)),
                ((BIN_INNER, BIN_WALL / 2, h), (0, BIN_INNER + BIN_WALL / 2, 0)),
                ((BIN_INNER, BIN_WALL / 2, h), (0, -BIN_INNER - BIN_WALL / 2, 0)),
            ]
            self.sim.create_compound(walls, (b.x, b.y, h), rgba=b.rgba)
        # A pool of n_parts bodies of each kind, parked off the workcell until used.
        self._pool: list[list[int]] = []
        for kind, rgba in enumerate(KIND_COLORS):
            bodies = []
            for i in range(self.n_parts):
                if kind == 0:
                    col = bc.createCollisionShape(bc.GEOM_BOX, halfExtents=[PART_HALF] * 3)
                    vis = bc.createVisualShape(bc.GEOM_BOX, halfExtents=[PART_HALF] * 3, rgbaColor=list(rgba))
                else:
                    col = bc.createCollisionShape(bc.GEOM_CYLINDER, radius=PART_HALF, height=2 * PART_HALF)
                    vis = bc.createVisualShape(
                        bc.GEOM_CYLINDER, radius=PART_HALF, length=2 * PART_HALF, rgbaColor=list(rgba)
                    )
                park = [PARK_X + 0.2 * i, 1.0 + kind, PART_HALF]
                bodies.append(bc.createMultiBody(0.1, col, vis, park))
            self._pool.append(bodies)
        self.parts: list[int] = []
        self.kinds: list[int] = []
        self._lifted = [False] * self.n_parts
        self._placed = [False] * self.n_parts
        self._belt_speed = 0.0
        # Running estimate of the belt travel from the commanded speeds, in [m/s x control steps]
        # (cheap per step); the true joint position is read only once it passes the shift point.
        self._belt_travel = 0.0
        self._belt_shift_at = BELT_SHIFT_AT / self.sim.control_dt
        self._bin_targets = [float(v) for b in self.bins for v in b.target]
        cid = self.sim.id
        self._get_pose = functools.partial(p.getBasePositionAndOrientation, physicsClientId=cid)
        self._get_vel = functools.partial(p.getBaseVelocity, physicsClientId=cid)
        self._contacts = functools.partial(p.getContactPoints, physicsClientId=cid)
        # A placeholder episode so spaces and goals can be computed before the first reset.
        self.parts = [self._pool[0][i] for i in range(self.n_parts)]
        self.kinds = [0] * self.n_parts
        self._desired = np.concatenate([self.target_bin(i).target for i in range(self.n_parts)])
        self._read_task_state()

    def _apply_task_site(self, params: Mapping[str, float | int]) -> None:
        self._speed = float(params["conveyor_speed"])
        self._jitter = float(params["conveyor_jitter"])
        for bodies in self._pool:
            for body in bodies:
                self.sim.bc.changeDynamics(
                    body,
                    -1,
                    mass=float(params["part_mass"]),
                    lateralFriction=float(params["part_friction"]),
                    spinningFriction=0.001,
                    rollingFriction=0.0001,
                )

    def _draw_kinds(self, rng: np.random.Generator) -> list[int]:
        """Kinds of the episode's parts (subclasses override); ``n_parts`` ints in ``{0, 1}``."""
        return [0] * self.n_parts

    def _initialize_episode(self, rng: np.random.Generator) -> None:
        bc = self.sim.bc
        self.kinds = self._draw_kinds(rng)
        used = [0, 0]
        self.parts = []
        for k in self.kinds:
            self.parts.append(self._pool[k][used[k]])
            used[k] += 1
        speed = float(self.site_params["conveyor_speed"])
        self._belt_speed = speed
        self._belt_travel = 0.0
        bc.resetJointState(self.conveyor, 0, 0.0, targetVelocity=speed)
        self._belt_motor(targetVelocity=speed)
        y = rng.uniform(-0.25, -0.15)
        for body in self.parts:
            x = rng.uniform(BELT_X - 0.06, BELT_X + 0.06)
            yaw = rng.uniform(-np.pi, np.pi)
            bc.resetBasePositionAndOrientation(
                body, [x, y, BELT_TOP + PART_HALF + 0.0005], bc.getQuaternionFromEuler([0, 0, yaw])
            )
            bc.resetBaseVelocity(body, [0.0, speed, 0.0], [0.0, 0.0, 0.0])
            y -= rng.uniform(0.2, 0.26)
        ee = np.array([rng.uniform(0.3, 0.45), rng.uniform(-0.15, 0.15), rng.uniform(0.25, 0.35)])
        self.robot.reset_joints(ee, finger_width=0.08)
        self._lifted = [False] * self.n_parts
        self._placed = [False] * self.n_parts
        self._desired = np.concatenate([self.target_bin(i).target for i in range(self.n_parts)])

    def _before_physics(self) -> None:
        jitter = self.np_random.normal()  # one draw per step, whatever the site
        speed = min(max(self._speed + jitter * self._jitter, 0.0), 0.3)
        if speed != self._belt_speed:  # the motor keeps its target until told otherwise
            self._belt_speed = speed
            self._belt_motor(targetVelocity=speed)
        if self._belt_travel > self._belt_shift_at:
            self._shift_belt()
        self._belt_travel += speed

    def _shift_belt(self) -> None:
        """Move the slab back by ``BELT_SHIFT`` if it has travelled past ``BELT_SHIFT_AT``.

        The joint keeps its velocity, and its motor its target (``resetJointState`` leaves the motor
        alone); the travel estimate is re-synchronised with the true joint position either way.
        """
        bc = self.sim.bc
        travel, velocity = bc.getJointState(self.conveyor, 0)[:2]
        if travel > BELT_SHIFT_AT:
            travel -= BELT_SHIFT
            bc.resetJointState(self.conveyor, 0, travel, targetVelocity=velocity)
        self._belt_travel = travel / self.sim.control_dt

    def _read_task_state(self) -> None:
        get_pose, get_vel = self._get_pose, self._get_vel
        self._pos_t = [get_pose(b)[0] for b in self.parts]  # tuples of floats: cheap to read per step
        self._vel_t = [get_vel(b)[0] for b in self.parts]
        self._pos = np.array(self._pos_t)
        # What the robot perceives: part positions with the site's sensor noise, drawn once per step.
        self._seen_pos = self._noisy(self._pos) if self._sensor_noise > 0 else self._pos

    # ------------------------------------------------------------------ state
    def part_positions(self) -> np.ndarray:
        """True (noise-free) positions of the episode's parts, ``(n_parts, 3)`` float64 [m]."""
        return np.array([self._get_pose(b)[0] for b in self.parts])

    def part_velocities(self) -> np.ndarray:
        """True linear velocities of the parts, ``(n_parts, 3)`` float64 [m/s]."""
        return np.array([self._get_vel(b)[0] for b in self.parts])

    def target_bin(self, i: int) -> Bin:
        """The bin part ``i`` must go into."""
        k = self.kinds[i]
        for b in self.bins:
            if b.kind is None or b.kind == k:
                return b
        raise RuntimeError(f"no bin for kind {k}")  # pragma: no cover - bins are fixed per task

    def touching_robot(self, i: int) -> bool:
        """Whether part ``i`` is in contact with the robot."""
        return len(self._contacts(self.parts[i], self.robot.body)) > 0

    def grasped(self, i: int) -> bool:
        """Whether part ``i`` touches both fingers (held in the gripper)."""
        body, robot = self.parts[i], self.robot.body
        return all(len(self._contacts(body, robot, -1, j)) > 0 for j in FINGER_JOINTS)

    def _part_status(self) -> tuple[list[bool], list[str | None]]:
        """Per part: placed in its bin (resting, released), and the name of a failure or ``None``."""
        placed = [False] * self.n_parts
        failures: list[str | None] = [None] * self.n_parts
        for i, (pos, v) in enumerate(zip(self._pos_t, self._vel_t, strict=True)):
            x, y, z = pos
            if z > BELT_TOP + PART_HALF + 0.02:
                self._lifted[i] = True
            inside = next((b for b in self.bins if b.contains(pos)), None)
            if inside is not None:
                at_rest = v[0] * v[0] + v[1] * v[1] + v[2] * v[2] < REST_SPEED * REST_SPEED
                if at_rest and not self.touching_robot(i):
                    if inside is self.target_bin(i):
                        placed[i] = True
                    else:
                        failures[i] = "wrong_bin"
            elif z < BELT_TOP - 0.03 or abs(x) > 1.5 or abs(y) > 1.5 or (y > BELT_END and z < BELT_TOP + 0.1):
                if not self.grasped(i):  # a part still in the hand is carried low, not lost
                    failures[i] = "dropped" if self._lifted[i] else "missed"
        return placed, failures

    def _evaluate(self) -> Evaluation:
        placed, failures = self._part_status()
        self._placed = placed
        failure = next((f for f in failures if f is not None), None)
        return Evaluation(success=all(placed) and failure is None, failure=failure)

    def _state_observation(self) -> np.ndarray:
        ex, ey, ez = self.robot.ee_pos_list
        pos_all = self._seen_pos.tolist()
        obs = self._robot_observation()
        for i in range(self.n_parts):
            x, y, z = pos_all[i]
            kind = self.kinds[i]
            obs += (x, y, z, x - ex, y - ey, z - ez, *self._vel_t[i])
            obs += (float(kind == 0), float(kind == 1), float(self._placed[i]))
        obs += self._bin_targets
        return np.array(obs)

    def _state_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._robot_bounds()
        part_lo = [-2.0] * 3 + [-3.0] * 3 + [-5.0] * 3 + [0.0] * 3
        part_hi = [2.0] * 3 + [3.0] * 3 + [5.0] * 3 + [1.0] * 3
        lo = lo + part_lo * self.n_parts + [-1.0] * 3 * len(self.bins)
        hi = hi + part_hi * self.n_parts + [1.0] * 3 * len(self.bins)
        return np.array(lo, dtype=np.float32), np.array(hi, dtype=np.float32)

    def achieved_goal(self) -> np.ndarray:
        """Perceived positions of the parts (with the site's sensor noise), ``(3 * n_parts,)`` float64 [m]."""
        return self._seen_pos.reshape(-1)

    def desired_goal(self) -> np.ndarray:
        """Resting positions at the centre of each part's bin, ``(3 * n_parts,)`` float64 [m]."""
        return self._desired

    def _hold_action(self) -> np.ndarray:
        return np.array([0.0, 0.0, 0.0, 1.0], dtype=np.float32)


class ConveyorExpert(Expert):
    """Picks the most downstream part still on the belt, carries it over its bin and drops it in.

    Reactive rules on privileged state (true part poses and velocities, finger contacts):

    1. A part held in both fingers is lifted to ``CARRY_Z``, carried over its bin and released
       once it is ``RELEASE_HEIGHT`` above the bin floor.
    2. Otherwise the end effector hovers ``HOVER`` above the target part, leading it by its velocity,
       descends with the gripper open when within ``ALIGN_TOL`` in the plane, and closes when at grasp
       height.
    3. Moving sideways low down (near bins or the belt) it first rises, so it never sweeps a part.
    """

    env_type = ConveyorTaskEnv
    CARRY_Z = 0.26
    HOVER = 0.09
    ALIGN_TOL = 0.012
    RELEASE_HEIGHT = 0.13
    #: Steps of lead when tracking a moving part (covers the position-control lag).
    LEAD_STEPS = 3.0

    def _move(self, ee: np.ndarray, target: np.ndarray, feedforward: np.ndarray | None = None) -> np.ndarray:
        d = target - ee
        if feedforward is not None:
            d = d + feedforward
        return np.clip(d / MAX_DISPLACEMENT, -1.0, 1.0)

    def _act(self) -> np.ndarray:
        env: ConveyorTaskEnv = self.env
        # Under actuator lag, act from where the queued actions will have moved the hand (the expert
        # knows its own commands); the part keeps riding the belt meanwhile.
        pending = env.pending_actions
        ee_now = env.robot.ee_position()
        ee = ee_now + MAX_DISPLACEMENT * np.sum([a[:3] for a in pending], axis=0) if pending else ee_now
        pos, vel = env.part_positions(), env.part_velocities()
        dt = env.sim.control_dt
        delay = len(pending)
        # 1. carrying a part
        for i in range(env.n_parts):
            if env.grasped(i) and pos[i, 2] > BELT_TOP + PART_HALF - 0.01:
                b = env.target_bin(i)
                # the grasp offset is the hand's now; a held part goes where the queued actions take
                # the hand (with the hand's predicted position here, the carry goal moved with every
                # queued action and at a lag of 3+ steps the hand circled over the bin, never releasing)
                offset = ee_now - pos[i]
                part = pos[i] + (ee - ee_now) if pending else pos[i]
                over = math.hypot(part[0] - b.target[0], part[1] - b.target[1])
                if over > 0.03:
                    goal = np.array([b.x, b.y, 0.0]) + offset
                    goal[2] = self.CARRY_Z
                    if ee[2] < self.CARRY_Z - 0.05:  # lift before moving sideways
                        goal[:2] = ee[:2]
                    return np.append(self._move(ee, goal), -1.0)
                if part[2] > BIN_FLOOR + self.RELEASE_HEIGHT:
                    goal = np.array([b.x, b.y, BIN_FLOOR + self.RELEASE_HEIGHT - 0.02]) + offset
                    return np.append(self._move(ee, goal), -1.0)
                return np.array([0.0, 0.0, 0.0, 1.0])
        # 2. pick the most downstream part still on the belt
        candidates = [
            i
            for i in range(env.n_parts)
            if not any(b.contains(pos[i]) for b in env.bins) and pos[i, 2] > BELT_TOP - 0.01
        ]
        if not candidates:
            goal = np.array([ee[0], ee[1], self.CARRY_Z])
            return np.append(self._move(ee, goal), 1.0)
        i = max(candidates, key=lambda j: pos[j, 1])
        lead = vel[i] * dt * (self.LEAD_STEPS + delay)
        target = pos[i] + lead
        planar = math.hypot(target[0] - ee[0], target[1] - ee[1])
        ff = vel[i] * dt
        grasp_z = pos[i, 2] - 0.004
        if planar > self.ALIGN_TOL:
            if ee[2] < pos[i, 2] + 0.04 and planar > 0.03:  # too low to move sideways: rise first
                goal = np.array([ee[0], ee[1], pos[i, 2] + self.HOVER])
                return np.append(self._move(ee, goal), 1.0)
            goal = np.array(
                [target[0], target[1], max(pos[i, 2] + self.HOVER * min(1.0, planar / 0.05), grasp_z)]
            )
            return np.append(self._move(ee, goal, ff), 1.0)
        goal = np.array([target[0], target[1], grasp_z])
        if ee[2] - grasp_z < 0.012:
            return np.append(self._move(ee, goal, ff), -1.0)
        return np.append(self._move(ee, goal, ff), 1.0)
