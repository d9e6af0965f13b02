"""``loopsim/FactoryPickPlace-v0``: pick parts off a moving conveyor and place them in a bin."""

from __future__ import annotations

from typing import ClassVar

from loopsim.envs.factory.conveyor import Bin, ConveyorExpert, ConveyorTaskEnv

__all__ = ["FactoryPickPlaceEnv", "FactoryPickPlaceExpert"]


class FactoryPickPlaceEnv(ConveyorTaskEnv):
    """Pick each part off a moving conveyor before it leaves reach and place it in the bin.

    **Description.** A Franka Panda stands beside a belt conveyor running along +y at 0.05 m/s
    (``lab``). Cubes of 40 mm arrive from upstream; the robot must grasp each one from the moving belt
    and drop it into the open bin at (0.30, 0.38) m on the floor.

    **Randomizations** (from ``env.np_random`` at reset): position of the first part on the belt
    (x within +-0.06 m of the belt centre, y in [-0.25, -0.15] m), yaw in [-pi, pi], the gap between
    parts in [0.20, 0.26] m, the start position of the end effector; plus every site parameter (see
    ``loopsim envs`` and ``configs/sites/factory/``).

    **Success.** Every part rests inside the bin (within its walls and below its rim, moving slower
    than 0.05 m/s) and no longer touches the robot.

    **Episode end.** ``terminated`` on success or on an unrecoverable failure: ``missed`` (a part left
    the reachable stretch of the belt, |y| > 0.55 m, or fell off it without ever being lifted) or
    ``dropped`` (a part that had been lifted fell outside the bin). ``truncated`` after ``max_steps``
    (default 150 control steps = 6 s per part) with failure mode ``timeout``.

    **Observation** (``state``, float32, ``7 + 12 * n_parts + 3``): end-effector position (3) [m],
    velocity (3) [m/s], finger opening (1) [m]; per part: position (3) [m, with the site's sensor
    noise], position relative to the end effector (3) [m], velocity (3) [m/s], kind one-hot (2),
    placed flag (1); the bin target (3) [m]. ``goal`` mode: ``achieved_goal`` = part positions,
    ``desired_goal`` = resting positions in the bin, ``(3 * n_parts,)`` [m]. ``rgb``: a fixed
    camera over the workcell.

    **Action** ``(4,)`` in [-1, 1]: end-effector displacement (dx, dy, dz) x 0.02 m and the gripper
    opening ``0.04 * (g + 1)`` m.

    **Rewards.** ``dense``: minus the largest part-to-target distance [m]; ``sparse``: 0 when every
    part lies inside its bin's box around its target (``goal_box``: within 0.08 m in x and in y, the
    bin's inner half width, and 0.06 m in z, a resting part's height up to the rim; per axis, not a
    distance), else -1. Every successful state has sparse reward 0.

    **Version history.** v0: initial version.
    """

    bins: ClassVar[tuple[Bin, ...]] = (Bin(0.30, 0.38),)
    expert_entry_point: ClassVar[str] = "loopsim.envs.factory.pick_place:FactoryPickPlaceExpert"
    n_parts_default: ClassVar[int] = 1
    default_max_steps: ClassVar[int] = 150


class FactoryPickPlaceExpert(ConveyorExpert):
    """Scripted expert for FactoryPickPlace (see :class:`ConveyorExpert`)."""

    env_type = FactoryPickPlaceEnv
