"""Trajectory plots: where the robot went in stored episodes, drawn over a top view of its scene.

Each domain says how its episodes look from above with a :class:`TrajectoryView`, registered under
the domain name (``env.unwrapped.site_schema.domain``) in :data:`TRAJECTORY_VIEWS`:

- ``track(env) -> (K, 2)``: the tracked points' ``(x, y)`` [m, world frame] in the current state,
  one row per tracked point (the end effector in the factory: ``K = 1``; every robot in a
  warehouse);
- ``draw_scene(ax, env)``: the static scene on a matplotlib ``Axes`` (conveyor, bins; shelves...),
  drawn once per plot from the first episode's env after its reset;
- ``draw_episode(ax, env, color)`` (optional): per-episode marks at the episode's end (where the
  parts ended up; the goal...).

Registering a domain is one call, e.g. for the warehouse (in ``loopsim/trajectory.py`` or any
module imported before plotting)::

    register_trajectory_view("warehouse", TrajectoryView(
        track=lambda env: np.array([r.xy for r in env.unwrapped.robots]),
        draw_scene=draw_warehouse_map,
        draw_episode=draw_goal,
    ))

Paths come from replaying the episodes (:func:`loopsim.replay.replay_episode`, no rendering), so
any store of a registered domain can be plotted, whatever its observation mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = [
    "TRAJECTORY_VIEWS",
    "Track",
    "TrajectoryView",
    "episode_tracks",
    "plot_trajectories",
    "register_trajectory_view",
]

SUCCESS_COLOR = "#1a9850"
FAILURE_COLOR = "#d73027"


@dataclass(frozen=True)
class TrajectoryView:
    """How one domain's episodes are drawn from above (see the module docstring).

    Attributes:
        track: ``env -> (K, 2)`` float array, ``(x, y)`` [m] of each tracked point now.
        draw_scene: ``(ax, env) -> None``: draw the static scene, top view, world frame [m].
        draw_episode: ``(ax, env, color) -> None``: marks for one finished episode, or ``None``.
        labels: Names of the ``K`` tracked points for the legend (default: none).
    """

    track: Callable[[gym.Env], np.ndarray]
    draw_scene: Callable[[Any, gym.Env], None]
    draw_episode: Callable[[Any, gym.Env, str], None] | None = None
    labels: tuple[str, ...] = ()


#: Domain name -> its :class:`TrajectoryView`.
TRAJECTORY_VIEWS: dict[str, TrajectoryView] = {}


def register_trajectory_view(domain: str, view: TrajectoryView) -> None:
    """Register (or replace) the trajectory view of ``domain``.

    Args:
        domain: Domain name as in the env's ``site_schema.domain`` (``"factory"``, ``"warehouse"``).
        view: The domain's :class:`TrajectoryView`.

    Raises:
        TypeError: If ``view`` is not a :class:`TrajectoryView` or ``domain`` not a non-empty str.
    """
    if not isinstance(domain, str) or not domain:
        raise TypeError(f"domain must be a non-empty str, got {domain!r}")
    if not isinstance(view, TrajectoryView):
        raise TypeError(f"view must be a TrajectoryView, got {type(view).__name__}")
    TRAJECTORY_VIEWS[domain] = view


def view_for(env: gym.Env) -> TrajectoryView:
    """The :class:`TrajectoryView` of ``env``'s domain.

    Raises:
        KeyError: If the domain has none (the message lists the registered domains).
    """
    domain = getattr(getattr(env.unwrapped, "site_schema", None), "domain", None)
    if domain not in TRAJECTORY_VIEWS:
        raise KeyError(f"no trajectory view for domain {domain!r} ({type(env.unwrapped).__name__}); "
                       f"registered: {sorted(TRAJECTORY_VIEWS)} (see loopsim.trajectory)")
    return TRAJECTORY_VIEWS[domain]


def _view_for_store(store: Any) -> TrajectoryView:
    """The view of the domain of a store's env (from the env class: no env is made)."""
    from loopsim.envs import ENV_ENTRY_POINTS, env_class

    domain = env_class(store.env_id).site_schema.domain if store.env_id in ENV_ENTRY_POINTS else None
    if domain not in TRAJECTORY_VIEWS:
        raise KeyError(f"no trajectory view for domain {domain!r} ({store.env_id or 'no env id'}); "
                       f"registered: {sorted(TRAJECTORY_VIEWS)} (see loopsim.trajectory)")
    return TRAJECTORY_VIEWS[domain]


# ====================================================================================== factory
def _factory_track(env: gym.Env) -> np.ndarray:
    x, y, _ = env.unwrapped.robot.ee_pos_list
    return np.array([[x, y]], dtype=np.float64)


def _factory_scene(ax: Any, env: gym.Env) -> None:
    """Top view of a factory workcell: robot base, conveyor (belt + direction), bins; or a peg table."""
    from matplotlib.patches import Circle, FancyArrow, Rectangle

    u = env.unwrapped
    ax.add_patch(Circle((0.0, 0.0), 0.08, color="#555555", alpha=0.6, zorder=1))
    ax.annotate("robot base", (0.0, -0.1), ha="center", va="top", fontsize=7, color="#444444")
    if hasattr(u, "bins"):
        from loopsim.envs.factory import conveyor as cv

        ax.add_patch(Rectangle((cv.BELT_X - cv.BELT_HALF_WIDTH, -cv.BELT_END), 2 * cv.BELT_HALF_WIDTH,
                               2 * cv.BELT_END, color="#333333", alpha=0.25, zorder=0))
        ax.add_patch(FancyArrow(cv.BELT_X, -0.45, 0.0, 0.15, width=0.008, color="#333333", alpha=0.35,
                                zorder=0))
        ax.annotate("conveyor", (cv.BELT_X + cv.BELT_HALF_WIDTH + 0.01, -cv.BELT_END + 0.02),
                    fontsize=7, rotation=90, color="#333333")
        for b in u.bins:
            side = 2 * cv.BIN_INNER
            ax.add_patch(Rectangle((b.x - cv.BIN_INNER, b.y - cv.BIN_INNER), side, side, fill=False, lw=2,
                                   ec=tuple(b.rgba[:3]), zorder=1))
            name = "bin" if b.kind is None else f"bin: {cv.KIND_NAMES[b.kind]}"
            ax.annotate(name if len(u.bins) > 1 else "bin", (b.x, b.y + cv.BIN_INNER + 0.01), ha="center",
                        fontsize=7)
        ax.set_xlim(-0.15, cv.BELT_X + cv.BELT_HALF_WIDTH + 0.08)
        ax.set_ylim(-cv.BELT_END - 0.05, cv.BELT_END + 0.05)
    elif hasattr(u, "hole_position"):  # peg insertion: the hole is drawn per episode
        ax.set_xlim(-0.15, 0.8)
        ax.set_ylim(-0.4, 0.4)


def _factory_episode(ax: Any, env: gym.Env, color: str) -> None:
    """Where the parts ended up (x markers); for peg insertion the episode's hole (ring) and peg (x)."""
    u = env.unwrapped
    if hasattr(u, "part_positions"):
        pos = np.asarray(u.part_positions())
        ax.scatter(pos[:, 0], pos[:, 1], marker="x", s=18, color=color, zorder=4, linewidths=1)
    elif hasattr(u, "hole_position"):
        hole, peg = np.asarray(u.hole_position()), np.asarray(u.peg_center())
        ax.scatter([hole[0]], [hole[1]], marker="o", s=40, facecolors="none", edgecolors=color, zorder=4)
        ax.scatter([peg[0]], [peg[1]], marker="x", s=18, color=color, zorder=4, linewidths=1)


register_trajectory_view("factory", TrajectoryView(_factory_track, _factory_scene, _factory_episode,
                                                   ("end effector",)))


# ==================================================================================== warehouse
def _warehouse_track(env: gym.Env) -> np.ndarray:
    """The robot's (x, y) [m]; with a cart (WarehouseCartPush) the cart's too."""
    u = env.unwrapped
    points = [u.robot_pose()[:2]]
    if hasattr(u, "cart_xy"):
        points.append(tuple(u.cart_xy))
    return np.array(points, dtype=np.float64)


def _warehouse_scene(ax: Any, env: gym.Env) -> None:
    """Top view of the warehouse: walls and every shelving module of the episode's layout."""
    from matplotlib.patches import Rectangle

    lay = env.unwrapped.layout
    ax.add_patch(Rectangle((lay.x_min, -lay.y_max), lay.x_max - lay.x_min, 2 * lay.y_max, fill=False,
                           lw=1.5, ec="#333333", zorder=0))
    for x0, x1, y0, y1 in lay.shelf_boxes():
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, color="#8c6d46", alpha=0.55, zorder=0))
    ax.set_xlim(lay.x_min - 0.3, lay.x_max + 0.3)
    ax.set_ylim(-lay.y_max - 0.3, lay.y_max + 0.3)


def _warehouse_episode(ax: Any, env: gym.Env, color: str) -> None:
    """The episode's goal (star: the target bay, or the packing station's centre)."""
    gx, gy = env.unwrapped.nav_goal()
    ax.scatter([gx], [gy], marker="*", s=90, color=color, edgecolors="black", linewidths=0.5, zorder=4)


register_trajectory_view("warehouse", TrajectoryView(_warehouse_track, _warehouse_scene, _warehouse_episode,
                                                     labels=("robot", "cart")))


# ======================================================================================== tracks
@dataclass
class Track:
    """The path of one replayed episode.

    Attributes:
        index: Episode index in the store.
        points: ``(T + 1, K, 2)`` float64, ``(x, y)`` [m] of each tracked point at each state.
        success: Stored success.
        failure_mode: Stored failure mode (``""`` = none).
        reproduced: The replay matched the stored episode within tolerance.
    """

    index: int
    points: np.ndarray
    success: bool
    failure_mode: str
    reproduced: bool


def episode_tracks(store: Any, indices: Sequence[int], ax: Any = None) -> list[Track]:
    """Replay episodes and record their domain's tracked points at every state.

    Args:
        store: An open :class:`~loopsim.datasets.EpisodeStore` of a domain with a registered view.
        indices: Episode indices (at least one).
        ax: When given, a matplotlib ``Axes``: the view draws the scene on it (from the first
            episode, after its reset) and each episode's end marks (coloured by success), while
            the env is alive.

    Returns:
        One :class:`Track` per index.

    Raises:
        ValueError: If ``indices`` is empty.
        KeyError: If the env's domain has no registered view.
        IndexError: If an index is out of range.
    """
    from loopsim.replay import replay_episode

    if not len(indices):
        raise ValueError("no episodes to plot")
    tracks: list[Track] = []
    view = _view_for_store(store)
    for k, index in enumerate(indices):
        meta = store.metadata_row(index)
        points: list[np.ndarray] = []

        def record(e: gym.Env, t: int, _info: dict[str, Any], points: list = points,
                   first: bool = k == 0) -> None:
            points.append(np.asarray(view.track(e), dtype=np.float64).reshape(-1, 2))
            if t == 0 and first and ax is not None:
                view.draw_scene(ax, e)

        def end(e: gym.Env, success: bool = bool(meta.success)) -> None:
            if ax is not None and view.draw_episode is not None:
                view.draw_episode(ax, e, SUCCESS_COLOR if success else FAILURE_COLOR)

        result = replay_episode(store, index, on_step=record, on_end=end)
        tracks.append(Track(result.index, np.stack(points), bool(meta.success), meta.failure_mode or "",
                            result.ok))
    return tracks


def plot_trajectories(
    store: Any,
    indices: Sequence[int],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Plot the paths of episodes over a top view of their scene, green for successes, red for failures.

    Each path starts with a dot and ends with a square; the view's per-episode marks (factory: where
    the parts ended, x) use the episode's colour. Episodes whose replay did not reproduce the store
    are drawn dashed (the path shown is the replay's).

    Args:
        store: An open :class:`~loopsim.datasets.EpisodeStore`.
        indices: Episode indices (at least one).
        path: Output image (PNG, SVG, PDF: by suffix, as matplotlib's ``savefig``).
        title: Plot title (default: the env id and the number of episodes).
        dpi: Resolution [dots per inch].

    Returns:
        The path written.

    Raises:
        ValueError: If ``indices`` is empty.
        KeyError: If the env's domain has no registered view.
        IndexError: If an index is out of range.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(5.6, 6.0), dpi=dpi)
    try:
        tracks = episode_tracks(store, indices, ax=ax)
        alpha = max(0.25, min(0.9, 6.0 / len(tracks)))
        for tr in tracks:
            color = SUCCESS_COLOR if tr.success else FAILURE_COLOR
            for j in range(tr.points.shape[1]):
                xy = tr.points[:, j]
                ax.plot(xy[:, 0], xy[:, 1], color=color, alpha=alpha, lw=1.2, zorder=3,
                        ls="-" if tr.reproduced else "--")
                ax.plot(*xy[0], "o", color=color, ms=3, zorder=4)
                ax.plot(*xy[-1], "s", color=color, ms=3, zorder=4)
        n_ok = sum(t.success for t in tracks)
        handles = [Line2D([], [], color=SUCCESS_COLOR, label=f"success ({n_ok})"),
                   Line2D([], [], color=FAILURE_COLOR, label=f"failure ({len(tracks) - n_ok})")]
        modes: dict[str, int] = {}
        for t in tracks:
            if not t.success:
                modes[t.failure_mode or "unknown"] = modes.get(t.failure_mode or "unknown", 0) + 1
        if modes:
            counts = ", ".join(f"{m} {c}" for m, c in modes.items())
            handles[1].set_label(f"{handles[1].get_label()}: {counts}")
        ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.85)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("x [m] (world frame)")
        ax.set_ylabel("y [m]")
        ax.set_title(title or f"{store.env_id}: {len(tracks)} episode(s), top view", fontsize=9)
        ax.grid(alpha=0.25)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
