"""The factory domain: a Franka Panda at a workcell, and the operating conditions of factory sites.

Frame: world frame, z up, origin at the robot base on the floor; x points away from the robot
towards the conveyor, y along the conveyor's direction of travel.

Control: the physics runs at 500 Hz (time step 0.002 s) with 20 substeps per action, so the control
frequency is 25 Hz (the same split as panda-gym). An action of 1 moves the end-effector target by
``MAX_DISPLACEMENT`` = 0.02 m per control step (0.5 m/s).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from loopsim.envs.core.env import RobotTaskEnv
from loopsim.envs.core.panda import MAX_WIDTH, Panda
from loopsim.envs.core.site import ParamDef, SiteSchema

__all__ = ["FACTORY_SCHEMA", "FactoryEnv", "MAX_DISPLACEMENT"]

#: End-effector displacement for an action component of 1 [m per control step].
MAX_DISPLACEMENT = 0.02
#: Control steps a gripper fault lasts once it starts.
FAULT_STEPS = 3

FACTORY_SCHEMA = SiteSchema(
    "factory",
    [
        ParamDef("part_mass", 0.1, 0.01, 2.0, "kg", "mass of each part (the peg in FactoryPegInsert)"),
        ParamDef("part_friction", 1.0, 0.05, 2.0, "-", "lateral friction coefficient of the parts"),
        ParamDef("conveyor_speed", 0.05, 0.0, 0.3, "m/s", "nominal belt speed"),
        ParamDef(
            "conveyor_jitter", 0.0, 0.0, 0.1, "m/s",
            "std of the belt speed's Gaussian jitter, redrawn every control step; the speed is clipped to "
            "[0, 0.3] m/s, so a large jitter near 0 raises the mean speed",
        ),
        ParamDef(
            "sensor_noise", 0.0, 0.0, 0.05, "m", "std of Gaussian noise on observed part / hole positions"
        ),
        ParamDef(
            "action_delay",
            0,
            0,
            5,
            "control steps",
            "actuator lag: actions take effect this many steps late",
            integer=True,
        ),
        ParamDef("gripper_force", 40.0, 1.0, 100.0, "N", "force of each finger motor"),
        ParamDef(
            "gripper_fault_prob",
            0.0,
            0.0,
            0.5,
            "1/control step",
            f"probability per step that the gripper loses all force for {FAULT_STEPS} steps",
        ),
    ],
)


class FactoryEnv(RobotTaskEnv):
    """Base class of the factory tasks: the Panda, the floor, the camera and factory site effects.

    The action is ``(4,)`` float32 in ``[-1, 1]``: end-effector displacement (dx, dy, dz) in the world
    frame, times ``MAX_DISPLACEMENT`` [m], and a gripper command ``g`` that sets the target opening
    between the fingers to ``0.04 * (g + 1)`` [m] (-1 closed, 1 fully open at 0.08 m). Tasks that
    accept ``block_gripper=True`` (FactoryPegInsert) drop ``g``: the action is ``(3,)`` and the
    fingers are always commanded closed (target opening 0 m) with the site's grip force.

    The first 7 entries of every ``state`` observation are the robot's: end-effector position (3) [m],
    end-effector linear velocity (3) [m/s], finger opening (1) [m]. Subclasses append the task's.
    """

    site_schema: ClassVar = FACTORY_SCHEMA
    #: Whether the gripper command is removed from the action (see ``block_gripper`` of the tasks
    #: that accept it); an instance attribute set by their constructors.
    block_gripper: bool = False
    timestep: ClassVar[float] = 0.002
    substeps: ClassVar[int] = 20
    #: Camera: eye [m], target [m], vertical field of view [deg].
    camera: ClassVar[tuple[tuple[float, float, float], tuple[float, float, float], float]] = (
        (1.25, 0.0, 1.05),
        (0.32, 0.0, 0.08),
        55.0,
    )

    def _load_scene(self) -> None:
        bc = self.sim.bc
        floor = bc.loadURDF("plane.urdf")
        bc.changeVisualShape(floor, -1, rgbaColor=[0.75, 0.75, 0.72, 1])
        self.robot = Panda(self.sim, max_displacement=MAX_DISPLACEMENT)
        self._fault_steps = 0
        self._sensor_noise = 0.0
        self._load_task_scene()

    def _load_task_scene(self) -> None:
        raise NotImplementedError

    def _apply_site(self, params: Mapping[str, float | int]) -> None:
        self._fault_steps = 0
        self._sensor_noise = float(params["sensor_noise"])
        self._fault_prob = float(params["gripper_fault_prob"])
        self._gripper_force = float(params["gripper_force"])
        self._apply_task_site(params)

    def _apply_task_site(self, params: Mapping[str, float | int]) -> None:
        raise NotImplementedError

    def _apply_action(self, action: list[float]) -> None:
        # Exactly one draw per step, whatever the site, so the env's random stream stays aligned.
        if self.np_random.random() < self._fault_prob:
            self._fault_steps = FAULT_STEPS
        force = 0.0 if self._fault_steps > 0 else self._gripper_force
        self._fault_steps = max(0, self._fault_steps - 1)
        # Blocked gripper: the fingers are always commanded closed (g = -1), with the same force.
        width = 0.0 if self.block_gripper else 0.5 * MAX_WIDTH * (action[3] + 1.0)
        d = MAX_DISPLACEMENT
        self.robot.command((action[0] * d, action[1] * d, action[2] * d), width, force)
        self._before_physics()

    def _read_state(self) -> None:
        self.robot.read_state()
        self._read_task_state()

    def _read_task_state(self) -> None:
        """Read and cache the task's bodies after each physics update (subclasses)."""

    def _before_physics(self) -> None:
        """Hook run after the robot is commanded, before the physics steps (e.g. set belt speed)."""

    def _robot_observation(self) -> list[float]:
        r = self.robot
        return [*r.ee_pos_list, *r.ee_vel_t, r.width]

    def _robot_bounds(self) -> tuple[list[float], list[float]]:
        return [-1.5, -1.5, -0.5, -5.0, -5.0, -5.0, 0.0], [1.5, 1.5, 1.5, 5.0, 5.0, 5.0, 0.1]

    def _noisy(self, position: np.ndarray) -> np.ndarray:
        """``position`` plus Gaussian sensor noise of the site's ``sensor_noise`` std [m]."""
        return position + self.np_random.normal(0.0, 1.0, size=np.shape(position)) * self._sensor_noise

    def _camera(self) -> tuple[Any, Any, float]:
        return self.camera
