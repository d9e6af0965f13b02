"""``loopsim/FactorySort-v0``: sort parts of two kinds from a conveyor into one bin per kind."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from loopsim.envs.factory.conveyor import KIND_COLORS, Bin, ConveyorExpert, ConveyorTaskEnv

__all__ = ["FactorySortEnv", "FactorySortExpert"]


class FactorySortEnv(ConveyorTaskEnv):
    """Sort cubes and cylinders arriving on a conveyor into the bin for their kind.

    **Description.** As FactoryPickPlace, but the parts are of two kinds, ``cube`` (kind 0, red) and
    ``cylinder`` (kind 1, blue), and there are two bins on the floor: the cube bin (red rim) at
    (0.30, 0.38) m downstream and the cylinder bin (blue rim) at (0.30, -0.38) m upstream. The kind of
    each part is part of the observation (one-hot).

    **Randomizations.** As FactoryPickPlace, plus the kind of each part (uniform, independent).

    **Success.** Every part of the episode rests in the bin for its kind and no longer touches the
    robot.

    **Episode end.** ``terminated`` on success or on a failure: ``wrong_bin`` (a part came to rest in
    the other bin), ``missed`` or ``dropped`` (as in FactoryPickPlace). ``truncated`` after
    ``max_steps`` (default 300 control steps = 12 s, 150 per part beyond two) with failure mode
    ``timeout``.

    **Observation, action, rewards.** As FactoryPickPlace with ``n_parts`` parts (default 2) and two
    bin targets: ``state`` has ``7 + 12 * n_parts + 6`` entries.

    **Version history.** v0: initial version.
    """

    bins: ClassVar[tuple[Bin, ...]] = (
        Bin(0.30, 0.38, kind=0, rgba=KIND_COLORS[0]),
        Bin(0.30, -0.38, kind=1, rgba=KIND_COLORS[1]),
    )
    expert_entry_point: ClassVar[str] = "loopsim.envs.factory.sort:FactorySortExpert"
    n_parts_default: ClassVar[int] = 2
    default_max_steps: ClassVar[int] = 300

    def _draw_kinds(self, rng: np.random.Generator) -> list[int]:
        return [int(k) for k in rng.integers(0, 2, size=self.n_parts)]


class FactorySortExpert(ConveyorExpert):
    """Scripted expert for FactorySort (see :class:`ConveyorExpert`)."""

    env_type = FactorySortEnv
