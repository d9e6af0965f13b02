"""The data loop: deploy -> gather -> refine -> evaluate -> redeploy, measuring what the data is worth.

``loopsim loop CONFIG`` runs it. Iteration 0 makes the first policy: the task's expert demonstrates
at ``demos.site`` (with DART-style noise, Laskey et al. 2017: the noise widens the visited states, the
stored expert labels stay clean) and behaviour cloning fits a :class:`~loopsim.policies.BCPolicy` to
them; that policy is evaluated and is also the **no-refine baseline** arm. Each later iteration ``k``:

1. **deploy** the current policy at every ``loop.deploy_sites`` site for ``loop.episodes`` episodes
   (worker processes, each running whole episodes); with the ``intervention`` strategy the expert
   takes over when the policy strays (:class:`~loopsim.envs.ExpertIntervention`);
2. **gather** every episode into the run's operational store, tagged with iteration, site, policy
   version, sampled conditions, failure mode and interventions, with the expert's label of every
   visited state (``expert_action``);
3. **refine**: fit a new BC policy (from scratch, seeded) to the demonstrations plus the operational
   data chosen by the strategy (see :class:`StrategyConfig` kinds);
4. **evaluate** it on fixed held-out seeds (the same every iteration) at the deployment sites and at
   ``lab`` (forgetting);
5. **redeploy** it in the next iteration.

Run directory::

    <run_dir>/
        config.yaml                  the resolved config
        replicate.json               the replicate index (0 without --seeds), checked on resume
        demos.zarr                   expert demonstrations (iteration 0)
        operational.zarr             every deployed episode (iteration >= 1)
        iterations/<k:03d>/
            checkpoint/              the policy after iteration k (loopsim checkpoint)
            refine.json              what it was trained on, loss, time
            eval.json                evaluation at each site (per-episode results, 95% intervals)
            timing.json              wall time of each finished phase [s]
        metrics.csv                  one row per (iteration, site)
        plots/success.png, plots/lab.png, plots/failure_modes.png

Restartable: each phase's output is written atomically, and a phase is done when its output exists.
Deployment is resumable per episode: deploy episodes are pure functions of (policy, site, seed), so
a re-run skips the (iteration, site, seed) triples the operational store already holds — killing a
run at any moment and re-running the same command continues with no episode duplicated.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import gymnasium as gym
import numpy as np
import torch
import yaml
from pydantic import Field, field_validator, model_validator

from loopsim.atomic import atomic_open, atomic_write
from loopsim.config import (
    MAX_SEED,
    BCPolicyConfig,
    ConfigError,
    EnvConfig,
    ExpertPolicyConfig,
    _Strict,
    check_env_config,
    dump_config,
)
from loopsim.runlock import acquire_or_refuse

__all__ = [
    "DemosConfig",
    "LoopConfig",
    "LoopRun",
    "RLFinetuneStrategy",
    "StrategyConfig",
    "run_loop",
]

#: Seeds of replicate ``r`` (``--seeds``): demonstrations ``REPLICATE_STRIDE * r + demos.seed + i``;
#: deployment episode ``i`` of iteration ``k``: ``REPLICATE_STRIDE * r + DEPLOY_SEED + 10_000 * k + i``
#: (``k <= 1000``, ``i < 10_000``). Evaluation seeds are the same for every replicate and start at
#: ``EVAL_SEED_MIN`` or above, past every replicate's training seeds.
DEPLOY_SEED = 100_000
REPLICATE_STRIDE = 20_000_000
MAX_REPLICATE = 99
EVAL_SEED_MIN = REPLICATE_STRIDE * (MAX_REPLICATE + 1)


# ============================================================================================= config
class DemosConfig(_Strict):
    """The expert demonstrations the first policy is cloned from.

    Attributes:
        site: Where the expert demonstrates (usually ``lab``).
        episodes: Number of demonstrations; episode ``i`` uses seed ``seed + i``.
        noise_std: Gaussian noise on the expert's motion commands while demonstrating [action units];
            the training targets are the expert's clean labels.
        seed: First demonstration seed.
    """

    site: str = "lab"
    episodes: int = Field(50, ge=1, le=10_000)
    noise_std: float = Field(0.1, ge=0.0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=DEPLOY_SEED - 10_000)


class BCFitConfig(_Strict):
    """Behaviour-cloning settings of every refine (and of the first policy).

    Attributes:
        epochs: Passes over the training transitions.
        batch_size: Transitions per gradient step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        max_grad_norm: Clip each gradient step's global norm to this (``None``: no clipping).
    """

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False)


class BCAllStrategy(_Strict):
    """``bc_all``: behaviour cloning on the demos and every operational episode (the actions taken)."""

    type: Literal["bc_all"] = "bc_all"


class FilteredBCStrategy(_Strict):
    """``filtered_bc``: the demos plus the successful operational episodes only (self-improvement)."""

    type: Literal["filtered_bc"] = "filtered_bc"


class DAggerStrategy(_Strict):
    """``dagger``: every visited state relabelled with the expert's action (Ross et al. 2011, DAgger)."""

    type: Literal["dagger"] = "dagger"


class InterventionStrategy(_Strict):
    """``intervention``: the expert takes over during deployment; its segments are up-weighted.

    HG-DAgger (Kelly et al. 2019) gating at deployment (:class:`~loopsim.envs.ExpertIntervention`), and
    Sirius-style weighting (Liu et al. 2022, "Robot Learning on the Job") at training: the expert's
    intervention steps count ``weight`` times, the policy's own steps of successful episodes once,
    the policy's steps of failed episodes not at all.

    Attributes:
        threshold: Distance between policy and expert motion commands that triggers a takeover
            [action units].
        takeover_steps: Control steps the expert keeps control once it took over.
        weight: How many times each intervention step is repeated in the training set.
    """

    type: Literal["intervention"] = "intervention"
    threshold: float = Field(0.6, gt=0, allow_inf_nan=False)
    takeover_steps: int = Field(10, ge=1)
    weight: int = Field(4, ge=1, le=100)


class RLFinetuneStrategy(_Strict):
    """``rl_finetune``: continue an SB3 off-policy algorithm on the operational data, from a checkpoint.

    The first policy (iteration 0, also the no-refine baseline) is ``checkpoint``: an ``sb3``
    checkpoint of an off-policy algorithm (SAC, TD3, DDPG), e.g. the ``checkpoint/`` of a
    ``loopsim train`` run; no demonstrations are made. Refine ``k`` rebuilds the algorithm around the
    policy of iteration ``k - 1`` (actor, critics and target networks: the checkpoint holds the whole
    SB3 policy module), fills its replay buffer with every operational transition gathered so far
    (rewards as the env returned them; ``terminated`` ends bootstrapping, ``truncated`` does not, as
    SB3's ``handle_timeout_termination``), and runs ``gradient_steps`` updates of the algorithm's own
    ``train``. The deployments are the online interaction: this is off-policy RL from the robot's own
    operating data, as in offline-to-online fine-tuning (e.g. Ball et al. 2023, "Efficient Online
    Reinforcement Learning with Offline Data", RLPD; Nair et al. 2020, AWAC).

    Optimizer states are not in a checkpoint, so each refine starts fresh Adam moments; SAC's entropy
    coefficient is not either, hence ``ent_coef`` (fixed, or SB3's ``"auto_<init>"`` to keep tuning it).

    Attributes:
        checkpoint: The first policy's checkpoint directory (an off-policy ``sb3`` kind).
        gradient_steps: Gradient updates per refine.
        batch_size: Transitions per update (sampled uniformly from the replay buffer).
        learning_rate: Adam learning rate of the actor and critics.
        gamma: Discount factor.
        tau: Polyak coefficient of the target networks.
        ent_coef: SAC's entropy coefficient (a float, or ``"auto_<init>"``); ignored by TD3/DDPG.
        explore: Deploy with the stochastic policy (exploration in operation) instead of its mean.
    """

    type: Literal["rl_finetune"] = "rl_finetune"
    checkpoint: str
    gradient_steps: int = Field(2000, ge=1, le=10_000_000)
    batch_size: int = Field(256, ge=1)
    learning_rate: float = Field(3e-4, gt=0, allow_inf_nan=False)
    gamma: float = Field(0.95, gt=0, le=1, allow_inf_nan=False)
    tau: float = Field(0.005, gt=0, le=1, allow_inf_nan=False)
    ent_coef: float | str = 0.01
    explore: bool = False

    @field_validator("ent_coef")
    @classmethod
    def _ent_coef(cls, value: float | str) -> float | str:
        # a field validator, so the error names strategy.ent_coef (a model one named the strategy)
        if isinstance(value, str):
            ok = value.startswith("auto_")
            if ok:
                try:
                    ok = float(value[5:]) > 0
                except ValueError:
                    ok = False
            if not ok:
                raise ValueError("give a float >= 0 or 'auto_<float > 0>' (SAC tunes it from there)")
        elif not value >= 0:
            raise ValueError("give a float >= 0 or 'auto_<float > 0>'")
        return value


StrategyConfig = Annotated[
    BCAllStrategy | FilteredBCStrategy | DAggerStrategy | InterventionStrategy | RLFinetuneStrategy,
    Field(discriminator="type"),
]


class LoopSection(_Strict):
    """Deployment settings.

    Attributes:
        iterations: Deploy-refine iterations after the first policy.
        episodes: Episodes per deployment site per iteration (<= 10000).
        deploy_sites: Where the robot is deployed (site names of the env's domain).
        workers: Worker processes for deployment.
    """

    iterations: int = Field(3, ge=1, le=1000)
    episodes: int = Field(20, ge=1, le=10_000)
    deploy_sites: list[str] = Field(min_length=1)
    workers: int = Field(1, ge=1, le=64)

    @field_validator("deploy_sites")
    @classmethod
    def _once_each(cls, sites: list[str]) -> list[str]:
        # listed twice, a site was deployed at twice per seed: every episode stored twice, and a
        # resumed deployment (which counts (site, seed) pairs) stored them once
        twice = sorted({s for s in sites if sites.count(s) > 1})
        if twice:
            raise ValueError(f"{twice} listed more than once: list each site once")
        return sites


class LoopEvalConfig(_Strict):
    """Evaluation after every iteration, on fixed held-out seeds.

    Attributes:
        episodes: Episodes per site; episode ``i`` uses seed ``seed + i`` at every site and iteration.
        seed: First evaluation seed (far from the demo and deployment seeds).
        lab: Also evaluate at ``lab`` (to see forgetting).
        workers: Worker processes for evaluation.
    """

    episodes: int = Field(30, ge=1, le=100_000)
    seed: int = Field(EVAL_SEED_MIN, ge=EVAL_SEED_MIN, le=MAX_SEED - 100_000)
    lab: bool = True
    workers: int = Field(1, ge=1, le=64)


class LoopConfig(_Strict):
    """A ``loopsim loop`` run (see the module docstring).

    Attributes:
        seed: Seed of the run: BC initialisation and shuffling; replicate ``r`` of ``--seeds`` shifts
            the demonstration and deployment seeds too.
        run_dir: Where the run directory goes (default ``runs/<config file stem>``).
        env: The env (its ``site`` is unused: sites come from ``demos`` and ``loop``).
        demos: The expert demonstrations of iteration 0 (unused by ``rl_finetune``).
        policy: The BC architecture (unused by ``rl_finetune``).
        train: The BC settings of every refine (unused by ``rl_finetune``).
        strategy: How refine uses the operational data.
        loop: Deployment settings.
        eval: Evaluation settings.
    """

    seed: int = Field(0, ge=0, le=1000)
    run_dir: str | None = None
    env: EnvConfig
    demos: DemosConfig = Field(default_factory=DemosConfig)
    policy: BCPolicyConfig = Field(default_factory=BCPolicyConfig)
    train: BCFitConfig = Field(default_factory=BCFitConfig)
    strategy: StrategyConfig = Field(default_factory=DAggerStrategy)
    loop: LoopSection
    eval: LoopEvalConfig = Field(default_factory=LoopEvalConfig)

    @model_validator(mode="after")
    def _fits(self) -> LoopConfig:
        if self.demos.seed + self.demos.episodes > DEPLOY_SEED:
            raise ValueError(f"demos.seed + demos.episodes must stay below {DEPLOY_SEED} (deployment seeds)")
        return self

    @property
    def eval_sites(self) -> list[str]:
        """The deployment sites, then ``lab`` (if ``eval.lab`` and not already deployed at)."""
        sites = list(dict.fromkeys(self.loop.deploy_sites))
        if self.eval.lab and "lab" not in sites:
            sites.append("lab")
        return sites


def check_loop_config(config: LoopConfig) -> None:
    """Check the env, the sites and the strategy before any work (builds the env once).

    Raises:
        ConfigError: Naming the key, the value and what is allowed.
    """
    from loopsim.envs import available_sites, env_class

    env = config.env
    domain = env_class(env.id).site_schema.domain
    allowed = available_sites(domain)
    for key, names in (("demos.site", [config.demos.site]), ("loop.deploy_sites", config.loop.deploy_sites)):
        for name in names:
            if name not in allowed:
                raise ConfigError(f"{key}: site {name!r} is not a {domain} site; allowed: {allowed}")
    if env.site != "lab":  # unused, but kept in config.yaml: a typo there looked like a setting that ran
        raise ConfigError(
            f"env.site = {env.site!r}: a loop's sites are demos.site and loop.deploy_sites; leave env.site "
            "out (or lab)"
        )
    check_env_config(env.model_copy(update={"site": config.demos.site}))
    if isinstance(config.strategy, RLFinetuneStrategy):
        _check_rl_finetune(config)
        return
    probe = env.make(site=config.demos.site)
    try:
        if getattr(probe.unwrapped, "expert_entry_point", None) is None:
            raise ConfigError(f"env.id = {env.id!r}: the loop needs a task with a scripted expert")
        from loopsim.policies.bc import BCPolicy

        try:
            BCPolicy(
                probe.observation_space,
                probe.action_space,
                config.policy.hidden_sizes,
                config.policy.activation,
                config.policy.cnn_channels,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"policy = {config.policy.model_dump()}: {exc}") from None
    finally:
        probe.close()


def _check_rl_finetune(config: LoopConfig) -> None:
    """``strategy.checkpoint`` must load, be an off-policy SB3 policy, fit the env, and not see images."""
    from stable_baselines3.common.preprocessing import is_image_space

    from loopsim.policies import CheckpointError, SB3Policy, load_policy
    from loopsim.policies.sb3 import sb3_algorithms
    from loopsim.rollout import check_policy
    from loopsim.train_sb3 import _is_off_policy

    path = config.strategy.checkpoint
    if not Path(path).exists():
        raise ConfigError(
            f"strategy.checkpoint = {path!r} does not exist; rl_finetune starts from a trained SB3 "
            "off-policy checkpoint: run `loopsim train CONFIG` first (e.g. "
            "configs/train/factory_peg_sac.yaml writes runs/factory_peg_sac/checkpoint), or point "
            "strategy.checkpoint at one"
        )
    try:
        policy = load_policy(path)
    except CheckpointError as exc:
        raise ConfigError(f"strategy.checkpoint = {path!r}: {exc}") from None
    if not isinstance(policy, SB3Policy) or not _is_off_policy(sb3_algorithms()[policy.algo]):
        what = f"a {policy.algo} policy" if isinstance(policy, SB3Policy) else f"a {policy.kind!r} policy"
        raise ConfigError(
            f"strategy.checkpoint = {path!r} holds {what}; rl_finetune needs an off-policy sb3 "
            "algorithm (SAC, TD3, DDPG), e.g. the checkpoint/ of `loopsim train` with policy.algo: SAC"
        )
    space = policy.observation_space
    spaces = space.spaces.values() if isinstance(space, gym.spaces.Dict) else [space]
    if any(is_image_space(s, check_channels=False) for s in spaces):
        raise ConfigError(
            f"strategy.checkpoint = {path!r}: rl_finetune does not support image observations yet "
            "(use obs_mode state or goal)"
        )
    env_section = policy.config.get("env") if isinstance(policy.config, dict) else None
    trained_on = env_section.get("id") if isinstance(env_section, dict) else None
    if trained_on is not None and trained_on != config.env.id:
        raise ConfigError(
            f"strategy.checkpoint = {path!r} was trained on {trained_on}, but env.id = {config.env.id!r}; "
            "fine-tune a policy of the same env (same-shaped spaces are not the same task)"
        )
    check_policy(path, config.env, site=config.loop.deploy_sites[0])


def _replay_buffer(model: Any, dataset: Any, normalizer: Any) -> int:
    """Fill ``model.replay_buffer`` with every transition of ``dataset`` (a TransitionDataset).

    Observations are normalised with the policy's frozen ``VecNormalize`` statistics (the network's
    input space); ``done = terminated or truncated`` with ``TimeLimit.truncated`` set on truncation, so
    SB3 bootstraps through time limits (``handle_timeout_termination``).

    Returns:
        The number of transitions added.
    """
    arrays = dataset.arrays
    t = np.arange(len(dataset))
    rows = t + dataset._step_episode[t]

    def obs(key_rows: np.ndarray) -> Any:
        if "observation" in arrays:
            o: Any = arrays["observation"][key_rows]
        else:
            o = {k.split("/", 1)[1]: v[key_rows] for k, v in arrays.items() if k.startswith("observation/")}
        return normalizer(o) if normalizer is not None else o

    observation, next_observation = obs(rows), obs(rows + 1)
    action = np.asarray(arrays["action"], dtype=np.float32)
    reward = np.asarray(arrays["reward"], dtype=np.float32)
    terminated = np.asarray(arrays["terminated"], dtype=bool)
    truncated = np.asarray(arrays["truncated"], dtype=bool)
    buffer = model.replay_buffer
    for i in range(len(dataset)):
        if isinstance(observation, dict):
            o = {k: v[i : i + 1] for k, v in observation.items()}
            o2 = {k: v[i : i + 1] for k, v in next_observation.items()}
        else:
            o, o2 = observation[i : i + 1], next_observation[i : i + 1]
        buffer.add(
            o,
            o2,
            action[i : i + 1],
            reward[i : i + 1],
            np.array([terminated[i] or truncated[i]]),
            [{"TimeLimit.truncated": bool(truncated[i] and not terminated[i])}],
        )
    return len(dataset)


# ========================================================================================== training set
class _TrainingSet:
    """Observations and regression targets from several sources, with integer sample weights.

    Looks like a :class:`~loopsim.datasets.TransitionDataset` to :class:`~loopsim.policies.BCTrainer`:
    ``len``, ``get_batch(indices) -> {"observation", "target"}`` and ``arrays`` (for normalisation).
    A transition with weight ``w`` appears ``w`` times (weight 0: left out).
    """

    def __init__(self, parts: Sequence[tuple[Any, str, np.ndarray]]) -> None:
        obs_rows: dict[str, list[np.ndarray]] = {}
        targets: list[np.ndarray] = []
        for dataset, target_key, weights in parts:
            keep = np.repeat(np.arange(len(dataset)), np.asarray(weights, dtype=np.int64))
            if len(keep) == 0:
                continue
            t = np.arange(len(dataset))
            rows = t + dataset._step_episode[t]  # observation row of each transition
            for key, arr in dataset.arrays.items():
                if key == "observation" or key.startswith("observation/"):
                    obs_rows.setdefault(key, []).append(arr[rows][keep])
            targets.append(np.asarray(dataset.arrays[target_key], dtype=np.float32)[keep])
        if not targets:
            raise ValueError("the training set is empty")
        self.arrays = {k: np.concatenate(v) for k, v in obs_rows.items()}
        self.target = np.concatenate(targets)

    def __len__(self) -> int:
        return len(self.target)

    def get_batch(self, indices: Any) -> dict[str, Any]:
        idx = np.asarray(indices, dtype=np.int64)
        if "observation" in self.arrays:
            obs: Any = torch.from_numpy(self.arrays["observation"][idx])
        else:
            obs = {k.split("/", 1)[1]: torch.from_numpy(v[idx]) for k, v in self.arrays.items()}
        return {"observation": obs, "target": torch.from_numpy(self.target[idx])}


# =============================================================================================== run
def _atomic_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2))


def _disk_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


METRICS_FIELDS = [
    "iteration",
    "site",
    "arm",
    "episodes",
    "success_rate",
    "success_low",
    "success_high",
    "mean_return",
    "return_low",
    "return_high",
    "operational_episodes",
    "operational_transitions",
    "deploy_success_rate",
    "intervention_rate",
    "expert_actions",
    "return_on_expert_effort",
    "deploy_s",
    "refine_s",
    "evaluate_s",
    "data_bytes",
]


class LoopRun:
    """One replicate of a loop run in its directory (see the module docstring).

    Args:
        config: The resolved config.
        path: The run directory.
        replicate: Replicate index (shifts demo and deploy seeds; 0 for a single run).
        progress: Called as ``progress(phase_description, done, total)`` while episodes run.
        log: Called with one line of text when a phase finishes (what it did, how it went).
    """

    def __init__(
        self,
        config: LoopConfig,
        path: str | os.PathLike,
        replicate: int = 0,
        progress: Callable[[str, int, int], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.path = Path(path)
        self.replicate = int(replicate)
        self.progress = progress or (lambda *_: None)
        self.log = log or (lambda _line: None)
        if not 0 <= self.replicate <= MAX_REPLICATE:
            raise ValueError(f"replicate={replicate} must be in 0..{MAX_REPLICATE}")
        self.seed_offset = REPLICATE_STRIDE * self.replicate
        self.demos_path = self.path / "demos.zarr"
        self.operational_path = self.path / "operational.zarr"

    # ------------------------------------------------------------------------------------- helpers
    def iteration_dir(self, k: int) -> Path:
        """``iterations/<k:03d>``."""
        return self.path / "iterations" / f"{k:03d}"

    def _timing(self, k: int) -> dict[str, float]:
        f = self.iteration_dir(k) / "timing.json"
        return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}

    def _record_data_size(self, k: int) -> None:
        """Bytes on disk of the demos and operational stores when iteration ``k`` gathered its data."""
        self.iteration_dir(k).mkdir(parents=True, exist_ok=True)
        timing = self._timing(k)
        timing["data_bytes"] = _disk_bytes(self.operational_path) + _disk_bytes(self.demos_path)
        _atomic_json(self.iteration_dir(k) / "timing.json", timing)

    def _record_time(self, k: int, phase: str, seconds: float) -> None:
        self.iteration_dir(k).mkdir(parents=True, exist_ok=True)
        timing = self._timing(k)
        timing[phase] = timing.get(phase, 0.0) + seconds
        _atomic_json(self.iteration_dir(k) / "timing.json", timing)

    def start(self, resume_ok: bool = True) -> None:
        """Create the run directory (writing ``config.yaml``) or check it holds this config.

        The replicate index is recorded in ``replicate.json`` (its seeds differ from other replicates'):
        continuing replicate ``r``'s folder as another replicate (``--run-dir <dir>/seed_1`` without
        ``--seeds``) would mix two replicates' episodes in one run.

        Raises:
            ConfigError: If the directory holds a run of a different config, or another replicate.
        """
        config_file = self.path / "config.yaml"
        text = dump_config(self.config)
        if config_file.exists():
            saved = yaml.safe_load(config_file.read_text(encoding="utf-8"))
            changes = config_changes(saved, yaml.safe_load(text))
            if changes:
                raise ConfigError(
                    f"{self.path} holds a loop run of another config ({'; '.join(changes)}); continue it "
                    "with its config, or give another --run-dir (or run_dir=...) for this one"
                )
            marker = self.path / REPLICATE_FILE
            if marker.is_file():  # runs written before the marker existed are not checked
                theirs = int(json.loads(marker.read_text(encoding="utf-8"))["replicate"])
                if theirs != self.replicate:
                    how = (f"run it with --seeds {theirs} --run-dir {self.path.parent}" if theirs
                           else f"run it without --seeds, with --run-dir {self.path}")
                    raise ConfigError(
                        f"{self.path} holds replicate {theirs} of this loop, not replicate {self.replicate} "
                        f"(other demonstration and deployment seeds); {how}"
                    )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(config_file, text)
        _atomic_json(self.path / REPLICATE_FILE, {"replicate": self.replicate})

    # -------------------------------------------------------------------------------------- phases
    def _demos(self) -> None:
        from loopsim.config import CollectConfig
        from loopsim.datasets import EpisodeStore
        from loopsim.rollout import collect

        cfg = self.config
        if self.demos_path.exists():
            try:
                with EpisodeStore.open(self.demos_path) as s:
                    if len(s) == cfg.demos.episodes:
                        self.log(f"iteration 0: {len(s)} expert demonstrations kept from before")
                        return
            except Exception:  # noqa: BLE001 - an unusable partial store is simply redone
                pass
        start = time.perf_counter()
        done = 0

        def tick(_r: Any) -> None:
            nonlocal done
            done += 1
            self.progress("expert demos", done, cfg.demos.episodes)

        collect(
            CollectConfig(
                seed=cfg.demos.seed + self.seed_offset,
                env=cfg.env.model_copy(update={"site": cfg.demos.site}),
                policy=ExpertPolicyConfig(noise_std=cfg.demos.noise_std),
                episodes=cfg.demos.episodes,
                workers=cfg.loop.workers,
                store=str(self.demos_path),
                mode="overwrite",
                expert_labels=True,
                policy_id="expert",
                iteration=0,
            ),
            on_episode=tick,
        )
        self._record_time(0, "deploy", time.perf_counter() - start)
        self._record_data_size(0)
        self.log(
            f"iteration 0: {cfg.demos.episodes} expert demonstrations at {cfg.demos.site} in "
            f"{time.perf_counter() - start:.0f} s"
        )

    def _deploy_tasks(self, k: int) -> list[tuple[str, int]]:
        base = DEPLOY_SEED + self.seed_offset + 10_000 * k
        return [
            (site, base + i)
            for site in self.config.loop.deploy_sites
            for i in range(self.config.loop.episodes)
        ]

    def _deploy(self, k: int) -> None:
        """Deploy the policy of iteration ``k - 1``; skip the episodes the store already holds."""
        from loopsim.datasets import EpisodeStore
        from loopsim.rollout import run_episodes

        cfg = self.config
        rl = isinstance(cfg.strategy, RLFinetuneStrategy)
        extras = ["is_success"] if rl else ["is_success", "expert_action"]
        intervention = None
        if isinstance(cfg.strategy, InterventionStrategy):
            extras.append("intervention")
            intervention = {
                "threshold": cfg.strategy.threshold,
                "takeover_steps": cfg.strategy.takeover_steps,
            }
        try:
            store = EpisodeStore.open(self.operational_path, mode="a")
        except FileNotFoundError:  # none yet, or only what a create killed midway left (create replaces it)
            probe = cfg.env.make(site=cfg.loop.deploy_sites[0])
            store = EpisodeStore.create(
                self.operational_path,
                observation_space=probe.observation_space,
                action_space=probe.action_space,
                env_id=cfg.env.id,
                env_kwargs=cfg.env.kwargs,
                step_extras=extras,
            )
            probe.close()
        with store:
            meta = store.metadata()
            have = {
                (str(s), int(seed))
                for s, seed, it in zip(meta["site"], meta["seed"], meta["iteration"], strict=True)
                if int(it) == k
            }
            tasks = [t for t in self._deploy_tasks(k) if t not in have]
            total = len(self._deploy_tasks(k))
            if not tasks:
                self.log(f"iteration {k}: {total} deployed episodes kept from before")
                return
            start = time.perf_counter()
            done = total - len(tasks)
            if done:
                self.log(f"iteration {k}: {done} of {total} deployed episodes kept from before; "
                         f"deploying the other {len(tasks)}")
            checkpoint = self.iteration_dir(k - 1) / "checkpoint"
            successes = 0
            for _result, episode in run_episodes(
                str(checkpoint),
                cfg.env,
                tasks,
                workers=cfg.loop.workers,
                deterministic=not (rl and cfg.strategy.explore),
                record=extras,
                policy_id=f"loop-{cfg.strategy.type}",
                policy_version=f"iteration-{k - 1}",
                iteration=k,
                tags={"replicate": self.replicate},
                intervention=intervention,
            ):
                store.add_episode(episode)
                successes += int(_result.success)
                done += 1
                self.progress(f"iteration {k}: deploy", done, total)
        self._record_time(k, "deploy", time.perf_counter() - start)
        self._record_data_size(k)
        self.log(
            f"iteration {k}: deployed {len(tasks)} episodes at {', '.join(cfg.loop.deploy_sites)} "
            f"({successes}/{len(tasks)} successful) in {time.perf_counter() - start:.0f} s"
        )

    def _training_set(self, k: int) -> tuple[_TrainingSet, dict[str, Any]]:
        from loopsim.datasets import EpisodeStore
        from loopsim.datasets.sampling import TransitionDataset

        cfg = self.config
        parts = []
        info: dict[str, Any] = {"strategy": cfg.strategy.type}
        with EpisodeStore.open(self.demos_path) as demos:
            ds = TransitionDataset(demos, keys=["observation", "expert_action"])
            parts.append((ds, "expert_action", np.ones(len(ds), dtype=np.int64)))
            info["demo_episodes"] = len(demos)
            info["demo_transitions"] = len(ds)
        expert_actions = len(ds)  # every demonstrated step is an expert action
        if k > 0:
            with EpisodeStore.open(self.operational_path) as op:
                meta = op.metadata()
                chosen = np.flatnonzero(meta["iteration"] <= k)
                strategy = cfg.strategy
                keys = ["observation", "action", "expert_action"] + (
                    ["intervention"] if isinstance(strategy, InterventionStrategy) else []
                )
                ds = TransitionDataset(op, keys=keys, episodes=chosen)
                step_ep = ds.episodes[ds._step_episode]
                success = meta["success"][step_ep].astype(bool)
                if isinstance(strategy, BCAllStrategy):
                    parts.append((ds, "action", np.ones(len(ds), dtype=np.int64)))
                elif isinstance(strategy, FilteredBCStrategy):
                    parts.append((ds, "action", success.astype(np.int64)))
                elif isinstance(strategy, DAggerStrategy):
                    parts.append((ds, "expert_action", np.ones(len(ds), dtype=np.int64)))
                    expert_actions += len(ds)  # every visited state was labelled by the expert
                else:
                    inter = ds.arrays["intervention"].astype(bool)
                    weights = np.where(inter, strategy.weight, np.where(success, 1, 0)).astype(np.int64)
                    parts.append((ds, "action", weights))
                    expert_actions += int(inter.sum())
                info["operational_episodes"] = len(chosen)
                info["operational_transitions"] = len(ds)
        info["expert_actions"] = int(expert_actions)
        training = _TrainingSet(parts)
        info["training_samples"] = len(training)
        return training, info

    def _refine(self, k: int) -> None:
        """Fit the policy of iteration ``k`` (from scratch) and save its checkpoint."""
        from loopsim.policies.bc import BCPolicy, BCTrainer

        out = self.iteration_dir(k) / "checkpoint"
        if (out / "policy.json").exists() and (self.iteration_dir(k) / "refine.json").exists():
            self.log(f"iteration {k}: policy kept from before ({out})")
            return
        cfg = self.config
        if isinstance(cfg.strategy, RLFinetuneStrategy):
            self._refine_rl(k)
            return
        start = time.perf_counter()
        training, info = self._training_set(k)
        seed = cfg.seed + 7919 * self.replicate + k
        torch.manual_seed(seed)
        probe = cfg.env.make(site=cfg.demos.site)
        policy = BCPolicy(
            probe.observation_space,
            probe.action_space,
            cfg.policy.hidden_sizes,
            cfg.policy.activation,
            cfg.policy.cnn_channels,
        )
        probe.close()
        policy.fit_normalization(
            {k2.split("/", 1)[1]: v for k2, v in training.arrays.items()}
            if "observation" not in training.arrays
            else training.arrays["observation"]
        )
        trainer = BCTrainer(
            policy,
            training,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            generator=torch.Generator().manual_seed(seed),
            action_key="target",
            max_grad_norm=cfg.train.max_grad_norm,
        )
        losses = []
        # One torch thread: the network is small, and on a busy 2-core machine two threads fight the
        # simulation workers (measured here: 5 epochs of 3.8k transitions, 2.0 s with one thread, 25.7 s
        # with two under load). It also makes the result independent of the core count.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for epoch in range(cfg.train.epochs):
                losses.append(trainer.train_epoch().loss)
                self.progress(f"iteration {k}: {'train (bc)' if k == 0 else f'refine ({cfg.strategy.type})'}",
                              epoch + 1, cfg.train.epochs)
        finally:
            torch.set_num_threads(threads)
        policy.config = cfg.model_dump(mode="json")
        policy.provenance = {
            "loop_iteration": k,
            "replicate": self.replicate,
            **info,
            "stores": [str(self.demos_path)] + ([str(self.operational_path)] if k else []),
        }
        self.iteration_dir(k).mkdir(parents=True, exist_ok=True)
        policy.save(out)
        _atomic_json(
            self.iteration_dir(k) / "refine.json",
            {
                **info,
                "epochs": cfg.train.epochs,
                "final_loss": losses[-1],
                "losses": losses,
                "seconds": time.perf_counter() - start,
            },
        )
        self._record_time(k, "refine", time.perf_counter() - start)
        what = (
            "trained (behaviour cloning on the demonstrations)" if k == 0
            else f"refined ({cfg.strategy.type})"
        )
        self.log(
            f"iteration {k}: {what} on {info['training_samples']} samples, "
            f"{cfg.train.epochs} epochs, final loss {losses[-1]:.4f}, in {time.perf_counter() - start:.0f} s"
        )

    def _refine_rl(self, k: int) -> None:
        """``rl_finetune``: iteration 0 copies ``strategy.checkpoint``; later ones continue its algorithm."""
        from loopsim.datasets import EpisodeStore
        from loopsim.datasets.sampling import TransitionDataset
        from loopsim.policies import SB3Policy, load_policy
        from loopsim.policies.sb3 import policy_kwargs_from_json, sb3_algorithms

        cfg = self.config
        strategy = cfg.strategy
        out = self.iteration_dir(k) / "checkpoint"
        start = time.perf_counter()
        source = strategy.checkpoint if k == 0 else self.iteration_dir(k - 1) / "checkpoint"
        previous = load_policy(source)
        assert isinstance(previous, SB3Policy)
        info: dict[str, Any] = {"strategy": strategy.type, "expert_actions": 0, "training_samples": 0}
        losses: dict[str, float] = {}
        seed = cfg.seed + 7919 * self.replicate + k
        if k == 0:
            policy = previous
        else:
            from stable_baselines3.common.logger import Logger
            from stable_baselines3.common.vec_env import DummyVecEnv

            algo_cls = sb3_algorithms()[previous.algo]
            kwargs: dict[str, Any] = {
                "learning_rate": strategy.learning_rate,
                "batch_size": strategy.batch_size,
                "gamma": strategy.gamma,
                "tau": strategy.tau,
                "learning_starts": 0,
                "seed": seed,
                "device": "cpu",
            }
            if "ent_coef" in inspect.signature(algo_cls.__init__).parameters:
                kwargs["ent_coef"] = strategy.ent_coef
            with EpisodeStore.open(self.operational_path) as op:
                meta = op.metadata()
                chosen = np.flatnonzero(meta["iteration"] <= k)
                dataset = TransitionDataset(op, episodes=chosen)
            site = cfg.loop.deploy_sites[0]
            # Global RNG state (SB3 seeds NumPy/torch/random globally; its buffer samples from NumPy's
            # global generator): saved and restored, so refining leaves the caller's state alone.
            np_state, torch_state = np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as BC refines: small networks, busy simulation workers
            venv = DummyVecEnv([lambda: cfg.env.make(site=site)])
            try:
                model = algo_cls(
                    previous.policy_name,
                    venv,
                    buffer_size=max(len(dataset), 1),
                    policy_kwargs=dict(policy_kwargs_from_json(previous.policy_kwargs)),
                    **kwargs,
                )
                model.policy.load_state_dict(previous.policy.state_dict(), strict=True)
                # An in-memory logger (losses read back below): SB3's configure() would make an empty
                # SB3-<date> folder in the temp directory at every refine.
                model.set_logger(Logger(folder=None, output_formats=[]))
                added = _replay_buffer(model, dataset, previous.normalizer)
                model.policy.set_training_mode(True)
                model.train(gradient_steps=strategy.gradient_steps, batch_size=strategy.batch_size)
                losses = {
                    k2.removeprefix("train/"): float(v)
                    for k2, v in model.logger.name_to_value.items()
                    if k2.startswith("train/") and np.isscalar(v)
                }
                policy = SB3Policy.from_model(
                    model, vec_normalize=False, observation_space=previous.observation_space
                )
                policy.normalizer = previous.normalizer
            finally:
                venv.close()
                torch.set_num_threads(threads)
                np.random.set_state(np_state)  # noqa: NPY002
                torch.set_rng_state(torch_state)
            info.update(
                operational_episodes=len(chosen),
                operational_transitions=added,
                training_samples=added,
                gradient_steps=strategy.gradient_steps,
            )
        policy.config = cfg.model_dump(mode="json")
        policy.provenance = {
            "loop_iteration": k,
            "replicate": self.replicate,
            **info,
            "initial_checkpoint": str(strategy.checkpoint),
            "stores": [str(self.operational_path)] if k else [],
        }
        self.iteration_dir(k).mkdir(parents=True, exist_ok=True)
        policy.save(out)
        _atomic_json(
            self.iteration_dir(k) / "refine.json",
            {**info, "losses": losses, "seconds": time.perf_counter() - start},
        )
        self._record_time(k, "refine", time.perf_counter() - start)
        if k == 0:
            self.log(f"iteration 0: first policy {previous.algo} from {strategy.checkpoint}")
        else:
            self.log(
                f"iteration {k}: refined (rl_finetune, {previous.algo}) with {strategy.gradient_steps} "
                f"gradient steps on {info['training_samples']} operational transitions in "
                f"{time.perf_counter() - start:.0f} s"
            )

    def _evaluate(self, k: int) -> None:
        from loopsim.rollout import evaluate_policy

        out = self.iteration_dir(k) / "eval.json"
        if out.exists():
            self.log(f"iteration {k}: evaluation kept from before")
            return
        cfg = self.config
        start = time.perf_counter()
        sites = cfg.eval_sites
        total = cfg.eval.episodes * len(sites)
        done = 0

        def tick(_r: Any) -> None:
            nonlocal done
            done += 1
            self.progress(f"iteration {k}: evaluate", done, total)

        results = evaluate_policy(
            str(self.iteration_dir(k) / "checkpoint"),
            cfg.env,
            sites=sites,
            episodes=cfg.eval.episodes,
            seed=cfg.eval.seed,
            workers=cfg.eval.workers,
            on_episode=tick,
        )
        _atomic_json(out, {site: r.as_dict() for site, r in results.items()})
        self._record_time(k, "evaluate", time.perf_counter() - start)
        parts = [
            f"{site} {r.success_rate:.0%} [{r.success_ci[0]:.0%}, {r.success_ci[1]:.0%}]"
            for site, r in results.items()
        ]
        self.log(f"iteration {k}: evaluated on {cfg.eval.episodes} held-out seeds: {', '.join(parts)}")

    # ------------------------------------------------------------------------------------- the loop
    def run(self) -> list[dict[str, Any]]:
        """Run (or resume) every phase, then write ``metrics.csv`` and the plots.

        Returns:
            The metrics rows (see :data:`METRICS_FIELDS`).
        """
        self.start()
        if not isinstance(self.config.strategy, RLFinetuneStrategy):
            self._demos()
        if "data_bytes" not in self._timing(0):  # a kill right after the phase: measure now
            self._record_data_size(0)
        self._refine(0)
        self._evaluate(0)
        for k in range(1, self.config.loop.iterations + 1):
            self._deploy(k)
            if "data_bytes" not in self._timing(k):
                self._record_data_size(k)
            self._refine(k)
            self._evaluate(k)
        rows = self.metrics()
        self._write_metrics(rows)
        plot_run(self.path, rows)
        return rows

    def metrics(self) -> list[dict[str, Any]]:
        """One row per (iteration, evaluated site, arm); arm ``baseline`` is the iteration-0 policy."""
        from loopsim.datasets import EpisodeStore

        cfg = self.config
        op_meta: dict[str, np.ndarray] = {}
        if self.operational_path.exists():
            with EpisodeStore.open(self.operational_path) as op:
                op_meta = op.metadata()
        base_eval = json.loads((self.iteration_dir(0) / "eval.json").read_text(encoding="utf-8"))
        rows = []
        for k in range(cfg.loop.iterations + 1):
            evals = json.loads((self.iteration_dir(k) / "eval.json").read_text(encoding="utf-8"))
            refine = json.loads((self.iteration_dir(k) / "refine.json").read_text(encoding="utf-8"))
            timing = self._timing(k)
            if op_meta:
                upto = op_meta["iteration"] <= k
                this = op_meta["iteration"] == k
                n_ops = int(upto.sum())
                n_steps = int(op_meta["length"][upto].sum())
                deploy_sr = float(op_meta["success"][this].mean()) if this.any() else float("nan")
                inter = int(op_meta["interventions"][this].sum()) if this.any() else 0
                steps = int(op_meta["length"][this].sum()) if this.any() else 0
                inter_rate = inter / steps if steps else float("nan")
            else:
                n_ops = n_steps = 0
                deploy_sr = inter_rate = float("nan")
            expert_actions = int(refine["expert_actions"])
            for site, res in evals.items():
                gain = res["success_rate"] - base_eval[site]["success_rate"]
                common = {
                    "iteration": k,
                    "site": site,
                    "episodes": res["episodes"],
                    "operational_episodes": n_ops,
                    "operational_transitions": n_steps,
                    "deploy_success_rate": deploy_sr,
                    "intervention_rate": inter_rate,
                    "expert_actions": expert_actions,
                    # Percentage points of success gained over the no-refine baseline per 1000 expert actions.
                    "return_on_expert_effort": 100 * gain / (expert_actions / 1000)
                    if expert_actions
                    else float("nan"),  # no expert effort spent (rl_finetune): undefined, not 0
                    "deploy_s": timing.get("deploy", 0.0),
                    "refine_s": timing.get("refine", 0.0),
                    "evaluate_s": timing.get("evaluate", 0.0),
                    "data_bytes": int(timing.get("data_bytes", 0)),
                }
                for arm, r in (("loop", res), ("baseline", base_eval[site])):
                    rows.append(
                        {
                            **common,
                            "arm": arm,
                            "success_rate": r["success_rate"],
                            "success_low": r["success_ci"][0],
                            "success_high": r["success_ci"][1],
                            "mean_return": r["mean_return"],
                            "return_low": r["return_ci"][0],
                            "return_high": r["return_ci"][1],
                        }
                    )
        return rows

    def _write_metrics(self, rows: list[dict[str, Any]]) -> None:
        with atomic_open(self.path / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRICS_FIELDS)
            w.writeheader()
            w.writerows(rows)


# ============================================================================================== plots
def plot_run(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Write the loop's PNG plots into ``<path>/plots``.

    - ``success.png``: success at each deployment site vs operational episodes gathered, with the
      95% interval band, beside the no-refine baseline (its band too);
    - ``lab.png``: success at ``lab`` over the iterations (forgetting);
    - ``failure_modes.png``: failure counts per iteration at the deployment sites (stacked bars).

    Returns:
        The written files.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    out = path / "plots"
    out.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    deploy_sites = config["loop"]["deploy_sites"]
    written = []

    def series(site: str, arm: str) -> tuple[np.ndarray, ...]:
        sel = [r for r in rows if r["site"] == site and r["arm"] == arm]
        return tuple(
            np.array([float(r[k]) for r in sel])
            for k in ("operational_episodes", "success_rate", "success_low", "success_high", "iteration")
        )

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for i, site in enumerate(deploy_sites):
        color = f"C{i}"
        x, y, lo, hi, _ = series(site, "loop")
        ax.plot(x, y, "o-", color=color, label=f"{config['strategy']['type']} @ {site}")
        ax.fill_between(x, lo, hi, color=color, alpha=0.2)
        _, by, blo, bhi, _ = series(site, "baseline")
        ax.plot(x, by, "--", color=color, alpha=0.8, label=f"no-refine baseline @ {site}")
        ax.fill_between(x, blo, bhi, color=color, alpha=0.08)
    ax.set_xlabel("operational episodes gathered")
    ax.set_ylabel("success rate (95% CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{config['env']['id']}: success where deployed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "success.png")
    plt.close(fig)
    written.append(out / "success.png")

    if any(r["site"] == "lab" for r in rows):
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
        _, y, lo, hi, it = series("lab", "loop")
        ax.plot(it, y, "o-", color="C2", label="loop policy @ lab")
        ax.fill_between(it, lo, hi, color="C2", alpha=0.2)
        ax.set_xlabel("iteration")
        ax.set_ylabel("success rate at lab (95% CI)")
        ax.set_title("success at lab (forgetting)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "lab.png")
        plt.close(fig)
        written.append(out / "lab.png")

    counts: dict[int, dict[str, int]] = {}
    for k in sorted({int(r["iteration"]) for r in rows}):
        evals = json.loads((path / "iterations" / f"{k:03d}" / "eval.json").read_text(encoding="utf-8"))
        c: dict[str, int] = {}
        for site in deploy_sites:
            for mode, n in evals[site]["failure_modes"].items():
                c[mode] = c.get(mode, 0) + n
        counts[k] = c
    modes = sorted({m for c in counts.values() for m in c})
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    bottom = np.zeros(len(counts))
    its = np.array(sorted(counts))
    for j, mode in enumerate(modes):
        vals = np.array([counts[k].get(mode, 0) for k in its], dtype=float)
        ax.bar(its, vals, bottom=bottom, color=f"C{j}", label=mode)
        bottom += vals
    ax.set_xlabel("iteration")
    ax.set_ylabel("failed evaluation episodes")
    ax.set_title("failure modes at the deployment sites")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if modes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "failure_modes.png")
    plt.close(fig)
    written.append(out / "failure_modes.png")
    return written


def run_loop(
    config: LoopConfig,
    path: str | os.PathLike,
    seeds: Sequence[int] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a loop (or independent replicates of it) and aggregate.

    Args:
        config: The resolved config (checked first, before any work).
        path: The run directory; replicate ``r`` goes to ``<path>/seed_<r>`` when ``seeds`` is given.
        seeds: Replicate indices (``--seeds 0,1,2``); ``None`` runs one replicate in ``path`` itself.
        progress: See :class:`LoopRun`.
        log: See :class:`LoopRun`.

    Returns:
        ``{"runs": {replicate: metrics rows}, "aggregate": {...}}``; with several replicates the
        aggregate holds, per deployment site, the IQM of the final success over replicates and the
        probability that the loop's final policy beats the no-refine baseline (rliable, with 95%
        stratified-bootstrap intervals), also written to ``<path>/aggregate.json``.
    """
    check_loop_config(config)
    path = Path(path)
    _check_run_dir(path, replicates=seeds is not None)
    if seeds is not None:
        _check_replicates(config, path)
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as locks:
        _lock(locks, path)
        # Each replicate's folder is locked too: `--run-dir <dir>/seed_0` (a single run) at the same
        # time as `--seeds 0 --run-dir <dir>` would write into the same run.
        for r in seeds or []:
            (path / f"seed_{int(r)}").mkdir(exist_ok=True)
            _lock(locks, path / f"seed_{int(r)}")
        return _run_locked(config, path, seeds, progress, log)


def _lock(stack: contextlib.ExitStack, path: Path) -> None:
    """Hold ``path``'s lock file until ``stack`` closes; raise at once if another process holds it.

    Raises:
        ConfigError: If another ``loopsim loop`` holds the lock.
    """
    stack.callback(acquire_or_refuse(path, LOCK_NAME, "loopsim loop", "--run-dir", ConfigError).release)


def _run_locked(
    config: LoopConfig,
    path: Path,
    seeds: Sequence[int] | None,
    progress: Callable[[str, int, int], None] | None,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """The body of :func:`run_loop`, with the run directory's lock(s) held."""
    runs: dict[int, list[dict[str, Any]]] = {}
    if seeds is None:
        runs[0] = LoopRun(config, path, 0, progress, log).run()
        return {"runs": runs, "aggregate": {}}
    for r in seeds:
        rep_log = None if log is None else (lambda line, r=int(r): log(f"replicate {r}: {line}"))
        rep_progress = (
            None if progress is None
            else (lambda phase, done, total, r=int(r): progress(f"replicate {r}: {phase}", done, total))
        )
        runs[int(r)] = LoopRun(config, path / f"seed_{int(r)}", int(r), rep_progress, rep_log).run()
    runs = {**_finished_replicates(config, path), **runs}
    runs = dict(sorted(runs.items()))
    aggregate = aggregate_replicates(runs, config)
    _atomic_json(path / "aggregate.json", aggregate)
    return {"runs": runs, "aggregate": aggregate}


#: The replicate index of a run directory (``{"replicate": r}``), checked when it is continued.
REPLICATE_FILE = "replicate.json"

#: Name of the lock file a running ``loopsim loop`` holds in its run directory (filelock).
LOCK_NAME = ".loopsim-loop.lock"


def _check_run_dir(path: Path, replicates: bool) -> None:
    """Refuse a directory that is not (the start of) a loop run of the right kind, before any work.

    A run directory is new, empty, or holds what ``loopsim loop`` wrote there: ``config.yaml`` (one run)
    or ``seed_<r>/`` folders (``--seeds`` replicates). Anything else (a store, a training run, a folder
    of the user's files) is refused, so a loop never writes into, or deletes from, data it does not own.

    Raises:
        ConfigError: If ``path`` is a file, a directory of another kind, or a run of the other kind.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"run directory {path} is a file; give a new or empty directory")
    entries = sorted(e.name for e in path.iterdir() if e.name not in (LOCK_NAME, "config.yaml.tmp"))
    if not entries:
        return
    # A bench output or a training run also has a config.yaml: only a loop config's counts.
    single = _is_loop_config(path / "config.yaml")
    multi = any(
        e.is_dir() and re.fullmatch(r"seed_\d+", e.name)
        and (_is_loop_config(e / "config.yaml")
             or all(f.name in ("config.yaml.tmp", LOCK_NAME) for f in e.iterdir()))
        for e in path.iterdir()
    )  # a replicate killed before its config.yaml was written is empty
    if replicates and single:
        raise ConfigError(f"{path} holds a single loop run; give the --seeds run another --run-dir")
    if not replicates and multi:
        raise ConfigError(
            f"{path} holds replicates of a --seeds run; run them with --seeds again, or give another "
            "--run-dir"
        )
    if not (single or multi):
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ConfigError(
            f"{path} is not a loop run directory (no loop config.yaml or seed_<r>/ replicates; it holds "
            f"{shown}); "
            "give a new or empty --run-dir"
        )


#: Loop config keys that do not change a run's results: where its directory is, and how many worker
#: processes run its episodes (they come back in seed order, whatever the count). A run resumes, and
#: a replicate counts, whatever their values.
RESULT_NEUTRAL_KEYS = ("run_dir", "loop.workers", "eval.workers")


def config_changes(saved: Any, current: Any) -> list[str]:
    """How a loop config differs from a run's saved one, key by key, with both values.

    :func:`loopsim.training.config_changes`, leaving out :data:`RESULT_NEUTRAL_KEYS`.

    Args:
        saved: The run's ``config.yaml``, as loaded by YAML.
        current: This config, dumped and loaded the same way.

    Returns:
        One ``"key: <saved> in the run, <current> now"`` per differing key (sorted); empty if the
        two configs give the same results.
    """
    from loopsim.training import config_changes as changes

    return changes(saved, current, RESULT_NEUTRAL_KEYS)


def _check_replicates(config: LoopConfig, path: Path) -> None:
    """Refuse, before any work, a ``--seeds`` run directory holding replicates of another config.

    Its aggregate covers one config's replicates: a replicate of another config would be left out of
    it, and ``aggregate.json`` overwritten with fewer replicates than the directory holds.

    Raises:
        ConfigError: Naming the first replicate of another config and the keys that differ.
    """
    text = yaml.safe_load(dump_config(config))
    for rep in sorted(path.glob("seed_*")) if path.is_dir() else []:
        if not re.fullmatch(r"seed_\d+", rep.name) or not _is_loop_config(rep / "config.yaml"):
            continue
        saved = yaml.safe_load((rep / "config.yaml").read_text(encoding="utf-8"))
        changes = config_changes(saved, text)
        if changes:
            raise ConfigError(
                f"{path} holds replicates of another config ({rep.name}: {'; '.join(changes)}); its "
                "aggregate covers one config: give the same config and overrides, or another --run-dir"
            )


def _is_loop_config(path: Path) -> bool:
    """Whether ``path`` is a file holding a loop config (a mapping with ``env``, ``strategy``, ``loop``)."""
    if not path.is_file():
        return False
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and {"env", "strategy", "loop"} <= set(data)


def _finished_replicates(config: LoopConfig, path: Path) -> dict[int, list[dict[str, Any]]]:
    """Metrics of the finished replicates already in ``path`` (``seed_<r>/metrics.csv``) of this config.

    So re-running ``--seeds 3`` after ``--seeds 0,1,2`` aggregates all four replicates, not the last.
    A replicate folder of another config, or one not finished, is left out.
    """
    from loopsim.report import _read_metrics

    text = yaml.safe_load(dump_config(config))
    out: dict[int, list[dict[str, Any]]] = {}
    for rep in path.glob("seed_*"):
        name = rep.name.removeprefix("seed_")
        if not name.isdigit() or not (rep / "metrics.csv").is_file() or not (rep / "config.yaml").is_file():
            continue
        if config_changes(yaml.safe_load((rep / "config.yaml").read_text(encoding="utf-8")), text):
            continue
        out[int(name)] = _read_metrics(rep)
    return out


def aggregate_replicates(
    runs: Mapping[int, Sequence[Mapping[str, Any]]], config: LoopConfig
) -> dict[str, Any]:
    """IQM of final success and probability of improvement over the baseline, across replicates (rliable).

    Source: Agarwal et al. (2021), "Deep RL at the Edge of the Statistical Precipice" (IQM,
    probability of improvement, stratified bootstrap intervals); ``rliable.metrics``.
    """
    import warnings

    from rliable import library as rly
    from rliable import metrics

    last = config.loop.iterations
    out: dict[str, Any] = {}
    saved = np.random.get_state()  # noqa: NPY002 - rliable resamples from NumPy's global generator
    try:
        np.random.seed(config.seed)  # noqa: NPY002
        for site in config.loop.deploy_sites:

            def final(arm: str, rows: Sequence[Mapping[str, Any]], site: str = site) -> float:
                return next(
                    float(r["success_rate"])
                    for r in rows
                    if r["site"] == site and r["arm"] == arm and int(r["iteration"]) == last
                )

            loop_scores = np.array([[final("loop", rows)] for rows in runs.values()])
            base_scores = np.array([[final("baseline", rows)] for rows in runs.values()])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                point, ci = rly.get_interval_estimates(
                    {"loop": loop_scores, "baseline": base_scores},
                    lambda x: np.array([metrics.aggregate_iqm(x)]),
                    reps=2000,
                )
                poi_point, poi_ci = rly.get_interval_estimates(
                    {"loop_vs_baseline": (loop_scores, base_scores)},
                    metrics.probability_of_improvement,
                    reps=2000,
                )
            out[site] = {
                "replicates": len(runs),
                "iqm_success": {
                    arm: {"value": float(point[arm][0]), "ci": [float(v) for v in ci[arm][:, 0]]}
                    for arm in ("loop", "baseline")
                },
                "probability_of_improvement": {
                    "value": float(np.ravel(poi_point["loop_vs_baseline"])[0]),
                    "ci": [float(v) for v in np.ravel(poi_ci["loop_vs_baseline"])],
                },
                "final_success": {"loop": loop_scores[:, 0].tolist(), "baseline": base_scores[:, 0].tolist()},
            }
    finally:
        np.random.set_state(saved)  # noqa: NPY002
    return out
