"""Typed configs for ``loopsim collect`` and ``loopsim train``: YAML files, command-line overrides, checks.

A config is YAML parsed with :func:`yaml.safe_load` (no code runs from a config) into pydantic models
with ``extra="forbid"``; polymorphic sections (the policy) are discriminated unions on ``type:``.
Any key can be overridden from the command line as ``key.sub=value`` (the value is parsed as YAML:
``train.epochs=50``, ``env.site=heavy_slippery``, ``eval.sites=[lab,fast_conveyor]``,
``policy.noise_std=0.1``). A bad key or value raises :class:`ConfigError` naming the key, the value
and what is allowed, before any work starts (:func:`check_env_config` also builds the env once).

Example (``configs/train/factory_pick_bc.yaml``)::

    seed: 0
    env: {id: loopsim/FactoryPickPlace-v0, site: lab, kwargs: {obs_mode: state}}
    policy: {type: bc, hidden_sizes: [256, 256]}
    train: {stores: [runs/demos/pick_lab.zarr], epochs: 30, batch_size: 256, lr: 0.001}
    eval: {sites: [lab], episodes: 20, every: 5}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from loopsim.yaml_io import describe_yaml_error, load_unique, number_text_hint

__all__ = [
    "BCPolicyConfig",
    "BCTrainConfig",
    "CheckpointPolicyConfig",
    "CollectConfig",
    "ConfigError",
    "EnvConfig",
    "MAX_EPISODES",
    "EvalConfig",
    "ExpertPolicyConfig",
    "RandomPolicyConfig",
    "SB3PolicyConfig",
    "SB3TrainConfig",
    "TrainConfig",
    "apply_overrides",
    "check_env_config",
    "dump_config",
    "load_config",
]

#: Largest seed accepted anywhere in a config (seeds are passed to NumPy, torch and PyBullet).
MAX_SEED = 2**31 - 1
#: Most episodes one collect or evaluation job runs (per site). Its episodes are scheduled up front
#: (a worker pool's queue): 2e9 of them ran out of memory after the store was created. Collect more
#: in several jobs (``mode=append seed=<next>``).
MAX_EPISODES = 100_000
#: Largest learning rate accepted: just under float32's largest value (3.4028e38), which torch keeps
#: learning rates in (above it training failed with an overflow).
MAX_LEARNING_RATE = 3.4e38


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the key, the value and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, strict=True)


# ================================================================================================ env
class EnvConfig(_Strict):
    """Which env to run, where.

    Attributes:
        id: A registered loopsim env id (``loopsim envs`` lists them).
        site: A bundled site name of the env's domain, or an inline mapping of site parameters.
        kwargs: Other ``gymnasium.make`` keyword arguments (``obs_mode``, ``reward_type``,
            ``image_size``...), JSON values only.
    """

    id: str
    site: str | dict[str, JsonValue] = "lab"
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _known_id(cls, value: str) -> str:
        from loopsim.envs import ENV_ENTRY_POINTS

        if value not in ENV_ENTRY_POINTS:
            raise ValueError(f"unknown env id; allowed: {sorted(ENV_ENTRY_POINTS)}")
        return value

    @field_validator("kwargs")
    @classmethod
    def _no_site_in_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "site" in value:
            raise ValueError("give the site as env.site, not inside env.kwargs")
        return value

    def make(self, site: str | Mapping[str, Any] | None = None, **extra: Any) -> Any:
        """``gymnasium.make`` this env (at ``site`` instead of :attr:`site` when given)."""
        import gymnasium as gym

        import loopsim  # noqa: F401 - registers the ids

        return gym.make(self.id, site=self.site if site is None else site, **{**self.kwargs, **extra})


# ============================================================================================= policy
class ExpertPolicyConfig(_Strict):
    """The task's scripted expert (``noise_std``: Gaussian noise on its motion commands [action units])."""

    type: Literal["expert"] = "expert"
    noise_std: float = Field(0.0, ge=0.0, allow_inf_nan=False)


class RandomPolicyConfig(_Strict):
    """Uniformly random actions."""

    type: Literal["random"] = "random"


class CheckpointPolicyConfig(_Strict):
    """A saved policy checkpoint directory (any kind), e.g. a training run's ``checkpoint/``."""

    type: Literal["checkpoint"] = "checkpoint"
    path: str

    @field_validator("path")
    @classmethod
    def _is_checkpoint(cls, value: str) -> str:
        from loopsim.policies.checkpoint import CheckpointError, read_checkpoint

        try:
            read_checkpoint(value)
        except CheckpointError as exc:
            raise ValueError(str(exc)) from None
        return value


class SB3PolicyConfig(_Strict):
    """A stable-baselines3 algorithm trained by ``loopsim train``.

    Attributes:
        algo: Any SB3 algorithm by name (``PPO``, ``SAC``, ``TD3``, ``A2C``, ``DDPG``...).
        policy: SB3 policy name; ``auto`` picks ``MultiInputPolicy`` for dict observations,
            ``CnnPolicy`` for images, else ``MlpPolicy``.
        her: Use hindsight experience replay (off-policy algorithms, ``goal`` observations).
        her_kwargs: Keyword arguments of ``HerReplayBuffer`` (``n_sampled_goal``,
            ``goal_selection_strategy``).
        normalize: Normalise observations with ``VecNormalize`` (statistics saved in the checkpoint).
        algo_kwargs: Keyword arguments of the algorithm (``learning_rate``, ``buffer_size``,
            ``batch_size``, ``gamma``, ``learning_starts``...), JSON values only.
        policy_kwargs: ``policy_kwargs`` of the algorithm: ``net_arch`` and ``activation_fn`` by name
            (one of :data:`loopsim.policies.sb3.ACTIVATIONS`: ``relu``, ``tanh``, ``elu``...), JSON
            values only.
    """

    type: Literal["sb3"] = "sb3"
    algo: str = "SAC"
    policy: str = "auto"
    her: bool = False
    her_kwargs: dict[str, JsonValue] = Field(default_factory=dict)
    normalize: bool = False
    algo_kwargs: dict[str, JsonValue] = Field(default_factory=dict)
    policy_kwargs: dict[str, JsonValue] = Field(default_factory=dict)

    @field_validator("algo")
    @classmethod
    def _known_algo(cls, value: str) -> str:
        from loopsim.policies.sb3 import sb3_algorithms

        algos = sb3_algorithms()
        if value not in algos:
            raise ValueError(f"unknown SB3 algorithm; allowed: {sorted(algos)}")
        return value


class BCPolicyConfig(_Strict):
    """Behaviour cloning in torch: an MLP for state observations, a small CNN for ``rgb``.

    Attributes:
        hidden_sizes: Widths of the MLP's hidden layers (after the CNN encoder for images).
        activation: Activation between layers.
        cnn_channels: Output channels of the CNN's convolution layers (``rgb`` only).
    """

    type: Literal["bc"] = "bc"
    hidden_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [256, 256])
    activation: Literal["relu", "tanh", "elu", "gelu", "leaky_relu"] = "relu"
    cnn_channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [32, 64, 64])


RolloutPolicyConfig = Annotated[
    ExpertPolicyConfig | RandomPolicyConfig | CheckpointPolicyConfig, Field(discriminator="type")
]
TrainPolicyConfig = Annotated[SB3PolicyConfig | BCPolicyConfig, Field(discriminator="type")]


# =============================================================================================== eval
class EvalConfig(_Strict):
    """Periodic evaluation during training (and the final one).

    Attributes:
        sites: Sites to evaluate at (bundled names of the env's domain).
        episodes: Episodes per site; episode ``i`` uses seed ``seed + i`` at every site.
        seed: First evaluation seed (held out: keep it away from the training seeds).
        every: Evaluate every this many env steps (``sb3``) or epochs (``bc``); 0 = only at the end.
        workers: Worker processes for evaluation (1 = in the training process).
        deterministic: Act without exploration noise.
    """

    sites: list[str] = Field(default_factory=lambda: ["lab"], min_length=1)
    episodes: int = Field(20, ge=1, le=MAX_EPISODES)
    seed: int = Field(1_000_000, ge=0, le=MAX_SEED)
    every: int = Field(0, ge=0)
    workers: int = Field(1, ge=1, le=64)
    deterministic: bool = True

    @model_validator(mode="after")
    def _seeds_fit(self) -> EvalConfig:
        if self.seed + self.episodes - 1 > MAX_SEED:  # loopsim eval and collect refuse it too
            raise ValueError(f"seed + episodes - 1 = {self.seed + self.episodes - 1} exceeds {MAX_SEED}")
        return self


# ============================================================================================== train
class SB3TrainConfig(_Strict):
    """Training settings for ``policy.type: sb3``.

    Attributes:
        total_timesteps: Env steps to train for (summed over parallel envs).
        n_envs: Parallel envs (``DummyVecEnv`` in-process, or ``SubprocVecEnv`` with ``subproc``).
        subproc: Run the parallel envs in subprocesses.
        checkpoint_every: Write the checkpoint and the resume state every this many env steps.
        failure_penalty: Subtracted from the reward of a training step that ends its episode in an
            unrecoverable failure (``terminated`` without ``info["is_success"]``, e.g. ``dropped``);
            0 = the env's reward unchanged. The factory tasks' rewards are negative at every step, so
            ending an episode early by failing (dropping the part) otherwise pays; the penalty makes
            it cost. Training only: evaluation, logged episode returns and stores use the env's
            reward.
        num_threads: Torch CPU threads while training (``None``: torch's default, one per core). One
            thread (the default) makes a run independent of the machine's core count (floating-point
            reductions split across threads sum in another order: the same seed gave another SAC
            learning curve with 2 threads) and is not slower for the small MLPs of ``state``
            policies on a shared machine; raise it for ``rgb`` CNNs.
    """

    type: Literal["sb3"] = "sb3"
    total_timesteps: int = Field(ge=1)
    n_envs: int = Field(1, ge=1, le=64)
    subproc: bool = False
    checkpoint_every: int = Field(10_000, ge=1)
    failure_penalty: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    num_threads: int | None = Field(1, ge=1, le=256)


class BCTrainConfig(_Strict):
    """Training settings for ``policy.type: bc``.

    Attributes:
        stores: Episode stores to learn from (all their episodes, viewed as one).
        success_only: Keep only successful episodes.
        max_episodes: Use at most the first this many episodes (``None``: all).
        epochs: Passes over the transitions.
        batch_size: Transitions per gradient step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay (L2).
        device: Torch device (``cpu``, ``cuda``, ``auto``).
        action_key: Regression targets: the actions taken in the stored episodes (``action``), or the
            expert's label of each visited state (``expert_action``; stores collected with
            ``expert_labels: true``). With demos from a noisy expert, ``expert_action`` is DART-style
            noise injection (Laskey et al. 2017): the noise widens the visited states, the labels stay
            clean.
        num_threads: Torch CPU threads while training (``None``: torch's default, one per core). One
            thread is fastest for the small MLPs of ``state`` BC (several threads on a shared machine
            oversubscribe it: 6x slower measured on 2 busy cores); raise it for ``rgb`` CNNs.
    """

    type: Literal["bc"] = "bc"
    stores: list[str] = Field(min_length=1)
    success_only: bool = False

    @field_validator("stores")
    @classmethod
    def _stores_once(cls, value: list[str]) -> list[str]:
        """Refuse a store listed twice: it trained on its episodes twice over, silently.

        Also as ``dir/./s.zarr``, ``s.zarr/`` or a ``file://`` URL of the same folder: local paths are
        compared resolved.
        """
        from loopsim.datasets.store import _local_path

        keys = []
        for s in value:
            remote = "://" in s and not s.startswith("file://")
            keys.append(s.rstrip("/") if remote else os.path.realpath(_local_path(s)))
        for i, k in enumerate(keys):
            if k in keys[:i]:
                first = value[keys.index(k)]
                same = "" if first == value[i] else f" (as {first!r} and {value[i]!r})"
                raise ValueError(f"{value[i]!r} is listed more than once{same}; list each store once")
        return value
    max_episodes: int | None = Field(None, ge=1)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0, le=MAX_LEARNING_RATE, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    action_key: Literal["action", "expert_action"] = "action"
    num_threads: int | None = Field(1, ge=1, le=256)


class TrainConfig(_Strict):
    """A ``loopsim train`` run.

    Attributes:
        seed: Seed of everything random in the run (network init, env seeds, sampling).
        run_dir: Where the run directory goes (default ``runs/<config file stem>``).
        env: The env trained in (for ``bc``: evaluated in).
        policy: What to train (``sb3`` or ``bc``).
        train: Training settings; their kind follows ``policy.type``.
        eval: Periodic and final evaluation.
    """

    seed: int = Field(0, ge=0, le=MAX_SEED)
    run_dir: str | None = None
    env: EnvConfig
    policy: TrainPolicyConfig
    train: Annotated[SB3TrainConfig | BCTrainConfig, Field(discriminator="type")]
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _train_kind_follows_policy(cls, data: Any) -> Any:
        if (
            isinstance(data, Mapping)
            and isinstance(data.get("policy"), Mapping)
            and isinstance(data.get("train"), Mapping)
            and "type" not in data["train"]
        ):
            data = {**data, "train": {"type": data["policy"].get("type"), **data["train"]}}
        return data

    @model_validator(mode="after")
    def _train_matches_policy(self) -> TrainConfig:
        if self.train.type != self.policy.type:
            raise ValueError(
                f"train settings of type {self.train.type!r} do not fit policy.type {self.policy.type!r}"
            )
        return self


# ============================================================================================ collect
class CollectConfig(_Strict):
    """A ``loopsim collect`` job: run a policy at a site for N episodes into a store.

    Attributes:
        seed: Episode ``i`` is reset with seed ``seed + i``.
        env: The env and site.
        policy: ``expert`` (default), ``random`` or a ``checkpoint``.
        episodes: Number of episodes.
        workers: Worker processes, each running whole episodes on its own (no lockstep).
        store: The episode store to write.
        mode: ``create`` a new store (refused if it exists), ``append`` to an existing one of the
            same env, or ``overwrite`` an existing store.
        expert_labels: Store the expert's action at every visited state (``expert_action`` step
            extra, what DAgger relabels).
        deterministic: Act without exploration noise (the expert's ``noise_std`` applies only when
            False).
        policy_id: Stored with every episode (default: the policy's type, or the checkpoint name).
        iteration: Loop iteration stored with every episode.
        tags: Free-form JSON tags stored with every episode.
    """

    seed: int = Field(0, ge=0, le=MAX_SEED)
    env: EnvConfig
    policy: RolloutPolicyConfig = Field(default_factory=ExpertPolicyConfig)
    episodes: int = Field(ge=1, le=MAX_EPISODES)
    workers: int = Field(1, ge=1, le=64)
    store: str = Field(min_length=1)
    mode: Literal["create", "append", "overwrite"] = "create"
    expert_labels: bool = True
    deterministic: bool = False
    policy_id: str | None = None
    iteration: int = Field(0, ge=0)
    tags: dict[str, JsonValue] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _policy_type_defaults_to_expert(cls, data: Any) -> Any:
        # ``policy.noise_std=0.1`` on the command line overrides the default (expert) policy.
        if (
            isinstance(data, Mapping)
            and isinstance(data.get("policy"), Mapping)
            and "type" not in data["policy"]
        ):
            data = {**data, "policy": {"type": "expert", **data["policy"]}}
        return data

    @field_validator("tags")
    @classmethod
    def _finite_tags(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_finite(value, "tags")
        return value

    @model_validator(mode="after")
    def _seeds_fit(self) -> CollectConfig:
        if self.seed + self.episodes - 1 > MAX_SEED:
            raise ValueError(f"seed + episodes - 1 = {self.seed + self.episodes - 1} exceeds {MAX_SEED}")
        return self


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN/inf anywhere in a JSON value (JSON has no such numbers)."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} holds the non-finite number {value!r}; JSON values must be finite")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]")


# ============================================================================================ loading
M = TypeVar("M", bound=BaseModel)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def override_key(item: str) -> str:
    """The dotted key an override ``key.sub=value`` sets (``" train . epochs=3"`` -> ``train.epochs``)."""
    return ".".join(part.strip() for part in item.partition("=")[0].strip().split("."))


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a config mapping (values parsed as YAML).

    Args:
        data: The config as loaded from YAML.
        overrides: Strings ``dotted.key=value``; ``value`` is YAML (``50``, ``0.1``, ``[a, b]``,
            ``null``, ``{uniform: [0.1, 0.2]}``); unparsable values stay strings.

    Returns:
        A new mapping (``data`` is not changed).

    Raises:
        ConfigError: If an override has no ``=``, an empty key part, descends into a value that is
            not a mapping, or sets a key an earlier override set.
    """
    import copy

    out = copy.deepcopy(dict(data))
    given: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        dotted = override_key(item)
        if dotted in given:  # the last one won, silently (Hydra refuses this too)
            raise ConfigError(
                f"override {dotted} is given twice ({given[dotted]!r} and {item!r}): give it once"
            )
        given[dotted] = item
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a section"
                )
            node = child
        node[parts[-1]] = _parse_value(raw)
    return out


def _walk(model: type[BaseModel], loc: Sequence[Any]) -> tuple[list[str], Any]:
    """Follow a pydantic error location through ``model``.

    Returns:
        ``(key path as a user writes it, model or annotation reached)``; discriminated-union tags
        that pydantic inserts into locations (``policy.bc.hidden``) are left out of the path.
    """
    import types
    import typing

    shown: list[str] = []
    current: Any = model
    for part in loc:
        members = _union_members(current)
        if members is not None:
            if part in members:
                current = members[part]
                continue
            current = None
        elif typing.get_origin(current) in (typing.Union, types.UnionType) and isinstance(part, str):
            current = None  # the member tag of a plain union (``str``, ``dict[str,...]``): not a key
            continue
        if (
            isinstance(current, type)
            and issubclass(current, BaseModel)
            and isinstance(part, str)
            and part in current.model_fields
        ):
            current = current.model_fields[part].annotation
        elif typing.get_origin(current) in (dict, Mapping) and isinstance(part, str):
            current = typing.get_args(current)[1]  # a user's key of a mapping section (``policies.<name>``)
        elif typing.get_origin(current) is list and isinstance(part, int):
            current = typing.get_args(current)[0]  # an item of a list section (``envs.0``)
        else:
            current = None
        shown.append(str(part))
    if current is not None and _union_members(current) is None:
        args = [a for a in typing.get_args(current) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            current = models[0]
    return shown, current


def _union_members(annotation: Any) -> dict[str, type[BaseModel]] | None:
    """``{tag: model}`` if ``annotation`` is a union of models discriminated by ``type``."""
    import typing

    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return None
    models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(models) < 2 or not all("type" in m.model_fields for m in models):
        return None
    return {m.model_fields["type"].default: m for m in models}


def _format_errors(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"invalid config {source}:"]
    seen: set[str] = set()
    for err in exc.errors():
        shown, _ = _walk(model, err["loc"])
        key = ".".join(shown)
        value = err.get("input")
        if not key:  # a check across several keys: its message names them
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
            continue
        if key in seen:  # one line per key (a value that fits no member of a union fails each)
            continue
        seen.add(key)
        if err["type"] == "extra_forbidden":
            parent, reached = _walk(model, err["loc"][:-1])
            allowed = (
                sorted(reached.model_fields)
                if isinstance(reached, type) and issubclass(reached, BaseModel)
                else "?"
            )
            where = ".".join(parent)
            lines.append(
                f"  {key}: unknown key (value {value!r}); allowed keys"
                f"{' in ' + where if where else ''}: {allowed}"
            )
        elif err["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            members = _union_members(_walk(model, err["loc"])[1]) or {}
            got = (err.get("ctx") or {}).get("tag", "(missing)")
            lines.append(f"  {key}.type = {got!r}: not allowed; allowed: {sorted(members)}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {key} = {value!r}: {msg}{_text_hint(value)}")
    return "\n".join(lines)


def _text_hint(value: Any) -> str:
    """`` (hint)`` for a number YAML read as text (:func:`~loopsim.yaml_io.number_text_hint`), else ``""``."""
    hint = number_text_hint(value)
    return f" ({hint})" if hint else ""


def load_config(
    model: type[M], source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()
) -> M:
    """Read a YAML config (or a mapping), apply overrides, validate into ``model``.

    Args:
        model: The config model (:class:`TrainConfig`, :class:`CollectConfig`...).
        source: A YAML file path or an already-loaded mapping.
        overrides: ``key.sub=value`` strings (see :func:`apply_overrides`).

    Returns:
        The validated config.

    Raises:
        ConfigError: If the file is missing or not YAML, the top level is not a mapping, an override is
            malformed, or a key/value is invalid (every problem is listed with its key, value and
            what is allowed).
    """
    name = "<mapping>"
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        path = Path(source)
        name = str(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = load_unique(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {describe_yaml_error(exc)}") from None
        if data is None:
            data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config {name} must be a mapping of keys to values, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, model, name)) from None


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (every default filled in), as saved in run directories."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def check_env_config(env: EnvConfig, sites: Sequence[str] = ()) -> None:
    """Check, before any work starts, that the env can be built at its site and at ``sites``.

    Builds the env once (then closes it) so that bad ``kwargs`` are caught here, and checks every
    site name against the domain's bundled sites.

    Raises:
        ConfigError: Naming ``env.site``, ``env.kwargs`` or ``eval.sites`` and what is allowed.
    """
    import gymnasium as gym

    from loopsim.envs import SiteError, available_sites, env_class

    domain = env_class(env.id).site_schema.domain
    allowed = available_sites(domain)
    for key, names in (
        ("env.site", [env.site] if isinstance(env.site, str) else []),
        ("eval.sites", list(sites)),
    ):
        for name in names:
            if name not in allowed:
                raise ConfigError(f"{key}: site {name!r} is not a {domain} site; allowed: {allowed}")
    try:
        e = env.make()
    except SiteError as exc:
        raise ConfigError(f"env.site = {env.site!r}: {exc}") from None
    except (TypeError, ValueError, RuntimeError, gym.error.Error) as exc:
        raise ConfigError(f"env.kwargs = {env.kwargs!r}: {exc}") from None
    e.close()
