"""Does RL learn a factory task? Train a shipped SB3 config with ``loopsim train``; print success vs steps.

Run::

    python tests/benchmarks/rl_learning.py [CONFIG] [--run-dir DIR] [--min-success S]
        [key.sub=value ...]

``CONFIG`` defaults to ``configs/train/factory_peg_blocked_sac.yaml`` (SAC on FactoryPegInsert with
``block_gripper: true``, state observations, the env's dense reward): 120 000 env steps, an
evaluation of 50 held-out episodes (seeds 1000000..) every 10 000 steps. It took 23.5 minutes on
2 cores shared with other jobs (~85 env steps/s). Overrides are passed on as in
``loopsim train`` (``train.total_timesteps=300000``, ``eval.every=50000``, ``seed=1``); overrides
without a ``CONFIG`` apply to the default one.

This is the learning check of issue 4 ("an RL config learns a factory task"): too long for the
test suite's ``slow`` marker, so it lives here. Measured (seed 0, 2026-11-30, this script):
success 0/50 up to 50k steps (the tip jams on the fixture top ~10 mm off the hole axis), 0.20 at
60k, 0.86 at 70k, 0.90 at 80k, 0.96 at 90k, 1.00 from 100k to 120k (mean return -15.63 untrained,
-4.28 at 10k, -0.32 at 120k), so this check PASSES; see the config's header and the README's
"Reinforcement learning" paragraph.

It prints the evaluations (success rate with its 95 % bootstrap interval, mean return, mean
length, per step) and passes when the final success rate is at least
``--min-success`` (default 0.5) and above the step-0 policy's (evaluated first, on the same seeds).
Exit status 0 on pass, 1 on fail.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from loopsim.config import TrainConfig, load_config
from loopsim.training import train

DEFAULT_CONFIG = Path(__file__).parents[2] / "configs" / "train" / "factory_peg_blocked_sac.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="training config (YAML)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--run-dir", default=None, help="keep the run here (default: a temp directory)")
    parser.add_argument("--min-success", type=float, default=0.5, help="final success needed to pass")
    args = parser.parse_args(argv)
    if "=" in args.config and not Path(args.config).exists():  # overrides without a CONFIG
        args.overrides.insert(0, args.config)
        args.config = str(DEFAULT_CONFIG)
    return args


def main(argv: list[str] | None = None) -> int:
    """Train, print the learning curve, return 0 on pass."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    console = Console(width=None if sys.stdout.isatty() else 120)
    config = load_config(TrainConfig, args.config, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        # The untrained policy on the same evaluation seeds (step 0 of the curve).
        from stable_baselines3.common.vec_env import DummyVecEnv

        from loopsim.policies.sb3 import policy_kwargs_from_json, sb3_algorithms
        from loopsim.train_sb3 import resolve_policy_name

        env = config.env.make()
        untrained = sb3_algorithms()[config.policy.algo](
            resolve_policy_name(config.policy.policy, env.observation_space),
            DummyVecEnv([lambda: env]),
            seed=config.seed,
            policy_kwargs=policy_kwargs_from_json(config.policy.policy_kwargs),
            device="cpu",
        )
        from loopsim.policies import SB3Policy
        from loopsim.rollout import evaluate_policy

        ev = config.eval
        zero = evaluate_policy(
            SB3Policy.from_model(untrained),
            config.env,
            sites=ev.sites,
            episodes=ev.episodes,
            seed=ev.seed,
            workers=ev.workers,
            deterministic=ev.deterministic,
        )
        env.close()
        rows = [
            {
                "step": 0,
                "site": site,
                "episodes": res.n,
                "success_rate": res.success_rate,
                "success_low": res.success_ci[0],
                "success_high": res.success_ci[1],
                "mean_return": res.mean_return,
                "mean_length": res.mean_length,
            }
            for site, res in zero.items()
        ]
        t0 = time.perf_counter()
        run = train(config, path, progress_bar=sys.stdout.isatty())
        elapsed = time.perf_counter() - t0
        rows += sorted(run.evaluations(), key=lambda r: (r["step"], r["site"]))
        run.close()
    table = Table(title=f"{Path(args.config).name}: success vs env steps ({config.env.id})", show_lines=False)
    for col in ("env steps", "site", "episodes", "success", "95% CI", "mean return", "mean length"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["step"]),
            r["site"],
            str(r["episodes"]),
            f"{r['success_rate']:.2f}",
            f"{r['success_low']:.2f}-{r['success_high']:.2f}",
            f"{r['mean_return']:.2f}",
            f"{r['mean_length']:.1f}",
        )
    console.print(table)
    first = [r for r in rows if r["step"] == 0]
    last_step = max(r["step"] for r in rows)
    last = [r for r in rows if r["step"] == last_step]
    final = min(r["success_rate"] for r in last)
    start = max((r["success_rate"] for r in first), default=0.0)
    ok = final >= args.min_success and final > start
    console.print(
        f"wall time {elapsed / 60:.1f} min; final success {final:.2f} (step 0: {start:.2f}); "
        f"{'[green]PASS[/green]' if ok else '[red]FAIL[/red]'} (>= {args.min_success})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
