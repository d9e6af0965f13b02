"""Digests of whole rollouts, to check that a speed change leaves every episode bit-identical.

Run before and after a change (each run takes a few minutes on 2 cores)::

    python tests/benchmarks/episode_digests.py before.json
    python tests/benchmarks/episode_digests.py after.json --compare before.json

Cases: every factory env x (site, obs mode, policy, seed) x reward type, 400 control steps each
with auto-reset (so resets, sites with noise, lag and faults, and the expert's contacts are
covered). A case's digest is the SHA-256 of every observation, reward, flag and info
(``tests/envs/_helpers.py``). ``--compare`` exits 1 if any case differs or is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

_HELPERS = Path(__file__).resolve().parent.parent / "envs" / "_helpers.py"
ENV_IDS = ["loopsim/FactoryPickPlace-v0", "loopsim/FactorySort-v0", "loopsim/FactoryPegInsert-v0"]
#: (site, obs_mode, policy, seed) per env.
SETTINGS = [
    ("lab", "state", "random", 1),
    ("lab", "goal", "expert", 2),
    ("noisy_sensors", "goal", "expert", 3),
    ("fast_conveyor", "state", "expert", 4),
    ("gripper_faults", "goal", "random", 5),
    ("heavy_slippery", "state", "expert", 6),
]


def _helpers():
    spec = importlib.util.spec_from_file_location("loopsim_env_test_helpers", _HELPERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cases() -> list[dict]:
    """The rollout cases, in the format of ``_helpers.run_case``."""
    return [
        {"env_id": env_id, "kwargs": {"site": site, "obs_mode": mode, "reward_type": reward},
         "seed": seed, "n_steps": 400, "policy": policy}
        for env_id in ENV_IDS
        for site, mode, policy, seed in SETTINGS
        for reward in ("dense", "sparse")
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="write the digests (JSON) here")
    parser.add_argument("--compare", help="digests of an earlier run to compare with")
    args = parser.parse_args()
    helpers = _helpers()
    digests = {json.dumps(c, sort_keys=True): helpers.run_case(c) for c in cases()}
    Path(args.out).write_text(json.dumps(digests, indent=1, sort_keys=True))
    steps = sum(d["steps"] for d in digests.values())
    resets = sum(d["resets"] for d in digests.values())
    print(f"{len(digests)} cases, {steps} steps, {resets} resets -> {args.out}")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [k for k in before if digests.get(k) != before[k]]
        print(f"{len(before) - len(differ)} of {len(before)} cases bit-identical")
        for key in differ:
            print("DIFFERS:", key)
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
