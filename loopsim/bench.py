"""``loopsim bench CONFIG``: evaluate policies across envs, sites and training seeds, with rliable statistics.

A benchmark config (YAML, :class:`BenchConfig`) names the envs, the sites, the training seeds, the
evaluation protocol and the policies. A policy is one of:

- ``expert`` / ``random``: the task's scripted expert, uniform random actions;
- ``checkpoint``: a loopsim checkpoint directory (or one per env);
- ``train``: a training config per env (``configs/train/*.yaml`` with overrides), trained once per
  training seed; BC demonstrations are collected first from a collect config when one is given;
- ``sb3_zip``: a user's own stable-baselines3 model file, loaded with the algorithm's ``load``
  (SB3 files are pickles: **only benchmark files you trust**, as with any SB3 model);
- ``callable``: a Python function ``module:function`` mapping one observation to one action
  (imported and run: **the config is then as trusted as that code**; the working directory is put
  on ``sys.path`` first, as uvicorn does, so a ``my_policy.py`` next to you imports).

A **cell** is one policy x env x site x training seed: ``eval.episodes`` episodes, episode ``i``
reset with seed ``eval.seed + i`` (the same initial states for every policy, site and training
seed), run by :func:`loopsim.rollout.run_episodes` in ``eval.workers`` processes. Policies that are
not trained (expert, random, a given checkpoint, an SB3 file, a callable) have one cell per env and
site (training seed ``None``).

The output directory::

    <out>/
        config.yaml                 # the resolved benchmark config; a different config is refused
        demos/<name>.zarr           # demonstrations collected for ``train`` policies (BC)
        train/<policy>/<env>/seed_<s>/   # training run directories (loopsim train layout)
        cells/<policy>/<env>/<site>/seed_<s>.json  # one finished cell (``fixed.json``: untrained)
        results.json                # cells, per-task summaries, aggregates, P(improvement), protocol
        results.csv                 # one row per policy x env x site x seed
        results.md                  # the Markdown tables (also printed)
        plots/*.png                 # aggregate intervals, performance profile, P(improvement)
        report.html                 # one self-contained page: tables and plots

Resuming: every finished cell is written atomically (a temporary file renamed into place) and never
re-run; a finished training run (``done``) is reused, an interrupted one resumed; demonstrations are
collected into a temporary store renamed into place when complete. So a killed ``loopsim bench``
continues where it stopped when run again, with no cell duplicated.

Statistics (R. Agarwal et al. 2021, "Deep Reinforcement Learning at the Edge of the Statistical
Precipice", NeurIPS; ``rliable``): a *run* is one training seed of a policy, its *score* on a task
(env x site) the success rate over the evaluation episodes. Aggregates are the interquartile mean
(IQM) and the mean over runs x tasks, with 95% stratified bootstrap intervals (runs resampled within
each task); probability of improvement ``P(X > Y)`` between policies on their common tasks; and
performance profiles (fraction of runs x tasks with success above ``tau``). A policy with one run has
no run-to-run variation, so its aggregate interval is a point; the per-task tables give percentile
bootstrap intervals over the evaluation episodes (pooled over runs) instead.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import Field, JsonValue, field_validator, model_validator

from loopsim.atomic import atomic_write
from loopsim.config import (
    MAX_SEED,
    CheckpointPolicyConfig,
    ConfigError,
    EnvConfig,
    ExpertPolicyConfig,
    RandomPolicyConfig,
    _Strict,
    dump_config,
    load_config,
)

__all__ = [
    "BenchConfig",
    "BenchError",
    "CallablePolicy",
    "CallableSpec",
    "SB3ZipSpec",
    "aggregate",
    "check_bench_config",
    "probability_of_improvement",
    "resolve_path",
    "run_bench",
]

#: Env ids are checked against the registry by :func:`check_bench_config`, not while parsing, so a
#: suite naming envs that a later version registers still parses.
ENV_ID_PATTERN = r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+-v[0-9]+$"
#: Policy names become folder names and table rows.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
#: Env kwargs that describe what a policy observes; taken from a trained policy's own training config.
OBSERVATION_KWARGS = ("obs_mode", "image_size")


class BenchError(Exception):
    """The output directory belongs to another benchmark config, or cannot be used."""


# ============================================================================================ config
class BenchEnv(_Strict):
    """One env of the benchmark.

    Attributes:
        id: A registered env id (checked before any work, not while parsing).
        kwargs: ``gymnasium.make`` keyword arguments common to every policy (``reward_type`` decides
            what "return" means). Observation kwargs (``obs_mode``, ``image_size``) of a trained
            policy come from its training config; a policy's ``env_kwargs`` override these.
    """

    id: str = Field(pattern=ENV_ID_PATTERN)
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _no_site(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "site" in value:
            raise ValueError("give sites in the top-level sites list, not in env kwargs")
        return value


class BenchEval(_Strict):
    """The evaluation protocol of every cell.

    Attributes:
        episodes: Episodes per cell.
        seed: Episode ``i`` of every cell is reset with seed ``seed + i`` (held out from demo seeds).
        workers: Worker processes running whole episodes each.
        deterministic: Act without exploration noise.
    """

    episodes: int = Field(50, ge=1)
    seed: int = Field(1_000_000, ge=0, le=MAX_SEED)
    workers: int = Field(1, ge=1, le=64)
    deterministic: bool = True

    @model_validator(mode="after")
    def _seeds_fit(self) -> BenchEval:
        if self.seed + self.episodes - 1 > MAX_SEED:
            raise ValueError(f"eval.seed + eval.episodes - 1 exceeds {MAX_SEED}")
        return self


class _PolicyBase(_Strict):
    envs: list[str] | None = Field(
        None, description="Benchmark only these envs with this policy (default: every env)."
    )
    env_kwargs: dict[str, JsonValue] = Field(default_factory=dict)


class BenchExpert(_PolicyBase):
    """The task's scripted expert (privileged state); ``noise_std`` on its motion commands."""

    type: Literal["expert"] = "expert"
    noise_std: float = Field(0.0, ge=0.0, allow_inf_nan=False)


class BenchRandom(_PolicyBase):
    """Uniformly random actions (reseeded with each episode's seed)."""

    type: Literal["random"] = "random"


class BenchCheckpoint(_PolicyBase):
    """A loopsim checkpoint directory, or ``{env id: directory}``."""

    type: Literal["checkpoint"] = "checkpoint"
    path: str | dict[str, str]


class TrainSource(_Strict):
    """How to train a policy for one env.

    Attributes:
        config: A ``loopsim train`` config file (``configs/train/...`` resolves to the bundled file
            when no such file is in the working directory), or the config itself inline (a mapping).
        overrides: ``key.sub=value`` overrides of that config (``seed`` is set per training seed).
        collect: A ``loopsim collect`` config (file or inline mapping) run once first; its store
            replaces ``train.stores`` (its ``store`` and ``mode`` are set by the benchmark).
        collect_overrides: Overrides of the collect config.
    """

    config: str | dict[str, JsonValue]
    overrides: list[str] = Field(default_factory=list)
    collect: str | dict[str, JsonValue] | None = None
    collect_overrides: list[str] = Field(default_factory=list)

    def label(self) -> str:
        """The config's file name, or ``inline``."""
        return self.config if isinstance(self.config, str) else "inline"


class BenchTrain(_PolicyBase):
    """A policy trained per training seed from a training config per env.

    Attributes:
        per_env: ``{env id: TrainSource}``; the policy is benchmarked on these envs.
        seeds: Training seeds (default: the benchmark's ``train_seeds``).
    """

    type: Literal["train"] = "train"
    per_env: dict[str, TrainSource] = Field(min_length=1)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(None, min_length=1)


class BenchSB3Zip(_PolicyBase):
    """A user's stable-baselines3 model file (``model.zip``) loaded with ``<algo>.load``: trusted files only.

    Attributes:
        path: The ``.zip`` file, or ``{env id: file}``.
        algo: The SB3 algorithm class that saved it (``PPO``, ``SAC``...).
    """

    type: Literal["sb3_zip"] = "sb3_zip"
    path: str | dict[str, str]
    algo: str

    @field_validator("algo")
    @classmethod
    def _known_algo(cls, value: str) -> str:
        from loopsim.policies.sb3 import sb3_algorithms

        if value not in sb3_algorithms():
            raise ValueError(f"unknown SB3 algorithm; allowed: {sorted(sb3_algorithms())}")
        return value


class BenchCallable(_PolicyBase):
    """A Python function ``module:function``: one observation in, one action out (trusted code only)."""

    type: Literal["callable"] = "callable"
    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


BenchPolicy = Annotated[
    BenchExpert | BenchRandom | BenchCheckpoint | BenchTrain | BenchSB3Zip | BenchCallable,
    Field(discriminator="type"),
]


class BenchConfig(_Strict):
    """A benchmark suite.

    Attributes:
        name: The suite's name (``factory-v0``); default output ``runs/bench/<name>``.
        seed: Seed of the bootstrap resampling of every interval.
        envs: The envs (tasks are env x site).
        sites: Site names, evaluated for every env (checked against each env's domain before work).
        train_seeds: Training seeds of ``train`` policies (each one run).
        eval: The evaluation protocol.
        policies: ``{name: policy}``, in table order.
        compare: Pairs ``[X, Y]`` for ``P(X > Y)`` (default: every pair, in ``policies`` order).
        reps: Bootstrap resamples per interval.
    """

    name: str = Field(pattern=NAME_PATTERN)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    envs: list[BenchEnv] = Field(min_length=1)
    sites: list[str] = Field(default_factory=lambda: ["lab"], min_length=1)
    train_seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
        default_factory=lambda: [0], min_length=1
    )
    eval: BenchEval = Field(default_factory=BenchEval)
    policies: dict[str, BenchPolicy] = Field(min_length=1)
    compare: list[Annotated[tuple[str, str], Field(strict=False)]] | None = None  # YAML gives lists
    reps: int = Field(2000, ge=100, le=100_000)

    @model_validator(mode="after")
    def _consistent(self) -> BenchConfig:
        ids = [e.id for e in self.envs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"envs: an env id is listed twice: {ids}")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites: a site is listed twice: {self.sites}")
        if len(set(self.train_seeds)) != len(self.train_seeds):
            raise ValueError(f"train_seeds: a seed is listed twice: {self.train_seeds}")
        for name, pol in self.policies.items():
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"policies: name {name!r} must match {NAME_PATTERN}")
            named = list(pol.per_env) if isinstance(pol, BenchTrain) else list(pol.envs or [])
            if isinstance(pol, BenchCheckpoint | BenchSB3Zip) and isinstance(pol.path, dict):
                named += list(pol.path)
            unknown = sorted(set(named) - set(ids))
            if unknown:
                raise ValueError(f"policies.{name}: env(s) {unknown} are not in envs; allowed: {ids}")
            if isinstance(pol, BenchTrain) and pol.seeds and len(set(pol.seeds)) != len(pol.seeds):
                raise ValueError(f"policies.{name}.seeds: a seed is listed twice: {pol.seeds}")
            if not self.policy_envs(name):  # e.g. envs: [], or envs disjoint from per_env / path
                raise ValueError(
                    f"policies.{name}: runs on no env (envs = {pol.envs}); name at least one of {ids}, or "
                    "remove the policy"
                )
        for pair in self.compare or []:
            bad = [p for p in pair if p not in self.policies]
            if bad or pair[0] == pair[1]:
                raise ValueError(
                    f"compare: pair {list(pair)} must name two different policies; "
                    f"allowed: {list(self.policies)}"
                )
        return self

    # ------------------------------------------------------------------------------------ derived
    def policy_envs(self, name: str) -> list[str]:
        """The env ids policy ``name`` is benchmarked on, in ``envs`` order."""
        pol = self.policies[name]
        if isinstance(pol, BenchTrain):
            keep = set(pol.per_env)
        elif isinstance(pol, BenchCheckpoint | BenchSB3Zip) and isinstance(pol.path, dict):
            keep = set(pol.path)
        else:
            keep = set(pol.envs) if pol.envs is not None else {e.id for e in self.envs}
        if pol.envs is not None:
            keep &= set(pol.envs)
        return [e.id for e in self.envs if e.id in keep]

    def policy_seeds(self, name: str) -> list[int | None]:
        """Training seeds of policy ``name`` (``[None]`` for a policy that is not trained)."""
        pol = self.policies[name]
        if isinstance(pol, BenchTrain):
            return list(pol.seeds or self.train_seeds)
        return [None]

    def pairs(self) -> list[tuple[str, str]]:
        """The ``(X, Y)`` pairs of ``P(X > Y)``."""
        if self.compare is not None:
            return [tuple(p) for p in self.compare]
        names = list(self.policies)
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]

    def env(self, env_id: str) -> BenchEnv:
        """The :class:`BenchEnv` of ``env_id``."""
        return next(e for e in self.envs if e.id == env_id)


# ===================================================================================== user policies
def _import_callable(function: str) -> Callable[[Any], Any]:
    """Import ``module:function`` (dotted attributes allowed), with the working directory on ``sys.path``.

    Raises:
        ConfigError: If the module cannot be imported or the attribute is missing or not callable.
    """
    import importlib
    import sys

    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    module_name, _, attr = function.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"function = {function!r}: cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"function = {function!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"function = {function!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


class CallablePolicy:
    """A function ``observation -> action`` as a policy (SB3's ``predict`` signature).

    Args:
        function: Called with one observation (an array of the env's observation shape, or a dict);
            returns one action (anything ``np.asarray`` turns into the action shape).
        observation_space: The env's observation space.
        action_space: The env's action space.

    Raises:
        ValueError: From :meth:`predict`, if the action's shape is not the action space's, or a float
            action holds NaN or infinity.
    """

    def __init__(self, function: Callable[[Any], Any], observation_space: Any, action_space: Any) -> None:
        self.function = function
        self.observation_space = observation_space
        self.action_space = action_space

    def predict(
        self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = True
    ) -> tuple[np.ndarray, None]:
        """``(function(observation) as the action space's dtype, None)``."""
        action = np.asarray(self.function(observation), dtype=self.action_space.dtype)
        if action.shape != tuple(self.action_space.shape or ()):
            raise ValueError(
                f"the policy function returned an action of shape {action.shape}; the env's action space "
                f"is {self.action_space}"
            )
        if np.issubdtype(action.dtype, np.floating) and not np.isfinite(action).all():
            raise ValueError(f"the policy function returned a non-finite action {action.tolist()}")
        return action, None

    def reset(self, seed: int | None = None) -> None:
        """Nothing to reset (a function holds no episode state)."""


@dataclass(frozen=True)
class CallableSpec:
    """Picklable recipe of a :class:`CallablePolicy`: each worker imports ``function`` itself."""

    function: str

    def make_policy(self, env: Any) -> CallablePolicy:
        """Import the function and wrap it for ``env``'s spaces."""
        return CallablePolicy(_import_callable(self.function), env.observation_space, env.action_space)


class _SB3ModelPolicy:
    """A loaded SB3 model acting through its own ``predict`` (custom policy classes work too)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.observation_space = model.observation_space
        self.action_space = model.action_space

    def predict(
        self, observation: Any, state: Any = None, episode_start: Any = None, deterministic: bool = True
    ) -> tuple[np.ndarray, Any]:
        return self.model.predict(observation, state=state, episode_start=episode_start,
                                  deterministic=deterministic)

    def reset(self, seed: int | None = None) -> None:
        """Nothing to reset (randomness is torch's, seeded per episode by the rollout)."""


@dataclass(frozen=True)
class SB3ZipSpec:
    """Picklable recipe of a user's SB3 model file: each worker loads it with ``<algo>.load`` on CPU.

    SB3 model files hold pickled objects: load only files you trust.
    """

    path: str
    algo: str

    def make_policy(self, env: Any) -> _SB3ModelPolicy:
        """Load the model (``device="cpu"``) and act with its ``predict``.

        Raises:
            ValueError: If the file was saved by another algorithm than ``algo`` (its policy class is
                not one of ``algo``'s), naming both; else whatever SB3's ``load`` raises.
        """
        from loopsim.policies.sb3 import sb3_algorithms

        algo = sb3_algorithms()[self.algo]
        try:
            return _SB3ModelPolicy(algo.load(self.path, device="cpu"))
        except Exception:
            from stable_baselines3.common.save_util import load_from_zip_file

            try:
                data, _, _ = load_from_zip_file(self.path, device="cpu")
                saved = (data or {}).get("policy_class")
            except Exception:  # noqa: BLE001 - not an SB3 file at all: SB3's own error says so
                saved = None
            allowed = tuple(algo.policy_aliases.values())
            if isinstance(saved, type) and allowed and not issubclass(saved, allowed):
                fits = sorted(n for n, c in sb3_algorithms().items()
                              if issubclass(saved, tuple(c.policy_aliases.values())))
                by = " or ".join(fits) or "another algorithm"
                raise ValueError(
                    f"{self.path} holds the policy class {saved.__name__} (saved by {by}), not a {self.algo} "
                    "policy; set algo to the algorithm that saved it"
                ) from None
            raise


# ============================================================================================ paths
def resolve_path(path: str | os.PathLike) -> Path:
    """A config's path: as given if it exists (relative to the working directory), else the bundled file.

    ``configs/train/factory_pick_bc.yaml`` resolves to the file in the working directory when there
    is one (a checkout), else to the copy shipped in the package (``loopsim.configs``).
    """
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    parts = p.parts
    if parts and parts[0] == "configs":
        from importlib import resources

        bundled = Path(str(resources.files("loopsim.configs").joinpath(*parts[1:])))
        if bundled.exists():
            return bundled
    return p


def bundled_suite(name: str) -> Path | None:
    """The bundled suite file ``configs/bench/<name>.yaml``, or ``None``."""
    from importlib import resources

    p = Path(str(resources.files("loopsim.configs").joinpath("bench", f"{name}.yaml")))
    return p if p.is_file() else None


def _slug(env_id: str) -> str:
    return env_id.replace("/", "__") if env_id.count("/") > 1 else env_id.split("/")[-1]


# ============================================================================================ checks
@dataclass
class _Trained:
    """A resolved ``train`` source of one (policy, env)."""

    config: Any  # TrainConfig with the seed still 0 and train.stores as given
    source: TrainSource
    collect: Any | None  # CollectConfig or None


def _cell_kwargs(config: BenchConfig, name: str, env_id: str, policy_kwargs: Mapping[str, Any]) -> dict:
    """Env kwargs of a cell: the benchmark's, the policy's observation kwargs, the policy's env_kwargs."""
    observed = {k: v for k, v in policy_kwargs.items() if k in OBSERVATION_KWARGS}
    return {**config.env(env_id).kwargs, **observed, **config.policies[name].env_kwargs}


def check_bench_config(config: BenchConfig) -> dict[tuple[str, str], _Trained]:
    """Check everything a benchmark needs before any work starts.

    Env ids are registered, sites belong to each env's domain, every env builds with its kwargs;
    checkpoints load and fit their env; training and collect configs load (with overrides) and fit
    the env they are listed under; SB3 files exist; callables import and return actions of the
    right shape for a first observation.

    Returns:
        ``{(policy, env id): _Trained}`` for ``train`` policies.

    Raises:
        ConfigError: Naming the key (``policies.<name>...``, ``envs``, ``sites``), the value and what
            is allowed.
    """
    from loopsim.config import CollectConfig, TrainConfig, check_env_config
    from loopsim.envs import ENV_ENTRY_POINTS, available_sites, env_class
    from loopsim.rollout import check_policy

    for env in config.envs:
        if env.id not in ENV_ENTRY_POINTS:
            raise ConfigError(
                f"envs: env id {env.id!r} is not registered; allowed: {sorted(ENV_ENTRY_POINTS)}"
            )
        domain = env_class(env.id).site_schema.domain
        allowed = available_sites(domain)
        bad = [s for s in config.sites if s not in allowed]
        if bad:
            raise ConfigError(f"sites: {bad[0]!r} is not a site of {env.id} ({domain}); allowed: {allowed}")
        try:
            check_env_config(EnvConfig(id=env.id, kwargs=env.kwargs), config.sites)
        except ConfigError as exc:
            raise ConfigError(f"envs[{env.id}]: {exc}") from None
    trained: dict[tuple[str, str], _Trained] = {}
    for name, pol in config.policies.items():
        where = f"policies.{name}"
        for env_id in config.policy_envs(name):
            kwargs = _cell_kwargs(config, name, env_id, {})
            if isinstance(pol, BenchTrain):
                src = pol.per_env[env_id]
                demos = {"train.stores": "the demonstrations of `collect`"} if src.collect else {}
                _refuse_reserved(f"{where}.per_env[{env_id}].overrides", src.overrides,
                                 {"seed": "each training seed (train_seeds / seeds)", **demos})
                _refuse_reserved(f"{where}.per_env[{env_id}].collect_overrides", src.collect_overrides,
                                 {"store": "a store in the benchmark's output", "mode": "create"})
                try:
                    tcfg = load_config(TrainConfig, _source(src.config), src.overrides)
                except ConfigError as exc:
                    raise ConfigError(f"{where}.per_env[{env_id}].config: {exc}") from None
                if tcfg.env.id != env_id:
                    raise ConfigError(
                        f"{where}.per_env[{env_id}].config = {src.label()!r} trains in {tcfg.env.id!r}, "
                        f"not {env_id!r}"
                    )
                ccfg = None
                if src.collect is not None:
                    try:
                        fixed = [*src.collect_overrides, "store=pending", "mode=create"]
                        ccfg = load_config(CollectConfig, _source(src.collect), fixed)
                    except ConfigError as exc:
                        raise ConfigError(f"{where}.per_env[{env_id}].collect: {exc}") from None
                    if tcfg.policy.type != "bc":
                        raise ConfigError(f"{where}.per_env[{env_id}].collect: demonstrations are for "
                                          f"policy.type bc; {src.label()} trains {tcfg.policy.type!r}")
                    if ccfg.env.id != env_id:
                        raise ConfigError(f"{where}.per_env[{env_id}].collect collects in "
                                          f"{ccfg.env.id!r}, not {env_id!r}")
                try:
                    check_env_config(tcfg.env, tcfg.eval.sites)
                    if tcfg.policy.type == "sb3":
                        from loopsim.train_sb3 import check_sb3_config

                        check_sb3_config(tcfg)
                    elif ccfg is None:
                        from loopsim.train_bc import check_bc_config

                        check_bc_config(tcfg)
                except ConfigError as exc:
                    raise ConfigError(f"{where}.per_env[{env_id}].config ({src.label()}): {exc}") from None
                trained[(name, env_id)] = _Trained(tcfg, src, ccfg)
                continue
            spec = _fixed_spec(pol, env_id)
            if isinstance(spec, CheckpointPolicyConfig):
                from loopsim.policies import CheckpointError, read_checkpoint

                try:
                    meta, _ = read_checkpoint(spec.path)
                except CheckpointError as exc:
                    raise ConfigError(f"{where}.path: {exc}") from None
                trained_kwargs = ((meta.get("config") or {}).get("env") or {}).get("kwargs") or {}
                kwargs = _cell_kwargs(config, name, env_id, trained_kwargs)
            elif isinstance(spec, SB3ZipSpec):
                if not Path(spec.path).is_file():
                    raise ConfigError(f"{where}.path = {spec.path!r}: no such file (an SB3 model .zip)")
            elif isinstance(spec, CallableSpec):
                spec.make_policy(_SpacesOnly(None, None))  # imports; ConfigError names the function
            env_cfg = EnvConfig(id=env_id, site=config.sites[0], kwargs=kwargs)
            try:
                check_policy(spec, env_cfg)
                if isinstance(spec, CallableSpec):
                    _probe_callable(spec, env_cfg)
            except ConfigError as exc:
                raise ConfigError(f"{where} on {env_id}: {exc}") from None
            except Exception as exc:  # a user's SB3 file or function failing on load or first call
                raise ConfigError(f"{where} on {env_id}: {type(exc).__name__}: {exc}") from None
    return trained


def _source(config: str | Mapping[str, Any]) -> Path | Mapping[str, Any]:
    return dict(config) if isinstance(config, Mapping) else resolve_path(config)


@dataclass
class _SpacesOnly:
    observation_space: Any
    action_space: Any


def _probe_callable(spec: CallableSpec, env_cfg: EnvConfig) -> None:
    env = env_cfg.make()
    try:
        obs, _ = env.reset(seed=0)
        spec.make_policy(env).predict(obs)
    finally:
        env.close()


def _fixed_spec(pol: Any, env_id: str) -> Any:
    """The rollout spec of a policy that is not trained."""
    if isinstance(pol, BenchExpert):
        return ExpertPolicyConfig(noise_std=pol.noise_std)
    if isinstance(pol, BenchRandom):
        return RandomPolicyConfig()
    path = pol.path[env_id] if isinstance(getattr(pol, "path", None), dict) else getattr(pol, "path", None)
    if isinstance(pol, BenchCheckpoint):
        return CheckpointPolicyConfig.model_construct(type="checkpoint", path=str(resolve_path(path)))
    if isinstance(pol, BenchSB3Zip):
        return SB3ZipSpec(str(resolve_path(path)), pol.algo)
    if isinstance(pol, BenchCallable):
        return CallableSpec(pol.function)
    raise TypeError(f"not a fixed policy: {type(pol).__name__}")  # pragma: no cover


# =============================================================================================== run
Progress = Callable[[str, int, int], None]


def _cell_path(out: Path, policy: str, env_id: str, site: str, seed: int | None) -> Path:
    name = "fixed.json" if seed is None else f"seed_{seed}.json"
    return out / "cells" / policy / _slug(env_id) / site / name


#: Name of the lock file a running ``loopsim bench`` holds in its output directory (filelock).
LOCK_NAME = ".loopsim-bench.lock"


def _check_out(config: BenchConfig, out: Path) -> None:
    """Refuse an ``out`` that is a file, another kind of directory or another benchmark's, writing nothing.

    Raises:
        BenchError: If ``out`` is a file, holds files that are not a benchmark's (a store, a loop or
            training run, the user's files), or holds results of a different benchmark config.
    """
    from loopsim.training import config_changes

    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is a file; give a new or empty directory, or a benchmark's output")
    path = out / "config.yaml"
    if path.is_file():
        try:
            saved = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            saved = None
        if not isinstance(saved, dict) or not {"name", "envs", "policies"} <= set(saved):
            raise BenchError(
                f"{out} is not a benchmark output directory (its config.yaml is not a benchmark config: "
                "a loop or training run?); use another --out"
            )
        # The number of worker processes changes no result (each episode is seeded by itself): a run
        # started with 2 workers may be resumed with 1.
        changes = config_changes(saved, yaml.safe_load(dump_config(config)), ("eval.workers",))
        if changes:
            raise BenchError(
                f"{out} holds results of a different benchmark config ({'; '.join(changes)}); use another "
                "--out, or the same config and overrides to resume"
            )
        return
    # train/ and demos/ alone may be copied in from another benchmark's output to reuse its runs
    # (a finished run is reused only if its config is the one this benchmark would train).
    if out.exists() and any(p.name not in ("train", "demos", LOCK_NAME) for p in out.iterdir()):
        raise BenchError(
            f"{out} exists and is not a benchmark output directory (no config.yaml); use another --out"
        )


def _prepare_out(config: BenchConfig, out: Path) -> None:
    """Create ``out`` with the resolved config, or check that an existing ``out`` is this benchmark's."""
    _check_out(config, out)
    if not (out / "config.yaml").is_file():
        atomic_write(out / "config.yaml", dump_config(config), fsync=True)


def _collect_demos(ccfg: Any, out: Path, log: Callable[[str], None]) -> Path:
    """Run a collect config once into ``out/demos`` (a temporary store renamed into place when complete)."""
    from loopsim.rollout import collect

    digest = hashlib.sha256(dump_config(ccfg).encode()).hexdigest()[:10]
    final = out / "demos" / f"{_slug(ccfg.env.id)}-{digest}.zarr"
    if final.exists():
        return final
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log(f"collecting {ccfg.episodes} demonstrations of {ccfg.env.id} at {ccfg.env.site} -> {final}")
    collect(ccfg.model_copy(update={"store": str(tmp), "mode": "create"}))
    os.replace(tmp, final)
    return final


def _refuse_reserved(where: str, overrides: Sequence[str], reserved: Mapping[str, str]) -> None:
    """Refuse an override of a key the benchmark sets itself (it won silently before).

    Raises:
        ConfigError: Naming the override and what the benchmark sets the key to.
    """
    from loopsim.config import override_key

    for item in overrides:
        key = override_key(item)
        if key in reserved:
            raise ConfigError(f"{where}: {item!r}: the benchmark sets {key} itself (to {reserved[key]}); "
                              "leave it out")


def _train_one(name: str, env_id: str, seed: int, t: _Trained, out: Path, log: Callable[[str], None]) -> Path:
    """Train (or reuse, or resume) the run of ``name`` on ``env_id`` with training seed ``seed``."""
    from loopsim.config import TrainConfig
    from loopsim.training import train

    overrides = list(t.source.overrides)
    if t.collect is not None:
        overrides.append("train.stores=" + json.dumps([str(_collect_demos(t.collect, out, log))]))
    overrides.append(f"seed={seed}")
    cfg = load_config(TrainConfig, _source(t.source.config), overrides)
    run_dir = out / "train" / name / _slug(env_id) / f"seed_{seed}"
    if (run_dir / "done").exists():
        from loopsim.training import RunDir

        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        old = (saved.get("train") or {}).get("stores")
        new = getattr(cfg.train, "stores", None)
        if old and new and old != new and [Path(s).name for s in old] == [Path(s).name for s in new]:
            # A finished run copied from another benchmark's output: its demos are the same collect
            # config's (the store name is that config's digest), at the other output's path.
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"stores": old})})
        RunDir.start(run_dir, cfg, resume=True).close()  # refuses a run of another config
        return run_dir / "checkpoint"
    resume = (run_dir / "config.yaml").is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # killed before its config was written: nothing to keep
    log(f"training {name} on {env_id}, seed {seed} -> {run_dir}" + (" (resuming)" if resume else ""))
    start = time.perf_counter()
    train(cfg, run_dir, resume=resume, progress_bar=False)
    log(f"trained {name} on {env_id}, seed {seed} in {time.perf_counter() - start:.0f} s")
    return run_dir / "checkpoint"


def _episodes_or_error(
    name: str, env_id: str, seed: int | None, tasks: Sequence[tuple[str, int]], episodes: Iterable[Any]
) -> Iterator[Any]:
    """Yield ``episodes``, turning a failure while running one into a :class:`BenchError` with context.

    A user's policy raising or returning NaN, an SB3 file that does not fit the env...: the error names
    the policy, env, site and episode seed; the cells written before it are kept, so fixing the policy
    and re-running continues.
    """
    k = 0
    try:
        for item in episodes:
            yield item
            k += 1
    except Exception as exc:  # noqa: BLE001 - any failure of the policy or env, reported with context
        site, episode_seed = tasks[min(k, len(tasks) - 1)]
        run = "" if seed is None else f", training seed {seed}"
        raise BenchError(
            f"policies.{name} failed on {env_id} at {site}{run}, episode seed {episode_seed}: "
            f"{type(exc).__name__}: {exc}; finished cells are kept: fix the policy and run the same "
            "command to continue"
        ) from exc


def _evaluate(
    config: BenchConfig,
    name: str,
    env_id: str,
    seed: int | None,
    spec: Any,
    kwargs: Mapping[str, Any],
    sites: Sequence[str],
    out: Path,
    progress: Progress,
    counter: list[int],
    total: int,
) -> None:
    """Run the cells of (policy, env, seed) at ``sites``; write each cell as soon as its episodes are in."""
    from loopsim.rollout import EvaluationResult, check_policy, run_episodes

    ev = config.eval
    env_cfg = EnvConfig(id=env_id, site=sites[0], kwargs=dict(kwargs))
    check_policy(spec, env_cfg)
    tasks = [(site, ev.seed + i) for site in sites for i in range(ev.episodes)]
    current: EvaluationResult | None = None
    start = time.perf_counter()
    for k, (result, _) in enumerate(
        _episodes_or_error(name, env_id, seed, tasks, run_episodes(
            spec, env_cfg, tasks, workers=ev.workers, deterministic=ev.deterministic
        ))
    ):
        site = sites[k // ev.episodes]
        if current is None:
            current = EvaluationResult(env_id, site, ci_seed=ev.seed)
        current.episodes.append(result)
        counter[0] += 1
        progress("evaluate", counter[0], total)
        if len(current.episodes) == ev.episodes:
            cell = {
                "policy": name,
                "policy_type": config.policies[name].type,
                "env_id": env_id,
                "site": site,
                "seed": seed,
                "env_kwargs": dict(kwargs),
                "eval_seed": ev.seed,
                "deterministic": ev.deterministic,
                # Wall time since the previous cell of this group finished (the first includes the
                # workers' start-up); not part of the results (they do not depend on timing).
                "wall_seconds": round(time.perf_counter() - start, 3),
                **{k2: v for k2, v in current.as_dict().items() if k2 not in ("env_id", "site")},
            }
            atomic_write(_cell_path(out, name, env_id, site, seed), json.dumps(cell, indent=1), fsync=True)
            current, start = None, time.perf_counter()


def run_bench(
    config: BenchConfig,
    out: str | os.PathLike,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a benchmark into ``out`` and write its results.

    Args:
        config: The benchmark config.
        out: The output directory (see the module docstring).
        progress: Called as ``progress(phase, done, total)``.
        log: Called with one line per collection, training run and finished result file.

    Returns:
        The content of ``results.json``.

    Raises:
        ConfigError: From :func:`check_bench_config`, before any work.
        BenchError: If ``out`` is a file, holds another benchmark's results or other files, or is in
            use by another ``loopsim bench`` (a file lock); if a policy fails while running episodes.
    """
    progress = progress or (lambda *_: None)
    log = log or (lambda _line: None)
    from loopsim.runlock import acquire_or_refuse

    out = Path(out)
    trained = check_bench_config(config)
    _check_out(config, out)  # before anything is written, even the lock file
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire_or_refuse(out, LOCK_NAME, "loopsim bench", "--out", BenchError)
    try:
        return _run_locked(config, out, trained, progress, log)
    finally:
        lock.release()


def _run_locked(
    config: BenchConfig,
    out: Path,
    trained: Mapping[tuple[str, str], _Trained],
    progress: Progress,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The body of :func:`run_bench`, with ``out``'s lock held."""
    import torch

    _prepare_out(config, out)
    torch.set_num_threads(1)
    # Every (policy, env, seed) with the sites whose cell is not written yet.
    todo: list[tuple[str, str, int | None, list[str]]] = []
    total_cells = 0
    for name in config.policies:
        for env_id in config.policy_envs(name):
            for seed in config.policy_seeds(name):
                total_cells += len(config.sites)
                missing = [s for s in config.sites if not _cell_path(out, name, env_id, s, seed).exists()]
                if missing:
                    todo.append((name, env_id, seed, missing))
    log(f"{total_cells} cells, {total_cells - sum(len(t[3]) for t in todo)} already done")
    total = sum(len(t[3]) for t in todo) * config.eval.episodes
    counter = [0]
    progress("evaluate", 0, total)
    for name, env_id, seed, sites in todo:
        pol = config.policies[name]
        if isinstance(pol, BenchTrain):
            assert seed is not None
            t = trained[(name, env_id)]
            spec: Any = CheckpointPolicyConfig.model_construct(
                type="checkpoint", path=str(_train_one(name, env_id, seed, t, out, log))
            )
            kwargs = _cell_kwargs(config, name, env_id, t.config.env.kwargs)
        else:
            spec = _fixed_spec(pol, env_id)
            trained_kwargs: Mapping[str, Any] = {}
            if isinstance(spec, CheckpointPolicyConfig):
                from loopsim.policies import read_checkpoint

                meta, _ = read_checkpoint(spec.path)
                trained_kwargs = ((meta.get("config") or {}).get("env") or {}).get("kwargs") or {}
            kwargs = _cell_kwargs(config, name, env_id, trained_kwargs)
        _evaluate(config, name, env_id, seed, spec, kwargs, sites, out, progress, counter, total)
    results = summarize(config, load_cells(config, out))
    write_results(config, results, out)
    log(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.json'}, {out / 'plots'}")
    return results


def load_cells(config: BenchConfig, out: str | os.PathLike) -> list[dict[str, Any]]:
    """The finished cells of ``config`` in ``out``, in policy, env, site, seed order.

    Raises:
        BenchError: If a cell is missing.
    """
    cells = []
    for name in config.policies:
        for env_id in config.policy_envs(name):
            for site in config.sites:
                for seed in config.policy_seeds(name):
                    path = _cell_path(Path(out), name, env_id, site, seed)
                    if not path.is_file():
                        raise BenchError(f"cell {path} is missing; run the benchmark to finish it")
                    cells.append(json.loads(path.read_text(encoding="utf-8")))
    return cells


# ======================================================================================= statistics
def aggregate(
    scores: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]], seed: int, reps: int = 2000
) -> dict[str, Any]:
    """IQM and mean with stratified bootstrap 95% intervals, and probability of improvement (rliable).

    Source: Agarwal et al. (2021), "Deep RL at the Edge of the Statistical Precipice", NeurIPS;
    ``rliable.library.get_interval_estimates`` (percentile intervals, runs resampled within each
    task), ``rliable.metrics.aggregate_iqm`` / ``aggregate_mean`` / ``probability_of_improvement``.

    Args:
        scores: ``{policy: (runs, tasks) float}`` scores (success rates in [0, 1]); a pair's two
            policies must have the same tasks (columns) in the same order.
        pairs: ``(X, Y)`` pairs for ``P(X > Y)``.
        seed: Seed of the resampling (same inputs and seed give the same intervals).
        reps: Bootstrap resamples.

    Returns:
        ``{"iqm": {policy: {"value", "ci"}}, "mean": {...}, "probability_of_improvement":
        {"X,Y": {"value", "ci"}}}``.

    Raises:
        ValueError: If a score array is not 2-D with at least one run and one task, or a pair's
            tasks differ in number.
    """
    from rliable import library as rly
    from rliable import metrics

    from loopsim.rollout import seeded_global_numpy

    for k, v in scores.items():
        if np.ndim(v) != 2 or min(np.shape(v)) < 1:
            raise ValueError(f"scores[{k!r}] must be (runs >= 1, tasks >= 1), got shape {np.shape(v)}")

    def both(x: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])

    out: dict[str, Any] = {"iqm": {}, "mean": {}, "probability_of_improvement": {}}
    with seeded_global_numpy(seed):
        point, ci = rly.get_interval_estimates(dict(scores), both, reps=reps)
        for name in scores:
            for j, metric in enumerate(("iqm", "mean")):
                out[metric][name] = {"value": float(point[name][j]), "ci": [float(c) for c in ci[name][:, j]]}
    for x, y in pairs:
        if np.shape(scores[x])[1] != np.shape(scores[y])[1]:
            raise ValueError(f"P({x} > {y}): {x} and {y} have different numbers of tasks")
        out["probability_of_improvement"][f"{x},{y}"] = probability_of_improvement(
            scores[x], scores[y], seed=seed, reps=reps
        )
    return out


def probability_of_improvement(
    x: np.ndarray, y: np.ndarray, seed: int, reps: int = 2000
) -> dict[str, Any]:
    """``P(X > Y)`` with its 95% stratified bootstrap interval (rliable).

    The probability that a run of X scores higher than a run of Y on a task drawn at random (ties
    count one half; Mann-Whitney U statistic per task, averaged over tasks), with runs of X and of Y
    resampled independently within each task. Source: Agarwal et al. (2021);
    ``rliable.metrics.probability_of_improvement``.

    Args:
        x: ``(runs_x, tasks)`` scores of X.
        y: ``(runs_y, tasks)`` scores of Y, the same tasks in the same order.
        seed: Seed of the resampling.
        reps: Bootstrap resamples.

    Returns:
        ``{"value": float, "ci": [low, high]}``.
    """
    from rliable import library as rly
    from rliable import metrics

    from loopsim.rollout import seeded_global_numpy

    with seeded_global_numpy(seed):
        p, pci = rly.get_interval_estimates({"xy": (x, y)}, metrics.probability_of_improvement, reps=reps)
    return {"value": float(np.ravel(p["xy"])[0]), "ci": [float(c) for c in np.ravel(pci["xy"])]}


def _sum_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Counts summed key by key, largest first (ties by name)."""
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + int(v)
    return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))


def _task(cell: Mapping[str, Any]) -> str:
    return f"{cell['env_id'].split('/')[-1]}@{cell['site']}"


def summarize(config: BenchConfig, cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-task summaries and aggregates of finished cells (the content of ``results.json``).

    Aggregates are computed over every task ("all"), per site when there are several sites, and
    over the shifted sites (every site but ``lab``) when ``lab`` and others are benchmarked. Each
    per-task entry also holds ``success_per_run`` (the runs' success rates in training-seed order)
    and ``failure_modes`` (episode counts summed over the runs, largest first).
    """
    from loopsim.rollout import bootstrap_ci

    policies = list(config.policies)
    tasks = [f"{e.id.split('/')[-1]}@{s}" for e in config.envs for s in config.sites]
    per_task: list[dict[str, Any]] = []
    by: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for c in cells:
        by.setdefault((c["policy"], _task(c)), []).append(c)
    for name in policies:
        for task in tasks:
            group = by.get((name, task))
            if not group:
                continue
            succ = [float(e["success"]) for c in group for e in c["per_episode"]]
            rets = [float(e["return"]) for c in group for e in c["per_episode"]]
            rates = [c["success_rate"] for c in group]
            per_task.append({
                "policy": name,
                "task": task,
                "env_id": group[0]["env_id"],
                "site": group[0]["site"],
                "runs": len(group),
                "episodes": len(succ),
                "success_rate": float(np.mean(rates)),
                "success_ci": list(bootstrap_ci(succ, seed=config.seed, reps=config.reps)),
                "success_min": float(np.min(rates)),
                "success_max": float(np.max(rates)),
                "mean_return": float(np.mean([c["mean_return"] for c in group])),
                "return_ci": list(bootstrap_ci(rets, seed=config.seed, reps=config.reps)),
                "mean_length": float(np.mean([c["mean_length"] for c in group])),
                "success_per_run": rates,
                "failure_modes": _sum_counts(c["failure_modes"] for c in group),
            })
    groups: dict[str, list[str]] = {"all": list(config.sites)}
    if len(config.sites) > 1:
        for s in config.sites:
            groups[s] = [s]
        if "lab" in config.sites:
            groups["shifted"] = [s for s in config.sites if s != "lab"]
    aggregates: dict[str, Any] = {}
    for group, sites in groups.items():
        scores, task_lists = {}, {}
        for name in policies:
            seeds = config.policy_seeds(name)
            cols = [(env_id, s) for env_id in config.policy_envs(name) for s in sites]
            if not cols:
                continue
            m = np.zeros((len(seeds), len(cols)))
            for j, (env_id, s) in enumerate(cols):
                group_cells = by.get((name, f"{env_id.split('/')[-1]}@{s}"), [])
                rate = {c["seed"]: c["success_rate"] for c in group_cells}
                for i, sd in enumerate(seeds):
                    m[i, j] = rate[sd]
            scores[name] = m
            task_lists[name] = [f"{e.split('/')[-1]}@{s}" for e, s in cols]
        agg = aggregate(scores, [], seed=config.seed, reps=config.reps)
        agg["tasks"] = task_lists
        agg["runs"] = {k: int(v.shape[0]) for k, v in scores.items()}
        agg["scores"] = {k: v.tolist() for k, v in scores.items()}
        agg["pair_tasks"] = {}
        for x, y in config.pairs():  # on the tasks both policies were benchmarked on
            common = [t for t in task_lists.get(x, []) if t in task_lists.get(y, [])]
            if not common:
                continue
            sx = scores[x][:, [task_lists[x].index(t) for t in common]]
            sy = scores[y][:, [task_lists[y].index(t) for t in common]]
            agg["probability_of_improvement"][f"{x},{y}"] = probability_of_improvement(
                sx, sy, seed=config.seed, reps=config.reps
            )
            agg["pair_tasks"][f"{x},{y}"] = common
        aggregates[group] = agg
    return {
        "name": config.name,
        "protocol": protocol(config),
        "cells": [_row(c, config) for c in cells],
        "per_task": per_task,
        "aggregates": aggregates,
    }


def _row(cell: Mapping[str, Any], config: BenchConfig) -> dict[str, Any]:
    """One ``results.csv`` row of a cell.

    Its intervals are recomputed from the cell's episodes with the benchmark's bootstrap (seed
    ``config.seed``, ``config.reps`` resamples), the one of the per-task tables: a policy with one
    run shows the same interval in ``results.csv`` and ``results.md`` (the cell file's own intervals
    were drawn with the evaluation seed).
    """
    from loopsim.rollout import bootstrap_ci

    succ = [float(e["success"]) for e in cell["per_episode"]]
    rets = [float(e["return"]) for e in cell["per_episode"]]
    success_ci = bootstrap_ci(succ, seed=config.seed, reps=config.reps)
    return_ci = bootstrap_ci(rets, seed=config.seed, reps=config.reps)
    return {
        "policy": cell["policy"],
        "policy_type": cell["policy_type"],
        "env_id": cell["env_id"],
        "site": cell["site"],
        "seed": cell["seed"],
        "episodes": cell["episodes"],
        "success_rate": cell["success_rate"],
        "success_low": success_ci[0],
        "success_high": success_ci[1],
        "mean_return": cell["mean_return"],
        "return_low": return_ci[0],
        "return_high": return_ci[1],
        "mean_length": cell["mean_length"],
        "failure_modes": json.dumps(cell["failure_modes"], sort_keys=True),
        "env_kwargs": json.dumps(cell["env_kwargs"], sort_keys=True),
    }


def protocol(config: BenchConfig) -> str:
    """The evaluation protocol of ``config`` in words (for the README and ``results.md``)."""
    import gymnasium as gym

    from loopsim.envs import ENV_ENTRY_POINTS

    limits = []
    for e in config.envs:
        if e.id in ENV_ENTRY_POINTS:
            env = gym.make(e.id, **e.kwargs)
            steps, hz = env.unwrapped.max_steps, env.metadata["render_fps"]
            limits.append(f"{e.id.split('/')[-1]} {steps} steps ({steps / hz:g} s at {hz} Hz)")
            env.close()
    ev = config.eval
    trained = [n for n, p in config.policies.items() if isinstance(p, BenchTrain)]
    lines = [
        f"Tasks: {len(config.envs)} env(s) x {len(config.sites)} site(s) ({', '.join(config.sites)}).",
        f"Episodes: {ev.episodes} per cell (policy x env x site x training seed); episode i is reset with "
        f"seed {ev.seed} + i, the same initial states for every policy, site and training seed"
        f"{'' if not ev.deterministic else '; policies act deterministically (no exploration noise)'}.",
        "Success: the env's info['is_success'] at the episode's last step (judged on the true simulator "
        "state, never on noisy observations); an episode ends when the task succeeds or fails for good "
        "(terminated) or at the env's time limit (truncated, failure mode 'timeout').",
        f"Time limits: {', '.join(limits)}." if limits else "",
        "Return: the sum of the env's reward over the episode (reward_type "
        f"{sorted({str(e.kwargs.get('reward_type', 'dense')) for e in config.envs})}).",
        (f"Training seeds: {', '.join(f'{n} {config.policy_seeds(n)}' for n in trained)}; "
         "each seed is an independent training run (demonstrations, when collected, are shared)."
         if trained else ""),
        "Statistics (rliable): a run is one training seed, its score on a task the success rate. IQM and "
        "mean over runs x tasks with 95% stratified bootstrap intervals "
        f"({config.reps} resamples, seed {config.seed}); P(X > Y) on common tasks; per-task intervals are "
        "percentile bootstrap intervals over the evaluation episodes (pooled over runs). A policy with one "
        "run (not trained here) has a point as its aggregate interval.",
    ]
    return "\n".join(line for line in lines if line)


# ========================================================================================== outputs
def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown(results: Mapping[str, Any]) -> str:
    """The Markdown tables of ``results`` (per-task success and return, aggregates, P(improvement))."""
    per = results["per_task"]
    tasks = list(dict.fromkeys(r["task"] for r in per))
    policies = list(dict.fromkeys(r["policy"] for r in per))
    idx = {(r["policy"], r["task"]): r for r in per}
    out = [f"## {results['name']}", ""]
    for title, fmt in (
        ("Success rate [95% CI]", lambda r: f"{_pct(r['success_rate'])} [{_pct(r['success_ci'][0])}, "
                                            f"{_pct(r['success_ci'][1])}]"),
        ("Mean return [95% CI]", lambda r: f"{r['mean_return']:.2f} [{r['return_ci'][0]:.2f}, "
                                           f"{r['return_ci'][1]:.2f}]"),
    ):
        out += [f"### {title} per task", "", "| policy | runs | " + " | ".join(tasks) + " |",
                "|---|---|" + "---|" * len(tasks)]
        for p in policies:
            runs = max(r["runs"] for r in per if r["policy"] == p)
            out.append(f"| {p} | {runs} | " + " | ".join(fmt(idx[(p, t)]) if (p, t) in idx else "-"
                                                         for t in tasks) + " |")
        out.append("")
    def _runs_and_failures(r: Mapping[str, Any]) -> str:
        runs = r.get("success_per_run", [])
        failures = ", ".join(f"{k} {v}" for k, v in r.get("failure_modes", {}).items()) or "no failures"
        if len(runs) > 1:
            return "(" + ", ".join(_pct(x) for x in runs) + "); " + failures
        return failures

    out += ["### Success per run and failure modes per task (episodes, summed over runs)", "",
            "| policy | runs | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for p in policies:
        runs = max(r["runs"] for r in per if r["policy"] == p)
        out.append(f"| {p} | {runs} | " + " | ".join(
            _runs_and_failures(idx[(p, t)]) if (p, t) in idx else "-" for t in tasks) + " |")
    out.append("")
    out += ["### Aggregate success over tasks (IQM and mean, 95% stratified bootstrap CI)", "",
            "| tasks | policy | runs | IQM | mean |", "|---|---|---|---|---|"]
    for group, agg in results["aggregates"].items():
        for p in agg["iqm"]:
            i, m = agg["iqm"][p], agg["mean"][p]
            out.append(f"| {group} ({len(agg['tasks'][p])}) | {p} | {agg['runs'][p]} | {_pct(i['value'])} "
                       f"[{_pct(i['ci'][0])}, {_pct(i['ci'][1])}] | {_pct(m['value'])} "
                       f"[{_pct(m['ci'][0])}, {_pct(m['ci'][1])}] |")
    out += ["", "### Probability of improvement P(X > Y) [95% CI], on the tasks both were run on", "",
            "| tasks | X | Y | P(X > Y) |", "|---|---|---|---|"]
    for group, agg in results["aggregates"].items():
        for pair, v in agg["probability_of_improvement"].items():
            x, y = pair.split(",")
            n, (lo, hi) = len(agg["pair_tasks"][pair]), v["ci"]
            out.append(f"| {group} ({n}) | {x} | {y} | {v['value']:.2f} [{lo:.2f}, {hi:.2f}] |")
    out += ["", "### Protocol", "", *[f"- {line}" for line in results["protocol"].splitlines()], ""]
    return "\n".join(out)


#: Height of one policy's row in the aggregate plots [inch].
ROW_HEIGHT = 0.5


def _aggregate_figure(agg: Mapping[str, Any], group: str, suite: str) -> Any:
    """The interval plot (rliable) of one aggregate group: IQM and mean per policy, on a 0-1 axis.

    rliable places the x label at a fraction of the figure's height, which grows with the number
    of policies; the fraction is chosen here so the label sits 0.6 inch below the axes whatever
    the number of rows (a fixed ``-0.3`` overlapped the tick labels with fewer than 4 policies).
    """
    from rliable import plot_utils

    names = list(agg["iqm"])
    points = {n: np.array([agg["iqm"][n]["value"], agg["mean"][n]["value"]]) for n in names}
    cis = {n: np.array([agg["iqm"][n]["ci"], agg["mean"][n]["ci"]]).T for n in names}
    fig, axes = plot_utils.plot_interval_estimates(
        points, cis, metric_names=[f"IQM, {group} tasks", f"mean, {group} tasks"], algorithms=names,
        xlabel=f"{suite}: success rate (95% CI)", subfigure_width=4.2, row_height=ROW_HEIGHT,
        max_ticks=3, xlabel_y_coordinate=-0.6 / (ROW_HEIGHT * len(names)), wspace=0.2,
    )
    for ax in np.ravel(axes):
        ax.set_xlim(-0.02, 1.02)
        ax.set_xticks([0.0, 0.5, 1.0])
    return fig


def plot_results(config: BenchConfig, results: Mapping[str, Any], out: Path) -> list[Path]:
    """Write the PNG plots into ``out/plots`` (rliable's ``plot_utils``).

    ``aggregate_<group>.png``: IQM and mean with their intervals; ``performance_profile.png``:
    fraction of runs x tasks with success above tau (stratified bootstrap bands);
    ``probability_of_improvement.png``: ``P(X > Y)`` with intervals (every task).
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import library as rly
    from rliable import plot_utils

    from loopsim.rollout import seeded_global_numpy

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for group, agg in results["aggregates"].items():
            fig = _aggregate_figure(agg, group, results["name"])
            path = plots / f"aggregate_{group}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
        agg = results["aggregates"]["all"]
        scores = {n: np.asarray(v) for n, v in agg["scores"].items()}
        taus = np.linspace(0.0, 1.0, 41)
        with seeded_global_numpy(config.seed):
            profiles, profile_cis = rly.create_performance_profile(scores, taus, reps=config.reps)
        import seaborn as sns
        from matplotlib.lines import Line2D

        # tab10: no two of the first ten look alike (colorblind's orange and vermillion did); line
        # styles tell apart policies whose profiles coincide (e.g. two policies at 0% everywhere).
        colors = dict(zip(profiles, sns.color_palette("tab10", len(profiles)), strict=True))
        styles = {k: ("-", "--", "-.", ":")[i % 4] for i, k in enumerate(profiles)}
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        plot_utils.plot_performance_profiles(
            profiles, taus, performance_profile_cis=profile_cis, ax=ax, colors=colors, linestyles=styles,
            xlabel=r"success rate ($\tau$)", ylabel=r"fraction of runs x tasks with success $> \tau$",
        )
        ax.legend([Line2D([0], [0], color=colors[k], ls=styles[k], lw=2) for k in colors], list(colors),
                  loc="lower left", fontsize=8)
        ax.set_title(f"{results['name']}: performance profiles")
        path = plots / "performance_profile.png"
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
        poi = agg["probability_of_improvement"]
        if poi:
            fig, ax = plt.subplots(figsize=(5.0, 0.45 * len(poi) + 1.2), dpi=110)
            plot_utils.plot_probability_of_improvement(
                {k: v["value"] for k, v in poi.items()},
                {k: np.array(v["ci"]) for k, v in poi.items()}, ax=ax, xticks=[0.0, 0.25, 0.5, 0.75, 1.0],
                left_ylabel="policy X", right_ylabel="policy Y",
            )
            ax.set_xlim(-0.02, 1.02)
            ax.set_title(f"{results['name']}: P(X > Y) on common tasks", fontsize=10)
            path = plots / "probability_of_improvement.png"
            fig.savefig(path, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


def _markdown_blocks(markdown_text: str) -> list[tuple[str, Any]]:
    """``[(kind, value)]`` of the Markdown ``markdown`` writes: heading (level, text), table (rows), text."""
    blocks: list[tuple[str, Any]] = []
    table: list[list[str]] = []
    for line in [*markdown_text.splitlines(), ""]:
        if line.startswith("|"):
            if not set(line.replace("|", "").strip()) <= {"-"}:  # not the |---| separator
                table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if table:
            blocks.append(("table", table))
            table = []
        if line.startswith("#"):
            blocks.append(("heading", (len(line) - len(line.lstrip("#")), line.lstrip("#").strip())))
        elif line.strip():
            blocks.append(("text", line.removeprefix("- ")))
    return blocks


def html_page(title: str, markdown_text: str, images: Sequence[Path]) -> str:
    """The benchmark as one self-contained HTML page: the Markdown tables as HTML, the PNGs inlined.

    Built with :class:`loopsim.html_report.HtmlReport`, in the style of ``loopsim report``.
    """
    from loopsim.html_report import HtmlReport

    report = HtmlReport(title)
    for kind, value in _markdown_blocks(markdown_text):
        if kind == "heading" and value[0] > 1:
            report.heading(value[1], level=value[0])
        elif kind == "table":
            header, rows = value[0], value[1:]
            keys = [f"{i}" for i in range(len(header))]
            report.table([dict(zip(keys, r, strict=False)) for r in rows], columns=keys,
                         headers=dict(zip(keys, header, strict=True)))
        elif kind == "text":
            report.paragraph(value)
    report.heading("Plots")
    for img in images:
        report.image(img, caption=img.stem)
    return report.render()




CSV_FIELDS = [
    "policy", "policy_type", "env_id", "site", "seed", "episodes", "success_rate", "success_low",
    "success_high", "mean_return", "return_low", "return_high", "mean_length", "failure_modes",
    "env_kwargs",
]


def write_results(config: BenchConfig, results: Mapping[str, Any], out: str | os.PathLike) -> None:
    """Write ``results.json``, ``results.csv``, ``results.md``, ``plots/*.png`` and ``report.html``."""
    import io

    out = Path(out)
    atomic_write(out / "results.json", json.dumps(results, indent=1), fsync=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in results["cells"]:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_FIELDS})
    atomic_write(out / "results.csv", buf.getvalue(), fsync=True)
    md = markdown(results)
    atomic_write(out / "results.md", md, fsync=True)
    images = plot_results(config, results, out)
    atomic_write(out / "report.html", html_page(f"loopsim bench {results['name']}", md, images), fsync=True)
