"""The base class of every loopsim env: a robot, a scene, a task and a site in one ``gymnasium.Env``.

:class:`RobotTaskEnv` owns what all tasks share: the physics client, site sampling, the three
observation modes, the action checks, actuator lag, the time limit, ``is_success`` /
``failure_mode`` bookkeeping and rendering. A task subclass fills in the hooks:

- ``_load_scene()``: create every body (at construction, and again into an emptied world at each
  reset that follows an episode: it must build the same scene every time);
- ``_initialize_episode(rng)``: place things for a new episode, drawing only from ``rng``;
- ``_apply_site(params)``: apply sampled site parameters;
- ``_apply_action(action)``: turn a validated action in ``[-1, 1]`` into motor commands;
- ``_state_observation()``: the ``state`` vector;
- ``achieved_goal()`` / ``desired_goal()`` / ``goal_distance_threshold``: the goal of the task;
- ``_evaluate()``: success and unrecoverable failures.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from loopsim.envs.core.sim import Simulation
from loopsim.envs.core.site import Site, SiteSchema, load_site

__all__ = ["RobotTaskEnv", "Evaluation"]

OBS_MODES = ("state", "goal", "rgb")
#: Largest ``image_size`` / ``render_size`` [px] (a 2048 x 2048 RGBA buffer is 16 MiB).
MAX_IMAGE_SIZE = 2048


def _holds_bool(value: Any) -> bool:
    """Whether ``value`` is a bool or a (nested) list or tuple holding one."""
    if isinstance(value, bool | np.bool_):
        return True
    return isinstance(value, list | tuple) and any(_holds_bool(v) for v in value)


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _keyword_parameters(cls: type) -> list[str]:
    """Keyword arguments the constructors of ``cls`` accept, up to :class:`RobotTaskEnv`, sorted."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(
                name for name, prm in inspect.signature(init).parameters.items()
                if name != "self" and prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY)
            )
        if klass is RobotTaskEnv:
            break
    return sorted(names)


def _unknown_kwargs_error(cls: type, unknown: Mapping[str, Any]) -> TypeError:
    """The error for keyword arguments no constructor of ``cls`` takes.

    It names each one with its closest allowed name, then every allowed one (Python's own message
    names the first unknown key only).
    """
    allowed = _keyword_parameters(cls)
    parts = []
    for key in sorted(unknown):
        close = difflib.get_close_matches(key, allowed, n=1)
        parts.append(f"{key}={unknown[key]!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return TypeError(f"{cls.__name__}: unknown keyword argument{'s' if len(parts) > 1 else ''} "
                     f"{', '.join(parts)}; allowed: {', '.join(allowed)}")


REWARD_TYPES = ("dense", "sparse")


class Evaluation(dict):
    """What :meth:`RobotTaskEnv._evaluate` returns.

    Keys:
        success (bool): The task is achieved.
        failure (str | None): Name of an unrecoverable failure (ends the episode), else ``None``.
    """


class RobotTaskEnv(gym.Env):
    """Base class for loopsim envs (see the module docstring for the task hooks).

    Args:
        obs_mode: ``"state"`` (Box float32), ``"goal"`` (Dict with ``observation``, ``achieved_goal``,
            ``desired_goal``, for HER) or ``"rgb"`` (Box uint8 image ``(image_size, image_size, 3)``).
        reward_type: ``"dense"`` (minus the largest distance between achieved and desired goal
            points [m]) or ``"sparse"`` (0 when every point is within the task's tolerance, else -1);
            see :meth:`_goal_reward`, exposed as ``compute_reward`` in ``goal`` mode only (SB3 treats
            any env with ``compute_reward`` as goal-conditioned).
        site: Site name (see ``loopsim envs``), an inline mapping of parameter specs, or a ``Site``.
        render_mode: ``None``, ``"rgb_array"`` (``render()`` returns ``(render_size, render_size, 3)``
            uint8) or ``"human"`` (PyBullet GUI; needs a display).
        image_size: Side of the ``rgb`` observation [px].
        render_size: Side of the frames ``render()`` returns in ``rgb_array`` mode [px].
        max_steps: Time limit [control steps]; reaching it truncates the episode (``truncated=True``).
            ``None`` uses the task's default.
        fresh_world: Build a fresh physics world at every reset after an episode (the default):
            ``reset(seed=s)`` then gives a bit-identical episode whatever ran before, for ~8-10 ms
            of CPU per factory reset. ``False`` restores a snapshot into the same world (~0.5 ms), for
            throughput when episodes are very short (random actions in FactoryPegInsert end them in
            ~4 steps); episodes may then depend on the episodes run before in the env (6 of 240
            noisy-expert factory episodes, by up to 0.043 in an observation entry, measured with
            ``tests/benchmarks/history_dependence.py``), so stores made this way do not always
            replay exactly.
        **unknown: Refused: any other keyword argument raises ``TypeError``.

    Raises:
        TypeError: For a keyword argument no constructor of the task takes (a typo): the message
            names each one, the closest allowed name and every allowed one.
        ValueError: For an unknown ``obs_mode``, ``reward_type`` or ``render_mode``, an image size
            outside ``[16, 2048]``, a non-positive time limit or a ``fresh_world`` that is not a bool.
        RuntimeError: For ``render_mode="human"`` without a display.
        loopsim.envs.SiteError: For an unknown site or site parameter.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["human", "rgb_array"], "render_fps": 25}

    #: Site parameters of the domain; set by each domain's base class.
    site_schema: ClassVar[SiteSchema]
    #: Physics step [s] and physics steps per control step.
    timestep: ClassVar[float] = 0.002
    substeps: ClassVar[int] = 20
    #: Constraint-solver iterations per physics step.
    solver_iterations: ClassVar[int] = 50
    #: Bound of every ``achieved_goal`` / ``desired_goal`` component in ``goal`` mode [m].
    goal_bound: ClassVar[float] = 10.0
    #: Default time limit [control steps].
    default_max_steps: ClassVar[int] = 200
    #: Success tolerance of the goal distance [m], used by the sparse reward.
    goal_distance_threshold: ClassVar[float] = 0.05
    #: Per-axis tolerance (x, y, z) [m] of each goal point for the sparse reward; overrides the threshold.
    goal_box: ClassVar[tuple[float, float, float] | None] = None
    #: Action dimension.
    action_dim: ClassVar[int] = 4
    #: ``"module:Class"`` of the task's scripted expert (see :func:`loopsim.envs.make_expert`).
    expert_entry_point: ClassVar[str | None] = None

    def __init__(
        self,
        obs_mode: str = "state",
        reward_type: str = "dense",
        site: str | Mapping[str, Any] | Site | None = "lab",
        render_mode: str | None = None,
        image_size: int = 84,
        render_size: int = 480,
        max_steps: int | None = None,
        fresh_world: bool = True,
        **unknown: Any,
    ) -> None:
        if unknown:  # a typo in a kwarg: say which, and what is allowed, before any work
            raise _unknown_kwargs_error(type(self), unknown)
        if not isinstance(fresh_world, bool | np.bool_):
            raise ValueError(f"fresh_world={fresh_world!r} must be True or False")
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode={obs_mode!r} is not one of {list(OBS_MODES)}")
        if reward_type not in REWARD_TYPES:
            raise ValueError(f"reward_type={reward_type!r} is not one of {list(REWARD_TYPES)}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode={render_mode!r} is not one of {self.metadata['render_modes']} or None"
            )
        for name, value in (("image_size", image_size), ("render_size", render_size)):
            if not _is_int(value) or not 16 <= value <= MAX_IMAGE_SIZE:
                raise ValueError(f"{name}={value!r} must be an integer in [16, {MAX_IMAGE_SIZE}] [px]")
        image_size, render_size = int(image_size), int(render_size)
        max_steps = self.default_max_steps if max_steps is None else max_steps
        if not _is_int(max_steps) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r} must be a positive integer [control steps]")
        max_steps = int(max_steps)
        self.site = site  # validated and resolved by the property's setter
        self.obs_mode = obs_mode
        self.reward_type = reward_type
        self.render_mode = render_mode
        self.image_size = image_size
        self.render_size = render_size
        self.max_steps = max_steps
        self.fresh_world = bool(fresh_world)
        self.metadata = {**self.metadata, "render_fps": round(1.0 / (self.timestep * self.substeps))}

        # An env that never renders (no rgb observations, no render mode) runs without PyBullet's
        # renderer: its world builds faster at every reset, with the same physics.
        self.sim = Simulation(
            self.timestep,
            self.substeps,
            gui=render_mode == "human",
            solver_iterations=self.solver_iterations,
            renderer=obs_mode == "rgb" or render_mode is not None,
        )
        self.site_params: dict[str, float | int] = {}
        self._build_world()
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(self.action_dim,), dtype=np.float32)
        self._state_low, self._state_high = self._state_bounds()
        # float64 copies (the same values) for clipping the float64 state without mixed-type loops
        self._state_low64 = self._state_low.astype(np.float64)
        self._state_high64 = self._state_high.astype(np.float64)
        state_space = gym.spaces.Box(self._state_low, self._state_high, dtype=np.float32)
        #: ``(G,)``: the shape of one goal (3 per point), in every obs mode (the reward is the goal's)
        self._goal_shape = (len(self.desired_goal()),)
        if obs_mode == "state":
            self.observation_space = state_space
        elif obs_mode == "rgb":
            self.observation_space = gym.spaces.Box(0, 255, shape=(image_size, image_size, 3), dtype=np.uint8)
        else:
            bound = self.goal_bound
            goal_space = gym.spaces.Box(-bound, bound, shape=self._goal_shape, dtype=np.float32)
            self.observation_space = gym.spaces.Dict(
                {"observation": state_space, "achieved_goal": goal_space, "desired_goal": goal_space}
            )
        self._elapsed = 0
        self._actions: deque[np.ndarray] = deque()
        self._has_reset = False
        #: How the current episode ended (``"terminated"`` / ``"truncated"``), ``None`` while it runs.
        self._ended: str | None = None
        self._ended_warned = False

    def _build_world(self) -> None:
        """Build the scene into the (new or emptied) world, snapshot it and apply the ``lab`` values.

        Runs in ``__init__`` and, after :meth:`Simulation.reset_world`, in every ``reset`` that follows
        an episode: each episode starts from a world built the same way from nothing, so no engine
        state (collision pairs, contact manifolds and their order, which sets the order the solver
        treats contacts in) carries over from the episodes before.
        """
        with self.sim.no_rendering():
            self._load_scene()
        if not self.fresh_world:  # the snapshot reset returns here; a fresh world needs no snapshot
            self.sim.save_base_state()
        self.site_params = self.site_schema.lab_values()
        self._apply_site(self.site_params)
        self._world_fresh = True

    @property
    def site(self) -> Site:
        """The site the next episodes are drawn from (a :class:`Site`).

        Can be assigned between episodes, as a name, an inline mapping or a ``Site`` (e.g. a
        curriculum over sites on one env); it takes effect at the next ``reset``.

        Raises:
            SiteError: On assignment, for an unknown site name or parameter (the message lists the
                valid ones); the env keeps its current site.
        """
        return self._site

    @site.setter
    def site(self, value: str | Mapping[str, Any] | Site | None) -> None:
        self._site = load_site(self.site_schema, value)

    # ------------------------------------------------------------------ task hooks
    def _load_scene(self) -> None:
        raise NotImplementedError

    def _initialize_episode(self, rng: np.random.Generator) -> None:
        raise NotImplementedError

    def _prepare_world(self, params: Mapping[str, float | int]) -> None:
        """Hook: the site parameters sampled for the episode the world is about to be rebuilt for.

        Called in ``reset`` after the emptied world and before :meth:`_build_world`, so a task whose
        scene depends on the site (the warehouse layout) builds it once, for this episode.
        """

    def _apply_site(self, params: Mapping[str, float | int]) -> None:
        raise NotImplementedError

    def _apply_action(self, action: list[float]) -> None:
        """Turn a validated action (``action_dim`` floats in [-1, 1]) into motor commands."""
        raise NotImplementedError

    def _state_observation(self) -> np.ndarray:
        raise NotImplementedError

    def _state_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _evaluate(self) -> Evaluation:
        raise NotImplementedError

    def _read_state(self) -> None:
        """Read (and cache) the simulator state the task needs; runs after every physics update."""

    def _timeout_failure_mode(self) -> str:
        """Name of the failure when the time limit is reached without success (tasks refine it)."""
        return "timeout"

    def _hold_action(self) -> np.ndarray:
        """Action that holds the robot still; fills the actuator-lag queue at reset."""
        return np.zeros(self.action_dim, dtype=np.float32)

    def _camera(self) -> tuple[tuple[float, float, float], tuple[float, float, float], float]:
        """Camera (eye [m], target [m], vertical field of view [deg]) for ``rgb`` and ``render``."""
        raise NotImplementedError

    def achieved_goal(self) -> np.ndarray:
        """Achieved goal, ``(G,)`` float64 [m]."""
        raise NotImplementedError

    def desired_goal(self) -> np.ndarray:
        """Desired goal, ``(G,)`` float64 [m]."""
        raise NotImplementedError

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Refuse pickling and copying: the env owns a live physics client that cannot be shared.

        Raises:
            TypeError: Always; make a new env with ``gymnasium.make`` (or pickle an env factory, as
                vector envs do) instead.
        """
        raise TypeError(
            f"{type(self).__name__} cannot be pickled or copied: it owns a live PyBullet client; "
            "create a new env with gymnasium.make (vector envs pickle the factory, not the env)"
        )

    @property
    def compute_reward(self) -> Any:
        """:meth:`_goal_reward`, in ``goal`` mode only (``hasattr(env, "compute_reward")`` is False else).

        SB3 (``check_env``, HER) treats any env that has ``compute_reward`` as goal-conditioned. A
        property rather than the bound method stored on the env, which made a reference cycle: a goal
        env dropped without ``close()`` kept its physics client until the garbage collector ran.

        Raises:
            AttributeError: Unless ``obs_mode == "goal"``.
        """
        if self.obs_mode != "goal":
            raise AttributeError(f"compute_reward exists in obs_mode='goal' only, not {self.obs_mode!r}")
        return self._goal_reward

    @property
    def pending_actions(self) -> list[list[float]]:
        """Actions accepted but not yet applied because of actuator lag (oldest first), each clipped."""
        return [list(a) for a in self._actions]

    # ------------------------------------------------------------------ gymnasium API
    def _goal_reward(self, achieved_goal: Any, desired_goal: Any, info: Any) -> np.ndarray | float:
        """Reward for (batches of) goals; exposed as ``compute_reward`` in ``goal`` mode, for HER.

        The goal vectors are split into 3-D points (one per part). Dense: minus the largest
        point-to-point distance [m]. Sparse: 0 when every point is within the tolerance of its target
        (per-axis box ``goal_box`` [m] if the task sets one, else the Euclidean
        ``goal_distance_threshold`` [m]), else -1. Goals are what the robot perceives (with the site's
        sensor noise), while success is judged on the true state: at sites without sensor noise a
        successful state always has sparse reward 0.

        Args:
            achieved_goal: ``(G,)`` or ``(B, G)``.
            desired_goal: Same shape as ``achieved_goal``.
            info: Ignored (kept for the goal-env API).

        Returns:
            ``float`` for a single goal, else ``(B,)`` float32 (``(0,)`` for an empty batch).

        Raises:
            ValueError: If a goal's last axis is not this env's goal size (3 per point).
        """
        if (
            type(achieved_goal) is np.ndarray
            and type(desired_goal) is np.ndarray
            and achieved_goal.shape == desired_goal.shape == self._goal_shape
            and achieved_goal.dtype.char in "fd"
            and desired_goal.dtype.char in "fd"
        ):  # one float goal (what step() passes): plain floats give the float64 result with no copies
            diff = [x - y for x, y in zip(achieved_goal.tolist(), desired_goal.tolist(), strict=True)]
            return self._single_goal_reward(diff)
        a = np.asarray(achieved_goal, dtype=np.float64)
        d = np.asarray(desired_goal, dtype=np.float64)
        box = self.goal_box
        (size,) = self._goal_shape
        if a.ndim == 0 or d.ndim == 0 or a.shape[-1] != size or d.shape[-1] != size:
            raise ValueError(
                f"compute_reward: goals must end in this env's goal size {size}, got achieved_goal "
                f"{a.shape} and desired_goal {d.shape}"
            )
        if a.ndim == 1 and d.ndim == 1:  # one goal: the same IEEE arithmetic, faster
            return self._single_goal_reward((a - d).tolist())
        diff = a - d  # broadcasts a single goal against a batch
        diff = diff.reshape(diff.shape[:-1] + (size // 3, 3))  # an empty batch too
        if self.reward_type == "sparse":
            if box is not None:
                inside = (np.abs(diff) <= np.asarray(box)).all(axis=(-1, -2))
            else:
                inside = np.sqrt(np.sum(diff * diff, axis=-1)).max(axis=-1) <= self.goal_distance_threshold
            r = np.where(inside, np.float32(0.0), np.float32(-1.0))
        else:
            r = -np.sqrt(np.sum(diff * diff, axis=-1)).max(axis=-1).astype(np.float32)
        return float(r) if np.ndim(r) == 0 else r

    def _single_goal_reward(self, diff: list[float]) -> float:
        """:meth:`_goal_reward` of one goal from ``achieved - desired`` (``G`` floats [m], float64)."""
        box = self.goal_box
        if self.reward_type == "sparse" and box is not None:
            inside = all(abs(diff[k]) <= box[k % 3] for k in range(len(diff)))
            return 0.0 if inside else -1.0
        # The largest point-to-point distance, as max() picks it (first one, then any larger), in a
        # loop: max() of a generator costs more.
        dist = math.sqrt(diff[0] * diff[0] + diff[1] * diff[1] + diff[2] * diff[2])
        for k in range(3, len(diff), 3):
            d = math.sqrt(diff[k] * diff[k] + diff[k + 1] * diff[k + 1] + diff[k + 2] * diff[k + 2])
            if d > dist:
                dist = d
        if self.reward_type == "sparse":
            return 0.0 if dist <= self.goal_distance_threshold else -1.0
        return float(np.float32(-dist))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Start a new episode.

        Every episode has its own seed: without ``seed``, one is drawn from ``self.np_random`` (so
        ``reset(seed=s)`` then ``reset()`` is reproducible) and the generator is re-seeded with it.
        ``info["seed"]`` reports it, and ``reset(seed=info["seed"])`` replays the same episode (this
        is what episode stores record, also for episodes started by a vector env's auto-reset).

        Every reset but the first after construction empties the physics world and builds the scene
        again (about 8-10 ms of CPU for a factory env after an episode, half of it importing the
        Panda's meshes), so every episode starts from a world built the same way from nothing:
        Bullet keeps collision caches across ``restoreState`` (pairs, the order of contact
        manifolds, hence the order its solver treats contacts in) that would make the episode
        depend on the episodes run before (6 of 240 noisy-expert factory episodes with the snapshot
        reset, by up to 0.043 in an observation entry; none with the fresh world). With
        ``fresh_world=False`` a snapshot of the first world is restored instead (and that guarantee
        is lost).

        Args:
            seed: Seeds ``self.np_random``: a non-negative integer (Python or NumPy, e.g. from
                ``np.arange`` or a store's seed column) or ``None``. The same seed gives a
                bit-identical episode for the same actions, whatever ran before (with
                ``fresh_world=True``, the default).
            options: Unused; accepted for API compatibility.

        Returns:
            ``(observation, info)`` with ``info["is_success"]`` (False), ``info["seed"]`` (this
            episode's seed, int in ``[0, 2**31 - 1)`` when drawn, by
            ``np_random.integers(0, 2**31 - 1)``), ``info["site"]`` (name) and ``info["site_params"]``
            (the parameters sampled for this episode).

        Raises:
            ValueError: For a seed that is not a non-negative integer (a bool, float or string), before
                anything changes.
            RuntimeError: If the env was closed.
        """
        if self.sim.closed:
            raise RuntimeError("reset() on a closed env")
        if seed is not None:
            if not _is_int(seed) or seed < 0:
                raise ValueError(f"seed={seed!r} must be a non-negative integer, or None to draw one")
            seed = int(seed)  # NumPy integers too (Gymnasium's seeding takes Python ints only)
        if seed is None:
            seed = int(self.np_random.integers(0, 2**31 - 1))
        super().reset(seed=seed)
        # sampled first (building a world draws nothing) so a rebuild can build for this episode's site
        site_params = self.site.sample(self.np_random)
        if not self._world_fresh:  # a world built and not stepped yet is where every episode starts
            # the world has run an episode: build it again from nothing (also when a snapshot env lost
            # its snapshot: a rebuild for another warehouse layout interrupted, e.g. by Ctrl-C)
            if self.fresh_world or not self.sim.has_base_state:
                self.sim.reset_world()
                self._prepare_world(site_params)
                self._build_world()
            else:
                self.sim.restore_base_state()
        self._world_fresh = False
        self.site_params = site_params
        self._apply_site(self.site_params)
        self._initialize_episode(self.np_random)
        self._read_state()
        self._elapsed = 0
        hold = [float(v) for v in self._hold_action()]
        self._actions = deque([list(hold) for _ in range(int(self.site_params.get("action_delay", 0)))])
        self._has_reset = True
        self._ended = None
        self._ended_warned = False
        info = {"is_success": False, "seed": int(seed), "site": self.site.name,
                "site_params": dict(self.site_params)}
        return self._get_obs(), info

    def checked_action(self, action: Any) -> list[float]:
        """The action :meth:`step` would apply: checked, then clipped to ``[-1, 1]``.

        For wrappers that look at an action before it is stepped (e.g.
        :class:`~loopsim.envs.core.wrappers.ExpertIntervention`), so they see what the env would do
        with it and refuse what the env would refuse.

        Args:
            action: ``(action_dim,)`` array-like of real numbers.

        Returns:
            ``action_dim`` plain floats in ``[-1, 1]``.

        Raises:
            ValueError: If the action has the wrong shape, is not numeric (strings, bools, complex) or
                holds NaN or infinite values.
        """
        a = np.asarray(action)
        if a.dtype.kind not in "fiu":
            raise ValueError(f"action must hold real numbers, got dtype {a.dtype}")
        if not isinstance(action, np.ndarray) and _holds_bool(action):
            # NumPy reads [True, 0, 0, 0] as integers and [True, 0.5] as floats: True became 1
            raise ValueError(f"action must hold real numbers, got a bool in {action!r}")
        if a.shape != (self.action_dim,):
            raise ValueError(f"action must have shape ({self.action_dim},), got {a.shape}")
        values = a.tolist()  # plain floats: cheaper than numpy for a handful of numbers
        if not all(map(math.isfinite, values)):
            raise ValueError(f"action must be finite, got {values}")
        return [-1.0 if v < -1.0 else 1.0 if v > 1.0 else v for v in values]

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Apply one action for one control step.

        Args:
            action: ``(action_dim,)`` array in ``[-1, 1]`` (its meaning is in the task's docstring: for
                the factory, end-effector displacement (dx, dy, dz) and the gripper command; for the
                warehouse, linear and angular velocity commands). Values outside ``[-1, 1]`` are
                clipped.

        Returns:
            ``(observation, reward, terminated, truncated, info)``. ``terminated`` is True on success
            or an unrecoverable failure, ``truncated`` when the time limit is reached.
            ``info["is_success"]`` is given every step; ``info["failure_mode"]`` at the end of a failed
            episode (``None`` after a success).

        Raises:
            ValueError: If the action has the wrong shape, is not numeric (strings, bools, complex) or
                holds NaN or infinite values; nothing is passed to the physics in that case.
            RuntimeError: If called before ``reset()`` or after ``close()``.

        Warns:
            UserWarning: Once per episode (through ``gymnasium.logger``, as Gymnasium's own envs do),
                at the first step after the episode ended (``terminated`` or ``truncated``) without a
                ``reset()``. What follows is undefined in Gymnasium's API: the physics runs on past the
                end, and the flags describe the state reached, not the episode (a warehouse robot that
                collided reports ``terminated=False`` once it is no longer touching the shelf).
        """
        if self.sim.closed:
            raise RuntimeError("step() on a closed env")
        if not self._has_reset:
            raise RuntimeError("call reset() before step()")
        if self._ended is not None and not self._ended_warned:
            self._ended_warned = True
            gym.logger.warn(
                f"step() after the episode ended ({self._ended}) without reset(): call reset() to start "
                "the next episode; the physics runs on past the end and the steps that follow belong "
                "to no episode of the task"
            )
        a = self.checked_action(action)
        if self._actions:  # actuator lag: apply the action from `action_delay` steps ago
            self._actions.append(a)
            a = self._actions.popleft()
        self._apply_action(a)
        self.sim.step()
        self._elapsed += 1
        self._read_state()
        ev = self._evaluate()
        success = bool(ev["success"])
        failure = ev.get("failure")
        terminated = success or failure is not None
        truncated = not terminated and self._elapsed >= self.max_steps
        info: dict[str, Any] = {"is_success": success}
        if terminated or truncated:
            info["failure_mode"] = None if success else (failure or self._timeout_failure_mode())
            if self._ended is None:
                self._ended = "terminated" if terminated else "truncated"
        achieved = self.achieved_goal().astype(np.float32)
        desired = self.desired_goal().astype(np.float32)
        obs = self._get_obs(achieved, desired)
        # The same arithmetic as compute_reward on the float32 goals, so HER relabelling agrees exactly.
        reward = self._goal_reward(achieved, desired, info)
        return obs, reward, terminated, truncated, info

    def _get_obs(self, achieved: np.ndarray | None = None, desired: np.ndarray | None = None) -> Any:
        if self.obs_mode == "rgb":
            eye, target, fov = self._camera()
            return self.sim.render(self.image_size, self.image_size, eye, target, fov)
        state = np.maximum(self._state_observation(), self._state_low64)
        state = np.minimum(state, self._state_high64, out=state).astype(np.float32)
        if self.obs_mode == "state":
            return state
        return {
            "observation": state,
            "achieved_goal": self.achieved_goal().astype(np.float32) if achieved is None else achieved,
            "desired_goal": self.desired_goal().astype(np.float32) if desired is None else desired,
        }

    def render(self) -> np.ndarray | None:
        """Render the scene.

        Returns:
            In ``rgb_array`` mode an image ``(render_size, render_size, 3)`` uint8 from the task camera;
            ``None`` in ``human`` mode (the GUI shows the scene) or without a render mode.
        """
        if self.render_mode != "rgb_array":
            return None
        eye, target, fov = self._camera()
        return self.sim.render(self.render_size, self.render_size, eye, target, fov)

    def close(self) -> None:
        """Release the physics client. Safe to call more than once."""
        sim = getattr(self, "sim", None)
        if sim is not None:
            sim.close()
