"""Export of episode stores to Minari datasets and import back: round trips and refusals."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from loopsim.datasets import Episode, EpisodeMetadata, EpisodeStore
from loopsim.datasets.minari_io import export_to_minari, import_from_minari, minari_dataset_path

GOAL_OBS = gym.spaces.Dict({
    "observation": gym.spaces.Box(-1.0, 1.0, (5,), np.float32),
    "achieved_goal": gym.spaces.Box(-1.0, 1.0, (3,), np.float32),
    "desired_goal": gym.spaces.Box(-1.0, 1.0, (3,), np.float32),
})
ACTION = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
ALL_EXTRAS = ["expert_action", "intervention", "is_success"]


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def make_episode(t: int, obs_space: gym.Space, act_space: gym.Space, extras=(), *, seed: int = 0,
                 meta: EpisodeMetadata | None = None) -> Episode:
    """A synthetic episode of ``t`` steps with random contents that fit the spaces."""
    rng = np.random.default_rng(seed)

    def sample(space: gym.Space, n: int) -> np.ndarray:
        if isinstance(space, gym.spaces.Discrete):
            return rng.integers(0, space.n, size=n).astype(space.dtype)
        if space.dtype == np.uint8:
            return rng.integers(0, 256, size=(n, *space.shape), dtype=np.uint8)
        return rng.uniform(-1, 1, size=(n, *space.shape)).astype(space.dtype)

    if isinstance(obs_space, gym.spaces.Dict):
        obs = {k: sample(s, t + 1) for k, s in obs_space.spaces.items()}
    else:
        obs = sample(obs_space, t + 1)
    terminated = np.zeros(t, dtype=bool)
    truncated = np.zeros(t, dtype=bool)
    (terminated if seed % 2 == 0 else truncated)[-1] = True
    extra = {}
    if "expert_action" in extras:
        extra["expert_action"] = sample(act_space, t)
    if "intervention" in extras:
        extra["intervention"] = rng.random(t) < 0.3
    if "is_success" in extras:
        extra["is_success"] = rng.random(t) < 0.5
    return Episode(observations=obs, actions=sample(act_space, t), rewards=rng.normal(size=t),
                   terminated=terminated, truncated=truncated, extras=extra,
                   metadata=meta or EpisodeMetadata(seed=seed))


def goal_store(path: Path, n: int = 5, *, close: bool = True) -> EpisodeStore:
    store = EpisodeStore.create(path, observation_space=GOAL_OBS, action_space=ACTION,
                                env_id="loopsim/FactoryPickPlace-v0", env_kwargs={"obs_mode": "goal"},
                                step_extras=ALL_EXTRAS, attrs={"operator": "night shift", "n": [1, 2]},
                                flush_every=3)
    for i in range(n):
        meta = EpisodeMetadata(
            seed=None if i == 0 else 100 + i, site="lab" if i % 2 else "heavy_slippery",
            site_params={"part_mass": 0.1 * (i + 1), "conveyor_speed": 0.05},
            policy_id="bc", policy_version=f"step{i}", iteration=i // 2, success=i % 3 == 0,
            failure_mode=None if i % 3 == 0 else "dropped", wall_time=1.25 * i, tags={"shift": i},
        )
        store.add_episode(make_episode(3 + i, GOAL_OBS, ACTION, ALL_EXTRAS, seed=i, meta=meta))
    if close:
        store.close()
    return store


def assert_same_store(a: EpisodeStore, b: EpisodeStore) -> None:
    assert len(a) == len(b)
    assert a.env_id == b.env_id and a.env_kwargs == b.env_kwargs and a.attrs == b.attrs
    assert a.step_extras == b.step_extras and a.data_keys == b.data_keys
    assert a.observation_space == b.observation_space and a.action_space == b.action_space
    arrays_a, ends_a = a.load()
    arrays_b, ends_b = b.load()
    np.testing.assert_array_equal(ends_a, ends_b)
    for key in arrays_a:
        assert arrays_a[key].dtype == arrays_b[key].dtype, key
        assert arrays_a[key].shape == arrays_b[key].shape, key
        assert arrays_a[key].tobytes() == arrays_b[key].tobytes(), key
    meta_a, meta_b = a.metadata(), b.metadata()
    assert set(meta_a) == set(meta_b)
    for key in meta_a:
        np.testing.assert_array_equal(meta_a[key], meta_b[key], err_msg=key)
    for i in range(len(a)):
        assert a.metadata_row(i) == b.metadata_row(i)


def test_round_trip_goal_store_keeps_arrays_metadata_and_extras(tmp_path, minari_root):
    src = EpisodeStore.open(goal_store(tmp_path / "src").url)
    dataset = export_to_minari(src, "loopsim/pick-place-v0", author="tester")
    assert (minari_root / "loopsim" / "pick-place-v0" / "data" / "metadata.json").is_file()
    assert minari_dataset_path("loopsim/pick-place-v0") == minari_root / "loopsim" / "pick-place-v0"
    assert dataset.total_episodes == len(src) and dataset.total_steps == src.n_transitions
    assert dataset.env_spec.id == "loopsim/FactoryPickPlace-v0"
    assert dataset.env_spec.kwargs["obs_mode"] == "goal"
    assert set(minari.list_local_datasets()) == {"loopsim/pick-place-v0"}  # no staging leftovers

    # What a Minari user sees.
    ep1 = next(dataset.iterate_episodes([1]))
    orig = src.episode(1)
    np.testing.assert_array_equal(ep1.observations["desired_goal"], orig.observations["desired_goal"])
    np.testing.assert_array_equal(ep1.actions, orig.actions)
    np.testing.assert_array_equal(ep1.truncations, orig.truncated)
    assert len(ep1.infos["is_success"]) == len(orig) + 1  # one info row per observation
    assert not ep1.infos["is_success"][0]
    np.testing.assert_array_equal(ep1.infos["is_success"][1:], orig.extras["is_success"])
    np.testing.assert_array_equal(ep1.infos["expert_action"][:-1], orig.extras["expert_action"])
    meta = list(dataset.storage.get_episode_metadata([0, 1]))
    assert "seed" not in meta[0] and meta[1]["seed"] == 101
    assert meta[1]["loopsim"]["site"] == "lab" and meta[1]["loopsim"]["failure_mode"] == "dropped"
    assert json.loads(meta[1]["loopsim"]["site_params"]) == {"part_mass": 0.2, "conveyor_speed": 0.05}
    assert meta[1]["rewards_sum"] == pytest.approx(orig.metadata.episode_return)
    info = dataset.storage.metadata["loopsim"]
    assert info["env_kwargs"] == {"obs_mode": "goal"} and info["step_extras"] == ALL_EXTRAS

    back = import_from_minari("loopsim/pick-place-v0", tmp_path / "back")
    with src, back:
        assert back.mode == "r"
        assert_same_store(src, back)
        assert back.check().ok


def test_round_trip_box_obs_discrete_action_unregistered_env(tmp_path):
    obs, act = gym.spaces.Box(-1.0, 1.0, (3,), np.float64), gym.spaces.Discrete(5)
    with EpisodeStore.create(tmp_path / "src", observation_space=obs, action_space=act,
                             env_id="NotRegistered-v0") as store:
        for i in range(4):
            store.add_episode(make_episode(2 + i, obs, act, seed=i))
    dataset = export_to_minari(tmp_path / "src", "plain-v1")
    assert dataset.env_spec is None  # not a registered id: no spec, the id stays in the metadata
    back = import_from_minari("plain-v1", tmp_path / "back")
    with EpisodeStore.open(tmp_path / "src") as src, back:
        assert back.env_id == "NotRegistered-v0"
        assert_same_store(src, back)


def test_images_are_lossless_by_default(tmp_path):
    obs = gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)
    with EpisodeStore.create(tmp_path / "src", observation_space=obs, action_space=ACTION) as store:
        store.add_episode(make_episode(3, obs, ACTION, seed=1))
    export_to_minari(tmp_path / "src", "rgb-v0")
    with EpisodeStore.open(tmp_path / "src") as src, import_from_minari("rgb-v0", tmp_path / "back") as back:
        assert_same_store(src, back)


def test_pending_episodes_of_an_open_writer_are_exported(tmp_path):
    writer = goal_store(tmp_path / "src", n=2, close=False)
    writer.add_episode(make_episode(4, GOAL_OBS, ACTION, ALL_EXTRAS, seed=7))  # pending, not merged
    try:
        dataset = export_to_minari(writer, "pending-v0", episodes=[0, 2])
        assert dataset.total_episodes == 2
        ep = next(dataset.iterate_episodes([1]))
        np.testing.assert_array_equal(ep.actions, writer.episode(2).actions)
    finally:
        writer.close()


def test_existing_dataset_needs_overwrite_and_non_datasets_are_never_replaced(tmp_path, minari_root):
    goal_store(tmp_path / "src", n=3)
    export_to_minari(tmp_path / "src", "ns/data-v0")
    with pytest.raises(FileExistsError, match="already exists"):
        export_to_minari(tmp_path / "src", "ns/data-v0")
    dataset = export_to_minari(tmp_path / "src", "ns/data-v0", overwrite=True, episodes=[0])
    assert dataset.total_episodes == 1
    assert sorted(p.name for p in (minari_root / "ns").iterdir()) == ["data-v0", "namespace_metadata.json"]

    other = minari_root / "mine-v0"
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a Minari dataset"):
        export_to_minari(tmp_path / "src", "mine-v0", overwrite=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("bad", ["no-version", "a b-v0", "x-v"])
def test_malformed_dataset_ids_are_refused(tmp_path, bad):
    goal_store(tmp_path / "src", n=1)
    with pytest.raises(ValueError, match="not a Minari dataset id"):
        export_to_minari(tmp_path / "src", bad)
    with pytest.raises(ValueError, match="not a Minari dataset id"):
        import_from_minari(bad, tmp_path / "back")


def test_import_missing_dataset_and_existing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no local Minari dataset"):
        import_from_minari("nothing-v0", tmp_path / "back")
    assert not (tmp_path / "back").exists()
    goal_store(tmp_path / "src", n=2)
    export_to_minari(tmp_path / "src", "two-v0")
    with pytest.raises(FileExistsError):
        import_from_minari("two-v0", tmp_path / "src")
    import_from_minari("two-v0", tmp_path / "src", overwrite=True).close()
    with EpisodeStore.open(tmp_path / "src") as store:
        assert len(store) == 2


def _foreign_dataset(dataset_id: str, episodes: list[EpisodeBuffer]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Minari's "author is None" etc.
        minari.create_dataset_from_buffers(
            dataset_id, episodes, observation_space=gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
            action_space=gym.spaces.Discrete(3), algorithm_name="random")


def test_import_of_a_dataset_loopsim_did_not_write(tmp_path):
    rng = np.random.default_rng(0)
    buffers = []
    for i, t in enumerate((3, 5)):
        success = np.zeros(t + 1, dtype=bool)
        success[-1] = i == 1
        terminations = np.zeros(t, dtype=bool)
        terminations[-1] = True
        buffers.append(EpisodeBuffer(
            seed=2**63 + 5 if i == 0 else 42,
            observations=rng.uniform(-1, 1, (t + 1, 2)).astype(np.float32),
            actions=rng.integers(0, 3, t), rewards=rng.normal(size=t).tolist(),
            terminations=terminations.tolist(), truncations=[False] * t,
            infos={"is_success": success, "other": np.arange(t + 1)}))
    _foreign_dataset("foreign-v0", buffers)
    with import_from_minari("foreign-v0", tmp_path / "back") as store:
        assert len(store) == 2 and store.step_extras == ["is_success"] and store.env_id == ""
        assert store.attrs["minari_dataset_id"] == "foreign-v0"
        first, second = store.metadata_row(0), store.metadata_row(1)
        assert first.seed is None and first.tags["minari_seed"] == 2**63 + 5  # beyond int64
        assert second.seed == 42 and second.success and not first.success
        assert second.policy_id == "random" and second.tags["minari_episode"] == 1
        np.testing.assert_array_equal(store.episode(1).extras["is_success"], [0, 0, 0, 0, 1])
        np.testing.assert_array_equal(store.episode(0).observations, buffers[0].observations)
        assert store.check().ok


def test_failed_import_leaves_no_partial_store(tmp_path):
    t = 4
    flags = [False, True, False, True]  # terminated before the last step: not a valid episode
    _foreign_dataset("broken-v0", [EpisodeBuffer(
        observations=np.zeros((t + 1, 2), np.float32), actions=np.zeros(t, np.int64), rewards=[0.0] * t,
        terminations=flags, truncations=[False] * t)])
    with pytest.raises(ValueError, match="Minari episode 0 of broken-v0"):
        import_from_minari("broken-v0", tmp_path / "back")
    assert not (tmp_path / "back").exists()
    # into a directory that was there (empty, or holding only what a killed create left): the
    # directory stays, without a store in it (an empty store was left behind)
    for leftover in (None, "meta/seed/zarr.json"):
        target = tmp_path / f"made-{leftover is not None}"
        target.mkdir()
        if leftover:
            (target / leftover).parent.mkdir(parents=True)
            (target / leftover).write_text("{}")
        with pytest.raises(ValueError, match="Minari episode 0 of broken-v0"):
            import_from_minari("broken-v0", target)
        assert target.is_dir() and list(target.iterdir()) == []
