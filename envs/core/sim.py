"""One PyBullet physics client per env, with the few helpers every scene needs.

Every env owns a :class:`Simulation`; nothing in loopsim touches PyBullet's global (default) client.
Hot-path calls (``stepSimulation``) are pre-bound to the client id so the per-step overhead over the
engine is a plain C call.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import pybullet as p
import pybullet_data
from pybullet_utils import bullet_client

from loopsim.envs.core.quiet import stdout_to_devnull

__all__ = ["Simulation"]


@contextlib.contextmanager
def _x_display_held() -> Iterator[str | None]:
    """Open the X display PyBullet's GUI will open, and hold it open while the GUI connects (Linux).

    Yields why it cannot be opened, or ``None`` if it can. PyBullet's GUI loads ``libX11.so.6`` and
    calls ``XOpenDisplay``; when that fails it prints "cannot connect to X server" and exits the whole
    interpreter. The same call made here first turns that into an error the caller can handle (a
    stale ``DISPLAY`` over SSH or in a container, an X server that is gone, a Wayland session without
    XWayland, whose ``DISPLAY`` is unset).

    The connection stays open until the block ends: an X server resets when its last client
    disconnects (X.Org's and Xvfb's default without ``-noreset``) and refuses connections meanwhile,
    so closing the probe before PyBullet connected made PyBullet fail (exit) 2-3 times in 12 under
    ``xvfb-run``. A failed open is tried again for up to ~1 s, for a server still resetting after the
    previous GUI closed.
    """
    import ctypes
    import time

    display = os.environ.get("DISPLAY", "")
    try:
        xlib = ctypes.CDLL("libX11.so.6")
    except OSError:
        yield "cannot open the X display: libX11.so.6, which the PyBullet GUI loads, is not installed"
        return
    xlib.XOpenDisplay.restype = ctypes.c_void_p
    xlib.XOpenDisplay.argtypes = [ctypes.c_char_p]
    xlib.XCloseDisplay.argtypes = [ctypes.c_void_p]
    handle = xlib.XOpenDisplay(None)  # what PyBullet calls: the display DISPLAY names
    for attempt in range(5 if display else 0):  # 0.05 + 0.1 + ... + 0.8 s
        if handle:
            break
        time.sleep(0.05 * 2**attempt)
        handle = xlib.XOpenDisplay(None)
    if not handle:
        if not display:
            yield "cannot open the X display the PyBullet GUI needs (X11 only: DISPLAY is not set)"
        else:
            yield f"cannot open the X display (DISPLAY={display!r}), which the PyBullet GUI needs"
        return
    try:
        yield None
    finally:
        xlib.XCloseDisplay(handle)


class _BulletClient(bullet_client.BulletClient):
    """PyBullet's ``BulletClient``, whose destructor also copes with a connection that failed.

    ``BulletClient.__init__`` raises before it sets ``_client`` when ``connect`` fails (e.g. a second
    GUI in one process); its ``__del__`` then raised ``AttributeError``, which Python printed as
    "Exception ignored in ... BulletClient.__del__" after our clear error.
    """

    def __del__(self) -> None:
        """Disconnect, as ``BulletClient`` does, if the connection was ever made."""
        if "_client" in self.__dict__:
            super().__del__()


class Simulation:
    """A PyBullet client in DIRECT (headless) or GUI mode with a fixed time step and substeps.

    Args:
        timestep: Physics time step [s].
        substeps: Physics steps per control step; the control frequency is
            ``1 / (timestep * substeps)`` [Hz].
        gui: Connect with the PyBullet GUI instead of DIRECT mode (needs a display).
        solver_iterations: Constraint-solver iterations per physics step.
        renderer: Keep PyBullet's CPU renderer (TinyRenderer), which :meth:`render` needs. Without
            it (DIRECT mode only) bodies are created without their render meshes, which makes
            building a scene faster (the Panda's URDF 4.6 -> 4.0 ms, a cylinder body 0.37 -> 0.12 ms,
            measured here) and changes nothing in the physics. :meth:`render` then raises; a raw
            ``bc.getCameraImage`` call returns an all-zero image (PyBullet reports no error).

    Raises:
        RuntimeError: If the GUI is requested and PyBullet cannot open a window (on Linux: no
            ``DISPLAY``, or an X display that cannot be opened; checked before PyBullet tries, which
            would exit the interpreter), or another GUI client is open in this process (PyBullet
            allows one).
    """

    def __init__(
        self,
        timestep: float,
        substeps: int,
        gui: bool = False,
        solver_iterations: int = 50,
        renderer: bool = True,
    ) -> None:
        held: contextlib.AbstractContextManager[str | None] = contextlib.nullcontext()
        if gui and sys.platform.startswith("linux"):
            # PyBullet would print "cannot connect to X server" and exit the interpreter.
            if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
                raise RuntimeError(
                    'render_mode="human" needs a display (DISPLAY is not set); use "rgb_array"'
                )
            held = _x_display_held()
        mode = p.GUI if gui else p.DIRECT
        try:
            with held as problem, stdout_to_devnull():
                if problem is not None:
                    raise RuntimeError(f'render_mode="human": {problem}; use "rgb_array"')
                self.bc = _BulletClient(connection_mode=mode)
        except p.error as exc:
            hint = ""
            if gui and "Only one" in str(exc):
                hint = ' (one render_mode="human" env per process: close() the other one first)'
            raise RuntimeError(
                f"could not start PyBullet in {'GUI' if gui else 'DIRECT'} mode: {exc}{hint}"
            ) from None
        self.id: int = self.bc._client
        self.timestep = float(timestep)
        self.substeps = int(substeps)
        self.solver_iterations = int(solver_iterations)
        self.gui = gui
        self._closed = False
        self._base_state: int | None = None
        self.bc.setAdditionalSearchPath(pybullet_data.getDataPath())
        self.renders = True
        if not renderer and not gui:
            # DIRECT mode's renderer is a plugin: loading its name gives the id of the one in use,
            # and unloading it leaves the client without one (for good: it survives resetSimulation).
            plugin = self.bc.loadPlugin("tinyRendererPlugin")
            if plugin >= 0:
                self.bc.unloadPlugin(plugin)
                self.renders = False
        self._configure()
        if gui:  # tests/envs/test_gui.py, under Xvfb
            self.bc.configureDebugVisualizer(self.bc.COV_ENABLE_GUI, 0)
        self._step_once = functools.partial(p.stepSimulation, physicsClientId=self.id)
        # The reset path too: BulletClient's attribute lookup builds a new partial on every call.
        self._reset_pose = functools.partial(p.resetBasePositionAndOrientation, physicsClientId=self.id)
        self._num_bodies = functools.partial(p.getNumBodies, physicsClientId=self.id)
        self._collide = functools.partial(p.performCollisionDetection, physicsClientId=self.id)
        self._restore = functools.partial(p.restoreState, physicsClientId=self.id)

    def _configure(self) -> None:
        """Set the world's parameters (time step, gravity, solver); a new or emptied world needs them."""
        self.bc.setTimeStep(self.timestep)
        self.bc.setGravity(0.0, 0.0, -9.81)
        self.bc.setPhysicsEngineParameter(
            numSolverIterations=self.solver_iterations, deterministicOverlappingPairs=1
        )

    def reset_world(self) -> None:
        """Empty the world (``resetSimulation``) and set its parameters again, as on a new client.

        Every body, constraint, saved state and collision cache goes: what the caller builds next is
        built into the same engine state as in a newly created :class:`Simulation` (body ids restart
        at 0), whatever ran before. Bullet's broadphase pair cache, its cleanup cursor, its dynamic
        AABB trees and the order of the contact manifolds (which is the order the solver treats the
        contacts in) all carry history that ``restoreState`` does not touch; only an empty world has
        none.

        Raises:
            RuntimeError: If the simulation was closed.
        """
        if self._closed:
            raise RuntimeError("reset_world() on a closed simulation")
        if self._base_state is not None:
            self.bc.removeState(self._base_state)
            self._base_state = None
        self.bc.resetSimulation()
        self._configure()

    @property
    def control_dt(self) -> float:
        """Duration of one control step [s]."""
        return self.timestep * self.substeps

    def step(self) -> None:
        """Advance the physics by one control step (``substeps`` physics steps)."""
        step_once = self._step_once
        for _ in range(self.substeps):
            step_once()

    @contextlib.contextmanager
    def no_rendering(self) -> Iterator[None]:
        """Context in which the GUI does not redraw (faster scene loading; no-op in DIRECT mode)."""
        if self.gui:  # pragma: no cover - needs a display
            self.bc.configureDebugVisualizer(self.bc.COV_ENABLE_RENDERING, 0)
        try:
            yield
        finally:
            if self.gui:  # pragma: no cover
                self.bc.configureDebugVisualizer(self.bc.COV_ENABLE_RENDERING, 1)

    def save_base_state(self) -> None:
        """Snapshot the freshly built scene; :meth:`restore_base_state` returns to it.

        The snapshot holds body poses, velocities and contact points, not Bullet's collision caches
        (pairs, trees, manifold order): returning to it after an episode is not enough for a
        bit-identical next episode, see :meth:`reset_world`.
        """
        self._base_state = self.bc.saveState()

    def restore_base_state(self) -> None:
        """Return every body to the snapshot taken by :meth:`save_base_state`.

        Raises:
            RuntimeError: If no snapshot was taken.
        """
        if self._base_state is None:
            raise RuntimeError("save_base_state() was never called")
        # restoreState puts bodies back but keeps Bullet's persistent contact manifolds. Pulling every
        # body far apart and running collision detection releases some of them first (Bullet's
        # broadphase drops only part of the stale pairs per pass, so not all of them after an
        # episode). Envs use the snapshot only with fresh_world=False, the reset that does not
        # promise episodes independent of the ones before; by default every episode gets a new world.
        reset_pose = self._reset_pose
        for body in range(self._num_bodies()):
            reset_pose(body, [0.0, 0.0, 1.0e4 + 100.0 * body], [0.0, 0.0, 0.0, 1.0])
        self._collide()
        self._restore(self._base_state)

    def create_box(
        self,
        half_extents: Sequence[float],
        position: Sequence[float],
        mass: float = 0.0,
        rgba: Sequence[float] = (0.6, 0.6, 0.6, 1.0),
        lateral_friction: float | None = None,
    ) -> int:
        """Create a box body.

        Args:
            half_extents: Half sizes (x, y, z) [m].
            position: Centre position (x, y, z) [m], world frame.
            mass: Mass [kg]; 0 makes the body static.
            rgba: Colour (r, g, b, a) in [0, 1].
            lateral_friction: Coefficient of friction, if not the default 0.5.

        Returns:
            The body unique id.
        """
        col = self.bc.createCollisionShape(self.bc.GEOM_BOX, halfExtents=list(half_extents))
        vis = self.bc.createVisualShape(
            self.bc.GEOM_BOX, halfExtents=list(half_extents), rgbaColor=list(rgba)
        )
        body = self.bc.createMultiBody(mass, col, vis, list(position))
        if lateral_friction is not None:
            self.bc.changeDynamics(body, -1, lateralFriction=lateral_friction)
        return body

    def create_compound(
        self,
        boxes: Sequence[tuple[Sequence[float], Sequence[float]]],
        position: Sequence[float],
        rgba: Sequence[float] = (0.5, 0.5, 0.5, 1.0),
        lateral_friction: float | None = None,
    ) -> int:
        """Create one static body made of several boxes (a bin, a fixture with a hole).

        Args:
            boxes: ``(half_extents, offset)`` pairs [m], offsets relative to ``position``.
            position: Body origin (x, y, z) [m], world frame.
            rgba: Colour (r, g, b, a) in [0, 1].
            lateral_friction: Coefficient of friction, if not the default 0.5.

        Returns:
            The body unique id.
        """
        halves = [list(h) for h, _ in boxes]
        offsets = [list(o) for _, o in boxes]
        n = len(boxes)
        col = self.bc.createCollisionShapeArray(
            [self.bc.GEOM_BOX] * n, halfExtents=halves, collisionFramePositions=offsets
        )
        vis = self.bc.createVisualShapeArray(
            [self.bc.GEOM_BOX] * n,
            halfExtents=halves,
            visualFramePositions=offsets,
            rgbaColors=[list(rgba)] * n,
        )
        body = self.bc.createMultiBody(0.0, col, vis, list(position))
        if lateral_friction is not None:
            self.bc.changeDynamics(body, -1, lateralFriction=lateral_friction)
        return body

    def render(
        self,
        width: int,
        height: int,
        eye: Sequence[float],
        target: Sequence[float],
        fov: float = 60.0,
        up: Sequence[float] = (0.0, 0.0, 1.0),
        far: float = 5.0,
    ) -> np.ndarray:
        """Render an RGB image with PyBullet's CPU (tiny) renderer.

        Args:
            width: Image width [px].
            height: Image height [px].
            eye: Camera position (x, y, z) [m], world frame.
            target: Point the camera looks at (x, y, z) [m], world frame.
            fov: Vertical field of view [deg].
            up: Camera up vector, world frame.
            far: Far clipping plane [m] (the near plane is at 0.05 m).

        Returns:
            Image of shape ``(height, width, 3)``, dtype ``uint8``.

        Raises:
            RuntimeError: If the simulation was closed or made with ``renderer=False``.
        """
        if self._closed:
            raise RuntimeError("render() on a closed env")
        if not self.renders:
            raise RuntimeError(
                "this simulation was made without a renderer (an env with obs_mode other than 'rgb' "
                "and no render_mode); make the env with render_mode='rgb_array' to render it"
            )
        view = self.bc.computeViewMatrix(list(eye), list(target), list(up))
        proj = self.bc.computeProjectionMatrixFOV(fov, width / height, 0.05, far)
        _, _, rgba, _, _ = self.bc.getCameraImage(
            width,
            height,
            view,
            proj,
            renderer=self.bc.ER_TINY_RENDERER,
            shadow=0,
            flags=self.bc.ER_NO_SEGMENTATION_MASK,
        )
        return np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[:, :, :3].copy()

    def close(self) -> None:
        """Disconnect the client. Safe to call more than once."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(p.error):
                self.bc.disconnect()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    @property
    def has_base_state(self) -> bool:
        """Whether a :meth:`save_base_state` snapshot is there to restore (:meth:`reset_world` drops it)."""
        return self._base_state is not None
