"""Round trips of the episode store: every supported space and dtype, extras, metadata, queries, load().

The crash, concurrency, lock and damaged-path promises are tested in ``test_store_safety.py``.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import zarr

from loopsim.datasets import (
    META_COLUMNS,
    STEP_EXTRAS,
    Episode,
    EpisodeMetadata,
    EpisodeStore,
    StoreError,
    StoreLockedError,
)

Box, Discrete, MultiDiscrete, MultiBinary, Dict = (
    gym.spaces.Box,
    gym.spaces.Discrete,
    gym.spaces.MultiDiscrete,
    gym.spaces.MultiBinary,
    gym.spaces.Dict,
)

OBS_SPACES: dict[str, gym.Space] = {
    "box_f32": Box(-np.inf, np.inf, (3,), np.float32),
    "box_f64_2d": Box(-1.0, 1.0, (2, 2), np.float64),
    "box_i32": Box(-5, 5, (4,), np.int32),
    "box_i64": Box(-1000, 1000, (2,), np.int64),
    "box_u8_image": Box(0, 255, (8, 6, 3), np.uint8),
    "box_scalar": Box(0.0, 1.0, (), np.float32),
    "discrete": Discrete(7),
    "discrete_start": Discrete(5, start=-2),
    "multidiscrete": MultiDiscrete([3, 4, 2]),
    "multibinary": MultiBinary(5),
    "multibinary_2d": MultiBinary((2, 3)),
    "dict": Dict(
        {
            "image": Box(0, 255, (4, 4, 3), np.uint8),
            "state": Box(-2.0, 2.0, (3,), np.float32),
            "goal": MultiBinary(2),
            "phase": Discrete(3),
        }
    ),
}
ACTION_SPACES: dict[str, gym.Space] = {
    "box_f32": Box(-1.0, 1.0, (4,), np.float32),
    "box_f64": Box(-1.0, 1.0, (2,), np.float64),
    "discrete": Discrete(3),
    "multidiscrete": MultiDiscrete([2, 5]),
    "multibinary": MultiBinary(3),
}


def sample(space: gym.Space, rng: np.random.Generator, n: int) -> Any:
    """``n`` stacked random values of ``space`` (a dict of stacks for a Dict space), in its dtype."""
    if isinstance(space, Dict):
        return {k: sample(s, rng, n) for k, s in space.spaces.items()}
    if isinstance(space, Discrete):
        return (space.start + rng.integers(0, space.n, size=n)).astype(space.dtype)
    if isinstance(space, MultiDiscrete):
        return rng.integers(0, space.nvec, size=(n, *space.shape)).astype(space.dtype)
    if isinstance(space, MultiBinary):
        return rng.integers(0, 2, size=(n, *space.shape)).astype(space.dtype)
    assert isinstance(space, Box)
    if np.issubdtype(space.dtype, np.integer):
        low = np.maximum(space.low.astype(np.int64), -1000)
        high = np.minimum(space.high.astype(np.int64), 1000)
        return rng.integers(low, high, size=(n, *space.shape), endpoint=True).astype(space.dtype)
    return rng.standard_normal((n, *space.shape)).astype(space.dtype)


def make_episode(
    obs_space: gym.Space,
    act_space: gym.Space,
    length: int,
    data_seed: int,
    extras: tuple[str, ...] = (),
    *,
    terminated: bool = True,
    **meta: Any,
) -> Episode:
    """A random episode of ``length`` steps matching the spaces."""
    rng = np.random.default_rng(data_seed)
    term = np.zeros(length, dtype=bool)
    trunc = np.zeros(length, dtype=bool)
    (term if terminated else trunc)[-1] = True
    ex: dict[str, np.ndarray] = {}
    if "expert_action" in extras:
        ex["expert_action"] = sample(act_space, rng, length)
    if "intervention" in extras:
        ex["intervention"] = rng.random(length) < 0.3
    if "is_success" in extras:
        ex["is_success"] = rng.random(length) < 0.5
    meta.setdefault("seed", data_seed)
    return Episode(
        observations=sample(obs_space, rng, length + 1),
        actions=sample(act_space, rng, length),
        rewards=rng.standard_normal(length),
        terminated=term,
        truncated=trunc,
        extras=ex,
        metadata=EpisodeMetadata(**meta),
    )


def assert_same_array(got: Any, want: Any, dtype: Any, what: str) -> None:
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {np.dtype(dtype)}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    np.testing.assert_array_equal(got, want.astype(dtype), err_msg=what)


def assert_same_metadata(got: EpisodeMetadata, want: EpisodeMetadata) -> None:
    for name in (
        "seed",
        "site",
        "policy_id",
        "policy_version",
        "iteration",
        "length",
        "success",
        "failure_mode",
        "interventions",
        "tags",
    ):
        assert getattr(got, name) == getattr(want, name), name
    assert got.failure_mode == (want.failure_mode or None)
    assert math.isclose(got.episode_return, want.episode_return, rel_tol=1e-12, abs_tol=1e-12)
    assert got.wall_time == want.wall_time
    assert (
        got.site_params == json.loads(EpisodeMetadata(site_params=want.site_params).to_json())["site_params"]
    )


def assert_same_episode(
    got: Episode, want: Episode, obs_space: gym.Space, act_space: gym.Space, extras: tuple[str, ...] = ()
) -> None:
    """Every array equal in value, shape and the space's dtype; metadata equal (length/return filled)."""
    if isinstance(obs_space, Dict):
        assert isinstance(got.observations, dict)
        assert set(got.observations) == set(obs_space.spaces)
        for k, sub in obs_space.spaces.items():
            assert_same_array(got.observations[k], want.observations[k], sub.dtype, f"observation/{k}")
    else:
        assert_same_array(got.observations, want.observations, obs_space.dtype, "observation")
    assert_same_array(got.actions, want.actions, act_space.dtype, "action")
    assert_same_array(got.rewards, want.rewards, np.float64, "reward")
    assert_same_array(got.terminated, want.terminated, bool, "terminated")
    assert_same_array(got.truncated, want.truncated, bool, "truncated")
    assert set(got.extras) == set(extras)
    for k in extras:
        dtype = act_space.dtype if k == "expert_action" else bool
        assert_same_array(got.extras[k], want.extras[k], dtype, k)
    expected_meta = EpisodeMetadata(**{**want.metadata.__dict__})
    expected_meta.length = len(want)
    expected_meta.episode_return = float(np.sum(want.rewards))
    if "intervention" in extras:
        expected_meta.interventions = int(np.count_nonzero(want.extras["intervention"]))
    assert_same_metadata(got.metadata, expected_meta)


def files_in(path: Path, sub: str) -> list[str]:
    root = path / sub
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ----------------------------------------------------------------------------- spaces and dtypes


@pytest.mark.parametrize("obs_name", sorted(OBS_SPACES))
def test_round_trip_every_observation_space(tmp_path: Path, obs_name: str) -> None:
    obs_space, act_space = OBS_SPACES[obs_name], ACTION_SPACES["box_f32"]
    episodes = [
        make_episode(obs_space, act_space, length, data_seed=i, terminated=bool(i % 2))
        for i, length in enumerate([1, 4, 2, 9, 1])
    ]
    url = tmp_path / "store"
    with EpisodeStore.create(
        url, observation_space=obs_space, action_space=act_space, flush_every=2
    ) as store:
        for i, ep in enumerate(episodes):
            assert store.add_episode(ep) == i
            assert_same_episode(store.episode(i), ep, obs_space, act_space)
    with EpisodeStore.open(url) as store:
        assert store.observation_space == obs_space
        assert store.action_space == act_space
        assert len(store) == len(episodes)
        for i, ep in enumerate(episodes):
            assert_same_episode(store.episode(i), ep, obs_space, act_space)
        arrays, ends = store.load()
        np.testing.assert_array_equal(ends, np.cumsum([len(e) for e in episodes]))
        keys = (
            [f"observation/{k}" for k in obs_space.spaces] if isinstance(obs_space, Dict) else ["observation"]
        )
        assert store.data_keys[: len(keys)] == keys
        for key in keys:
            sub = obs_space.spaces[key.split("/")[1]] if "/" in key else obs_space
            want = np.concatenate(
                [e.observations[key.split("/")[1]] if "/" in key else e.observations for e in episodes]
            )
            assert_same_array(arrays[key], want, sub.dtype, key)
        assert store.check().ok


@pytest.mark.parametrize("act_name", sorted(ACTION_SPACES))
def test_round_trip_every_action_space_with_all_extras(tmp_path: Path, act_name: str) -> None:
    obs_space, act_space = OBS_SPACES["box_f32"], ACTION_SPACES[act_name]
    extras = tuple(STEP_EXTRAS)
    episodes = [
        make_episode(obs_space, act_space, length, data_seed=10 + i, extras=extras)
        for i, length in enumerate([3, 1, 5, 2])
    ]
    url = tmp_path / "store"
    with EpisodeStore.create(
        url, observation_space=obs_space, action_space=act_space, step_extras=extras, flush_every=3
    ) as store:
        assert store.step_extras == list(STEP_EXTRAS)
        for ep in episodes:
            store.add_episode(ep)
    with EpisodeStore.open(url) as store:
        assert store.step_extras == list(STEP_EXTRAS)
        assert set(extras) <= set(store.data_keys)
        for i, ep in enumerate(episodes):
            assert_same_episode(store.episode(i), ep, obs_space, act_space, extras)
        cols = store.metadata()
        np.testing.assert_array_equal(
            cols["interventions"], [int(e.extras["intervention"].sum()) for e in episodes]
        )
        arrays, _ = store.load(["expert_action", "intervention", "is_success"])
        for key in ("expert_action", "intervention", "is_success"):
            dtype = act_space.dtype if key == "expert_action" else bool
            assert_same_array(arrays[key], np.concatenate([e.extras[key] for e in episodes]), dtype, key)
        assert store.check().ok


@pytest.mark.parametrize("extras", [("intervention",), ("expert_action",), ("is_success",)])
def test_each_extra_alone(tmp_path: Path, extras: tuple[str, ...]) -> None:
    obs_space, act_space = OBS_SPACES["dict"], ACTION_SPACES["discrete"]
    eps = [make_episode(obs_space, act_space, n, data_seed=n, extras=extras) for n in (2, 1, 3)]
    with EpisodeStore.create(
        tmp_path / "s", observation_space=obs_space, action_space=act_space, step_extras=extras
    ) as store:
        for ep in eps:
            store.add_episode(ep)
    with EpisodeStore.open(tmp_path / "s") as store:
        for i, ep in enumerate(eps):
            assert_same_episode(store[i], ep, obs_space, act_space, extras)


def test_episode_must_carry_exactly_the_declared_extras(tmp_path: Path) -> None:
    obs_space, act_space = OBS_SPACES["box_f32"], ACTION_SPACES["discrete"]
    with EpisodeStore.create(
        tmp_path / "s", observation_space=obs_space, action_space=act_space, step_extras=["intervention"]
    ) as store:
        with pytest.raises(ValueError, match="extras"):
            store.add_episode(make_episode(obs_space, act_space, 2, data_seed=0))
        with pytest.raises(ValueError, match="extras"):
            store.add_episode(
                make_episode(obs_space, act_space, 2, data_seed=0, extras=("intervention", "is_success"))
            )
        assert len(store) == 0
        assert files_in(tmp_path / "s", "pending") == []


def test_unsupported_spaces_and_extras_are_refused(tmp_path: Path) -> None:
    box = OBS_SPACES["box_f32"]
    with pytest.raises(TypeError, match="Tuple"):
        EpisodeStore.create(tmp_path / "a", observation_space=gym.spaces.Tuple([box]), action_space=box)
    with pytest.raises(TypeError, match="action"):
        EpisodeStore.create(tmp_path / "b", observation_space=box, action_space=Dict({"x": box}))
    with pytest.raises(TypeError, match="key 'x'"):
        EpisodeStore.create(tmp_path / "c", observation_space=Dict({"x": Dict({"y": box})}), action_space=box)
    with pytest.raises(ValueError, match="unknown step_extras"):
        EpisodeStore.create(tmp_path / "d", observation_space=box, action_space=box, step_extras=["bogus"])
    with pytest.raises(ValueError, match="flush_every"):
        EpisodeStore.create(tmp_path / "e", observation_space=box, action_space=box, flush_every=0)
    with pytest.raises(TypeError, match="JSON"):
        EpisodeStore.create(
            tmp_path / "f", observation_space=box, action_space=box, env_kwargs={"x": object()}
        )
    # Nothing was left behind by the refusals.
    assert not any(tmp_path.iterdir())


def test_invalid_episodes_write_nothing(tmp_path: Path) -> None:
    obs_space, act_space = OBS_SPACES["box_f32"], ACTION_SPACES["box_f32"]
    with EpisodeStore.create(tmp_path / "s", observation_space=obs_space, action_space=act_space) as store:
        good = make_episode(obs_space, act_space, 3, data_seed=1)
        bad_obs = make_episode(obs_space, act_space, 3, data_seed=1)
        bad_obs.observations = bad_obs.observations[:-1]  # T rows instead of T+1
        bad_dtype = make_episode(obs_space, act_space, 3, data_seed=1)
        bad_dtype.actions = bad_dtype.actions.astype(np.complex64)
        early = make_episode(obs_space, act_space, 3, data_seed=1)
        early.terminated = np.array([True, False, True])
        nan = make_episode(obs_space, act_space, 3, data_seed=1)
        nan.rewards = np.array([0.0, np.nan, 1.0])
        empty = make_episode(obs_space, act_space, 1, data_seed=1)
        empty.actions = empty.actions[:0]
        for bad, msg in (
            (bad_obs, "observation has shape"),
            (bad_dtype, "actions has dtype"),
            (early, "terminated is True before"),
            (nan, "NaN"),
            (empty, "at least one step"),
        ):
            with pytest.raises(ValueError, match=msg):
                store.add_episode(bad)
        assert len(store) == 0
        assert files_in(tmp_path / "s", "pending") == []
        assert store.add_episode(good) == 0
    with EpisodeStore.open(tmp_path / "s") as store:
        assert len(store) == 1
        assert_same_episode(store[0], good, obs_space, act_space)


# ----------------------------------------------------------------------------- metadata


def rich_metadata(i: int) -> dict[str, Any]:
    sites = ["Zürich-工場 🏭", "", 'lyon/hall "B"', "site\nwith newline"]
    return {
        "seed": None if i % 3 == 0 else i * 1000,
        "site": sites[i % len(sites)],
        "site_params": {"friction": 0.5 + i, "light": np.float32(0.25), "n_boxes": np.int64(i)},
        "policy_id": "bc-π" if i % 2 else "expert",
        "policy_version": f"v{i % 2}",
        "iteration": i // 2,
        "success": bool(i % 2),
        "failure_mode": None if i % 2 else ("dropped" if i % 4 == 0 else "timeout"),
        "wall_time": 0.125 * i,
        "tags": {"operator": "夜勤 night", "list": [i, "x", None], "nested": {"ok": True}},
    }


def test_metadata_round_trip(tmp_path: Path) -> None:
    obs_space, act_space = OBS_SPACES["box_f32"], ACTION_SPACES["discrete"]
    eps = [
        make_episode(
            obs_space, act_space, 1 + i % 3, data_seed=i, extras=("intervention",), **rich_metadata(i)
        )
        for i in range(8)
    ]
    # length/return/interventions given by the caller are overwritten from the data.
    eps[1].metadata.length = 99
    eps[1].metadata.episode_return = 1e9
    url = tmp_path / "s"
    with EpisodeStore.create(
        url,
        observation_space=obs_space,
        action_space=act_space,
        env_id="Loop-v0",
        env_kwargs={"site": "Zürich", "n": 3},
        step_extras=["intervention"],
        flush_every=3,
        attrs={"note": "ünïcode", "k": [1, 2]},
    ) as store:
        for ep in eps:
            store.add_episode(ep)
        # pending (in the writer's memory) rows
        assert store.metadata_row(7).site == eps[7].metadata.site
    with EpisodeStore.open(url) as store:
        assert store.env_id == "Loop-v0"
        assert store.env_kwargs == {"site": "Zürich", "n": 3}
        assert store.attrs == {"note": "ünïcode", "k": [1, 2]}
        assert store.schema_version >= 1
        assert isinstance(store.loopsim_version, str) and store.loopsim_version
        assert "Loop-v0" in repr(store)
        for i, ep in enumerate(eps):
            got = store.metadata_row(i)
            assert got.seed == (None if i % 3 == 0 else i * 1000)
            assert got.failure_mode == ep.metadata.failure_mode
            assert got.site == rich_metadata(i)["site"]
            assert got.site_params == {"friction": 0.5 + i, "light": 0.25, "n_boxes": i}
            assert got.tags == {"operator": "夜勤 night", "list": [i, "x", None], "nested": {"ok": True}}
            assert got.length == len(ep)
            assert got.episode_return == pytest.approx(float(ep.rewards.sum()), rel=1e-12, abs=1e-12)
            assert got.interventions == int(ep.extras["intervention"].sum())
            assert got == store.episode(i).metadata
        cols = store.metadata()
        assert set(cols) == set(META_COLUMNS) | {"episode"}
        assert len({len(v) for v in cols.values()}) == 1
        np.testing.assert_array_equal(cols["episode"], np.arange(8))
        np.testing.assert_array_equal(cols["seed"], [-1 if i % 3 == 0 else i * 1000 for i in range(8)])
        assert list(cols["site"]) == [rich_metadata(i)["site"] for i in range(8)]
        assert list(cols["failure_mode"]) == [rich_metadata(i)["failure_mode"] or "" for i in range(8)]
        np.testing.assert_array_equal(cols["length"], [len(e) for e in eps])
        np.testing.assert_array_equal(cols["success"], [bool(i % 2) for i in range(8)])
        params = store.site_params()
        np.testing.assert_allclose(params["friction"], 0.5 + np.arange(8))
        np.testing.assert_allclose(params["n_boxes"], np.arange(8))
        assert store.check().ok


def test_metadata_none_and_empty_values(tmp_path: Path) -> None:
    obs_space, act_space = OBS_SPACES["discrete"], ACTION_SPACES["discrete"]
    ep = make_episode(obs_space, act_space, 1, data_seed=0)
    ep.metadata = EpisodeMetadata()  # every default: seed None, failure_mode None, empty dicts
    ep0 = make_episode(obs_space, act_space, 1, data_seed=0)
    ep0.metadata = EpisodeMetadata(seed=0, failure_mode="")  # seed 0 is a real seed; "" means none
    with EpisodeStore.create(tmp_path / "s", observation_space=obs_space, action_space=act_space) as store:
        store.add_episode(ep)
        store.add_episode(ep0)
    with EpisodeStore.open(tmp_path / "s") as store:
        m = store.metadata_row(0)
        assert m.seed is None and m.failure_mode is None and m.tags == {} and m.site_params == {}
        assert m.site == "" and m.policy_id == "" and m.iteration == 0 and m.success is False
        m0 = store.metadata_row(1)
        assert m0.seed == 0 and m0.failure_mode is None


def test_metadata_that_is_not_json_is_refused(tmp_path: Path) -> None:
    obs_space, act_space = OBS_SPACES["box_f32"], ACTION_SPACES["discrete"]
    with EpisodeStore.create(tmp_path / "s", observation_space=obs_space, action_space=act_space) as store:
        with pytest.raises(ValueError, match="JSON"):
            store.add_episode(make_episode(obs_space, act_space, 2, data_seed=0, tags={"bad": object()}))
        assert len(store) == 0
        assert files_in(tmp_path / "s", "pending") == []


# ------------------------------------------------------------------------- flush boundaries, reopen, append


@pytest.mark.parametrize("flush_every", [1, 3, 1000])
def test_flush_boundaries_reopen_and_append(tmp_path: Path, flush_every: int) -> None:
    obs_space, act_space = OBS_SPACES["dict"], ACTION_SPACES["multidiscrete"]
    extras = ("expert_action", "intervention")
    eps = [
        make_episode(obs_space, act_space, 1 + (i * 5) % 4, data_seed=i, extras=extras, site=f"s{i % 2}")
        for i in range(17)
    ]
    url = tmp_path / "s"
    store = EpisodeStore.create(
        url, observation_space=obs_space, action_space=act_space, step_extras=extras, flush_every=flush_every
    )
    for i in range(7):
        assert store.add_episode(eps[i]) == i
        assert len(store) == i + 1
        # A reader opened now sees exactly the committed episodes (merged or pending).
        with EpisodeStore.open(url) as reader:
            assert len(reader) == i + 1
            assert_same_episode(reader[i], eps[i], obs_space, act_space, extras)
            np.testing.assert_array_equal(reader.episode_ends, np.cumsum([len(e) for e in eps[: i + 1]]))
    store.close()
    store.close()  # idempotent
    assert files_in(url, "pending") == []
    with pytest.raises(StoreError, match="not open for writing"):
        store.add_episode(eps[7])

    # Reopen for appending with another flush_every; indices continue without a gap.
    with EpisodeStore.open(url, mode="a", flush_every=4) as store:
        assert len(store) == 7
        for i in range(7, 12):
            assert store.add_episode(eps[i]) == i
    with EpisodeStore.open(url, mode="a", flush_every=flush_every) as store:
        for i in range(12, 17):
            assert store.add_episode(eps[i]) == i
        # a reader while the appender holds unmerged episodes
        with EpisodeStore.open(url) as reader:
            assert len(reader) == 17
    with EpisodeStore.open(url) as store:
        assert len(store) == 17
        assert store.n_transitions == sum(len(e) for e in eps)
        for i, ep in enumerate(eps):
            assert_same_episode(store.episode(i), ep, obs_space, act_space, extras)
        assert [len(e) for e in store] == [len(e) for e in eps]
        assert_same_episode(store[-1], eps[-1], obs_space, act_space, extras)
        with pytest.raises(IndexError):
            store.episode(17)
        with pytest.raises(IndexError):
            store.episode(-18)
        assert store.check().ok


def test_many_episodes_span_several_chunks(tmp_path: Path) -> None:
    """Enough steps that data and meta arrays have several chunks, merged in uneven batches."""
    obs_space, act_space = Box(0, 255, (64, 64, 3), np.uint8), ACTION_SPACES["box_f32"]
    url = tmp_path / "s"
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=30)
    eps = [make_episode(obs_space, act_space, int(n), data_seed=i) for i, n in enumerate(lengths)]
    with EpisodeStore.create(
        url, observation_space=obs_space, action_space=act_space, flush_every=7
    ) as store:
        for ep in eps:
            store.add_episode(ep)
    assert len(files_in(url, "data/observation")) > 3
    with EpisodeStore.open(url) as store:
        for i in (0, 6, 7, 13, 29):
            assert_same_episode(store[i], eps[i], obs_space, act_space)
        arrays, ends = store.load(["observation", "action"], episodes=[3, 7, 8, 20])
        chosen = [eps[i] for i in (3, 7, 8, 20)]
        np.testing.assert_array_equal(ends, np.cumsum([len(e) for e in chosen]))
        assert_same_array(
            arrays["observation"], np.concatenate([e.observations for e in chosen]), np.uint8, "obs"
        )
        assert_same_array(arrays["action"], np.concatenate([e.actions for e in chosen]), np.float32, "action")


# ----------------------------------------------------------------------------- queries and load()


def _query_store(url: Any, flush_every: int) -> tuple[EpisodeStore, list[Episode]]:
    obs_space, act_space = OBS_SPACES["box_f32"], ACTION_SPACES["discrete"]
    eps = [make_episode(obs_space, act_space, 1 + i % 4, data_seed=i, **rich_metadata(i)) for i in range(12)]
    store = EpisodeStore.create(
        url, observation_space=obs_space, action_space=act_space, flush_every=flush_every
    )
    for ep in eps:
        store.add_episode(ep)
    return store, eps


@pytest.mark.parametrize("flush_every", [5, 1000])
def test_select(tmp_path: Path, flush_every: int) -> None:
    store, eps = _query_store(tmp_path / "s", flush_every)  # 5: some merged, some pending; 1000: all pending
    with store:
        for target in (store, EpisodeStore.open(tmp_path / "s")):
            metas = [rich_metadata(i) for i in range(12)]

            def where(pred: Any) -> list[int]:
                return [i for i, m in enumerate(metas) if pred(m)]  # noqa: B023

            sel = target.select
            assert sel().tolist() == list(range(12))
            assert sel().dtype == np.int64
            assert sel(site="Zürich-工場 🏭").tolist() == where(lambda m: m["site"] == "Zürich-工場 🏭")
            assert sel(site=["", 'lyon/hall "B"']).tolist() == where(
                lambda m: m["site"] in ("", 'lyon/hall "B"')
            )
            assert sel(site="nowhere").tolist() == []
            assert sel(iteration=2).tolist() == where(lambda m: m["iteration"] == 2)
            assert sel(iteration=[0, 5]).tolist() == where(lambda m: m["iteration"] in (0, 5))
            assert sel(policy_id="bc-π").tolist() == where(lambda m: m["policy_id"] == "bc-π")
            assert sel(policy_version=["v0"]).tolist() == where(lambda m: m["policy_version"] == "v0")
            assert sel(success=True).tolist() == where(lambda m: m["success"])
            assert sel(success=False).tolist() == where(lambda m: not m["success"])
            assert sel(failure_mode="timeout").tolist() == where(lambda m: m["failure_mode"] == "timeout")
            assert sel(failure_mode=None).tolist() == list(range(12))  # None: no filter
            assert sel(failure_mode=[None]).tolist() == where(lambda m: m["failure_mode"] is None)
            assert sel(failure_mode=[""]).tolist() == where(lambda m: m["failure_mode"] is None)
            assert sel(failure_mode=[None, "dropped"]).tolist() == where(
                lambda m: m["failure_mode"] in (None, "dropped")
            )
            assert sel(success=False, iteration=[0, 1, 2], policy_id="expert").tolist() == where(
                lambda m: not m["success"] and m["iteration"] in (0, 1, 2) and m["policy_id"] == "expert"
            )
            if target is not store:
                target.close()


@pytest.mark.parametrize("flush_every", [5, 1000])
def test_load(tmp_path: Path, flush_every: int) -> None:
    store, eps = _query_store(tmp_path / "s", flush_every)
    with store:
        for target in (store, EpisodeStore.open(tmp_path / "s")):
            arrays, ends = target.load()
            assert set(arrays) == set(target.data_keys)
            np.testing.assert_array_equal(ends, np.cumsum([len(e) for e in eps]))
            assert ends.dtype == np.int64
            assert_same_array(
                arrays["observation"], np.concatenate([e.observations for e in eps]), np.float32, "o"
            )
            assert_same_array(arrays["action"], np.concatenate([e.actions for e in eps]), np.int64, "a")
            assert_same_array(arrays["reward"], np.concatenate([e.rewards for e in eps]), np.float64, "r")
            assert_same_array(arrays["terminated"], np.concatenate([e.terminated for e in eps]), bool, "t")
            # a subset across the merged / pending boundary, with a query
            chosen = [1, 4, 5, 6, 11]
            arrays, ends = target.load(["observation", "reward"], episodes=chosen)
            assert set(arrays) == {"observation", "reward"}
            np.testing.assert_array_equal(ends, np.cumsum([len(eps[i]) for i in chosen]))
            assert_same_array(
                arrays["observation"], np.concatenate([eps[i].observations for i in chosen]), np.float32, "o"
            )
            assert_same_array(
                arrays["reward"], np.concatenate([eps[i].rewards for i in chosen]), np.float64, "r"
            )
            succ = target.select(success=True)
            arrays, ends = target.load(["reward"], episodes=succ)
            assert_same_array(
                arrays["reward"], np.concatenate([eps[i].rewards for i in succ]), np.float64, "r"
            )
            arrays, ends = target.load(episodes=[])
            assert len(ends) == 0 and arrays["observation"].shape == (0, 3)
            assert arrays["observation"].dtype == np.float32
            with pytest.raises(KeyError, match="unknown data keys"):
                target.load(["nope"])
            with pytest.raises(IndexError):
                target.load(episodes=[12])
            if target is not store:
                target.close()


def test_empty_store(tmp_path: Path) -> None:
    obs_space, act_space = OBS_SPACES["dict"], ACTION_SPACES["box_f32"]
    EpisodeStore.create(tmp_path / "s", observation_space=obs_space, action_space=act_space).close()
    with EpisodeStore.open(tmp_path / "s") as store:
        assert len(store) == 0 and store.n_transitions == 0
        assert store.episode_ends.shape == (0,)
        assert store.select().tolist() == []
        assert all(len(v) == 0 for v in store.metadata().values())
        arrays, ends = store.load()
        assert len(ends) == 0
        assert arrays["observation/image"].shape == (0, 4, 4, 3)
        assert list(store) == []
        with pytest.raises(IndexError):
            store.episode(0)
        assert store.check().ok


def test_reader_is_read_only(tmp_path: Path) -> None:
    obs_space, act_space = OBS_SPACES["box_f32"], ACTION_SPACES["discrete"]
    with EpisodeStore.create(tmp_path / "s", observation_space=obs_space, action_space=act_space) as store:
        store.add_episode(make_episode(obs_space, act_space, 2, data_seed=0))
    with EpisodeStore.open(tmp_path / "s") as reader:
        assert not reader.writable
        with pytest.raises(StoreError, match="not open for writing"):
            reader.add_episode(make_episode(obs_space, act_space, 2, data_seed=1))
        with pytest.raises(StoreError):
            reader.flush()
        with pytest.raises(StoreError, match="mode='a'"):
            reader.repair()
    with pytest.raises(ValueError, match="mode"):
        EpisodeStore.open(tmp_path / "s", mode="w")


# ----------------------------------------------------------------------------- fsspec URL


def test_memory_url_round_trip() -> None:
    pytest.importorskip("fsspec")
    url = f"memory://loopsim-test-{uuid.uuid4().hex}/store"
    obs_space, act_space = OBS_SPACES["dict"], ACTION_SPACES["box_f32"]
    extras = ("expert_action", "intervention", "is_success")
    eps = [
        make_episode(obs_space, act_space, 1 + i % 3, data_seed=i, extras=extras, **rich_metadata(i))
        for i in range(9)
    ]
    with EpisodeStore.create(
        url,
        observation_space=obs_space,
        action_space=act_space,
        step_extras=extras,
        flush_every=4,
        env_id="Mem-v0",
    ) as store:
        for ep in eps[:6]:
            store.add_episode(ep)
        with pytest.raises(StoreLockedError):
            EpisodeStore.open(url, mode="a")
        with EpisodeStore.open(url) as reader:  # readers see merged + pending
            assert len(reader) == 6
            assert_same_episode(reader[5], eps[5], obs_space, act_space, extras)
    with EpisodeStore.open(url, mode="a") as store:
        for i, ep in enumerate(eps[6:], start=6):
            assert store.add_episode(ep) == i
    with pytest.raises(FileExistsError):
        EpisodeStore.create(url, observation_space=obs_space, action_space=act_space)
    with EpisodeStore.open(url) as store:
        assert store.env_id == "Mem-v0"
        assert len(store) == 9
        for i, ep in enumerate(eps):
            assert_same_episode(store[i], ep, obs_space, act_space, extras)
        assert store.select(failure_mode=[None]).tolist() == [
            i for i in range(9) if rich_metadata(i)["failure_mode"] is None
        ]
        arrays, ends = store.load()
        np.testing.assert_array_equal(ends, np.cumsum([len(e) for e in eps]))
        assert store.check().ok
    # overwrite replaces the store
    with EpisodeStore.create(
        url, observation_space=obs_space, action_space=act_space, overwrite=True
    ) as store:
        assert len(store) == 0
    with EpisodeStore.open(url) as store:
        assert len(store) == 0
    with pytest.raises(FileNotFoundError):
        EpisodeStore.open(f"memory://loopsim-test-{uuid.uuid4().hex}/absent")


@pytest.mark.parametrize("flush_every", [1, 4])
def test_caller_reusing_its_buffers_after_add_does_not_change_stored_episodes(
    tmp_path: Path, flush_every: int
) -> None:
    """A recorder that reuses preallocated buffers (and metadata) between episodes."""
    obs_space, act_space = OBS_SPACES["dict"], ACTION_SPACES["box_f32"]
    extras = ("intervention",)
    originals = [
        make_episode(obs_space, act_space, 3, data_seed=i, extras=extras, tags={"i": i}) for i in range(3)
    ]
    buffer = make_episode(obs_space, act_space, 3, data_seed=99, extras=extras, tags={"i": 99})
    url = tmp_path / "s"
    with EpisodeStore.create(
        url, observation_space=obs_space, action_space=act_space, step_extras=extras, flush_every=flush_every
    ) as store:
        for i, ep in enumerate(originals):
            for k in obs_space.spaces:
                buffer.observations[k][...] = ep.observations[k]
            buffer.actions[...] = ep.actions
            buffer.rewards[...] = ep.rewards
            buffer.extras["intervention"][...] = ep.extras["intervention"]
            buffer.metadata.tags["i"] = i
            buffer.metadata.seed = i
            store.add_episode(buffer)
            assert_same_episode(store[i], ep, obs_space, act_space, extras)
        buffer.rewards[...] = -1.0  # scribble after the last add, before the merge on close
        buffer.metadata.tags["i"] = -1
    with EpisodeStore.open(url) as store:
        for i, ep in enumerate(originals):
            assert_same_episode(store[i], ep, obs_space, act_space, extras)
        assert store.check().ok


def test_episodes_returned_by_a_writer_are_copies(tmp_path: Path) -> None:
    """Mutating what episode()/metadata_row() return must not change what is merged later."""
    obs_space, act_space = OBS_SPACES["box_f32"], ACTION_SPACES["box_f32"]
    ep = make_episode(obs_space, act_space, 3, data_seed=5, tags={"a": 1})
    url = tmp_path / "s"
    with EpisodeStore.create(
        url, observation_space=obs_space, action_space=act_space, flush_every=10
    ) as store:
        store.add_episode(ep)
        got = store.episode(0)
        got.observations[...] = -7
        got.rewards[...] = 123.0
        got.metadata.tags["a"] = 2
        store.metadata_row(0).tags["a"] = 3
        store.metadata_row(0).site = "changed"
        assert_same_episode(store.episode(0), ep, obs_space, act_space)
    with EpisodeStore.open(url) as store:
        assert_same_episode(store.episode(0), ep, obs_space, act_space)
        assert store.check().ok


@pytest.mark.parametrize("flush_every", [1, 2, 5])
def test_writer_reads_back_while_merging(tmp_path: Path, flush_every: int) -> None:
    """A writer reading its own episodes (just added, pending, being merged, merged) sees each whole."""
    obs_space, act_space = OBS_SPACES["box_u8_image"], ACTION_SPACES["box_f32"]
    rng = np.random.default_rng(flush_every)
    eps = [make_episode(obs_space, act_space, int(rng.integers(1, 6)), data_seed=i) for i in range(60)]
    url = tmp_path / "s"
    with EpisodeStore.create(
        url, observation_space=obs_space, action_space=act_space, flush_every=flush_every
    ) as store:
        for i, ep in enumerate(eps):
            assert store.add_episode(ep) == i
            for j in {i, max(0, i - 1), max(0, i - flush_every), int(rng.integers(0, i + 1))}:
                assert_same_episode(store.episode(j), eps[j], obs_space, act_space)
            assert len(store) == i + 1
            np.testing.assert_array_equal(store.episode_ends, np.cumsum([len(e) for e in eps[: i + 1]]))
            if i % 7 == 0:
                arrays, ends = store.load(["action"])
                assert_same_array(
                    arrays["action"], np.concatenate([e.actions for e in eps[: i + 1]]), np.float32, "action"
                )
                assert store.metadata()["seed"].tolist() == list(range(i + 1))
    with EpisodeStore.open(url) as store:
        for i, ep in enumerate(eps):
            assert_same_episode(store.episode(i), ep, obs_space, act_space)
        assert store.check().ok


@pytest.mark.parametrize(
    "dtype",
    ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
     "float64", "str"],
)
@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "no_checksum"])
def test_array_metadata_written_directly_is_what_zarr_writes(dtype: str, checksum: bool) -> None:
    """A local store's arrays are created by writing their metadata documents directly (fast):
    those documents must be the ones zarr's own create_array writes (the store's codecs: zstd with
    its checksum; and without, as before 2026-12-01)."""
    from zarr.codecs import ZstdCodec

    from loopsim.datasets.store import _ZSTD, _ZSTD_STR, _array_metadata

    assert _ZSTD.checksum and _ZSTD_STR.checksum
    if dtype == "str":
        spec: dict[str, Any] = {"shape": (0,), "chunks": (1024,), "dtype": str,
                                "compressors": ZstdCodec(level=0, checksum=checksum)}
    else:
        spec = {"shape": (0, 3, 2), "chunks": (4096, 3, 2), "dtype": np.dtype(dtype),
                "compressors": ZstdCodec(level=3, checksum=checksum), "fill_value": 0}
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    expected = group.create_array("x", **spec).metadata.to_dict()
    doc = _array_metadata(spec)
    assert doc is not None
    parsed = zarr.AsyncArray(metadata=doc, store_path=zarr.storage.StorePath(group.store, "x")).metadata
    assert parsed.to_dict() == expected
    assert json.loads(json.dumps(doc)) == json.loads(json.dumps(expected))
