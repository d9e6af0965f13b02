"""The recorder stores exactly the episodes that ran, with the right boundaries, seeds and extras.

Every recording is checked two ways: against a reference the test builds itself from what the env
returned (reset observations, actions sent, rewards, end flags), and by replaying each stored
episode in a fresh env from its stored seed and actions (bit-identical observations, same rewards,
flags and expert labels).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from stable_baselines3.common.vec_env import DummyVecEnv

import loopsim  # noqa: F401  (registers the env ids)
from loopsim.datasets import STEP_EXTRAS, EpisodeStore
from loopsim.datasets.recorder import (
    EpisodeRecorder,
    RecordEpisodes,
    RecordVecEnv,
    RecordVectorEpisodes,
    unbatch_info,
)
from loopsim.envs import make_expert

ENV_ID = "loopsim/FactoryPickPlace-v0"
ALL_EXTRAS = tuple(STEP_EXTRAS)


class ExpertLabels(gym.Wrapper):
    """Test-local labeller following the recorder's contract.

    ``info["expert_action"]``: the expert's action for the returned state (reset and step infos);
    ``info["intervention"]``: True when the expert took over this step (every ``every``-th step),
    in which case the expert's action is executed and reported as ``info["executed_action"]``.
    """

    def __init__(self, env: gym.Env, every: int = 0) -> None:
        super().__init__(env)
        self.expert = make_expert(env.unwrapped, noise_std=0.0, seed=0)
        self.every = every
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        obs, info = self.env.reset(seed=seed, options=options)
        self.t = 0
        info["expert_action"] = self.expert.act()
        return obs, info

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict]:
        self.t += 1
        intervene = self.every > 0 and self.t % self.every == 0
        if intervene:
            action = self.expert.act()
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["intervention"] = intervene
        if intervene:
            info["executed_action"] = action
        info["expert_action"] = self.expert.act()
        return obs, reward, terminated, truncated, info


def make_env(every: int = 0, **kwargs: Any) -> gym.Env:
    return ExpertLabels(gym.make(ENV_ID, **kwargs), every=every)


def new_store(path: Any, env: Any, extras: tuple[str, ...] = ALL_EXTRAS, **kwargs: Any) -> EpisodeStore:
    obs_space = getattr(env, "single_observation_space", env.observation_space)
    act_space = getattr(env, "single_action_space", env.action_space)
    return EpisodeStore.create(path, observation_space=obs_space, action_space=act_space, env_id=ENV_ID,
                               env_kwargs=kwargs, step_extras=extras)


def obs_row(obs: Any, t: int) -> Any:
    return {k: v[t] for k, v in obs.items()} if isinstance(obs, dict) else obs[t]


def assert_obs_equal(a: Any, b: Any) -> None:
    if isinstance(a, dict) or isinstance(b, dict):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@dataclass
class Ref:
    """What the test saw of one episode, independently of the recorder."""

    env: int
    seed: int | None
    obs0: Any
    site_params: dict = field(default_factory=dict)
    actions: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    final_obs: Any = None
    terminated: bool = False
    truncated: bool = False


def copy_obs(obs: Any) -> Any:
    return {k: np.array(v) for k, v in obs.items()} if isinstance(obs, dict) else np.array(obs)


def check_against_refs(store: EpisodeStore, refs: list[Ref], policy_id: str = "") -> None:
    assert len(store) == len(refs)
    for k, (ep, ref) in enumerate(zip(store, refs, strict=True)):
        meta = ep.metadata
        assert meta.seed == ref.seed, k
        assert_obs_equal(obs_row(ep.observations, 0), ref.obs0)
        if ref.final_obs is not None:
            assert_obs_equal(obs_row(ep.observations, -1), ref.final_obs)
        np.testing.assert_array_equal(ep.actions, np.stack(ref.actions))
        np.testing.assert_array_equal(ep.rewards, np.asarray(ref.rewards, dtype=np.float64))
        assert len(ep) == meta.length == len(ref.actions)
        assert meta.episode_return == pytest.approx(float(np.sum(np.asarray(ref.rewards, dtype=np.float64))))
        assert not ep.terminated[:-1].any() and not ep.truncated[:-1].any()
        assert (bool(ep.terminated[-1]), bool(ep.truncated[-1])) == (ref.terminated, ref.truncated), k
        assert meta.policy_id == policy_id
        assert meta.wall_time > 0
        if ref.site_params:
            assert meta.site == "lab"
            assert meta.site_params == pytest.approx(ref.site_params)
    seeds = [r.seed for r in refs if r.seed is not None]
    assert len(set(seeds)) == len(seeds), "every episode has its own seed"


def check_replay(store: EpisodeStore, kwargs_of: Any) -> None:
    """Replay every stored episode from its seed in a fresh env: bit-identical, same labels."""
    for k, ep in enumerate(store):
        meta = ep.metadata
        env = make_env(**kwargs_of(k))
        try:
            obs, info = env.reset(seed=meta.seed)
            assert info["seed"] == meta.seed
            assert_obs_equal(obs, obs_row(ep.observations, 0))
            label = info["expert_action"]
            for t, action in enumerate(ep.actions):
                if "expert_action" in ep.extras:
                    np.testing.assert_array_equal(ep.extras["expert_action"][t], label)
                obs, reward, terminated, truncated, info = env.step(action)
                assert_obs_equal(obs, obs_row(ep.observations, t + 1))
                assert ep.rewards[t] == np.float64(reward)
                assert bool(ep.terminated[t]) == terminated and bool(ep.truncated[t]) == truncated
                if "is_success" in ep.extras:
                    assert bool(ep.extras["is_success"][t]) == info["is_success"]
                label = info["expert_action"]
            assert terminated or truncated
            assert meta.success == info["is_success"]
            assert meta.failure_mode == info["failure_mode"]
        finally:
            env.close()


# --------------------------------------------------------------------------- single env


def test_single_env_every_episode_stored_and_replays(tmp_path: Any) -> None:
    env = make_env(every=3, max_steps=6)
    store = new_store(tmp_path / "s", env, max_steps=6)
    rec = RecordEpisodes(env, store, policy_id="random", policy_version="v1", iteration=2, tags={"k": "v"})
    rec.action_space.seed(0)
    refs: list[Ref] = []
    labels: list[list[np.ndarray]] = []
    interventions: list[list[bool]] = []
    for k in range(5):
        obs, info = rec.reset(seed=100 + k if k % 2 == 0 else None)
        ref = Ref(0, info["seed"], copy_obs(obs), info["site_params"])
        labels.append([info["expert_action"]])
        interventions.append([])
        while True:
            action = rec.action_space.sample()
            obs, reward, terminated, truncated, info = rec.step(action)
            ref.actions.append(info.get("executed_action", action))
            ref.rewards.append(reward)
            labels[-1].append(info["expert_action"])
            interventions[-1].append(info["intervention"])
            if terminated or truncated:
                ref.terminated, ref.truncated, ref.final_obs = terminated, truncated, copy_obs(obs)
                break
        refs.append(ref)
        assert rec.episodes_recorded == k + 1
    assert [r.seed for r in refs[::2]] == [100, 102, 104]
    rec.close()
    store.close()

    store = EpisodeStore.open(tmp_path / "s")
    check_against_refs(store, refs, policy_id="random")
    for ep, lab, itv in zip(store, labels, interventions, strict=True):
        np.testing.assert_array_equal(ep.extras["expert_action"], np.stack(lab[:-1]))
        np.testing.assert_array_equal(ep.extras["intervention"], itv)
        assert ep.metadata.interventions == sum(itv) > 0
        assert (ep.metadata.policy_version, ep.metadata.iteration, ep.metadata.tags) == ("v1", 2, {"k": "v"})
        assert ep.metadata.failure_mode == "timeout" and not ep.metadata.success
    check_replay(store, lambda k: {"max_steps": 6})


def test_single_env_expert_success_goal_obs(tmp_path: Any) -> None:
    env = make_env(obs_mode="goal", max_steps=150)
    store = new_store(tmp_path / "s", env, obs_mode="goal", max_steps=150)
    rec = RecordEpisodes(env, store, policy_id="expert")
    obs, info = rec.reset(seed=3)
    ref = Ref(0, 3, copy_obs(obs), info["site_params"])
    while True:
        action = info["expert_action"]
        obs, reward, terminated, truncated, info = rec.step(action)
        ref.actions.append(action)
        ref.rewards.append(reward)
        if terminated or truncated:
            ref.terminated, ref.truncated, ref.final_obs = terminated, truncated, copy_obs(obs)
            break
    store.close()
    store = EpisodeStore.open(tmp_path / "s")
    assert isinstance(store[0].observations, dict)
    check_against_refs(store, [ref], policy_id="expert")
    meta = store.metadata_row(0)
    assert meta.success and meta.failure_mode is None and store[0].terminated[-1]
    check_replay(store, lambda k: {"obs_mode": "goal", "max_steps": 150})


def test_single_env_time_limit_cartpole(tmp_path: Any) -> None:
    env = gym.make("CartPole-v1", max_episode_steps=12)
    store = EpisodeStore.create(tmp_path / "s", observation_space=env.observation_space,
                                action_space=env.action_space)
    rec = RecordEpisodes(env, store)
    rec.action_space.seed(1)
    refs = []
    for k in range(8):
        seed = 10 + k if k < 4 else None
        obs, info = rec.reset(seed=seed)
        ref = Ref(0, seed, copy_obs(obs))
        while True:
            action = rec.action_space.sample() if k % 2 else 1  # always pushing right falls over
            obs, reward, terminated, truncated, info = rec.step(action)
            ref.actions.append(action)
            ref.rewards.append(reward)
            if terminated or truncated:
                ref.terminated, ref.truncated, ref.final_obs = terminated, truncated, copy_obs(obs)
                break
        refs.append(ref)
    assert any(r.truncated for r in refs) and any(r.terminated for r in refs)
    check_against_refs(store, refs)
    assert all(len(ep) == 12 for ep in store if ep.truncated[-1])
    assert [store.metadata_row(k).seed for k in range(8)] == [10, 11, 12, 13, None, None, None, None]
    # a seeded episode replays
    replay = gym.make("CartPole-v1", max_episode_steps=12)
    ep = store[0]
    obs, _ = replay.reset(seed=ep.metadata.seed)
    np.testing.assert_array_equal(obs, ep.observations[0])
    for t, action in enumerate(ep.actions):
        obs, *_ = replay.step(int(action))
        np.testing.assert_array_equal(obs, ep.observations[t + 1])
    store.close()


def test_unfinished_episodes_are_discarded(tmp_path: Any) -> None:
    env = make_env(max_steps=6)
    store = new_store(tmp_path / "s", env)
    rec = RecordEpisodes(env, store)
    rec.reset(seed=0)
    for _ in range(3):
        rec.step(np.zeros(4, dtype=np.float32))
    rec.reset(seed=1)  # cuts the first episode off: not stored
    assert len(store) == 0
    terminated = truncated = False
    while not (terminated or truncated):
        _, _, terminated, truncated, _ = rec.step(np.zeros(4, dtype=np.float32))
    rec.reset(seed=2)
    rec.step(np.zeros(4, dtype=np.float32))
    rec.close()  # cuts the third episode off
    assert len(store) == 1 and store[0].metadata.seed == 1 and len(store[0]) == 6
    assert not rec.recorder.is_recording(0)
    store.close()


@pytest.mark.parametrize("seed", [2**63, 2**64 + 7, np.uint64(2**64 - 1)])
def test_a_seed_the_store_cannot_keep_is_refused_at_reset(tmp_path: Any, seed: Any) -> None:
    """The env takes any non-negative seed; the store's seeds are int64. The episode ran to its end
    and was lost there (``EpisodeMetadata`` refused the seed) before."""
    env = make_env(max_steps=3)
    store = new_store(tmp_path / "s", env)
    rec = RecordEpisodes(env, store)
    with pytest.raises(ValueError, match=r"seed \d+: a store keeps episode seeds in \[0, 2\*\*63\)"):
        rec.reset(seed=seed)
    assert not rec.recorder.is_recording(0)
    rec.reset(seed=2**63 - 1)  # the largest it keeps
    terminated = truncated = False
    while not (terminated or truncated):
        _, _, terminated, truncated, _ = rec.step(np.zeros(4, dtype=np.float32))
    rec.close()
    assert len(store) == 1 and store[0].metadata.seed == 2**63 - 1
    store.close()


def test_missing_extra_is_a_clear_error(tmp_path: Any) -> None:
    env = gym.make(ENV_ID, max_steps=4)  # no labelling wrapper
    store = new_store(tmp_path / "a", env, extras=("expert_action",))
    with pytest.raises(ValueError, match="'expert_action'"):
        RecordEpisodes(env, store).reset(seed=0)
    store.close()

    store = new_store(tmp_path / "b", env, extras=("intervention",))
    rec = RecordEpisodes(env, store)
    rec.reset(seed=0)
    with pytest.raises(ValueError, match="'intervention'"):
        rec.step(np.zeros(4, dtype=np.float32))
    assert len(store) == 0 and not rec.recorder.is_recording(0)
    store.close()

    cartpole = gym.make("CartPole-v1")
    store = EpisodeStore.create(tmp_path / "c", observation_space=cartpole.observation_space,
                                action_space=cartpole.action_space, step_extras=("is_success",))
    rec = RecordEpisodes(cartpole, store)
    rec.reset(seed=0)
    with pytest.raises(ValueError, match="'is_success'"):
        rec.step(0)
    store.close()


def test_space_mismatch_refused(tmp_path: Any) -> None:
    cartpole = gym.make("CartPole-v1")
    store = EpisodeStore.create(tmp_path / "s", observation_space=cartpole.observation_space,
                                action_space=cartpole.action_space)
    with pytest.raises(ValueError, match="shape"):
        RecordEpisodes(gym.make(ENV_ID, max_steps=4), store)
    store.close()


def test_recorder_direct_api(tmp_path: Any) -> None:
    env = gym.make("CartPole-v1")
    store = EpisodeStore.create(tmp_path / "s", observation_space=env.observation_space,
                                action_space=env.action_space)
    recorder = EpisodeRecorder(store, policy_id="p")
    with pytest.raises(RuntimeError, match="begin"):
        recorder.record_step(0, 0, np.zeros(4), 1.0, False, False, {})
    obs, info = env.reset(seed=5)
    recorder.begin(3, obs, info, seed=5)
    assert recorder.is_recording(3) and recorder.steps(3) == 0
    obs2, *_ = env.step(1)
    assert recorder.record_step(3, 1, obs2, 1.0, False, True, {"is_success": True, "failure_mode": None}) == 0
    assert recorder.episodes_recorded == 1 and recorder.last_index == 0
    meta = store.metadata_row(0)
    assert (meta.seed, meta.success, meta.length, meta.policy_id) == (5, True, 1, "p")
    assert recorder.discard(3) is False
    store.close()


def test_unbatch_info_nested_and_masked() -> None:
    infos = {
        "seed": np.array([1, 2, 0]), "_seed": np.array([True, True, False]),
        "site_params": {"m": np.array([0.1, 0.2, 0.0]), "_m": np.array([True, True, False])},
        "_site_params": np.array([True, True, False]),
        "failure_mode": np.array([None, "timeout", None], dtype=object),
        "_failure_mode": np.array([False, True, False]),
    }
    assert unbatch_info(infos, 1) == {"seed": 2, "site_params": {"m": 0.2}, "failure_mode": "timeout"}
    assert unbatch_info(infos, 2) == {}


# --------------------------------------------------------------------------- gymnasium vector envs

MAX_STEPS = (5, 7, 4)  # different per sub-env, so episodes end at different steps


def vector_kwargs(i: int, obs_mode: str) -> dict[str, Any]:
    return {"max_steps": MAX_STEPS[i], "obs_mode": obs_mode}


def start_ref(obs: Any, infos: dict, i: int) -> Ref:
    info = unbatch_info(infos, i)
    return Ref(i, int(info["seed"]), copy_obs(obs_row(obs, i)), info["site_params"])


def drive_vector(venv: Any, mode: AutoresetMode, n_target: int, seed: int,
                 mask_reset: bool = False) -> list[Ref]:
    """Run a vector env until ``n_target`` episodes ended; return what the test saw of them.

    Ended sub-envs are reset with ``options["reset_mask"]`` in ``DISABLED`` mode, and in
    ``NEXT_STEP`` mode too with ``mask_reset`` (instead of letting the next step reset them).
    """
    n = venv.num_envs
    rng = np.random.default_rng(seed)
    obs, infos = venv.reset(seed=seed)
    current: list[Ref | None] = [start_ref(obs, infos, i) for i in range(n)]
    assert [r.seed for r in current] == [seed + i for i in range(n)]
    finished: list[Ref] = []
    just_done = np.zeros(n, dtype=bool)
    while len(finished) < n_target:
        actions = rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)
        obs, rewards, terminations, truncations, infos = venv.step(actions)
        for i in range(n):
            if mode == AutoresetMode.NEXT_STEP and just_done[i]:
                current[i] = start_ref(obs, infos, i)  # the reset step: action ignored
                continue
            ref = current[i]
            ref.actions.append(actions[i])
            ref.rewards.append(rewards[i])
            if terminations[i] or truncations[i]:
                ref.terminated, ref.truncated = bool(terminations[i]), bool(truncations[i])
                if mode == AutoresetMode.SAME_STEP:
                    ref.final_obs = copy_obs(infos["final_obs"][i])
                    current[i] = start_ref(obs, infos, i)
                else:
                    ref.final_obs = copy_obs(obs_row(obs, i))
                    current[i] = None
                finished.append(ref)
        just_done = terminations | truncations
        if (mode == AutoresetMode.DISABLED or mask_reset) and just_done.any():
            seeds = [int(rng.integers(2**31 - 1)) if d else None for d in just_done]
            obs, infos = venv.reset(seed=seeds, options={"reset_mask": just_done.copy()})
            for i in np.flatnonzero(just_done):
                current[i] = start_ref(obs, infos, i)
                assert current[i].seed == seeds[i]
            just_done[:] = False
    return finished


@pytest.mark.parametrize("obs_mode", ["state", "goal"])
@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED])
def test_sync_vector_env(tmp_path: Any, mode: AutoresetMode, obs_mode: str) -> None:
    fns = [functools.partial(make_env, **vector_kwargs(i, obs_mode)) for i in range(len(MAX_STEPS))]
    venv = SyncVectorEnv(fns, autoreset_mode=mode, copy=False)  # reused buffers: the recorder must copy
    store = new_store(tmp_path / "s", venv, obs_mode=obs_mode)
    rec = RecordVectorEpisodes(venv, store, policy_id="random")
    refs = drive_vector(rec, mode, n_target=7, seed=40)
    assert rec.episodes_recorded == len(refs) >= 7
    rec.close()  # the episodes in flight are discarded
    store.close()
    store = EpisodeStore.open(tmp_path / "s")
    check_against_refs(store, refs, policy_id="random")
    assert all(not ep.extras["intervention"].any() for ep in store)
    check_replay(store, lambda k: vector_kwargs(refs[k].env, obs_mode))


def test_sync_vector_env_next_step_reset_mask(tmp_path: Any) -> None:
    """NEXT_STEP, but ended sub-envs are reset explicitly: the next step is a real step again."""
    fns = [functools.partial(make_env, **vector_kwargs(i, "state")) for i in range(len(MAX_STEPS))]
    venv = SyncVectorEnv(fns)
    store = new_store(tmp_path / "s", venv)
    rec = RecordVectorEpisodes(venv, store)
    refs = drive_vector(rec, AutoresetMode.NEXT_STEP, n_target=5, seed=5, mask_reset=True)
    check_against_refs(store, refs)
    check_replay(store, lambda k: vector_kwargs(refs[k].env, "state"))
    rec.close()
    store.close()


def test_async_vector_env(tmp_path: Any) -> None:
    fns = [functools.partial(gym.make, f"loopsim:{ENV_ID}", obs_mode="goal", max_steps=MAX_STEPS[i])
           for i in range(2)]
    venv = AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP, context="spawn")
    store = new_store(tmp_path / "s", venv, extras=("is_success",), obs_mode="goal")
    rec = RecordVectorEpisodes(venv, store)
    try:
        refs = drive_vector(rec, AutoresetMode.SAME_STEP, n_target=4, seed=7)
    finally:
        rec.close()
    check_against_refs(store, refs)
    check_replay(store, lambda k: vector_kwargs(refs[k].env, "goal"))
    store.close()


# --------------------------------------------------------------------------- stable-baselines3 VecEnv


def drive_sb3(venv: Any, n_target: int, seed: int, n_actions: int | None = None) -> list[Ref]:
    """Run an SB3 VecEnv until ``n_target`` episodes ended; return what the test saw of them."""
    n = venv.num_envs
    rng = np.random.default_rng(seed)
    venv.seed(seed)
    obs = venv.reset()

    def start(i: int, seed_i: int | None) -> Ref:
        info = venv.reset_infos[i]
        return Ref(i, info.get("seed", seed_i), copy_obs(obs_row(obs, i)), info.get("site_params", {}))

    current = [start(i, seed + i) for i in range(n)]
    finished: list[Ref] = []
    while len(finished) < n_target:
        if n_actions is None:
            actions = rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)
        else:
            actions = rng.integers(n_actions, size=n) | (rng.random(n) < 0.5)  # biased: some fall
        obs, rewards, dones, infos = venv.step(actions)
        for i in range(n):
            ref = current[i]
            ref.actions.append(infos[i].get("executed_action", actions[i]))
            ref.rewards.append(rewards[i])
            if dones[i]:
                ref.truncated = bool(infos[i]["TimeLimit.truncated"])
                ref.terminated = not ref.truncated
                ref.final_obs = copy_obs(infos[i]["terminal_observation"])
                finished.append(ref)
                current[i] = start(i, None)
    return finished


@pytest.mark.parametrize("obs_mode", ["state", "goal"])
def test_sb3_dummy_vec_env(tmp_path: Any, obs_mode: str) -> None:
    fns = [functools.partial(make_env, every=3, **vector_kwargs(i, obs_mode)) for i in range(2)]
    venv = DummyVecEnv(fns)
    store = new_store(tmp_path / "s", venv, obs_mode=obs_mode)
    rec = RecordVecEnv(venv, store, policy_id="sb3")
    refs = drive_sb3(rec, n_target=6, seed=11)
    assert [r.seed for r in refs if r.env == 0][0] == 11 and [r.seed for r in refs if r.env == 1][0] == 12
    assert rec.episodes_recorded == len(refs)
    rec.close()
    store.close()
    store = EpisodeStore.open(tmp_path / "s")
    check_against_refs(store, refs, policy_id="sb3")
    assert sum(store.metadata()["interventions"]) > 0
    check_replay(store, lambda k: vector_kwargs(refs[k].env, obs_mode))


def test_sb3_time_limit_cartpole(tmp_path: Any) -> None:
    fns = [functools.partial(gym.make, "CartPole-v1", max_episode_steps=12) for _ in range(2)]
    venv = DummyVecEnv(fns)
    store = EpisodeStore.create(tmp_path / "s", observation_space=venv.observation_space,
                                action_space=venv.action_space)
    rec = RecordVecEnv(venv, store)
    refs = drive_sb3(rec, n_target=8, seed=3, n_actions=2)
    assert any(r.truncated for r in refs) and any(r.terminated for r in refs)
    check_against_refs(store, refs)
    assert all(len(ep) == 12 for ep in store if ep.truncated[-1])
    seeds = [store.metadata_row(k).seed for k in range(len(store))]
    assert sorted(s for s in seeds if s is not None) == [3, 4]  # the seeded resets; auto-resets unknown
    rec.close()
    store.close()
