"""Helpers for the env tests: seeded rollouts, exact comparisons, digests, scripted test policies.

Loaded by ``conftest.py`` (fixture ``helpers``) and also run as a script in fresh interpreters::

    python _helpers.py CASES_JSON

where ``CASES_JSON`` is a list of ``{"env_id", "kwargs", "seed", "n_steps", "policy"}``; it prints a
list of ``{"digest", "steps", "resets"}``, one per case (see :func:`run_case`), so two processes can be
compared bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pybullet as p

ACTION_DIM = 4
#: Per domain: a shifted site that draws from the env's random generator every step (so any slip in
#: the random stream shows) and another shifted site.
NOISY_SITE = {"factory": "noisy_sensors", "warehouse": "noisy_lidar"}
OTHER_SITE = {"factory": "fast_conveyor", "warehouse": "heavy_traffic"}


def domain(env_id: str) -> str:
    """Domain (``factory``, ``warehouse``) of a loopsim env id."""
    from loopsim.envs import env_class

    return env_class(env_id).site_schema.domain


def action_dim(env_id: str) -> int:
    """Action dimension of a loopsim env id."""
    from loopsim.envs import env_class

    return int(env_class(env_id).action_dim)


def noisy_site(env_id: str) -> str:
    """:data:`NOISY_SITE` of the env's domain."""
    return NOISY_SITE[domain(env_id)]


@dataclass
class Record:
    """Everything an env returned during a rollout, in order."""

    obs: list[Any] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    terminated: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    resets: int = 0


def random_actions(n: int, seed: int, dim: int = ACTION_DIM) -> np.ndarray:
    """``(n, dim)`` float32 actions: uniform in [-1, 1], every 5th saturated to +-1 (bang-bang)."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1.0, 1.0, size=(n, dim)).astype(np.float32)
    a[::5] = np.where(a[::5] >= 0, 1.0, -1.0)
    return a


class RandomPolicy:
    """Replays :func:`random_actions`; ignores the env."""

    def __init__(self, n: int, seed: int, dim: int = ACTION_DIM) -> None:
        self.actions = random_actions(n, seed, dim)
        self.t = 0

    def __call__(self, env: gym.Env) -> np.ndarray:
        a = self.actions[self.t % len(self.actions)]
        self.t += 1
        return a


class ExpertPolicy:
    """The task's scripted expert with seeded motion noise (exercises grasps and contacts)."""

    def __init__(self, env: gym.Env, noise_std: float = 0.2, seed: int = 0) -> None:
        from loopsim.envs import make_expert

        self.expert = make_expert(env, noise_std=noise_std, seed=seed)

    def __call__(self, env: gym.Env) -> np.ndarray:
        return self.expert.act()


class CornerPolicy:
    """Saturated actions: drives the end effector into each corner of its workspace in turn.

    Cycles through the 8 sign patterns of (dx, dy, dz), ``hold`` steps each, with the gripper
    alternating closed and open.
    """

    def __init__(self, hold: int = 25) -> None:
        self.hold = hold
        self.t = 0

    def __call__(self, env: gym.Env) -> np.ndarray:
        k = self.t // self.hold
        self.t += 1
        signs = [1.0 if (k >> bit) & 1 else -1.0 for bit in range(3)]
        return np.array([*signs, 1.0 if k % 2 else -1.0], dtype=np.float32)


class PushOffBeltPolicy:
    """Conveyor tasks: lowers the closed gripper beside the lead part and sweeps it off the belt."""

    def __init__(self) -> None:
        self.phase = 0

    def __call__(self, env: gym.Env) -> np.ndarray:
        from loopsim.envs.factory.conveyor import BELT_TOP

        u = env.unwrapped
        ee = u.robot.ee_position()
        pos = u.part_positions()
        part = pos[int(np.argmax(pos[:, 1]))]
        if self.phase == 0:  # above, behind the part (robot side)
            goal = np.array([part[0] - 0.09, part[1] + 0.03, 0.25])
            if np.linalg.norm(goal[:2] - ee[:2]) < 0.02:
                self.phase = 1
        elif self.phase == 1:  # down to belt level
            goal = np.array([part[0] - 0.09, part[1] + 0.03, BELT_TOP + 0.025])
            if ee[2] < BELT_TOP + 0.04:
                self.phase = 2
        else:  # sweep away from the robot, across the belt
            goal = np.array([ee[0] + 0.05, part[1], BELT_TOP + 0.025])
        return np.append(np.clip((goal - ee) / 0.02, -1.0, 1.0), -1.0).astype(np.float32)


def make_policy(name: str, env: gym.Env, n: int, seed: int) -> Any:
    """``"random"`` or ``"expert"`` (noisy expert), deterministic given ``seed``."""
    if name == "random":
        return RandomPolicy(n, seed, int(env.action_space.shape[0]))
    if name == "expert":
        return ExpertPolicy(env, noise_std=0.2, seed=seed)
    raise ValueError(name)


def rollout(env: gym.Env, seed: int | None, policy: Any, n_steps: int, reset_on_end: bool = True) -> Record:
    """``reset(seed=seed)`` then ``n_steps`` steps; on episode end an unseeded ``reset()`` continues."""
    rec = Record()
    obs, info = env.reset(seed=seed)
    rec.obs.append(obs)
    rec.infos.append(info)
    for _ in range(n_steps):
        action = np.array(policy(env), dtype=np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        rec.actions.append(action)
        rec.obs.append(obs)
        rec.rewards.append(reward)
        rec.terminated.append(terminated)
        rec.truncated.append(truncated)
        rec.infos.append(info)
        if terminated or truncated:
            if not reset_on_end:
                break
            obs, info = env.reset()
            rec.resets += 1
            rec.obs.append(obs)
            rec.infos.append(info)
    return rec


def obs_equal(a: Any, b: Any) -> bool:
    """Bit-identical observations (arrays or dicts of arrays), dtype and shape included."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(obs_equal(a[k], b[k]) for k in a)
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _flat(obs: Any) -> np.ndarray:
    if isinstance(obs, dict):
        return np.concatenate([np.ravel(v) for v in obs.values()])
    return np.ravel(obs)


def first_difference(r1: Record, r2: Record) -> str | None:
    """Description of the first place two records differ, or ``None`` if they are identical."""
    if len(r1.obs) != len(r2.obs):
        return f"lengths differ: {len(r1.obs)} vs {len(r2.obs)} observations"
    for t, (o1, o2) in enumerate(zip(r1.obs, r2.obs, strict=True)):
        if not obs_equal(o1, o2):
            d1, d2 = (_flat(o).astype(np.float64) for o in (o1, o2))
            diff = np.abs(d1 - d2)
            where = np.flatnonzero(diff)[:8]
            return f"observation {t} differs: max |diff| {diff.max():.3g} at indices {where}"
    for name in ("rewards", "terminated", "truncated", "infos"):
        v1, v2 = getattr(r1, name), getattr(r2, name)
        for t, (x1, x2) in enumerate(zip(v1, v2, strict=True)):
            if _canon(x1) != _canon(x2):
                return f"{name}[{t}] differs: {x1!r} vs {x2!r}"
    return None


def _canon(x: Any) -> Any:
    """JSON-able, exact (floats by repr) form of rewards/flags/infos."""
    if isinstance(x, dict):
        return {str(k): _canon(v) for k, v in sorted(x.items())}
    if isinstance(x, list | tuple):
        return [_canon(v) for v in x]
    if isinstance(x, np.ndarray):
        return [x.dtype.str, list(x.shape), x.tobytes().hex()]
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, float | np.floating):
        return repr(float(x))
    if isinstance(x, int | np.integer):
        return int(x)
    return x


def digest(rec: Record) -> str:
    """SHA-256 over every observation's bytes, reward, flag and info of a record."""
    h = hashlib.sha256()
    for obs in rec.obs:
        items = sorted(obs.items()) if isinstance(obs, dict) else [("", obs)]
        for key, value in items:
            value = np.asarray(value)
            h.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
            h.update(value.tobytes())
    rest = [rec.rewards, rec.terminated, rec.truncated, rec.infos]
    h.update(json.dumps(_canon(rest), sort_keys=True).encode())
    return h.hexdigest()


def physics_snapshot(client_id: int) -> list[Any]:
    """Pose and velocity of every body and the state of every joint of a PyBullet client."""
    snap: list[Any] = []
    for k in range(p.getNumBodies(physicsClientId=client_id)):
        body = p.getBodyUniqueId(k, physicsClientId=client_id)
        snap.append(p.getBasePositionAndOrientation(body, physicsClientId=client_id))
        snap.append(p.getBaseVelocity(body, physicsClientId=client_id))
        n = p.getNumJoints(body, physicsClientId=client_id)
        if n:
            snap.append([s[:2] for s in p.getJointStates(body, list(range(n)), physicsClientId=client_id)])
    return snap


def free_dynamic_bodies(client_id: int) -> list[int]:
    """Bodies with a mass and no joints: the loose parts (and pegs) of a scene."""
    out = []
    for k in range(p.getNumBodies(physicsClientId=client_id)):
        body = p.getBodyUniqueId(k, physicsClientId=client_id)
        if p.getNumJoints(body, physicsClientId=client_id) == 0 and p.getDynamicsInfo(
            body, -1, physicsClientId=client_id
        )[0] > 0:
            out.append(body)
    return out


#: Environment of a child process that computes with other SIMD kernels than this CPU's own: OpenBLAS's
#: SSE3 kernels (``Prescott``) instead of the AVX2 / AVX-512 ones it picks by CPU, and NumPy's baseline
#: (x86-64-v2) loops instead of its AVX2 (``X86_V3``) and AVX-512 (``X86_V4``) ones. With NumPy's BLAS in
#: the Panda's IK, 32 of the 60 cases of ``tests/benchmarks/episode_digests.py --domain all`` differed
#: from this CPU's own run (the same kind of drift as between an AVX-512 and an AVX2 machine).
OTHER_KERNELS = {"OPENBLAS_CORETYPE": "Prescott", "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4"}

#: Prints the digest of a BLAS product: it differs between kernels (checked for Prescott against AVX2).
_BLAS_CANARY = (
    "import hashlib, json, numpy as np; a = np.random.default_rng(0).normal(size=(64, 64)); "
    "print(json.dumps(hashlib.sha256((a @ a.T).tobytes()).hexdigest()))"
)


def check_whatever_simd_kernels(cases: list[dict[str, Any]], run_python: Any) -> None:
    """Run ``cases`` in a child with :data:`OTHER_KERNELS` and here; they must be bit-identical.

    Skips when the child's BLAS gives the same bits as this process's (a BLAS that ignores
    ``OPENBLAS_CORETYPE``, or a CPU whose own kernels are the ones forced): the test would prove nothing.
    For tests: ``run_python`` is the fixture of ``conftest.py``.
    """
    import pytest

    if run_python(_BLAS_CANARY, env=OTHER_KERNELS) == run_python(_BLAS_CANARY):
        pytest.skip(f"{OTHER_KERNELS} leaves this platform's BLAS results unchanged")
    other = run_python(Path(__file__), json.dumps(cases), env=OTHER_KERNELS, timeout=900)
    here = [run_case(case) for case in cases]
    for case, a, b in zip(cases, other, here, strict=True):
        assert a == b, f"{case}: {a} with {OTHER_KERNELS} / {b} with this CPU's kernels"
    assert all(r["resets"] > 0 for r in here), "some rollout never crossed an episode end"


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Roll out one case in a fresh env: ``{"digest", "steps", "resets"}``."""
    import loopsim  # noqa: F401

    env = gym.make(case["env_id"], **case["kwargs"])
    try:
        policy = make_policy(case["policy"], env, case["n_steps"], case["seed"])
        rec = rollout(env, case["seed"], policy, case["n_steps"])
    finally:
        env.close()
    return {"digest": digest(rec), "steps": len(rec.rewards), "resets": rec.resets}


def main(argv: list[str]) -> None:
    print(json.dumps([run_case(case) for case in json.loads(argv[0])]))


if __name__ == "__main__":
    main(sys.argv[1:])
