"""Episodes per second of ``loopsim.rollout`` with 1 and 2 worker processes, in one run.

Run::

    python tests/benchmarks/rollout_workers.py [--env ID] [--episodes N] [--repeats R]
        [--policy expert|random] [--record]

Each repeat runs the same ``--episodes`` seeded episodes of the scripted expert (or random actions)
once with ``workers=1`` (in this process) and once with ``workers=2`` (two spawned processes, each
running whole episodes, results gathered in seed order), in alternating order. Two figures per
setting:

- ``total``: wall time from the call to the last episode, process start-up (spawn, imports, env
  creation: a few seconds) included;
- ``steady``: episodes/s between the first and the last finished episode, start-up excluded (what a
  long deploy phase sees).

Goal (issue 5): two workers gather >= 1.7x the episodes/s of one. The script is informative: it
prints the table and the verdict (on the median ``steady`` ratio) and exits 0 unless a run crashed.
The machine must have two idle cores for the ratio to mean anything; other load shows up as a lower
ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import cell, verdict  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def measure(env_id: str, episodes: int, workers: int, policy: str, record: bool) -> dict[str, float]:
    """One timed rollout of ``episodes`` episodes; returns total and steady episodes/s."""
    from loopsim.config import EnvConfig, ExpertPolicyConfig, RandomPolicyConfig
    from loopsim.rollout import run_episodes

    spec = ExpertPolicyConfig() if policy == "expert" else RandomPolicyConfig()
    tasks = [("lab", i) for i in range(episodes)]
    start = time.perf_counter()
    stamps = []
    steps = 0
    for result, _ in run_episodes(spec, EnvConfig(id=env_id), tasks, workers=workers,
                                  record=["is_success"] if record else None):
        stamps.append(time.perf_counter())
        steps += result.length
    total = stamps[-1] - start
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {"total": episodes / total, "steady": steady, "steps": steps}


def main() -> None:
    """Parse arguments, run the interleaved repeats, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="loopsim/FactoryPickPlace-v0")
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policy", choices=["expert", "random"], default="expert")
    parser.add_argument("--record", action="store_true", help="record episodes (sent back to this process)")
    args = parser.parse_args()
    console = Console()
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for r in range(args.repeats):
        for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
            res = measure(args.env, args.episodes, workers, args.policy, args.record)
            runs[workers].append(res)
            console.print(f"repeat {r}: workers={workers} total {res['total']:.2f} ep/s, "
                          f"steady {res['steady']:.2f} ep/s ({res['steps']} steps)")
    table = Table(title=f"rollout throughput, {args.env}, {args.policy}, {args.episodes} episodes "
                        f"(median, min-max of {args.repeats})")
    for col in ("workers", "total ep/s", "steady ep/s", "x one worker (steady)"):
        table.add_column(col)
    ratios = [b["steady"] / a["steady"] for a, b in zip(runs[1], runs[2], strict=True)]
    for workers in (1, 2):
        table.add_row(str(workers), cell([x["total"] for x in runs[workers]], ".2f"),
                      cell([x["steady"] for x in runs[workers]], ".2f"),
                      "1.00" if workers == 1 else cell(ratios, ".2f", suffix="x"))
    console.print(table)
    med = statistics.median(ratios)
    console.print(f"goal: 2 workers >= 1.7x one worker (steady): {med:.2f}x {verdict(med >= 1.7)}")


if __name__ == "__main__":
    main()
