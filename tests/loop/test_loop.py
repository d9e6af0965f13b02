"""The data loop: phases, run directory, metrics, plots, strategies, resume, config refusals."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from loopsim.cli import app
from loopsim.config import ConfigError, dump_config, load_config
from loopsim.datasets import EpisodeStore
from loopsim.loop import LOCK_NAME, LoopConfig, LoopRun, check_loop_config, run_loop

runner = CliRunner()

TINY = {
    "seed": 0,
    "env": {"id": "loopsim/FactoryPickPlace-v0"},
    "demos": {"site": "lab", "episodes": 3, "noise_std": 0.1},
    "policy": {"type": "bc", "hidden_sizes": [32]},
    "train": {"epochs": 2, "batch_size": 128},
    "strategy": {"type": "dagger"},
    "loop": {"iterations": 1, "episodes": 2, "deploy_sites": ["noisy_sensors"], "workers": 1},
    "eval": {"episodes": 2, "workers": 1},
}


def tiny(*overrides):
    return load_config(LoopConfig, TINY, list(overrides))


def read_metrics(path):
    with open(path / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_loop_writes_the_run_directory(tmp_path):
    path = tmp_path / "run"
    result = run_loop(tiny(), path)
    rows = result["runs"][0]
    assert {(r["iteration"], r["site"], r["arm"]) for r in rows} == {
        (k, s, a) for k in (0, 1) for s in ("noisy_sensors", "lab") for a in ("loop", "baseline")
    }
    assert read_metrics(path)[0].keys() >= {"success_rate", "success_low", "operational_episodes", "deploy_s"}
    for k in (0, 1):
        d = path / "iterations" / f"{k:03d}"
        assert (d / "checkpoint" / "policy.json").exists() and (d / "eval.json").exists()
        ev = json.loads((d / "eval.json").read_text())
        # The same held-out seeds at every site and iteration.
        assert [e["seed"] for e in ev["lab"]["per_episode"]] == [2_000_000_000, 2_000_000_001]
    refine = json.loads((path / "iterations" / "001" / "refine.json").read_text())
    assert refine["demo_episodes"] == 3 and refine["operational_episodes"] == 2
    # dagger: every demo step and every visited operational state is an expert label.
    assert refine["expert_actions"] == refine["demo_transitions"] + refine["operational_transitions"]
    with EpisodeStore.open(path / "operational.zarr") as op:
        meta = op.metadata()
        assert meta["iteration"].tolist() == [1, 1] and set(meta["site"]) == {"noisy_sensors"}
        assert meta["seed"].tolist() == [110_000, 110_001]
        assert set(meta["policy_version"]) == {"iteration-0"}
        assert "expert_action" in op.step_extras
    baseline = [r for r in rows if r["arm"] == "baseline"]
    assert len({(r["success_rate"], r["mean_return"]) for r in baseline if r["site"] == "lab"}) == 1
    it0 = {(r["site"], r["arm"]): r for r in rows if r["iteration"] == 0}
    assert it0[("lab", "loop")]["success_rate"] == it0[("lab", "baseline")]["success_rate"]
    for name in ("success.png", "lab.png", "failure_modes.png"):
        import imageio.v3 as iio

        img = iio.imread(path / "plots" / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.std() > 10  # drawn, not blank
    # Re-running the finished run does nothing new (every phase is done) and gives the same metrics.
    before = (path / "metrics.csv").read_text()
    lines: list[str] = []
    run_loop(tiny(), path, log=lines.append)
    assert (path / "metrics.csv").read_text() == before
    # and says so, phase by phase (it said nothing of what it kept)
    assert lines == ["iteration 0: 3 expert demonstrations kept from before",
                     f"iteration 0: policy kept from before ({path / 'iterations' / '000' / 'checkpoint'})",
                     "iteration 0: evaluation kept from before",
                     "iteration 1: 2 deployed episodes kept from before",
                     f"iteration 1: policy kept from before ({path / 'iterations' / '001' / 'checkpoint'})",
                     "iteration 1: evaluation kept from before"], lines
    with EpisodeStore.open(path / "operational.zarr") as op:
        assert len(op) == 2


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["strategy.type=magic"], "strategy.type = 'magic': not allowed"),
        (["loop.deploy_sites=[atlantis]"], "loop.deploy_sites: site 'atlantis'"),
        (["loop.episodes=0"], "loop.episodes = 0"),
        (["demos.site=moon"], "demos.site: site 'moon'"),
        (["loop.deploy_sites=[]"], "loop.deploy_sites = []"),
        (["strategy.threshold=0.5"], "strategy.threshold: unknown key"),
        (["env.kwargs.obs_mode=smell"], "env.kwargs"),
        # deployed twice per seed: every episode stored twice (and once after a resume)
        (["loop.deploy_sites=[noisy_sensors,lab,noisy_sensors]"], "['noisy_sensors'] listed more than once"),
        # unused by a loop, but kept in config.yaml as if it had been a setting that ran
        (["env.site=moon"], "env.site = 'moon': a loop's sites are demos.site and loop.deploy_sites"),
        (["strategy.type=rl_finetune", "strategy.checkpoint=x", "strategy.ent_coef=auto_x"],
         "strategy.ent_coef = 'auto_x': give a float >= 0"),
    ],
)
def test_bad_loop_configs_are_refused_before_any_work(tmp_path, overrides, match):
    cfg_file = tmp_path / "loop.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["loop", str(cfg_file), "--run-dir", str(tmp_path / "run"), *overrides])
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "path", sorted(p.name for p in (Path(__file__).parents[2] / "configs" / "loop").glob("*.yaml"))
)
def test_bundled_loop_configs_validate(path):
    cfg = load_config(LoopConfig, Path(__file__).parents[2] / "configs" / "loop" / path)
    assert cfg.loop.deploy_sites and cfg.loop.iterations >= 1
    if cfg.strategy.type != "rl_finetune":  # rl_finetune needs a trained checkpoint first
        check_loop_config(cfg)


def test_resolved_config_loads_again():
    cfg = tiny()
    assert load_config(LoopConfig, yaml.safe_load(dump_config(cfg))) == cfg
    from importlib.resources import files

    bundled = load_config(LoopConfig, str(files("loopsim.configs") / "loop" / "quickstart.yaml"))
    assert load_config(LoopConfig, yaml.safe_load(dump_config(bundled))) == bundled


def test_rerun_with_another_config_is_refused(tmp_path):
    path = tmp_path / "run"
    LoopRun(tiny(), path).start()
    epochs = tiny().train.epochs
    with pytest.raises(ConfigError, match=f"another config \\(train.epochs: {epochs} in the run, 3 now\\)"):
        LoopRun(tiny("train.epochs=3"), path).start()


def test_a_run_resumes_with_its_directory_spelled_otherwise_and_other_worker_counts(tmp_path):
    """run_dir=rd1 then --run-dir rd1 (or ./rd1) was 'another config (differs at [run_dir])', and a run
    could not be resumed with other worker counts (another machine), though results do not depend on
    them (episodes come back in seed order)."""
    path = tmp_path / "rd1"
    LoopRun(tiny(f"run_dir={path}"), path).start()
    LoopRun(tiny(), path).start()
    LoopRun(tiny("run_dir=./elsewhere/../rd1", "loop.workers=2", "eval.workers=2"), path).start()


def test_training_sets_of_the_strategies(tmp_path):
    """bc_all keeps every step, filtered_bc only successful episodes, intervention weights expert steps."""
    path = tmp_path / "run"
    cfg = tiny("strategy.type=intervention", "strategy.threshold=0.3", "strategy.weight=3")
    check_loop_config(cfg)
    run = LoopRun(cfg, path)
    run.start()
    run._demos()
    run._refine(0)
    run._deploy(1)
    with EpisodeStore.open(path / "operational.zarr") as op:
        meta = op.metadata()
        episodes = [op.episode(i) for i in range(len(op))]
    flags = [ep.extras["intervention"] for ep in episodes]
    inter = sum(int(f.sum()) for f in flags)
    assert inter > 0 and int(meta["interventions"].sum()) == inter
    for ep, f in zip(episodes, flags, strict=True):
        # During a takeover the executed (stored) action is the expert's own label of that state.
        np.testing.assert_allclose(ep.actions[f], ep.extras["expert_action"][f], atol=1e-6)
    training, info = run._training_set(1)
    assert info["expert_actions"] == info["demo_transitions"] + inter
    weighted = sum(
        int(np.where(f, 3, 1 if ok else 0).sum()) for f, ok in zip(flags, meta["success"], strict=True)
    )
    assert len(training) == info["demo_transitions"] + weighted
    ok_steps = int(meta["length"][meta["success"].astype(bool)].sum())
    for strategy, expected in (("bc_all", int(meta["length"].sum())), ("filtered_bc", ok_steps)):
        other = LoopRun(load_config(LoopConfig, TINY, [f"strategy.type={strategy}"]), path)
        t, i = other._training_set(1)
        assert len(t) == i["demo_transitions"] + expected


@pytest.mark.slow
def test_killed_loop_resumes_without_duplicates_and_matches_an_uninterrupted_run(tmp_path):
    cfg_file = tmp_path / "loop.yaml"
    cfg_file.write_text(yaml.safe_dump({**TINY, "loop": {**TINY["loop"], "iterations": 2, "episodes": 3}}))
    clean = tmp_path / "clean"
    assert runner.invoke(app, ["loop", str(cfg_file), "--run-dir", str(clean), "--no-report"]).exit_code == 0
    killed = tmp_path / "killed"
    for delay in (6.0, 14.0, 22.0):  # kill it at three different moments, resuming in between
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from loopsim.cli import app; app()",
                "loop",
                str(cfg_file),
                "--run-dir",
                str(killed),
                "--no-report",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        proc.kill()
        proc.wait()
    result = runner.invoke(app, ["loop", str(cfg_file), "--run-dir", str(killed), "--no-report"])
    assert result.exit_code == 0, result.output
    with EpisodeStore.open(killed / "operational.zarr") as op:
        meta = op.metadata()
        triples = list(
            zip(meta["iteration"].tolist(), meta["site"].tolist(), meta["seed"].tolist(), strict=True)
        )
        assert len(triples) == len(set(triples)) == 2 * 3
    assert read_metrics(killed) == [
        {k: v for k, v in r.items()} for r in read_metrics(clean)
    ] or _same_but_timing(read_metrics(killed), read_metrics(clean))


class Killed(BaseException):
    """Stands in for SIGKILL inside a write (BaseException: nothing in the loop catches it)."""


def test_a_loop_killed_while_creating_its_operational_store_resumes(tmp_path, monkeypatch):
    # CI once killed the loop between the operational store's documents: the resume refused the store
    # ("missing array meta/episode_ends"). Now the store's root document is written last, so a killed
    # create leaves no store, and the resumed loop creates it.
    import loopsim.datasets.store as store_module

    path = tmp_path / "run"
    real = store_module.atomic_write
    writes = []

    def write(target, data):
        if "operational.zarr" in str(target):
            writes.append(target)
            if len(writes) == 8:
                raise Killed
        return real(target, data)

    with monkeypatch.context() as m:
        m.setattr(store_module, "atomic_write", write)
        with pytest.raises(Killed):
            run_loop(tiny(), path)
    assert (path / "operational.zarr" / "meta").is_dir()  # killed midway through the creation
    run_loop(tiny(), path)
    with EpisodeStore.open(path / "operational.zarr") as op:
        assert len(op) == 2 and op.check().ok
        assert op.metadata()["seed"].tolist() == [110_000, 110_001]


def _same_but_timing(a, b):
    skip = {"deploy_s", "refine_s", "evaluate_s", "data_bytes"}
    return [{k: v for k, v in r.items() if k not in skip} for r in a] == [
        {k: v for k, v in r.items() if k not in skip} for r in b
    ]


def test_single_runs_and_replicates_do_not_share_a_directory(tmp_path):
    LoopRun(tiny(), tmp_path / "single").start()
    with pytest.raises(ConfigError, match="holds a single loop run"):
        run_loop(tiny(), tmp_path / "single", seeds=[0, 1])
    LoopRun(tiny(), tmp_path / "multi" / "seed_0").start()
    with pytest.raises(ConfigError, match="holds replicates"):
        run_loop(tiny(), tmp_path / "multi")


def test_a_directory_that_is_not_a_loop_run_is_refused_untouched(tmp_path):
    """--run-dir pointing at the user's data (here a folder with a store and a file) writes nothing there."""
    data = tmp_path / "data"
    (data / "my.zarr").mkdir(parents=True)
    (data / "notes.txt").write_text("keep me")
    before = sorted(p.name for p in data.rglob("*"))
    for seeds in (None, [0]):
        with pytest.raises(ConfigError, match="is not a loop run directory .*my.zarr, notes.txt"):
            run_loop(tiny(), data, seeds=seeds)
    assert sorted(p.name for p in data.rglob("*")) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run_loop(tiny(), tmp_path / "file")
    # An empty directory is fine to start in (checked, then the run begins).
    (tmp_path / "empty").mkdir()
    LoopRun(tiny(), tmp_path / "empty").start()
    assert (tmp_path / "empty" / "config.yaml").is_file()


def test_a_bench_output_or_training_run_is_not_taken_for_a_loop_run(tmp_path):
    """Their config.yaml is not a loop config: refused like any other folder, and no lock file left there."""
    bench = tmp_path / "bench"  # what `loopsim bench` writes (config.yaml with name/envs/policies)
    (bench / "cells").mkdir(parents=True)
    (bench / "config.yaml").write_text("name: b\nenvs: [{id: loopsim/FactoryPegInsert-v0}]\npolicies: {}\n")
    train = tmp_path / "train"  # a `loopsim train` run: config.yaml without strategy/loop
    (train / "checkpoint").mkdir(parents=True)
    (train / "config.yaml").write_text("seed: 0\nenv: {id: loopsim/FactoryPegInsert-v0}\ntrain: {}\n")
    fake = tmp_path / "fake"  # a seed_<r>/ folder that is not a loop replicate
    (fake / "seed_0" / "cells").mkdir(parents=True)
    for path in (bench, train, fake):
        before = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
        for seeds in (None, [0]):
            with pytest.raises(ConfigError, match="is not a loop run directory .*no loop config.yaml"):
                run_loop(tiny(), path, seeds=seeds)
        assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == before


def test_replicates_of_another_config_are_refused_before_work(tmp_path):
    """Adding `--seeds 1` with other overrides would overwrite aggregate.json with fewer replicates."""
    path = tmp_path / "reps"
    LoopRun(tiny(), path / "seed_0").start()
    message = r"holds replicates of another config \(seed_0: loop.episodes: 2 in the run, 3 now\)"
    with pytest.raises(ConfigError, match=message):
        run_loop(tiny("loop.episodes=3"), path, seeds=[1])
    assert sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME) == ["seed_0"]


def test_a_replicates_folder_is_not_continued_as_another_replicate(tmp_path):
    """`--run-dir D/seed_1` without --seeds would finish replicate 1 with replicate 0's seeds."""
    LoopRun(tiny(), tmp_path / "D" / "seed_1", replicate=1).start()
    with pytest.raises(ConfigError, match=r"holds replicate 1 of this loop, not replicate 0 .*--seeds 1 "):
        run_loop(tiny(), tmp_path / "D" / "seed_1")
    LoopRun(tiny(), tmp_path / "single").start()
    with pytest.raises(ConfigError, match="holds replicate 0 of this loop, not replicate 2 .*without --seed"):
        LoopRun(tiny(), tmp_path / "single", replicate=2).start()
    left = sorted(p.name for p in (tmp_path / "D" / "seed_1").iterdir())
    assert left == [LOCK_NAME, "config.yaml", "replicate.json"]  # nothing run


def test_a_replicate_in_use_as_a_single_run_is_refused(tmp_path):
    """`loopsim loop --run-dir D/seed_0` running: `--seeds 0 --run-dir D` must not write into it too."""
    from filelock import FileLock

    from loopsim.loop import _check_run_dir

    rep = tmp_path / "D" / "seed_0"
    rep.mkdir(parents=True)
    with FileLock(rep / LOCK_NAME):
        with pytest.raises(ConfigError, match=r"D/seed_0 is in use by another `loopsim loop`"):
            run_loop(tiny(), tmp_path / "D", seeds=[0])
    assert sorted(p.name for p in rep.iterdir()) == [LOCK_NAME]
    _check_run_dir(tmp_path / "D", replicates=True)  # a replicate folder holding only a lock is fine


def test_interrupted_loop_prints_the_same_command_to_resume(tmp_path, monkeypatch):
    import loopsim.loop

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loopsim.loop, "run_loop", interrupted)
    cfg_file = tmp_path / "loop.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    args = [str(cfg_file), "loop.episodes=3", "--run-dir", str(tmp_path / "run"), "--seeds", "0,1",
            "--no-report"]
    result = runner.invoke(app, ["loop", *args])
    assert result.exit_code == 130
    assert "resume with: loopsim loop " + " ".join(args) in " ".join(result.output.split())


def test_a_run_directory_in_use_is_refused(tmp_path):
    """Two loops in one run directory would interleave their stores: the second stops before any work."""
    from filelock import FileLock

    from loopsim.loop import LOCK_NAME

    path = tmp_path / "run"
    path.mkdir()
    with FileLock(path / LOCK_NAME):
        with pytest.raises(ConfigError, match="in use by another `loopsim loop`"):
            run_loop(tiny(), path)
    assert sorted(p.name for p in path.iterdir()) == [LOCK_NAME]


@pytest.mark.parametrize("seeds", ["0,,1", "0,", ",", "a", "0,0", "100"])
def test_bad_seeds_are_refused(tmp_path, seeds):
    cfg_file = tmp_path / "loop.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["loop", str(cfg_file), "--run-dir", str(tmp_path / "m"), "--seeds", seeds])
    assert result.exit_code == 2 and "--seeds" in result.output, result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_replicates_are_independent_and_aggregated(tmp_path):
    cfg_file = tmp_path / "loop.yaml"
    cfg_file.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["loop", str(cfg_file), "--run-dir", str(tmp_path / "m"), "--seeds", "0,1",
                                 "--no-report"])
    assert result.exit_code == 0, result.output
    agg = json.loads((tmp_path / "m" / "aggregate.json").read_text())["noisy_sensors"]
    assert agg["replicates"] == 2
    assert len(agg["final_success"]["loop"]) == 2
    for arm in ("loop", "baseline"):
        lo, hi = agg["iqm_success"][arm]["ci"]
        assert 0.0 <= lo <= agg["iqm_success"][arm]["value"] <= hi <= 1.0
    assert 0.0 <= agg["probability_of_improvement"]["value"] <= 1.0
    with EpisodeStore.open(tmp_path / "m" / "seed_0" / "demos.zarr") as a, \
            EpisodeStore.open(tmp_path / "m" / "seed_1" / "demos.zarr") as b:
        # Replicates gather different demonstrations (seeds shifted per replicate).
        assert set(a.metadata()["seed"]).isdisjoint(set(b.metadata()["seed"]))
    assert "P(loop > baseline)" in result.output
    assert "replicate 1: iteration 1: refined (dagger)" in result.output
    # A later replicate joins the finished ones: the aggregate covers all three, not the last alone.
    result = runner.invoke(app, ["loop", str(cfg_file), "--run-dir", str(tmp_path / "m"), "--seeds", "2"])
    assert result.exit_code == 0, result.output
    agg3 = json.loads((tmp_path / "m" / "aggregate.json").read_text())["noisy_sensors"]
    assert agg3["replicates"] == 3
    assert agg3["final_success"]["loop"][:2] == agg["final_success"]["loop"]
    page = (tmp_path / "m" / "report.html").read_text()
    assert "Aggregate over replicates" in page and "P(loop &gt; baseline)" in page
