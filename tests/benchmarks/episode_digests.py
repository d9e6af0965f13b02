"""Digests of whole rollouts, to check that a speed change leaves every episode bit-identical.

Run before and after a change (each run takes a few minutes on 2 cores)::

    python tests/benchmarks/episode_digests.py before.json [--domain factory|warehouse|all]
    python tests/benchmarks/episode_digests.py after.json --compare before.json [--domain ...]

Cases (``--domain factory``, the default): every factory env x (site, obs mode, policy, seed) x
reward type, 400 control steps each with auto-reset (so resets, sites with noise, lag and faults,
and the expert's contacts are covered). ``--domain warehouse``: both warehouse envs x every
warehouse site x (random actions, noisy expert) x obs mode, 400 steps each (traffic, lidar noise and
dropouts, slip, the pushed cart's contacts, layouts drawn again at reset). ``--compare`` only
compares the cases both runs have. A case's digest is the SHA-256 of every observation, reward, flag and info
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
WAREHOUSE_IDS = ["loopsim/WarehouseNavigate-v0", "loopsim/WarehouseCartPush-v0"]
#: (site, obs_mode, policy, seed) per warehouse env: every site with random actions and the expert.
WAREHOUSE_SETTINGS = [
    (site, mode, policy, seed)
    for seed, site in enumerate(
        ["lab", "heavy_traffic", "noisy_lidar", "narrow_aisles", "slippery_floor", "heavy_carts"], start=1
    )
    for policy, mode in (("random", "state"), ("expert", "goal"))
]


def _helpers():
    spec = importlib.util.spec_from_file_location("loopsim_env_test_helpers", _HELPERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cases(domain: str = "factory") -> list[dict]:
    """The rollout cases of ``domain`` (``factory``, ``warehouse`` or ``all``), for ``_helpers.run_case``."""
    out = []
    if domain in ("factory", "all"):
        out += [
            {"env_id": env_id, "kwargs": {"site": site, "obs_mode": mode, "reward_type": reward},
             "seed": seed, "n_steps": 400, "policy": policy}
            for env_id in ENV_IDS
            for site, mode, policy, seed in SETTINGS
            for reward in ("dense", "sparse")
        ]
    if domain in ("warehouse", "all"):
        out += [
            {"env_id": env_id, "kwargs": {"site": site, "obs_mode": mode, "reward_type": "dense"},
             "seed": seed, "n_steps": 400, "policy": policy}
            for env_id in WAREHOUSE_IDS
            for site, mode, policy, seed in WAREHOUSE_SETTINGS
        ]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="write the digests (JSON) here")
    parser.add_argument("--compare", help="digests of an earlier run to compare with")
    parser.add_argument("--domain", choices=["factory", "warehouse", "all"], default="factory")
    args = parser.parse_args()
    helpers = _helpers()
    digests = {json.dumps(c, sort_keys=True): helpers.run_case(c) for c in cases(args.domain)}
    Path(args.out).write_text(json.dumps(digests, indent=1, sort_keys=True))
    steps = sum(d["steps"] for d in digests.values())
    resets = sum(d["resets"] for d in digests.values())
    print(f"{len(digests)} cases, {steps} steps, {resets} resets -> {args.out}")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        before = {k: v for k, v in before.items() if k in digests}
        differ = [k for k in before if digests.get(k) != before[k]]
        print(f"{len(before) - len(differ)} of {len(before)} cases bit-identical")
        for key in differ:
            print("DIFFERS:", key)
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
