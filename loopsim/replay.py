"""Replay stored episodes: re-simulate them, check the store reproduces them, render them.

An episode in a store is a pure function of (env id, env kwargs, seed, site parameters, actions):
:func:`replay_episode` rebuilds the env from the store's attributes at the episode's site, resets
with the stored seed and steps the stored (executed) actions. The site is the stored site name when
it is a bundled site and resampling it reproduces the recorded site parameters (this keeps the env's
random stream exactly as recorded); otherwise (an inline ``custom`` site, or a site file changed
since recording) the recorded parameters are pinned as constants and ``site_source`` says so. (A
constant draws one ``random()`` where the original distribution drew, but a ``choice`` or integer
parameter consumes the generator's bits differently, so later draws can shift: pinning is the
fallback, not the rule.) It compares every replayed observation, reward and flag with the stored
ones:

- float observations and rewards: the largest absolute difference, in the observation's own units
  (metres, m/s, ...); within ``tolerance`` (default :data:`DEFAULT_TOLERANCE`) passes;
- ``uint8`` images (``rgb`` observations): the largest fraction of differing pixel values in any
  one frame (0..1); within ``pixel_tolerance`` (default :data:`DEFAULT_PIXEL_TOLERANCE`) passes;
- events must match exactly: the step at which the episode ends, ``terminated`` / ``truncated``,
  success and failure mode (a replay that ends early or late has diverged, whatever the numbers).

The same seed and actions give bit-identical episodes (the env's contract), so a faithful store
replays with deviation 0; the tolerances absorb the last-bit differences of floating-point
contact physics that can appear between processes (a known rare case: ~1e-5 m on a final
observation), while anything that changes what happened (another action, a wrong seed or site)
moves a part or the arm by millimetres at least and is reported. ``exact`` tells bit-identical
replays apart from those merely within tolerance.

:func:`replay_store` audits many episodes in worker processes. :func:`render_video` renders a replay
(or, with ``source="store"``, the stored ``rgb`` observations) to MP4 or GIF with an overlay of step,
reward, success and failure mode.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from loopsim.atomic import atomic_path

__all__ = [
    "DEFAULT_PIXEL_TOLERANCE",
    "DEFAULT_TOLERANCE",
    "VIDEO_FORMATS",
    "ReplayError",
    "ReplayResult",
    "VideoResult",
    "episode_frames",
    "make_replay_env",
    "render_video",
    "replay_episode",
    "replay_gui",
    "replay_store",
    "write_video",
]

DEFAULT_TOLERANCE = 1e-4
"""Largest absolute deviation of a float observation entry or reward that still counts as a
reproduction (observation units: m, m/s...). 0.1 mm: ten times the known rare cross-process
difference (~1e-5 on one final observation) and far below any real divergence (a different action
moves the end effector by up to 20 mm per step)."""
DEFAULT_PIXEL_TOLERANCE = 0.01
"""Largest fraction of differing ``uint8`` pixel values in one frame that still counts as a
reproduction (a sub-millimetre difference flips a few edge pixels; a different action moves the arm
across hundreds)."""
VIDEO_FORMATS = (".mp4", ".gif", ".webm")


class ReplayError(ValueError):
    """An episode cannot be replayed (no env id, unknown index, bad video arguments...)."""


@dataclass
class ReplayResult:
    """How a replayed episode compares with the stored one.

    Attributes:
        index: Episode index in the store.
        seed: The stored seed.
        site: The stored site name.
        steps: Stored length ``T`` [control steps].
        replayed_steps: Steps replayed (less than ``T`` when the replay ended early).
        deviations: Per observation key (``""`` for a plain observation; ``"reward"``): the largest
            absolute difference for float arrays, the largest per-frame fraction of differing pixel
            values for ``uint8`` images.
        events: Mismatched events, e.g. ``"ended at step 40 (stored: 57)"``; empty when they match.
        tolerance: Float tolerance used.
        pixel_tolerance: Image tolerance used.
        image_keys: The observation keys holding ``uint8`` images (their deviations are fractions).
        success: Stored success; ``replayed_success``: the replay's.
        failure_mode: Stored failure mode (``""`` = none); ``replayed_failure_mode``: the replay's.
        returns: Stored return; ``replayed_return``: the replay's.
        site_source: How the site was rebuilt: ``"name"`` (the stored site, resampled: the recorded
            parameters came out again), ``"parameters"`` (recorded parameters pinned as constants),
            ``""`` (no site: a non-loopsim env, or none recorded).
    """

    index: int
    seed: int
    site: str
    steps: int
    replayed_steps: int = 0
    deviations: dict[str, float] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE
    pixel_tolerance: float = DEFAULT_PIXEL_TOLERANCE
    image_keys: list[str] = field(default_factory=list)
    success: bool = False
    replayed_success: bool = False
    failure_mode: str = ""
    replayed_failure_mode: str = ""
    returns: float = 0.0
    replayed_return: float = 0.0
    site_source: str = ""

    @property
    def max_deviation(self) -> float:
        """Largest float deviation (observations and rewards) [observation units]; 0.0 if none."""
        values = [v for k, v in self.deviations.items() if k not in self.image_keys]
        return max(values, default=0.0)

    @property
    def max_pixel_deviation(self) -> float:
        """Largest per-frame fraction of differing pixel values over the image keys (0..1)."""
        return max((self.deviations[k] for k in self.image_keys), default=0.0)

    @property
    def exact(self) -> bool:
        """The replay is bit-identical to the stored episode."""
        return not self.events and all(v == 0.0 for v in self.deviations.values())

    @property
    def ok(self) -> bool:
        """The replay reproduces the episode within the tolerances, with the same events."""
        return (not self.events and self.max_deviation <= self.tolerance
                and self.max_pixel_deviation <= self.pixel_tolerance)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict, with ``max_deviation``, ``max_pixel_deviation``, ``exact`` and ``ok``."""
        return {**asdict(self), "max_deviation": self.max_deviation,
                "max_pixel_deviation": self.max_pixel_deviation, "exact": self.exact, "ok": self.ok}


def _pinned_site(meta: Any) -> str | dict[str, Any]:
    """The episode's sampled site parameters as constants (an inline site), else its site name."""
    if meta.site_params:
        return dict(meta.site_params)
    return meta.site or "lab"


def _bundled(store: Any, site: str) -> bool:
    from loopsim.envs import available_sites, env_class

    return site in available_sites(env_class(store.env_id).site_schema.domain)


def make_replay_env(store: Any, index: int, *, pin_site: bool | None = None, **overrides: Any) -> gym.Env:
    """Build the env episode ``index`` of ``store`` was recorded in, at the episode's site.

    Args:
        store: An open :class:`~loopsim.datasets.EpisodeStore`.
        index: Episode index.
        pin_site: ``False``: the stored site name; ``True``: the recorded site parameters as
            constants; ``None`` (default): the name if it is a bundled site of the env's domain,
            else the parameters. (Other Gymnasium envs get no site.)
        **overrides: Env kwargs that replace stored ones (``render_mode``, ``render_size``...).

    Returns:
        A fresh env; reset it with the episode's seed.

    Raises:
        ReplayError: If the store records no env id or the env cannot be made from its kwargs.
        IndexError: If ``index`` is out of range.
    """
    import loopsim  # noqa: F401 - registers the env ids
    from loopsim.envs import ENV_ENTRY_POINTS

    meta = store.metadata_row(index)
    site: Any = None
    if store.env_id in ENV_ENTRY_POINTS:  # other Gymnasium envs (e.g. an imported dataset's) have no site
        by_name = bool(meta.site) and _bundled(store, meta.site) if pin_site is None else not pin_site
        site = meta.site if by_name and meta.site else _pinned_site(meta)
    try:
        return store.make_env(**({} if site is None else {"site": site}), **overrides)
    except (ValueError, TypeError, gym.error.Error) as exc:
        raise ReplayError(f"{store.url}: cannot rebuild the env of episode {index}: {exc}") from None


def _check_tolerances(tolerance: float, pixel_tolerance: float) -> None:
    for name, value in (("tolerance", tolerance), ("pixel_tolerance", pixel_tolerance)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ReplayError(f"{name}={value!r} must be a finite number >= 0")
    if pixel_tolerance > 1:
        raise ReplayError(f"pixel_tolerance={pixel_tolerance!r} is a fraction of pixel values: at most 1")


def _flat(observation: Any) -> dict[str, np.ndarray]:
    if isinstance(observation, Mapping):
        return {k: np.asarray(v) for k, v in observation.items()}
    return {"": np.asarray(observation)}


def _deviation(stored: np.ndarray, replayed: np.ndarray) -> float:
    """Largest absolute difference (float), or the fraction of differing values (``uint8`` image)."""
    if stored.shape != replayed.shape:
        return math.inf
    if stored.dtype == np.uint8 and stored.ndim >= 3:  # (H, W, C) image
        return float(np.mean(stored != replayed))
    diff = np.abs(stored.astype(np.float64) - replayed.astype(np.float64))
    if not diff.size:
        return 0.0
    out = float(np.max(diff))
    return math.inf if math.isnan(out) else out


def replay_episode(
    store: Any,
    index: int,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    pixel_tolerance: float = DEFAULT_PIXEL_TOLERANCE,
    env: gym.Env | None = None,
    on_step: Callable[[gym.Env, int, dict[str, Any]], None] | None = None,
    on_end: Callable[[gym.Env], None] | None = None,
    **env_overrides: Any,
) -> ReplayResult:
    """Re-simulate episode ``index`` of ``store`` and compare it with the stored one.

    Args:
        store: An open :class:`~loopsim.datasets.EpisodeStore`.
        index: Episode index (negative counts from the end).
        tolerance: Largest float deviation that passes (see :data:`DEFAULT_TOLERANCE`).
        pixel_tolerance: Largest fraction of differing pixel values per frame that passes.
        env: An env made by :func:`make_replay_env` for this episode (else one is made and closed).
        on_step: Called after the reset (step 0) and after every step ``t`` (1..T) with
            ``(env, t, frame_info)``; ``frame_info`` holds ``reward`` (``None`` at reset),
            ``return``, ``is_success``, ``failure_mode`` (``None`` until the episode ended) and
            ``steps`` (the stored ``T``). Renderers and trajectory recorders hook in here.
        on_end: Called with the env after the last replayed step, before it is closed.
        **env_overrides: Env kwargs that replace stored ones (e.g. ``render_mode="rgb_array"``).

    Returns:
        A :class:`ReplayResult`.

    Raises:
        ReplayError: For a bad tolerance, or a store whose env cannot be rebuilt.
        IndexError: If ``index`` is out of range.
    """
    _check_tolerances(tolerance, pixel_tolerance)
    episode = store.episode(index)
    index = index % len(store) if index < 0 else index
    meta = episode.metadata
    steps = len(episode)
    result = ReplayResult(
        index=index, seed=-1 if meta.seed is None else int(meta.seed), site=meta.site, steps=steps,
        tolerance=float(tolerance), pixel_tolerance=float(pixel_tolerance), success=bool(meta.success),
        failure_mode=meta.failure_mode or "", returns=float(meta.episode_return))
    if meta.seed is None or meta.seed < 0:
        raise ReplayError(f"{store.url}: episode {index} has no recorded seed, so it cannot be replayed")
    own = env is None
    if own:
        env = make_replay_env(store, index, **env_overrides)
    stored_obs = _flat(episode.observations)
    result.image_keys = [k for k, v in stored_obs.items() if v.dtype == np.uint8 and v.ndim >= 4]
    worst = dict.fromkeys(stored_obs, 0.0)
    worst["reward"] = 0.0
    try:
        observation, info = env.reset(seed=int(meta.seed))
        sampled = info.get("site_params") if isinstance(info, Mapping) else None
        if meta.site_params and sampled is not None and dict(sampled) != dict(meta.site_params):
            if own and isinstance(env.unwrapped.site.name, str) and env.unwrapped.site.name != "custom":
                # the site's definition changed since recording: pin the recorded parameters instead
                env.close()
                env = make_replay_env(store, index, pin_site=True, **env_overrides)
                observation, info = env.reset(seed=int(meta.seed))
                result.site_source = "parameters (the site no longer samples the recorded ones)"
            else:
                result.events.append("the env's site parameters differ from the recorded ones")
        elif meta.site_params and sampled is not None:
            result.site_source = "name" if env.unwrapped.site.name != "custom" else "parameters"
        for key, value in _flat(observation).items():
            worst[key] = max(worst.get(key, 0.0), _deviation(stored_obs[key][0], value))
        frame = {"reward": None, "return": 0.0, "is_success": False, "failure_mode": None, "steps": steps}
        if on_step is not None:
            on_step(env, 0, frame)
        terminated = truncated = False
        ret = 0.0
        for t in range(steps):
            if terminated or truncated:
                result.events.append(f"ended at step {t} (stored: {steps})")
                break
            observation, reward, terminated, truncated, info = env.step(episode.actions[t])
            ret += float(reward)
            result.replayed_steps = t + 1
            for key, value in _flat(observation).items():
                worst[key] = max(worst[key], _deviation(stored_obs[key][t + 1], value))
            worst["reward"] = max(worst["reward"], _deviation(np.asarray(episode.rewards[t]),
                                                              np.asarray(reward)))
            frame = {"reward": float(reward), "return": ret, "is_success": bool(info.get("is_success")),
                     "failure_mode": info.get("failure_mode"), "steps": steps}
            if on_step is not None:
                on_step(env, t + 1, frame)
        else:
            stored_end = (bool(episode.terminated[-1]), bool(episode.truncated[-1]))
            if (bool(terminated), bool(truncated)) != stored_end:
                result.events.append(
                    f"step {steps}: terminated/truncated = {bool(terminated)}/{bool(truncated)} "
                    f"(stored: {bool(episode.terminated[-1])}/{bool(episode.truncated[-1])})")
        result.replayed_success = bool(info.get("is_success", False))
        result.replayed_failure_mode = "" if result.replayed_success else str(info.get("failure_mode") or "")
        result.replayed_return = ret
        if not result.events:
            if result.replayed_success != result.success:
                result.events.append(f"success {result.replayed_success} (stored: {result.success})")
            elif result.replayed_failure_mode != result.failure_mode:
                result.events.append(
                    f"failure mode {result.replayed_failure_mode!r} (stored: {result.failure_mode!r})")
        if on_end is not None:
            on_end(env)
    finally:
        if own:
            env.close()
    result.deviations = worst
    return result


# ============================================================================================ audit
_STORE: Any = None
_ARGS: dict[str, Any] = {}


def _init_worker(url: str, args: dict[str, Any], parent: int) -> None:
    import signal

    from loopsim.rollout import _exit_with_parent

    _exit_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    from loopsim.datasets import EpisodeStore

    global _STORE, _ARGS
    _STORE = EpisodeStore.open(url)
    _ARGS = args


def _worker_replay(index: int) -> ReplayResult:
    return replay_episode(_STORE, index, **_ARGS)


def replay_store(
    url: str | os.PathLike,
    episodes: Sequence[int] | None = None,
    *,
    workers: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
    pixel_tolerance: float = DEFAULT_PIXEL_TOLERANCE,
    on_episode: Callable[[ReplayResult], None] | None = None,
) -> Iterator[ReplayResult]:
    """Replay many episodes of a store (its reproducibility audit); yield results in index order.

    Args:
        url: The store (a directory or fsspec URL); opened read-only in each process.
        episodes: Episode indices (default: every committed episode).
        workers: Processes (``spawn``); 1 replays in this process.
        tolerance: See :func:`replay_episode`.
        pixel_tolerance: See :func:`replay_episode`.
        on_episode: Called after each result (e.g. to advance a progress bar).

    Yields:
        One :class:`ReplayResult` per episode, in the order of ``episodes``.

    Raises:
        ReplayError: For ``workers < 1`` or a bad tolerance (before any work).
        IndexError: For an index out of range (before any work).
        loopsim.datasets.StoreError: If the store cannot be opened.
    """
    from loopsim.datasets import EpisodeStore

    if not isinstance(workers, int) or workers < 1:
        raise ReplayError(f"workers={workers!r} must be an integer >= 1")
    _check_tolerances(tolerance, pixel_tolerance)
    args = {"tolerance": tolerance, "pixel_tolerance": pixel_tolerance}
    with EpisodeStore.open(url) as store:
        n = len(store)
        indices = list(range(n)) if episodes is None else [int(i) for i in episodes]
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise IndexError(f"episode {bad[0]} out of range: the store has {n} episodes")
        indices = [i % n for i in indices]
        if workers == 1 or len(indices) <= 1:
            for i in indices:
                r = replay_episode(store, i, **args)
                if on_episode is not None:
                    on_episode(r)
                yield r
            return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(indices)), mp_context=ctx,
                             initializer=_init_worker, initargs=(str(url), args, os.getpid())) as pool:
        try:
            from loopsim.rollout import _sigint_held

            with _sigint_held():  # the workers start here, with Ctrl-C held back from them
                results = pool.map(_worker_replay, indices)
            for r in results:
                if on_episode is not None:
                    on_episode(r)
                yield r
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# ============================================================================================ video
def _overlay(frame: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``frame`` with ``lines`` of text on a dark band at the top (Pillow's default font)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = frame.shape[:2]
    font_px = max(10, min(w, h) // 22)
    try:
        font = ImageFont.load_default(size=font_px)
    except TypeError:  # pragma: no cover - Pillow < 10.1 has one bitmap size
        font = ImageFont.load_default()
    image = Image.fromarray(frame)
    band = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(band)
    line_h = int(font_px * 1.25)
    draw.rectangle([0, 0, w, line_h * len(lines) + 6], fill=(0, 0, 0, 150))
    for k, line in enumerate(lines):
        draw.text((6, 3 + k * line_h), line, fill=(255, 255, 255, 255), font=font)
    return np.asarray(Image.alpha_composite(image.convert("RGBA"), band).convert("RGB"))


def _overlay_lines(t: int, frame: Mapping[str, Any], width: int = 480) -> list[str]:
    """Two overlay lines; frames under 300 px wide get short labels (r = reward, R = return)."""
    reward = "-" if frame["reward"] is None else f"{frame['reward']:+.3f}"
    status = "SUCCESS" if frame["is_success"] else (
        f"FAILED: {frame['failure_mode']}" if frame.get("failure_mode") else "running")
    if width < 300:
        return [f"step {t}/{frame['steps']} r {reward}", f"R {frame['return']:+.2f} {status}"]
    return [f"step {t}/{frame['steps']}  reward {reward}", f"return {frame['return']:+.2f}  {status}"]


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float) -> Path:
    """Write ``frames`` to ``path``: MP4 (H.264) or WebM (VP9) with ffmpeg, or an animated GIF.

    Args:
        path: Output file; the format follows the suffix (:data:`VIDEO_FORMATS`).
        frames: ``(H, W, 3)`` uint8 frames, all the same shape (odd sides are padded by one black
            row/column for the video codecs, which need even sides). In a GIF, Pillow merges
            consecutive identical frames into one shown for their summed duration.
        fps: Frames per second (> 0).

    Returns:
        The path written (whole or not at all: a temporary file is renamed into place).

    Raises:
        ReplayError: For an unknown suffix, no frames, a bad ``fps``, or MP4 / WebM without
            imageio-ffmpeg.
    """
    import imageio.v2 as imageio
    import imageio.v3 as iio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise ReplayError(f"video {str(path)!r}: the suffix must be one of {list(VIDEO_FORMATS)}")
    if not frames:
        raise ReplayError("no frames to write")
    if not (math.isfinite(fps) and fps > 0):
        raise ReplayError(f"fps={fps!r} must be a finite number > 0")
    if suffix != ".gif":
        try:
            import imageio_ffmpeg  # noqa: F401 - the ffmpeg binary imageio's FFMPEG plugin runs
        except ImportError:
            raise ReplayError(f"video {str(path)!r}: MP4 and WebM need imageio-ffmpeg (pip install "
                              "imageio-ffmpeg); or write a .gif") from None
    with atomic_path(path, mkdir=False) as tmp:
        if suffix == ".gif":
            # GIF delays are whole centiseconds; Pillow takes the frame duration in ms.
            iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)
        else:
            h, w = frames[0].shape[:2]
            pad = ((0, h % 2), (0, w % 2), (0, 0))
            codec = {".mp4": "libx264", ".webm": "libvpx-vp9"}[suffix]
            with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec=codec,
                                    pixelformat="yuv420p", macro_block_size=1,
                                    ffmpeg_log_level="error") as writer:
                for f in frames:
                    writer.append_data(np.pad(f, pad) if h % 2 or w % 2 else f)
    return path


@dataclass
class VideoResult:
    """What :func:`render_video` wrote.

    Attributes:
        path: The video file.
        frames: Number of frames (``T + 1``: the reset observation and one per step).
        size: ``(height, width)`` of the frames [px].
        fps: Frames per second.
        replay: The replay's comparison with the store (``None`` for ``source="store"``).
    """

    path: Path
    frames: int
    size: tuple[int, int]
    fps: float
    replay: ReplayResult | None = None


def episode_frames(
    store: Any,
    index: int,
    *,
    source: str = "replay",
    size: int = 480,
    overlay: bool = True,
    frame_step: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
    pixel_tolerance: float = DEFAULT_PIXEL_TOLERANCE,
) -> tuple[list[np.ndarray], ReplayResult | None]:
    """The frames of episode ``index``: ``T + 1`` RGB images, optionally with the overlay.

    Args:
        store: An open :class:`~loopsim.datasets.EpisodeStore`.
        index: Episode index.
        source: ``"replay"``: re-simulate and render each state with the task's camera at
            ``size`` x ``size`` px (``env.render()`` in ``rgb_array`` mode); ``"store"``: the stored
            ``rgb`` observations themselves (no simulation; ``size`` is ignored).
        size: Side of rendered frames [px], 16..2048.
        overlay: Draw step, reward, return and success / failure mode on each frame.
        frame_step: Keep every ``frame_step``-th state (and always the last), for short videos:
            ``ceil(T / frame_step) + 1`` frames.
        tolerance: See :func:`replay_episode`.
        pixel_tolerance: See :func:`replay_episode`.

    Returns:
        ``(frames, replay result)``: ``T + 1`` frames (fewer with ``frame_step``); the result is
        ``None`` for ``source="store"``.

    Raises:
        ReplayError: For an unknown source, a bad size, or ``source="store"`` on a store without
            ``rgb`` observations.
        IndexError: If ``index`` is out of range.
    """
    if source not in ("replay", "store"):
        raise ReplayError(f"source={source!r} must be 'replay' or 'store'")
    if isinstance(frame_step, bool) or not isinstance(frame_step, int) or frame_step < 1:
        raise ReplayError(f"frame_step={frame_step!r} must be an integer >= 1")
    if source == "store":
        space = store.observation_space
        if not (isinstance(space, gym.spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3):
            what = (f"{type(space).__name__}{tuple(space.shape)} {space.dtype}" if space.shape is not None
                    else type(space).__name__)  # not str(space): a Box prints every bound
            raise ReplayError(f"{store.url} stores {what} observations, not rgb images (uint8, H x W x 3): "
                              "render a replay instead (source='replay')")
        episode = store.episode(index)
        steps = len(episode)
        succ = episode.extras.get("is_success")
        frames, ret = [], 0.0
        for t in range(steps + 1):
            reward = None if t == 0 else float(episode.rewards[t - 1])
            ret += reward or 0.0
            last = t == steps
            ok = bool(succ[t - 1]) if succ is not None and t else (last and episode.metadata.success)
            if t % frame_step and not last:
                continue
            info = {"reward": reward, "return": ret, "is_success": ok, "steps": steps,
                    "failure_mode": episode.metadata.failure_mode if last else None}
            frame = np.asarray(episode.observations[t])
            frames.append(_overlay(frame, _overlay_lines(t, info, frame.shape[1])) if overlay else frame)
        return frames, None
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 2048:
        raise ReplayError(f"size={size!r} must be an integer in [16, 2048] [px]")
    frames = []

    def grab(env: gym.Env, t: int, info: dict[str, Any]) -> None:
        if t % frame_step and t != info["steps"] and not info["failure_mode"] and not info["is_success"]:
            return  # (an episode that ends early in the replay still shows its last state)
        frame = env.render()
        frames.append(_overlay(frame, _overlay_lines(t, info, frame.shape[1])) if overlay else frame)

    result = replay_episode(store, index, tolerance=tolerance, pixel_tolerance=pixel_tolerance, on_step=grab,
                            render_mode="rgb_array", render_size=size)
    return frames, result


def render_video(
    store: Any,
    index: int,
    path: str | os.PathLike,
    *,
    source: str = "replay",
    size: int = 480,
    fps: float | None = None,
    overlay: bool = True,
    frame_step: int = 1,
) -> VideoResult:
    """Render episode ``index`` to a video file (MP4, WebM or GIF by suffix), headless.

    Args:
        store: An open :class:`~loopsim.datasets.EpisodeStore`.
        index: Episode index.
        path: Output file (``.mp4``, ``.webm`` or ``.gif``).
        source: ``"replay"`` (re-simulate, render with the task camera) or ``"store"`` (the stored
            ``rgb`` observations); see :func:`episode_frames`.
        size: Side of rendered frames [px].
        fps: Frames per second; default real time: the env's control frequency (25 Hz for factory)
            divided by ``frame_step``.
        overlay: Draw step, reward, return and success / failure mode.
        frame_step: Keep every ``frame_step``-th state (see :func:`episode_frames`).

    Returns:
        A :class:`VideoResult`.

    Raises:
        ReplayError: For a bad suffix, size, fps or source (checked before any simulation).
        IndexError: If ``index`` is out of range.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise ReplayError(f"video {str(path)!r}: the suffix must be one of {list(VIDEO_FORMATS)}")
    if fps is not None and not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
        raise ReplayError(f"fps={fps!r} must be a finite number > 0")
    if fps is None:
        step = frame_step if isinstance(frame_step, int) and frame_step > 0 else 1
        fps = float(_control_hz(store)) / step
    frames, result = episode_frames(store, index, source=source, size=size, overlay=overlay,
                                    frame_step=frame_step)
    out = write_video(path, frames, fps)
    return VideoResult(out, len(frames), tuple(frames[0].shape[:2]), float(fps), result)


def _control_hz(store: Any) -> float:
    """The control frequency [Hz] of the store's env (its class's physics step x substeps)."""
    from loopsim.envs import ENV_ENTRY_POINTS, env_class

    if store.env_id in ENV_ENTRY_POINTS:
        cls = env_class(store.env_id)
        return round(1.0 / (cls.timestep * cls.substeps))
    return 25.0


def replay_gui(store: Any, index: int, *, speed: float = 1.0) -> ReplayResult:
    """Replay episode ``index`` in the PyBullet GUI, at ``speed`` x real time.

    Args:
        store: An open :class:`~loopsim.datasets.EpisodeStore`.
        index: Episode index.
        speed: Playback speed (1.0 = real time; > 0).

    Returns:
        The replay's :class:`ReplayResult`.

    Raises:
        ReplayError: Without a display (``DISPLAY`` / ``WAYLAND_DISPLAY`` unset) or a bad speed.
    """
    import time

    if not (math.isfinite(speed) and speed > 0):
        raise ReplayError(f"speed={speed!r} must be a finite number > 0")
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ReplayError("--gui needs a display (DISPLAY is not set); render a video instead: "
                          "--video out.mp4")
    dt = 1.0 / _control_hz(store) / speed

    def pace(_env: gym.Env, _t: int, _info: dict[str, Any]) -> None:
        time.sleep(dt)

    try:
        return replay_episode(store, index, on_step=pace, render_mode="human")
    except RuntimeError as exc:  # pragma: no cover - needs a display that refuses PyBullet
        raise ReplayError(f"cannot open the PyBullet GUI: {exc}") from None
