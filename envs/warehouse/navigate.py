"""``loopsim/WarehouseNavigate-v0``: drive from the dock to a target bay through aisles with traffic."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from loopsim.envs.core.env import Evaluation
from loopsim.envs.core.expert import Expert
from loopsim.envs.warehouse.base import END_CROSS, WarehouseEnv
from loopsim.envs.warehouse.planner import GridPlanner, drive_accel, drive_command, predict_pose, scan_from

__all__ = ["WarehouseNavigateEnv", "WarehouseNavigateExpert"]


class WarehouseNavigateEnv(WarehouseEnv):
    """Drive a differential-drive robot from its dock to a target bay among shelves and moving traffic.

    **Description.** A warehouse floor of parallel aisles between rows of shelving (``lab``: 3 aisles
    2.6 m wide, rows of 2 x 4 modules of 1 m, a 2 m middle cross aisle; see
    :mod:`loopsim.envs.warehouse.base` for the robot, lidar and traffic). The robot starts at rest in
    the west cross aisle and must stop at a bay: a point on the centre line of an aisle in front of one
    shelving module.

    **Randomizations** (from ``env.np_random`` at reset): the dock's y within the cross aisle, the
    robot's heading in [-pi, pi], the target bay (aisle, segment, module), each traffic agent's aisle,
    lane side, start point, direction and speed factor; plus every site parameter (see
    ``loopsim sites warehouse`` and ``configs/sites/warehouse/``), including the layout itself.

    **Success.** The robot's centre is within ``goal_distance_threshold`` = 0.35 m of the bay and its
    speed is below 0.1 m/s.

    **Episode end.** ``terminated`` on success or on ``collision`` (the robot touches a shelf, wall,
    robot or person). ``truncated`` after ``max_steps`` (default 400 control steps = 40 s) with
    failure mode ``timeout``.

    **Observation** (``state``, float32, ``(82,)``): position (x, y) [m], heading (cos, sin), velocity
    in the robot frame (forward, leftward [m/s], yaw rate [rad/s]), the bay in the robot frame
    (forward, leftward) [m] and its distance [m], then 72 lidar ranges [m] in [0, 8] (every 5 degrees
    counter-clockwise from straight ahead). ``goal`` mode: ``achieved_goal`` = (x, y, 0) of the robot,
    ``desired_goal`` = (x, y, 0) of the bay [m]. ``rgb``: the on-board camera, looking ahead.

    **Action** ``(2,)`` in [-1, 1]: forward speed x 1.0 m/s and turn rate x 1.5 rad/s.

    **Rewards.** ``dense``: minus the straight-line distance to the bay [m]; ``sparse``: 0 within
    0.35 m of the bay, else -1.

    **Version history.** v0: initial version.
    """

    expert_entry_point: ClassVar[str] = "loopsim.envs.warehouse.navigate:WarehouseNavigateExpert"
    goal_distance_threshold: ClassVar[float] = 0.35

    def _load_task_scene(self) -> None:
        self.bay = (0.0, 0.0)

    def _initialize_episode(self, rng: np.random.Generator) -> None:
        lay = self.layout
        self._place_layout()
        dock_y = float(rng.uniform(-lay.y_max + 0.8, lay.y_max - 0.8))
        yaw = float(rng.uniform(-math.pi, math.pi))
        aisle = int(rng.integers(0, lay.n_aisles))
        segment = int(rng.integers(0, 2))
        unit = int(rng.integers(0, lay.shelf_units))
        self.bay = lay.bay(aisle, segment, unit)
        self._place_robot(-0.5 * END_CROSS, dock_y, yaw)
        self._init_traffic(rng)

    def nav_goal(self) -> tuple[float, float]:
        """The target bay (x, y) [m], world frame."""
        return self.bay

    def _state_observation(self) -> np.ndarray:
        return self._robot_state()

    def _state_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        low, high = self._robot_bounds()
        return np.array(low, dtype=np.float32), np.array(high, dtype=np.float32)

    def achieved_goal(self) -> np.ndarray:
        """Robot position (x, y, 0) [m]."""
        return np.array([self.robot_xy[0], self.robot_xy[1], 0.0])

    def desired_goal(self) -> np.ndarray:
        """Bay position (x, y, 0) [m]."""
        return np.array([self.bay[0], self.bay[1], 0.0])

    def bay_distance(self) -> float:
        """Distance from the robot's centre to the bay [m]."""
        return math.hypot(self.robot_xy[0] - self.bay[0], self.robot_xy[1] - self.bay[1])

    def _evaluate(self) -> Evaluation:
        success = self.bay_distance() <= self.goal_distance_threshold and self.robot_speed < self.stop_speed
        failure = "collision" if self._collided else None
        return Evaluation(success=success and failure is None, failure=failure)


class WarehouseNavigateExpert(Expert):
    """Scripted expert for WarehouseNavigate: cost-to-go planning, path following, lidar avoidance.

    Privileged inputs: the layout and the bay (for :class:`GridPlanner`, rebuilt when they change),
    the robot's true pose, the lidar scan the env computed (with the site's noise) and the floor
    friction (to brake within the grip it gives). Traffic is avoided from the lidar only. Under actuator
    lag (``action_delay``) it also reads the actions still queued and acts from where they take the
    robot (:func:`~loopsim.envs.warehouse.planner.predict_pose`).
    """

    env_type = WarehouseNavigateEnv
    motion_dims = 2
    #: Look-ahead along the planned path [m].
    LOOKAHEAD = 1.0

    def __init__(self, env, noise_std: float = 0.0, seed: int | None = None) -> None:
        super().__init__(env, noise_std=noise_std, seed=seed)
        self._planner: GridPlanner | None = None
        self._key: tuple | None = None

    def planner(self) -> GridPlanner:
        """The planner for the env's current layout and bay (cached)."""
        env: WarehouseNavigateEnv = self.env
        key = (env.layout, env.bay)
        if key != self._key:
            self._planner = GridPlanner(env.layout, env.bay)
            self._key = key
        return self._planner

    def _act(self) -> np.ndarray:
        env: WarehouseNavigateEnv = self.env
        plan = self.planner()
        decel = min(1.5, 0.5 * 9.81 * float(env.site_params["floor_friction"]))
        pending = env.pending_actions
        if not pending:
            x, y, _ = env.robot_pose()
            d = env.bay_distance()
            tx, ty = env.bay if d < self.LOOKAHEAD else plan.lookahead(x, y, self.LOOKAHEAD)
            fx, fy = env.to_robot_frame(tx, ty)
            v, w = drive_command(fx, fy, d, env.lidar, env.lidar_angles, decel)
            return np.array([v, w])
        # Under actuator lag (``action_delay``) this action takes effect after the queued ones: steer
        # from where they take the robot (the lidar returns seen from there), as the factory experts do.
        x0, y0, yaw0 = env.robot_pose()
        accel = drive_accel(float(env.site_params["floor_friction"]))
        x, y, yaw = predict_pose((x0, y0, yaw0), (env.robot_vel[0], env.robot_vel[2]), pending,
                                 env.sim.control_dt, accel)
        bx, by = env.bay
        d = math.hypot(bx - x, by - y)
        tx, ty = env.bay if d < self.LOOKAHEAD else plan.lookahead(x, y, self.LOOKAHEAD)
        c, s = math.cos(yaw), math.sin(yaw)
        fx, fy = c * (tx - x) + s * (ty - y), -s * (tx - x) + c * (ty - y)
        c0, s0 = math.cos(yaw0), math.sin(yaw0)
        ranges, angles = scan_from(env.lidar, env.lidar_angles, c0 * (x - x0) + s0 * (y - y0),
                                   -s0 * (x - x0) + c0 * (y - y0), yaw - yaw0)
        v, w = drive_command(fx, fy, d, ranges, angles, decel)
        return np.array([v, w])
