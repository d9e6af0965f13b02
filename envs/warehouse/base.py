"""The warehouse domain: a differential-drive robot in aisles of shelving, with moving traffic.

Frame: world frame, z up, metres. Aisles run along +x. The layout is generated from a grid
(:class:`Layout`): ``n_aisles`` aisles of width ``aisle_width`` between ``n_aisles + 1`` rows of
shelving; each row is two segments of ``shelf_units`` shelving modules (``MODULE_LENGTH`` long,
``SHELF_DEPTH`` deep, ``SHELF_HEIGHT`` tall) split by a middle cross aisle (``MID_CROSS`` wide). End
cross aisles (``END_CROSS`` wide) run along both ends; walls enclose the floor. The dock is in the
west end cross aisle (``x < 0``). The shelving and the walls are one static body, a compound of boxes
built in place for the episode's layout (a row segment is one box: its modules side by side fill it
exactly); a reset that draws another layout than the world holds builds the world again for it.

Robot: a differential-drive base built with ``createMultiBody`` (no URDF file): a 20 kg box body
(0.60 x 0.44 x 0.20 m), two drive wheels (radius ``WHEEL_RADIUS``, track ``WHEEL_TRACK``) on revolute
joints and two frictionless ball casters. The action ``(v, w)`` in ``[-1, 1]`` is scaled to
``MAX_LINEAR`` [m/s] and ``MAX_ANGULAR`` [rad/s] and turned into wheel speeds
``(v -+ w * track / 2) / radius`` [rad/s], tracked by PyBullet velocity motors with at most
``WHEEL_TORQUE`` [N m] each. The robot moves only through wheel/floor friction (Bullet combines the
wheel's coefficient 1.0 with the floor's ``floor_friction`` by product), so on a slippery floor the
wheels spin, the robot skids in turns and overshoots when braking: slip is physical, not scripted.
This is why the wheels are driven by motors rather than setting the base velocity directly.

Control: the physics runs at 100 Hz (time step 0.01 s) with 10 substeps per action, so the control
frequency is 10 Hz.

Lidar: a planar scanner on top of the robot (0.28 m above the floor), ``LIDAR_RAYS`` = 72 rays (every
5 degrees, counter-clockwise from straight ahead), range ``LIDAR_RANGE`` = 8 m; one batched
``rayTestBatch`` call per control step, with the rays attached to the robot's base frame (PyBullet
transforms them in C). A ray that hits nothing (or the floor) reads the full range. Sites add
Gaussian range noise and dropouts (a dropped ray reads the full range, as a real scanner's missing
return does).

Traffic: other robots (boxes 0.70 x 0.50 x 0.50 m) and people (cylinders of radius 0.25 m, 1.7 m tall)
move kinematically along the aisles, back and forth, each in a lane close to one shelf face, at the
site's ``traffic_speed`` (times a per-agent factor in [0.8, 1.2]). They are static bodies moved once per
control step; each one pauses while the robot (a disc of ``ROBOT_RADIUS``; or the cart it pushes) is in
its lane with its centre ahead of the agent's centre and its disc within ``YIELD_DISTANCE`` of the
agent's front face (their own safety scanners), so they never run into the robot from behind, beside
or head-on: a collision is always the robot's doing. An agent that turned away from a robot beside it
does not wait for it. An agent that has paused for ``TURN_AROUND_AFTER`` seconds in a row turns around and
goes back the way it came, to the end of its lane, and then comes back: in an aisle too narrow to
pass, robot and traffic no longer wait for each other until the time limit, but the robot only gets
the time the agent takes to walk to its lane's end and back (none with the agent's back to that
end). An agent turning at its lane's end with the robot right behind it (the waiting rule, from the
end, for the way it then faces) stops at the end instead of walking the rest of its step back. Under
the waiting rule, which looks at the robot's centre, sits a geometric one: no step brings an agent
within ``CONTACT_MARGIN`` of the robot's footprint (``FOOTPRINT_HALF``) or of the cart and closer
than it is.
None starts on the robot or its cart (an agent drawn there starts along its lane,
``START_CLEARANCE`` clear of them). Agents do not see each other: two in one lane may start
overlapping and pass through each other (static bodies: PyBullet reports no contact between them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pybullet as p

from loopsim.envs.core.env import RobotTaskEnv
from loopsim.envs.core.site import ParamDef, SiteSchema

__all__ = [
    "WAREHOUSE_SCHEMA",
    "Layout",
    "WarehouseEnv",
    "MAX_LINEAR",
    "MAX_ANGULAR",
    "LIDAR_RAYS",
    "LIDAR_RANGE",
    "ROBOT_RADIUS",
]

#: Speed limits for an action of 1: linear [m/s], angular [rad/s].
MAX_LINEAR, MAX_ANGULAR = 1.0, 1.5
#: Drive wheel radius [m], distance between the wheels [m], motor torque limit [N m].
WHEEL_RADIUS, WHEEL_TRACK, WHEEL_TORQUE = 0.08, 0.50, 8.0
#: Width of a drive wheel [m] (its outer face is ``WHEEL_TRACK / 2 + WHEEL_WIDTH / 2`` from the centre line).
WHEEL_WIDTH = 0.04
#: Robot body half extents (x, y, z) [m], base mass [kg], height of the base centre above the floor [m].
BODY_HALF = (0.30, 0.22, 0.10)
#: The robot's footprint as a rectangle: half length (the body) and half width (the wheels' outer
#: faces, beyond the body's sides) [m].
FOOTPRINT_HALF = (BODY_HALF[0], max(BODY_HALF[1], 0.5 * WHEEL_TRACK + 0.5 * WHEEL_WIDTH))
BODY_MASS = 20.0
#: The robot's whole mass: body, two drive wheels of 1 kg, two casters of 0.5 kg [kg].
ROBOT_MASS = BODY_MASS + 3.0
BODY_Z = 0.13
#: Radius of a circle around the robot's centre that contains its footprint [m].
ROBOT_RADIUS = 0.38
#: Lidar: number of rays, range [m], mount height above the base centre [m].
LIDAR_RAYS, LIDAR_RANGE, LIDAR_HEIGHT = 72, 8.0, 0.15
#: Shelving module length along x [m], shelf depth [m], shelf height [m].
MODULE_LENGTH, SHELF_DEPTH, SHELF_HEIGHT = 1.0, 0.8, 1.8
#: Width of the middle cross aisle [m] and of the two end cross aisles [m].
MID_CROSS, END_CROSS = 2.0, 2.5
#: Largest layout the body pools cover.
MAX_AISLES, MAX_UNITS, MAX_ROBOTS, MAX_PEOPLE = 5, 6, 6, 6
#: Traffic robot half extents [m]; person radius and height [m].
TRAFFIC_ROBOT_HALF = (0.35, 0.25, 0.25)
PERSON_RADIUS, PERSON_HEIGHT = 0.25, 1.7
#: An agent pauses while the robot is ahead of it in its lane, closer than this [m] (gap between bodies).
YIELD_DISTANCE = 1.0
#: An agent that has paused this long for the robot turns around and goes back the way it came [s].
TURN_AROUND_AFTER = 3.0
#: Least gap a traffic step may leave to the robot's footprint or the cart, unless it does not narrow it [m].
CONTACT_MARGIN = 0.02
#: Change of that gap over a traffic step below which it counts as unchanged [m].
GAP_TOLERANCE = 1e-6
#: Clearance between a traffic lane and the shelf face [m].
LANE_MARGIN = 0.1
#: Least gap along its lane between a traffic agent's start and the robot or its cart [m].
START_CLEARANCE = 0.1
#: Where traffic agents the episode does not use wait, far off the floor [m].
PARK = (500.0, 500.0)
#: Up to this many obstacles, a contact check asks PyBullet once per obstacle (~1.4 us each, nothing
#: returned in the usual case); beyond it, once for all of a body's contacts (~5 us: the robot's
#: wheels and casters on the floor come back too) and filters them. Measured on this machine.
PER_OBSTACLE_QUERIES = 3

WAREHOUSE_SCHEMA = SiteSchema(
    "warehouse",
    [
        ParamDef("aisle_width", 2.6, 1.2, 4.0, "m", "width of every aisle between shelf faces"),
        ParamDef("n_aisles", 3, 1, MAX_AISLES, "aisles", "number of parallel aisles", integer=True),
        ParamDef(
            "shelf_units",
            4,
            2,
            MAX_UNITS,
            "modules",
            f"shelving modules ({MODULE_LENGTH} m each) per row segment (two segments per row)",
            integer=True,
        ),
        ParamDef(
            "n_robots", 0, 0, MAX_ROBOTS, "robots", "other robots driving along the aisles", integer=True
        ),
        ParamDef("n_people", 0, 0, MAX_PEOPLE, "people", "people walking along the aisles", integer=True),
        ParamDef("traffic_speed", 0.6, 0.0, 1.5, "m/s", "nominal speed of the traffic"),
        ParamDef("floor_friction", 1.0, 0.02, 1.5, "-", "floor friction coefficient (times the wheels' 1.0)"),
        ParamDef("lidar_noise", 0.0, 0.0, 0.5, "m", "std of Gaussian noise on each lidar range"),
        ParamDef("lidar_dropout", 0.0, 0.0, 0.9, "1/ray/step", "probability that a ray returns nothing"),
        ParamDef(
            "action_delay",
            0,
            0,
            5,
            "control steps",
            "actuator lag: actions take effect this many steps late",
            integer=True,
        ),
        # the robot can push at most min(0.7 g floor_friction 23 kg, 200 N) (planner.drive_accel) against
        # the cart's 0.15 g floor_friction cart_mass: heavier carts than ~105 kg (90 kg at friction 1.5)
        # do not move, a task no policy can solve (measured: 100 kg moves, 110 kg not, on the dry floor)
        ParamDef(
            "cart_mass", 40.0, 5.0, 200.0, "kg",
            "mass of the loaded cart (WarehouseCartPush; above ~105 kg, 90 kg at floor_friction 1.5, "
            "the robot cannot move it)",
        ),
    ],
)


@dataclass(frozen=True)
class Layout:
    """A warehouse floor generated from the grid parameters.

    Attributes:
        n_aisles: Number of aisles.
        aisle_width: Aisle width between shelf faces [m].
        shelf_units: Shelving modules per row segment.
    """

    n_aisles: int
    aisle_width: float
    shelf_units: int

    @property
    def segment_length(self) -> float:
        """Length of one row segment along x [m]."""
        return self.shelf_units * MODULE_LENGTH

    @property
    def width(self) -> float:
        """Extent of the shelving along y [m] (outer shelf back to outer shelf back)."""
        return (self.n_aisles + 1) * SHELF_DEPTH + self.n_aisles * self.aisle_width

    @property
    def x_min(self) -> float:
        """West wall x [m]."""
        return -END_CROSS

    @property
    def x_max(self) -> float:
        """East wall x [m]."""
        return 2.0 * self.segment_length + MID_CROSS + END_CROSS

    @property
    def y_max(self) -> float:
        """North wall y [m] (the south wall is at ``-y_max``)."""
        return 0.5 * self.width

    def row_y(self, k: int) -> float:
        """Centre y of shelf row ``k`` in ``[0, n_aisles]`` [m]."""
        return -0.5 * self.width + 0.5 * SHELF_DEPTH + k * (SHELF_DEPTH + self.aisle_width)

    def aisle_y(self, k: int) -> float:
        """Centre line y of aisle ``k`` in ``[0, n_aisles)`` [m]."""
        return self.row_y(k) + 0.5 * (SHELF_DEPTH + self.aisle_width)

    def segment_x0(self, s: int) -> float:
        """West end x of row segment ``s`` in ``{0, 1}`` [m]."""
        return s * (self.segment_length + MID_CROSS)

    def shelf_boxes(self) -> list[tuple[float, float, float, float]]:
        """Every shelving module as ``(x_min, x_max, y_min, y_max)`` [m], row by row, west to east."""
        out = []
        for k in range(self.n_aisles + 1):
            y = self.row_y(k)
            for s in range(2):
                for u in range(self.shelf_units):
                    x0 = self.segment_x0(s) + u * MODULE_LENGTH
                    out.append((x0, x0 + MODULE_LENGTH, y - 0.5 * SHELF_DEPTH, y + 0.5 * SHELF_DEPTH))
        return out

    def bay(self, aisle: int, segment: int, unit: int) -> tuple[float, float]:
        """Bay point in front of module ``unit`` of ``segment``, on the centre line of ``aisle`` [m]."""
        return self.segment_x0(segment) + (unit + 0.5) * MODULE_LENGTH, self.aisle_y(aisle)

    def aisle_x_range(self) -> tuple[float, float]:
        """Stretch of x [m] the traffic uses along an aisle (shelf ends, both segments)."""
        return 0.0, 2.0 * self.segment_length + MID_CROSS


def _traffic_pool(site: Any) -> tuple[int, int]:
    """Most traffic robots and people ``site`` can put on the floor in one episode (its specs' maxima)."""
    out = []
    for name, cap in (("n_robots", MAX_ROBOTS), ("n_people", MAX_PEOPLE)):
        spec = site.overrides.get(name, WAREHOUSE_SCHEMA.params[name].lab)
        if isinstance(spec, Mapping):
            kind, args = next(iter(spec.items()))
            top = cap if kind == "normal" else max(args)
        else:
            top = spec
        out.append(min(cap, int(math.floor(top + 0.5))))
    return out[0], out[1]


@functools.lru_cache(maxsize=64)
def _shelf_box_array(layout: Layout) -> np.ndarray:
    """``(M, 4)`` float64 ``Layout.shelf_boxes()`` (computed once per layout; do not modify)."""
    out = np.array(layout.shelf_boxes(), dtype=np.float64).reshape(-1, 4)
    out.flags.writeable = False
    return out


def _must_wait(
    x: float, y: float, d: float, hl: float, hw: float, yield_to: list[tuple[tuple[float, float], float]]
) -> bool:
    """Whether a traffic agent at ``(x, y)`` [m] facing ``d`` (+-1.0 along x) must pause for the robot.

    It must while the robot's centre (or its cart's) is ahead of its own centre (so also a robot beside
    its front half, which a step would run into; not one it turned away from), in its lane (laterally
    within the agent's half width ``hw`` + the body's radius + 0.1 m), with a gap from the agent's
    front face (``hl`` ahead of its centre) to the body's disc below ``YIELD_DISTANCE``.

    Args:
        x: Agent centre x [m].
        y: Agent lane centre y [m].
        d: Direction the agent faces along x, +1.0 or -1.0.
        hl: Agent half length along its lane [m].
        hw: Agent half width [m].
        yield_to: ``((x, y) [m], radius [m])`` of each body it yields to (``WarehouseEnv._yield_to``).
    """
    for (rx, ry), radius in yield_to:
        along = (rx - x) * d
        if abs(ry - y) < hw + radius + 0.1 and along > 0.0 and along - hl - radius < YIELD_DISTANCE:
            return True
    return False


def _gap(x: float, y: float, hl: float, hw: float, person: bool,
         rect: tuple[float, float, float, float, float, float]) -> float:
    """Gap [m] between a traffic agent at ``(x, y)`` and a rectangle (negative: they overlap).

    A person is a disc of radius ``hw``: the exact distance to the rectangle. A traffic robot is a box
    along x with half extents ``(hl, hw)``: the largest gap along the four separating axes of the two
    boxes (the separating axis theorem), a lower bound on the distance, exact face to face.

    Args:
        x: Agent centre x [m].
        y: Agent centre y [m].
        hl: Agent half length along x [m].
        hw: Agent half width [m] (a person's radius).
        person: Whether the agent is a person.
        rect: ``(x, y, cos yaw, sin yaw, half x, half y)`` of the rectangle [m]
            (:meth:`WarehouseEnv._keep_off`).
    """
    cx, cy, c, s, hx, hy = rect
    dx, dy = x - cx, y - cy
    u = abs(c * dx + s * dy) - hx
    v = abs(c * dy - s * dx) - hy
    if person:
        if u <= 0.0 and v <= 0.0:
            return max(u, v) - hw
        return math.hypot(max(u, 0.0), max(v, 0.0)) - hw
    ac, as_ = abs(c), abs(s)
    return max(
        abs(dx) - hl - hx * ac - hy * as_,
        abs(dy) - hw - hx * as_ - hy * ac,
        u - hl * ac - hw * as_,
        v - hl * as_ - hw * ac,
    )


def _step_touches(
    x: float, new_x: float, end: float | None, y: float, hl: float, hw: float, person: bool,
    keep_off: list[tuple[float, float, float, float, float, float]],
) -> bool:
    """Whether a traffic step would bring the agent within ``CONTACT_MARGIN`` of a keep-off rectangle.

    The step goes from ``x`` to ``new_x`` (via its lane's ``end`` if it turns there); it is refused
    only if it also makes that gap smaller than it is now (an agent already that close may walk
    away). The gap along a straight move is a convex function of the position, so a step is refused
    in at most one direction.

    Args:
        x: Agent centre x now [m].
        new_x: Agent centre x after the step [m].
        end: The lane end it turns at during the step [m], or ``None``.
        y: Lane centre y [m].
        hl: Agent half length along x [m].
        hw: Agent half width [m].
        person: Whether the agent is a person.
        keep_off: Rectangles (:meth:`WarehouseEnv._keep_off`).
    """
    far = hl + hw + CONTACT_MARGIN + abs(new_x - x) + (0.0 if end is None else abs(end - x))
    for rect in keep_off:
        cx, cy, _, _, hx, hy = rect
        reach = far + hx + hy
        if abs(cx - x) > reach or abs(cy - y) > reach:
            continue
        after = _gap(new_x, y, hl, hw, person, rect)
        if end is not None:
            after = min(after, _gap(end, y, hl, hw, person, rect))
        # a move along a side parallel to the lane keeps the gap: equal up to rounding and to the
        # micro-radian yaw a standing robot settles to
        if after < CONTACT_MARGIN and after < _gap(x, y, hl, hw, person, rect) - GAP_TOLERANCE:
            return True
    return False


def _wrap(angle: float) -> float:
    """Angle wrapped to ``[-pi, pi)`` [rad]."""
    return (angle + math.pi) % (2.0 * math.pi) - math.pi


class WarehouseEnv(RobotTaskEnv):
    """Base class of the warehouse tasks: the robot, the generated layout, lidar, traffic and site effects.

    The action is ``(2,)`` float32 in ``[-1, 1]``: forward speed command times ``MAX_LINEAR`` [m/s]
    and turn rate command times ``MAX_ANGULAR`` [rad/s] (counter-clockwise positive).

    Robot part of every ``state`` observation (first ``10 + LIDAR_RAYS`` entries; tasks append theirs):
    position (x, y) [m], heading (cos yaw, sin yaw), velocity in the robot frame (forward [m/s],
    leftward [m/s], yaw rate [rad/s]), the task's goal in the robot frame (forward, leftward) [m] and its
    distance [m], then the ``LIDAR_RAYS`` lidar ranges [m] in ``[0, LIDAR_RANGE]``.
    """

    site_schema: ClassVar = WAREHOUSE_SCHEMA
    timestep: ClassVar[float] = 0.01
    substeps: ClassVar[int] = 10
    solver_iterations: ClassVar[int] = 20
    default_max_steps: ClassVar[int] = 400
    goal_bound: ClassVar[float] = 40.0
    action_dim: ClassVar[int] = 2
    #: Speed below which the robot counts as stopped [m/s].
    stop_speed: ClassVar[float] = 0.1

    # ------------------------------------------------------------------ scene
    def _build_world(self) -> None:
        """Build the scene for ``self._scene_layout`` (see :meth:`_rebuild_for_layout`)."""
        self._building = True
        try:
            super()._build_world()
        finally:
            self._building = False

    def _load_scene(self) -> None:
        sim, bc = self.sim, self.sim.bc
        if not hasattr(self, "_scene_layout"):  # construction: the layout of the lab values
            lab = self.site_schema.lab_values()
            self._scene_layout = Layout(
                int(lab["n_aisles"]), float(lab["aisle_width"]), int(lab["shelf_units"])
            )
        if getattr(self, "_pool_site", None) is not self.site:  # construction, or ``env.site`` replaced
            self._pool_robots, self._pool_people = _traffic_pool(self.site)
            self._pool_site = self.site
        lay = self._scene_layout
        self.floor = bc.loadURDF("plane.urdf")
        bc.changeVisualShape(self.floor, -1, rgbaColor=[0.72, 0.72, 0.70, 1])
        self.robot = self._build_robot()
        # shelving and walls: one static body (a compound of boxes), built for the layout in place.
        # A row segment is one box: its ``shelf_units`` modules (same depth and height, side by side)
        # fill exactly that box. The walls are long enough for the largest layout.
        seg_half = [0.5 * lay.segment_length, 0.5 * SHELF_DEPTH, 0.5 * SHELF_HEIGHT]
        wall_half = [30.0, 0.05, 0.6]
        cx, w = 0.5 * (lay.x_min + lay.x_max), wall_half[1]
        yaw90 = [0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)]
        ident = [0.0, 0.0, 0.0, 1.0]
        n_seg = 2 * (lay.n_aisles + 1)
        halves = [seg_half] * n_seg + [wall_half] * 4
        centres = [
            [lay.segment_x0(s) + seg_half[0], lay.row_y(k), seg_half[2]]
            for k in range(lay.n_aisles + 1)
            for s in range(2)
        ] + [
            [cx, lay.y_max + w, 0.6],
            [cx, -lay.y_max - w, 0.6],
            [lay.x_min - w, 0.0, 0.6],
            [lay.x_max + w, 0.0, 0.6],
        ]
        turns = [ident] * (n_seg + 2) + [yaw90] * 2
        colours = [[0.25, 0.40, 0.70, 1]] * n_seg + [[0.55, 0.55, 0.52, 1]] * 4
        n = len(halves)
        col = bc.createCollisionShapeArray(
            [bc.GEOM_BOX] * n, halfExtents=halves, collisionFramePositions=centres,
            collisionFrameOrientations=turns,
        )
        vis = bc.createVisualShapeArray(
            [bc.GEOM_BOX] * n, halfExtents=halves, visualFramePositions=centres,
            visualFrameOrientations=turns, rgbaColors=colours,
        )
        #: The shelving and walls: one static body.
        self.structure = bc.createMultiBody(0.0, col, vis, [0.0, 0.0, 0.0])
        self._built_layout = lay
        # traffic: as many bodies of each kind as the site can ask for, parked off the floor
        rcol = bc.createCollisionShape(bc.GEOM_BOX, halfExtents=list(TRAFFIC_ROBOT_HALF))
        rvis = bc.createVisualShape(bc.GEOM_BOX, halfExtents=list(TRAFFIC_ROBOT_HALF),
                                    rgbaColor=[0.95, 0.60, 0.10, 1])
        pcol = bc.createCollisionShape(bc.GEOM_CYLINDER, radius=PERSON_RADIUS, height=PERSON_HEIGHT)
        pvis = bc.createVisualShape(bc.GEOM_CYLINDER, radius=PERSON_RADIUS, length=PERSON_HEIGHT,
                                    rgbaColor=[0.85, 0.20, 0.20, 1])
        robots = [
            bc.createMultiBody(0.0, rcol, rvis, [PARK[0] - 2.0 * i, PARK[1], TRAFFIC_ROBOT_HALF[2]])
            for i in range(self._pool_robots)
        ]
        people = [
            bc.createMultiBody(0.0, pcol, pvis, [PARK[0] - 2.0 * i, PARK[1] + 5.0, 0.5 * PERSON_HEIGHT])
            for i in range(self._pool_people)
        ]
        #: Body of traffic slot ``i`` (robots ``0..MAX_ROBOTS-1``, then people); -1 for a slot the site
        #: never uses.
        self.agents = robots + [-1] * (MAX_ROBOTS - len(robots)) + people + [-1] * (MAX_PEOPLE - len(people))
        self._agent_half_width = np.array(
            [TRAFFIC_ROBOT_HALF[1]] * MAX_ROBOTS + [PERSON_RADIUS] * MAX_PEOPLE, dtype=np.float64
        )
        self._agent_half_length = np.array(
            [TRAFFIC_ROBOT_HALF[0]] * MAX_ROBOTS + [PERSON_RADIUS] * MAX_PEOPLE, dtype=np.float64
        )
        self._agent_z = [TRAFFIC_ROBOT_HALF[2]] * MAX_ROBOTS + [0.5 * PERSON_HEIGHT] * MAX_PEOPLE
        # lidar rays in the robot's base frame, transformed by PyBullet
        angles = 2.0 * np.pi * np.arange(LIDAR_RAYS) / LIDAR_RAYS
        self.lidar_angles = angles
        self._ray_from = [[0.0, 0.0, LIDAR_HEIGHT]] * LIDAR_RAYS
        self._ray_to = [
            [LIDAR_RANGE * math.cos(a), LIDAR_RANGE * math.sin(a), LIDAR_HEIGHT] for a in angles.tolist()
        ]
        cid = sim.id
        self._ray_batch = functools.partial(
            p.rayTestBatch, self._ray_from, self._ray_to, parentObjectUniqueId=self.robot,
            parentLinkIndex=-1, physicsClientId=cid,
        )
        self._base_pose = functools.partial(p.getBasePositionAndOrientation, self.robot, physicsClientId=cid)
        self._base_vel = functools.partial(p.getBaseVelocity, self.robot, physicsClientId=cid)
        self._contacts = functools.partial(p.getContactPoints, bodyA=self.robot, physicsClientId=cid)
        self._motors = functools.partial(
            p.setJointMotorControlArray, self.robot, [0, 1], p.VELOCITY_CONTROL,
            forces=[WHEEL_TORQUE, WHEEL_TORQUE], physicsClientId=cid,
        )
        self._move = functools.partial(p.resetBasePositionAndOrientation, physicsClientId=cid)
        self._n_agents = 0
        self._set_obstacles([self.structure])
        self.layout = lay
        # robot state before the first reset (the spaces are built from it)
        self.robot_xy, self.robot_z, self.robot_yaw = (0.0, 0.0), BODY_Z, 0.0
        self.robot_vel, self.robot_speed = (0.0, 0.0, 0.0), 0.0
        self.lidar = np.full(LIDAR_RAYS, LIDAR_RANGE)
        self._collided = False
        self._load_task_scene()

    def _build_robot(self) -> int:
        """Create the differential-drive robot; returns its body id (wheel joints 0 and 1)."""
        bc = self.sim.bc
        body_col = bc.createCollisionShape(bc.GEOM_BOX, halfExtents=list(BODY_HALF))
        body_vis = bc.createVisualShape(
            bc.GEOM_BOX, halfExtents=list(BODY_HALF), rgbaColor=[0.2, 0.7, 0.3, 1]
        )
        wheel_col = bc.createCollisionShape(bc.GEOM_CYLINDER, radius=WHEEL_RADIUS, height=WHEEL_WIDTH)
        wheel_vis = bc.createVisualShape(bc.GEOM_CYLINDER, radius=WHEEL_RADIUS, length=WHEEL_WIDTH,
                                         rgbaColor=[0.1, 0.1, 0.1, 1])
        caster_col = bc.createCollisionShape(bc.GEOM_SPHERE, radius=0.03)
        caster_vis = bc.createVisualShape(bc.GEOM_SPHERE, radius=0.03, rgbaColor=[0.3, 0.3, 0.3, 1])
        # cylinders have their axis along local z: turn the wheel links so it points along y
        wheel_q = bc.getQuaternionFromEuler([-math.pi / 2, 0.0, 0.0])
        wz = WHEEL_RADIUS - BODY_Z
        robot = bc.createMultiBody(
            baseMass=BODY_MASS,
            baseCollisionShapeIndex=body_col,
            baseVisualShapeIndex=body_vis,
            basePosition=[0.0, 0.0, BODY_Z],
            linkMasses=[1.0, 1.0, 0.5, 0.5],  # ROBOT_MASS - BODY_MASS in all
            linkCollisionShapeIndices=[wheel_col, wheel_col, caster_col, caster_col],
            linkVisualShapeIndices=[wheel_vis, wheel_vis, caster_vis, caster_vis],
            linkPositions=[
                [0.0, 0.5 * WHEEL_TRACK, wz],
                [0.0, -0.5 * WHEEL_TRACK, wz],
                [0.22, 0.0, 0.03 - BODY_Z],
                [-0.22, 0.0, 0.03 - BODY_Z],
            ],
            linkOrientations=[wheel_q, wheel_q, [0, 0, 0, 1], [0, 0, 0, 1]],
            linkInertialFramePositions=[[0, 0, 0]] * 4,
            linkInertialFrameOrientations=[[0, 0, 0, 1]] * 4,
            linkParentIndices=[0, 0, 0, 0],
            linkJointTypes=[bc.JOINT_REVOLUTE, bc.JOINT_REVOLUTE, bc.JOINT_FIXED, bc.JOINT_FIXED],
            linkJointAxis=[[0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0]],
        )
        for link in (0, 1):
            bc.changeDynamics(robot, link, lateralFriction=1.0, rollingFriction=0.0, spinningFriction=0.0)
        for link in (2, 3):  # ball casters: roll freely in every direction
            bc.changeDynamics(robot, link, lateralFriction=0.0, rollingFriction=0.0, spinningFriction=0.0)
        bc.changeDynamics(robot, -1, lateralFriction=0.5)
        return robot

    def _load_task_scene(self) -> None:
        """Create the task's own bodies (subclasses)."""

    # ------------------------------------------------------------------ site
    def _apply_site(self, params: Mapping[str, float | int]) -> None:
        layout = Layout(int(params["n_aisles"]), float(params["aisle_width"]), int(params["shelf_units"]))
        # another layout, or a site assigned to ``env.site`` since the world was built (its traffic
        # pool may be too small: slots without a body would make every contact a collision)
        if not self._building and (layout != self._built_layout or self.site is not self._pool_site):
            self._rebuild_for_layout(layout)
        self.layout = layout
        self._lidar_noise = float(params["lidar_noise"])
        self._lidar_dropout = float(params["lidar_dropout"])
        self._traffic_speed = float(params["traffic_speed"])
        self._n_robots = int(params["n_robots"])
        self._n_people = int(params["n_people"])
        self.sim.bc.changeDynamics(self.floor, -1, lateralFriction=float(params["floor_friction"]))
        self._apply_task_site(params)

    def _apply_task_site(self, params: Mapping[str, float | int]) -> None:
        """Apply the task's own site parameters (subclasses)."""

    def _prepare_world(self, params: Mapping[str, float | int]) -> None:
        """Build the next world for the episode's layout (one build per reset, not lab's then this one)."""
        self._scene_layout = Layout(
            int(params["n_aisles"]), float(params["aisle_width"]), int(params["shelf_units"])
        )

    def _rebuild_for_layout(self, layout: Layout) -> None:
        """Build the world again from nothing for ``layout`` (a reset drew another layout).

        The shelving is built for one layout (a box per row segment, in place). A reset that draws a
        different layout than the world holds (sites that vary ``n_aisles``, ``aisle_width`` or
        ``shelf_units``) empties the world and builds it for the new layout, exactly as :meth:`reset`
        does before it samples the site: the engine state is then the one a world built directly for
        this layout has, so the episode does not depend on the layout of the episode before.
        """
        sampled = self.site_params  # the building applies the lab values; the episode keeps its own
        self._scene_layout = layout
        self.sim.reset_world()
        self._build_world()
        self.site_params = sampled
        self._world_fresh = False  # this world is used by the episode being reset

    # ------------------------------------------------------------------ episode
    def _place_layout(self) -> None:
        """Put the shelving and walls (built in place for the layout) back in the collision world.

        ``restore_base_state`` moves every body away and back, but ``restoreState`` leaves a static
        body's entry in the broadphase where it was moved to until the first physics step: the reset's
        lidar scan would miss the shelves. Setting the pose again updates it. Also sets
        ``static_boxes``.
        """
        self._move(self.structure, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0])
        self.static_boxes = _shelf_box_array(self.layout)

    def _place_robot(self, x: float, y: float, yaw: float) -> None:
        """Put the robot at rest at ``(x, y)`` [m] with heading ``yaw`` [rad]."""
        q = [0.0, 0.0, math.sin(0.5 * yaw), math.cos(0.5 * yaw)]
        self._move(self.robot, [x, y, BODY_Z], q)
        self._motors(targetVelocities=[0.0, 0.0])

    def _init_traffic(self, rng: np.random.Generator) -> None:
        """Draw the traffic's lanes, start points, directions and speeds (a fixed number of draws)."""
        lay = self.layout
        n = MAX_ROBOTS + MAX_PEOPLE
        aisle = rng.integers(0, lay.n_aisles, size=n)
        side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        direction = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        lo, hi = lay.aisle_x_range()
        start = rng.uniform(lo + 0.5, hi - 0.5, size=n)
        factor = rng.uniform(0.8, 1.2, size=n)
        active = np.zeros(n, dtype=bool)
        active[: self._n_robots] = True
        active[MAX_ROBOTS : MAX_ROBOTS + self._n_people] = True
        self._agent_idx = np.flatnonzero(active)
        idx = self._agent_idx
        self._n_agents = len(idx)
        centre = np.array([lay.aisle_y(int(k)) for k in aisle[idx]], dtype=np.float64)
        offset = 0.5 * lay.aisle_width - self._agent_half_width[idx] - LANE_MARGIN
        # Per active agent, as lists of Python floats (the same float64 values NumPy computes here):
        # the per-step update works on a handful of numbers, where float arithmetic is ~3x cheaper
        # than NumPy calls on tiny arrays and gives the same IEEE results.
        #: Lane centre y [m], position x [m], direction along x (+-1.0) and speed [m/s] of each agent.
        self.agent_y = (centre + side[idx] * np.maximum(offset, 0.0)).tolist()
        self.agent_x = start[idx].tolist()
        self.agent_dir = direction[idx].tolist()
        self.agent_speed = (self._traffic_speed * factor[idx]).tolist()
        #: Control steps each agent has paused in a row for the robot (or its cart).
        self.agent_waited = [0] * self._n_agents
        #: ``TURN_AROUND_AFTER`` in control steps.
        self._turn_after = round(TURN_AROUND_AFTER / self.sim.control_dt)
        self._agent_lo = (lo + self._agent_half_length[idx]).tolist()
        self._agent_hi = (hi - self._agent_half_length[idx]).tolist()
        self._agent_hw = self._agent_half_width[idx].tolist()
        self._agent_hl = self._agent_half_length[idx].tolist()
        #: Whether each agent is a person (a disc of radius ``PERSON_RADIUS``; else a box).
        self._agent_person = (idx >= MAX_ROBOTS).tolist()
        self._clear_traffic_starts()
        self._agent_bodies = [self.agents[i] for i in idx.tolist()]
        self._agent_zs = [self._agent_z[i] for i in idx.tolist()]
        allowed = self._allowed_contacts()
        #: What the robot may not touch: the shelving and walls and this episode's traffic (parked
        #: traffic waits far off the floor; the floor and the task's allowed bodies are left out).
        self._set_obstacles([b for b in [self.structure, *self._agent_bodies] if b not in allowed])
        self._place_agents()

    def _keep_clear(self) -> list[tuple[float, float, float]]:
        """Where traffic may not start: ``(x, y, radius)`` [m] of the robot as placed for the episode.

        Read from the simulator (the robot was just placed; ``robot_xy`` is read after the traffic).
        Tasks add what the robot pushes.
        """
        (x, y, _), _ = self._base_pose()
        return [(x, y, ROBOT_RADIUS)]

    def _clear_traffic_starts(self) -> None:
        """Move every agent whose drawn start overlaps the robot (or its cart) along its lane, clear of it.

        A lane that passes within the agent's half width of a body's disc (``_keep_clear``) is blocked
        along x for the body's radius plus the agent's half length plus ``START_CLEARANCE``; an agent
        drawn inside a blocked stretch starts at its nearer end that lies on the lane (no random draw:
        every other agent, and every agent of an episode without overlap, starts where it was drawn).
        Without this, in aisles narrower than about 2.4 m a person or robot could be placed on the
        robot or the cart, and the episode ended at its first step in ``collision`` or ``lost_cart``.
        """
        keep = self._keep_clear()
        for i, (x, y, hw, hl) in enumerate(zip(
            self.agent_x, self.agent_y, self._agent_hw, self._agent_hl, strict=True,
        )):
            spans = sorted(
                (ox - r - hl - START_CLEARANCE, ox + r + hl + START_CLEARANCE)
                for ox, oy, r in keep
                if abs(oy - y) < hw + r
            )
            merged: list[list[float]] = []
            for a, b in spans:
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            for a, b in merged:
                if a < x < b:
                    ends = [e for e in (a, b) if self._agent_lo[i] <= e <= self._agent_hi[i]]
                    if ends:
                        self.agent_x[i] = min(ends, key=lambda e: abs(e - x))
                    break

    def _place_agents(self) -> None:
        move = self._move
        for body, x, y, z, d in zip(self._agent_bodies, self.agent_x, self.agent_y, self._agent_zs,
                                    self.agent_dir, strict=True):
            move(body, [x, y, z], [0.0, 0.0, 0.0, 1.0] if d > 0 else [0.0, 0.0, 1.0, 0.0])

    def _step_traffic(self) -> None:
        """Advance the traffic by one control step, yielding to the robot ahead in its lane.

        An agent that paused for ``TURN_AROUND_AFTER`` [s] in a row (``agent_waited`` counts its
        control steps) reverses its direction there and moves from the next step on. One that steps
        past its lane's end turns and walks the rest of the step back, or stops at the end if the
        robot is right behind it there (:func:`_must_wait` at the end, for the new direction). No
        step may bring the agent's body within ``CONTACT_MARGIN`` of the robot's footprint (or the
        cart) and closer than it is (:func:`_step_touches`); a step held back counts as a pause.

        Plain float arithmetic per agent (a handful of agents), operation for operation what the
        vectorised NumPy form computes: the same float64 results.
        """
        if not self._n_agents:
            return
        yield_to = self._yield_to()
        keep_off = self._keep_off()
        dt, turn_after = self.sim.control_dt, self._turn_after
        xs, dirs, waited = self.agent_x, self.agent_dir, self.agent_waited
        for i, (x, y, d, speed, hl, hw, person, lo, hi) in enumerate(zip(
            xs, self.agent_y, dirs, self.agent_speed, self._agent_hl, self._agent_hw, self._agent_person,
            self._agent_lo, self._agent_hi, strict=True,
        )):
            new_x, new_d, end = x + d * speed * dt, d, None
            if new_x > hi or new_x < lo:
                # past its lane's end: it turns there and walks the rest of the step back, unless the
                # robot is right behind it at the end (the waiting rule, from the end, for the way it
                # then faces): then it stops at the end
                end = hi if new_x > hi else lo
                new_d = -d
                new_x = end if _must_wait(end, y, new_d, hl, hw, yield_to) else 2.0 * end - new_x
            if _must_wait(x, y, d, hl, hw, yield_to) or _step_touches(
                x, new_x, end, y, hl, hw, person, keep_off
            ):
                waited[i] += 1
                if waited[i] >= turn_after:  # gives way: back the way it came (moves from the next step)
                    dirs[i], waited[i] = -d, 0
                continue
            waited[i] = 0
            xs[i], dirs[i] = new_x, new_d
        self._place_agents()

    def _keep_off(self) -> list[tuple[float, float, float, float, float, float]]:
        """What no traffic step may touch: rectangles ``(x, y, cos yaw, sin yaw, half x, half y)`` [m].

        The robot's footprint (``FOOTPRINT_HALF``: body and wheels) at its pose read after the last
        physics step; tasks add what the robot pushes.
        """
        x, y = self.robot_xy
        return [(x, y, math.cos(self.robot_yaw), math.sin(self.robot_yaw), *FOOTPRINT_HALF)]

    def _yield_to(self) -> list[tuple[tuple[float, float], float]]:
        """What the traffic waits for: ``((x, y) [m], radius [m])`` of the robot (and what it moves)."""
        return [(self.robot_xy, ROBOT_RADIUS)]

    # ------------------------------------------------------------------ per step
    def _apply_action(self, action: list[float]) -> None:
        v = action[0] * MAX_LINEAR
        w = action[1] * MAX_ANGULAR
        half = 0.5 * WHEEL_TRACK * w
        # wheel 0 is on the left (+y); both joint axes point along +y after the link rotation, so a
        # positive joint speed rolls a wheel forwards (+x)
        self._motors(targetVelocities=[(v - half) / WHEEL_RADIUS, (v + half) / WHEEL_RADIUS])
        self._step_traffic()
        self._before_physics()

    def _before_physics(self) -> None:
        """Hook run after the wheels are commanded, before the physics steps (subclasses)."""

    def _read_state(self) -> None:
        pos, orn = self._base_pose()
        lin, ang = self._base_vel()
        self.robot_xy = (pos[0], pos[1])
        self.robot_z = pos[2]
        x, y, z, w = orn
        self.robot_yaw = math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
        c, s = math.cos(self.robot_yaw), math.sin(self.robot_yaw)
        self.robot_vel = (c * lin[0] + s * lin[1], -s * lin[0] + c * lin[1], ang[2])
        self.robot_speed = math.hypot(lin[0], lin[1])
        hits = self._cast_rays()
        floor = self.floor
        frac = np.array([1.0 if h[0] == floor else h[2] for h in hits], dtype=np.float64)
        ranges = frac * LIDAR_RANGE
        # exactly two draws per step, whatever the site, so the env's random stream stays aligned
        noise = self.np_random.normal(0.0, 1.0, size=LIDAR_RAYS)
        drop = self.np_random.random(LIDAR_RAYS) < self._lidar_dropout
        if self._lidar_noise > 0.0:
            ranges = np.clip(ranges + self._lidar_noise * noise, 0.0, LIDAR_RANGE)
        ranges[drop] = LIDAR_RANGE
        self.lidar = ranges
        self._collided = self._robot_collided()
        self._read_task_state()

    def _cast_rays(self) -> tuple[tuple[Any, ...], ...]:
        """Cast the ``LIDAR_RAYS`` lidar rays once (one batched ``rayTestBatch`` call).

        A method of the class, stable across world rebuilds (the bound call ``_ray_batch`` is made
        again for every new world), so a profiler or benchmark can time the scan by wrapping it.

        Returns:
            One PyBullet hit tuple per ray: ``(body id or -1, link, hit fraction in [0, 1], position
            [m], normal)``.
        """
        return self._ray_batch()

    def _robot_collided(self) -> bool:
        """Whether the robot touches anything but the floor (or the task's allowed contacts).

        See :meth:`_touches_obstacle` for the contact queries.
        """
        return self._touches_obstacle(self._contacts)

    def _set_obstacles(self, bodies: list[int]) -> None:
        """Set what the robot (and what it pushes) may not touch: ``_obstacles`` and its set."""
        self._obstacles = bodies
        self._obstacle_set = frozenset(bodies)

    def _touches_obstacle(self, contacts: Any) -> bool:
        """Whether a body touches one of ``_obstacles``; ``contacts`` is ``getContactPoints`` bound to it.

        The same answer either way (the points of a body with ``bodyB=b`` are those of its full list
        whose ``bodyUniqueIdB`` is ``b``); the cheaper query for the number of obstacles, see
        :data:`PER_OBSTACLE_QUERIES`.
        """
        obstacles = self._obstacles
        if len(obstacles) <= PER_OBSTACLE_QUERIES:
            return any(contacts(bodyB=b) for b in obstacles)
        hit = self._obstacle_set
        return any(c[2] in hit for c in contacts())

    def _allowed_contacts(self) -> tuple[int, ...]:
        """Bodies the robot may touch without it being a collision (e.g. the pushed cart)."""
        return ()

    def _read_task_state(self) -> None:
        """Read and cache the task's bodies after each physics update (subclasses)."""

    def robot_pose(self) -> tuple[float, float, float]:
        """Robot position (x, y) [m] and heading yaw [rad], world frame."""
        return self.robot_xy[0], self.robot_xy[1], self.robot_yaw

    def to_robot_frame(self, x: float, y: float) -> tuple[float, float]:
        """World point ``(x, y)`` [m] in the robot frame (forward, leftward) [m]."""
        dx, dy = x - self.robot_xy[0], y - self.robot_xy[1]
        c, s = math.cos(self.robot_yaw), math.sin(self.robot_yaw)
        return c * dx + s * dy, -s * dx + c * dy

    def nav_goal(self) -> tuple[float, float]:
        """The point the robot's observation reports as its goal (x, y) [m], world frame (subclasses)."""
        raise NotImplementedError

    def _robot_observation(self) -> list[float]:
        gx, gy = self.nav_goal()
        fx, fy = self.to_robot_frame(gx, gy)
        c, s = math.cos(self.robot_yaw), math.sin(self.robot_yaw)
        return [self.robot_xy[0], self.robot_xy[1], c, s, *self.robot_vel, fx, fy, math.hypot(fx, fy)]

    def _robot_state(self, task: Sequence[float] = ()) -> np.ndarray:
        """The ``state`` vector: the robot part (see the class docstring), then the task's values.

        Returns:
            ``(10 + LIDAR_RAYS + len(task),)`` float64, filled in place (cheaper than passing a list
            of 82+ floats through ``np.array``; the same values).
        """
        n = 10 + LIDAR_RAYS
        out = np.empty(n + len(task), dtype=np.float64)
        out[:10] = self._robot_observation()
        out[10:n] = self.lidar
        if task:
            out[n:] = task
        return out

    def _robot_bounds(self) -> tuple[list[float], list[float]]:
        b = self.goal_bound
        low = [-b, -b, -1.0, -1.0, -5.0, -5.0, -10.0, -2 * b, -2 * b, 0.0] + [0.0] * LIDAR_RAYS
        high = [b, b, 1.0, 1.0, 5.0, 5.0, 10.0, 2 * b, 2 * b, 3 * b] + [LIDAR_RANGE] * LIDAR_RAYS
        return low, high

    def _camera(self) -> tuple[Any, Any, float]:
        """On-board camera: 0.5 m above the floor at the robot's front, looking ahead and slightly down."""
        x, y, yaw = self.robot_pose()
        c, s = math.cos(yaw), math.sin(yaw)
        eye = (x + 0.32 * c, y + 0.32 * s, 0.55)
        target = (x + 2.32 * c, y + 2.32 * s, 0.35)
        return eye, target, 70.0

    def render(self) -> np.ndarray | None:
        """Render the scene from above, following the robot.

        Returns:
            In ``rgb_array`` mode an image ``(render_size, render_size, 3)`` uint8; ``None`` otherwise.
        """
        if self.render_mode != "rgb_array":
            return None
        x, y, _ = self.robot_pose()
        size = self.render_size
        eye, target = (x - 0.01, y, 12.0), (x, y, 0.0)
        return self.sim.render(size, size, eye, target, 60.0, up=(1.0, 0.0, 0.0), far=15.0)
