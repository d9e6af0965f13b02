"""Env throughput against the physics engine's limit, for every loopsim env and panda-gym, in one run.

Run::

    python tests/benchmarks/env_throughput.py [--steps N] [--repeats R] [--frames F]
        [--env ID ...] [--json out.json]

The defaults (``--steps 1000 --repeats 5 --frames 100``) take about 4-5 minutes on 2 cores. The script
is informative: it prints the tables and the goals' pass/fail, and exits 0 unless a measurement
crashed (an env that cannot even be constructed, e.g. because its module is still being written, is
reported as ``unavailable`` and does not count as a crash).

Targets: every id in :data:`loopsim.envs.ENV_ENTRY_POINTS` (default kwargs, so ``obs_mode="state"``),
the variants in :data:`VARIANTS` (FactoryPegInsert with ``block_gripper=True``; FactoryPickPlace and
FactoryPegInsert with ``fresh_world=False``, the snapshot reset) and panda-gym's
``PandaPickAndPlace-v3``. The same method is applied to both so that the ratios are
comparable.

Method, per target and per repeat:

1. **Rollout through ``gymnasium.make``** (the headline, as users run it): ``--steps`` control steps
   with uniform random actions drawn beforehand from ``np.random.default_rng`` (so drawing them is
   not timed), auto-reset on ``terminated`` or ``truncated``; resets are inside the wall time, as in
   real rollouts (panda-gym's episodes last 50 steps, loopsim's up to 150-200 but a task may end them
   much earlier under random actions: the ``reset`` column shows how often and at what price).
   During this rollout ``env.unwrapped.sim.step`` (loopsim's ``Simulation.step`` and panda-gym's
   ``PyBullet.step``: both run ``substeps`` x ``stepSimulation``) is wrapped with a timer, which gives
   the physics time of the very states the rollout visits.
2. **The same rollout through ``env.unwrapped``** (no wrappers). The harness applies the time limit of
   the env's spec itself (panda-gym's lives in the ``TimeLimit`` wrapper), so the episodes match.
3. **Raw engine rate**: ``reset(seed)``, one untimed ``step`` with the env's "hold still" action
   (loopsim: ``_hold_action()``; panda-gym: zeros), then ``pybullet.stepSimulation(physicsClientId=...)``
   in a tight loop for 50 control steps' worth of physics steps; again with the next seed until
   ``--steps`` control steps are done (resets not timed). The hold step matters: panda-gym's
   ``reset()`` teleports the joints but leaves the motor targets of the previous episode's last random
   action, so stepping right after a reset prices the arm swinging back (about 600 instead of 980 env
   steps/s for panda-gym after a rollout, history-dependent). The figure without the hold step is kept
   in the JSON (``limit_raw_unprimed``). This prices a quiet scene holding its reset pose.
4. **Lidar** (warehouse envs): the env's scan method ``_cast_rays`` (one batched ``rayTestBatch``
   call, a method of the class so that the timer survives the world rebuilt at every reset) is timed
   inside the ``make`` rollout of 1.; the lidar table shows its cost per scan, its share of the wall
   time, and ``% roll`` and the overhead with it left out (the scan is sensing the task needs: engine
   work, not per-step bookkeeping). A timed method that the env replaces during the rollout is an
   error, not a silently shorter figure.
5. **rgb frames** (``--frames`` steps): for loopsim, a second env made with ``obs_mode="rgb",
   image_size=84``; ``env.unwrapped.sim.render`` (the camera call behind every ``rgb`` observation) is
   timed inside a rollout. For panda-gym, an env made with ``render_mode="rgb_array",
   render_width=84, render_height=84``; ``env.render()`` is timed after every step. Both figures are
   the cost of one 84x84 frame alone, measured the same way (timing ``_get_obs`` would add the state
   bookkeeping of one env and not the other). As a cross-check, ``d-step`` is the rgb-mode step time
   minus the state-mode step time of the same repeat, which is what the camera costs a loopsim rollout.

The targets are interleaved (env A, env B, ..., panda-gym, then again, ``--repeats`` times) so that
the load of other jobs on the machine spreads over all of them; every figure is computed per repeat
and the tables show its median with the min-max range below. Ratios are computed within a repeat
(then the median taken), never as a ratio of medians.

Columns of the throughput table:

- ``steps/s make``: env steps per second through ``gymnasium.make`` (headline).
- ``steps/s unwr``: the same through ``env.unwrapped``.
- ``limit roll``: in-rollout engine limit = steps / physics time of that rollout [env steps/s].
- ``% roll``: ``steps/s make`` / ``limit roll`` = physics time / wall time (headline ratio; robust to
  load because both times come from the same seconds).
- ``limit raw``: raw ``stepSimulation`` rate / substeps [env steps/s].
- ``% raw``: ``steps/s make`` / ``limit raw`` (the two rates come from different seconds, so it is
  noisier; and the quiet scene is not what a rollout visits: it can step faster, or slower when the
  reset pose has more contacts, e.g. a peg held in the gripper).
- ``overhead``: wall time minus physics time per step [us], through ``make``; ``(unwr)`` through
  ``env.unwrapped``. Amortised resets are included; ``(ex reset)`` leaves them out (``make``).
- ``reset``: mean time of one ``reset()`` [ms] and how many happened per repeat.
- ``goal``: pass when the median ``% roll`` is at least 92 % (the issue's goal; ``% raw`` in brackets).

Columns of the rgb table: ``frame`` [ms] and ``frames/s`` of one 84x84 image, ``rgb steps/s`` (env
steps per second in ``rgb`` mode, for panda-gym step + ``render()``), ``d-step`` [ms] (loopsim only,
see 5.), ``x panda-gym``: our frames/s over panda-gym's in the same repeat; goal: at least 2x.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import pybullet as p
from _common import cell, package_version, silence_c_stdout, summary, verdict  # noqa: E402  (this folder)
from rich.console import Console
from rich.table import Table

from loopsim.envs import ENV_ENTRY_POINTS  # importing loopsim registers its env ids

PANDA_ID = "PandaPickAndPlace-v3"
IMAGE_SIZE = 84
#: Control steps between resets in the raw engine measurement.
RAW_CHUNK = 50
#: Untimed steps run once per env before the first repeat.
WARMUP_STEPS = 30
GOAL_RATIO = 0.92
#: Extra targets: env kwargs measured beside an env's defaults (when the env is measured).
#: FactoryPegInsert with random actions opens the gripper and drops the peg within ~4 steps, so its
#: default row prices mostly resets; with ``block_gripper=True`` (the RL formulation, random 3-D
#: actions keep the peg for 50+ steps) the row prices its steps.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    # the snapshot reset (restoreState into the same world, ~0.5 ms) instead of a fresh world (~9 ms):
    # what the fresh world's guarantee (episodes independent of the ones before) costs in throughput
    "loopsim/FactoryPickPlace-v0": [{"fresh_world": False}],
    "loopsim/FactoryPegInsert-v0": [{"block_gripper": True}, {"fresh_world": False}],
}
#: The warehouse envs' lidar scan: a method of the env class (one ``rayTestBatch`` call), timed by name.
LIDAR_METHOD = "_cast_rays"
GOAL_RGB = 2.0


# ---------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def timed_method(obj: Any, name: str, acc: list[float]) -> Iterator[None]:
    """Replace ``obj.name`` by a wrapper that adds the seconds spent in each call to ``acc``.

    ``acc`` is ``[seconds, calls]``. The instance attribute shadows the class's method and is removed on
    exit, so nothing of the env is changed afterwards. Time a method of the class: an instance attribute
    that the object itself sets again (e.g. a bound call rebuilt with every new physics world) would drop
    the timer silently, so the wrapper is checked on exit.

    Args:
        obj: The object whose method to time (e.g. ``env.unwrapped.sim``).
        name: Method name (``"step"``, ``"render"``).
        acc: Accumulator ``[seconds, calls]``, updated in place.

    Yields:
        Nothing.

    Raises:
        RuntimeError: On exit, if ``obj.name`` was replaced while timing (the figures would be partial).
    """
    original = getattr(obj, name)
    had_instance_attr = name in vars(obj)
    clock = time.perf_counter

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        out = original(*args, **kwargs)
        acc[0] += clock() - t0
        acc[1] += 1
        return out

    setattr(obj, name, timed)
    try:
        yield
    finally:
        replaced = getattr(obj, name) is not timed
        if not replaced:
            if had_instance_attr:
                setattr(obj, name, original)
            else:
                delattr(obj, name)
    if replaced:
        raise RuntimeError(
            f"{type(obj).__name__}.{name} was replaced while it was being timed (after {acc[1]} calls): "
            "time a method of the class that the object does not set again"
        )


@dataclass
class Rollout:
    """Timings of one rollout.

    Attributes:
        steps: Env steps taken.
        wall: Wall time of the whole rollout, resets included [s].
        physics: Time inside ``sim.step`` (the substeps' ``stepSimulation`` calls) [s].
        resets: Number of resets during the rollout.
        reset_time: Time inside those resets [s].
        extra: Time inside the extra per-step call (panda-gym's ``render()``) [s].
    """

    steps: int
    wall: float
    physics: float
    resets: int
    reset_time: float
    extra: float = 0.0


def run_rollout(
    env: gym.Env,
    actions: np.ndarray,
    seed: int,
    episode_limit: int | None,
    physics_owner: Any,
    per_step: Callable[[], Any] | None = None,
) -> Rollout:
    """Step ``env`` through ``actions`` with auto-reset, timing the physics inside.

    Args:
        env: The env to step (made or unwrapped).
        actions: ``(T, A)`` actions, one per step.
        seed: Seed of the first reset (not timed); later resets continue the env's generator.
        episode_limit: Reset after this many steps of an episode even if the env did not end it (to apply
            a ``TimeLimit`` that ``env.unwrapped`` lacks); ``None`` for no harness limit.
        physics_owner: Object whose ``step`` runs the physics substeps (``env.unwrapped.sim``).
        per_step: Called (and timed separately) after every step, e.g. ``env.render``.

    Returns:
        The rollout's timings.
    """
    phys = [0.0, 0]
    clock = time.perf_counter
    limit = episode_limit if episode_limit is not None else -1
    env.reset(seed=seed)
    resets, reset_time, extra, ep = 0, 0.0, 0.0, 0
    step = env.step
    reset = env.reset
    with timed_method(physics_owner, "step", phys):
        t0 = clock()
        for a in actions:
            _, _, terminated, truncated, _ = step(a)
            if per_step is not None:
                t1 = clock()
                per_step()
                extra += clock() - t1
            ep += 1
            if terminated or truncated or ep == limit:
                t1 = clock()
                reset()
                reset_time += clock() - t1
                resets += 1
                ep = 0
        wall = clock() - t0
    return Rollout(len(actions), wall, phys[0], resets, reset_time, extra)


def raw_engine_rate(
    env: gym.Env, client_id: int, substeps: int, steps: int, seed: int, hold: np.ndarray | None
) -> float:
    """Rate of bare ``stepSimulation`` calls on the env's client, after resets [physics steps/s].

    Args:
        env: The env (its scene is reset between chunks, outside the timing).
        client_id: PyBullet physics client id of the env.
        substeps: Physics steps per control step.
        steps: Control steps' worth of physics steps to run in total.
        seed: Seed of the first reset; chunk ``k`` resets with ``seed + k``.
        hold: If given, one untimed ``env.step(hold)`` after each reset, so that the motor targets are
            this episode's "hold still" and not whatever the previous episode last commanded
            (panda-gym's ``reset()`` leaves the previous targets in place).

    Returns:
        Physics steps per second.
    """
    step_once = functools.partial(p.stepSimulation, physicsClientId=client_id)
    clock = time.perf_counter
    total, done, k = 0.0, 0, 0
    while done < steps:
        env.reset(seed=seed + k)
        if hold is not None:
            env.step(hold)
        n = min(RAW_CHUNK, steps - done)
        calls = range(n * substeps)
        t0 = clock()
        for _ in calls:
            step_once()
        total += clock() - t0
        done += n
        k += 1
    return done * substeps / total


# ---------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """One env under test, constructed once and measured in every repeat.

    Attributes:
        name: Env id.
        kind: ``"loopsim"`` or ``"panda-gym"``.
        env: The state-observation env, made with ``gymnasium.make``.
        rgb_env: The env that produces 84x84 frames (loopsim: ``obs_mode="rgb"``; panda-gym:
            ``render_mode="rgb_array"``).
        client_id: PyBullet client id of ``env``.
        substeps: Physics steps per control step.
        episode_limit: ``max_episode_steps`` of the spec (applied by the harness to ``env.unwrapped``).
        hold: The action that holds the robot still (loopsim: the env's ``_hold_action()``; panda-gym:
            zeros, i.e. no end-effector or finger motion).
        wrappers: ``str(env)``, the wrapper chain of ``gymnasium.make``.
        metrics: Metric name -> one value per repeat.
        errors: Tracebacks of measurements that crashed.
    """

    name: str
    kind: str
    env: gym.Env
    rgb_env: gym.Env
    client_id: int
    substeps: int
    episode_limit: int | None
    hold: np.ndarray
    wrappers: str
    metrics: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, **values: float) -> None:
        """Append one repeat's value of each metric."""
        for key, value in values.items():
            self.metrics.setdefault(key, []).append(float(value))

    def close(self) -> None:
        """Close both envs."""
        for env in (self.env, self.rgb_env):
            with contextlib.suppress(Exception):
                env.close()


def target_name(env_id: str, kwargs: dict[str, Any]) -> str:
    """Name of a target in the tables: the env id, then ``k=v`` for each kwarg of a variant."""
    return " ".join([env_id] + [f"{k}={v}" for k, v in kwargs.items()])


def make_loopsim(env_id: str, kwargs: dict[str, Any] | None = None) -> Target:
    """Construct a loopsim target (state env and rgb env).

    Args:
        env_id: A key of ``loopsim.envs.ENV_ENTRY_POINTS``.
        kwargs: Env kwargs of a variant (see :data:`VARIANTS`); the target is then named
            ``"<env_id> k=v"``.

    Returns:
        The target.
    """
    kwargs = dict(kwargs or {})
    env = gym.make(env_id, **kwargs)
    rgb_env = gym.make(env_id, obs_mode="rgb", image_size=IMAGE_SIZE, **kwargs)
    sim = env.unwrapped.sim
    hold_fn = getattr(env.unwrapped, "_hold_action", None)
    hold = (
        np.asarray(hold_fn(), dtype=np.float32) if hold_fn else np.zeros(env.action_space.shape, np.float32)
    )
    name = target_name(env_id, kwargs)
    return Target(
        name, "loopsim", env, rgb_env, sim.id, sim.substeps, env.spec.max_episode_steps, hold, str(env)
    )


def make_panda() -> Target:
    """Construct the panda-gym target (state env and an 84x84 ``rgb_array`` env).

    Returns:
        The target.
    """
    import panda_gym  # noqa: F401  (registers the ids)

    env = gym.make(PANDA_ID)
    rgb_env = gym.make(PANDA_ID, render_mode="rgb_array", render_width=IMAGE_SIZE, render_height=IMAGE_SIZE)
    sim = env.unwrapped.sim
    return Target(
        PANDA_ID,
        "panda-gym",
        env,
        rgb_env,
        sim.physics_client._client,
        sim.n_substeps,
        env.spec.max_episode_steps,
        np.zeros(env.action_space.shape, dtype=np.float32),
        str(env),
    )


def warm_up(target: Target, seed: int) -> None:
    """Run a few untimed steps in both envs (first-call checks, caches)."""
    for env in (target.env, target.rgb_env):
        rng = np.random.default_rng(seed)
        env.reset(seed=seed)
        for _ in range(WARMUP_STEPS):
            _, _, terminated, truncated, _ = env.step(sample_actions(env, rng, 1)[0])
            if target.kind == "panda-gym" and env is target.rgb_env:
                env.render()
            if terminated or truncated:
                env.reset()


def sample_actions(env: gym.Env, rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, A)`` uniform random actions in the env's Box action space, in its dtype."""
    space = env.action_space
    return rng.uniform(space.low, space.high, size=(n, *space.shape)).astype(space.dtype)


def measure(target: Target, repeat: int, steps: int, frames: int, seed: int) -> None:
    """Measure one repeat of ``target`` and append every figure to ``target.metrics``.

    Args:
        target: The env under test.
        repeat: Repeat index (varies the seeds).
        steps: Control steps of each timed rollout and of the raw engine run.
        frames: Steps of the rgb rollout.
        seed: Base seed.
    """
    s = seed + 1000 * repeat
    env, unwrapped = target.env, target.env.unwrapped
    actions = sample_actions(env, np.random.default_rng(s), steps)

    lidar = [0.0, 0]
    with (
        timed_method(unwrapped, LIDAR_METHOD, lidar) if hasattr(unwrapped, LIDAR_METHOD)
        else contextlib.nullcontext()
    ):
        made = run_rollout(env, actions, s, None, unwrapped.sim)
    bare = run_rollout(unwrapped, actions, s, target.episode_limit, unwrapped.sim)
    # Unprimed first: right after the rollout, as a user stepping the engine after reset() would see it.
    raw_unprimed = raw_engine_rate(env, target.client_id, target.substeps, steps, s, None)
    raw = raw_engine_rate(env, target.client_id, target.substeps, steps, s, target.hold)

    sps_make = made.steps / made.wall
    sps_unwr = bare.steps / bare.wall
    limit_roll = made.steps / made.physics
    limit_raw = raw / target.substeps
    target.add(
        sps_make=sps_make,
        sps_unwrapped=sps_unwr,
        limit_rollout=limit_roll,
        ratio_rollout=sps_make / limit_roll,
        limit_rollout_unwrapped=bare.steps / bare.physics,
        ratio_rollout_unwrapped=bare.physics / bare.wall,
        raw_stepsimulation_per_s=raw,
        limit_raw=limit_raw,
        ratio_raw=sps_make / limit_raw,
        ratio_raw_unwrapped=sps_unwr / limit_raw,
        limit_raw_unprimed=raw_unprimed / target.substeps,
        ratio_raw_unprimed=sps_make * target.substeps / raw_unprimed,
        overhead_us=(made.wall - made.physics) / made.steps * 1e6,
        overhead_us_unwrapped=(bare.wall - bare.physics) / bare.steps * 1e6,
        overhead_us_ex_reset=(made.wall - made.physics - made.reset_time) / made.steps * 1e6,
        physics_us=made.physics / made.steps * 1e6,
        resets=made.resets,
    )
    if made.resets:
        target.add(reset_ms=made.reset_time / made.resets * 1e3)
    if lidar[1]:  # warehouse envs: one batched lidar scan per control step (and per reset)
        target.add(
            lidar_us=lidar[0] / lidar[1] * 1e6,
            lidar_share=lidar[0] / made.wall,
            ratio_rollout_ex_lidar=made.physics / (made.wall - lidar[0]),
            overhead_us_ex_lidar=(made.wall - made.physics - lidar[0]) / made.steps * 1e6,
        )

    # rgb: one 84x84 frame, timed alone.
    rgb_env = target.rgb_env
    rgb_actions = sample_actions(rgb_env, np.random.default_rng(s + 1), frames)
    if target.kind == "loopsim":
        cam = [0.0, 0]
        with timed_method(rgb_env.unwrapped.sim, "render", cam):
            roll = run_rollout(rgb_env, rgb_actions, s, None, rgb_env.unwrapped.sim)
        frame_s = cam[0] / cam[1]
        rgb_sps = roll.steps / roll.wall
        target.add(
            frame_ms=frame_s * 1e3,
            fps=1.0 / frame_s,
            rgb_sps=rgb_sps,
            delta_step_ms=(1.0 / rgb_sps - 1.0 / sps_make) * 1e3,
        )
    else:
        roll = run_rollout(rgb_env, rgb_actions, s, None, rgb_env.unwrapped.sim, per_step=rgb_env.render)
        frame_s = roll.extra / roll.steps
        target.add(frame_ms=frame_s * 1e3, fps=1.0 / frame_s, rgb_sps=roll.steps / roll.wall)


# ---------------------------------------------------------------------------------------------- report
def rgb_ratios(target: Target, panda: Target | None) -> list[float]:
    """Our frames/s over panda-gym's, per repeat (repeats where both were measured)."""
    if panda is None or "fps" not in panda.metrics or "fps" not in target.metrics:
        return []
    return [ours / theirs for ours, theirs in zip(target.metrics["fps"], panda.metrics["fps"], strict=False)]


def print_report(
    console: Console,
    targets: list[Target],
    unavailable: dict[str, str],
    args: argparse.Namespace,
    elapsed: float,
) -> None:
    """Print the throughput table, the rgb table and the notes."""
    panda = next((t for t in targets if t.kind == "panda-gym"), None)
    m = lambda t, k: t.metrics.get(k)  # noqa: E731

    table = Table(
        title=f"Env throughput: state obs, random actions ({args.steps} steps x {args.repeats} repeats; "
        "median, min-max below)",
        show_lines=True,
    )
    for col in (
        "env",
        "steps/s\nmake",
        "steps/s\nunwr",
        "limit\nroll",
        "% roll",
        "limit\nraw",
        "% raw",
        "overhead\nus/step",
        "(unwr)",
        "(ex\nreset)",
        "physics\nus/step",
        "reset ms\n(n/rep)",
        f"goal >= {GOAL_RATIO:.0%}\nroll (raw)",
    ):
        table.add_column(col, justify="left" if col == "env" else "right", no_wrap=col == "env")
    for t in targets:
        if not t.metrics:
            table.add_row(t.name, "[red]error[/red]", *["-"] * 11)
            continue
        ok_roll = statistics.median(t.metrics["ratio_rollout"]) >= GOAL_RATIO
        ok_raw = statistics.median(t.metrics["ratio_raw"]) >= GOAL_RATIO
        goal = "(reference)" if t.kind == "panda-gym" else f"{verdict(ok_roll)} ({verdict(ok_raw)})"
        table.add_row(
            f"{t.name}\n[dim]{t.substeps} substeps[/dim]",
            cell(m(t, "sps_make"), ".0f"),
            cell(m(t, "sps_unwrapped"), ".0f"),
            cell(m(t, "limit_rollout"), ".0f"),
            cell(m(t, "ratio_rollout"), ".1f", 100, "%"),
            cell(m(t, "limit_raw"), ".0f"),
            cell(m(t, "ratio_raw"), ".1f", 100, "%"),
            cell(m(t, "overhead_us"), ".0f"),
            cell(m(t, "overhead_us_unwrapped"), ".0f"),
            cell(m(t, "overhead_us_ex_reset"), ".0f"),
            cell(m(t, "physics_us"), ".0f"),
            f"{cell(m(t, 'reset_ms'), '.2f')}\n[dim]n={statistics.median(t.metrics['resets']):.0f}[/dim]",
            goal,
        )
    for name in unavailable:
        table.add_row(name, "[yellow]unavailable[/yellow]", *["-"] * 11)
    console.print(table)

    rgb = Table(
        title=f"rgb observations: one {IMAGE_SIZE}x{IMAGE_SIZE} frame ({args.frames} frames x "
        f"{args.repeats} repeats)",
        show_lines=True,
    )
    for col in (
        "env",
        "frame ms",
        "frames/s",
        "rgb steps/s",
        "d-step ms",
        "x panda-gym",
        f"goal >= {GOAL_RGB:g}x",
    ):
        rgb.add_column(col, justify="left" if col == "env" else "right", no_wrap=col == "env")
    for t in targets:
        if "fps" not in t.metrics:
            rgb.add_row(t.name, "[red]error[/red]", *["-"] * 5)
            continue
        ratios = rgb_ratios(t, panda) if t.kind == "loopsim" else []
        goal = (
            "(reference)"
            if t.kind == "panda-gym"
            else (verdict(statistics.median(ratios) >= GOAL_RGB) if ratios else "-")
        )
        rgb.add_row(
            t.name,
            cell(m(t, "frame_ms"), ".2f"),
            cell(m(t, "fps"), ".0f"),
            cell(m(t, "rgb_sps"), ".0f"),
            cell(m(t, "delta_step_ms"), ".2f"),
            cell(ratios, ".1f", suffix="x") if ratios else "-",
            goal,
        )
    console.print(rgb)
    with_lidar = [t for t in targets if "lidar_us" in t.metrics]
    if with_lidar:
        lid = Table(
            title="lidar (warehouse envs): one batched rayTestBatch scan per control step, timed in the "
            "'make' rollout",
            show_lines=True,
        )
        for col in ("env", "scan us", "% of wall", "% roll\nex lidar", "overhead us/step\nex lidar",
                    f"goal >= {GOAL_RATIO:.0%}\nex lidar"):
            lid.add_column(col, justify="left" if col == "env" else "right", no_wrap=col == "env")
        for t in with_lidar:
            ok = statistics.median(t.metrics["ratio_rollout_ex_lidar"]) >= GOAL_RATIO
            lid.add_row(
                t.name,
                cell(m(t, "lidar_us"), ".0f"),
                cell(m(t, "lidar_share"), ".1f", 100, "%"),
                cell(m(t, "ratio_rollout_ex_lidar"), ".1f", 100, "%"),
                cell(m(t, "overhead_us_ex_lidar"), ".0f"),
                verdict(ok),
            )
        console.print(lid)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    console.print(
        "[dim]Headline: steps/s through gymnasium.make and '% roll' (physics time / wall time of the same "
        "rollout). '% raw' divides by the bare stepSimulation rate / substeps of a quiet scene (reset + one "
        "hold step). "
        f"Wall time {elapsed:.0f} s; load average now {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.[/dim]"
    )
    for name, reason in unavailable.items():
        console.print(f"[yellow]{name} unavailable:[/yellow] {reason}")
    console.print("[dim]wrapper stack of each target (its name carries the variant's kwargs):[/dim]")
    for t in targets:
        console.print(f"[dim]  {t.name}: {t.wrappers}[/dim]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=1000, help="control steps per timed rollout (default 1000)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    parser.add_argument("--frames", type=int, default=100, help="rgb frames per repeat (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument(
        "--env",
        action="append",
        default=None,
        help="measure only this env id (repeatable; default: all loopsim envs and panda-gym)",
    )
    parser.add_argument("--no-panda", action="store_true", help="skip panda-gym")
    parser.add_argument(
        "--json", type=str, default=None, help="write every figure (per repeat and summary) here"
    )
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "frames"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Construct the targets, measure them in interleaved repeats, print the report.

    Returns:
        0, or 1 if a measurement crashed (its traceback is printed).
    """
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 170)
    ids = list(ENV_ENTRY_POINTS)
    if args.env:
        ids = [i for i in ids if i in args.env]
    want_panda = not args.no_panda and (not args.env or PANDA_ID in args.env)

    targets: list[Target] = []
    unavailable: dict[str, str] = {}
    builders: list[tuple[str, Callable[[], Target]]] = []
    for i in ids:
        builders.append((i, functools.partial(make_loopsim, i)))
        for kwargs in VARIANTS.get(i, []):
            builders.append((target_name(i, kwargs), functools.partial(make_loopsim, i, kwargs)))
    if want_panda:
        builders.append((PANDA_ID, make_panda))
    for name, build in builders:
        try:
            with silence_c_stdout():  # PyBullet prints its argv on every connect
                target = build()
            warm_up(target, args.seed)
            targets.append(target)
        except Exception as exc:  # noqa: BLE001 - a module being written must not stop the benchmark
            unavailable[name] = f"{type(exc).__name__}: {exc}"
    console.print(
        f"loopsim {package_version('loopsim')}, panda-gym {package_version('panda-gym')}, "
        f"pybullet {package_version('pybullet')}, gymnasium {gym.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    console.print(
        f"measuring {', '.join(t.name for t in targets)}; unavailable: {list(unavailable) or 'none'}"
    )

    start = time.perf_counter()
    crashed = False
    for repeat in range(args.repeats):
        for t in targets:
            t0 = time.perf_counter()
            try:
                measure(t, repeat, args.steps, args.frames, args.seed)
            except Exception:  # noqa: BLE001 - report, keep measuring the others
                crashed = True
                t.errors.append(traceback.format_exc())
                console.print(f"[red]{t.name} crashed in repeat {repeat}[/red]\n{t.errors[-1]}")
                continue
            console.print(
                f"[dim]repeat {repeat + 1}/{args.repeats} {t.name}: "
                f"{t.metrics['sps_make'][-1]:.0f} steps/s, {t.metrics['ratio_rollout'][-1]:.1%} of limit, "
                f"frame {t.metrics['frame_ms'][-1]:.2f} ms ({time.perf_counter() - t0:.1f} s)[/dim]"
            )
    elapsed = time.perf_counter() - start
    print_report(console, targets, unavailable, args, elapsed)

    if args.json:
        panda = next((t for t in targets if t.kind == "panda-gym"), None)
        out: dict[str, Any] = {
            "args": vars(args),
            "versions": {
                n: package_version(n) for n in ("loopsim", "panda-gym", "pybullet", "gymnasium", "numpy")
            },
            "cpus": os.cpu_count(),
            "load_average_end": list(os.getloadavg()),
            "wall_time_s": elapsed,
            "goals": {"ratio_rollout_min": GOAL_RATIO, "rgb_vs_panda_min": GOAL_RGB},
            "unavailable": unavailable,
            "envs": {},
        }
        for t in targets:
            per_repeat = dict(t.metrics)
            if t.kind == "loopsim" and (ratios := rgb_ratios(t, panda)):
                per_repeat["rgb_vs_panda"] = ratios
            out["envs"][t.name] = {
                "kind": t.kind,
                "substeps": t.substeps,
                "episode_limit": t.episode_limit,
                "wrappers": t.wrappers,
                "per_repeat": per_repeat,
                "summary": {k: summary(v) for k, v in per_repeat.items() if v},
                "errors": t.errors,
            }
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        console.print(f"wrote {args.json}")

    for t in targets:
        t.close()
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
