"""The episode store's safety promises, tested by trying to break them.

* Killing the writer (SIGKILL) at any instant loses at most the episode in flight; reopening shows
  exactly the committed episodes and appending resumes with no gap and no duplicate.
* One writer at a time (a lock); readers polling a store being written only see whole episodes.
* Opening (r or a) never changes anything; a path that is not a store, a damaged store or a store of
  a newer schema gives a clear error and is left byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from loopsim.cli import app
from loopsim.datasets import (
    EpisodeStore,
    NotAStoreError,
    StoreDamagedError,
    StoreLockedError,
    StoreSchemaError,
)

# The deterministic episode k, shared by the parent and the child processes (exec'd in both).
EPISODE_SRC = textwrap.dedent("""
    import gymnasium as gym
    import numpy as np

    from loopsim.datasets import Episode, EpisodeMetadata

    OBS_SPACE = gym.spaces.Dict({"img": gym.spaces.Box(0, 255, (32, 32, 3), np.uint8),
                                 "vec": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)})
    ACT_SPACE = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    EXTRAS = ["intervention"]


    def episode(k):
        t = 1 + k % 6
        img = np.full((t + 1, 32, 32, 3), k % 251, dtype=np.uint8)
        img[:, 0, 0, 0] = np.arange(t + 1)
        vec = (k + np.arange(t + 1, dtype=np.float32))[:, None] * np.ones(3, dtype=np.float32)
        term = np.zeros(t, dtype=bool)
        term[-1] = k % 2 == 0
        trunc = np.zeros(t, dtype=bool)
        trunc[-1] = k % 2 == 1
        return Episode(observations={"img": img, "vec": vec}, actions=np.full((t, 2), k / 1000, np.float32),
                       rewards=np.full(t, float(k)), terminated=term, truncated=trunc,
                       extras={"intervention": np.arange(t) % 2 == 1},
                       metadata=EpisodeMetadata(seed=k, site=f"site-{k % 3}", tags={"k": k}))
""")

# Appends episodes len(store), len(store)+1, ... and prints each committed index (after add_episode
# returned). argv: url flush_every stop [hold]. With "hold" it takes the lock, prints "locked" and waits.
CHILD_SRC = EPISODE_SRC + textwrap.dedent("""
    import os
    import sys

    from loopsim.datasets import EpisodeStore

    url, flush_every, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = EpisodeStore.open(url, mode="a", flush_every=flush_every)
    print("start", len(store), flush=True)
    if len(sys.argv) > 4 and sys.argv[4] == "hold":
        print("locked", flush=True)
        sys.stdin.read()
        sys.exit(0)
    for k in range(len(store), stop):
        index = store.add_episode(episode(k))
        assert index == k, (index, k)
        print(index, flush=True)
    if len(sys.argv) > 4 and sys.argv[4] == "exit":
        os._exit(0)  # no close: no final merge, the lock released by the OS
    store.close()
    print("done", flush=True)
""")

NS: dict[str, Any] = {}
exec(compile(EPISODE_SRC, "<episode>", "exec"), NS)
episode: Callable[[int], Any] = NS["episode"]
OBS_SPACE, ACT_SPACE, EXTRAS = NS["OBS_SPACE"], NS["ACT_SPACE"], NS["EXTRAS"]
_EXPECTED: dict[int, Any] = {}


def expected(k: int) -> Any:
    if k not in _EXPECTED:
        _EXPECTED[k] = episode(k)
    return _EXPECTED[k]


def new_store(url: Any, flush_every: int = 5) -> None:
    EpisodeStore.create(
        url, observation_space=OBS_SPACE, action_space=ACT_SPACE, step_extras=EXTRAS, flush_every=flush_every
    ).close()


_CHILDREN: list[Child] = []


@pytest.fixture(autouse=True)
def _kill_leftover_children() -> Any:
    """A failing test must not leave a writer process behind."""
    yield
    while _CHILDREN:
        _CHILDREN.pop().kill()


class Child:
    """A writer process whose stdout lines are collected by a thread."""

    def __init__(
        self, tmp_path: Path, url: Any, flush_every: int, stop: int, hold: bool = False, exit_: bool = False
    ) -> None:
        script = tmp_path / "child_writer.py"
        if not script.exists():
            script.write_text(CHILD_SRC)
        args = [sys.executable, str(script), str(url), str(flush_every), str(stop)] + (
            ["hold"] if hold else ["exit"] if exit_ else []
        )
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        _CHILDREN.append(self)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 60.0) -> str:
        """Block until a line satisfying ``pred`` arrives; fail on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail(f"child gave no matching line within {timeout} s; lines: {self.seen[-5:]}")
            if line is None:
                self.proc.wait()
                assert self.proc.stderr is not None
                pytest.fail(
                    f"child ended (rc {self.proc.returncode}) before a matching line; "
                    f"lines: {self.seen[-5:]}; stderr: {self.proc.stderr.read()[-3000:]}"
                )
            self.seen.append(line)
            if pred(line):
                return line

    def kill(self) -> None:
        """SIGKILL, wait, and collect every line the child printed before dying. Idempotent."""
        if self.proc.stdout is not None and self.proc.stdout.closed:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._thread.join(timeout=30)
        while True:
            line = self.lines.get_nowait() if not self.lines.empty() else None
            if line is None:
                break
            self.seen.append(line)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def committed(self) -> list[int]:
        return [int(x) for x in self.seen if x.lstrip("-").isdigit()]


def verify_store(url: Any, *, at_least: int, at_most: int) -> int:
    """Open read-only; every episode i must equal episode(i) exactly; return the count."""
    with EpisodeStore.open(url) as store:
        n = len(store)
        assert at_least <= n <= at_most, f"{n} episodes, expected between {at_least} and {at_most}"
        if n:
            arrays, ends = store.load()
            eps = [expected(k) for k in range(n)]
            np.testing.assert_array_equal(ends, np.cumsum([len(e) for e in eps]))
            np.testing.assert_array_equal(
                arrays["observation/img"], np.concatenate([e.observations["img"] for e in eps])
            )
            np.testing.assert_array_equal(
                arrays["observation/vec"], np.concatenate([e.observations["vec"] for e in eps])
            )
            np.testing.assert_array_equal(arrays["action"], np.concatenate([e.actions for e in eps]))
            np.testing.assert_array_equal(arrays["reward"], np.concatenate([e.rewards for e in eps]))
            np.testing.assert_array_equal(arrays["terminated"], np.concatenate([e.terminated for e in eps]))
            np.testing.assert_array_equal(arrays["truncated"], np.concatenate([e.truncated for e in eps]))
            np.testing.assert_array_equal(
                arrays["intervention"], np.concatenate([e.extras["intervention"] for e in eps])
            )
            cols = store.metadata()
            np.testing.assert_array_equal(cols["seed"], np.arange(n))
            np.testing.assert_array_equal(cols["return"], [float(k) * len(eps[k]) for k in range(n)])
            assert [json.loads(t)["k"] for t in cols["tags"]] == list(range(n))
            for i in sorted({0, n - 2, n - 1} - {-1}):  # random access, incl. the pending tail
                got = store.episode(i)
                np.testing.assert_array_equal(got.observations["img"], eps[i].observations["img"])
                np.testing.assert_array_equal(got.rewards, eps[i].rewards)
                assert got.metadata.seed == i
        report = store.check()
        assert report.problems == [], report.problems
        return n


def append_and_verify(url: Any, count: int, flush_every: int) -> int:
    """Resume in this process: append ``count`` episodes, close, verify the continuous sequence."""
    with EpisodeStore.open(url, mode="a", flush_every=flush_every) as store:
        start = len(store)
        for k in range(start, start + count):
            assert store.add_episode(expected(k)) == k
    return verify_store(url, at_least=start + count, at_most=start + count)


def run_kill_instants(tmp_path: Path, instants: int, seed: int) -> None:
    """Kill a writer at ``instants`` random instants, resuming the same store each time."""
    rng = np.random.default_rng(seed)
    url = tmp_path / "store"
    flush_every = 5
    new_store(url, flush_every)
    n = 0
    for it in range(instants):
        child = Child(tmp_path, url, flush_every, stop=10**6)
        start = int(child.wait_for(lambda s: s.startswith("start")).split()[1])
        assert start == n, f"the resumed writer starts at {start}, the store had {n} episodes"
        # Kill after the child reported episode `target`, plus a random delay. Half of the time the
        # next add triggers a merge (about 50 ms), so the delay spreads over the merge's writes.
        target = start + int(rng.integers(0, 12))
        if rng.random() < 0.5:
            target += (flush_every - 2 - target) % flush_every
        if target > start or rng.random() < 0.7:
            child.wait_for(lambda s, t=target: s.lstrip("-").isdigit() and int(s) >= t)
        time.sleep(float(rng.uniform(0.0, 0.08)))
        child.kill()
        committed = child.committed()
        last = committed[-1] if committed else start - 1
        assert committed == list(range(start, last + 1))
        n = verify_store(url, at_least=last + 1, at_most=last + 2)
        if it % 2 == 0:  # resume in the parent on every other instant; else the next child resumes
            n = append_and_verify(url, int(rng.integers(1, 8)), flush_every=int(rng.integers(1, 7)))
    n = append_and_verify(url, 7, flush_every)
    with EpisodeStore.open(url, mode="a") as store:
        assert store.repair().ok  # the killed writers' leftovers removed, committed episodes kept
    assert verify_store(url, at_least=n, at_most=n) == n
    with EpisodeStore.open(url) as store:
        assert store.check().ok


def test_kill_writer_at_random_instants(tmp_path: Path) -> None:
    run_kill_instants(tmp_path, instants=12, seed=20240601)


@pytest.mark.slow
def test_kill_writer_at_many_random_instants(tmp_path: Path) -> None:
    run_kill_instants(tmp_path, instants=100, seed=7)


def test_kill_writer_that_merges_every_episode(tmp_path: Path) -> None:
    """flush_every=1: every add merges, so the kill lands inside a merge most of the time."""
    url = tmp_path / "store"
    new_store(url, flush_every=1)  # every add merges: the kill lands inside a merge most often
    child = Child(tmp_path, url, flush_every=1, stop=10**6)
    child.wait_for(lambda s: s == "3")
    child.kill()
    last = child.committed()[-1]
    verify_store(url, at_least=last + 1, at_most=last + 2)
    append_and_verify(url, 3, flush_every=1)


# Creates store s<i>, records episode 0, then replaces it (overwrite) with episodes 0 and 1, for i = 0,
# 1, 2 ... until killed; prints "done <i>" after each pair. argv: folder.
CREATE_CHILD_SRC = EPISODE_SRC + textwrap.dedent("""
    import itertools
    import sys
    from pathlib import Path

    from loopsim.datasets import EpisodeStore

    root = Path(sys.argv[1])
    for i in itertools.count():
        for overwrite, n in ((False, 1), (True, 2)):
            with EpisodeStore.create(root / f"s{i}", observation_space=OBS_SPACE, action_space=ACT_SPACE,
                                     step_extras=EXTRAS, overwrite=overwrite, flush_every=1) as store:
                for k in range(n):
                    store.add_episode(episode(k))
        print("done", i, flush=True)
""")


def recover_killed_create(url: Path) -> int:
    """What a killed create or overwrite left must open, or be replaced by what its error names."""
    try:
        return verify_store(url, at_least=0, at_most=2)
    except FileNotFoundError as exc:  # a create killed before its root document
        assert "interrupted EpisodeStore.create" in str(exc) or not url.exists(), exc
        new_store(url)
    except StoreDamagedError as exc:  # an overwrite killed midway
        assert "interrupted overwrite" in str(exc), exc
        EpisodeStore.create(url, observation_space=OBS_SPACE, action_space=ACT_SPACE, step_extras=EXTRAS,
                            overwrite=True).close()
    return verify_store(url, at_least=0, at_most=0)


def run_create_kill_instants(tmp_path: Path, instants: int, seed: int) -> None:
    """Kill a process creating and overwriting stores at random instants; every store left recovers."""
    rng = np.random.default_rng(seed)
    script = tmp_path / "child_creator.py"
    script.write_text(CREATE_CHILD_SRC)
    for it in range(instants):
        folder = tmp_path / f"run{it}"
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("done 0")
            time.sleep(float(rng.uniform(0.0, 0.1)))  # a create + overwrite pair takes ~50-100 ms
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
        for url in sorted(folder.iterdir()):
            recover_killed_create(url)
            with EpisodeStore.create(url, observation_space=OBS_SPACE, action_space=ACT_SPACE,
                                     step_extras=EXTRAS, overwrite=True) as store:
                store.add_episode(episode(0))  # and it takes new episodes
            verify_store(url, at_least=1, at_most=1)


def test_kill_create_and_overwrite_at_random_instants(tmp_path: Path) -> None:
    run_create_kill_instants(tmp_path, instants=2, seed=3)


@pytest.mark.slow
def test_kill_create_and_overwrite_at_many_random_instants(tmp_path: Path) -> None:
    run_create_kill_instants(tmp_path, instants=60, seed=11)


# ----------------------------------------------------------------------------- concurrent reader + writer


@pytest.mark.parametrize("flush_every", [1, 3, 16])
def test_reader_polls_while_writer_appends(tmp_path: Path, flush_every: int) -> None:
    url = tmp_path / "store"
    new_store(url, flush_every)
    total = 80
    reader = EpisodeStore.open(url)
    assert len(reader) == 0
    child = Child(tmp_path, url, flush_every, stop=total)
    seen = 0
    polls = 0
    deadline = time.monotonic() + 120
    while True:
        finished = child.proc.poll() is not None
        n = reader.refresh()
        polls += 1
        assert n >= seen, f"the count went down from {seen} to {n}"
        for i in range(seen, n):  # every newly visible episode is whole and correct
            got = reader.episode(i)
            want = expected(i)
            assert len(got) == len(want)
            np.testing.assert_array_equal(got.observations["img"], want.observations["img"])
            np.testing.assert_array_equal(got.observations["vec"], want.observations["vec"])
            np.testing.assert_array_equal(got.rewards, want.rewards)
            assert got.metadata.seed == i
        if n:
            # an older episode and the metadata columns stay readable while merges move the tail
            old = reader.episode(int(polls % n))
            assert old.metadata.seed == polls % n
            m = len(reader)  # reading a pending episode that a merge just moved may refresh the reader
            assert m >= n
            cols = reader.metadata()
            np.testing.assert_array_equal(cols["seed"], np.arange(m))
            np.testing.assert_array_equal(
                reader.episode_ends, np.cumsum([len(expected(k)) for k in range(m)])
            )
            if polls % 10 == 0:
                arrays, ends = reader.load(["reward"])
                assert m <= len(ends) <= len(reader)
                np.testing.assert_array_equal(
                    arrays["reward"], np.concatenate([expected(k).rewards for k in range(len(ends))])
                )
        seen = n
        if finished and n == total:
            break
        assert not finished or child.proc.returncode == 0, (
            child.proc.stderr.read() if child.proc.stderr else ""
        )
        assert time.monotonic() < deadline, f"reader saw {n} of {total} episodes"
    child.kill()
    assert child.seen[-1] == "done"
    assert polls > 3
    reader.close()
    verify_store(url, at_least=total, at_most=total)


# ----------------------------------------------------------------------------- one writer at a time


def test_second_writer_is_refused(tmp_path: Path) -> None:
    url = tmp_path / "store"
    new_store(url)
    append_and_verify(url, 3, flush_every=5)
    child = Child(tmp_path, url, flush_every=5, stop=10**6, hold=True)
    child.wait_for(lambda s: s == "locked")
    before = snapshot(url)
    with pytest.raises(StoreLockedError, match="another writer") as err:
        EpisodeStore.open(url, mode="a")
    assert "mode='r'" in str(err.value)
    with pytest.raises(StoreLockedError):
        EpisodeStore.create(
            url, observation_space=OBS_SPACE, action_space=ACT_SPACE, step_extras=EXTRAS, overwrite=True
        )
    assert snapshot(url) == before  # the refused overwrite deleted nothing
    with EpisodeStore.open(url) as reader:  # readers are welcome
        assert len(reader) == 3
    child.kill()  # the OS releases the flock of a killed process
    with EpisodeStore.open(url, mode="a") as store:
        assert len(store) == 3
        store.add_episode(expected(3))
    verify_store(url, at_least=4, at_most=4)


def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    url = tmp_path / "store"
    with EpisodeStore.create(
        url, observation_space=OBS_SPACE, action_space=ACT_SPACE, step_extras=EXTRAS, flush_every=2
    ) as writer:
        writer.add_episode(expected(0))
        with pytest.raises(StoreLockedError):
            EpisodeStore.open(url, mode="a")
        with pytest.raises(StoreLockedError):
            EpisodeStore.create(
                url, observation_space=OBS_SPACE, action_space=ACT_SPACE, step_extras=EXTRAS, overwrite=True
            )
        writer.add_episode(expected(1))
        writer.add_episode(expected(2))
    # released on close
    with EpisodeStore.open(url, mode="a") as writer:
        with pytest.raises(StoreLockedError):
            EpisodeStore.open(url, mode="a")
        writer.add_episode(expected(3))
    verify_store(url, at_least=4, at_most=4)
    # a writer dropped without close releases its lock when collected
    writer = EpisodeStore.open(url, mode="a")
    del writer
    EpisodeStore.open(url, mode="a").close()


def test_child_writer_refused_while_parent_writes(tmp_path: Path) -> None:
    url = tmp_path / "store"
    with EpisodeStore.create(
        url, observation_space=OBS_SPACE, action_space=ACT_SPACE, step_extras=EXTRAS
    ) as w:
        w.add_episode(expected(0))
        child = Child(tmp_path, url, flush_every=5, stop=10)
        child.proc.wait(timeout=60)
        assert child.proc.stderr is not None
        stderr = child.proc.stderr.read()
        child.kill()
        assert child.proc.returncode != 0
        assert "StoreLockedError" in stderr and "another writer" in stderr, stderr[-2000:]
        assert not child.committed()
    verify_store(url, at_least=1, at_most=1)


# ----------------------------------------------------------------------------- damaged and foreign paths


def snapshot(path: Path) -> dict[str, Any]:
    """Every file and directory under ``path`` (or ``path`` itself): name -> (size, sha256)."""
    if not path.exists():
        return {}
    if path.is_file():
        return {path.name: (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())}
    out: dict[str, Any] = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "dir" if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def _healthy(path: Path, n: int = 8) -> Path:
    new_store(path, flush_every=3)
    with EpisodeStore.open(path, mode="a", flush_every=3) as store:
        for k in range(n):
            store.add_episode(expected(k))
    return path


def _set_root_attr(path: Path, **changes: Any) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["loopsim"].update(changes)
    (path / "zarr.json").write_text(json.dumps(meta))


def _pending_segment(path: Path, stop: int = 10) -> Path:
    """Leave episodes 8..stop-1 pending (a writer that exits without closing); return its log segment."""
    child = Child(path.parent, path, flush_every=1000, stop=stop, exit_=True)
    child.proc.wait(timeout=60)
    child.kill()
    assert child.committed() == list(range(8, stop))
    files = sorted((path / "pending").iterdir())
    assert [f.name for f in files] == ["000000000008.log"], files
    return files[0]


def segment_records(segment: Path) -> list[tuple[int, int, int]]:
    """``(episode index, record offset, record size)`` of each whole record of a pending-log segment."""
    data = segment.read_bytes()
    out, pos = [], 0
    while pos + 28 <= len(data):
        magic, index, length, _crc = struct.unpack_from("<8sQQI", data, pos)
        assert magic == b"LSEPREC1"
        if pos + 28 + length > len(data):  # a torn tail
            break
        out.append((index, pos, 28 + length))
        pos += 28 + length
    return out


def _pending_files(path: Path) -> list[Path]:
    """Episodes 8 and 9 pending as objects in the format written before the pending log
    (``pending/<index>.episode``, one per episode: the payload of a log record)."""
    segment = _pending_segment(path)
    data = segment.read_bytes()
    files = []
    for index, offset, size in segment_records(segment):
        files.append(path / "pending" / f"{index:012d}.episode")
        files[-1].write_bytes(data[offset + 28:offset + size])
    segment.unlink()
    assert [f.name for f in files] == ["000000000008.episode", "000000000009.episode"]
    return files


def _drop_first_record(path: Path) -> None:
    """A segment that starts at episode 9 while the index ends at 8: episode 8 is missing."""
    segment = _pending_segment(path)
    (index, _, size), *_ = segment_records(segment)
    assert index == 8
    (path / "pending" / "000000000009.log").write_bytes(segment.read_bytes()[size:])
    segment.unlink()


def _set_ends(path: Path, values: Any) -> None:
    arr = zarr.open_array(str(path / "meta/episode_ends"), mode="r+")
    arr[:] = values


FOREIGN: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    # name: (make the path, error of open / create(overwrite=True), message pattern)
    "directory_with_files": (
        lambda p: (
            (
                p.mkdir(),
                (p / "notes.txt").write_text("keep me"),
                (p / "sub").mkdir(),
                (p / "sub" / "x.bin").write_bytes(b"\0\1"),
            )
            and None
        ),
        NotAStoreError,
        "not a loopsim episode store: it has no zarr.json",
    ),
    "plain_file": (lambda p: p.write_bytes(b"just a file\n"), NotAStoreError, "is a file"),
    "zarr_group_without_loopsim_attrs": (
        lambda p: zarr.open_group(str(p), mode="w", attributes={"other": 1}).create_array(
            "x", shape=(3,), dtype="int64"
        ),
        NotAStoreError,
        "no 'loopsim' attributes",
    ),
    "zarr_array": (
        lambda p: zarr.open_array(str(p), mode="w", shape=(4,), dtype="f8"),
        NotAStoreError,
        "not a Zarr v3 group",
    ),
    "zarr_v2_group": (
        lambda p: zarr.open_group(str(p), mode="w", zarr_format=2),
        NotAStoreError,
        "no zarr.json",
    ),
    "newer_schema": (
        lambda p: _set_root_attr(_healthy(p), schema_version=999),
        StoreSchemaError,
        r"schema version 999.*reads up to version 1.*upgrade loopsim",
    ),
    "root_json_garbage": (
        lambda p: (_healthy(p) / "zarr.json").write_bytes(b"{\x00not json"),
        StoreDamagedError,
        "zarr.json is not valid JSON",
    ),
    "root_json_not_object": (
        lambda p: (_healthy(p) / "zarr.json").write_text("[1, 2]"),
        (StoreDamagedError, NotAStoreError),
        "zarr.json|not a",
    ),
    "loopsim_attrs_not_a_number": (
        lambda p: _set_root_attr(_healthy(p), schema_version="one"),
        (StoreDamagedError, NotAStoreError),
        "schema",
    ),
}

DAMAGED: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (damage a healthy store, message pattern of open)
    "deleted_data_array": (lambda p: shutil.rmtree(p / "data" / "reward"), "missing array data/reward"),
    "deleted_meta_array_json": (
        lambda p: (p / "meta" / "seed" / "zarr.json").unlink(),
        "missing array meta/seed",
    ),
    "deleted_episode_ends": (
        lambda p: shutil.rmtree(p / "meta" / "episode_ends"),
        "missing array meta/episode_ends",
    ),
    "truncated_episode_ends_chunk": (
        lambda p: os.truncate(p / "meta/episode_ends/c/0", 5),
        "meta/episode_ends",
    ),
    "garbage_episode_ends_chunk": (
        lambda p: (p / "meta/episode_ends/c/0").write_bytes(os.urandom(64)),
        "meta/episode_ends",
    ),
    "garbage_array_json": (
        lambda p: (p / "meta/episode_ends/zarr.json").write_text("{garbage"),
        "meta/episode_ends",
    ),
    "episode_ends_past_the_data": (
        lambda p: _set_ends(p, np.arange(1, 9) * 1000),
        "rows but the index commits",
    ),
    "episode_ends_not_increasing": (
        lambda p: _set_ends(p, [2, 4, 5, 1, 9, 12, 13, 15]),
        "meta/episode_ends is damaged",
    ),
    "episode_ends_zeroed": (lambda p: _set_ends(p, 0), "meta/episode_ends is damaged"),
    "pending_objects_with_a_gap": (lambda p: _pending_files(p)[0].unlink(), "do not continue the index"),
    "pending_log_with_a_gap": (_drop_first_record, "do not continue the index"),
    "bad_stored_space": (lambda p: _set_root_attr(p, observation_space="{not a space"), "spaces"),
    "garbage_pending_object": (
        lambda p: _pending_files(p)[0].write_bytes(b"PK\x03\x04garbage"),
        "pending episode 8",
    ),
}


def _assert_refused(
    fn: Callable[[], Any], exc: Any, pattern: str, path: Path, before: dict[str, Any]
) -> None:
    with pytest.raises(exc, match=pattern) as err:
        fn()
    assert str(path) in str(err.value), f"the message does not name the path: {err.value}"
    assert snapshot(path) == before, "a refused open/create changed files"


def _create(path: Path, overwrite: bool) -> Any:
    return EpisodeStore.create(
        path, observation_space=OBS_SPACE, action_space=ACT_SPACE, step_extras=EXTRAS, overwrite=overwrite
    )


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_paths_are_refused_and_left_untouched(tmp_path: Path, name: str) -> None:
    make, exc, pattern = FOREIGN[name]
    path = tmp_path / "target"
    make(path)
    before = snapshot(path)
    assert before
    _assert_refused(lambda: EpisodeStore.open(path), exc, pattern, path, before)
    _assert_refused(lambda: EpisodeStore.open(path, mode="a"), exc, pattern, path, before)
    _assert_refused(lambda: _create(path, overwrite=False), FileExistsError, "already exists", path, before)
    _assert_refused(lambda: _create(path, overwrite=True), exc, pattern, path, before)
    if path.is_file():  # a path below a plain file
        for mode in ("r", "a"):
            with pytest.raises(FileNotFoundError, match="no episode store"):
                EpisodeStore.open(path / "nested", mode=mode)
        with pytest.raises(OSError):
            _create(path / "nested", overwrite=False)
    assert snapshot(path) == before


@pytest.mark.parametrize("with_lock_file", [True, False], ids=["lock_file", "copied_without_lock_file"])
@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_stores_are_refused_and_left_untouched(
    tmp_path: Path, name: str, with_lock_file: bool
) -> None:
    damage, pattern = DAMAGED[name]
    path = _healthy(tmp_path / "store")
    damage(path)
    if not with_lock_file:
        (path / ".loopsim-writer.lock").unlink()
    before = snapshot(path)
    _assert_refused(lambda: EpisodeStore.open(path), StoreDamagedError, pattern, path, before)
    _assert_refused(lambda: EpisodeStore.open(path, mode="a"), StoreDamagedError, pattern, path, before)
    _assert_refused(lambda: _create(path, overwrite=False), FileExistsError, "already exists", path, before)
    # An explicit overwrite of a (damaged) loopsim store replaces it with a fresh, empty one.
    with _create(path, overwrite=True) as store:
        assert len(store) == 0
        store.add_episode(expected(0))
    verify_store(path, at_least=1, at_most=1)
    assert not (path / "pending").exists() or not any((path / "pending").iterdir())


def test_damaged_data_chunk_gives_a_clear_error_on_read(tmp_path: Path) -> None:
    """A damaged data chunk is not seen by open (it reads no data) but reading it fails clearly."""
    path = _healthy(tmp_path / "store")
    os.truncate(path / "data/reward/c/0", 3)
    before = snapshot(path)
    with EpisodeStore.open(path) as store:
        assert len(store) == 8
        with pytest.raises(StoreDamagedError, match="data/reward"):
            store.episode(0)
        with pytest.raises(StoreDamagedError, match="data/reward"):
            store.load()
        report = store.check()
        assert any("data/reward" in p for p in report.problems), report.problems
    assert snapshot(path) == before


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped_bit", "truncated", "deleted"])
def test_check_reads_every_chunk_and_finds_damage_after_the_fact(tmp_path: Path, damage: str) -> None:
    """A flipped bit in a merged chunk read back as other numbers and a deleted chunk as zeros, and
    check() said ok (from the store break-it pass). Now every chunk has zstd's checksum, check() reads
    every committed chunk, and a store that writes every chunk reports a missing one."""
    path = _healthy(tmp_path / "store")
    action = path / "data/action/c/0/0"
    seed = path / "meta/seed/c/0"
    if damage == "flipped_bit":
        _flip_bit(action)
    elif damage == "truncated":
        os.truncate(action, action.stat().st_size // 2)
    else:
        action.unlink()
        seed.unlink()
    before = snapshot(path)
    with EpisodeStore.open(path) as store:
        report = store.check()
        assert not report.ok
        assert any(p.startswith("data/action: ") for p in report.problems), report.problems
        if damage == "deleted":
            assert any("meta/seed: chunk c/0 (rows 0-7) is missing" in p for p in report.problems)
            # reading it is an error too, never zeros (a policy was cloned from zero expert actions)
            with pytest.raises(StoreDamagedError, match=r"data/action: chunk c/0/0 is missing"):
                store.episode(0)
            with pytest.raises(StoreDamagedError, match=r"data/action: chunk c/0/0 is missing"):
                store.load(["action"])
            with pytest.raises(StoreDamagedError, match=r"meta/seed: chunk c/0 is missing"):
                store.metadata()
        else:
            assert any("cannot be read (a damaged chunk)" in p for p in report.problems)
            if damage == "flipped_bit":
                assert any("checksum" in p for p in report.problems), report.problems
            with pytest.raises(StoreDamagedError, match="data/action"):  # never other numbers
                store.episode(0)
    assert snapshot(path) == before


def test_chunks_of_zeros_are_written_so_none_is_missing_in_a_whole_store(tmp_path: Path) -> None:
    """zarr skips a chunk of fill values by default (and reads it back as zeros): a store whose
    intervention flags are all False would look damaged. Its writers write every chunk."""
    path = _healthy(tmp_path / "store")
    with EpisodeStore.open(path) as store:
        meta = store.metadata()
        assert not meta["iteration"].any() and not meta["success"].any()  # chunks of zeros / False
        assert store.check().ok
        assert store.info["all_chunks_written"] is True
    assert (path / "meta/iteration/c/0").is_file() and (path / "meta/success/c/0").is_file()


def test_an_older_store_without_the_mark_is_not_called_damaged_for_a_chunk_of_zeros(tmp_path: Path) -> None:
    path = _healthy(tmp_path / "store")
    meta = json.loads((path / "zarr.json").read_text())
    del meta["attributes"]["loopsim"]["all_chunks_written"]
    (path / "zarr.json").write_text(json.dumps(meta))
    (path / "meta/iteration/c/0").unlink()  # as zarr's default writer left it: zeros not written
    with EpisodeStore.open(path) as store:
        assert store.check().ok
        assert not store.metadata()["iteration"].any()  # read as the zeros it held


def test_missing_path_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "store"
    for mode in ("r", "a"):
        with pytest.raises(FileNotFoundError, match="no episode store"):
            EpisodeStore.open(path, mode=mode)
    assert not (tmp_path / "absent").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        EpisodeStore.open(empty, mode="a")
    assert snapshot(empty) == {}


def test_reading_and_appending_never_rewrite_a_store(tmp_path: Path) -> None:
    """Open r (reading everything) and open a + close without episodes leave every byte as it was."""
    path = _healthy(tmp_path / "store", n=8)  # 8 = 2 merges of 3 + 2 pending... merged by close
    before = snapshot(path)
    with EpisodeStore.open(path) as store:
        store.load()
        list(store)
        store.metadata()
        store.check()
    assert snapshot(path) == before
    EpisodeStore.open(path, mode="a").close()
    assert snapshot(path) == before


def test_reading_a_killed_writers_store_changes_nothing(tmp_path: Path) -> None:
    url = tmp_path / "store"
    new_store(url, flush_every=4)
    child = Child(tmp_path, url, flush_every=4, stop=10**6)
    child.wait_for(lambda s: s == "9")
    child.kill()
    last = child.committed()[-1]
    before = snapshot(url)
    n = verify_store(url, at_least=last + 1, at_most=last + 2)
    with EpisodeStore.open(url) as store:
        store.check()
        store.refresh()
    assert snapshot(url) == before
    assert n >= 10


def test_create_on_an_empty_directory_or_missing_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "deep" / "new" / "store", tmp_path / "with space ü 工場"):
        with _create(path, overwrite=False) as store:
            store.add_episode(expected(0))
        verify_store(path, at_least=1, at_most=1)


def test_file_url(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    with _create(url, overwrite=False) as store:
        store.add_episode(expected(0))
        with pytest.raises(StoreLockedError):
            EpisodeStore.open(tmp_path / "store", mode="a")  # the same lock as the plain path
    append_and_verify(url, 2, flush_every=1)
    assert verify_store(tmp_path / "store", at_least=3, at_most=3) == 3


def test_writer_exiting_without_close_keeps_every_added_episode(tmp_path: Path) -> None:
    """A writer that dies without close (os._exit) after add_episode returned lost nothing."""
    url = tmp_path / "store"
    new_store(url, flush_every=4)
    child = Child(tmp_path, url, flush_every=4, stop=7, exit_=True)
    child.proc.wait(timeout=60)
    child.kill()
    assert child.committed() == list(range(7))
    verify_store(url, at_least=7, at_most=7)
    append_and_verify(url, 2, flush_every=4)


# ----------------------------------------------------------------------------- the pending log (local stores)

# Appends episodes len(store) .. stop-2, then is SIGKILLed halfway through writing episode stop-1's
# record (its os.writev writes half of the bytes, then the process kills itself). argv: url stop
TORN_CHILD_SRC = EPISODE_SRC + textwrap.dedent("""
    import os
    import signal
    import sys

    from loopsim.datasets import EpisodeStore

    url, stop = sys.argv[1], int(sys.argv[2])
    store = EpisodeStore.open(url, mode="a", flush_every=1000)
    for k in range(len(store), stop - 1):
        print(store.add_episode(episode(k)), flush=True)


    def torn_writev(fd, buffers):
        data = b"".join(bytes(b) for b in buffers)
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)


    os.writev = torn_writev
    store.add_episode(episode(stop - 1))
    print("not killed", flush=True)
""")


def _pending_names(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "pending").iterdir()) if (path / "pending").is_dir() else []


def _uncommitted(path: Path) -> list[str]:
    with EpisodeStore.open(path) as store:
        report = store.check()
    assert report.problems == [], report.problems
    return report.uncommitted


def test_torn_tail_record_is_not_committed_and_appending_resumes_after_it(tmp_path: Path) -> None:
    path = _healthy(tmp_path / "store")  # 8 merged episodes
    segment = _pending_segment(path, stop=11)  # 8, 9, 10 in one segment
    _, offset, size = segment_records(segment)[2]
    os.truncate(segment, offset + size // 2)  # episode 10's record cut in the middle
    before = snapshot(path)
    verify_store(path, at_least=10, at_most=10)
    assert any("000000000008.log" in u and "cut short" in u for u in _uncommitted(path))
    assert snapshot(path) == before  # reading changed nothing
    with EpisodeStore.open(path, mode="a", flush_every=1000) as store:
        assert len(store) == 10 and store.add_episode(expected(10)) == 10
        # A new segment after the last valid index; the torn one is left as it is until merged.
        assert _pending_names(path) == ["000000000008.log", "000000000010.log"]
        with EpisodeStore.open(path) as reader:
            assert len(reader) == 11 and reader.episode(10).metadata.seed == 10
    assert _pending_names(path) == []  # the close merged them all and deleted both segments
    append_and_verify(path, 2, flush_every=1)
    assert _uncommitted(path) == []


def test_torn_first_record_of_a_segment(tmp_path: Path) -> None:
    """Even the record header cut short: the segment commits nothing; its name is taken by the torn file."""
    path = _healthy(tmp_path / "store")
    segment = _pending_segment(path, stop=9)
    os.truncate(segment, 20)
    verify_store(path, at_least=8, at_most=8)
    assert any("cut short" in u for u in _uncommitted(path))
    with EpisodeStore.open(path, mode="a", flush_every=1000) as store:
        assert store.add_episode(expected(8)) == 8
        assert _pending_names(path) == ["000000000008.1.log", "000000000008.log"]
        verify_store(path, at_least=9, at_most=9)
    assert _pending_names(path) == []
    verify_store(path, at_least=9, at_most=9)


def test_repair_truncates_a_torn_tail_and_keeps_the_committed_records(tmp_path: Path) -> None:
    path = _healthy(tmp_path / "store")
    segment = _pending_segment(path, stop=11)
    _, offset, size = segment_records(segment)[2]
    os.truncate(segment, offset + size - 1)
    committed = segment.read_bytes()[:offset]
    with EpisodeStore.open(path, mode="a", flush_every=1000) as store:
        report = store.repair()
        assert report.ok, report.uncommitted
        assert segment.read_bytes() == committed  # records 8 and 9 byte-identical
        assert len(store) == 10
    verify_store(path, at_least=10, at_most=10)


def test_kill_during_append_leaves_a_torn_tail_that_is_ignored(tmp_path: Path) -> None:
    """SIGKILL while a record is half written (twice in a row), then resume."""
    path = tmp_path / "store"
    new_store(path, flush_every=1000)
    script = tmp_path / "torn_child.py"
    script.write_text(TORN_CHILD_SRC)
    for stop, names in ((4, ["000000000000.log"]), (6, ["000000000000.log", "000000000003.log"])):
        proc = subprocess.run([sys.executable, str(script), str(path), str(stop)], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert proc.stdout.split() == [str(k) for k in range(stop - 3 if stop == 6 else 0, stop - 1)]
        assert _pending_names(path) == names
        # the last segment ends with a torn record
        last = path / "pending" / names[-1]
        records = segment_records(last)
        assert last.stat().st_size > records[-1][1] + records[-1][2]
        verify_store(path, at_least=stop - 1, at_most=stop - 1)
        assert sum("cut short" in u for u in _uncommitted(path)) == len(names)
    append_and_verify(path, 3, flush_every=2)
    assert _pending_names(path) == [] and _uncommitted(path) == []


def test_corrupt_record_in_the_middle_is_damage_not_a_torn_tail(tmp_path: Path) -> None:
    """Whole committed records after a bad one: the store is refused, nothing is truncated or lost."""
    path = _healthy(tmp_path / "store")
    segment = _pending_segment(path, stop=12)  # 8, 9, 10, 11
    _, offset, size = segment_records(segment)[1]
    data = bytearray(segment.read_bytes())
    data[offset + size - 1] ^= 0xFF  # one flipped byte in episode 9's payload; 10 and 11 stay whole
    segment.write_bytes(bytes(data))
    before = snapshot(path)
    damaged = r"000000000008.log is damaged: the record at byte \d+ fails its CRC check, but whole committed"
    for mode in ("r", "a"):
        with pytest.raises(StoreDamagedError, match=damaged):
            EpisodeStore.open(path, mode=mode)
    result = CliRunner().invoke(app, ["store", "check", str(path), "--repair"])
    assert result.exit_code != 0 and "is damaged" in result.output
    assert snapshot(path) == before  # --repair did not truncate episodes 10 and 11 away


def test_corrupt_last_record_is_an_uncommitted_tail(tmp_path: Path) -> None:
    """A bad record with nothing valid after it is what a killed writer leaves: repair drops it."""
    path = _healthy(tmp_path / "store")
    segment = _pending_segment(path, stop=11)  # 8, 9, 10
    _, offset, size = segment_records(segment)[2]
    data = bytearray(segment.read_bytes())
    data[offset + size - 1] ^= 0xFF
    segment.write_bytes(bytes(data))
    verify_store(path, at_least=10, at_most=10)
    uncommitted = _uncommitted(path)
    assert any("fails its CRC check" in u for u in uncommitted), uncommitted
    with EpisodeStore.open(path, mode="a") as store:
        assert store.repair().ok
    verify_store(path, at_least=10, at_most=10)
    append_and_verify(path, 2, flush_every=3)


def test_pending_objects_of_earlier_versions_are_read_merged_and_deleted(tmp_path: Path) -> None:
    """Stores written before the pending log hold ``pending/<index>.episode`` objects: still read."""
    path = _healthy(tmp_path / "store")
    _pending_files(path)  # episodes 8 and 9 as objects
    before = snapshot(path)
    verify_store(path, at_least=10, at_most=10)
    with EpisodeStore.open(path) as store:
        assert store.n_pending == 2 and store.check().ok
    assert snapshot(path) == before
    with EpisodeStore.open(path, mode="a", flush_every=1000) as store:
        assert store.add_episode(expected(10)) == 10
        assert _pending_names(path) == ["000000000008.episode", "000000000009.episode", "000000000010.log"]
        verify_store(path, at_least=11, at_most=11)
    assert _pending_names(path) == []
    verify_store(path, at_least=11, at_most=11)
