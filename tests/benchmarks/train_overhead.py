"""Training throughput through ``loopsim train`` against plain stable-baselines3 on the same env, in one run.

Run::

    python tests/benchmarks/train_overhead.py [--algo SAC --algo PPO] [--steps N]
        [--repeats R] [--env ID] [--checkpoint-every K] [--json out.json]

The defaults (``--algo SAC --algo PPO --steps 2048 --repeats 3``) take about 5-8 minutes on 2 cores.
The script is informative: it prints the table and the goal's pass/fail, and exits 0 unless a
measurement crashed.

Goal (issue 4): "training throughput is SB3's own: loopsim's wrappers cost < 5 % versus plain SB3 on
the same env", i.e. the median ratio of env steps/s (loopsim / plain) is at least 0.95.

Method, per algorithm and per repeat, the variants interleaved (plain, loopsim, loopsim + bar, then
again) so that the load of other jobs spreads over all of them; ``torch.set_num_threads(1)``:

- **plain**: ``ALGO("MlpPolicy", gym.make(ENV), seed=repeat, **HYPER).learn(steps)``, as an SB3 user
  writes it (SB3 adds its ``Monitor``). Timed: making the env, building the model, ``learn``.
- **loopsim**: :func:`loopsim.train_sb3.train_sb3` on a :class:`~loopsim.training.RunDir` in a temp
  directory, with the same algorithm, the same hyperparameters (``policy_kwargs`` included), one env,
  no ``VecNormalize``, TensorBoard logging, loopsim's callback, ``Monitor`` with ``is_success``,
  and checkpoints (deployable checkpoint + resume state with the replay buffer) every
  ``--checkpoint-every`` env steps (default: ``steps // 2``, so the timed run writes two: one
  periodic, one final; shipped configs write one per 10 000 to 20 000 steps, so this overstates
  their share). ``eval.every=0``; the final evaluation (one episode) that ``train_sb3`` always runs is
  timed separately and subtracted (evaluation is work, not overhead). Timed: everything else in
  ``train_sb3``.
- **loopsim + bar**: the same with SB3's progress bar (tqdm + rich), as ``loopsim train`` runs by
  default.

Env steps/s use the steps actually taken (PPO rounds ``--steps`` up to a multiple of ``n_steps``).

Hyperparameters (``HYPER``): SAC ``learning_starts=steps // 4``, ``buffer_size=100_000``,
``batch_size=256``, ``net_arch=[256, 256]`` (so most steps do a gradient update, as in real runs);
PPO ``n_steps=512``, ``batch_size=64``, ``n_epochs=4``, ``net_arch=[64, 64]``.

Throughput is measured in env steps per **CPU second of the process** (``time.process_time``;
everything runs in one process: ``DummyVecEnv``, one torch thread), because on a machine shared
with other jobs wall time mostly measures their load (ratios of wall-clock steps/s from the same
repeat ranged 0.77-1.26 on our 2 loaded cores). Wall-clock ratios are printed too.

Columns: env steps per CPU second of each variant (median, min-max below), the loopsim/plain ratio
on CPU time (headline; computed per repeat, then the median) and on wall time, the same for the
progress-bar variant, the wall time of the checkpoints inside the loopsim run [s], the final
evaluation's wall time (excluded), and the goal (CPU ratio).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from _common import cell, package_version, silence_c_stdout, summary, verdict  # noqa: E402  (this folder)
from rich.console import Console
from rich.table import Table

import loopsim  # noqa: F401  (registers the env ids)
import loopsim.train_sb3 as train_sb3_module
from loopsim.config import TrainConfig
from loopsim.training import RunDir

GOAL_RATIO = 0.95
VARIANTS = ("plain", "loopsim", "loopsim+bar")


def hyper(algo: str, steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(algo_kwargs, policy_kwargs)`` used by both variants (JSON values, as in a config)."""
    if algo == "PPO":
        return {"n_steps": 512, "batch_size": 64, "n_epochs": 4}, {"net_arch": [64, 64]}
    return (
        {"learning_starts": steps // 4, "buffer_size": 100_000, "batch_size": 256},
        {"net_arch": [256, 256]},
    )


def run_plain(env_id: str, algo: str, steps: int, seed: int) -> tuple[float, float, int]:
    """``(wall s, CPU s, env steps taken)`` of make + build + learn with plain SB3."""
    from loopsim.policies.sb3 import policy_kwargs_from_json, sb3_algorithms

    algo_kwargs, policy_kwargs = hyper(algo, steps)
    t0, c0 = time.perf_counter(), time.process_time()
    with silence_c_stdout():
        env = gym.make(env_id)
    model = sb3_algorithms()[algo](
        "MlpPolicy",
        env,
        seed=seed,
        verbose=0,
        device="cpu",
        policy_kwargs=policy_kwargs_from_json(policy_kwargs),
        **algo_kwargs,
    )
    model.learn(steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.get_env().close()
    return wall, cpu, int(model.num_timesteps)


def run_loopsim(
    env_id: str, algo: str, steps: int, seed: int, checkpoint_every: int, bar: bool
) -> tuple[float, float, int, float, float]:
    """``(wall s, CPU s, env steps, evaluation wall s, checkpoint wall s)`` of ``train_sb3``.

    The wall and CPU times leave out the final evaluation.
    """
    algo_kwargs, policy_kwargs = hyper(algo, steps)
    config = TrainConfig.model_validate(
        {
            "seed": seed,
            "env": {"id": env_id},
            "policy": {
                "type": "sb3",
                "algo": algo,
                "policy": "MlpPolicy",
                "normalize": False,
                "algo_kwargs": {**algo_kwargs, "device": "cpu"},
                "policy_kwargs": policy_kwargs,
            },
            "train": {"total_timesteps": steps, "checkpoint_every": checkpoint_every},
            "eval": {"episodes": 1, "every": 0},
        }
    )
    timers = {"eval": 0.0, "eval_cpu": 0.0, "checkpoint": 0.0, "checkpoint_cpu": 0.0}
    evaluate, checkpoint = train_sb3_module._Trainer.evaluate, train_sb3_module._Trainer.checkpoint

    def timed(name: str, fn: Any) -> Any:
        def wrapper(self: Any) -> Any:
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(self)
            finally:
                timers[name] += time.perf_counter() - t
                timers[name + "_cpu"] += time.process_time() - c

        return wrapper

    train_sb3_module._Trainer.evaluate = timed("eval", evaluate)
    train_sb3_module._Trainer.checkpoint = timed("checkpoint", checkpoint)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = RunDir.start(os.path.join(tmp, "run"), config, resume=False)
            t0, c0 = time.perf_counter(), time.process_time()
            with silence_c_stdout() if not bar else contextlib.nullcontext():
                policy = train_sb3_module.train_sb3(config, run, progress_bar=bar)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            run.close()
    finally:
        train_sb3_module._Trainer.evaluate, train_sb3_module._Trainer.checkpoint = evaluate, checkpoint
    steps_done = int(policy.provenance["timesteps"])
    return (wall - timers["eval"], cpu - timers["eval_cpu"], steps_done, timers["eval"], timers["checkpoint"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--algo",
        action="append",
        default=None,
        choices=["SAC", "PPO", "TD3"],
        help="algorithm (repeatable; default SAC and PPO)",
    )
    parser.add_argument("--env", default="loopsim/FactoryPegInsert-v0", help="env id (state observations)")
    parser.add_argument("--steps", type=int, default=2048, help="env steps per run (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="loopsim checkpoint cadence [env steps] (default steps // 2)",
    )
    parser.add_argument("--no-bar", action="store_true", help="skip the progress-bar variant")
    parser.add_argument("--json", default=None, help="write every figure here")
    args = parser.parse_args(argv)
    args.algo = args.algo or ["SAC", "PPO"]
    if args.steps < 100 or args.repeats < 1:
        parser.error("need --steps >= 100 and --repeats >= 1")
    args.checkpoint_every = args.checkpoint_every or args.steps // 2
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure the variants in interleaved repeats and print the report.

    Returns:
        0, or 1 if a measurement crashed.
    """
    args = parse_args(argv)
    torch.set_num_threads(1)
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(
        f"loopsim {package_version('loopsim')}, stable-baselines3 {package_version('stable_baselines3')}, "
        f"torch {torch.__version__}, gymnasium {gym.__version__}, numpy {np.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    variants = [v for v in VARIANTS if not (args.no_bar and v == "loopsim+bar")]
    sps: dict[str, dict[str, list[float]]] = {a: {v: [] for v in variants} for a in args.algo}  # CPU
    sps_wall: dict[str, dict[str, list[float]]] = {a: {v: [] for v in variants} for a in args.algo}
    ckpt: dict[str, list[float]] = {a: [] for a in args.algo}
    evals: dict[str, list[float]] = {a: [] for a in args.algo}
    crashed = False
    start = time.perf_counter()
    for repeat in range(args.repeats):
        for algo in args.algo:
            order = variants if repeat % 2 == 0 else variants[::-1]  # alternate who goes first
            for variant in order:
                try:
                    if variant == "plain":
                        wall, cpu, done = run_plain(args.env, algo, args.steps, repeat)
                    else:
                        wall, cpu, done, ev, ck = run_loopsim(
                            args.env,
                            algo,
                            args.steps,
                            repeat,
                            args.checkpoint_every,
                            bar=variant == "loopsim+bar",
                        )
                        if variant == "loopsim":
                            ckpt[algo].append(ck)
                            evals[algo].append(ev)
                except Exception:  # noqa: BLE001 - report, keep measuring the others
                    crashed = True
                    console.print(f"[red]{algo} {variant} crashed[/red]\n{traceback.format_exc()}")
                    continue
                sps[algo][variant].append(done / cpu)
                sps_wall[algo][variant].append(done / wall)
                console.print(
                    f"[dim]repeat {repeat + 1}/{args.repeats} {algo} {variant}: {done / cpu:.0f} steps per "
                    f"CPU s, {done / wall:.0f} steps/s wall ({done} steps, {cpu:.1f} CPU s, {wall:.1f} s)"
                    "[/dim]"
                )
    elapsed = time.perf_counter() - start

    table = Table(
        title=f"Training throughput, {args.env} (state), {args.steps} steps x {args.repeats} "
        "repeats (median, min-max below)",
        show_lines=True,
    )
    for col in (
        "algo",
        "plain SB3\nsteps/CPU s",
        "loopsim\nsteps/CPU s",
        "ratio\nCPU",
        "ratio\nwall",
        "loopsim+bar\nsteps/CPU s",
        "ratio bar\nCPU",
        "checkpoints\ns/run",
        "final eval\ns (excl.)",
        f"goal ratio\n>= {GOAL_RATIO}",
    ):
        table.add_column(col, justify="left" if col == "algo" else "right")
    ratios: dict[str, dict[str, list[float]]] = {}
    for algo in args.algo:
        s = sps[algo]
        r = {v: [x / p for x, p in zip(s[v], s["plain"], strict=False)] for v in variants if v != "plain"}
        w = sps_wall[algo]
        r_wall = [x / p for x, p in zip(w["loopsim"], w["plain"], strict=False)]
        ratios[algo] = {**r, "loopsim_wall": r_wall}
        ok = bool(r["loopsim"]) and statistics.median(r["loopsim"]) >= GOAL_RATIO
        table.add_row(
            algo,
            cell(s["plain"], ".0f"),
            cell(s["loopsim"], ".0f"),
            cell(r["loopsim"], ".3f"),
            cell(r_wall, ".3f"),
            cell(s.get("loopsim+bar"), ".0f"),
            cell(r.get("loopsim+bar"), ".3f"),
            cell(ckpt[algo], ".2f"),
            cell(evals[algo], ".2f"),
            verdict(ok),
        )
    console.print(table)
    console.print(
        f"[dim]checkpoints every {args.checkpoint_every} env steps (+ the final one); wall time "
        f"{elapsed:.0f} s; load average now {os.getloadavg()[0]:.2f}[/dim]"
    )
    if args.json:
        out = {
            "args": vars(args),
            "goal_ratio_min": GOAL_RATIO,
            "wall_time_s": elapsed,
            "versions": {n: package_version(n) for n in ("loopsim", "stable_baselines3", "torch")},
            "steps_per_cpu_s": sps,
            "steps_per_wall_s": sps_wall,
            "ratios": ratios,
            "checkpoint_s": ckpt,
            "final_eval_s": evals,
            "summary": {a: {k: summary(v) for k, v in ratios[a].items() if v} for a in args.algo},
        }
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
        console.print(f"wrote {args.json}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
