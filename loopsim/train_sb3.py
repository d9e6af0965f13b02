"""``loopsim train`` for ``policy.type: sb3``: stable-baselines3 training runs with checkpoints and resume.

:func:`check_sb3_config` refuses a bad config before any work starts; :func:`train_sb3` trains into a
:class:`~loopsim.training.RunDir`:

- **Envs**: ``train.n_envs`` copies of ``env`` (``DummyVecEnv``, or ``SubprocVecEnv`` with
  ``train.subproc``), each in a ``Monitor`` (episode return, length and ``is_success``, which SB3 logs
  as ``rollout/success_rate``); sub-env ``i`` starts from seed ``seed + i``. With
  ``policy.normalize`` a ``VecNormalize`` normalises observations (not rewards). With
  ``train.failure_penalty`` a :class:`FailurePenalty` outside the ``Monitor`` penalises failed
  endings (training rewards only); an :class:`EpisodeLog` outermost records each episode's start
  and actions for the resume state.
- **Model**: ``policy.algo`` with ``policy.policy`` (``auto``: ``MultiInputPolicy`` for dict
  observations, ``CnnPolicy`` for images, else ``MlpPolicy``), ``policy.algo_kwargs``,
  ``policy.policy_kwargs`` (classes by allow-listed name, see :mod:`loopsim.policies.sb3`), a
  ``HerReplayBuffer`` with ``policy.her``; ``seed``; TensorBoard logs in ``tb/sb3_1``.
- **Evaluation** every ``eval.every`` env steps and at the end (:meth:`RunDir.evaluate`).
- **Checkpoints** every ``train.checkpoint_every`` env steps and at the end: the deployable
  :class:`~loopsim.policies.SB3Policy` in ``checkpoint/`` (JSON + safetensors, with the resolved
  config and provenance), and the private resume state in ``resume/`` (SB3's own files: ``model.zip``,
  ``replay_buffer.pkl`` for off-policy algorithms, ``vecnormalize.pkl``; ``state.json``; and
  ``rollout_state.pkl``: each training env's episode in progress and the random generators).

Resume state layout (written to a staging folder, then published by an atomic rename of the pointer
file ``LATEST``, so a kill at any instant leaves the previous state loadable)::

    resume/
        LATEST                 # name of the current state folder, e.g. "step-000020000"
        step-000020000/        # model.zip, replay_buffer.pkl, vecnormalize.pkl, state.json,
                               # rollout_state.pkl
                               # (".1", ".2"... appended when a step is saved again)
        .staging-*/            # a save in progress (or killed); removed by the next save

``train_sb3(..., resume=True)`` loads the model, its replay buffer and normalisation statistics,
replays each env's episode in progress into fresh envs (:class:`EpisodeLog`; the observation it
reaches must equal the one SB3 saved, bit for bit), restores the random generators and continues up
to ``train.total_timesteps`` with ``reset_num_timesteps=False``: the run ends exactly as an
uninterrupted one would (gSDE excepted: SB3 draws its exploration noise before the checkpoint).
Step counts, TensorBoard curves and ``evaluations.csv`` continue where the last saved state left
off. A state saved by an older loopsim, or whose episodes do not replay (with a ``RuntimeWarning``),
resumes with fresh episodes under generators reseeded from ``seed + num_timesteps``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from loopsim.config import (
    MAX_LEARNING_RATE,
    ConfigError,
    EnvConfig,
    SB3PolicyConfig,
    SB3TrainConfig,
    TrainConfig,
)

if TYPE_CHECKING:
    from loopsim.policies.sb3 import SB3Policy
    from loopsim.training import RunDir

__all__ = [
    "EpisodeLog",
    "FailurePenalty",
    "check_sb3_config",
    "load_resume_state",
    "resolve_policy_name",
    "save_resume_state",
    "train_sb3",
]

#: ``algo_kwargs`` that loopsim sets itself, and where to set them instead.
_RESERVED_ALGO_KWARGS = {
    "policy": "policy.policy",
    "env": "env",
    "seed": "seed",
    "tensorboard_log": "(the run directory's tb/)",
    "policy_kwargs": "policy.policy_kwargs",
    "replay_buffer_class": "policy.her",
    "replay_buffer_kwargs": "policy.her_kwargs",
    "_init_setup_model": "(internal)",
}
#: ``her_kwargs`` loopsim passes on to ``HerReplayBuffer``.
_HER_KWARGS = ("n_sampled_goal", "goal_selection_strategy", "copy_info_dict")
_GOAL_STRATEGIES = ("future", "final", "episode")
_NOISE_TYPES = ("normal", "ornstein_uhlenbeck")
_LATEST = "LATEST"
_STATE = "state.json"
_ROLLOUT = "rollout_state.pkl"


# ============================================================================================ checks
def _is_off_policy(algo_cls: type) -> bool:
    from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

    return issubclass(algo_cls, OffPolicyAlgorithm)


def resolve_policy_name(policy: str, observation_space: gym.Space) -> str:
    """The SB3 policy name for ``policy.policy`` (``auto`` resolved from the observation space).

    Args:
        policy: ``auto`` or an SB3 policy name.
        observation_space: The env's observation space.

    Returns:
        ``MultiInputPolicy`` for a ``Dict`` space, ``CnnPolicy`` for an image ``Box`` (uint8, 3-D),
        else ``MlpPolicy`` (for ``auto``); ``policy`` otherwise.
    """
    if policy != "auto":
        return policy
    from stable_baselines3.common.preprocessing import is_image_space

    if isinstance(observation_space, gym.spaces.Dict):
        return "MultiInputPolicy"
    if is_image_space(observation_space, check_channels=False):
        return "CnnPolicy"
    return "MlpPolicy"


def _accepted(fn: Any) -> set[str] | None:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params} - {"self"}


def _action_noise(spec: Any, action_space: gym.Space) -> Any:
    """``algo_kwargs.action_noise`` (``{type: normal | ornstein_uhlenbeck, sigma: float}``) as SB3 noise.

    Raises:
        ConfigError: If the spec is malformed.
    """
    from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise

    if spec is None:
        return None
    ok = (
        isinstance(spec, dict)
        and set(spec) == {"type", "sigma"}
        and spec["type"] in _NOISE_TYPES
        and isinstance(spec["sigma"], int | float)
        and not isinstance(spec["sigma"], bool)
        and spec["sigma"] >= 0
    )
    if not ok:
        raise ConfigError(
            f"policy.algo_kwargs.action_noise={spec!r} is not allowed; allowed: null or "
            f"{{type: {' | '.join(_NOISE_TYPES)}, sigma: number >= 0}} (std in action units)"
        )
    if not isinstance(action_space, gym.spaces.Box):
        raise ConfigError("policy.algo_kwargs.action_noise needs a Box action space")
    dim = int(np.prod(action_space.shape))
    cls = NormalActionNoise if spec["type"] == "normal" else OrnsteinUhlenbeckActionNoise
    return cls(mean=np.zeros(dim), sigma=float(spec["sigma"]) * np.ones(dim))


def _algo_kwargs(policy: SB3PolicyConfig, action_space: gym.Space | None) -> dict[str, Any]:
    """``policy.algo_kwargs`` as the algorithm takes them (lists to tuples, noise specs to objects)."""
    kwargs = dict(policy.algo_kwargs)
    if isinstance(kwargs.get("train_freq"), list):
        kwargs["train_freq"] = tuple(kwargs["train_freq"])
    if "action_noise" in kwargs and action_space is not None:
        kwargs["action_noise"] = _action_noise(kwargs["action_noise"], action_space)
    return kwargs


def check_sb3_config(config: TrainConfig) -> None:
    """Refuse an unusable ``sb3`` training config before any work starts.

    Checks that the algorithm exists; that ``policy.policy`` is one of its policies; that ``her`` is
    used only with an off-policy algorithm and ``obs_mode: goal`` (and ``her_kwargs`` only with
    ``her``); that every ``algo_kwargs`` key is accepted by the algorithm and not one loopsim sets
    itself; that ``policy_kwargs`` classes are allow-listed and its keys accepted by the policy
    class; that ``normalize`` is not used with image observations; that no number is NaN or
    infinite, well-known settings are in range (``gamma`` and ``tau`` in [0, 1], sizes >= 1...),
    ``batch_size`` fits the buffer (or rollout) and the replay buffer fits this machine's memory. Then
    the model is built once on
    stub envs with the env's spaces (no simulation, a tiny replay buffer), so that SB3 itself checks
    the values; a refusal is reported as a :class:`ConfigError`.

    Args:
        config: The resolved training config (``policy.type: sb3``).

    Raises:
        ConfigError: Naming the key, the value and what is allowed.
    """
    from loopsim.policies.sb3 import policy_kwargs_from_json, sb3_algorithms

    pol = config.policy
    if not isinstance(pol, SB3PolicyConfig) or not isinstance(config.train, SB3TrainConfig):
        raise ConfigError(f"policy.type={config.policy.type!r}: check_sb3_config needs policy.type: sb3")
    algos = sb3_algorithms()
    if pol.algo not in algos:
        raise ConfigError(f"policy.algo={pol.algo!r} is not an SB3 algorithm; allowed: {sorted(algos)}")
    algo_cls = algos[pol.algo]
    obs_mode = config.env.kwargs.get("obs_mode", "state")
    aliases = sorted(algo_cls.policy_aliases)
    if pol.policy != "auto" and pol.policy not in algo_cls.policy_aliases:
        raise ConfigError(
            f"policy.policy={pol.policy!r} is not a policy of {pol.algo}; allowed: {['auto', *aliases]}"
        )
    off_policy = _is_off_policy(algo_cls)
    if pol.her:
        if not off_policy:
            raise ConfigError(
                f"policy.her=true needs an off-policy algorithm (policy.algo is {pol.algo!r}); "
                f"allowed: {sorted(n for n, c in algos.items() if _is_off_policy(c))}"
            )
        if obs_mode != "goal":
            raise ConfigError(
                f"policy.her=true needs goal observations (env.kwargs.obs_mode is {obs_mode!r}); "
                "allowed: obs_mode: goal"
            )
    if pol.her_kwargs and not pol.her:
        raise ConfigError(f"policy.her_kwargs={pol.her_kwargs!r} is given but policy.her is false")
    for key, value in pol.her_kwargs.items():
        if key not in _HER_KWARGS:
            raise ConfigError(
                f"policy.her_kwargs.{key} is not a HerReplayBuffer setting; allowed: {list(_HER_KWARGS)}"
            )
        if key == "goal_selection_strategy" and value not in _GOAL_STRATEGIES:
            raise ConfigError(
                f"policy.her_kwargs.goal_selection_strategy={value!r}; allowed: {list(_GOAL_STRATEGIES)}"
            )
    if pol.normalize and obs_mode == "rgb":
        raise ConfigError(
            "policy.normalize=true with env.kwargs.obs_mode='rgb': image observations are "
            "not normalised (the CNN scales pixels itself); allowed: normalize: false"
        )
    accepted = _accepted(algo_cls.__init__)
    for key in pol.algo_kwargs:
        if key in _RESERVED_ALGO_KWARGS:
            raise ConfigError(f"policy.algo_kwargs.{key} is set by loopsim; use {_RESERVED_ALGO_KWARGS[key]}")
        if accepted is not None and key not in accepted:
            allowed = sorted(accepted - set(_RESERVED_ALGO_KWARGS))
            raise ConfigError(
                f"policy.algo_kwargs.{key}={pol.algo_kwargs[key]!r} is not a setting of "
                f"{pol.algo}; allowed: {allowed}"
            )
    _check_value_types(pol.algo, algo_cls, pol.algo_kwargs)
    _check_value_ranges(pol, config.train.n_envs, off_policy)
    device = pol.algo_kwargs.get("device", "auto")
    cuda = isinstance(device, str) and re.fullmatch(r"cuda(:\d+)?", device) is not None
    if device not in ("cpu", "auto") and not cuda:
        raise ConfigError(f"policy.algo_kwargs.device={device!r}; allowed: cpu, auto, cuda, cuda:<index>")
    if isinstance(device, str) and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # SB3 trained on the CPU without a word (BC refuses it too)
            raise ConfigError(
                f"policy.algo_kwargs.device={device!r}: this machine has no CUDA device; allowed: cpu, auto"
            )
    freq = pol.algo_kwargs.get("train_freq")
    if isinstance(freq, list) and freq[1:] == ["episode"] and config.train.n_envs > 1:
        raise ConfigError(  # SB3 asserts it when training starts, after the run directory exists
            f"policy.algo_kwargs.train_freq={freq!r} trains per episode, which SB3 allows with one env "
            f"only (train.n_envs is {config.train.n_envs}); allowed: train.n_envs: 1, or train_freq in steps"
        )
    try:
        policy_kwargs = policy_kwargs_from_json(pol.policy_kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("policy_kwargs.", "policy.policy_kwargs.", 1)) from None
    if "action_noise" in pol.algo_kwargs:
        _action_noise(pol.algo_kwargs["action_noise"], gym.spaces.Box(-1.0, 1.0, (1,), np.float32))
    _dry_build(config, algo_cls, policy_kwargs)


#: Allowed ranges of well-known SB3 settings (any algorithm that has the key): ``(low, low
#: inclusive, high, high inclusive)``. SB3 checks few of them itself, and some only when training
#: starts: gamma 7 and buffer_size -5 "trained", a buffer of 10**11 failed at the first allocation.
_RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "learning_rate": (0.0, False, MAX_LEARNING_RATE, True),  # float32, as torch keeps it
    "buffer_size": (1, True, float("inf"), False),
    "learning_starts": (0, True, float("inf"), False),
    "batch_size": (1, True, float("inf"), False),
    "tau": (0.0, True, 1.0, True),
    "gamma": (0.0, True, 1.0, True),
    "gae_lambda": (0.0, True, 1.0, True),
    "gradient_steps": (-1, True, float("inf"), False),
    "n_steps": (1, True, float("inf"), False),
    "n_epochs": (1, True, float("inf"), False),
    "target_update_interval": (1, True, float("inf"), False),
    "policy_delay": (1, True, float("inf"), False),
    "sde_sample_freq": (-1, True, float("inf"), False),
    "stats_window_size": (1, True, float("inf"), False),
    "clip_range": (0.0, False, float("inf"), False),
    "ent_coef": (0.0, True, float("inf"), False),
    "vf_coef": (0.0, True, float("inf"), False),
    "max_grad_norm": (0.0, False, float("inf"), False),
    "target_kl": (0.0, False, float("inf"), False),
    "target_policy_noise": (0.0, True, float("inf"), False),
    "target_noise_clip": (0.0, True, float("inf"), False),
    "exploration_fraction": (0.0, True, 1.0, True),
    "exploration_initial_eps": (0.0, True, 1.0, True),
    "exploration_final_eps": (0.0, True, 1.0, True),
    "rms_prop_eps": (0.0, False, float("inf"), False),
}


def _range_text(low: float, low_in: bool, high: float, high_in: bool) -> str:
    if high == float("inf"):
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _non_finite(value: Any, where: str) -> str | None:
    """The key path of the first NaN or infinite number inside ``value`` (lists and mappings too)."""
    if isinstance(value, float) and not np.isfinite(value):
        return where
    if isinstance(value, dict):
        return next((w for k, v in value.items() if (w := _non_finite(v, f"{where}.{k}"))), None)
    if isinstance(value, list | tuple):
        return next((w for i, v in enumerate(value) if (w := _non_finite(v, f"{where}[{i}]"))), None)
    return None


def _check_value_ranges(pol: SB3PolicyConfig, n_envs: int, off_policy: bool) -> None:
    """Refuse NaN or infinite numbers anywhere in the SB3 settings, and values outside :data:`_RANGES`.

    A NaN ``gamma`` trained until the first checkpoint, whose metadata refused it, and the run could
    never resume (NaN differs from itself, so the config "differed").
    """
    for name in ("algo_kwargs", "her_kwargs", "policy_kwargs"):
        where = _non_finite(getattr(pol, name), f"policy.{name}")
        if where is not None:
            raise ConfigError(f"{where} is not a finite number; allowed: finite numbers")
    for key, value in pol.algo_kwargs.items():
        if key not in _RANGES or isinstance(value, bool) or not isinstance(value, int | float):
            continue  # the wrong kind is _check_value_types' to refuse; "auto" ent_coef passes
        low, low_in, high, high_in = _RANGES[key]
        ok = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
        if not ok:
            raise ConfigError(
                f"policy.algo_kwargs.{key}={value!r} is out of range; allowed: "
                f"{_range_text(low, low_in, high, high_in)}"
            )
    batch = pol.algo_kwargs.get("batch_size")
    if isinstance(batch, int) and not isinstance(batch, bool):
        if off_policy and isinstance(pol.algo_kwargs.get("buffer_size"), int):
            limit, what = pol.algo_kwargs["buffer_size"], "policy.algo_kwargs.buffer_size"
        elif not off_policy and isinstance(pol.algo_kwargs.get("n_steps"), int):
            limit = pol.algo_kwargs["n_steps"] * n_envs
            what = "policy.algo_kwargs.n_steps x train.n_envs (one rollout)"
        else:
            limit = None
        if limit is not None and batch > limit:
            raise ConfigError(f"policy.algo_kwargs.batch_size={batch} is larger than {what} ({limit}); "
                              f"allowed: <= {limit}")
    n_goal = pol.her_kwargs.get("n_sampled_goal")
    if n_goal is not None and (isinstance(n_goal, bool) or not isinstance(n_goal, int) or n_goal < 0):
        raise ConfigError(f"policy.her_kwargs.n_sampled_goal={n_goal!r}; allowed: an integer >= 0")


def _space_bytes(space: gym.Space) -> int:
    """Bytes of one sample of ``space`` as SB3's buffers store it."""
    if isinstance(space, gym.spaces.Dict):
        return sum(_space_bytes(s) for s in space.spaces.values())
    shape = space.shape or (1,)
    return int(np.prod(shape)) * np.dtype(space.dtype or np.float32).itemsize


def _check_buffer_memory(pol: SB3PolicyConfig, obs_space: gym.Space, act_space: gym.Space) -> None:
    """Refuse a replay buffer larger than this machine's memory (SB3 allocates it whole, up front).

    Per transition SB3 stores the observation, the next observation (unless
    ``optimize_memory_usage``), the action (float32 for Box spaces) and three float32 scalars.
    """
    size = pol.algo_kwargs.get("buffer_size", 1_000_000)
    if isinstance(size, bool) or not isinstance(size, int):
        return
    obs = _space_bytes(obs_space)
    per = obs * (1 if pol.algo_kwargs.get("optimize_memory_usage") else 2) + _space_bytes(act_space) + 12
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        return
    if size * per > memory:
        raise ConfigError(
            f"policy.algo_kwargs.buffer_size={size} needs about {size * per / 2**30:.3g} GiB for this "
            f"env's transitions ({per} bytes each) and this machine has {memory / 2**30:.3g} GiB; "
            f"allowed: <= {memory // per}"
        )


def _check_value_types(algo: str, algo_cls: type, algo_kwargs: dict[str, Any]) -> None:
    """Refuse ``algo_kwargs`` values of the wrong kind where the algorithm's default tells the kind.

    A number where the default is a number (``batch_size``, ``gamma``...), a bool where it is a bool;
    ``train_freq`` may also be ``[n, "step" | "episode"]``. (SB3 checks some values only when training
    starts, too late to refuse them before any work.)
    """
    params = inspect.signature(algo_cls.__init__).parameters
    for key, value in algo_kwargs.items():
        if key not in params or key == "action_noise":
            continue
        default = params[key].default
        if key == "train_freq":
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
                isinstance(value, list)
                and len(value) == 2
                and isinstance(value[0], int)
                and not isinstance(value[0], bool)
                and value[0] >= 1
                and value[1] in ("step", "episode")
            )
            if not ok:
                raise ConfigError(
                    f"policy.algo_kwargs.train_freq={value!r}; allowed: an integer >= 1 or "
                    "[integer >= 1, step | episode]"
                )
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"policy.algo_kwargs.{key}={value!r} must be true or false (for {algo})")
        elif isinstance(default, int | float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                from loopsim.yaml_io import number_text_hint

                hint = number_text_hint(value)
                raise ConfigError(
                    f"policy.algo_kwargs.{key}={value!r} must be a number (for {algo}; default "
                    f"{default!r})" + (f" ({hint})" if hint else "")
                )
            if isinstance(default, int) and not isinstance(value, int) and key != "learning_starts":
                # 32.0 too: SB3 crashed on it mid-run ("expected a sequence of integers"), as the
                # strict config refuses 3.0 for train.epochs
                raise ConfigError(
                    f"policy.algo_kwargs.{key}={value!r} must be an integer, written without a decimal "
                    f"point (for {algo}; default {default!r})"
                )


class _StubEnv(gym.Env):
    """An env with given spaces that never simulates (for building a model to check its settings)."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, goal: bool) -> None:
        self.observation_space = observation_space
        self.action_space = action_space
        if goal:
            self.compute_reward = lambda achieved, desired, info: np.zeros(
                np.shape(achieved)[:-1], np.float32
            )

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self.observation_space.sample(), 0.0, False, False, {}


def _dry_build(config: TrainConfig, algo_cls: type, policy_kwargs: dict[str, Any]) -> None:
    """Build the configured model on stub envs; SB3's refusals become :class:`ConfigError`."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    pol = config.policy
    env = config.env.make()
    try:
        obs_space, act_space = env.observation_space, env.action_space
        max_steps = getattr(env.unwrapped, "max_steps", None)
    finally:
        env.close()
    if _is_off_policy(algo_cls):
        _check_buffer_memory(pol, obs_space, act_space)
    starts = pol.algo_kwargs.get("learning_starts", 100)
    if pol.her and isinstance(max_steps, int) and isinstance(starts, int | float):
        needed = max_steps * config.train.n_envs
        if starts < needed:  # SB3 raised "Unable to sample before the end of the first episode" mid-run
            raise ConfigError(
                f"policy.algo_kwargs.learning_starts={starts!r}: HER samples from finished episodes, and an "
                f"episode of {config.env.id} may last {max_steps} steps in each of the {config.train.n_envs} "
                f"env(s); allowed: >= {needed}"
            )
    name = resolve_policy_name(pol.policy, obs_space)
    goal = isinstance(obs_space, gym.spaces.Dict)
    venv = DummyVecEnv([functools.partial(_StubEnv, obs_space, act_space, goal)] * config.train.n_envs)
    kwargs = _algo_kwargs(pol, act_space)
    if "buffer_size" in kwargs and isinstance(kwargs["buffer_size"], int) and kwargs["buffer_size"] > 1000:
        kwargs["buffer_size"] = 1000  # the real size is allocated in training, not here
    if "buffer_size" not in kwargs and _is_off_policy(algo_cls):
        kwargs["buffer_size"] = 1000
    extra: dict[str, Any] = {}
    if pol.her:
        from stable_baselines3 import HerReplayBuffer

        extra = {"replay_buffer_class": HerReplayBuffer, "replay_buffer_kwargs": dict(pol.her_kwargs)}
    try:
        algo_cls(
            name,
            venv,
            policy_kwargs=policy_kwargs,
            seed=config.seed,
            device="cpu" if "device" not in kwargs else kwargs.pop("device"),
            **extra,
            **kwargs,
        )
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - SB3 raises many types for bad settings
        raise ConfigError(
            f"{pol.algo} refused policy.algo_kwargs={pol.algo_kwargs!r} / policy.policy_kwargs="
            f"{pol.policy_kwargs!r} / policy.her_kwargs={pol.her_kwargs!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    finally:
        venv.close()


# ============================================================================================= envs
class FailurePenalty(gym.Wrapper):
    """Subtract ``penalty`` from the reward of a step that ends the episode in a failure.

    A failure is ``terminated`` without ``info["is_success"]`` (``dropped``, ``missed``,
    ``wrong_bin``...); time limits (``truncated``) are not failures. See
    :attr:`loopsim.config.SB3TrainConfig.failure_penalty`.

    Args:
        env: The (monitored) env.
        penalty: Reward subtracted [reward units], >= 0.
    """

    def __init__(self, env: gym.Env, penalty: float) -> None:
        super().__init__(env)
        self.penalty = float(penalty)

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        """Step the env; penalise a failed ending."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated and not info.get("is_success", False):
            reward = reward - self.penalty
        return obs, reward, terminated, truncated, info


class EpisodeLog(gym.Wrapper):
    """Record how the current episode began and every action since, so a resumed run can rebuild it.

    loopsim's envs are deterministic: an episode is fixed by the ``reset`` seed (or, for a reset
    without one, the state of ``env.unwrapped.np_random`` just before it) and its actions, whatever
    ran before. A resume state holds :meth:`episode_log` of every training env, and the resumed run
    replays it (:meth:`replay_episode`) through the same wrappers, so the envs, their ``Monitor``
    episode sums included, are where they were when the state was saved.

    Args:
        env: The training env (outermost wrapper of a sub-env of the ``VecEnv``).
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._start: dict[str, Any] | None = None
        self._actions: list[np.ndarray] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset the env, recording the seed, the options and (without a seed) the generator state."""
        base = self.env.unwrapped
        rng = getattr(base, "_np_random", None)  # not .np_random: that would seed a missing one
        self._start = {
            "seed": seed,
            "options": copy.deepcopy(options),
            "rng": copy.deepcopy(rng.bit_generator.state) if seed is None and rng is not None else None,
            "rng_seed": getattr(base, "_np_random_seed", None),
        }
        self._actions = []
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        """Step the env, recording a copy of ``action``."""
        self._actions.append(np.array(action, copy=True))
        return self.env.step(action)

    def episode_log(self) -> dict[str, Any] | None:
        """The current episode's start (``seed``, ``options``, ``rng``, ``rng_seed``) and ``actions``.

        Returns:
            A new dict (``actions``: a list of the arrays given to :meth:`step`), or ``None`` before
            the first reset.
        """
        if self._start is None:
            return None
        return {**copy.deepcopy(self._start), "actions": [a.copy() for a in self._actions]}

    def replay_episode(self, log: dict[str, Any]) -> Any:
        """Run the episode of ``log`` (from :meth:`episode_log`) again and return its latest observation.

        Raises:
            ValueError: If the episode began with a reset that had no seed and no generator to
                record (the env's first reset without a seed draws one from the OS).
        """
        base = self.env.unwrapped
        if log["seed"] is None:
            if log["rng"] is None:
                raise ValueError("the episode began without a seed or a seeded generator")
            base._np_random = _generator_from_state(log["rng"])
            base._np_random_seed = log["rng_seed"]
        obs, _ = self.reset(seed=log["seed"], options=copy.deepcopy(log["options"]))
        for action in log["actions"]:
            obs, *_ = self.step(action)
        return obs


def _make_env(env_config: EnvConfig, failure_penalty: float = 0.0) -> gym.Env:
    """One monitored training env (module-level so ``SubprocVecEnv`` can pickle the factory).

    ``Monitor`` sits inside :class:`FailurePenalty`, so logged returns are the env's own; the
    :class:`EpisodeLog` outermost records what a resume needs to rebuild the episode.
    """
    from stable_baselines3.common.monitor import Monitor

    env = Monitor(env_config.make(), info_keywords=("is_success",))
    return EpisodeLog(FailurePenalty(env, failure_penalty) if failure_penalty else env)


def _make_vec_env(config: TrainConfig) -> Any:
    """The training VecEnv (seeded later by the algorithm: sub-env ``i`` gets ``seed + i``)."""
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    factories = [functools.partial(_make_env, config.env, config.train.failure_penalty)] * config.train.n_envs
    if config.train.subproc and config.train.n_envs > 1:
        from loopsim.rollout import _sigint_held

        # the workers (and the forkserver they fork from) start with Ctrl-C held back from them, and
        # a Ctrl-C while they build their envs stops the run once they are up, so they are closed
        venv = None
        try:
            with _sigint_held():
                venv = SubprocVecEnv(factories)
        except BaseException:
            if venv is not None:
                _stop_workers(venv)
            raise
        return venv
    return DummyVecEnv(factories)


def _stop_workers(venv: Any) -> None:
    """Terminate the worker processes of a ``SubprocVecEnv`` after an exception, without a word to them.

    An exception (Ctrl-C above all) can stop this process between two workers' replies to one step,
    or in the middle of reading one. SB3's ``close()`` then first reads the replies it thinks are
    pending, and waits for ever for one it had already read (a hung ``loopsim train`` after Ctrl-C,
    seen in testing). The workers hold nothing to keep (the run's state is saved by the trainer), so
    they are sent SIGTERM and joined, and the vector env is marked closed (its ``close()`` then does
    nothing). A ``DummyVecEnv`` is left to ``close()``.

    Args:
        venv: The training vector env (not its ``VecNormalize`` wrapper).
    """
    from stable_baselines3.common.vec_env import SubprocVecEnv

    if not isinstance(venv, SubprocVecEnv) or venv.closed:
        return
    for process in venv.processes:
        process.terminate()
    for process in venv.processes:
        process.join(30)
    for remote in venv.remotes:
        remote.close()
    venv.closed = True


def _wrap_normalize(venv: Any, gamma: float) -> Any:
    """``VecNormalize`` on observations only (non-image keys of a dict)."""
    from stable_baselines3.common.preprocessing import is_image_space
    from stable_baselines3.common.vec_env import VecNormalize

    keys = None
    if isinstance(venv.observation_space, gym.spaces.Dict):
        keys = [
            k
            for k, s in venv.observation_space.spaces.items()
            if isinstance(s, gym.spaces.Box) and not is_image_space(s, check_channels=False)
        ]
    return VecNormalize(
        venv, training=True, norm_obs=True, norm_reward=False, gamma=gamma, norm_obs_keys=keys
    )


# ====================================================================================== resume state
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_resume_state(
    resume_dir: str | os.PathLike,
    model: Any,
    vec_normalize: Any = None,
    state: dict[str, Any] | None = None,
    rollout: dict[str, Any] | None = None,
) -> Path:
    """Save SB3's private resume state atomically (see the module docstring for the layout).

    Everything is written into ``resume_dir/.staging-*``, renamed to ``resume_dir/step-<N>``, then
    published by replacing the pointer file ``LATEST``; older states and stale staging folders are
    deleted afterwards. A kill at any instant leaves ``LATEST`` naming a complete state.

    Args:
        resume_dir: The run's ``resume/`` folder.
        model: The SB3 model (its replay buffer is saved too for off-policy algorithms).
        vec_normalize: The training ``VecNormalize``, if any.
        state: Extra JSON saved in ``state.json`` (``num_timesteps`` is always added).
        rollout: What a bit-identical resume needs besides SB3's files (:func:`_rollout_state`),
            pickled into ``rollout_state.pkl``; ``None`` writes no such file.

    Returns:
        The new state folder.
    """
    resume_dir = Path(resume_dir)
    resume_dir.mkdir(parents=True, exist_ok=True)
    base = name = f"step-{int(model.num_timesteps):09d}"
    k = 1
    while (resume_dir / name).exists():  # the same step saved before (the final save after a periodic one)
        name, k = f"{base}.{k}", k + 1
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=resume_dir))
    try:
        model.save(staging / "model.zip")
        if getattr(model, "replay_buffer", None) is not None and hasattr(model, "save_replay_buffer"):
            model.save_replay_buffer(staging / "replay_buffer.pkl")
        if vec_normalize is not None:
            vec_normalize.save(str(staging / "vecnormalize.pkl"))
        if rollout is not None:
            with open(staging / _ROLLOUT, "wb") as fh:
                pickle.dump(rollout, fh, protocol=pickle.HIGHEST_PROTOCOL)
        meta = {**(state or {}), "num_timesteps": int(model.num_timesteps)}
        (staging / _STATE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(staging, resume_dir / name)
        _fsync_dir(resume_dir)
        tmp = resume_dir / f".{_LATEST}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, resume_dir / _LATEST)
        _fsync_dir(resume_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in resume_dir.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return resume_dir / name


def load_resume_state(resume_dir: str | os.PathLike) -> Path | None:
    """The current resume state folder named by ``resume_dir/LATEST`` (``None`` if there is none).

    Raises:
        loopsim.training.RunDirError: If ``LATEST`` names a folder that does not exist or lacks
            ``model.zip`` or ``state.json``.
    """
    resume_dir = Path(resume_dir)
    latest = resume_dir / _LATEST
    if not latest.is_file():
        return None
    path = resume_dir / latest.read_text(encoding="utf-8").strip()
    if not (path / "model.zip").is_file() or not (path / _STATE).is_file():
        from loopsim.training import RunDirError

        raise RunDirError(
            f"--resume: the resume state {path} named by {latest} is incomplete (no model.zip or "
            f"{_STATE}); start a new run (another --run-dir, or delete this one)"
        )
    return path


# ========================================================================================= callback
def _callback_class() -> type:
    from stable_baselines3.common.callbacks import BaseCallback

    class LoopsimCallback(BaseCallback):
        """Periodic evaluation and checkpoints, by env steps (crossing multiples of the period).

        A checkpoint crossing a multiple of ``train.checkpoint_every`` is taken in two parts. The
        deployable policy is saved at the end of the rollout (every ``train_freq`` steps for
        off-policy algorithms, ``n_steps`` for on-policy ones), before SB3 trains on it, as it
        always was: building the snapshot draws network initial weights from torch's generator, so
        moving it would change every run. The resume state is saved when the next rollout starts,
        after that training: SB3's learning loop then continues from it exactly as it went on in
        the run that saved it. A resumed run restores the random generators when training starts
        (SB3's ``learn`` resets the action noise before that).
        """

        def __init__(self, trainer: _Trainer) -> None:
            super().__init__(verbose=0)
            self.trainer = trainer

        def _on_training_start(self) -> None:
            self.trainer.restore_generators()

        def _on_step(self) -> bool:
            t = self.trainer
            every = t.config.eval.every
            if every and self.model.num_timesteps // every > t.last_eval // every:
                t.evaluate()
            return True

        def _on_rollout_end(self) -> None:
            t = self.trainer
            ckpt = t.config.train.checkpoint_every
            if self.model.num_timesteps // ckpt > t.last_checkpoint // ckpt:
                t.save_policy()
                t.resume_due = True

        def _on_rollout_start(self) -> None:
            t = self.trainer
            if t.resume_due:
                t.save_resume()

    return LoopsimCallback


class _Trainer:
    """State shared by :func:`train_sb3` and its callback."""

    def __init__(
        self,
        config: TrainConfig,
        run: RunDir,
        model: Any,
        venv: Any,
        vec_normalize: Any,
        start_step: int,
        wall_before: float,
        generators: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.run = run
        self.model = model
        self.venv = venv
        self.vec_normalize = vec_normalize
        #: Generator states to restore when training starts (a resumed run), else ``None``.
        self.generators = generators
        #: A policy checkpoint was saved at a rollout's end; its resume state follows after training.
        self.resume_due = False
        self.last_eval = start_step
        self.last_checkpoint = start_step
        self.wall_before = wall_before
        self.t0 = time.monotonic()

    def wall_time(self) -> float:
        return self.wall_before + time.monotonic() - self.t0

    def policy(self) -> SB3Policy:
        from loopsim.policies.sb3 import SB3Policy

        policy = SB3Policy.from_model(self.model, self.vec_normalize)
        policy.config = self.config.model_dump(mode="json")
        policy.provenance = {
            "timesteps": int(self.model.num_timesteps),
            "algo": self.config.policy.algo,
            "wall_time_s": round(self.wall_time(), 3),
            "env_id": self.config.env.id,
            "seed": self.config.seed,
        }
        return policy

    def evaluate(self) -> None:
        n = int(self.model.num_timesteps)
        self.run.evaluate(self.policy(), n)
        self.last_eval = n

    def restore_generators(self) -> None:
        """Put back the generator states of a resumed run's saved state (once)."""
        if self.generators is not None:
            _set_generators(self.model, self.generators)
            self.generators = None

    def save_policy(self) -> SB3Policy:
        """Save the deployable policy in ``checkpoint/`` (and count the checkpoint as taken)."""
        policy = self.policy()
        policy.save(self.run.checkpoint_dir)
        self.last_checkpoint = int(self.model.num_timesteps)
        return policy

    def save_resume(self) -> None:
        """Save the resume state (SB3's files and :func:`_rollout_state`) in ``resume/``."""
        save_resume_state(
            self.run.resume_dir,
            self.model,
            self.vec_normalize,
            {"wall_time_s": self.wall_time(), "last_eval": self.last_eval},
            _rollout_state(self.model, self.venv, self.vec_normalize),
        )
        self.resume_due = False

    def checkpoint(self) -> SB3Policy:
        """Save the deployable policy and the resume state (the end of training)."""
        policy = self.save_policy()
        self.save_resume()
        return policy


def _raise_if_diverged(model: Any, config: TrainConfig, cause: BaseException | None) -> None:
    """Raise :class:`~loopsim.training.TrainingDivergedError` if the policy's weights are not finite."""
    import torch

    bad = [n for n, p in model.policy.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        from loopsim.training import TrainingDivergedError

        raise TrainingDivergedError(
            f"training diverged by step {int(model.num_timesteps)}: the policy's weights {bad[:3]} hold "
            f"NaN or infinite values (policy.algo_kwargs = {config.policy.algo_kwargs}); the run keeps its "
            "last good checkpoint, if any: lower the learning rate and start a new run (another "
            "--run-dir, or delete this one)"
        ) from cause


# ======================================================================== bit-identical resume
def _generators(model: Any) -> dict[str, Any]:
    """The states of every random generator SB3's learning loop draws from (copies).

    Python's ``random``, NumPy's global generator (SB3's replay buffers sample with it), torch's
    CPU generator (policy sampling, dropout, network init), the action space's generator (random
    actions before ``learning_starts``) and the action noise (Ornstein-Uhlenbeck keeps a state).
    """
    import torch

    space_rng = getattr(model.action_space, "_np_random", None)
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - SB3 samples its buffers from it
        "torch": torch.get_rng_state(),
        "action_space": None if space_rng is None else copy.deepcopy(space_rng.bit_generator.state),
        "action_noise": copy.deepcopy(model.action_noise) if hasattr(model, "action_noise") else None,
    }


def _generator_from_state(state: dict[str, Any]) -> np.random.Generator:
    """A NumPy ``Generator`` in the state ``bit_generator.state`` gave (a copy is taken)."""
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = copy.deepcopy(state)
    return np.random.Generator(bit_generator)


def _set_generators(model: Any, state: dict[str, Any]) -> None:
    """Restore what :func:`_generators` saved."""
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002 - see _generators
    torch.set_rng_state(state["torch"])
    if state["action_space"] is not None:
        model.action_space._np_random = _generator_from_state(state["action_space"])
    if hasattr(model, "action_noise"):
        model.action_noise = copy.deepcopy(state["action_noise"])


def _rollout_state(model: Any, venv: Any, vec_normalize: Any) -> dict[str, Any]:
    """What a resume needs besides SB3's own files to continue bit for bit (``rollout_state.pkl``).

    Each training env's :meth:`EpisodeLog.episode_log`, the generator states (:func:`_generators`)
    and ``VecNormalize``'s running returns (which its own file leaves out).
    """
    return {
        "episodes": venv.env_method("episode_log"),
        "generators": _generators(model),
        "returns": None if vec_normalize is None else np.array(vec_normalize.returns, copy=True),
    }


def _obs_at(obs: Any, i: int) -> Any:
    return {k: v[i] for k, v in obs.items()} if isinstance(obs, dict) else obs[i]


def _same_obs(a: Any, b: Any) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
            and all(_same_obs(a[k], b[k]) for k in a)
        )
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def _rebuild_rollout(model: Any, venv: Any, vec_normalize: Any, state_dir: Path) -> dict[str, Any] | None:
    """Replay the saved episodes into the fresh training envs of a resumed run.

    Each env's episode in progress is run again from its start (:meth:`EpisodeLog.replay_episode`)
    and the observation it ends on must equal, bit for bit, the one SB3 saved in ``model.zip``
    (``_last_obs``, normalised with the saved statistics under ``VecNormalize``; off-policy
    algorithms also keep the raw one, ``_last_original_obs``).

    Returns:
        The generator states to restore when training starts, or ``None`` when the state has no
        ``rollout_state.pkl`` (saved by an older loopsim), its envs differ in number, or an episode
        does not replay to the saved observation; the caller then starts fresh episodes (with a
        warning in the last two cases).
    """
    path = state_dir / _ROLLOUT
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as fh:
            saved = pickle.load(fh)  # noqa: S301 - the run's own private resume state
        if not isinstance(saved, dict) or not {"episodes", "generators", "returns"} <= saved.keys():
            raise ValueError("it is not a rollout state")
    except Exception as exc:  # noqa: BLE001 - damaged: any unpickling error; the run resumes without it
        warnings.warn(f"resuming with fresh episodes, not bit for bit: {path} cannot be read ({exc!r})",
                      RuntimeWarning, stacklevel=2)
        return None
    # off-policy algorithms keep the raw observation beside the normalised one; on-policy ones only
    # the normalised one (normalising with the saved statistics gives it again, bit for bit)
    raw = model._last_original_obs if vec_normalize is not None and _is_off_policy(type(model)) else None
    why = None
    if model._last_obs is None or len(saved["episodes"]) != venv.num_envs or None in saved["episodes"]:
        why = "the saved state does not match the training envs"
    else:
        for i, log in enumerate(saved["episodes"]):
            try:
                obs = venv.env_method("replay_episode", log, indices=[i])[0]
            except Exception as exc:  # noqa: BLE001 - a damaged log (refused action, missing key...)
                why = f"training env {i} could not replay its episode ({exc!r})"
                break
            seen = obs if vec_normalize is None else vec_normalize.normalize_obs(obs)
            if not _same_obs(seen, _obs_at(model._last_obs, i)) or (
                raw is not None and not _same_obs(obs, _obs_at(raw, i))
            ):
                why = f"training env {i} did not replay to the saved observation"
                break
        if why is None:
            try:  # restoring them now finds a damaged state before training starts
                _set_generators(model, saved["generators"])
            except Exception as exc:  # noqa: BLE001
                why = f"the saved random generators cannot be restored ({exc!r})"
    if why is not None:
        warnings.warn(
            f"resuming with fresh episodes, not bit for bit: {why}", RuntimeWarning, stacklevel=2
        )
        return None
    venv._reset_seeds()  # SB3's load seeded the new envs for a reset that now never comes
    if vec_normalize is not None and saved["returns"] is not None:
        vec_normalize.returns = np.array(saved["returns"], copy=True)
    return saved["generators"]


# ============================================================================================ train
def train_sb3(config: TrainConfig, run: RunDir, resume: bool = False, progress_bar: bool = True) -> SB3Policy:
    """Train an SB3 policy into ``run`` (see the module docstring).

    Args:
        config: The resolved config (checked with :func:`check_sb3_config`).
        run: The run directory.
        resume: Continue from the resume state in ``run.resume_dir`` (from scratch if there is none).
        progress_bar: Show SB3's progress bar (tqdm + rich).

    Returns:
        The final policy, also saved in ``run.checkpoint_dir``.

    Raises:
        ConfigError: If the config is not an ``sb3`` config.
        loopsim.training.RunDirError: If the resume state is incomplete.
    """
    from stable_baselines3.common.callbacks import CallbackList, ProgressBarCallback
    from stable_baselines3.common.vec_env import VecNormalize

    from loopsim.policies.sb3 import policy_kwargs_from_json, sb3_algorithms

    pol = config.policy
    if not isinstance(pol, SB3PolicyConfig) or not isinstance(config.train, SB3TrainConfig):
        raise ConfigError("train_sb3 needs policy.type: sb3")
    algo_cls = sb3_algorithms()[pol.algo]
    state_dir = load_resume_state(run.resume_dir) if resume else None
    venv = _make_vec_env(config)
    vec_normalize = None
    try:
        if state_dir is not None:
            saved = json.loads((state_dir / _STATE).read_text(encoding="utf-8"))
            if (state_dir / "vecnormalize.pkl").is_file():
                vec_normalize = VecNormalize.load(str(state_dir / "vecnormalize.pkl"), venv)
                vec_normalize.training = True
                vec_normalize.norm_reward = False
            env = vec_normalize if vec_normalize is not None else venv
            # force_reset=False keeps SB3's _last_obs: the envs are rebuilt to match it
            model = algo_cls.load(state_dir / "model.zip", env=env, device="auto", force_reset=False)
            model.tensorboard_log = str(run.tb_dir)
            generators = _rebuild_rollout(model, venv, vec_normalize, state_dir)
            if (state_dir / "replay_buffer.pkl").is_file():
                # HER keeps the episodes in progress open when the envs carry on with them
                model.load_replay_buffer(
                    state_dir / "replay_buffer.pkl", truncate_last_traj=generators is None
                )
            if generators is not None and getattr(model, "use_sde", False):
                warnings.warn("resuming a gSDE run (use_sde): it continues, but not bit for bit (SB3 draws "
                              "its exploration noise before the checkpoint)", RuntimeWarning, stacklevel=2)
            if generators is None:  # start fresh episodes, seeded by the step count
                model._last_obs = None
                model.set_random_seed(config.seed + int(model.num_timesteps))
            start, wall_before = int(model.num_timesteps), float(saved.get("wall_time_s", 0.0))
        else:
            probe = venv.observation_space
            kwargs = _algo_kwargs(pol, venv.action_space)
            if pol.normalize:
                vec_normalize = _wrap_normalize(venv, float(kwargs.get("gamma", 0.99)))
            extra: dict[str, Any] = {}
            if pol.her:
                from stable_baselines3 import HerReplayBuffer

                extra = {"replay_buffer_class": HerReplayBuffer, "replay_buffer_kwargs": dict(pol.her_kwargs)}
            model = algo_cls(
                resolve_policy_name(pol.policy, probe),
                vec_normalize or venv,
                policy_kwargs=policy_kwargs_from_json(pol.policy_kwargs),
                seed=config.seed,
                tensorboard_log=str(run.tb_dir),
                verbose=0,
                **extra,
                **kwargs,
            )
            start, wall_before, generators = 0, 0.0, None
        trainer = _Trainer(config, run, model, venv, vec_normalize, start, wall_before, generators)
        callbacks = [_callback_class()(trainer)]
        if progress_bar:
            callbacks.insert(0, ProgressBarCallback())
        remaining = config.train.total_timesteps - start
        if remaining > 0:
            try:
                model.learn(
                    remaining,
                    callback=CallbackList(callbacks),
                    tb_log_name="sb3",
                    reset_num_timesteps=state_dir is None,
                    progress_bar=False,
                )
            except ValueError as exc:  # torch refuses NaN parameters of an action distribution
                _raise_if_diverged(model, config, exc)
                raise
        _raise_if_diverged(model, config, None)
        n = int(model.num_timesteps)
        if trainer.last_eval != n or not run.evaluations():
            trainer.evaluate()
        return trainer.checkpoint()
    except BaseException:
        _stop_workers(venv)  # before close(), which would talk to them
        raise
    finally:
        (vec_normalize or venv).close()
