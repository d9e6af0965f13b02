"""ExpertActionInfo: expert labels in info, without changing the episode; info["seed"] replays episodes.

ExpertIntervention: the expert takes over exactly when the gate says so, for exactly ``takeover_steps``
steps, reports what it executed, and the recorded episodes replay from their seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from loopsim.datasets import EpisodeStore
from loopsim.datasets.recorder import RecordEpisodes
from loopsim.envs import ExpertActionInfo, ExpertIntervention, make_expert


@pytest.fixture
def env_id(factory_env_id: str) -> str:
    """This module is written for the factory tasks (Panda, conveyor, factory sites); the warehouse
    envs have theirs in ``test_warehouse.py``."""
    return factory_env_id



def _rollout(env: gym.Env, seed: int, actions: np.ndarray) -> tuple[list[np.ndarray], list[dict]]:
    obs, info = env.reset(seed=seed)
    observations, infos = [obs], [info]
    for action in actions:
        obs, _, terminated, truncated, info = env.step(action)
        observations.append(obs)
        infos.append(info)
        if terminated or truncated:
            break
    return observations, infos


def test_labels_are_the_experts_action_and_do_not_change_the_episode(env_id: str, make_env) -> None:
    actions = np.random.default_rng(5).uniform(-1, 1, size=(25, 4)).astype(np.float32)
    plain_obs, _ = _rollout(make_env(env_id), 11, actions)
    wrapped = ExpertActionInfo(make_env(env_id))
    reference = make_expert(wrapped, noise_std=0.0)
    obs, info = wrapped.reset(seed=11)
    assert np.array_equal(obs, plain_obs[0])
    assert info["expert_action"].dtype == np.float32 and info["expert_action"].shape == (4,)
    assert np.array_equal(info["expert_action"], reference.act())
    for t, action in enumerate(actions[: len(plain_obs) - 1]):
        obs, _, _, _, info = wrapped.step(action)
        assert np.array_equal(obs, plain_obs[t + 1]), f"labelling changed the episode at step {t}"
        assert np.array_equal(info["expert_action"], reference.act())
        assert np.all(np.abs(info["expert_action"]) <= 1.0)


def test_following_the_labels_solves_the_task_at_lab(env_id: str, make_env) -> None:
    env = ExpertActionInfo(make_env(env_id))
    _, info = env.reset(seed=3)
    for _ in range(env.unwrapped.max_steps):
        _, _, terminated, truncated, info = env.step(info["expert_action"])
        if terminated or truncated:
            break
    assert info["is_success"] is True


def test_unseeded_reset_reports_a_seed_that_replays_the_episode(env_id: str, make_env) -> None:
    env = make_env(env_id)
    env.reset(seed=0)
    actions = np.random.default_rng(1).uniform(-1, 1, size=(10, 4)).astype(np.float32)
    first_obs, first_infos = _rollout(env, None, actions)  # type: ignore[arg-type]
    seed = first_infos[0]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**31
    replay_obs, replay_infos = _rollout(make_env(env_id), seed, actions)
    assert replay_infos[0]["seed"] == seed
    assert len(first_obs) == len(replay_obs)
    for a, b in zip(first_obs, replay_obs, strict=True):
        assert np.array_equal(a, b)


def test_explicit_seed_is_reported(make_env) -> None:
    _, info = make_env("loopsim/FactoryPickPlace-v0").reset(seed=123)
    assert info["seed"] == 123


def test_wrapper_refuses_envs_without_expert() -> None:
    with pytest.raises(TypeError, match="no scripted expert"):
        ExpertActionInfo(gym.make("CartPole-v1"))


# --------------------------------------------------------------------------- ExpertIntervention

PICK_PLACE = "loopsim/FactoryPickPlace-v0"


def _gate(policy_action: np.ndarray, expert_action: np.ndarray, threshold: float) -> bool:
    """The documented takeover condition, computed independently of the wrapper."""
    deviation = float(np.linalg.norm(np.float64(policy_action[:3]) - np.float64(expert_action[:3])))
    return deviation > threshold or float(policy_action[3]) * float(expert_action[3]) < 0


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """``(start, length)`` of every run of True."""
    runs, start = [], None
    for t, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = t
        elif not flag and start is not None:
            runs.append((start, t - start))
            start = None
    return runs


def _far_from(expert_action: np.ndarray, flip_gripper: bool) -> np.ndarray:
    """An action that trips the gate: every motion component >= 1 away (distance >= sqrt(3)), or a
    flipped gripper with the expert's motion."""
    far = np.array(expert_action, dtype=np.float32)
    if flip_gripper and far[3] != 0:
        far[3] = -far[3]
    else:
        far[:3] = np.where(far[:3] > 0, -1.0, 1.0)
    return far


def _run_intervened(env: ExpertIntervention, seed: int, policy: Any, n_steps: int
                    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[dict]]:
    """Run ``policy(t, expert_action) -> action`` (at most ``n_steps``); return observations, the actions
    sent, the expert's actions in the states where they were sent, and the step infos."""
    reference = make_expert(env, noise_std=0.0)
    obs, _ = env.reset(seed=seed)
    observations, sent, experts, infos = [obs], [], [], []
    for t in range(n_steps):
        expert_action = reference.act()
        action = np.asarray(policy(t, expert_action), dtype=np.float32)
        obs, _, terminated, truncated, info = env.step(action)
        observations.append(obs)
        sent.append(action)
        experts.append(expert_action)
        infos.append(info)
        if terminated or truncated:
            break
    return observations, sent, experts, infos


def test_intervention_never_triggers_when_the_policy_is_the_expert(env_id: str, make_env) -> None:
    env = ExpertIntervention(make_env(env_id), threshold=0.05, takeover_steps=3)
    _, sent, _, infos = _run_intervened(env, 4, lambda t, e: e, env.unwrapped.max_steps)
    assert [info["intervention"] for info in infos] == [False] * len(infos)
    assert env.interventions == 0
    for t, (action, info) in enumerate(zip(sent, infos, strict=True)):
        assert info["executed_action"].dtype == np.float32
        assert np.array_equal(info["executed_action"], action), t
    assert infos[-1]["is_success"] is True, "the expert, never overridden, solves the task"


@pytest.mark.parametrize("takeover_steps", [1, 4])
def test_intervention_keeps_control_exactly_takeover_steps(
    env_id: str, make_env, takeover_steps: int
) -> None:
    """The policy follows the expert except at two steps where it strays (motion, then gripper): each
    stray starts a takeover of exactly ``takeover_steps`` steps, and nothing else is flagged."""
    triggers = {1: False, 9: True}  # step -> stray by flipping the gripper (else by the motion)
    env = ExpertIntervention(make_env(env_id), threshold=0.6, takeover_steps=takeover_steps)

    def policy(t: int, expert_action: np.ndarray) -> np.ndarray:
        return _far_from(expert_action, triggers[t]) if t in triggers else expert_action

    _, sent, experts, infos = _run_intervened(env, 2, policy, env.unwrapped.max_steps)
    n = len(infos)
    assert n > max(triggers) + takeover_steps, "episode too short for the test"
    flags = [info["intervention"] for info in infos]
    assert all(type(f) is bool for f in flags)
    expected = [any(s <= t < s + takeover_steps for s in triggers) for t in range(n)]
    assert flags == expected
    assert [length for _, length in _runs(flags)] == [takeover_steps] * len(triggers)
    assert env.interventions == sum(flags) == len(triggers) * takeover_steps
    for t in range(n):
        executed = infos[t]["executed_action"]
        assert np.array_equal(executed, experts[t] if flags[t] else sent[t]), t
    assert not np.array_equal(sent[1], experts[1]) and not np.array_equal(sent[9], experts[9])


def test_intervention_takes_over_from_a_constant_far_action(make_env) -> None:
    takeover_steps = 5
    env = ExpertIntervention(make_env(PICK_PLACE, max_steps=40), threshold=0.6, takeover_steps=takeover_steps)
    far = np.full(4, -1.0, dtype=np.float32)
    for seed in (0, 1):
        _, sent, experts, infos = _run_intervened(env, seed, lambda t, e: far, 100)
        flags = [info["intervention"] for info in infos]
        assert flags[0] is True, "[-1,-1,-1,-1] is far from the expert at the start"
        runs = _runs(flags)
        for start, length in runs[:-1]:
            assert length % takeover_steps == 0, (start, length)
        for t, (info, expert_action) in enumerate(zip(infos, experts, strict=True)):
            if flags[t]:
                assert np.array_equal(info["executed_action"], expert_action), t
            else:
                assert np.array_equal(info["executed_action"], far), t
                assert not _gate(far, expert_action, 0.6), t
        assert env.interventions == sum(flags) > 0
        env.reset(seed=seed)
        assert env.interventions == 0


@pytest.mark.parametrize("takeover_steps", [1, 3])
def test_intervention_flags_follow_the_gate_under_random_actions(make_env, takeover_steps: int) -> None:
    """Random actions near and far from the expert's: the flags are exactly the documented gate
    (checked only when the policy is in control, then held for ``takeover_steps``)."""
    threshold = 0.6
    env = ExpertIntervention(make_env(PICK_PLACE, max_steps=60), threshold=threshold,
                             takeover_steps=takeover_steps)
    rng = np.random.default_rng(7)

    def policy(t: int, expert_action: np.ndarray) -> np.ndarray:
        a = expert_action.astype(np.float64)
        a[:3] += rng.normal(0.0, 0.35, size=3)
        if rng.random() < 0.1:
            a[3] = -a[3]
        return np.clip(a, -1, 1)

    _, sent, experts, infos = _run_intervened(env, 5, policy, 100)
    flags = [info["intervention"] for info in infos]
    expected, left = [], 0
    for action, expert_action in zip(sent, experts, strict=True):
        if left == 0 and _gate(action, expert_action, threshold):
            left = takeover_steps
        expected.append(left > 0)
        left = max(left - 1, 0)
    assert flags == expected
    assert 0 < sum(flags) < len(flags), "the test wants both kinds of step"
    assert env.interventions == sum(flags)
    for t, info in enumerate(infos):
        assert np.array_equal(info["executed_action"], experts[t] if flags[t] else sent[t]), t


def test_recorded_interventions_replay_from_the_stored_seed(tmp_path: Path, make_env) -> None:
    kwargs = {"max_steps": 30}
    intervention = ExpertIntervention(make_env(PICK_PLACE, **kwargs), threshold=0.6, takeover_steps=4)
    labelled = ExpertActionInfo(intervention)
    store = EpisodeStore.create(tmp_path / "s", observation_space=labelled.observation_space,
                                action_space=labelled.action_space, env_id=PICK_PLACE, env_kwargs=kwargs,
                                step_extras=["expert_action", "intervention", "is_success"])
    rec = RecordEpisodes(labelled, store, policy_id="random")
    rng = np.random.default_rng(3)
    sent_per_episode, flags_per_episode, counts = [], [], []
    policies = [
        lambda e: rng.uniform(-1, 1, size=4).astype(np.float32),  # uniform random
        lambda e: np.clip(e + rng.normal(0, 0.4, size=4) * [1, 1, 1, 0], -1, 1).astype(np.float32),
    ]
    for k, policy in enumerate(policies):
        obs, info = rec.reset(seed=20 + k)
        sent, flags = [], []
        while True:
            action = policy(info["expert_action"])
            obs, _, terminated, truncated, info = rec.step(action)
            sent.append(action)
            flags.append(info["intervention"])
            if terminated or truncated:
                break
        sent_per_episode.append(sent)
        flags_per_episode.append(flags)
        counts.append(intervention.interventions)
    rec.close()
    store.close()

    store = EpisodeStore.open(tmp_path / "s")
    assert len(store) == len(policies)
    assert 0 < counts[1] < len(flags_per_episode[1]), "the second episode mixes policy and expert steps"
    for k, ep in enumerate(store):
        flags = flags_per_episode[k]
        assert ep.metadata.seed == 20 + k
        np.testing.assert_array_equal(ep.extras["intervention"], flags)
        assert ep.metadata.interventions == counts[k] == sum(flags)
        for t, flag in enumerate(flags):
            if flag:  # the expert's action was stored, not the one sent
                np.testing.assert_array_equal(ep.actions[t], ep.extras["expert_action"][t])
            else:
                np.testing.assert_array_equal(ep.actions[t], sent_per_episode[k][t])
        replay = store.make_env(site=ep.metadata.site)
        try:
            obs, _ = replay.reset(seed=ep.metadata.seed)
            np.testing.assert_array_equal(obs, ep.observations[0])
            for t, action in enumerate(ep.actions):
                obs, reward, terminated, truncated, info = replay.step(action)
                np.testing.assert_array_equal(obs, ep.observations[t + 1], err_msg=f"episode {k} step {t}")
                assert ep.rewards[t] == np.float64(reward)
            assert terminated or truncated
            assert (bool(ep.terminated[-1]), bool(ep.truncated[-1])) == (terminated, truncated)
            assert ep.metadata.success == info["is_success"]
        finally:
            replay.close()
    store.close()


@pytest.mark.parametrize("kwargs", [
    {"threshold": 0.0}, {"threshold": -0.5}, {"threshold": float("nan")}, {"takeover_steps": 0},
    {"takeover_steps": -3},
])
def test_intervention_rejects_bad_arguments(make_env, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ExpertIntervention(make_env(PICK_PLACE), **kwargs)


def test_intervention_refuses_envs_without_expert() -> None:
    with pytest.raises(TypeError, match="no scripted expert"):
        ExpertIntervention(gym.make("CartPole-v1"))


def test_intervention_is_deterministic(make_env) -> None:
    actions = np.random.default_rng(9).uniform(-1, 1, size=(40, 4)).astype(np.float32)
    actions[::3] = 0.0  # near-expert-ish steps mixed in; gripper 0 never flips

    def run() -> tuple[list[np.ndarray], list[bool], list[np.ndarray]]:
        env = ExpertIntervention(make_env(PICK_PLACE, max_steps=40), threshold=0.8, takeover_steps=3)
        observations, _, _, infos = _run_intervened(env, 6, lambda t, e: actions[t], len(actions))
        return observations, [i["intervention"] for i in infos], [i["executed_action"] for i in infos]

    obs_a, flags_a, exec_a = run()
    obs_b, flags_b, exec_b = run()
    assert flags_a == flags_b
    assert len(obs_a) == len(obs_b)
    for a, b in zip(obs_a, obs_b, strict=True):
        assert np.array_equal(a, b)
    for a, b in zip(exec_a, exec_b, strict=True):
        assert np.array_equal(a, b)


def test_intervention_gates_and_refuses_actions_as_the_env_would(make_env) -> None:
    """The gate compared the raw action: twice the expert's action, the same once the env clipped it,
    counted as an intervention on 59 of 60 steps. A malformed action (wrong shape, bool, NaN) was
    replaced by the expert's while it was in control, or raised IndexError: the env alone refuses it."""
    env = ExpertIntervention(make_env(PICK_PLACE, max_steps=60), threshold=0.05, takeover_steps=1)
    env.reset(seed=4)
    expert = make_expert(env)
    flags = []
    for _ in range(60):
        a = expert.act()
        big = np.where(np.abs(a) >= 1.0, 2.0 * a, a)  # saturated commands doubled: clipping undoes it
        *_, terminated, truncated, info = env.step(big)
        flags.append(info["intervention"])
        assert np.array_equal(info["executed_action"], np.clip(big, -1.0, 1.0).astype(np.float32))
        if terminated or truncated:
            break
    assert not any(flags), flags
    assert len(flags) > 20
    env = ExpertIntervention(make_env(PICK_PLACE, max_steps=60), threshold=0.05, takeover_steps=5)
    env.reset(seed=4)
    env.step(np.full(4, 0.9, dtype=np.float32))  # far from the expert: it takes over for 5 steps
    bad_actions = [(np.zeros(3), "shape"), (np.zeros((4, 1)), "shape"), ([False, False, False, True], "bool"),
                   (np.array([0.0, np.nan, 0.0, 0.0]), "finite")]
    for bad, match in bad_actions:
        assert env._left > 0  # the expert is in control: the old wrapper stepped its action instead
        with pytest.raises(ValueError, match=match):
            env.step(bad)
