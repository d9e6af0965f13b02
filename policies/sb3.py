"""stable-baselines3 policies with safe checkpoints: :class:`SB3Policy`, kind ``"sb3"``.

An SB3 model pickles its policy (``model.save`` writes a zip with cloudpickled classes and
functions), so loading one can run arbitrary code. :class:`SB3Policy` stores instead what it takes to
*rebuild* the policy network from names::

    policy.json  "policy": {
        "algo": "SAC",                         # a key of sb3_algorithms()
        "policy": "MultiInputPolicy",          # a key of the algorithm's policy_aliases
        "policy_kwargs": {"net_arch": [256, 256], "activation_fn": "relu", ...},
        "policy_observation_space": "...",     # the network's space (images channel-first), Minari JSON
        "normalization": {"clip_obs": 10.0, "epsilon": 1e-8, "keys": ["observation", ...]} | null
    }
    weights.safetensors
        policy.<name>          # the policy's state_dict (actor, critics...)
        obs_rms.mean[.<key>]   # VecNormalize observation statistics, float64 (per key for dicts)
        obs_rms.var[.<key>]

Loading accepts only algorithm names from :func:`sb3_algorithms`, policy names from that algorithm's
``policy_aliases`` and classes in ``policy_kwargs`` from fixed allow-lists (:data:`ACTIVATIONS`,
:data:`FEATURES_EXTRACTORS`, :data:`OPTIMIZERS`); nothing is imported by a dotted path and nothing is
unpickled. The network is rebuilt as ``policy_aliases[name](policy_observation_space, action_space,
lr_schedule, **policy_kwargs)`` and its weights loaded with ``strict=True``.

Deployment matches training: observations are normalised with the saved ``VecNormalize`` statistics
(evaluation mode: frozen, no reward normalisation) and HWC images are transposed to the channel-first
layout SB3's ``VecTransposeImage`` gave the network, so :meth:`SB3Policy.predict` takes the env's own
observations.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from loopsim.datasets.schema import space_from_json, space_to_json
from loopsim.policies.base import BasePolicy, register_policy
from loopsim.policies.checkpoint import CheckpointError

__all__ = [
    "ACTIVATIONS",
    "FEATURES_EXTRACTORS",
    "OPTIMIZERS",
    "ObservationNormalizer",
    "SB3Policy",
    "build_sb3_policy",
    "policy_kwargs_from_json",
    "policy_kwargs_to_json",
    "sb3_algorithms",
]

#: Activation functions ``policy_kwargs.activation_fn`` may name.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}

#: Optimizers ``policy_kwargs.optimizer_class`` may name (irrelevant to acting, but part of the
#: policy's constructor).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
    "RMSprop": torch.optim.RMSprop,
    "SGD": torch.optim.SGD,
}

#: ``policy_kwargs`` keys whose values are classes, and the allow-list each is looked up in.
_CLASS_KEYS = ("activation_fn", "features_extractor_class", "optimizer_class")


@cache
def _features_extractors() -> dict[str, type]:
    from stable_baselines3.common import torch_layers

    return {
        name: getattr(torch_layers, name) for name in ("FlattenExtractor", "NatureCNN", "CombinedExtractor")
    }


class _LazyExtractors(Mapping):
    """SB3's feature extractors by name, imported on first use (SB3 is a heavy import)."""

    def __getitem__(self, key: str) -> type:
        return _features_extractors()[key]

    def __iter__(self) -> Any:
        return iter(_features_extractors())

    def __len__(self) -> int:
        return len(_features_extractors())


#: Feature extractors ``policy_kwargs.features_extractor_class`` may name (SB3's own).
FEATURES_EXTRACTORS: Mapping[str, type] = _LazyExtractors()


def _allow_list(key: str) -> Mapping[str, type]:
    return {
        "activation_fn": ACTIVATIONS,
        "features_extractor_class": FEATURES_EXTRACTORS,
        "optimizer_class": OPTIMIZERS,
    }[key]


@cache
def sb3_algorithms() -> dict[str, type]:
    """Every stable-baselines3 algorithm class by name (and sb3-contrib's when installed).

    Returns:
        ``{"A2C": A2C, "DDPG": DDPG, "DQN": DQN, "PPO": PPO, "SAC": SAC, "TD3": TD3, ...}``.
    """
    import importlib

    from stable_baselines3.common.base_class import BaseAlgorithm

    algos: dict[str, type] = {}
    for module_name in ("stable_baselines3", "sb3_contrib"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in getattr(module, "__all__", dir(module)):
            obj = getattr(module, name, None)
            if isinstance(obj, type) and issubclass(obj, BaseAlgorithm) and obj is not BaseAlgorithm:
                algos.setdefault(name, obj)
    return algos


# ============================================================================ policy_kwargs <-> JSON
def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_is_json(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def policy_kwargs_to_json(policy_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """SB3 ``policy_kwargs`` as JSON: classes by their allow-listed name, everything else as is.

    Args:
        policy_kwargs: Keyword arguments of an SB3 policy class (``net_arch``, ``activation_fn``,
            ``log_std_init``, ``features_extractor_class``...).

    Returns:
        A JSON-able dict (``activation_fn: nn.ReLU`` becomes ``"relu"``).

    Raises:
        ValueError: If a class is not in its allow-list (:data:`ACTIVATIONS`,
            :data:`FEATURES_EXTRACTORS`, :data:`OPTIMIZERS`) or a value is not JSON (a function, an
            object, a non-finite float); the message names the key.
    """
    out: dict[str, Any] = {}
    for key, value in policy_kwargs.items():
        if key in _CLASS_KEYS:
            names = [n for n, cls in _allow_list(key).items() if cls is value]
            if not names:
                raise ValueError(
                    f"policy_kwargs.{key}={value!r} cannot be stored in a loopsim checkpoint; "
                    f"allowed: {sorted(_allow_list(key))}"
                )
            out[key] = names[0]
        elif _is_json(value):
            out[key] = _plain(value)
        else:
            raise ValueError(
                f"policy_kwargs.{key}={value!r} is not a JSON value, so it cannot be stored in a "
                "loopsim checkpoint (classes are allowed only for "
                f"{', '.join(_CLASS_KEYS)}, by name)"
            )
    return out


def policy_kwargs_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`policy_kwargs_to_json`: allow-listed class names become classes.

    Also the form ``policy.policy_kwargs`` takes in a training config.

    Args:
        data: JSON ``policy_kwargs`` (e.g. ``{"net_arch": [64, 64], "activation_fn": "tanh"}``).

    Returns:
        Keyword arguments for an SB3 policy class.

    Raises:
        ValueError: If a class name is not in its allow-list, or a value is not JSON; the message names
            the key, the value and what is allowed.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"policy_kwargs must be a mapping, not {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _CLASS_KEYS:
            allowed = _allow_list(key)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"policy_kwargs.{key}={value!r} is not allowed; allowed: {sorted(allowed)}")
            out[key] = allowed[value]
        elif _is_json(value):
            out[key] = copy.deepcopy(value)
        else:
            raise ValueError(f"policy_kwargs.{key}={value!r} is not a JSON value")
    return out


def _zero_schedule(progress_remaining: float) -> float:
    """Learning-rate schedule of rebuilt policies (they are not trained; the optimizer is unused)."""
    return 0.0


def _accepted_kwargs(cls: type) -> set[str] | None:
    """Keyword arguments ``cls.__init__`` accepts (``None`` when it takes ``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL} - {"self"}


def build_sb3_policy(
    algo: str,
    policy: str,
    observation_space: gym.Space,
    action_space: gym.Space,
    policy_kwargs: Mapping[str, Any],
) -> Any:
    """Construct an SB3 policy network from names, in evaluation mode, on the CPU.

    Args:
        algo: A key of :func:`sb3_algorithms`.
        policy: A key of the algorithm's ``policy_aliases`` (``MlpPolicy``, ``MultiInputPolicy``,
            ``CnnPolicy``).
        observation_space: The network's observation space (images channel-first).
        action_space: The action space.
        policy_kwargs: JSON ``policy_kwargs`` (see :func:`policy_kwargs_from_json`).

    Returns:
        A ``stable_baselines3.common.policies.BasePolicy`` with freshly initialised weights.

    Raises:
        ValueError: If a name is not allowed or a keyword is not accepted by the policy class.
    """
    algos = sb3_algorithms()
    if algo not in algos:
        raise ValueError(f"unknown SB3 algorithm {algo!r}; allowed: {sorted(algos)}")
    aliases = algos[algo].policy_aliases
    if policy not in aliases:
        raise ValueError(f"{algo} has no policy {policy!r}; allowed: {sorted(aliases)}")
    cls = aliases[policy]
    kwargs = policy_kwargs_from_json(policy_kwargs)
    accepted = _accepted_kwargs(cls)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"{algo} {policy} does not accept policy_kwargs {unknown}; accepted: "
                f"{sorted(accepted - {'observation_space', 'action_space', 'lr_schedule'})}"
            )
    net = cls(observation_space, action_space, lr_schedule=_zero_schedule, **kwargs)
    net.set_training_mode(False)
    return net


# ====================================================================================== normalizer
@dataclass(frozen=True)
class ObservationNormalizer:
    """Frozen ``VecNormalize`` observation statistics, applied as ``VecNormalize.normalize_obs`` does.

    ``obs -> clip((obs - mean) / sqrt(var + epsilon), -clip_obs, clip_obs)`` as float32, computed in
    float64 like SB3; for dict observations only the keys in :attr:`keys`.

    Attributes:
        mean: Running mean, float64, observation-shaped; ``{key: array}`` for dict observations.
        var: Running variance, same layout.
        clip_obs: Clip bound of the normalised observation.
        epsilon: Added to the variance.
        keys: Normalised keys of a dict observation (``None`` for a Box observation).
    """

    mean: np.ndarray | dict[str, np.ndarray]
    var: np.ndarray | dict[str, np.ndarray]
    clip_obs: float
    epsilon: float
    keys: tuple[str, ...] | None = None

    @classmethod
    def from_vec_normalize(cls, vec_normalize: Any) -> ObservationNormalizer | None:
        """Snapshot a ``VecNormalize``'s observation statistics (``None`` if it does not normalise them).

        Raises:
            ValueError: If ``vec_normalize`` is not a ``VecNormalize``.
        """
        from stable_baselines3.common.vec_env import VecNormalize

        if not isinstance(vec_normalize, VecNormalize):
            raise ValueError(f"expected a VecNormalize, got {type(vec_normalize).__name__}")
        if not vec_normalize.norm_obs:
            return None
        rms = vec_normalize.obs_rms
        if isinstance(rms, dict):
            keys = tuple(vec_normalize.norm_obs_keys or rms)
            return cls(
                {k: np.array(rms[k].mean, dtype=np.float64) for k in keys},
                {k: np.array(rms[k].var, dtype=np.float64) for k in keys},
                float(vec_normalize.clip_obs),
                float(vec_normalize.epsilon),
                keys,
            )
        return cls(
            np.array(rms.mean, dtype=np.float64),
            np.array(rms.var, dtype=np.float64),
            float(vec_normalize.clip_obs),
            float(vec_normalize.epsilon),
            None,
        )

    def _one(self, obs: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        return np.clip((obs - mean) / np.sqrt(var + self.epsilon), -self.clip_obs, self.clip_obs).astype(
            np.float32
        )

    def __call__(self, observation: Any) -> Any:
        """Normalise one observation or a batch (``(B, *shape)`` or a dict of those); returns a new one."""
        if self.keys is None:
            return self._one(np.asarray(observation), self.mean, self.var)
        out = dict(observation)
        for k in self.keys:
            out[k] = self._one(np.asarray(observation[k]), self.mean[k], self.var[k])
        return out

    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(json, tensors)`` for the checkpoint (see the module docstring)."""
        meta = {
            "clip_obs": self.clip_obs,
            "epsilon": self.epsilon,
            "keys": list(self.keys) if self.keys is not None else None,
        }
        if self.keys is None:
            tensors = {"obs_rms.mean": torch.from_numpy(self.mean), "obs_rms.var": torch.from_numpy(self.var)}
        else:
            tensors = {}
            for k in self.keys:
                tensors[f"obs_rms.mean.{k}"] = torch.from_numpy(self.mean[k])
                tensors[f"obs_rms.var.{k}"] = torch.from_numpy(self.var[k])
        return meta, tensors

    @classmethod
    def from_checkpoint(
        cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
    ) -> ObservationNormalizer:
        """Inverse of :meth:`to_checkpoint`.

        Raises:
            CheckpointError: If a statistic is missing or the settings are malformed.
        """
        try:
            keys = meta["keys"]
            clip_obs, epsilon = float(meta["clip_obs"]), float(meta["epsilon"])

            def get(name: str) -> np.ndarray:
                return tensors[name].numpy().astype(np.float64)

            if keys is None:
                return cls(get("obs_rms.mean"), get("obs_rms.var"), clip_obs, epsilon, None)
            keys = tuple(str(k) for k in keys)
            return cls(
                {k: get(f"obs_rms.mean.{k}") for k in keys},
                {k: get(f"obs_rms.var.{k}") for k in keys},
                clip_obs,
                epsilon,
                keys,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the stored observation normalisation is damaged ({exc!r})") from None


# ========================================================================================== policy
def _transposed_keys(env_space: gym.Space, net_space: gym.Space) -> list[str | None]:
    """Which observations SB3 transposed from HWC to CHW (``None`` stands for a Box observation).

    Raises:
        ValueError: If the two spaces do not correspond (other than by such a transposition).
    """

    def one(a: gym.Space, b: gym.Space, name: str) -> bool:
        sa, sb = tuple(a.shape or ()), tuple(b.shape or ())
        if sa == sb:
            return False
        if len(sa) == 3 and sb == (sa[2], sa[0], sa[1]):
            return True
        raise ValueError(f"observation {name}: the env's shape {sa} does not fit the network's {sb}")

    if isinstance(env_space, gym.spaces.Dict):
        if not isinstance(net_space, gym.spaces.Dict) or set(env_space.spaces) != set(net_space.spaces):
            raise ValueError(
                f"the env's observation space {env_space} does not fit the network's {net_space}"
            )
        return [k for k in env_space.spaces if one(env_space[k], net_space[k], repr(k))]
    if isinstance(net_space, gym.spaces.Dict):
        raise ValueError(f"the env's observation space {env_space} does not fit the network's {net_space}")
    return [None] if one(env_space, net_space, "") else []


def _innermost_observation_space(model: Any) -> gym.Space | None:
    """Observation space of the env inside all of the model's VecEnv wrappers (``None`` without env)."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    env = model.get_env()
    if env is None:
        return None
    while isinstance(env, VecEnvWrapper):
        env = env.venv
    return env.observation_space


@register_policy
class SB3Policy(BasePolicy):
    """A stable-baselines3 policy network (``model.policy``) as a loopsim :class:`~loopsim.policies.Policy`.

    Use :meth:`from_model` on a trained model; :meth:`save` writes a safe checkpoint (see the module
    docstring) that :func:`~loopsim.policies.load_policy` rebuilds without unpickling.

    ``predict(..., deterministic=True)`` gives the distribution's mode (SB3's deterministic action);
    ``deterministic=False`` samples from the policy's distribution with torch's global generator.

    Args:
        observation_space: The env's observation space (images HWC as the env returns them).
        action_space: The action space.
        policy: The SB3 policy network; its ``observation_space`` may have images channel-first.
        algo: The algorithm's name, a key of :func:`sb3_algorithms`.
        policy_name: The policy's alias in ``policy_aliases`` of ``algo`` (``MlpPolicy``...).
        policy_kwargs: The JSON ``policy_kwargs`` the network was built with.
        normalizer: Observation statistics of ``VecNormalize``, applied before the network.

    Raises:
        ValueError: If the env's and the network's observation spaces do not correspond, or
            ``policy_kwargs`` is not JSON.

    Attributes:
        policy: The SB3 policy network (evaluation mode).
        algo: As given.
        policy_name: As given.
        policy_kwargs: As given.
        normalizer: As given.
    """

    kind = "sb3"

    def __init__(
        self,
        observation_space: gym.Space,
        action_space: gym.Space,
        policy: Any,
        algo: str,
        policy_name: str,
        policy_kwargs: Mapping[str, Any],
        normalizer: ObservationNormalizer | None = None,
    ) -> None:
        super().__init__(observation_space, action_space)
        self.policy = policy
        self.algo = algo
        self.policy_name = policy_name
        self.policy_kwargs = policy_kwargs_to_json(policy_kwargs_from_json(policy_kwargs))
        self.normalizer = normalizer
        self._transpose = _transposed_keys(observation_space, policy.observation_space)
        self.policy.set_training_mode(False)

    @classmethod
    def from_model(
        cls, model: Any, vec_normalize: Any = None, observation_space: gym.Space | None = None
    ) -> SB3Policy:
        """A deployable snapshot of a (trained) SB3 model's policy.

        The network is rebuilt from names (as :func:`~loopsim.policies.load_policy` will) and the
        model's weights copied in, so the snapshot acts exactly as the saved checkpoint will, and
        further training of ``model`` does not change it.

        Args:
            model: An SB3 algorithm instance (``SAC``, ``PPO``...), of a class in :func:`sb3_algorithms`.
            vec_normalize: The ``VecNormalize`` the model was trained in (its observation statistics
                are snapshotted); ``None`` (default) takes the one in the model's env, if any;
                ``False`` deploys without normalisation.
            observation_space: The env's observation space; default: that of the env inside the
                model's VecEnv wrappers (before ``VecTransposeImage``), else the model's.

        Returns:
            The policy.

        Raises:
            ValueError: If the algorithm or the policy class is not one SB3 registers by name, or a
                ``policy_kwargs`` value cannot be stored as JSON (the key and what is allowed are named).
        """
        algo = next((name for name, cls_ in sb3_algorithms().items() if cls_ is type(model)), None)
        if algo is None:
            raise ValueError(
                f"{type(model).__name__} is not an SB3 algorithm known by name; known: "
                f"{sorted(sb3_algorithms())}"
            )
        policy_name = next(
            (n for n, c in type(model).policy_aliases.items() if c is type(model.policy)), None
        )
        if policy_name is None:
            raise ValueError(
                f"{algo}'s policy class {type(model.policy).__name__} is not one of its "
                f"policy_aliases {sorted(type(model).policy_aliases)}; custom policy classes "
                "cannot be stored in a loopsim checkpoint"
            )
        kwargs = dict(model.policy_kwargs)
        accepted = _accepted_kwargs(type(model.policy))
        # On-policy algorithms pass use_sde to the policy outside policy_kwargs.
        if (
            hasattr(model, "use_sde")
            and "use_sde" not in kwargs
            and (accepted is None or "use_sde" in accepted)
        ):
            kwargs["use_sde"] = bool(model.use_sde)
        kwargs_json = policy_kwargs_to_json(kwargs)
        net = build_sb3_policy(algo, policy_name, model.observation_space, model.action_space, kwargs_json)
        net.load_state_dict(model.policy.state_dict(), strict=True)
        net.set_training_mode(False)
        if observation_space is None:
            observation_space = _innermost_observation_space(model) or model.observation_space
        if vec_normalize is None and model.get_env() is not None:
            vec_normalize = model.get_vec_normalize_env()
        use = vec_normalize is not None and vec_normalize is not False
        normalizer = ObservationNormalizer.from_vec_normalize(vec_normalize) if use else None
        return cls(observation_space, model.action_space, net, algo, policy_name, kwargs_json, normalizer)

    # ---------------------------------------------------------------------------------------- acting
    def _predict_batch(self, observation: Any, deterministic: bool) -> np.ndarray:
        obs = self.normalizer(observation) if self.normalizer is not None else observation
        if self._transpose:
            if isinstance(obs, Mapping):
                obs = dict(obs)
                for k in self._transpose:
                    obs[k] = np.transpose(np.asarray(obs[k]), (0, 3, 1, 2))
            else:
                obs = np.transpose(np.asarray(obs), (0, 3, 1, 2))
        actions, _ = self.policy.predict(obs, deterministic=deterministic)
        return np.asarray(actions).reshape((-1, *(self.action_space.shape or ())))

    # ----------------------------------------------------------------------------------- checkpoints
    def _checkpoint_policy(self) -> dict[str, Any]:
        normalization = None
        if self.normalizer is not None:
            normalization, _ = self.normalizer.to_checkpoint()
        return {
            "algo": self.algo,
            "policy": self.policy_name,
            "policy_kwargs": self.policy_kwargs,
            "policy_observation_space": space_to_json(self.policy.observation_space),
            "normalization": normalization,
        }

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        # Cloned: shared modules (PPO's shared features extractor) would otherwise share storage,
        # which safetensors refuses.
        tensors = {f"policy.{k}": v.detach().to("cpu").clone() for k, v in self.policy.state_dict().items()}
        if self.normalizer is not None:
            tensors.update(self.normalizer.to_checkpoint()[1])
        return tensors

    @classmethod
    def _from_checkpoint(
        cls,
        observation_space: gym.Space,
        action_space: gym.Space,
        policy: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
    ) -> SB3Policy:
        try:
            algo, name, kwargs = policy["algo"], policy["policy"], policy["policy_kwargs"]
            net_space = space_from_json(policy["policy_observation_space"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the sb3 policy metadata is damaged ({exc!r})") from None
        if not isinstance(algo, str) or not isinstance(name, str):
            raise CheckpointError(f"the sb3 policy metadata names algo={algo!r}, policy={name!r}: not names")
        try:
            net = build_sb3_policy(algo, name, net_space, action_space, kwargs)
        except ValueError as exc:
            raise CheckpointError(f"cannot rebuild the sb3 policy: {exc}") from None
        state = {k.removeprefix("policy."): v for k, v in tensors.items() if k.startswith("policy.")}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"the sb3 policy weights do not fit {algo} {name}: {exc}") from None
        net.set_training_mode(False)
        normalization = policy.get("normalization")
        normalizer = ObservationNormalizer.from_checkpoint(normalization, tensors) if normalization else None
        try:
            return cls(observation_space, action_space, net, algo, name, kwargs, normalizer)
        except ValueError as exc:
            raise CheckpointError(f"the sb3 policy metadata is inconsistent: {exc}") from None
