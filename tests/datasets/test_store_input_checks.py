"""Bad input is refused before anything is written, and refusing it leaves the store writable.

Regression tests for a QA pass: metadata that did not fit its column (seeds >= 2**63, lone
surrogates) used to be committed and then break every merge; narrowing casts wrapped around or
overflowed silently; a remote overwrite deleted its own lock; a killed ``create`` left a directory
nothing would reuse (first at its start; later between its documents: a damaged store that
``open(mode="a")``, so a resumed loop, refused); unsorted ``load(episodes=...)`` misaligned episode
boundaries.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from loopsim.datasets import Episode, EpisodeMetadata, EpisodeStore, StoreError, StoreLockedError
from loopsim.datasets.store import LOCK_NAME

OBS = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
ACT = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


def episode(t: int = 3, k: int = 0, obs=None, act=None, **meta) -> Episode:
    rng = np.random.default_rng(k)
    return Episode(
        observations=rng.uniform(-1, 1, (t + 1, 3)).astype(np.float32) if obs is None else obs,
        actions=rng.uniform(-1, 1, (t, 2)).astype(np.float32) if act is None else act,
        rewards=np.full(t, float(k)),
        terminated=np.arange(t) == t - 1,
        truncated=np.zeros(t, bool),
        metadata=EpisodeMetadata(**meta),
    )


def pending_files(path: Path) -> list[str]:
    folder = path / "pending"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


BAD_METADATA = {
    "seed_too_large": {"seed": 2**63},
    "seed_negative": {"seed": -5},
    "seed_float": {"seed": 1.5},
    "surrogate_site": {"site": "\ud800"},
    "surrogate_policy": {"policy_id": "x\udfff"},
    "surrogate_failure": {"failure_mode": "\ud800"},
    "policy_not_str": {"policy_id": 3},
    "iteration_too_large": {"iteration": 2**64},
    "wall_time_nan": {"wall_time": float("nan")},
    "tags_not_json": {"tags": {"a": object()}},
    "site_params_not_mapping": {"site_params": [1, 2]},
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_is_refused_before_writing_and_the_store_stays_healthy(tmp_path, case):
    path = tmp_path / "s"
    store = EpisodeStore.create(path, observation_space=OBS, action_space=ACT, flush_every=2)
    store.add_episode(episode(k=0))
    log = path / "pending" / "000000000000.log"  # the session's pending-log segment: one record
    size = log.stat().st_size
    with pytest.raises(ValueError):
        store.add_episode(episode(k=1, **BAD_METADATA[case]))
    assert len(store) == 1 and pending_files(path) == [log.name] and log.stat().st_size == size
    store.add_episode(episode(k=2, seed=7))  # triggers a merge: it must not fail
    store.close()
    with EpisodeStore.open(path) as reader:
        assert len(reader) == 2 and reader.check().ok
        assert reader.metadata()["seed"].tolist() == [-1, 7]


def test_numpy_integer_seed_is_accepted_as_int(tmp_path):
    with EpisodeStore.create(tmp_path / "s", observation_space=OBS, action_space=ACT) as store:
        store.add_episode(episode(seed=np.int64(2**62), iteration=np.int32(3)))
        assert store.metadata_row(0).seed == 2**62 and type(store.metadata_row(0).seed) is int
    assert EpisodeStore.open(tmp_path / "s").metadata_row(0).seed == 2**62


@pytest.mark.parametrize(
    ("obs_space", "act_space", "bad", "match"),
    [
        (gym.spaces.Box(0, 255, (2,), np.uint8), ACT, "obs", "outside what the stored dtype uint8 holds"),
        (OBS, ACT, "obs_overflow", "too large for the stored dtype float32"),
        (OBS, ACT, "act_overflow", "too large for the stored dtype float32"),
        (OBS, gym.spaces.Discrete(3), "discrete", "outside the space"),
        (OBS, gym.spaces.MultiDiscrete([2, 3]), "multidiscrete", "outside the space"),
    ],
)
def test_values_the_stored_dtype_or_space_cannot_hold_are_refused(tmp_path, obs_space, act_space, bad, match):
    t = 2
    obs = np.zeros((t + 1, *obs_space.shape), dtype=np.float32)
    act = np.zeros((t, *act_space.shape), dtype=act_space.dtype)
    if bad == "obs":
        obs = np.array([[7, 65535], [1, 2], [3, 300]], dtype=np.uint16)
    elif bad == "obs_overflow":
        obs = np.zeros((t + 1, 3)); obs[1, 1] = 1e40  # noqa: E702
    elif bad == "act_overflow":
        act = np.zeros((t, 2)); act[0, 0] = -1e300  # noqa: E702
    elif bad == "discrete":
        act = np.array([1, 7])
    elif bad == "multidiscrete":
        act = np.array([[1, 2], [2, 0]])
    store = EpisodeStore.create(tmp_path / "s", observation_space=obs_space, action_space=act_space)
    with pytest.raises(ValueError, match=match):
        store.add_episode(episode(t, obs=obs, act=act))
    assert len(store) == 0 and pending_files(tmp_path / "s") == []
    store.close()


def test_widening_and_exact_casts_are_still_accepted(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", observation_space=OBS, action_space=ACT)
    store.add_episode(episode(obs=np.zeros((4, 3), np.float64), act=np.ones((3, 2), np.float64)))
    assert store.episode(0).actions.dtype == np.float32
    store.close()


def test_remote_overwrite_keeps_its_lock(tmp_path):
    url = f"memory://loopsim-tests/{tmp_path.name}/lock"
    EpisodeStore.create(url, observation_space=OBS, action_space=ACT).close()
    writer = EpisodeStore.create(url, observation_space=OBS, action_space=ACT, overwrite=True)
    with pytest.raises(StoreLockedError):
        EpisodeStore.open(url, mode="a")
    writer.add_episode(episode(k=1))
    writer.close()
    with EpisodeStore.open(url, mode="a") as again:  # released at close
        assert len(again) == 1


def test_directory_left_with_only_a_lock_file_counts_as_empty(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    (path / LOCK_NAME).write_bytes(b"")  # a create killed right after taking its lock
    with pytest.raises(FileNotFoundError):
        EpisodeStore.open(path)
    EpisodeStore.create(path, observation_space=OBS, action_space=ACT).close()
    assert len(EpisodeStore.open(path)) == 0


def test_a_store_whose_arrays_were_deleted_is_damaged_and_overwrite_replaces_it(tmp_path):
    # Arrays lost after the root zarr.json (the store's commit point) make a recognisable, damaged
    # store, which overwrite=True replaces, never an anonymous group that nothing would touch.
    path = tmp_path / "s"
    EpisodeStore.create(path, observation_space=OBS, action_space=ACT).close()
    import shutil

    shutil.rmtree(path / "data")
    shutil.rmtree(path / "meta")
    with pytest.raises(StoreError, match="missing array"):
        EpisodeStore.open(path)
    EpisodeStore.create(path, observation_space=OBS, action_space=ACT, overwrite=True).close()
    assert len(EpisodeStore.open(path)) == 0


def test_load_refuses_unsorted_episode_indices(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", observation_space=OBS, action_space=ACT, flush_every=2)
    for k in range(4):
        store.add_episode(episode(t=k + 1, k=k))
    store.add_episode(episode(t=2, k=9))  # one pending
    with pytest.raises(ValueError, match="strictly ascending"):
        store.load(episodes=[4, 0])
    arrays, ends = store.load(["reward"], episodes=[0, 4])
    assert ends.tolist() == [1, 3] and arrays["reward"].tolist() == [0.0, 9.0, 9.0]
    store.close()


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        EpisodeStore.create("", observation_space=OBS, action_space=ACT)
    path = tmp_path / "s"
    EpisodeStore.create(path, observation_space=OBS, action_space=ACT).close()
    with pytest.raises(ValueError, match="flush_every"):
        EpisodeStore.open(path, mode="a", flush_every=0)
    store = EpisodeStore.open(path)
    with pytest.raises(TypeError, match="integer"):
        store.episode(1.5)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.metadata()
    assert len(EpisodeStore.open(f"file://localhost{path}")) == 0


def test_a_file_url_is_percent_decoded(tmp_path):
    """``Path.as_uri()`` writes a space as ``%20``: that URL opened (or created) a store named
    ``my%20store`` beside the real one."""
    path = tmp_path / "my store #1"
    EpisodeStore.create(path, observation_space=OBS, action_space=ACT).close()
    uri = path.as_uri()
    assert "%20" in uri
    with EpisodeStore.open(uri) as store:
        assert len(store) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my store #1"]


class Killed(BaseException):
    """Stands in for SIGKILL: raised from inside a write, nothing after it runs (what is on disk is
    what a killed process leaves; its lock is released with the process either way)."""


def _kill_at_write(monkeypatch, n: int, *, torn: bool) -> None:
    """Make the store's n-th file write (0-based) kill the 'process', leaving the temporary file
    half written if ``torn`` (a kill inside atomic_write) or nothing (a kill just before it)."""
    import loopsim.datasets.store as store_module

    real = store_module.atomic_write
    count = [0]

    def write(path, data):
        if count[0] == n:
            if torn:
                partial = Path(path).with_name(f".{Path(path).name}.0123456789ab.partial")
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_bytes(bytes(data)[: len(bytes(data)) // 2])
            raise Killed
        count[0] += 1
        return real(path, data)

    monkeypatch.setattr(store_module, "atomic_write", write)


@pytest.mark.parametrize("torn", [False, True], ids=["between-writes", "inside-a-write"])
def test_a_create_killed_at_any_write_leaves_no_store_and_create_replaces_it(tmp_path, monkeypatch, torn):
    space = gym.spaces.Dict({"a": OBS, "b": gym.spaces.Discrete(3)})
    writes = 0
    while True:
        path = tmp_path / f"s{writes}"
        with monkeypatch.context() as m:
            _kill_at_write(m, writes, torn=torn)
            try:
                EpisodeStore.create(path, observation_space=space, action_space=ACT,
                                    step_extras=["expert_action"]).close()
            except Killed:
                killed = True
            else:
                killed = False
        if not killed:  # every write done: a whole store, nothing to recover
            assert writes > 20 and len(EpisodeStore.open(path)) == 0
            break
        assert not (path / "zarr.json").exists()  # the root document is the last write
        with pytest.raises(FileNotFoundError, match="interrupted EpisodeStore.create"):
            EpisodeStore.open(path, mode="a")
        # What a resumed loop or recorder does: create without overwrite, then record.
        obs = {"a": np.zeros((3, 3), np.float32), "b": np.array([0, 1, 2])}
        with EpisodeStore.create(path, observation_space=space, action_space=ACT,
                                 step_extras=["expert_action"]) as store:
            ep = episode(t=2, obs=obs, act=np.zeros((2, 2), np.float32))
            ep.extras = {"expert_action": np.ones((2, 2), np.float32)}
            store.add_episode(ep)
        with EpisodeStore.open(path) as store:
            assert len(store) == 1 and store.check().ok and store.check().uncommitted == []
            assert store.episode(0).extras["expert_action"].tolist() == [[1.0, 1.0]] * 2
        assert not list(path.rglob("*.partial"))
        writes += 1


def test_a_remote_create_killed_midway_leaves_no_store(tmp_path, monkeypatch):
    from zarr.storage import FsspecStore

    url = f"memory://loopsim-tests/{tmp_path.name}/killed-create"
    real = FsspecStore.set
    calls = [0]

    async def set_then_die(self, key, value):
        if calls[0] == 5:
            raise Killed
        calls[0] += 1
        return await real(self, key, value)

    with monkeypatch.context() as m:
        m.setattr(FsspecStore, "set", set_then_die)
        with pytest.raises(Killed):
            EpisodeStore.create(url, observation_space=OBS, action_space=ACT)
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/loopsim-tests/{tmp_path.name}/killed-create"
    assert not fs.exists(f"{root}/zarr.json") and fs.find(f"{root}/meta")  # some documents, no root
    with pytest.raises(FileNotFoundError):
        EpisodeStore.open(url)
    # (A really killed remote writer leaves its lock key, removed by hand as its error says; here the
    # exception released it.)
    assert not fs.exists(f"{root}/{LOCK_NAME}")
    with EpisodeStore.create(url, observation_space=OBS, action_space=ACT) as store:
        store.add_episode(episode(k=4))
    with EpisodeStore.open(url) as store:
        assert len(store) == 1 and store.check().ok


@pytest.mark.parametrize("stray", ["notes.txt", "data/observation/c/0", "meta/zarr.json.bak"])
def test_a_directory_with_anything_else_is_not_taken_for_a_killed_create(tmp_path, stray):
    path = tmp_path / "s"
    (path / "meta" / "seed").mkdir(parents=True)
    (path / "meta" / "seed" / "zarr.json").write_text("{}")
    (path / stray).parent.mkdir(parents=True, exist_ok=True)
    (path / stray).write_text("keep me")
    with pytest.raises(FileExistsError):
        EpisodeStore.create(path, observation_space=OBS, action_space=ACT)
    with pytest.raises(StoreError, match="no zarr.json"):
        EpisodeStore.create(path, observation_space=OBS, action_space=ACT, overwrite=True)
    assert (path / stray).read_text() == "keep me"


def _kill_an_overwrite_after_its_first_folder(monkeypatch, path: Path) -> None:
    """Run ``create(path, overwrite=True)``, 'killed' right after it deleted its first folder."""
    import shutil

    real = shutil.rmtree
    with monkeypatch.context() as m:
        def rmtree_then_die(p, *a, **k):
            real(p, *a, **k)
            raise Killed

        m.setattr(shutil, "rmtree", rmtree_then_die)
        with pytest.raises(Killed):
            EpisodeStore.create(path, observation_space=OBS, action_space=ACT, overwrite=True)


def test_an_overwrite_killed_midway_is_replaced_by_the_next_overwrite(tmp_path, monkeypatch):

    path = tmp_path / "s"
    with EpisodeStore.create(path, observation_space=OBS, action_space=ACT, flush_every=1) as store:
        store.add_episode(episode(k=1))
    _kill_an_overwrite_after_its_first_folder(monkeypatch, path)
    assert (path / "zarr.json").exists()  # the root document goes last: still a (damaged) store
    EpisodeStore.create(path, observation_space=OBS, action_space=ACT, overwrite=True).close()
    with EpisodeStore.open(path) as store:
        assert len(store) == 0 and store.check().ok


def test_create_checks_again_under_the_lock_and_never_deletes_a_store_made_meanwhile(tmp_path, monkeypatch):
    # Another process may finish creating (and fill, and close) a store between create()'s first look
    # (leftovers, or nothing: "no store") and its taking the lock. The look must be taken again under
    # the lock: the old code then deleted the new store's data/ and meta/ as "leftovers" and wrote its
    # own root document over it (the other store's pending episodes became this store's).
    path = tmp_path / "s"
    real = EpisodeStore._acquire_lock
    raced = []

    def other_process_first(self):
        if not raced:
            raced.append(True)
            with EpisodeStore.create(path, observation_space=OBS, action_space=ACT, flush_every=1) as other:
                other.add_episode(episode(k=5))
            with EpisodeStore.open(path, mode="a") as other:  # one merged, one pending episode
                other.add_episode(episode(k=6))
                other._pending.clear()  # leave it in the pending log, as a killed writer would
                other._n_pending = 0
        return real(self)

    monkeypatch.setattr(EpisodeStore, "_acquire_lock", other_process_first)
    with pytest.raises(FileExistsError):
        EpisodeStore.create(path, observation_space=OBS, action_space=ACT)
    monkeypatch.undo()
    with EpisodeStore.open(path) as store:
        assert len(store) == 2 and store.metadata()["return"].tolist() == [15.0, 18.0]


@pytest.mark.parametrize("link", ["data/observation", "meta/seed/zarr.json",
                                  ".zarr.json.0123456789ab.partial"])
def test_leftovers_holding_a_symlink_are_not_a_killed_create(tmp_path, link):
    # create() writes no symbolic links: a directory holding one is not what a killed create left, so
    # nothing in it is deleted (the old code unlinked the link as a leftover).
    path = tmp_path / "s"
    (path / "meta" / "seed").mkdir(parents=True)
    (path / "data").mkdir()
    (path / "meta" / "zarr.json").write_text("{}")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("keep me")
    (path / link).symlink_to(target if link == "data/observation" else target / "keep")
    with pytest.raises(FileExistsError):
        EpisodeStore.create(path, observation_space=OBS, action_space=ACT)
    with pytest.raises(StoreError, match="no zarr.json"):
        EpisodeStore.open(path)
    assert (path / link).is_symlink() and (target / "keep").read_text() == "keep me"
    assert (path / "meta" / "zarr.json").exists()


def test_a_remote_create_never_deletes_keys_that_a_create_does_not_write(tmp_path):
    # Remote prefixes without a root zarr.json: create() may replace a killed create's documents, but
    # anything else there (here under data/ and meta/) is not its to delete; it refuses, as locally.
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/loopsim-tests/{tmp_path.name}/foreign"
    fs.pipe(f"{root}/data/user.csv", b"keep me")
    fs.pipe(f"{root}/meta/seed/zarr.json", b"{}")
    url = f"memory:/{root}"
    with pytest.raises(FileExistsError):
        EpisodeStore.create(url, observation_space=OBS, action_space=ACT)
    with pytest.raises(StoreError, match="no zarr.json"):
        EpisodeStore.open(url)
    assert fs.cat(f"{root}/data/user.csv") == b"keep me" and fs.exists(f"{root}/meta/seed/zarr.json")


def test_an_interrupted_overwrite_is_refused_by_open_until_an_overwrite_replaces_it(tmp_path, monkeypatch):
    # An overwrite deletes the old store's files (root document last). Killed midway, what is left
    # used to open as a store holding whatever the wipe had not yet reached (SIGKILL at random instants
    # gave e.g. 4 of 6 episodes: the pending log gone, the arrays not yet). The overwrite now marks
    # the root document first, so open refuses the half-deleted store and the next overwrite replaces it.

    from loopsim.datasets import StoreDamagedError

    path = tmp_path / "s"
    with EpisodeStore.create(path, observation_space=OBS, action_space=ACT, flush_every=2) as store:
        for k in range(3):
            store.add_episode(episode(k=k))
    store = EpisodeStore.open(path, mode="a", flush_every=100)
    store.add_episode(episode(k=3))  # pending: committed in the log, not merged
    store._pending.clear()
    store._n_pending = 0
    store._release_lock()  # "killed": the log stays
    assert len(EpisodeStore.open(path)) == 4
    _kill_an_overwrite_after_its_first_folder(monkeypatch, path)
    for mode in ("r", "a"):
        with pytest.raises(StoreDamagedError, match="interrupted overwrite"):
            EpisodeStore.open(path, mode=mode)
    with pytest.raises(FileExistsError):
        EpisodeStore.create(path, observation_space=OBS, action_space=ACT)
    EpisodeStore.create(path, observation_space=OBS, action_space=ACT, overwrite=True).close()
    with EpisodeStore.open(path) as store:
        assert len(store) == 0 and store.check().ok


def test_create_over_a_folder_that_is_not_a_store_says_so(tmp_path):
    # it said "open it with EpisodeStore.open(url, mode='a') to append, or pass overwrite=True":
    # both then failed with "not a loopsim episode store"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists: .* is not a loopsim episode store: it has no "
                       "zarr.json; EpisodeStore.create writes only into a new or empty directory"):
        EpisodeStore.create(tmp_path / "d", observation_space=OBS, action_space=ACT)
    assert (tmp_path / "d" / "notes.txt").read_text() == "keep"
