"""loopsim's Gymnasium environments in PyBullet: factory tasks, their sites and scripted experts.

Importing ``loopsim`` (or this package) registers every env id with Gymnasium::

    import gymnasium as gym
    import loopsim  # noqa: F401

    env = gym.make("loopsim/FactoryPickPlace-v0", site="heavy_slippery", obs_mode="state")

``gym.make("loopsim:loopsim/FactoryPickPlace-v0")`` works without importing loopsim first.
A new task is one file in ``factory/`` (or another domain folder) plus one line in :data:`ENV_ENTRY_POINTS`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import gymnasium as gym

from loopsim.envs.core.site import (
    Site,
    SiteError,
    available_sites,
    load_site,
    read_site_file,
    site_name,
    site_name_key,
)
from loopsim.envs.core.wrappers import ExpertActionInfo, ExpertIntervention

__all__ = [
    "ENV_ENTRY_POINTS",
    "ExpertActionInfo",
    "ExpertIntervention",
    "Site",
    "SiteError",
    "available_sites",
    "env_class",
    "env_kwargs_with_defaults",
    "load_site",
    "read_site_file",
    "site_name",
    "site_name_key",
    "make_expert",
    "register_envs",
]

#: Env id -> ``"module:Class"``; one line per task.
ENV_ENTRY_POINTS: dict[str, str] = {
    "loopsim/FactoryPickPlace-v0": "loopsim.envs.factory.pick_place:FactoryPickPlaceEnv",
    "loopsim/FactorySort-v0": "loopsim.envs.factory.sort:FactorySortEnv",
    "loopsim/FactoryPegInsert-v0": "loopsim.envs.factory.peg_insert:FactoryPegInsertEnv",
    "loopsim/WarehouseNavigate-v0": "loopsim.envs.warehouse.navigate:WarehouseNavigateEnv",
    "loopsim/WarehouseCartPush-v0": "loopsim.envs.warehouse.cart_push:WarehouseCartPushEnv",
}


def _load(entry_point: str) -> Any:
    module, _, name = entry_point.partition(":")
    return getattr(importlib.import_module(module), name)


def register_envs() -> None:
    """Register every loopsim env id with Gymnasium (idempotent; runs on ``import loopsim``).

    ``gymnasium.make`` returns the env itself, without Gymnasium's ``OrderEnforcing`` and
    ``PassiveEnvChecker`` wrappers: the envs enforce reset-before-step themselves (``RuntimeError``),
    pass the full env checkers in the test suite, and goal envs keep ``compute_reward`` reachable,
    which Gymnasium 1.x wrappers do not forward (SB3's ``check_env`` and HER call it). The time limit
    is the env's own ``max_steps``, so ``info["failure_mode"]`` is ``"timeout"`` on truncation.
    """
    for env_id, entry_point in ENV_ENTRY_POINTS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, order_enforce=False, disable_env_checker=True)


def env_class(env_id: str) -> type:
    """The env class registered under ``env_id``.

    Raises:
        KeyError: If ``env_id`` is not a loopsim env (the message lists the valid ids).
    """
    if env_id not in ENV_ENTRY_POINTS:
        raise KeyError(f"unknown env id {env_id!r}; loopsim envs are {sorted(ENV_ENTRY_POINTS)}")
    return _load(ENV_ENTRY_POINTS[env_id])


def env_kwargs_with_defaults(env_id: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with every keyword the env's constructor has a default for, and did not get, filled in.

    Two kwargs mappings that make the same env compare equal this way: ``{}`` and
    ``{"obs_mode": "state"}`` are both ``obs_mode="state"``. The defaults are those of ``__init__`` of
    the env class and its bases (the most derived one wins), under the registered spec's kwargs.
    ``site`` is left out (episodes record their site). A default that depends on other kwargs (``None``
    meaning "the task's own", e.g. ``max_steps``) stays ``None``, so ``None`` and the value it stands
    for do not compare equal: kept apart, never merged.

    Args:
        env_id: A key of :data:`ENV_ENTRY_POINTS`.
        kwargs: The kwargs the env is (or was) made with.

    Returns:
        A new dict: the defaults, then the spec's kwargs, then ``kwargs``.

    Raises:
        KeyError: If ``env_id`` is not a loopsim env.
    """
    defaults: dict[str, Any] = {}
    for klass in env_class(env_id).__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if param.default is not inspect.Parameter.empty and name != "site":
                defaults.setdefault(name, param.default)
    spec = gym.registry.get(env_id)
    return {**defaults, **(dict(spec.kwargs) if spec is not None else {}), **dict(kwargs)}


def make_expert(env: gym.Env, noise_std: float = 0.0, seed: int | None = None) -> Any:
    """The scripted expert of the env's task, bound to ``env``.

    Args:
        env: A loopsim env, possibly wrapped.
        noise_std: Std of Gaussian noise on the expert's motion commands, in action units.
        seed: Seed of the expert's noise generator.

    Returns:
        A :class:`loopsim.envs.core.expert.Expert`; call ``expert.act()`` after each reset/step.

    Raises:
        TypeError: If the env has no scripted expert.
    """
    entry = getattr(env.unwrapped, "expert_entry_point", None)
    if entry is None:
        raise TypeError(f"{type(env.unwrapped).__name__} has no scripted expert")
    return _load(entry)(env, noise_std=noise_std, seed=seed)
