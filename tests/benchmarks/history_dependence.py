"""How often an episode depends on the episodes run before it in the same env, by reset kind.

Run (a few minutes per reset kind on 2 cores)::

    python tests/benchmarks/history_dependence.py --reset fresh      # the default reset: a new world
    python tests/benchmarks/history_dependence.py --reset snapshot   # fresh_world=False

For every factory env and every factory site, noisy-expert episodes of ``--seeds`` seeds are run to
their end twice: forwards in one env and backwards in another (what two worker processes of a
collection see). An episode that is not bit-identical in the two orders (every observation, reward,
flag and info; ``tests/envs/_helpers.py``) depends on its history. The script prints each such
episode (where it first differs, the largest difference of an observation entry over the episode,
both outcomes) and the totals, and exits 0: it measures, the tests assert (the slow test
``test_seeds_in_any_order_give_the_same_episodes`` checks the fresh world on 12 seeds at 3 sites).

It prices the trade-off between the two resets (README, Speed): the snapshot reset (``restoreState``
into the used world, ~0.5 ms) against the fresh world (~9 ms), which Bullet's collision caches make
the only history-free one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from episode_digests import _helpers  # noqa: E402  (the same loader of tests/envs/_helpers.py)

ENV_IDS = ["loopsim/FactoryPickPlace-v0", "loopsim/FactorySort-v0", "loopsim/FactoryPegInsert-v0"]
SITES = ["lab", "fast_conveyor", "noisy_sensors", "gripper_faults", "heavy_slippery"]


def _outcome(rec) -> str:
    info = rec.infos[-1]
    return "success" if info["is_success"] else str(info.get("failure_mode"))


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the episodes that differ; returns the exit code (0)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reset", choices=["fresh", "snapshot"], default="fresh",
                        help="fresh: a new world per episode (default); snapshot: fresh_world=False")
    parser.add_argument("--seeds", type=int, default=16, help="seeds per env and site (default 16)")
    parser.add_argument("--first-seed", type=int, default=40, help="first seed (default 40)")
    parser.add_argument("--noise", type=float, default=0.3, help="expert action noise std (default 0.3)")
    parser.add_argument("--env", action="append", help="only this env id (repeatable)")
    args = parser.parse_args(argv)

    import gymnasium as gym

    import loopsim  # noqa: F401  (registers the envs)

    helpers = _helpers()
    fresh_world = args.reset == "fresh"
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    total = differ = outcome_changed = 0
    largest = 0.0
    for env_id in args.env or ENV_IDS:
        for site in SITES:
            runs = []
            for order in (seeds, seeds[::-1]):
                env = gym.make(env_id, site=site, fresh_world=fresh_world)
                runs.append({
                    s: helpers.rollout(env, s, helpers.ExpertPolicy(env, noise_std=args.noise, seed=s),
                                       10_000, reset_on_end=False)
                    for s in order
                })
                env.close()
            bad = 0
            for s in seeds:
                total += 1
                a, b = runs[0][s], runs[1][s]
                first = helpers.first_difference(a, b)
                if first is None:
                    continue
                differ += 1
                bad += 1
                n = min(len(a.obs), len(b.obs))
                dev = max(float(np.max(np.abs(np.ravel(helpers._flat(x)).astype(np.float64)
                                              - np.ravel(helpers._flat(y)).astype(np.float64))))
                          for x, y in zip(a.obs[:n], b.obs[:n], strict=True))
                largest = max(largest, dev)
                outcome_changed += _outcome(a) != _outcome(b)
                print(f"{env_id} {site} seed {s}: {first}; largest difference {dev:.3g}; "
                      f"outcomes {_outcome(a)} / {_outcome(b)}", flush=True)
            print(f"{env_id} {site}: {bad}/{len(seeds)} episodes differ", flush=True)
    print(f"total ({args.reset} reset, noise {args.noise}): {differ}/{total} episodes depend on the "
          f"order they ran in; {outcome_changed} changed outcome; largest difference {largest:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
