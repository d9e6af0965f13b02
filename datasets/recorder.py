"""Record the episodes an env runs into an :class:`~loopsim.datasets.store.EpisodeStore`.

Three wrappers cover the ways episodes are run, all built on one :class:`EpisodeRecorder`:

- :class:`RecordEpisodes` for a single ``gymnasium.Env``;
- :class:`RecordVectorEpisodes` for a Gymnasium ``VectorEnv`` (``SyncVectorEnv``,
  ``AsyncVectorEnv``) in any ``autoreset_mode``;
- :class:`RecordVecEnv` for a stable-baselines3 ``VecEnv`` (``DummyVecEnv``, ``SubprocVecEnv``).

::

    store = EpisodeStore.create(path, observation_space=env.observation_space,
                                action_space=env.action_space, env_id=env.spec.id)
    env = RecordEpisodes(env, store, policy_id="expert")
    obs, info = env.reset(seed=0)
    ...                                    # every finished episode is committed to the store
    env.close(); store.close()

**Episode boundaries.** An episode begins at a reset (an explicit ``reset()`` or a vector env's
auto-reset) and ends at the first step with ``terminated`` or ``truncated`` True; it is then
committed to the store (:meth:`EpisodeStore.add_episode`) at once. Its observations start with the
observation that reset returned, then one per step; for a vector env the last one is the real final
observation (``info["final_obs"]`` / ``info["terminal_observation"]``), never the next episode's reset
observation. Running ``N`` episodes to their end stores exactly ``N`` episodes, in the order they
ended (sub-envs in index order within one vector step).

**Unfinished episodes are not stored.** An episode cut off by ``reset()``, ``close()`` or
:meth:`EpisodeRecorder.discard` before it terminated or was truncated is dropped: the store holds
only complete episodes, so every stored episode replays from its seed.

**Metadata** (:class:`~loopsim.datasets.schema.EpisodeMetadata`) comes from the infos:

- ``seed``: the reset info's ``"seed"`` (loopsim envs report every episode's seed there, also for
  unseeded resets and auto-resets), else the seed passed to ``reset()``, else ``None`` (unknown: a
  generic env auto-reset without a seed);
- ``site`` / ``site_params``: the reset info's ``"site"`` and ``"site_params"`` (``""`` / ``{}`` if absent);
- ``success``: the last step info's ``"is_success"`` (False if absent); ``failure_mode``: its
  ``"failure_mode"`` (``None`` if absent);
- ``policy_id``, ``policy_version``, ``iteration``, ``tags``: from the recorder, read when the episode
  begins (change the attributes between episodes, e.g. after a policy update);
- ``wall_time``: seconds (``time.perf_counter``) from the reset to the end of the episode;
- ``episode_return``, ``length``, ``interventions``: computed by the store from the data.

**Step extras.** For each extra the store declares (``store.step_extras``) every episode must carry a
value per step, read from the infos by key; a missing key raises ``ValueError`` naming it (and the
episode is dropped). The contract for an env (usually a wrapper) that provides them:

- ``info["expert_action"]``: the expert's action for the state of the observation returned *with*
  this info. Put it in the reset info (label of the reset state) and in every step info (label of the
  next state; optional on the last step of an episode). The recorder stores, at step ``t``, the label
  of the state ``obs[t]`` in which ``action[t]`` was taken: the reset info's label at ``t = 0``, the
  label from step ``t - 1``'s info after that. Shape and dtype of an action.
- ``info["intervention"]``: in every step info, ``True`` when the action just executed was the
  expert's (it took over from the policy), else ``False``.
- ``info["is_success"]``: in every step info (loopsim envs always give it).

**Substituted actions.** The stored action is the one passed to ``step``. A wrapper *inside* the
recorder that replaces it (an intervention taking over, a safety filter) must report the action it
actually executed as ``info["executed_action"]``; the recorder then stores that one, so that
``reset(seed=stored_seed)`` followed by the stored actions replays the episode.

Vector envs: ``expert_action``, ``intervention``, ``is_success`` and ``executed_action`` are read from
each sub-env's own info (Gymnasium's batched info dicts are split per sub-env, using the ``_key``
masks; SB3's per-env info dicts are used as they are), so the labelling wrapper goes around each
sub-env, inside the vector env.

The recorder does not own the store: closing a wrapper discards the episodes in flight and leaves
the store open (close it yourself, which merges its pending episodes). ``RecordVecEnv`` is defined
on first access, so that importing this module does not import stable-baselines3 (and torch).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper

from loopsim.datasets.schema import Episode, EpisodeMetadata, to_plain
from loopsim.datasets.store import EpisodeStore

if TYPE_CHECKING:
    from stable_baselines3.common.vec_env import VecEnv

# RecordVecEnv is made on first access (module __getattr__): importing SB3 imports torch.
__all__ = ["EpisodeRecorder", "RecordEpisodes", "RecordVecEnv", "RecordVectorEpisodes", "unbatch_info"]  # noqa: F822


def _copy_obs(observation: Any) -> Any:
    """A private copy of one observation (vector envs may reuse their buffers)."""
    if isinstance(observation, Mapping):
        return {k: np.array(v, copy=True) for k, v in observation.items()}
    return np.array(observation, copy=True)


def _stack_obs(observations: Sequence[Any]) -> Any:
    """Stack ``T + 1`` observations along a new first axis (per key for a dict observation)."""
    if isinstance(observations[0], Mapping):
        return {k: np.stack([o[k] for o in observations]) for k in observations[0]}
    return np.stack(observations)


def _index_obs(observation: Any, i: int) -> Any:
    """Sub-env ``i``'s observation out of a batched one (an array, or a mapping of arrays)."""
    if isinstance(observation, Mapping):
        return {k: _index_obs(v, i) for k, v in observation.items()}
    return observation[i]


def unbatch_info(infos: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Sub-env ``i``'s info out of a Gymnasium vector env's batched info dict.

    Gymnasium batches infos as ``{key: (n_envs, ...) array, "_key": (n_envs,) bool mask}``, nested
    dicts recursively (e.g. ``site_params``); a key whose mask is False for ``i`` was not in that
    sub-env's info and is left out.

    Args:
        infos: The batched info dict returned by a vector env's ``reset`` or ``step``.
        i: Sub-env index.

    Returns:
        The sub-env's info, values as numpy scalars or arrays (objects for ``str``/``None``).
    """
    out: dict[str, Any] = {}
    for key, value in infos.items():
        if key.startswith("_") and key[1:] in infos:
            continue  # a mask
        mask = infos.get(f"_{key}")
        if mask is not None and not mask[i]:
            continue
        if isinstance(value, Mapping):
            out[key] = unbatch_info(value, i)
        elif isinstance(value, np.ndarray) and value.ndim >= 1:
            out[key] = value[i]
        else:
            out[key] = value
    return out


class _Buffer:
    """The episode in flight of one (sub-)env."""

    def __init__(self, observation: Any, info: Mapping[str, Any], seed: int | None,
                 recorder: EpisodeRecorder) -> None:
        self.start = time.perf_counter()
        self.observations: list[Any] = [_copy_obs(observation)]
        self.actions: list[np.ndarray] = []
        self.rewards: list[float] = []
        self.extras: dict[str, list[Any]] = {name: [] for name in recorder.store.step_extras}
        self.label: Any = None  # expert's action for the state of observations[-1]
        info_seed = info.get("seed")
        self.seed = int(info_seed) if info_seed is not None else (None if seed is None else int(seed))
        if self.seed is not None and not 0 <= self.seed < 2**63:
            # refused here, at the reset: the store's check (int64 seeds) came at the episode's last step
            raise ValueError(
                f"seed {self.seed}: a store keeps episode seeds in [0, 2**63) (int64), so this episode "
                "could not be stored; reset with a smaller seed"
            )
        self.site = str(info.get("site", "") or "")
        self.site_params = to_plain(dict(info.get("site_params", {}) or {}), strict=False)
        self.policy_id = recorder.policy_id
        self.policy_version = recorder.policy_version
        self.iteration = recorder.iteration
        self.tags = to_plain(dict(recorder.tags), strict=False)


class EpisodeRecorder:
    """Buffer the episodes of one env or vector env and commit each to a store when it ends.

    The wrappers (:class:`RecordEpisodes`, :class:`RecordVectorEpisodes`, :class:`RecordVecEnv`)
    drive it; call it directly to record from a custom rollout loop: :meth:`begin` after each reset,
    :meth:`record_step` after each step. See the module docstring for what is recorded from where.

    Args:
        store: The store to write to, open for writing. The recorder does not close it.
        policy_id: Which policy acts (e.g. ``"expert"``, a run name).
        policy_version: Version of that policy (e.g. checkpoint step or hash).
        iteration: Loop iteration gathering the episodes (0 outside the loop).
        tags: Free-form JSON-able mapping stored with every episode.

    Attributes:
        store: The store.
        policy_id, policy_version, iteration, tags: Stored with each episode; read when it begins.
        episodes_recorded: Number of episodes committed by this recorder.
        last_index: Store index of the last committed episode (``None`` before the first).
    """

    def __init__(self, store: EpisodeStore, *, policy_id: str = "", policy_version: str = "",
                 iteration: int = 0, tags: Mapping[str, Any] | None = None) -> None:
        if not store.writable:
            raise ValueError(f"store {store.url} is not open for writing")
        self.store = store
        self.policy_id = str(policy_id)
        self.policy_version = str(policy_version)
        self.iteration = int(iteration)
        self.tags: dict[str, Any] = dict(tags or {})
        self.episodes_recorded = 0
        self.last_index: int | None = None
        self._buffers: dict[int, _Buffer] = {}

    def is_recording(self, env_index: int = 0) -> bool:
        """True while sub-env ``env_index`` has an episode in flight (begun, not yet ended)."""
        return int(env_index) in self._buffers

    def steps(self, env_index: int = 0) -> int:
        """Steps taken so far in sub-env ``env_index``'s episode in flight (0 if none)."""
        buf = self._buffers.get(int(env_index))
        return 0 if buf is None else len(buf.actions)

    def begin(self, env_index: int, observation: Any, info: Mapping[str, Any],
              seed: int | None = None) -> None:
        """Start an episode of sub-env ``env_index`` (call after its reset).

        An unfinished episode of the same sub-env is discarded (not stored).

        Args:
            env_index: Sub-env index (0 for a single env).
            observation: The reset observation, ``(*obs_shape)`` or a mapping key -> array.
            info: The reset info (of this sub-env alone): ``seed``, ``site``, ``site_params`` and,
                with the ``expert_action`` extra, ``expert_action`` ``(*action_shape)``.
            seed: The seed passed to ``reset``, used when the info has no ``"seed"``.

        Raises:
            ValueError: If the store declares ``expert_action`` and the info lacks it, or the episode's
                seed is outside ``[0, 2**63)`` (a store's seeds are int64; the env takes larger ones).
        """
        env_index = int(env_index)
        self._buffers.pop(env_index, None)
        buf = _Buffer(observation, info, seed, self)
        if "expert_action" in buf.extras:
            buf.label = self._label(info, env_index, "the reset info")
        self._buffers[env_index] = buf

    def _label(self, info: Mapping[str, Any], env_index: int, where: str) -> np.ndarray:
        value = info.get("expert_action")
        if value is None:
            raise ValueError(
                f"the store declares the step extra 'expert_action' but {where} of env {env_index} has no "
                "'expert_action' key: the env (a labelling wrapper) must put the expert's action for the "
                "state it returns into the reset info and every step info")
        return np.array(value, copy=True)

    def record_step(self, env_index: int, action: Any, next_observation: Any, reward: float,
                    terminated: bool, truncated: bool, info: Mapping[str, Any]) -> int | None:
        """Record one step of sub-env ``env_index``; commit the episode if it ended.

        Args:
            env_index: Sub-env index (0 for a single env).
            action: The action taken, ``(*action_shape)`` (replaced by ``info["executed_action"]``
                when present).
            next_observation: The observation after the step; for the last step of an episode the
                real final observation, not the next episode's reset observation.
            reward: The step's reward.
            terminated: Gymnasium's ``terminated``.
            truncated: Gymnasium's ``truncated`` (time limit).
            info: The step info of this sub-env alone (``is_success``, ``failure_mode`` and the
                declared step extras).

        Returns:
            The store index of the committed episode when this step ended it, else ``None``.

        Raises:
            RuntimeError: If no episode of ``env_index`` is in flight (call :meth:`begin` first).
            ValueError: If the info lacks a declared step extra, or the episode does not fit the
                store (the episode is dropped in both cases).
        """
        env_index = int(env_index)
        buf = self._buffers.get(env_index)
        if buf is None:
            raise RuntimeError(f"no episode in flight for env {env_index}: call begin() after its reset")
        done = bool(terminated) or bool(truncated)
        t = len(buf.actions)
        try:
            extras: dict[str, Any] = {}
            for name in buf.extras:
                if name == "expert_action":
                    extras[name] = buf.label
                    if not done:
                        buf.label = self._label(info, env_index, f"the step info of step {t}")
                elif info.get(name) is None:
                    raise ValueError(
                        f"the store declares the step extra {name!r} but the step info of env {env_index} "
                        f"at step {t} has no {name!r} key")
                else:
                    extras[name] = bool(info[name])
        except ValueError:
            self._buffers.pop(env_index, None)
            raise
        executed = info.get("executed_action")
        buf.actions.append(np.array(action if executed is None else executed, copy=True))
        buf.rewards.append(float(reward))
        buf.observations.append(_copy_obs(next_observation))
        for name, value in extras.items():
            buf.extras[name].append(value)
        if not done:
            return None
        del self._buffers[env_index]
        return self._commit(buf, bool(terminated), bool(truncated), info)

    def _commit(self, buf: _Buffer, terminated: bool, truncated: bool, info: Mapping[str, Any]) -> int:
        n = len(buf.actions)
        term = np.zeros(n, dtype=bool)
        trunc = np.zeros(n, dtype=bool)
        term[-1], trunc[-1] = terminated, truncated
        failure = info.get("failure_mode")
        meta = EpisodeMetadata(
            seed=buf.seed, site=buf.site, site_params=buf.site_params, policy_id=buf.policy_id,
            policy_version=buf.policy_version, iteration=buf.iteration,
            success=bool(info.get("is_success", False)),
            failure_mode=None if failure is None else str(failure),
            wall_time=time.perf_counter() - buf.start, tags=buf.tags)
        episode = Episode(
            observations=_stack_obs(buf.observations), actions=np.stack(buf.actions),
            rewards=np.asarray(buf.rewards, dtype=np.float64), terminated=term, truncated=trunc,
            extras={k: np.stack(v) if k == "expert_action" else np.asarray(v, dtype=bool)
                    for k, v in buf.extras.items()},
            metadata=meta)
        index = self.store.add_episode(episode)
        self.episodes_recorded += 1
        self.last_index = index
        return index

    def discard(self, env_index: int = 0) -> bool:
        """Drop sub-env ``env_index``'s unfinished episode (e.g. cut off by ``close``): it is not stored.

        Returns:
            True if there was an episode in flight.
        """
        return self._buffers.pop(int(env_index), None) is not None

    def discard_all(self) -> int:
        """Drop every unfinished episode; returns how many there were."""
        n = len(self._buffers)
        self._buffers.clear()
        return n


def _check_spaces(store: EpisodeStore, observation_space: gym.Space, action_space: gym.Space) -> None:
    """Refuse an env whose spaces do not have the store's shapes (before any episode is run)."""
    s_obs = store.observation_space
    if isinstance(s_obs, gym.spaces.Dict) != isinstance(observation_space, gym.spaces.Dict):
        raise ValueError(f"the env's observation space {observation_space} does not match the store's "
                         f"{s_obs}")
    if isinstance(s_obs, gym.spaces.Dict):
        if set(s_obs.spaces) != set(observation_space.spaces):
            raise ValueError(f"the env's observation keys {sorted(observation_space.spaces)} differ from the "
                             f"store's {sorted(s_obs.spaces)}")
        pairs = [(f"observation[{k!r}]", s_obs[k], observation_space[k]) for k in s_obs.spaces]
    else:
        pairs = [("observation", s_obs, observation_space)]
    pairs.append(("action", store.action_space, action_space))
    for what, theirs, ours in pairs:
        if tuple(theirs.shape or ()) != tuple(ours.shape or ()):
            raise ValueError(f"the env's {what} space has shape {ours.shape}, the store's {theirs.shape}")


def _make_recorder(store: EpisodeStore | EpisodeRecorder, kwargs: dict[str, Any]) -> EpisodeRecorder:
    if isinstance(store, EpisodeRecorder):
        if any(v for v in kwargs.values()):
            raise TypeError("pass policy_id, policy_version, iteration and tags to the EpisodeRecorder, "
                            "not to the wrapper, when giving a recorder")
        return store
    return EpisodeRecorder(store, **kwargs)


class RecordEpisodes(gym.Wrapper):
    """Record every episode a single ``gymnasium.Env`` runs (see the module docstring).

    Each ``reset`` begins an episode (discarding an unfinished one); each step that terminates or
    truncates commits it. Observations, actions, rewards and infos pass through unchanged.

    Args:
        env: The env (observations ``(*obs_shape)`` or a dict; actions ``(*action_shape)``).
        store: An :class:`EpisodeStore` open for writing (a new :class:`EpisodeRecorder` is made with
            the keyword arguments), or an :class:`EpisodeRecorder`.
        policy_id: See :class:`EpisodeRecorder`.
        policy_version: See :class:`EpisodeRecorder`.
        iteration: See :class:`EpisodeRecorder`.
        tags: See :class:`EpisodeRecorder`.

    Raises:
        ValueError: If the env's spaces do not have the store's shapes.

    Attributes:
        recorder: The :class:`EpisodeRecorder`.
    """

    def __init__(self, env: gym.Env, store: EpisodeStore | EpisodeRecorder, *, policy_id: str = "",
                 policy_version: str = "", iteration: int = 0, tags: Mapping[str, Any] | None = None) -> None:
        super().__init__(env)
        self.recorder = _make_recorder(store, dict(policy_id=policy_id, policy_version=policy_version,
                                                   iteration=iteration, tags=tags))
        _check_spaces(self.recorder.store, env.observation_space, env.action_space)

    @property
    def episodes_recorded(self) -> int:
        """Episodes committed so far."""
        return self.recorder.episodes_recorded

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset the env and begin recording an episode (the seed is kept as fallback metadata)."""
        obs, info = self.env.reset(seed=seed, options=options)
        self.recorder.begin(0, obs, info, seed=seed)
        return obs, info

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict]:
        """Step the env and record the transition (committing the episode when it ends)."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.recorder.is_recording(0):
            self.recorder.record_step(0, action, obs, reward, terminated, truncated, info)
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        """Close the env; an unfinished episode is discarded (the store stays open)."""
        self.recorder.discard(0)
        super().close()


class RecordVectorEpisodes(VectorWrapper):
    """Record every episode of every sub-env of a Gymnasium ``VectorEnv`` (see the module docstring).

    Handles the three ``autoreset_mode``s (read from ``env.metadata["autoreset_mode"]``, default
    ``NEXT_STEP``):

    - ``NEXT_STEP``: the step after a sub-env's episode ended returns its reset observation and
      reset info, and the action sent to it is ignored: that step begins the next episode;
    - ``SAME_STEP``: the ending step returns the reset observation; the final observation and the
      final step info are read from ``info["final_obs"]`` and ``info["final_info"]``;
    - ``DISABLED``: ended sub-envs wait for ``reset(options={"reset_mask": mask})``.

    ``reset`` with a ``reset_mask`` begins episodes only for the masked sub-envs; an integer seed
    gives sub-env ``i`` the seed ``seed + i``, as Gymnasium does.

    Args:
        env: The vector env (batched observations ``(n_envs, *obs_shape)`` or a dict of them).
        store: An :class:`EpisodeStore` open for writing, or an :class:`EpisodeRecorder`.
        policy_id: See :class:`EpisodeRecorder`.
        policy_version: See :class:`EpisodeRecorder`.
        iteration: See :class:`EpisodeRecorder`.
        tags: See :class:`EpisodeRecorder`.

    Raises:
        ValueError: If the single-env spaces do not have the store's shapes.

    Attributes:
        recorder: The :class:`EpisodeRecorder` (sub-env ``i`` is its ``env_index`` ``i``).
        autoreset_mode: The vector env's :class:`gymnasium.vector.AutoresetMode`.
    """

    def __init__(self, env: VectorEnv, store: EpisodeStore | EpisodeRecorder, *, policy_id: str = "",
                 policy_version: str = "", iteration: int = 0, tags: Mapping[str, Any] | None = None) -> None:
        super().__init__(env)
        self.recorder = _make_recorder(store, dict(policy_id=policy_id, policy_version=policy_version,
                                                   iteration=iteration, tags=tags))
        _check_spaces(self.recorder.store, env.single_observation_space, env.single_action_space)
        self.autoreset_mode = AutoresetMode(env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP))
        self._autoreset = np.zeros(self.num_envs, dtype=bool)

    @property
    def episodes_recorded(self) -> int:
        """Episodes committed so far."""
        return self.recorder.episodes_recorded

    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset (all or the ``options["reset_mask"]`` sub-envs) and begin their episodes.

        Returns:
            The vector env's batched ``(observations, infos)``, unchanged.
        """
        n = self.num_envs
        mask = None if options is None else options.get("reset_mask")
        mask = np.ones(n, dtype=bool) if mask is None else np.array(mask, dtype=bool, copy=True)
        if seed is None:
            seeds: list[int | None] = [None] * n
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(n)]
        else:
            seeds = list(seed)
        obs, infos = self.env.reset(seed=seed, options=options)
        for i in np.flatnonzero(mask):
            self.recorder.begin(int(i), _index_obs(obs, i), unbatch_info(infos, i), seed=seeds[i])
        self._autoreset[mask] = False
        return obs, infos

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every sub-env and record each one's transition (see the class docstring).

        Returns:
            The vector env's batched ``(observations, rewards, terminations, truncations, infos)``,
            unchanged.
        """
        obs, rewards, terminations, truncations, infos = self.env.step(actions)
        rec = self.recorder
        for i in range(self.num_envs):
            action = _index_obs(actions, i)
            info = unbatch_info(infos, i)
            done = bool(terminations[i]) or bool(truncations[i])
            if self.autoreset_mode == AutoresetMode.NEXT_STEP and self._autoreset[i]:
                rec.begin(i, _index_obs(obs, i), info)  # the reset step: the action was ignored
                continue
            if self.autoreset_mode == AutoresetMode.SAME_STEP and done:
                final_obs = infos["final_obs"][i]
                final_info = unbatch_info(infos["final_info"], i)
                if rec.is_recording(i):
                    rec.record_step(i, action, final_obs, rewards[i], terminations[i], truncations[i],
                                    final_info)
                reset_info = {k: v for k, v in info.items() if k not in ("final_obs", "final_info")}
                rec.begin(i, _index_obs(obs, i), reset_info)
                continue
            if rec.is_recording(i):
                rec.record_step(i, action, _index_obs(obs, i), rewards[i], terminations[i],
                                truncations[i], info)
        self._autoreset = np.logical_or(terminations, truncations)
        return obs, rewards, terminations, truncations, infos

    def close(self, **kwargs: Any) -> None:
        """Close the vector env; unfinished episodes are discarded (the store stays open)."""
        self.recorder.discard_all()
        super().close(**kwargs)


def _record_vec_env_class() -> type:
    """Define :class:`RecordVecEnv` (imports stable-baselines3, and with it torch, on first use)."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class RecordVecEnv(VecEnvWrapper):
        """Record every episode of every sub-env of a stable-baselines3 ``VecEnv`` (see the module docstring).

        SB3 vector envs reset a sub-env in the same step its episode ends: the recorder takes the final
        observation from ``infos[i]["terminal_observation"]``, reads ``infos[i]["TimeLimit.truncated"]``
        as ``truncated`` (else the end is ``terminated``), and begins the next episode with the returned
        observation and the reset info from the base VecEnv's ``reset_infos`` (SB3's own wrappers do not
        forward them; this wrapper exposes them as its ``reset_infos``).

        Seeds: ``seed(s)`` (before ``reset()``) gives sub-env ``i`` the seed ``s + i``; they are kept as
        fallback metadata for the episodes begun by that ``reset()``. Auto-reset episodes have the seed
        their reset info reports (loopsim envs), else ``None``.

        Args:
            venv: The SB3 vector env (observations ``(n_envs, *obs_shape)`` or a dict of them).
            store: An :class:`EpisodeStore` open for writing, or an :class:`EpisodeRecorder`.
            policy_id: See :class:`EpisodeRecorder`.
            policy_version: See :class:`EpisodeRecorder`.
            iteration: See :class:`EpisodeRecorder`.
            tags: See :class:`EpisodeRecorder`.

        Raises:
            ValueError: If the spaces do not have the store's shapes.

        Attributes:
            recorder: The :class:`EpisodeRecorder` (sub-env ``i`` is its ``env_index`` ``i``).
        """

        def __init__(self, venv: VecEnv, store: EpisodeStore | EpisodeRecorder, *, policy_id: str = "",
                     policy_version: str = "", iteration: int = 0,
                     tags: Mapping[str, Any] | None = None) -> None:
            super().__init__(venv)
            self.recorder = _make_recorder(store, dict(policy_id=policy_id, policy_version=policy_version,
                                                       iteration=iteration, tags=tags))
            _check_spaces(self.recorder.store, venv.observation_space, venv.action_space)
            self._seeds: list[int | None] = [None] * self.num_envs
            self._actions: np.ndarray | None = None

        @property
        def episodes_recorded(self) -> int:
            """Episodes committed so far."""
            return self.recorder.episodes_recorded

        def _base_reset_infos(self) -> list[dict[str, Any]]:
            return list(self.venv.unwrapped.reset_infos)

        def seed(self, seed: int | None = None) -> Sequence[int | None]:
            """Seed the sub-envs at the next ``reset()`` (sub-env ``i`` gets ``seed + i``).

            Returns:
                The seeds, one per sub-env.
            """
            seeds = self.venv.seed(seed)
            self._seeds = list(seeds) if seeds is not None else [None] * self.num_envs
            return seeds

        def reset(self) -> Any:
            """Reset every sub-env and begin their episodes (unfinished ones are discarded).

            Returns:
                The batched observations, unchanged.
            """
            seeds = self._seeds
            if all(s is None for s in seeds):  # seeded on the inner VecEnv directly
                inner = getattr(self.venv.unwrapped, "_seeds", None)
                if isinstance(inner, list) and len(inner) == self.num_envs:
                    seeds = list(inner)
            obs = self.venv.reset()
            self._seeds = [None] * self.num_envs
            self.reset_infos = self._base_reset_infos()
            for i in range(self.num_envs):
                self.recorder.begin(i, _index_obs(obs, i), self.reset_infos[i], seed=seeds[i])
            return obs

        def step_async(self, actions: np.ndarray) -> None:
            """Send the actions ``(n_envs, *action_shape)`` (a copy is kept for the record)."""
            self._actions = np.array(actions, copy=True)
            self.venv.step_async(actions)

        def step_wait(self) -> Any:
            """Wait for the step, record each sub-env's transition, begin auto-reset episodes.

            Returns:
                The VecEnv's ``(observations, rewards, dones, infos)``, unchanged.
            """
            obs, rewards, dones, infos = self.venv.step_wait()
            self.reset_infos = self._base_reset_infos()
            rec = self.recorder
            for i in range(self.num_envs):
                info = infos[i]
                if dones[i]:
                    if rec.is_recording(i):
                        if "terminal_observation" not in info:
                            raise RuntimeError(f"sub-env {i} is done but its info has no "
                                               "'terminal_observation'")
                        truncated = bool(info.get("TimeLimit.truncated", False))
                        rec.record_step(i, self._actions[i], info["terminal_observation"], rewards[i],
                                        not truncated, truncated, info)
                    rec.begin(i, _index_obs(obs, i), self.reset_infos[i])
                elif rec.is_recording(i):
                    rec.record_step(i, self._actions[i], _index_obs(obs, i), rewards[i], False, False, info)
            return obs, rewards, dones, infos

        def close(self) -> None:
            """Close the VecEnv; unfinished episodes are discarded (the store stays open)."""
            self.recorder.discard_all()
            self.venv.close()

    RecordVecEnv.__qualname__ = "RecordVecEnv"  # picklable by reference once made
    return RecordVecEnv


def __getattr__(name: str) -> Any:
    """Make ``RecordVecEnv`` on first access, so that importing the recorder does not import torch."""
    if name == "RecordVecEnv":
        cls = _record_vec_env_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
