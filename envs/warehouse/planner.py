"""Path planning and driving for the warehouse experts.

A cost-to-go field on the aisle grid, path following, and reactive avoidance of traffic from the lidar.

:class:`GridPlanner` rasterises the known layout (shelves and walls) into an occupancy grid of
``RESOLUTION`` cells, inflates it by the robot's radius plus a margin, and runs Dijkstra from the goal
over the 8-connected free cells (``scipy.sparse.csgraph.dijkstra``): the cost to go from *every* cell
at once, i.e. the A* answer for every start. Cells near shelves cost more, so paths keep to the aisle
centre lines. The expert stays reactive (its action depends only on the current state): at each step it
follows the steepest descent of the field from the robot's cell for a look-ahead distance.

:func:`drive_command` turns a look-ahead point into ``(v, w)``: it picks, among candidate headings,
the one closest to the look-ahead direction whose corridor (the robot's width) is free in the lidar
scan for the distance it needs, and slows down for obstacles ahead, sharp turns and the goal (braking
within what the floor friction allows). :func:`guard_command` then replaces a command that would bring
the robot's footprint onto a lidar return (a corner swinging into traffic that stopped beside it, the
body sliding into a shelf) by a safe one: the turn on the spot, straight on, backing off or standing
still.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra

from loopsim.envs.warehouse.base import (
    FOOTPRINT_HALF,
    LIDAR_RANGE,
    MAX_ANGULAR,
    MAX_LINEAR,
    ROBOT_MASS,
    ROBOT_RADIUS,
    WHEEL_RADIUS,
    WHEEL_TORQUE,
    WHEEL_TRACK,
    Layout,
)

__all__ = [
    "GridPlanner", "cos_sin", "drive_accel", "drive_command", "guard_command", "lidar_points", "predict_pose",
    "scan_from",
]

#: Grid cell size [m].
RESOLUTION = 0.1
#: Extra clearance beyond the robot's radius when inflating obstacles [m].
INFLATE_MARGIN = 0.06
#: Cells closer than this to an obstacle (before inflation) cost more, up to 1 + ``CENTRE_WEIGHT`` [m].
CENTRE_BAND, CENTRE_WEIGHT = 1.2, 3.0
#: Share of ``g * floor_friction`` the drive wheels' grip gives the robot alone as acceleration,
#: measured from rest at full command: 2.1 m/s^2 at friction 0.3, 0.65 m/s^2 at 0.1, so about 0.7 (the
#: casters carry part of the weight). At friction 1 that is 6.9 m/s^2, below the motors' 8.7.
DRIVE_GRIP = 0.7
_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


class GridPlanner:
    """Cost-to-go field to one goal on the occupancy grid of a layout.

    Args:
        layout: The warehouse layout (shelves and walls are the obstacles).
        goal: Goal point (x, y) [m], world frame.
        extra_boxes: More static obstacles ``(K, 4)`` as ``(x_min, x_max, y_min, y_max)`` [m].

    Raises:
        ValueError: If the goal is not in a free cell (too close to a shelf or wall).
    """

    def __init__(
        self, layout: Layout, goal: tuple[float, float], extra_boxes: np.ndarray | None = None
    ) -> None:
        self.layout = layout
        self.goal = (float(goal[0]), float(goal[1]))
        r = RESOLUTION
        self.x0, self.y0 = layout.x_min, -layout.y_max
        nx = int(math.ceil((layout.x_max - layout.x_min) / r))
        ny = int(math.ceil(2.0 * layout.y_max / r))
        self.shape = (nx, ny)
        occ = np.zeros((nx, ny), dtype=bool)
        occ[0, :] = occ[-1, :] = occ[:, 0] = occ[:, -1] = True  # walls
        boxes = [*layout.shelf_boxes(), *([] if extra_boxes is None else [tuple(b) for b in extra_boxes])]
        for x0, x1, y0, y1 in boxes:
            i0, i1 = self._index(x0, self.x0), self._index(x1, self.x0)
            j0, j1 = self._index(y0, self.y0), self._index(y1, self.y0)
            occ[max(i0, 0) : min(i1 + 1, nx), max(j0, 0) : min(j1 + 1, ny)] = True
        clearance = ndimage.distance_transform_edt(~occ) * r  # [m] to the nearest obstacle cell
        self.free = clearance > ROBOT_RADIUS + INFLATE_MARGIN
        cost = 1.0 + CENTRE_WEIGHT * np.clip((CENTRE_BAND - clearance) / CENTRE_BAND, 0.0, 1.0)
        gi, gj = self.cell(*self.goal)
        if not self.free[gi, gj]:
            raise ValueError(f"goal {self.goal} is not in free space")
        # 8-connected graph over free cells; edge weight = length x mean cost of its two cells
        ids = -np.ones((nx, ny), dtype=np.int64)
        fi, fj = np.nonzero(self.free)
        ids[fi, fj] = np.arange(len(fi))
        rows, cols, weights = [], [], []
        for di, dj in _NEIGHBOURS:
            ti, tj = fi + di, fj + dj
            ok = (ti >= 0) & (ti < nx) & (tj >= 0) & (tj < ny)
            ok[ok] &= self.free[ti[ok], tj[ok]]
            a, b = ids[fi[ok], fj[ok]], ids[ti[ok], tj[ok]]
            length = r * math.hypot(di, dj)
            rows.append(a)
            cols.append(b)
            weights.append(length * 0.5 * (cost[fi[ok], fj[ok]] + cost[ti[ok], tj[ok]]))
        n = len(fi)
        graph = coo_matrix(
            (np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
        ).tocsr()
        dist = dijkstra(graph, directed=True, indices=int(ids[gi, gj]))
        self.cost_to_go = np.full((nx, ny), np.inf)
        self.cost_to_go[fi, fj] = dist
        # the next cell on the best path from every cell (steepest descent of the field)
        padded = np.pad(self.cost_to_go, 1, constant_values=np.inf)
        stack = np.stack([padded[1 + di : 1 + di + nx, 1 + dj : 1 + dj + ny] for di, dj in _NEIGHBOURS])
        best = np.argmin(stack, axis=0)
        better = np.take_along_axis(stack, best[None], 0)[0] < self.cost_to_go
        offs = np.array(_NEIGHBOURS)
        self.next_i = np.where(better, np.arange(nx)[:, None] + offs[best, 0], -1)
        self.next_j = np.where(better, np.arange(ny)[None, :] + offs[best, 1], -1)

    @staticmethod
    def _index(v: float, origin: float) -> int:
        return int(math.floor((v - origin) / RESOLUTION))

    def cell(self, x: float, y: float) -> tuple[int, int]:
        """Grid cell of ``(x, y)`` [m], clamped to the grid."""
        i = min(max(self._index(x, self.x0), 0), self.shape[0] - 1)
        j = min(max(self._index(y, self.y0), 0), self.shape[1] - 1)
        return i, j

    def centre(self, i: int, j: int) -> tuple[float, float]:
        """World coordinates [m] of the centre of cell ``(i, j)``."""
        return self.x0 + (i + 0.5) * RESOLUTION, self.y0 + (j + 0.5) * RESOLUTION

    def _nearest_reachable(self, i: int, j: int) -> tuple[int, int]:
        """The closest cell with a finite cost to go (the robot may stand in an inflated cell)."""
        if math.isfinite(self.cost_to_go[i, j]):
            return i, j
        for radius in range(1, 12):
            i0, i1 = max(i - radius, 0), min(i + radius + 1, self.shape[0])
            j0, j1 = max(j - radius, 0), min(j + radius + 1, self.shape[1])
            window = self.cost_to_go[i0:i1, j0:j1]
            finite = np.isfinite(window)
            if finite.any():
                ci, cj = np.nonzero(finite)
                d = (ci + i0 - i) ** 2 + (cj + j0 - j) ** 2
                k = int(np.argmin(d))
                return int(ci[k] + i0), int(cj[k] + j0)
        return i, j

    def lookahead(self, x: float, y: float, distance: float) -> tuple[float, float]:
        """Point [m] about ``distance`` [m] ahead along the best path from ``(x, y)`` (the goal if closer)."""
        i, j = self._nearest_reachable(*self.cell(x, y))
        steps = max(1, int(distance / RESOLUTION))
        for _ in range(steps):
            ni, nj = int(self.next_i[i, j]), int(self.next_j[i, j])
            if ni < 0:
                return self.goal
            i, j = ni, nj
        return self.centre(i, j)

    def remaining(self, x: float, y: float) -> float:
        """Cost to go from ``(x, y)`` [weighted m]; ``inf`` where no path exists."""
        return float(self.cost_to_go[self._nearest_reachable(*self.cell(x, y))])


_CANDIDATES = np.deg2rad(np.arange(-90, 91, 10, dtype=np.float64))


def cos_sin(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and sine of every angle through ``math`` (the C library), not ``np.cos`` / ``np.sin``.

    NumPy picks its float64 ``sin`` / ``cos`` / ``arctan2`` kernels by CPU (``__cpu_targets_info__``
    in ``numpy._core._multiarray_umath`` lists AVX2 and AVX-512 variants beside the baseline), which
    need not round alike; the expert's choices must not depend on the machine it runs on (README,
    Engine). The C library picks its routines by CPU too, but only FMA or not: the same on every CPU
    with AVX2 and FMA, as PyBullet's own sines and cosines are. On an AVX2 machine the results equal
    NumPy's bit for bit.

    Args:
        angles: ``(N,)`` angles [rad].

    Returns:
        ``(cos, sin)``, each ``(N,)`` float64.
    """
    n = len(angles)
    return (np.fromiter(map(math.cos, angles), np.float64, n),
            np.fromiter(map(math.sin, angles), np.float64, n))


_COS_CANDIDATES, _SIN_CANDIDATES = (v[:, None] for v in cos_sin(_CANDIDATES))
#: Clearance kept around the footprint when checking a command [m].
FOOTPRINT_MARGIN = 0.03
#: Speed of the straight reverse tried when neither the turn nor going straight on is safe [m/s].
BACK_OFF_SPEED = 0.2
#: How far ahead the footprint check predicts the robot's motion [s] (two control steps).
FOOTPRINT_HORIZON = 0.2


def drive_command(
    target_fx: float,
    target_fy: float,
    goal_distance: float,
    lidar: np.ndarray,
    lidar_angles: np.ndarray,
    max_decel: float,
    half_width: float = 0.34,
) -> tuple[float, float]:
    """``(v, w)`` actions in ``[-1, 1]`` to drive towards a look-ahead point, avoiding lidar obstacles.

    The command is then passed through :func:`guard_command` (no move that brings the footprint onto
    a lidar return).

    Args:
        target_fx: Look-ahead point, forward of the robot [m].
        target_fy: Look-ahead point, leftward of the robot [m].
        goal_distance: Distance left to the final goal [m] (the robot brakes to stop there).
        lidar: ``(N,)`` ranges [m].
        lidar_angles: ``(N,)`` ray angles in the robot frame [rad].
        max_decel: Deceleration the robot may plan with [m/s^2].
        half_width: Half width of the corridor that must be free ahead [m].

    Returns:
        ``(v, w)``: linear and angular commands in ``[-1, 1]`` (times ``MAX_LINEAR``, ``MAX_ANGULAR``).
    """
    bearing = math.atan2(target_fy, target_fx)
    # obstacle points in the robot frame
    px, py = lidar_points(lidar, lidar_angles)
    # clearance along each candidate heading: nearest point inside the robot-wide corridor
    c, s = _COS_CANDIDATES, _SIN_CANDIDATES
    along = c * px[None] + s * py[None]
    lateral = np.abs(-s * px[None] + c * py[None])
    blocked = (lateral < half_width) & (along > 0.0)
    if px.size:
        clear = np.where(blocked, along, LIDAR_RANGE).min(axis=1)
    else:
        clear = np.full(len(_CANDIDATES), LIDAR_RANGE)
    need = min(goal_distance, 1.2) + ROBOT_RADIUS - 0.05
    heading = bearing
    straight_clear = _clearance(bearing, px, py, half_width)
    if straight_clear < need and abs(bearing) < math.radians(100):
        ok = clear >= need
        if ok.any():
            k = int(np.argmin(np.where(ok, np.abs(_CANDIDATES - bearing), np.inf)))
            heading = float(_CANDIDATES[k])
            straight_clear = float(clear[k])
    # forward clearance in the direction of travel limits the speed
    free = straight_clear - ROBOT_RADIUS - 0.1
    v = min(MAX_LINEAR, math.sqrt(2.0 * max_decel * max(goal_distance - 0.05, 0.0)))
    v = min(v, max(0.0, 0.9 * free))
    turn = abs(heading)
    if turn > math.radians(60):
        v = 0.0
    else:
        v *= math.cos(turn)
    w = max(-MAX_ANGULAR, min(MAX_ANGULAR, 2.0 * heading))
    v, w = guard_command(v, w, px, py)
    if goal_distance < 0.12:
        v, w = 0.0, 0.0
    return v / MAX_LINEAR, w / MAX_ANGULAR


def lidar_points(lidar: np.ndarray, lidar_angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scan's returns as points in the robot frame, rays that hit nothing left out.

    Args:
        lidar: ``(N,)`` ranges [m].
        lidar_angles: ``(N,)`` ray angles in the robot frame [rad].

    Returns:
        ``(px, py)``: forward and leftward coordinates ``(M,)`` [m] of the ``M`` returns.
    """
    real = lidar < LIDAR_RANGE - 1e-6
    r, a = lidar[real], lidar_angles[real]
    c, s = cos_sin(a)
    return r * c, r * s


def drive_accel(floor_friction: float, load_mass: float = 0.0, load_friction: float = 0.0) -> float:
    """The most the robot's speed can change in a second, alone or pushing a load [m/s^2].

    The drive force is the smaller of the wheels' grip, ``DRIVE_GRIP * g * floor_friction`` times the
    robot's mass, and the motors' ``2 * WHEEL_TORQUE / WHEEL_RADIUS`` [N]; a load's friction
    ``load_friction * g * load_mass`` [N] is taken off it, and the rest accelerates robot and load.

    Args:
        floor_friction: The site's ``floor_friction`` (times the wheels' 1.0).
        load_mass: Mass pushed with the robot [kg].
        load_friction: The load's friction coefficient on the floor.

    Returns:
        The acceleration [m/s^2], at least 0.05. :func:`predict_pose` uses it for speeding up and
        slowing down alike; slowing down with a load, the load's friction helps, so the figure is then
        low (with a 95 kg cart on the dry floor 0.15 m/s^2, where friction alone stops the cart at
        1.5 m/s^2): a lagged pusher predicts a longer stop than the cart makes.
    """
    force = min(DRIVE_GRIP * 9.81 * floor_friction * ROBOT_MASS, 2.0 * WHEEL_TORQUE / WHEEL_RADIUS)
    force -= load_friction * 9.81 * load_mass
    return max(0.05, force / (ROBOT_MASS + load_mass))


def predict_pose(
    pose: tuple[float, float, float],
    velocity: tuple[float, float],
    pending: list[list[float]],
    dt: float,
    accel: float,
) -> tuple[float, float, float]:
    """Where the actions still in the actuator queue (``action_delay``) take the robot.

    Integrates the unicycle model over the queued ``(v, w)`` commands, each held for a control step,
    with the base's speeds approaching the commanded ones at most at ``accel`` [m/s^2] (see
    :func:`drive_accel`) and ``accel / (WHEEL_TRACK / 2)`` [rad/s^2] for turning. The base moves at the
    step's mean speeds, along its mean heading.

    Args:
        pose: Robot position x, y [m] and heading yaw [rad], world frame.
        velocity: Robot forward speed [m/s] and yaw rate [rad/s] now.
        pending: Queued actions ``[v, w]`` in ``[-1, 1]``, oldest first (``env.pending_actions``).
        dt: Control period [s].
        accel: The most the forward speed changes in a second [m/s^2].

    Returns:
        ``(x, y, yaw)`` [m, m, rad] after the queued actions, world frame.
    """
    x, y, yaw = pose
    v, w = velocity
    dv = accel * dt
    dw = dv / (0.5 * WHEEL_TRACK)
    for a in pending:
        v1 = v + max(-dv, min(dv, a[0] * MAX_LINEAR - v))
        w1 = w + max(-dw, min(dw, a[1] * MAX_ANGULAR - w))
        step, turn = 0.5 * (v + v1) * dt, 0.5 * (w + w1) * dt
        mid = yaw + 0.5 * turn
        x, y, yaw = x + step * math.cos(mid), y + step * math.sin(mid), yaw + turn
        v, w = v1, w1
    return x, y, yaw


def scan_from(
    lidar: np.ndarray, lidar_angles: np.ndarray, dx: float, dy: float, dyaw: float
) -> tuple[np.ndarray, np.ndarray]:
    """The scan's returns seen from another robot pose, as ranges and angles for :func:`drive_command`.

    Args:
        lidar: ``(N,)`` ranges [m] taken at the current pose.
        lidar_angles: ``(N,)`` ray angles in the current robot frame [rad].
        dx: The other pose's position, forward of the current one [m].
        dy: The other pose's position, leftward of the current one [m].
        dyaw: The other pose's heading minus the current one [rad].

    Returns:
        ``(ranges, angles)``: ``(M,)`` float64 ranges [m] and angles [rad] of the ``M`` returns (rays
        that hit nothing left out) in the other pose's frame; a return that ends up farther than
        ``LIDAR_RANGE`` is left out as well.
    """
    px, py = lidar_points(lidar, lidar_angles)
    c, s = math.cos(dyaw), math.sin(dyaw)
    qx, qy = px - dx, py - dy
    fx, fy = c * qx + s * qy, -s * qx + c * qy
    ranges = np.hypot(fx, fy)
    near = ranges < LIDAR_RANGE - 1e-6
    fy, fx = fy[near], fx[near]
    return ranges[near], np.fromiter(map(math.atan2, fy, fx), np.float64, len(fx))


def guard_command(v: float, w: float, px: np.ndarray, py: np.ndarray) -> tuple[float, float]:
    """``(v, w)`` if it keeps the footprint clear of the lidar points, else a safe replacement.

    A command that would bring the footprint (``FOOTPRINT_HALF`` plus ``FOOTPRINT_MARGIN``) onto a
    lidar return within ``FOOTPRINT_HORIZON`` seconds (a corner swinging or the body sliding into
    traffic that stopped beside the robot, or into a shelf) is replaced by the first safe one of: the
    turn on the spot (standing still, which is always safe, for a command that does not turn),
    straight on at the same speed, straight back at ``BACK_OFF_SPEED``, the turn on the spot the
    other way, straight on at ``BACK_OFF_SPEED`` (if the command was not forwards), standing still.
    (Without the last two, a robot whose turn swung a corner into a shelf, with its back against
    another, stood still for good: the same state gave the same command.)
    A robot already closer than the margin to a return may make any move that brings nothing
    closer than its nearest return is now. Returns inside the footprint itself are range noise (the
    scanner cannot see into the robot) and are left out.

    Args:
        v: Forward speed [m/s] (negative: backwards).
        w: Turn rate [rad/s].
        px: Lidar points, forward coordinate in the robot frame ``(M,)`` [m].
        py: Lidar points, leftward coordinate in the robot frame ``(M,)`` [m].

    Returns:
        ``(v, w)`` [m/s, rad/s].

    Raises:
        ValueError: If ``v`` or ``w`` is not finite, a point is not finite (a NaN compares as clear
            and would let any command through), or ``px`` and ``py`` differ in shape.
    """
    if not (math.isfinite(v) and math.isfinite(w)):
        raise ValueError(f"guard_command: the command (v={v}, w={w}) must be finite")
    if px.shape != py.shape:
        raise ValueError(f"guard_command: px {px.shape} and py {py.shape} must have one shape")
    if not px.size:
        return v, w
    if not (np.isfinite(px).all() and np.isfinite(py).all()):
        raise ValueError("guard_command: every lidar point must be finite (a missing return is left out, "
                         "not given as NaN or inf)")
    # a return inside the footprint is range noise: the scanner, above the body, cannot see into the
    # robot, and anything really there has already hit it. Kept, it set the least clearance below
    # zero and so relaxed the guard below for any command (38% of steps at lidar_noise 0.5 m).
    hx, hy = FOOTPRINT_HALF
    outside = np.maximum(np.abs(px) - hx, np.abs(py) - hy) >= 0.0
    if not outside.all():
        px, py = px[outside], py[outside]
        if not px.size:
            return v, w
    # clear: FOOTPRINT_MARGIN outside the footprint, or, for a robot that stands closer than that
    # already, no closer than now (so it can move off a shelf it stopped next to)
    need = min(FOOTPRINT_MARGIN, _footprint_clearance(px, py, 0.0, 0.0))
    if _safe_motion(px, py, v, w, need):
        return v, w
    options = [(0.0, w), *([(v, 0.0)] if v else []), (-BACK_OFF_SPEED, 0.0), *([(0.0, -w)] if w else []),
               *([(BACK_OFF_SPEED, 0.0)] if v <= 0.0 else [])]
    return next((o for o in options if _safe_motion(px, py, *o, need)), (0.0, 0.0))


def _safe_motion(px: np.ndarray, py: np.ndarray, v: float, w: float, need: float) -> bool:
    """Whether ``(v, w)`` keeps every lidar point ``need`` [m] clear of the footprint for the horizon.

    The turn lags the forward motion on the simulated robot (wheel motors and inertia), so a command
    that turns and moves is checked both as commanded and as going straight on. The other arguments
    as for :func:`_footprint_clearance`.
    """
    if _footprint_clearance(px, py, v, w) < need:
        return False
    return not (v and w and _footprint_clearance(px, py, v, 0.0) < need)


def _footprint_clearance(px: np.ndarray, py: np.ndarray, v: float, w: float) -> float:
    """Least clearance [m] of the lidar points from the footprint after ``FOOTPRINT_HORIZON`` of ``(v, w)``.

    A point's clearance is ``max(|bx| - hx, |by| - hy)`` in the moved footprint's frame (``hx, hy`` =
    ``FOOTPRINT_HALF``): below ``m`` exactly when the point is inside the footprint grown by ``m`` on
    every side, negative inside the footprint. The motion is the unicycle's, to first order: ``v t``
    forward, then a turn by ``w t``.

    Args:
        px: Lidar points, forward coordinate in the robot frame ``(M,)``, ``M >= 1`` [m].
        py: Lidar points, leftward coordinate in the robot frame ``(M,)`` [m].
        v: Forward speed [m/s] (negative: backwards).
        w: Turn rate [rad/s].

    Returns:
        The least clearance over the points [m].
    """
    t = FOOTPRINT_HORIZON
    a = w * t
    c, s = math.cos(a), math.sin(a)
    qx = px - v * t
    bx = c * qx + s * py
    by = -s * qx + c * py
    hx, hy = FOOTPRINT_HALF
    return float(np.maximum(np.abs(bx) - hx, np.abs(by) - hy).min())


def _clearance(heading: float, px: np.ndarray, py: np.ndarray, half_width: float) -> float:
    """Distance [m] to the nearest lidar point in the corridor along ``heading`` (robot frame)."""
    if not px.size:
        return LIDAR_RANGE
    c, s = math.cos(heading), math.sin(heading)
    along = c * px + s * py
    lateral = np.abs(-s * px + c * py)
    hit = (lateral < half_width) & (along > 0.0)
    return float(along[hit].min()) if hit.any() else LIDAR_RANGE
