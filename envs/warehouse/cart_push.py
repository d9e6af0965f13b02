"""``loopsim/WarehouseCartPush-v0``: push a loaded cart from a bay to a packing station."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import pybullet as p

from loopsim.envs.core.env import Evaluation
from loopsim.envs.core.expert import Expert
from loopsim.envs.warehouse.base import (
    BODY_HALF,
    END_CROSS,
    FOOTPRINT_HALF,
    LIDAR_RANGE,
    MAX_ANGULAR,
    MAX_LINEAR,
    WarehouseEnv,
)
from loopsim.envs.warehouse.planner import cos_sin, drive_accel, predict_pose

__all__ = ["WarehouseCartPushEnv", "WarehouseCartPushExpert", "CART_HALF", "STATION_HALF"]

#: Cart half extents (x, y, z) [m]: a low platform cart, below the lidar plane (0.28 m).
CART_HALF = (0.45, 0.32, 0.11)
#: Friction coefficient of the cart on the floor (times ``floor_friction``): its wheels' rolling resistance.
CART_FRICTION = 0.15
#: Deceleration of a coasting cart on a floor of friction 1 [m/s^2] (Coulomb: mu g).
CART_FRICTION_DECEL = CART_FRICTION * 9.81
#: Half size of the square packing-station zone [m].
STATION_HALF = 0.5
#: Speed below which the cart counts as at rest [m/s].
CART_REST_SPEED = 0.1


class WarehouseCartPushEnv(WarehouseEnv):
    """Push a loaded cart from a bay along its aisle to a packing station in a cross aisle.

    **Description.** The warehouse of :class:`~loopsim.envs.warehouse.navigate.WarehouseNavigateEnv`
    (same robot, lidar, layout and traffic). A platform cart (0.90 x 0.64 m, 0.22 m high, so the lidar
    sees over it; 40 kg at ``lab``; friction 0.15 x ``floor_friction`` to the floor) stands in a bay on
    an aisle's centre line. The robot starts behind it (on the side away from the station) and must
    push it with its front bumper to the packing station: a 1.0 x 1.0 m zone in the end cross aisle at
    that aisle's end. Nothing holds the cart to the robot: it stays in front only while pushed straight.

    **Randomizations** (from ``env.np_random`` at reset): the aisle, the module the cart starts at, which
    end the station is at, the cart's offset (+-0.1 m) and yaw (+-0.1 rad), the robot's gap behind the
    cart (0.2-0.5 m), lateral offset (+-0.1 m) and heading (+-0.3 rad); the traffic; every site
    parameter (``cart_mass`` is this task's own).

    **Success.** The cart's centre is inside the station zone (within 0.5 m of its centre along x and
    y) and the cart moves slower than 0.1 m/s.

    **Episode end.** ``terminated`` on success, ``collision`` (the robot touches a shelf, wall, robot or
    person; touching the cart is pushing) or ``lost_cart`` (the cart hits a shelf, wall, robot or
    person, or tips over). ``truncated`` after ``max_steps`` (default 500 = 50 s): ``timeout``.

    **Observation** (``state``, float32, ``(92,)``): the robot part of
    :class:`~loopsim.envs.warehouse.base.WarehouseEnv` with the station as the goal (82 values), then
    the cart in the robot frame: position (forward, leftward) [m], heading (cos, sin of its yaw
    relative to the robot's), velocity (forward, leftward) [m/s], and the station relative to the cart
    in the robot frame (forward, leftward) [m] and the cart-station distance [m] and the cart's speed
    [m/s]. ``goal`` mode: ``achieved_goal`` = cart (x, y, 0), ``desired_goal`` = station (x, y, 0) [m].

    **Action** ``(2,)`` in [-1, 1]: forward speed x 1.0 m/s and turn rate x 1.5 rad/s.

    **Rewards.** ``dense``: minus the cart-station distance [m]; ``sparse``: 0 when the cart's centre
    is inside the station zone, else -1.

    **Version history.** v0: initial version.
    """

    expert_entry_point: ClassVar[str] = "loopsim.envs.warehouse.cart_push:WarehouseCartPushExpert"
    default_max_steps: ClassVar[int] = 500
    goal_distance_threshold: ClassVar[float] = STATION_HALF
    goal_box: ClassVar[tuple[float, float, float]] = (STATION_HALF, STATION_HALF, STATION_HALF)

    def _load_task_scene(self) -> None:
        bc = self.sim.bc
        col = bc.createCollisionShape(bc.GEOM_BOX, halfExtents=list(CART_HALF))
        vis = bc.createVisualShape(bc.GEOM_BOX, halfExtents=list(CART_HALF), rgbaColor=[0.6, 0.45, 0.25, 1])
        self.cart = bc.createMultiBody(40.0, col, vis, [-300.0, -300.0, CART_HALF[2]])
        cid = self.sim.id
        self._cart_pose = functools.partial(p.getBasePositionAndOrientation, self.cart, physicsClientId=cid)
        self._cart_vel = functools.partial(p.getBaseVelocity, self.cart, physicsClientId=cid)
        self._cart_contacts = functools.partial(p.getContactPoints, bodyA=self.cart, physicsClientId=cid)
        self.station = (0.0, 0.0)
        self.cart_xy, self.cart_yaw, self.cart_v, self.cart_z_up = (0.0, 0.0), 0.0, (0.0, 0.0), 1.0
        self._cart_hit = False

    def _apply_task_site(self, params: Mapping[str, float | int]) -> None:
        m = float(params["cart_mass"])
        hx, hy, hz = (2.0 * h for h in CART_HALF)
        k = m / 12.0  # solid box: I = m (a^2 + b^2) / 12 about each axis
        inertia = [k * (hy * hy + hz * hz), k * (hx * hx + hz * hz), k * (hx * hx + hy * hy)]
        self.sim.bc.changeDynamics(
            self.cart, -1, mass=m, localInertiaDiagonal=inertia, lateralFriction=CART_FRICTION,
            rollingFriction=0.0, spinningFriction=0.0,
        )

    def _initialize_episode(self, rng: np.random.Generator) -> None:
        lay = self.layout
        self._place_layout()
        aisle = int(rng.integers(0, lay.n_aisles))
        segment = int(rng.integers(0, 2))
        unit = int(rng.integers(0, lay.shelf_units))
        side = 1.0 if rng.random() < 0.5 else -1.0  # station at the east (+1) or west (-1) end
        cart_dy, cart_yaw = rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1)
        gap, robot_dy, robot_dyaw = rng.uniform(0.2, 0.5), rng.uniform(-0.1, 0.1), rng.uniform(-0.3, 0.3)
        bx, by = lay.bay(aisle, segment, unit)
        sx = lay.x_max - 0.5 * END_CROSS if side > 0 else lay.x_min + 0.5 * END_CROSS
        self.station = (sx, by)
        cy = by + float(cart_dy)
        q = [0.0, 0.0, math.sin(0.5 * cart_yaw), math.cos(0.5 * cart_yaw)]
        self._move(self.cart, [bx, cy, CART_HALF[2]], q)
        back = CART_HALF[0] + BODY_HALF[0] + float(gap)
        heading = (0.0 if side > 0 else math.pi) + float(robot_dyaw)
        self._place_robot(bx - side * back, by + float(robot_dy), heading)
        self._init_traffic(rng)

    def _keep_clear(self) -> list[tuple[float, float, float]]:
        """The robot and the cart (radius: its half diagonal), as placed for the episode."""
        (x, y, _), _ = self._cart_pose()
        return [*super()._keep_clear(), (x, y, math.hypot(CART_HALF[0], CART_HALF[1]))]

    def _keep_off(self) -> list[tuple[float, float, float, float, float, float]]:
        """The robot's footprint and the cart (``CART_HALF``) at its pose after the last physics step."""
        x, y = self.cart_xy
        return [*super()._keep_off(),
                (x, y, math.cos(self.cart_yaw), math.sin(self.cart_yaw), CART_HALF[0], CART_HALF[1])]

    def _yield_to(self) -> list[tuple[tuple[float, float], float]]:
        """The traffic waits for the cart too (radius: its half diagonal)."""
        return [*super()._yield_to(), (self.cart_xy, math.hypot(CART_HALF[0], CART_HALF[1]))]

    def _allowed_contacts(self) -> tuple[int, ...]:
        return (self.cart,)

    def _read_task_state(self) -> None:
        pos, orn = self._cart_pose()
        lin, _ = self._cart_vel()
        x, y, z, w = orn
        self.cart_xy = (pos[0], pos[1])
        self.cart_yaw = math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))
        self.cart_z_up = 1.0 - 2.0 * (x * x + y * y)  # z of the cart's up axis (1 upright, 0 on its side)
        self.cart_v = (lin[0], lin[1])
        # the cart may touch the floor and the robot, not the robot's obstacles
        self._cart_hit = self._touches_obstacle(self._cart_contacts)

    def nav_goal(self) -> tuple[float, float]:
        """The packing station's centre (x, y) [m], world frame."""
        return self.station

    def _state_observation(self) -> np.ndarray:
        fx, fy = self.to_robot_frame(*self.cart_xy)
        c, s = math.cos(self.robot_yaw), math.sin(self.robot_yaw)
        vx, vy = self.cart_v
        dyaw = self.cart_yaw - self.robot_yaw
        sx, sy = self.station[0] - self.cart_xy[0], self.station[1] - self.cart_xy[1]
        task = [
            fx, fy, math.cos(dyaw), math.sin(dyaw), c * vx + s * vy, -s * vx + c * vy,
            c * sx + s * sy, -s * sx + c * sy, math.hypot(sx, sy), math.hypot(vx, vy),
        ]
        return self._robot_state(task)

    def _state_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        low, high = self._robot_bounds()
        b = self.goal_bound
        low += [-2 * b, -2 * b, -1.0, -1.0, -5.0, -5.0, -2 * b, -2 * b, 0.0, 0.0]
        high += [2 * b, 2 * b, 1.0, 1.0, 5.0, 5.0, 2 * b, 2 * b, 3 * b, 10.0]
        return np.array(low, dtype=np.float32), np.array(high, dtype=np.float32)

    def achieved_goal(self) -> np.ndarray:
        """Cart position (x, y, 0) [m]."""
        return np.array([self.cart_xy[0], self.cart_xy[1], 0.0])

    def desired_goal(self) -> np.ndarray:
        """Station centre (x, y, 0) [m]."""
        return np.array([self.station[0], self.station[1], 0.0])

    def cart_in_station(self) -> bool:
        """Whether the cart's centre is inside the station zone."""
        return (
            abs(self.cart_xy[0] - self.station[0]) <= STATION_HALF
            and abs(self.cart_xy[1] - self.station[1]) <= STATION_HALF
        )

    def _evaluate(self) -> Evaluation:
        if self._collided:
            return Evaluation(success=False, failure="collision")
        if self._cart_hit or self.cart_z_up < 0.7:
            return Evaluation(success=False, failure="lost_cart")
        rest = math.hypot(*self.cart_v) < CART_REST_SPEED
        return Evaluation(success=self.cart_in_station() and rest, failure=None)


class WarehouseCartPushExpert(Expert):
    """Scripted expert for WarehouseCartPush: get behind the cart, push it along the line to the station.

    Reactive rules on privileged state (true robot and cart poses, the station, the lidar scan):

    1. The push direction ``d`` points from the cart to the station (to a point ``CARROT`` ahead on the
       aisle's centre line while the cart is in the aisle or the station more than 2 m away). The
       robot's place is right behind the cart on that line, facing ``d``. If it is behind the cart but
       off that line (more than 0.2 m sideways), it drives to a point 1.3 m behind the cart on the
       line, then turns to face ``d``. If it is not behind the cart, it goes round it: first sideways to
       a lane ``LANE`` off the line (on its own side), then along that lane to 1.3 m behind the cart,
       then onto the line.
    2. Pushing: it heads for a point beyond the cart chosen so that robot, cart and station line up
       (steering against the cart's sideways offset from the robot's axis), at a speed that lets the
       cart coast to rest in the zone, slowed by anything the lidar sees ahead of the cart.

    Under actuator lag (``action_delay``) both rules start from where the queued actions take the
    robot (:func:`~loopsim.envs.warehouse.planner.predict_pose`) and the cart (pushed along with the
    robot while the bumper is on it, else at its current velocity); the slowdown for traffic ahead
    still reads the current scan from the current pose.
    """

    env_type = WarehouseCartPushEnv
    motion_dims = 2
    PUSH_SPEED = 0.6
    #: Far from the station the cart is pushed towards the aisle's centre line this far ahead [m].
    CARROT = 1.5
    CONTACT = CART_HALF[0] + BODY_HALF[0]
    #: Sideways offset from the push line of the lane the robot takes round the cart [m].
    LANE = CART_HALF[1] + FOOTPRINT_HALF[1] + 0.2

    def _act(self) -> np.ndarray:
        env: WarehouseCartPushEnv = self.env
        rx, ry, yaw = env.robot_pose()
        cx, cy = env.cart_xy
        pending = env.pending_actions
        if pending:
            # Under actuator lag (``action_delay``) this action takes effect after the queued ones:
            # act from where they take the robot, and the cart: pushed along with it while the bumper
            # is on it, else carried on at its current velocity.
            fx, fy = env.to_robot_frame(cx, cy)
            pushing = abs(fx - self.CONTACT) < 0.1 and abs(fy) < CART_HALF[1] + 0.1
            mu = float(env.site_params["floor_friction"])
            load = float(env.site_params["cart_mass"]) if pushing else 0.0
            x0, y0 = rx, ry
            rx, ry, yaw = predict_pose((rx, ry, yaw), (env.robot_vel[0], env.robot_vel[2]), pending,
                                       env.sim.control_dt, drive_accel(mu, load, CART_FRICTION * mu))
            if pushing:
                cx, cy = cx + rx - x0, cy + ry - y0
            else:
                lag = len(pending) * env.sim.control_dt
                cx, cy = cx + env.cart_v[0] * lag, cy + env.cart_v[1] * lag
        sx, sy = env.station
        dist = math.hypot(sx - cx, sy - cy)
        if dist < 0.15:
            return np.zeros(2)
        lo, hi = env.layout.aisle_x_range()
        if dist > 2.0 or lo < cx < hi:
            # far from the station, or still in the aisle: steer the cart back onto the aisle's centre
            # line (aiming at the station from an off-centre cart near the aisle's end put the robot's
            # place behind it against the shelf: in narrow aisles it collided getting there)
            ux = 1.0 if sx > cx else -1.0
            kx, ky = cx + self.CARROT * ux, sy
            k = math.hypot(kx - cx, ky - cy)
            dx, dy = (kx - cx) / k, (ky - cy) / k
        else:
            dx, dy = (sx - cx) / dist, (sy - cy) / dist
        # robot relative to the cart in the push frame: along d (negative = behind), and sideways
        along = (rx - cx) * dx + (ry - cy) * dy
        side = -(rx - cx) * dy + (ry - cy) * dx
        face = math.atan2(dy, dx)
        err = (face - yaw + math.pi) % (2.0 * math.pi) - math.pi
        behind = along < -self.CONTACT + 0.15
        if not behind or abs(side) > 0.2:
            # 1. go back behind the cart, on the line; from in front of it or beside it, round it: first
            # sideways to a lane clear of it, then along that lane past its back (straight there, the
            # robot pushed the cart away from the station)
            lane = math.copysign(self.LANE, side)
            if not behind and abs(side) < self.LANE - 0.15:
                along_w, side_w = along, lane
            elif not behind:
                along_w, side_w = -1.3, lane
            else:
                along_w, side_w = -1.3, 0.0
            tx, ty = cx + along_w * dx - side_w * dy, cy + along_w * dy + side_w * dx
            return self._goto(tx, ty, face, (rx, ry, yaw))
        if along < -self.CONTACT - 0.6 and abs(err) < 0.3:
            pass  # behind, on the line and facing d: close the gap by pushing below
        elif abs(err) > 0.35:
            return np.array([0.0, np.clip(2.0 * err / MAX_ANGULAR, -1.0, 1.0)])
        # 2. push: aim at a point beyond the cart that lines robot, cart and station up
        aim_x, aim_y = cx + 0.8 * dx - 1.5 * side * (-dy), cy + 0.8 * dy - 1.5 * side * dx
        c, s = math.cos(yaw), math.sin(yaw)
        fx, fy = c * (aim_x - rx) + s * (aim_y - ry), -s * (aim_x - rx) + c * (aim_y - ry)
        bearing = math.atan2(fy, fx)
        decel = 0.5 * CART_FRICTION_DECEL * float(env.site_params["floor_friction"])
        v = min(self.PUSH_SPEED, math.sqrt(2.0 * max(decel, 0.05) * max(dist - 0.1, 0.0)))
        ahead = self._clear_ahead(env)
        v = min(v, max(0.0, 0.8 * (ahead - self.CONTACT - CART_HALF[0] - 0.4)))
        v *= max(0.0, math.cos(bearing))
        w = max(-MAX_ANGULAR, min(MAX_ANGULAR, 2.5 * bearing))
        return np.array([v / MAX_LINEAR, w / MAX_ANGULAR])

    def _goto(
        self, tx: float, ty: float, final_heading: float, pose: tuple[float, float, float]
    ) -> np.ndarray:
        """``(v, w)`` actions in ``[-1, 1]`` to drive to a point, then turn to a heading.

        Args:
            tx: Target x [m], world frame.
            ty: Target y [m], world frame.
            final_heading: Heading to turn to once there [rad].
            pose: The robot pose ``(x [m], y [m], yaw [rad])`` to steer from.
        """
        x, y, yaw = pose
        c, s = math.cos(yaw), math.sin(yaw)
        fx, fy = c * (tx - x) + s * (ty - y), -s * (tx - x) + c * (ty - y)
        d = math.hypot(fx, fy)
        if d < 0.12:
            err = (final_heading - yaw + math.pi) % (2.0 * math.pi) - math.pi
            return np.array([0.0, np.clip(2.0 * err / MAX_ANGULAR, -1.0, 1.0)])
        bearing = math.atan2(fy, fx)
        if abs(bearing) > math.radians(100):  # closer to back up than to turn around
            bearing_back = (bearing + 2.0 * math.pi) % (2.0 * math.pi) - math.pi
            bb = (bearing_back - math.pi) if bearing_back > 0 else (bearing_back + math.pi)
            v = -min(0.4, 0.8 * d)
            w = 2.0 * bb
            return np.array([v / MAX_LINEAR, np.clip(w / MAX_ANGULAR, -1.0, 1.0)])
        v = 0.0 if abs(bearing) > math.radians(50) else min(0.5, 0.8 * d) * math.cos(bearing)
        return np.array([v / MAX_LINEAR, np.clip(2.0 * bearing / MAX_ANGULAR, -1.0, 1.0)])

    @staticmethod
    def _clear_ahead(env: WarehouseCartPushEnv) -> float:
        """Distance [m] to the nearest *moving* obstacle within +-20 degrees ahead in the lidar scan.

        The cart is below the scan. Returns on the known layout (shelves and walls, privileged) are
        left out, so a crooked push in a narrow aisle is not mistaken for traffic ahead.
        """
        a = env.lidar_angles
        front = (a < math.radians(20)) | (a > 2.0 * math.pi - math.radians(20))
        r, af = env.lidar[front], a[front]
        keep = (np.abs(r * cos_sin(af)[1]) < 0.45) & (r < LIDAR_RANGE)
        if not keep.any():
            return LIDAR_RANGE
        r, af = r[keep], af[keep]
        x, y, yaw = env.robot_pose()
        c, s = cos_sin(af + yaw)
        wx, wy = x + r * c, y + r * s
        boxes, margin, lay = env.static_boxes, 0.1, env.layout
        in_box = (
            (wx[:, None] > boxes[None, :, 0] - margin) & (wx[:, None] < boxes[None, :, 1] + margin)
            & (wy[:, None] > boxes[None, :, 2] - margin) & (wy[:, None] < boxes[None, :, 3] + margin)
        ).any(axis=1)
        wall = (wx < lay.x_min + margin) | (wx > lay.x_max - margin) | (np.abs(wy) > lay.y_max - margin)
        moving = r[~in_box & ~wall]
        return float(moving.min()) if moving.size else LIDAR_RANGE
