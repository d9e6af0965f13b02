"""Tests of loopsim.datasets.sampling: store unions, transition and sequence datasets.

Synthetic episodes encode where every value comes from: observation row ``t`` of episode ``e`` is
``100 * e + t`` (in every element), action ``t`` is ``100 * e + t + 0.5``, reward ``t`` is
``100 * e + t``. So any misplaced row (the classic: the last ``next_observation`` taken from the next
episode's reset) shows up as a wrong number.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from loopsim.datasets import Episode, EpisodeMetadata, EpisodeStore
from loopsim.datasets.sampling import SequenceDataset, StoreUnion, TransitionDataset

BOX = gym.spaces.Box(-1e6, 1e6, shape=(3,), dtype=np.float32)
ACT = gym.spaces.Box(-1e6, 1e6, shape=(2,), dtype=np.float32)
DICT = gym.spaces.Dict({
    "observation": gym.spaces.Box(-1e6, 1e6, shape=(4,), dtype=np.float32),
    "achieved_goal": gym.spaces.Box(-1e6, 1e6, shape=(3,), dtype=np.float32),
    "desired_goal": gym.spaces.Box(-1e6, 1e6, shape=(3,), dtype=np.float32),
})
IMAGE = gym.spaces.Box(0, 255, shape=(6, 5, 3), dtype=np.uint8)
LENGTHS = [3, 1, 5, 2, 4]
SITES = ["lab", "dusty", "lab", "dusty", "lab"]


def _obs_rows(space: gym.Space, code: int, n: int) -> np.ndarray | dict[str, np.ndarray]:
    """``n`` observation rows whose value is ``code + row``."""
    values = code + np.arange(n)
    if isinstance(space, gym.spaces.Dict):
        return {k: _obs_rows(sub, code, n) for k, sub in space.spaces.items()}
    if space.dtype == np.uint8:
        values = values % 256
    return np.broadcast_to(values.reshape(n, *[1] * len(space.shape)), (n, *space.shape)).astype(space.dtype)


def make_episode(space: gym.Space, e: int, length: int, *, extras: bool = False, site: str = "lab",
                 success: bool = True, code: int | None = None) -> Episode:
    code = 100 * e if code is None else code
    steps = code + np.arange(length)
    terminated = np.zeros(length, dtype=bool)
    truncated = np.zeros(length, dtype=bool)
    (terminated if success else truncated)[-1] = True
    actions = np.repeat((steps + 0.5)[:, None], 2, axis=1).astype(np.float32)
    ex = {}
    if extras:
        ex = {"expert_action": -actions, "intervention": steps % 2 == 0}
    return Episode(observations=_obs_rows(space, code, length + 1), actions=actions,
                   rewards=steps.astype(np.float64), terminated=terminated, truncated=truncated, extras=ex,
                   metadata=EpisodeMetadata(seed=e, site=site, success=success,
                                            failure_mode=None if success else "timeout"))


def build_store(path: Path, space: gym.Space = BOX, lengths: list[int] = LENGTHS, *, flush_every: int = 3,
                extras: bool = False, code0: int = 0, close: bool = True) -> EpisodeStore:
    """A store of synthetic episodes; with flush_every=3 and 5 episodes, 3 are merged and 2 pending
    until close (close=False keeps the writer open, so reads see pending episodes)."""
    store = EpisodeStore.create(path, observation_space=space, action_space=ACT, flush_every=flush_every,
                                step_extras=("expert_action", "intervention") if extras else ())
    for e, n in enumerate(lengths):
        store.add_episode(make_episode(space, e, n, extras=extras, site=SITES[e % len(SITES)],
                                       success=e % 2 == 0, code=code0 + 100 * e))
    if close:
        store.close()
        return EpisodeStore.open(path)
    return store


def expected_codes(lengths: list[int], episodes: list[int] | None = None, code0: int = 0):
    """(episode, step, code) of every transition, in dataset order."""
    eps = range(len(lengths)) if episodes is None else episodes
    return [(e, t, code0 + 100 * e + t) for e in eps for t in range(lengths[e])]


def first_value(x: torch.Tensor) -> np.ndarray:
    """The per-row value of an observation batch (all elements of a row are equal)."""
    return x.reshape(x.shape[0], -1)[:, 0].double().numpy()


# ------------------------------------------------------------------------------------------ transitions
@pytest.mark.parametrize("close", [True, False], ids=["merged", "pending"])
def test_transitions_box_next_observation_at_episode_ends(tmp_path: Path, close: bool) -> None:
    store = build_store(tmp_path / "s", close=close)
    ds = TransitionDataset(store)
    want = expected_codes(LENGTHS)
    assert len(ds) == sum(LENGTHS) == len(want)
    batch = ds[np.arange(len(ds))]
    codes = np.array([c for _, _, c in want], dtype=np.float64)
    np.testing.assert_array_equal(first_value(batch["observation"]), codes)
    np.testing.assert_array_equal(first_value(batch["next_observation"]), codes + 1)  # row T at the end
    np.testing.assert_array_equal(batch["action"][:, 0].double().numpy(), codes + 0.5)
    np.testing.assert_array_equal(batch["reward"].double().numpy(), codes)
    np.testing.assert_array_equal(batch["episode"].numpy(), [e for e, _, _ in want])
    np.testing.assert_array_equal(batch["step"].numpy(), [t for _, t, _ in want])
    last = np.cumsum(LENGTHS) - 1
    flags = (batch["terminated"] | batch["truncated"]).numpy()
    np.testing.assert_array_equal(np.flatnonzero(flags), last)
    # The classic bug, spelled out: the last step's next_observation is its own episode's final row.
    for e, i in enumerate(last):
        item = ds[int(i)]
        assert item["next_observation"][0].item() == 100 * e + LENGTHS[e]
        assert item["observation"].shape == (3,) and item["observation"].dtype == torch.float32
        assert item["reward"].dtype == torch.float32 and item["terminated"].dtype == torch.bool
    if not close:
        store.close()


def test_transitions_dict_observations(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s", DICT)
    ds = TransitionDataset(store)
    codes = np.array([c for _, _, c in expected_codes(LENGTHS)], dtype=np.float64)
    batch = ds.get_batch(np.arange(len(ds)))
    assert set(batch["observation"]) == set(DICT.spaces) == set(batch["next_observation"])
    for key, sub in DICT.spaces.items():
        assert batch["observation"][key].shape == (len(ds), *sub.shape)
        np.testing.assert_array_equal(first_value(batch["observation"][key]), codes)
        np.testing.assert_array_equal(first_value(batch["next_observation"][key]), codes + 1)
    item = ds[-1]
    assert item["next_observation"]["desired_goal"].tolist() == [404.0] * 3


def test_transitions_uint8_images_stay_uint8(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s", IMAGE)
    ds = TransitionDataset(store, keys=["observation", "action"])
    batch = ds[np.arange(len(ds))]
    assert set(batch) == {"observation", "next_observation", "action", "episode", "step"}
    assert batch["observation"].dtype == torch.uint8 and batch["observation"].shape == (len(ds), 6, 5, 3)
    codes = np.array([c for _, _, c in expected_codes(LENGTHS)]) % 256
    np.testing.assert_array_equal(first_value(batch["observation"]), codes)
    np.testing.assert_array_equal(first_value(batch["next_observation"]), (codes + 1) % 256)


def test_transitions_extras_and_key_subset(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s", extras=True)
    ds = TransitionDataset(store)
    batch = ds[:]
    np.testing.assert_array_equal(batch["expert_action"].numpy(), -batch["action"].numpy())
    assert batch["intervention"].dtype == torch.bool
    small = TransitionDataset(store, keys=["action", "reward"], float32=False)
    assert set(small[0]) == {"action", "reward", "episode", "step"}
    assert small[0]["reward"].dtype == torch.float64
    with pytest.raises(KeyError, match="unknown data key 'nope'"):
        TransitionDataset(store, keys=["nope"])


def test_transitions_select_subset(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s")
    chosen = store.select(site="dusty")
    assert chosen.tolist() == [1, 3]
    ds = TransitionDataset(store, episodes=chosen)
    want = expected_codes(LENGTHS, [1, 3])
    assert len(ds) == len(want) == 3
    batch = ds[:]
    np.testing.assert_array_equal(batch["episode"].numpy(), [e for e, _, _ in want])
    np.testing.assert_array_equal(first_value(batch["next_observation"]), [c + 1 for _, _, c in want])
    failed = TransitionDataset(store, episodes=store.select(success=False, failure_mode="timeout"))
    assert sorted(set(failed[:]["episode"].tolist())) == [1, 3]
    empty = TransitionDataset(store, episodes=[])
    assert len(empty) == 0
    with pytest.raises(ValueError, match="empty"):
        empty.sample(4)


def test_batches_match_items_and_dataloaders(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s", DICT)
    ds = TransitionDataset(store)
    idx = [7, 0, 14, 3, 3]
    batch = ds[idx]
    items = ds.__getitems__(idx)
    mask = np.zeros(len(ds), dtype=bool)
    mask[[2, 5]] = True
    assert ds[mask]["step"].tolist() == ds[[2, 5]]["step"].tolist()
    assert ds[torch.tensor([2, 5])]["step"].tolist() == ds[[2, 5]]["step"].tolist()
    for j, i in enumerate(idx):
        single = ds[i]
        for key in ("action", "reward", "terminated", "episode"):
            assert torch.equal(single[key], batch[key][j]) and torch.equal(items[j][key], single[key])
        for key in DICT.spaces:
            assert torch.equal(single["next_observation"][key], batch["next_observation"][key][j])
    # Plain DataLoader with batch_size (torch calls __getitems__ and default_collate stacks).
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=0)
    got = list(loader)
    assert len(got) == 4 and got[-1]["action"].shape == (3, 2)
    whole = ds[np.arange(len(ds))]
    cat = torch.cat([b["next_observation"]["observation"] for b in got])
    assert torch.equal(cat, whole["next_observation"]["observation"])
    # The one-gather loader: reproducible with a seeded generator, one epoch visits every item once.
    runs = [list(ds.dataloader(4, generator=torch.Generator().manual_seed(3), num_workers=0))
            for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a["action"], b["action"])
    steps = torch.cat([b["episode"] * 100 + b["step"] for b in runs[0]]).sort().values
    assert torch.equal(steps, (whole["episode"] * 100 + whole["step"]).sort().values)


def test_sample_is_deterministic(tmp_path: Path) -> None:
    ds = TransitionDataset(build_store(tmp_path / "s"))
    a = ds.sample(256, torch.Generator().manual_seed(0))
    b = ds.sample(256, torch.Generator().manual_seed(0))
    c = ds.sample(256, np.random.default_rng(0))
    d = ds.sample(256, np.random.default_rng(0))
    assert a["action"].shape == (256, 2)
    assert torch.equal(a["action"], b["action"]) and torch.equal(c["action"], d["action"])
    # next_observation = observation + 1 for every sampled transition (no cross-episode rows).
    assert torch.equal(a["next_observation"], a["observation"] + 1)


# ------------------------------------------------------------------------------------------ sequences
def test_sequences_skip_short_episodes_with_pad_none(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s")
    ds = SequenceDataset(store, horizon=3, pad="none")
    # lengths [3, 1, 5, 2, 4] -> windows 1 + 0 + 3 + 0 + 2
    assert len(ds) == 6
    batch = ds[:]
    assert batch["observation"].shape == (6, 3, 3) and batch["action"].shape == (6, 3, 2)
    assert batch["mask"].all()
    np.testing.assert_array_equal(batch["episode"].numpy(), [0, 2, 2, 2, 4, 4])
    np.testing.assert_array_equal(batch["start"].numpy(), [0, 0, 1, 2, 0, 1])
    obs = batch["observation"][:, :, 0].double().numpy()
    starts = 100 * batch["episode"].numpy() + batch["start"].numpy()
    np.testing.assert_array_equal(obs, starts[:, None] + np.arange(3))
    np.testing.assert_array_equal(batch["action"][:, :, 0].double().numpy(), obs + 0.5)  # aligned
    assert (obs // 100 == batch["episode"].numpy()[:, None]).all()  # never crosses an episode


def test_sequences_edge_padding(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s", DICT)
    ds = SequenceDataset(store, horizon=4)
    # lengths [3, 1, 5, 2, 4]: short episodes give one padded window: 1 + 1 + 2 + 1 + 1
    assert len(ds) == 6
    item = ds[1]  # episode 1, one step
    assert item["episode"].item() == 1 and item["start"].item() == 0
    assert item["mask"].tolist() == [True, False, False, False]
    assert item["observation"]["observation"][:, 0].tolist() == [100.0] * 4  # obs[T] never in a window
    assert item["action"][:, 0].tolist() == [100.5] * 4
    item = ds[0]  # episode 0, three steps
    assert item["observation"]["achieved_goal"][:, 0].tolist() == [0, 1, 2, 2]
    assert item["mask"].tolist() == [True, True, True, False]
    assert item["terminated"].tolist() == [False, False, True, True]
    # diffusion_policy-style pads: windows start at -1 .. T - 4 + 2.
    padded = SequenceDataset(store, horizon=4, pad_before=1, pad_after=2, keys=["observation", "action"])
    lengths = np.array(LENGTHS)
    assert len(padded) == int(np.maximum(lengths - 4 + 2 + 1 + 1, 1).sum())
    batch = padded[:]
    assert set(batch) == {"observation", "action", "mask", "episode", "start"}
    first = batch["start"] == -1
    assert first.sum() == len(LENGTHS)
    assert not batch["mask"][first][:, 0].any()
    got = batch["action"][first][:, :2, 0]
    assert torch.equal(got[:, 0], got[:, 1])  # edge repeated before the start
    with pytest.raises(ValueError, match="pad='none' cannot pad"):
        SequenceDataset(store, horizon=4, pad="none", pad_after=1)
    with pytest.raises(ValueError, match="horizon"):
        SequenceDataset(store, horizon=0)


def test_sequences_dataloader(tmp_path: Path) -> None:
    ds = SequenceDataset(build_store(tmp_path / "s", IMAGE), horizon=2, episodes=[0, 2, 4])
    assert sorted(set(ds[:]["episode"].tolist())) == [0, 2, 4]
    batches = list(DataLoader(ds, batch_size=3, num_workers=0))
    assert batches[0]["observation"].shape == (3, 2, 6, 5, 3)
    assert batches[0]["observation"].dtype == torch.uint8
    fast = next(iter(ds.dataloader(3, shuffle=False)))
    assert torch.equal(fast["observation"], batches[0]["observation"])


# ------------------------------------------------------------------------------------------ unions
def test_union_of_two_stores(tmp_path: Path) -> None:
    a = build_store(tmp_path / "a", extras=True)
    b = build_store(tmp_path / "b", lengths=[2, 6], code0=10_000)
    union = StoreUnion([a, b])
    assert len(union) == 7 and union.n_transitions == sum(LENGTHS) + 8
    assert union.data_keys == ["observation", "action", "reward", "terminated", "truncated"]  # common
    assert union.locate(5) == (1, 0) and union.locate(-1) == (1, 1)
    assert union.episode(5).observations[0, 0] == 10_000
    meta = union.metadata()
    assert meta["store"].tolist() == [0] * 5 + [1] * 2
    assert meta["store_episode"].tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert meta["episode"].tolist() == list(range(7))
    assert meta["site"].tolist() == SITES + SITES[:2]
    assert union.select(site="dusty").tolist() == [1, 3, 6]
    assert union.select(site="dusty", store=1).tolist() == [6]
    assert union.select(success=True).tolist() == [0, 2, 4, 5]
    np.testing.assert_array_equal(union.episode_ends, np.cumsum(LENGTHS + [2, 6]))

    arrays, ends = union.load(["observation", "reward"], [6, 1])
    np.testing.assert_array_equal(ends, [1, 7])
    assert arrays["observation"].shape == (9, 3)
    assert arrays["reward"].tolist() == [100.0, 10_100, 10_101, 10_102, 10_103, 10_104, 10_105]
    with pytest.raises(KeyError, match="expert_action"):
        union.load(["expert_action"])

    ds = TransitionDataset(union)
    batch = ds[:]
    ends_all = np.cumsum(LENGTHS + [2, 6]) - 1
    nxt = first_value(batch["next_observation"])
    np.testing.assert_array_equal(nxt, first_value(batch["observation"]) + 1)
    # The step before the store boundary ends in store a's last episode, not in store b's first.
    assert nxt[ends_all[4]] == 100 * 4 + LENGTHS[4]
    assert batch["episode"][ends_all[4] + 1].item() == 5
    sub = TransitionDataset(union, episodes=union.select(site="dusty"))
    assert sorted(set(sub[:]["episode"].tolist())) == [1, 3, 6]
    seq = SequenceDataset(union, horizon=5, pad="none")
    assert seq[:]["episode"].tolist() == [2, 6, 6]


def test_union_refuses_mismatched_spaces(tmp_path: Path) -> None:
    a = build_store(tmp_path / "a")
    b = build_store(tmp_path / "b", DICT, lengths=[2])
    with pytest.raises(ValueError, match=r"store 1 .* observation space .*store 0"):
        StoreUnion([a, b])
    c = EpisodeStore.create(tmp_path / "c", observation_space=BOX,
                            action_space=gym.spaces.Box(-1, 1, (3,), np.float32))
    with pytest.raises(ValueError, match="action space"):
        StoreUnion([a, c])
    c.close()
    with pytest.raises(ValueError, match="at least one"):
        StoreUnion([])


def test_union_open_and_nesting(tmp_path: Path) -> None:
    build_store(tmp_path / "a").close()
    build_store(tmp_path / "b", lengths=[2]).close()
    with StoreUnion.open([tmp_path / "a", tmp_path / "b"]) as union:
        nested = StoreUnion([union, EpisodeStore.open(tmp_path / "b")])
        assert len(nested.stores) == 3 and len(nested) == 7
        assert TransitionDataset(nested).n_transitions == sum(LENGTHS) + 4
