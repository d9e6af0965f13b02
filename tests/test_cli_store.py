"""The episode-store commands: ``loopsim info``, ``loopsim store check``, ``export`` and ``import``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import zarr
from rich.console import Console
from typer.testing import CliRunner

from loopsim import cli
from loopsim.cli import app
from loopsim.datasets import Episode, EpisodeMetadata, EpisodeStore
from loopsim.datasets.store import PENDING_SUFFIX
from loopsim.evaluation import wilson_interval

runner = CliRunner()
OBS = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
ACTION = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

# (site, success, failure_mode, length) per episode: lab 2/3 successes, heavy 0/3.
EPISODES = [
    ("lab", True, None, 3), ("lab", False, "dropped", 4), ("lab", True, None, 2),
    ("heavy", False, "dropped", 5), ("heavy", False, "timeout", 6), ("heavy", False, "dropped", 3),
]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables one row per line whatever the terminal (rich reads the width once, at start-up)."""
    monkeypatch.setattr(cli, "console", Console(width=300))


def make_episode(t: int, seed: int = 0, **meta) -> Episode:
    """A synthetic episode of ``t`` steps (random data, the given metadata)."""
    rng = np.random.default_rng(seed)
    terminated = np.zeros(t, dtype=bool)
    terminated[-1] = True
    return Episode(observations=rng.uniform(-1, 1, (t + 1, 3)).astype(np.float32),
                   actions=rng.uniform(-1, 1, (t, 2)).astype(np.float32), rewards=rng.normal(size=t),
                   terminated=terminated, truncated=np.zeros(t, dtype=bool),
                   metadata=EpisodeMetadata(seed=seed, **meta))


def build_store(path: Path, episodes=EPISODES, *, close: bool = True, flush_every: int = 4) -> EpisodeStore:
    store = EpisodeStore.create(path, observation_space=OBS, action_space=ACTION,
                                env_id="loopsim/FactoryPickPlace-v0", flush_every=flush_every)
    for i, (site, success, failure, t) in enumerate(episodes):
        store.add_episode(make_episode(t, seed=i, site=site, success=success, failure_mode=failure,
                                       policy_id="bc", policy_version="v1", iteration=i % 2))
    if close:
        store.close()
    return store


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and '<dir>' for directories) under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(root.rglob("*"))}


def committed_bytes(path: Path) -> dict[str, bytes]:
    """Every committed array and metadata column as raw bytes (to compare bit for bit)."""
    with EpisodeStore.open(path) as store:
        arrays, ends = store.load()
        out = {f"data/{k}": v.tobytes() + str(v.dtype).encode() for k, v in arrays.items()}
        out["ends"] = ends.tobytes()
        out.update({f"meta/{k}": np.asarray(v).astype(str).tobytes() for k, v in store.metadata().items()})
    return out


def invoke(*args: str):
    return runner.invoke(app, list(args), terminal_width=300)


def assert_one_red_line(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not a crash
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert needle in lines[0], result.output


# ----------------------------------------------------------------------------- info


def test_info_reports_episodes_success_and_failure_counts(tmp_path):
    build_store(tmp_path / "s")
    result = invoke("info", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "loopsim/FactoryPickPlace-v0" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 3}
    assert rows["episodes"].split("│")[2].strip() == "6"
    assert rows["transitions"].split("│")[2].strip() == str(sum(e[3] for e in EPISODES))
    assert rows["schema version"].split("│")[2].strip() == "1"
    lo, hi = wilson_interval(2, 6)
    assert f"33.3% [{lo:.1%}, {hi:.1%}]" in rows["success"]
    size = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert f"({size} bytes)" in rows["size on disk"]
    assert rows["pending episodes"].split("│")[2].strip().startswith("0 ")

    cells = {}
    for line in out.splitlines():
        if line.startswith("│"):
            row = [c.strip() for c in line.split("│")[1:-1]]
            cells[row[0]] = row
    lab_lo, lab_hi = wilson_interval(2, 3)
    assert cells["lab"][:5] == ["lab", "3", "9", "66.7%", f"[{lab_lo:.1%}, {lab_hi:.1%}]"]
    assert cells["lab"][-1] == "dropped: 1"
    assert cells["heavy"][:5] == ["heavy", "3", "14", "0.0%", f"[0.0%, {wilson_interval(0, 3)[1]:.1%}]"]
    assert cells["heavy"][-1] == "dropped: 2, timeout: 1"
    assert cells["(all)"][:4] == ["(all)", "6", "23", "33.3%"]
    assert cells["dropped"] == ["dropped", "3", "75.0%"]  # failure-mode table
    assert cells["timeout"] == ["timeout", "1", "25.0%"]
    assert "policies and loop iterations" in out


def test_info_through_a_file_url_reports_the_size_on_disk(tmp_path):
    """``file://localhost/...`` and percent-encoded URLs (``Path.as_uri()``): the size used to be
    looked up under the undecoded path (``FileNotFoundError``, or 0 bytes)."""
    path = tmp_path / "my store"
    build_store(path)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    for url in (path.as_uri(), f"file://localhost{path.as_uri().removeprefix('file://')}"):
        result = invoke("info", url)
        assert result.exit_code == 0, result.output
        row = next(line for line in result.output.splitlines() if "size on disk" in line)
        assert f"({size} bytes)" in row


def test_info_counts_pending_episodes_of_a_live_writer(tmp_path):
    writer = build_store(tmp_path / "s", EPISODES[:3], close=False, flush_every=100)
    try:
        result = invoke("info", str(tmp_path / "s"))
    finally:
        writer.close()
    assert result.exit_code == 0, result.output
    assert "3 (committed, not yet merged" in result.output


def test_info_on_an_empty_store(tmp_path):
    EpisodeStore.create(tmp_path / "s", observation_space=OBS, action_space=ACTION).close()
    result = invoke("info", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    assert "no episodes yet" in result.output


# ----------------------------------------------------------------------------- store check


URL = "foo://bucket/x.zarr"


@pytest.mark.parametrize("args", [("info", URL), ("store", "check", URL), ("replay", URL, "--all")])
def test_a_url_fsspec_cannot_open_is_a_one_line_error(args):
    # Was a traceback with exit code 1 (replay's "diverged" code); fsspec's own reason is kept.
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert f"{URL} is not a URL fsspec can open (Protocol not known: foo)" in result.output
    assert "Traceback" not in result.output


def test_check_ok(tmp_path):
    build_store(tmp_path / "s")
    before = tree_digest(tmp_path / "s")
    result = invoke("store", "check", str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    assert "6 committed episodes" in result.output and "ok" in result.output
    assert tree_digest(tmp_path / "s") == before  # checking changes nothing


def _commit_pending_episode(path: Path) -> None:
    """A writer commits one episode (a pending object) and is SIGKILLed before merging it."""
    writer = EpisodeStore.open(path, mode="a", flush_every=1000)
    writer.add_episode(make_episode(4, seed=99))  # committed as a record of the pending/ log
    writer._release_lock()  # the process "dies": no merge, the OS drops its lock
    writer._closed = True


def _leave_rows_past_index(path: Path) -> None:
    for key, extra in (("data/action", 7), ("data/observation", 9), ("meta/site", 2)):
        arr = zarr.open_array(str(path), path=key, mode="r+")
        arr.resize((arr.shape[0] + extra, *arr.shape[1:]))
    (path / "pending" / f"{0:012d}{PENDING_SUFFIX}").write_bytes(b"already merged")


def test_check_finds_an_uncommitted_tail_and_repair_drops_it(tmp_path):
    path = tmp_path / "s"
    build_store(path)
    # What a writer SIGKILLed during a merge leaves: a committed pending episode, rows past the index
    # written by the merge in flight, and a pending object of an earlier merge not yet deleted.
    _commit_pending_episode(path)
    committed = committed_bytes(path)
    _leave_rows_past_index(path)

    result = invoke("store", "check", str(path))
    assert result.exit_code == 1, result.output
    assert "uncommitted: data/action has 7 rows past the index" in result.output
    assert "pending objects already merged" in result.output
    assert "--repair" in result.output

    result = invoke("store", "check", str(path), "--repair")
    assert result.exit_code == 0, result.output
    assert "repaired" in result.output and "ok" in result.output
    assert committed_bytes(path) == committed  # committed episodes bit-identical
    store = EpisodeStore.open(path)
    assert len(store) == len(EPISODES) + 1  # the pending episode was committed: repair keeps it
    assert np.array_equal(store.episode(-1).actions, make_episode(4, seed=99).actions)
    EpisodeStore.open(path, mode="a").close()  # the repair released the writer lock
    result = invoke("store", "check", str(path))
    assert result.exit_code == 0 and "uncommitted" not in result.output, result.output


def test_check_with_a_live_writer_reports_its_merge_in_flight_not_leftovers(tmp_path):
    path = tmp_path / "s"
    build_store(path)
    writer = EpisodeStore.open(path, mode="a", flush_every=1000)  # a live writer holds the lock
    try:
        assert writer.writer_active() is True
        writer.add_episode(make_episode(4, seed=99))  # committed to its pending log
        # Stop its merge between the data/metadata writes and the index write: a merge in flight.
        real, calls = writer._write_blocks, []

        class Killed(Exception):
            pass

        async def stop_before_index(blocks):
            if "meta/episode_ends" in blocks:
                raise Killed
            calls.append(list(blocks))
            return await real(blocks)

        writer._write_blocks = stop_before_index
        with pytest.raises(Killed):
            writer._merge(sorted(writer._pending))
        assert calls  # data and metadata rows past the index were written
        with EpisodeStore.open(path) as reader:
            assert reader.writer_active() is True
        result = invoke("store", "check", str(path))
        assert result.exit_code == 0, result.output
        assert "in flight: data/action has 4 rows past the index" in result.output
        assert "a writer holds the store's lock" in result.output and "--repair" not in result.output
    finally:
        writer._release_lock()  # the writer dies here, mid-merge
        writer._closed = True
    # The same rows with the writer gone are a killed writer's leftovers again.
    with EpisodeStore.open(path) as reader:
        assert reader.writer_active() is False
    result = invoke("store", "check", str(path))
    assert result.exit_code == 1 and "uncommitted: data/action has 4 rows" in result.output, result.output


def test_check_reports_damage_that_repair_cannot_undo(tmp_path):
    path = tmp_path / "s"
    build_store(path)
    lengths = zarr.open_array(str(path), path="meta/length", mode="r+")
    lengths[1] = 99
    for extra in ((), ("--repair",)):
        result = invoke("store", "check", str(path), *extra)
        assert result.exit_code == 1, result.output
        assert "problem: meta/length disagrees with episode_ends for episodes [1]" in result.output


def test_check_on_a_store_that_cannot_be_opened_is_a_problem(tmp_path):
    path = tmp_path / "s"
    build_store(path)
    arr = zarr.open_array(str(path), path="data/reward", mode="r+")
    arr.resize((3,))  # fewer rows than the index commits
    result = invoke("store", "check", str(path))
    assert result.exit_code == 1, result.output
    assert "problem:" in result.output and "data/reward" in result.output


# ----------------------------------------------------------------------------- errors


COMMANDS = [
    ("info", "{p}"), ("store", "check", "{p}"), ("store", "check", "{p}", "--repair"),
    ("export", "{p}", "--to", "minari", "x-v0"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:3]))
def test_errors_on_a_directory_that_is_not_a_store_leave_it_untouched(tmp_path, monkeypatch, command):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("precious")
    (other / "sub" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    before = tree_digest(other)
    result = invoke(*[c.format(p=other) for c in command])
    assert_one_red_line(result, "is not a loopsim episode store")
    assert tree_digest(other) == before


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:3]))
def test_errors_on_a_missing_path_create_nothing(tmp_path, monkeypatch, command):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    missing = tmp_path / "missing"
    result = invoke(*[c.format(p=missing) for c in command])
    assert_one_red_line(result, f"no episode store at {missing}")
    assert not missing.exists()


def test_errors_on_a_locked_store_and_a_newer_schema(tmp_path):
    path = tmp_path / "s"
    build_store(path)
    with EpisodeStore.open(path, mode="a"):
        assert_one_red_line(invoke("store", "check", str(path), "--repair"), "open for writing by another")
        assert invoke("store", "check", str(path)).exit_code == 0  # readers do not need the lock
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["loopsim"]["schema_version"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    before = tree_digest(path)
    for command in (("info", str(path)), ("store", "check", str(path), "--repair")):
        assert_one_red_line(invoke(*command), "schema version 99")
    assert tree_digest(path) == before


# ----------------------------------------------------------------------------- Minari


def test_export_and_import_round_trip_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    build_store(tmp_path / "s")
    result = invoke("export", str(tmp_path / "s"), "--to", "minari", "loopsim/ops-v0")
    assert result.exit_code == 0, result.output
    assert "exported 6 episodes (23 transitions)" in result.output
    assert (tmp_path / "minari" / "loopsim" / "ops-v0" / "data" / "metadata.json").is_file()
    assert_one_red_line(invoke("export", str(tmp_path / "s"), "--to", "minari", "loopsim/ops-v0"),
                        "already exists")
    result = invoke("export", str(tmp_path / "s"), "--to", "minari", "loopsim/ops-v0", "--overwrite")
    assert result.exit_code == 0, result.output

    result = invoke("import", "loopsim/ops-v0", str(tmp_path / "back"), "--from", "minari")
    assert result.exit_code == 0, result.output
    assert "imported 6 episodes (23 transitions)" in result.output
    assert committed_bytes(tmp_path / "back") == committed_bytes(tmp_path / "s")
    assert_one_red_line(invoke("import", "loopsim/ops-v0", str(tmp_path / "back"), "--from", "minari"),
                        "already exists")
    assert_one_red_line(invoke("import", "loopsim/nope-v0", str(tmp_path / "b2"), "--from", "minari"),
                        "no local Minari dataset")
    assert_one_red_line(invoke("export", str(tmp_path / "s"), "--to", "minari", "no_version"),
                        "not a Minari dataset id")
    assert not (tmp_path / "b2").exists()


def test_import_overwrite_never_replaces_a_directory_that_is_not_a_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    build_store(tmp_path / "s")
    assert invoke("export", str(tmp_path / "s"), "--to", "minari", "ops-v0").exit_code == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    before = tree_digest(other)
    result = invoke("import", "ops-v0", str(other), "--from", "minari", "--overwrite")
    assert_one_red_line(result, "not a loopsim episode store")
    assert tree_digest(other) == before


def test_store_commands_are_listed_in_help():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("info", "store", "export", "import"):
        assert name in result.output
    result = invoke("store", "--help")
    assert result.exit_code == 0 and "check" in result.output
