"""Evaluation and collection: seeds, workers, stores, intervals, and the collect / eval commands."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from loopsim.cli import app
from loopsim.config import CollectConfig, ConfigError, EnvConfig, ExpertPolicyConfig, RandomPolicyConfig
from loopsim.datasets import EpisodeStore, StoreError
from loopsim.rollout import bootstrap_ci, collect, evaluate_policy, run_episodes

ENV = EnvConfig(id="loopsim/FactoryPickPlace-v0")
runner = CliRunner()


def test_bootstrap_ci_is_deterministic_and_leaves_global_numpy_alone():
    values = np.random.default_rng(0).normal(size=40)
    np.random.seed(123)  # noqa: NPY002 - the caller's global state must survive
    before = np.random.random()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    a = bootstrap_ci(values, seed=3)
    after = np.random.random()  # noqa: NPY002
    assert after == before
    assert a == bootstrap_ci(values, seed=3)
    assert a != bootstrap_ci(values, seed=4)
    lo, hi = a
    assert lo < values.mean() < hi
    # Percentile bootstrap of a mean: close to mean -/+ 1.96 standard errors for 40 normal values.
    se = values.std(ddof=1) / np.sqrt(values.size)
    assert abs((hi - lo) - 2 * 1.96 * se) < 0.25 * (2 * 1.96 * se)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_evaluation_is_the_same_in_one_or_two_workers():
    kwargs = dict(sites=["lab", "fast_conveyor"], episodes=2, seed=7)
    one = evaluate_policy(ExpertPolicyConfig(), ENV, workers=1, **kwargs)
    two = evaluate_policy(ExpertPolicyConfig(), ENV, workers=2, **kwargs)
    assert list(one) == ["lab", "fast_conveyor"]
    for site in one:
        assert [e.seed for e in one[site].episodes] == [7, 8]
        assert one[site].episodes == two[site].episodes  # bit-identical returns, lengths, site params
        assert one[site].success_ci == two[site].success_ci
    assert one["lab"].success_rate == 1.0


def test_episodes_do_not_depend_on_what_the_worker_ran_before():
    """A seed's recorded episode is bit-identical whichever episodes its worker ran before it.

    Regression: worker processes reuse one env per site, and which seeds each ran first depends on
    scheduling; with the old reset (a snapshot restored into the same physics world) seed 25 after
    seed 24 at ``fast_conveyor`` differed from seed 25 in a fresh env (the final observation by ~1e-4).
    """
    policy = ExpertPolicyConfig(noise_std=0.3)
    tasks = [("fast_conveyor", 24), ("fast_conveyor", 25)]
    forward = list(run_episodes(policy, ENV, tasks, deterministic=False, record=[]))
    backward = list(run_episodes(policy, ENV, tasks[::-1], deterministic=False, record=[]))[::-1]
    for (r1, e1), (r2, e2) in zip(forward, backward, strict=True):
        assert r1 == r2
        for name in ("observations", "actions", "rewards", "terminated", "truncated"):
            a, b = getattr(e1, name), getattr(e2, name)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), (r1.seed, name)
    assert [r.success for r, _ in forward] == [True, False]  # the pair: a placed part, then a drop


def test_random_policy_evaluation_is_seeded_per_episode():
    a = evaluate_policy(RandomPolicyConfig(), ENV, episodes=2, seed=0)["lab"]
    b = evaluate_policy(RandomPolicyConfig(), ENV, episodes=2, seed=0)["lab"]
    assert a.episodes == b.episodes
    assert a.episodes[0].episode_return != a.episodes[1].episode_return
    assert a.success_rate == 0.0


def test_collect_writes_seeded_labelled_episodes_and_appends(tmp_path):
    store = str(tmp_path / "demos.zarr")
    cfg = CollectConfig(env=ENV, episodes=3, seed=10, store=store, policy=ExpertPolicyConfig(noise_std=0.05))
    result = collect(cfg)
    assert (result.stored_before, result.stored_after) == (0, 3)
    with EpisodeStore.open(store) as s:
        meta = s.metadata()
        assert meta["seed"].tolist() == [10, 11, 12]
        assert set(meta["policy_id"]) == {"expert"} and set(meta["site"]) == {"lab"}
        assert s.step_extras == ["expert_action", "is_success"]
        ep = s.episode(0)
        assert ep.extras["expert_action"].shape == ep.actions.shape
        assert meta["success"].tolist() == [e.success for e in result.summary.episodes]
        assert s.attrs["collect_config"]["seed"] == 10
    with pytest.raises(ConfigError, match="already exists; use mode=append"):
        collect(cfg)
    more = collect(cfg.model_copy(update={"mode": "append", "seed": 13, "episodes": 1}))
    assert (more.stored_before, more.stored_after) == (3, 4)
    with pytest.raises(ConfigError, match="cannot append: .*step extras"):
        collect(cfg.model_copy(update={"mode": "append", "expert_labels": False}))
    other = EnvConfig(id="loopsim/FactorySort-v0")
    with pytest.raises(ConfigError, match="cannot append: the store holds episodes of 'loopsim/FactoryPick"):
        collect(cfg.model_copy(update={"mode": "append", "env": other}))
    with pytest.raises(ConfigError, match="needs an existing store"):
        collect(cfg.model_copy(update={"mode": "append", "store": str(tmp_path / "none.zarr")}))
    with EpisodeStore.open(store) as s:
        assert len(s) == 4 and s.check().ok


def test_collected_episodes_replay_from_their_seeds(tmp_path):
    store = str(tmp_path / "r.zarr")
    collect(CollectConfig(env=ENV, episodes=2, seed=5, workers=2, store=store,
                          policy=ExpertPolicyConfig(noise_std=0.2)))
    with EpisodeStore.open(store) as s:
        for i in range(len(s)):
            ep = s.episode(i)
            env = s.make_env(site=ep.metadata.site)
            obs, _ = env.reset(seed=ep.metadata.seed)
            np.testing.assert_array_equal(obs, ep.observations[0])
            for t, action in enumerate(ep.actions):
                obs, *_ = env.step(action)
                np.testing.assert_array_equal(obs, ep.observations[t + 1])
            env.close()


def test_collect_and_eval_commands(tmp_path):
    from loopsim.policies import ExpertPolicy

    cfg = tmp_path / "collect.yaml"
    store = tmp_path / "demos.zarr"
    cfg.write_text(yaml.safe_dump({"env": {"id": ENV.id, "site": "lab"}, "episodes": 2, "store": str(store)}))
    result = runner.invoke(app, ["collect", str(cfg), "seed=3"])
    assert result.exit_code == 0, result.output
    assert "stored 2 episodes" in result.output
    result = runner.invoke(app, ["collect", str(cfg), "episodes=zero", "polcy.x=1"])
    assert result.exit_code == 2
    assert "episodes = 'zero'" in result.output and "polcy: unknown key" in result.output
    result = runner.invoke(app, ["collect", str(cfg)])
    assert result.exit_code == 2 and "already exists" in result.output
    with EpisodeStore.open(store) as s:
        assert len(s) == 2  # the refused runs changed nothing

    import gymnasium as gym

    env = gym.make(ENV.id)
    ck = ExpertPolicy.for_env(env).save(tmp_path / "expert")
    env.close()
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(ck), "--env", ENV.id, "--site", "lab", "-n", "2",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["lab"]["episodes"] == 2 and data["lab"]["success_rate"] == 1.0
    assert [e["seed"] for e in data["lab"]["per_episode"]] == [1_000_000, 1_000_001]
    result = runner.invoke(app, ["eval", str(tmp_path), "--env", ENV.id])
    assert result.exit_code == 2 and "not a loopsim policy checkpoint" in result.output
    assert "it holds one" not in result.output
    # a run directory (checkpoint/ inside): the message points at it
    run = tmp_path / "run"
    ExpertPolicy.for_env(gym.make(ENV.id)).save(run / "checkpoint")
    result = runner.invoke(app, ["eval", str(run), "--env", ENV.id], terminal_width=300)
    assert result.exit_code == 2 and f"it holds one: {run / 'checkpoint'}" in result.output, result.output
    result = runner.invoke(app, ["eval", str(ck), "--env", ENV.id, "--site", "moon"])
    assert result.exit_code == 2 and "site 'moon'" in result.output
    result = runner.invoke(app, ["eval", str(ck), "--env", ENV.id, "-n", "1",
                                 "--store", str(tmp_path / "e.zarr")])
    assert result.exit_code == 0, result.output
    with EpisodeStore.open(tmp_path / "e.zarr") as s:
        assert len(s) == 1 and s.metadata()["policy_id"][0] == "expert"


def _collect_in_background(tmp_path, at_least, output):
    """Start ``loopsim collect`` (200 episodes) in a process; return it once ``at_least`` are stored.

    Returns ``(process, config path, store path)``; ``output`` is a file the process writes its
    stdout and stderr to (a file, not a pipe nobody reads while it runs).
    """
    import subprocess
    import sys
    import time

    cfg = tmp_path / "c.yaml"
    store = tmp_path / "k.zarr"
    cfg.write_text(yaml.safe_dump({"env": {"id": ENV.id}, "episodes": 200, "store": str(store)}))
    proc = subprocess.Popen([sys.executable, "-c", "from loopsim.cli import app; app()", "collect", str(cfg)],
                            stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with EpisodeStore.open(store) as s:
                if len(s) >= at_least:
                    return proc, cfg, store
        except (FileNotFoundError, StoreError):
            pass  # not created yet
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    pytest.fail("collect wrote no episodes in 120 s")


def test_killed_collect_keeps_its_committed_episodes_and_appends_after_them(tmp_path):
    with open(tmp_path / "out.txt", "w") as out:
        proc, cfg, store = _collect_in_background(tmp_path, 3, out)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with EpisodeStore.open(store) as s:
        n = len(s)
        assert n >= 3 and s.metadata()["seed"].tolist() == list(range(n))
    result = runner.invoke(app, ["collect", str(cfg), "mode=append", f"seed={n}", "episodes=2"])
    assert result.exit_code == 0, result.output
    with EpisodeStore.open(store) as s:
        assert s.metadata()["seed"].tolist() == list(range(n + 2))
        assert s.check().ok


def test_sigterm_stops_collect_as_ctrl_c_does(tmp_path):
    """SIGTERM (kill, job schedulers) gives the Ctrl-C path: the resume line, exit code 130, a whole store."""
    with open(tmp_path / "out.txt", "w") as out:
        proc, _, store = _collect_in_background(tmp_path, 2, out)
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    text = " ".join((tmp_path / "out.txt").read_text().split())
    assert proc.returncode == 130, text
    assert "episodes finished so far are committed to" in text and "continue with: loopsim collect" in text
    with EpisodeStore.open(store) as s:
        n = len(s)
        assert s.check().ok and s.metadata()["seed"].tolist() == list(range(n))
    assert f"seed={n} episodes={200 - n}" in text  # the line resumes exactly where the store ends


def test_policy_that_does_not_fit_the_env_is_refused_before_the_store_is_touched(tmp_path):
    import gymnasium as gym

    from loopsim.config import CheckpointPolicyConfig
    from loopsim.policies import RandomPolicy

    sort_env = gym.make("loopsim/FactorySort-v0")
    ck = RandomPolicy(sort_env.observation_space, sort_env.action_space).save(tmp_path / "sort_random")
    sort_env.close()
    store = tmp_path / "s.zarr"
    collect(CollectConfig(env=ENV, episodes=1, store=str(store)))
    spec = CheckpointPolicyConfig(path=str(ck))
    mismatch = r"expects observations Box\(37,\) float32, but loopsim/FactoryPickPlace-v0"
    with pytest.raises(ConfigError, match=mismatch):
        collect(CollectConfig(env=ENV, episodes=1, store=str(store), mode="overwrite", policy=spec))
    with EpisodeStore.open(store) as s:
        assert len(s) == 1  # the overwrite never started
    with pytest.raises(ConfigError, match="expects observations"):
        collect(CollectConfig(env=ENV, episodes=1, store=str(tmp_path / "new.zarr"), policy=spec))
    assert not (tmp_path / "new.zarr").exists()
    with pytest.raises(ConfigError, match="expects observations"):
        evaluate_policy(spec, ENV, episodes=1)


def test_append_refuses_duplicate_seeds_and_other_env_kwargs(tmp_path):
    store = str(tmp_path / "a.zarr")
    cfg = CollectConfig(env=ENV, episodes=2, seed=0, store=store)
    collect(cfg)
    with pytest.raises(ConfigError, match="already holds 1 episodes of these seeds .* continue with seed=2"):
        collect(cfg.model_copy(update={"mode": "append", "seed": 1}))
    sparse = EnvConfig(id=ENV.id, kwargs={"reward_type": "sparse"})
    with pytest.raises(ConfigError, match="recorded with env kwargs"):
        collect(cfg.model_copy(update={"mode": "append", "seed": 2, "env": sparse}))
    with EpisodeStore.open(store) as s:
        assert len(s) == 2
    # the same env spelled out (its defaults given explicitly) is the same env: appended, not refused
    # (a store made by `loopsim expert --store`, kwargs {}, could not be continued by a bundled collect
    # config, kwargs {obs_mode: state})
    spelled = EnvConfig(id=ENV.id, kwargs={"obs_mode": "state", "reward_type": "dense", "fresh_world": True})
    collect(cfg.model_copy(update={"mode": "append", "seed": 2, "episodes": 1, "env": spelled}))
    with EpisodeStore.open(store) as s:
        assert len(s) == 3 and s.env_kwargs == {}  # the store's own record is unchanged


def test_a_named_site_document_is_labelled_and_deduplicated_by_its_name(tmp_path):
    # collect labelled such episodes "custom" (the store said "Werk Süd") and so never found them
    # when checking an append for duplicate seeds; evaluate pooled two inline sites into one row
    doc = {"name": "Werk Süd", "params": {"part_mass": 0.2}}
    env = EnvConfig(id=ENV.id, site=doc, kwargs={"max_steps": 15})
    store = str(tmp_path / "a.zarr")
    cfg = CollectConfig(env=env, episodes=1, seed=0, store=store)
    assert collect(cfg).summary.site == "Werk Süd"
    with pytest.raises(ConfigError, match="already holds 1 episodes of these seeds at 'Werk Süd'"):
        collect(cfg.model_copy(update={"mode": "append"}))
    with EpisodeStore.open(store) as s:
        assert s.metadata()["site"].tolist() == ["Werk Süd"]
    with pytest.raises(ValueError, match=r"sites \['custom'\] name more than one site"):
        evaluate_policy(ExpertPolicyConfig(), env, sites=[{"part_mass": 0.2}, {"part_mass": 0.3}], episodes=1)


def test_eval_command_checks_arguments_before_running(tmp_path):
    import gymnasium as gym

    from loopsim.policies import ExpertPolicy

    env = gym.make(ENV.id)
    ck = ExpertPolicy.for_env(env).save(tmp_path / "expert")
    env.close()
    cases = [
        (["--seed", str(2**31 - 1), "-n", "2"], "exceeds the largest seed"),
        (["--json", str(tmp_path / "missing" / "x.json")], "--json"),
        (["--site", "atlantis"], "--site: unknown factory site 'atlantis'"),
        (["--site", str(tmp_path / "nowhere.yaml")], "cannot be read"),
        (["--env-kwarg", "obs_mode=rgb"], "expects observations"),
    ]
    for args, match in cases:
        result = runner.invoke(app, ["eval", str(ck), "--env", ENV.id, "-n", "1", *args])
        assert result.exit_code == 2, (args, result.output)
        assert match in result.output, (args, result.output)
    out = tmp_path / "twice.json"
    args = ["eval", str(ck), "--env", ENV.id, "-n", "1", "--site", "lab", "--site", "lab", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["lab"]["episodes"] == 1  # a repeated site runs once
    # a site file of one's own, also into a store: named after the file, the same episodes as the API's
    site_file = tmp_path / "dock3.yaml"
    site_file.write_text("params:\n  conveyor_speed: 0.08\n")
    out = tmp_path / "file.json"
    args = ["eval", str(ck), "--env", ENV.id, "-n", "2", "--site", str(site_file), "--json", str(out),
            "--store", str(tmp_path / "f.zarr")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())["dock3"]
    direct = evaluate_policy(str(ck), ENV, sites=[{"name": "dock3", "params": {"conveyor_speed": 0.08}}],
                             episodes=2, seed=1_000_000)["dock3"]
    assert data["success_rate"] == direct.success_rate and data["per_episode"][1]["return"] == pytest.approx(
        direct.as_dict()["per_episode"][1]["return"], abs=0)
    with EpisodeStore.open(tmp_path / "f.zarr") as s:
        assert list(s.metadata()["site"]) == ["dock3", "dock3"]


_MASK_PROBE = """
import multiprocessing, signal, sys
from loopsim.rollout import _sigint_held

def report(queue):
    queue.put(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))

if __name__ == "__main__":
    seen = []
    for method in ("spawn", "forkserver", "spawn"):  # a fresh process: resource tracker not started yet
        ctx = multiprocessing.get_context(method)
        queue = ctx.Queue()
        with _sigint_held():
            inside = ctx.Process(target=report, args=(queue,))
            inside.start()
        seen.append(queue.get(timeout=120))
        inside.join(60)
    outside = multiprocessing.get_context("spawn").Process(target=report, args=(queue,))
    outside.start()
    seen.append(queue.get(timeout=120))
    outside.join(60)
    seen.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    print(seen)
"""


def test_sigint_held_starts_children_with_ctrl_c_blocked_and_delivers_it_here_afterwards(tmp_path):
    """Workers started in the block have SIGINT blocked; starting multiprocessing's resource tracker
    (the first spawn or forkserver start) unblocked it in the parent, so later children had it not."""
    import os
    import subprocess
    import sys

    from loopsim.rollout import _sigint_held

    script = tmp_path / "probe.py"
    script.write_text(_MASK_PROBE)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # spawn, forkserver, spawn inside the block: blocked; outside: not, and not in the parent after it
    assert out.stdout.strip().splitlines()[-1] == "[True, True, True, False, False]"
    with pytest.raises(KeyboardInterrupt), _sigint_held():  # held inside, raised when it ends: not lost
        os.kill(os.getpid(), signal.SIGINT)
        held = True
    assert held


def _children(pid):
    """Process ids whose parent is ``pid`` (Linux ``/proc``)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # ended meanwhile
        return b""


def _ctrl_c_when_workers_run(command, out, workers_of, settle=0.0):
    """Run ``command`` in a new session; once ``workers_of(pid)`` finds 2 workers (and ``settle`` s
    later) send SIGINT to the whole process group, as a terminal's Ctrl-C does. Returns
    ``(exit code, output)``."""
    import os
    import subprocess
    import time

    with open(out, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline:
            workers = workers_of(proc.pid)
            time.sleep(0.01)
        assert len(workers) == 2, "the workers did not start"
        time.sleep(settle)
        assert proc.poll() is None, out.read_text()
        os.killpg(proc.pid, signal.SIGINT)  # parent and workers alike
        proc.wait(timeout=120)  # a hang (SB3's close() waiting for a reply it had read) fails here
    finally:
        proc.kill()
    return proc.returncode, out.read_text()


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_while_collect_workers_start_prints_the_hint_and_no_traceback(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group; the workers are still importing torch.

    Before: one ``KeyboardInterrupt`` traceback per worker (``import torch`` in the initializer, or the
    spawn bootstrap) around the parent's "interrupted: ... continue with ..." line.
    """
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"env": {"id": ENV.id}, "episodes": 20, "workers": 2,
                                   "store": str(tmp_path / "k.zarr")}))
    command = [sys.executable, "-c", "from loopsim.cli import app; app()", "collect", str(cfg)]
    def spawned(pid):  # the pool's two workers (the resource tracker is a child too, started earlier)
        return [k for k in _children(pid) if b"spawn_main" in _cmdline(k)]

    code, text = _ctrl_c_when_workers_run(command, tmp_path / "out.txt", spawned)
    assert code == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "continue with: loopsim collect" in " ".join(text.split())


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_while_training_in_sb3_subprocess_envs_prints_the_hint_and_no_traceback(tmp_path):
    """``loopsim train`` with ``train.subproc`` (SB3's ``SubprocVecEnv``, forkserver), Ctrl-C while training.

    Before: the parent's ``recv`` from a worker killed by the Ctrl-C raised ``EOFError``, which the
    command line printed as "Aborted!" (exit 1), without the resume line; or worker tracebacks.
    """
    import sys

    config = Path(__file__).parents[1] / "configs" / "train" / "factory_pick_sac.yaml"
    command = [sys.executable, "-c", "from loopsim.cli import app; app()", "train", str(config),
               "train.n_envs=2", "train.subproc=true", "--run-dir", str(tmp_path / "run")]

    def forked(pid):  # the SubprocVecEnv workers are forked by the forkserver
        return [w for s in _children(pid) if b"forkserver" in _cmdline(s) for w in _children(s)]

    # they build their envs (~3-5 s), then SAC steps them: Ctrl-C while training
    code, text = _ctrl_c_when_workers_run(command, tmp_path / "out.txt", forked, settle=10)
    assert code == 130, text
    assert "Traceback" not in text and "Aborted" not in text, text
    assert "continue with: loopsim train" in " ".join(text.split())


def test_a_worker_whose_parent_died_before_it_watched_exits():
    """The parent's pid comes with the job: read in the worker after its imports (1-2 s, longer under
    load), it was already 1 when the parent had been killed meanwhile, and the worker never exited
    (loop break-it pass: workers left running for minutes after kill -9 of a loop)."""
    import os
    import subprocess
    import sys
    import time

    gone = os.getpid() + 4_000_000  # not this child's parent (pids stay below 2**22 on Linux)
    head = "import os, time; from loopsim.rollout import _exit_with_parent; "
    t0 = time.monotonic()
    code = head + f"_exit_with_parent({gone}); time.sleep(60)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert time.monotonic() - t0 < 30  # at its first look, not after the 60 s sleep
    alive = head + "_exit_with_parent(os.getppid()); time.sleep(1); print('alive')"
    out = subprocess.run([sys.executable, "-c", alive], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "alive", out.stderr
