"""Tests of ``loopsim bench``: configs, cells, resume, determinism, user policies, statistics."""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import loopsim.bench as bench_mod
from loopsim.bench import BenchConfig, BenchError, aggregate, check_bench_config, run_bench
from loopsim.cli import app
from loopsim.config import ConfigError, load_config

torch.set_num_threads(1)

PEG = "loopsim/FactoryPegInsert-v0"  # the shortest episodes: expert ~16 steps, random ~4
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _tiny(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tiny",
        "envs": [{"id": PEG}],
        "sites": ["lab", "gripper_faults"],
        "eval": {"episodes": 3, "seed": 100, "workers": 1},
        "policies": {"expert": {"type": "expert"}, "random": {"type": "random"}},
        "reps": 200,
    }
    data.update(over)
    return data


def _cfg(**over: Any) -> BenchConfig:
    return load_config(BenchConfig, _tiny(**over))


def _train(config: str, **source: Any) -> dict[str, Any]:
    """A ``train`` policy on PegInsert from a bundled training config."""
    return {"b": {"type": "train", "per_env": {PEG: {"config": f"configs/train/{config}", **source}}}}


# ============================================================================================ config
@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"policies": {"x": {"type": "expert", "noise": 0.1}}}, "policies.x.noise: unknown key"),
        ({"policies": {"x": {"type": "magic"}}},
         "policies.x.type = 'magic': not allowed; allowed: ['callable'"),
        ({"eval": {"episodes": 0}}, "eval.episodes = 0"),
        ({"policies": {"x": {"type": "expert", "envs": []}}}, "policies.x: runs on no env (envs = []); name"),
        ({"episodes": 5}, "episodes: unknown key (value 5); allowed keys: ['compare', 'envs', 'eval'"),
        ({"envs": [{"id": "FactoryPegInsert"}]}, "envs.0.id = 'FactoryPegInsert'"),
        ({"envs": [{"id": PEG}, {"id": PEG}]}, "an env id is listed twice"),
        ({"envs": [{"id": PEG, "kwargs": {"site": "lab"}}]}, "give sites in the top-level sites list"),
        ({"policies": {"e": {"type": "expert", "envs": ["loopsim/Nope-v0"]}}}, "not in envs; allowed"),
        ({"compare": [["expert", "bc"]]}, "compare: pair ['expert', 'bc'] must name two different policies"),
        ({"policies": {"a b": {"type": "random"}}}, "policies: name 'a b' must match"),
        ({"policies": {"z": {"type": "sb3_zip", "path": "m.zip", "algo": "Nope"}}},
         "policies.z.algo = 'Nope': unknown SB3 algorithm; allowed:"),
        ({"policies": {"c": {"type": "callable", "function": "no colon"}}},
         "policies.c.function = 'no colon'"),
    ],
)
def test_bad_keys_and_values_are_refused_when_parsing(over: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(**over)
    assert message in str(info.value)


def test_unregistered_env_ids_parse_and_are_refused_before_work(tmp_path: Path) -> None:
    """A suite naming envs registered by a later version parses; the check refuses it, naming the id."""
    cfg = _cfg(envs=[{"id": "loopsim/WarehouseLater-v0"}])
    with pytest.raises(ConfigError, match=r"env id 'loopsim/WarehouseLater-v0' is not registered; allowed"):
        run_bench(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"sites": ["lab", "moon"]},
         "sites: 'moon' is not a site of loopsim/FactoryPegInsert-v0 (factory); allowed"),
        ({"envs": [{"id": PEG, "kwargs": {"obs_mode": "xray"}}]},
         "envs[loopsim/FactoryPegInsert-v0]: env.kwargs"),
        ({"policies": {"c": {"type": "checkpoint", "path": "/nonexistent/ckpt"}}},
         "policies.c.path: /nonexistent/ckpt is not a loopsim policy checkpoint"),
        ({"policies": {"z": {"type": "sb3_zip", "path": "/nonexistent/m.zip", "algo": "PPO"}}},
         "policies.z.path = '/nonexistent/m.zip': no such file"),
        ({"policies": {"f": {"type": "callable", "function": "loopsim_no_such_module:act"}}},
         "function = 'loopsim_no_such_module:act': cannot import"),
        ({"policies": {"f": {"type": "callable", "function": "json:no_such_function"}}},
         "function = 'json:no_such_function': 'json' has no attribute"),
        ({"policies": {"f": {"type": "callable", "function": "json:__doc__"}}}, "is a str, not callable"),
        ({"policies": _train("factory_pick_bc.yaml")},
         "trains in 'loopsim/FactoryPickPlace-v0', not"),
        ({"policies": _train("factory_peg_bc.yaml", overrides=["train.epoch=3"])},
         "train.epoch: unknown key"),
        ({"policies": _train("factory_peg_bc.yaml")},  # no demos collected, none at the config's path
         "per_env[loopsim/FactoryPegInsert-v0].config (configs/train/factory_peg_bc.yaml): train.stores"),
        ({"policies": _train("factory_peg_sac.yaml", collect="configs/collect/factory_peg_lab.yaml")},
         "demonstrations are for policy.type bc"),
        # keys the benchmark sets itself: they were silently replaced (the seed by each training seed)
        ({"policies": _train("factory_peg_sac.yaml", overrides=["seed=5"])},
         "per_env[loopsim/FactoryPegInsert-v0].overrides: 'seed=5': the benchmark sets seed itself"),
        ({"policies": _train("factory_peg_bc.yaml", collect="configs/collect/factory_peg_lab.yaml",
                             overrides=["train.stores=[x.zarr]"])},
         "'train.stores=[x.zarr]': the benchmark sets train.stores itself"),
        ({"policies": _train("factory_peg_bc.yaml", collect="configs/collect/factory_peg_lab.yaml",
                             collect_overrides=["store=mine.zarr"])},
         "collect_overrides: 'store=mine.zarr': the benchmark sets store itself"),
    ],
)
def test_check_refuses_before_any_work(tmp_path: Path, over: dict[str, Any], message: str) -> None:
    cfg = _cfg(**over)
    with pytest.raises(ConfigError) as info:
        run_bench(cfg, tmp_path / "out")
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bundled_suites_parse_and_pass_the_checks() -> None:
    for name in ("factory-v0", "shift-v0", "warehouse-v0"):
        cfg = load_config(BenchConfig, CONFIGS / "bench" / f"{name}.yaml")
        assert cfg.name == name
    shift = load_config(BenchConfig, CONFIGS / "bench" / "shift-v0.yaml")
    assert shift.sites[0] == "lab" and len(shift.sites) == 5
    # factory suites: every env, site, training and collect config checks out (demos not yet collected)
    trained = check_bench_config(load_config(BenchConfig, CONFIGS / "bench" / "factory-v0.yaml"))
    assert len(trained) == 6  # bc and sac on three envs
    trained = check_bench_config(load_config(BenchConfig, CONFIGS / "bench" / "warehouse-v0.yaml"))
    envs = ("loopsim/WarehouseNavigate-v0", "loopsim/WarehouseCartPush-v0")
    assert sorted(trained) == sorted((p, e) for p in ("bc", "ppo") for e in envs)
    assert all(t.collect is not None for (p, _), t in trained.items() if p == "bc")


# ======================================================================================= end to end
def test_tiny_bench_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = run_bench(_cfg(), out)
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [(r["policy"], r["site"]) for r in rows] == [
        ("expert", "lab"), ("expert", "gripper_faults"), ("random", "lab"), ("random", "gripper_faults")
    ]
    assert all(r["episodes"] == "3" and r["seed"] == "" for r in rows)
    expert_lab = next(r for r in results["per_task"] if r["policy"] == "expert" and r["site"] == "lab")
    random_lab = next(r for r in results["per_task"] if r["policy"] == "random" and r["site"] == "lab")
    assert expert_lab["success_rate"] == 1.0 and random_lab["success_rate"] == 0.0  # random drops the peg
    agg = results["aggregates"]
    assert set(agg) == {"all", "lab", "gripper_faults", "shifted"}
    assert agg["lab"]["iqm"]["expert"]["value"] == 1.0 and agg["lab"]["iqm"]["random"]["value"] == 0.0
    assert agg["lab"]["probability_of_improvement"]["expert,random"]["value"] == 1.0
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "| expert | 1 | 100% [100%, 100%] |" in md and "### Protocol" in md
    assert "seed 100 + i" in md and "FactoryPegInsert-v0 100 steps (4 s at 25 Hz)" in md
    for png in ("aggregate_all", "aggregate_lab", "performance_profile", "probability_of_improvement"):
        assert (out / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<table>" in html and html.count("data:image/png;base64,") >= 4
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["cells"] == results["cells"] and len(saved["cells"]) == 4


def test_a_different_config_is_refused_in_the_same_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_bench(_cfg(sites=["lab"]), out)
    changed = r"different benchmark config \(eval.episodes: 3 in the run, 4 now\)"
    with pytest.raises(BenchError, match=changed):
        run_bench(_cfg(sites=["lab"], eval={"episodes": 4, "seed": 100}), out)
    # Another number of workers changes no result: the finished run is reused, not refused.
    again = run_bench(_cfg(sites=["lab"], eval={"episodes": 3, "seed": 100, "workers": 2}), out)
    assert [c["success_rate"] for c in again["cells"]] == [1.0, 0.0]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(BenchError, match="not a benchmark output directory"):
        run_bench(_cfg(sites=["lab"]), tmp_path / "other")


@pytest.mark.slow
def test_same_config_gives_the_same_numbers(tmp_path: Path) -> None:
    """Determinism: two runs (one with 2 worker processes) give identical results and CSV files."""
    a = run_bench(_cfg(sites=["lab"]), tmp_path / "a")
    b = run_bench(_cfg(sites=["lab"], eval={"episodes": 3, "seed": 100, "workers": 2}), tmp_path / "b")
    assert a["cells"] == b["cells"]
    assert a["per_task"] == b["per_task"]
    assert a["aggregates"] == b["aggregates"]
    assert (tmp_path / "a" / "results.csv").read_bytes() == (tmp_path / "b" / "results.csv").read_bytes()


def test_killed_run_resumes_without_rerunning_or_duplicating_cells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    cfg = _cfg()
    # A run killed while writing its third cell: two cells are on disk, nothing half-written.
    real_write = bench_mod.atomic_write
    written: list[Path] = []

    def dying_write(path: Path, text: str, **kwargs: Any) -> Path:
        if "cells" in path.parts:
            if len(written) == 2:
                raise KeyboardInterrupt
            written.append(path)
        return real_write(path, text, **kwargs)

    monkeypatch.setattr(bench_mod, "atomic_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, out)
    monkeypatch.setattr(bench_mod, "atomic_write", real_write)
    cells = sorted((out / "cells").rglob("*.json"))
    assert len(cells) == 2 and not list(out.rglob("*.partial"))
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells}
    # The rerun evaluates only the missing cells' episodes.
    real_run = bench_mod._evaluate
    evaluated: list[tuple[str, list[str]]] = []

    def spy(config: Any, name: str, env_id: str, seed: Any, spec: Any, kwargs: Any, sites: Any,
            *rest: Any) -> None:
        evaluated.append((name, list(sites)))
        real_run(config, name, env_id, seed, spec, kwargs, sites, *rest)

    monkeypatch.setattr(bench_mod, "_evaluate", spy)
    resumed = run_bench(cfg, out)
    assert evaluated == [("random", ["lab", "gripper_faults"])]  # the expert's two cells were kept
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cells} == kept  # not rewritten
    keys = [(c["policy"], c["site"]) for c in resumed["cells"]]
    assert len(keys) == len(set(keys)) == 4  # no duplicates
    evaluated.clear()
    again = run_bench(cfg, out)  # everything finished: nothing runs
    assert evaluated == [] and again["cells"] == resumed["cells"]


# ===================================================================================== user policies
def _write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bench_user_policy.py").write_text(textwrap.dedent("""
        import numpy as np

        def hold_and_push(observation):
            # Keep the gripper closed and push down: the peg jams or times out, never drops.
            return np.array([0.0, 0.0, -1.0, -1.0], dtype=np.float32)

        def wrong_shape(observation):
            return np.zeros(3)

        def nan(observation):
            return np.full(4, np.nan)

        calls = [0]

        def raises_later(observation):
            calls[0] += 1
            if calls[0] > 3:  # the check before work calls it once: this fails in the first episode
                raise RuntimeError("boom from the user's policy")
            return np.zeros(4)
    """))
    monkeypatch.chdir(tmp_path)  # the working directory goes on sys.path, as for `loopsim bench`
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "bench_user_policy", raising=False)


@pytest.mark.slow
def test_callable_policy_in_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, monkeypatch)
    pol = {"push": {"type": "callable", "function": "bench_user_policy:hold_and_push"}}
    res = run_bench(_cfg(sites=["lab"], policies=pol, eval={"episodes": 3, "seed": 100, "workers": 2}),
                    tmp_path / "two")  # each worker process imports the function itself
    cell = res["cells"][0]
    assert cell["policy_type"] == "callable" and cell["success_rate"] == 0.0
    assert "dropped" not in cell["failure_modes"] and cell["mean_length"] > 4  # the gripper stayed closed


def test_callable_with_a_wrong_action_shape_is_refused_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_module(tmp_path, monkeypatch)
    cfg = _cfg(policies={"bad": {"type": "callable", "function": "bench_user_policy:wrong_shape"}})
    message = r"policies.bad on loopsim/FactoryPegInsert-v0: ValueError: .*shape \(3,\)"
    with pytest.raises(ConfigError, match=message):
        run_bench(cfg, tmp_path / "out")


def test_callable_returning_nan_is_refused_before_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_module(tmp_path, monkeypatch)
    cfg = _cfg(policies={"bad": {"type": "callable", "function": "bench_user_policy:nan"}})
    with pytest.raises(ConfigError, match=r"policies.bad on .*non-finite action \[nan, nan, nan, nan\]"):
        run_bench(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_policy_failing_mid_run_is_one_clear_error_and_finished_cells_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_module(tmp_path, monkeypatch)
    bad = {"type": "callable", "function": "bench_user_policy:raises_later"}
    pols = {"expert": {"type": "expert"}, "bad": bad}
    cfg = _cfg(sites=["lab"], policies=pols)
    message = (r"policies.bad failed on loopsim/FactoryPegInsert-v0 at lab, episode seed 100: "
               r"RuntimeError: boom from the user's policy; finished cells are kept")
    with pytest.raises(BenchError, match=message):
        run_bench(cfg, tmp_path / "out")
    cells = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.json"))
    assert cells == ["cells/expert/FactoryPegInsert-v0/lab/fixed.json"]


def test_out_that_is_a_file_or_another_kind_of_run_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(BenchError, match="is a file"):
        run_bench(_cfg(sites=["lab"]), tmp_path / "file")
    run = tmp_path / "loop_run"  # a loop or training run also has a config.yaml
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\nenv: {id: loopsim/FactoryPegInsert-v0}\nloop: {}\n")
    with pytest.raises(BenchError, match="is not a benchmark output directory .*not a benchmark config"):
        run_bench(_cfg(sites=["lab"]), run)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    (run / "config.yaml").write_text("name: [unclosed\n")  # not even YAML
    with pytest.raises(BenchError, match="is not a benchmark output directory"):
        run_bench(_cfg(sites=["lab"]), run)


def test_out_in_use_by_another_bench_is_refused_at_once(tmp_path: Path) -> None:
    from filelock import FileLock

    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / bench_mod.LOCK_NAME):
        with pytest.raises(BenchError, match="in use by another `loopsim bench`"):
            run_bench(_cfg(sites=["lab"]), out)
    assert sorted(p.name for p in out.iterdir()) == [bench_mod.LOCK_NAME]


def test_users_sb3_zip_is_benchmarked_as_it_acts(tmp_path: Path) -> None:
    """An SB3 .zip (SB3's own save) is loaded with SB3's load and acts exactly as the model does."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    import loopsim  # noqa: F401

    env = gym.make(PEG)
    model = PPO("MlpPolicy", env, seed=1, n_steps=64, batch_size=32, device="cpu")
    model.save(tmp_path / "mine.zip")
    cfg = _cfg(sites=["lab"], policies={"mine": {"type": "sb3_zip", "path": str(tmp_path / "mine.zip"),
                                                 "algo": "PPO"}})
    res = run_bench(cfg, tmp_path / "out")
    expected = []
    for i in range(3):
        obs, _ = env.reset(seed=100 + i)
        ret, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            ret, done = ret + float(reward), terminated or truncated
        expected.append(ret)
    env.close()
    assert res["cells"][0]["mean_return"] == pytest.approx(np.mean(expected), abs=1e-9)
    # The same file under the wrong algo: refused before work, naming the class and who saved it.
    wrong = _cfg(sites=["lab"], policies={"mine": {"type": "sb3_zip", "path": str(tmp_path / "mine.zip"),
                                                   "algo": "SAC"}})
    message = r"policies.mine on .*the policy class ActorCriticPolicy \(saved by A2C or PPO\), not a SAC"
    with pytest.raises(ConfigError, match=message):
        run_bench(wrong, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    # A file of another task (FactorySort: 37 observation dims, PegInsert: 22): named by its path.
    PPO("MlpPolicy", gym.make("loopsim/FactorySort-v0"), n_steps=64, device="cpu").save(tmp_path / "sort.zip")
    other = _cfg(sites=["lab"], policies={"s": {"type": "sb3_zip", "path": str(tmp_path / "sort.zip"),
                                                "algo": "PPO"}})
    with pytest.raises(ConfigError, match=r"policy .*sort.zip expects observations Box\(37,\) float32"):
        run_bench(other, tmp_path / "out2")


def test_trained_policy_per_seed_with_demos_collected_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``type: train`` collects demos once, trains one run per seed, and reuses finished runs."""
    train = {
        "seed": 0,
        "env": {"id": PEG, "site": "lab", "kwargs": {"obs_mode": "state"}},
        "policy": {"type": "bc", "hidden_sizes": [16]},
        "train": {"stores": ["filled-in-by-bench"], "epochs": 1, "batch_size": 64},
        "eval": {"episodes": 1},
    }
    collect = {"env": {"id": PEG, "site": "lab"}, "episodes": 4, "store": "x", "policy": {"noise_std": 0.1}}
    pol = {"bc": {"type": "train", "seeds": [0, 1], "per_env": {PEG: {"config": train, "collect": collect}}}}
    cfg = _cfg(sites=["lab"], policies=pol)
    res = run_bench(cfg, tmp_path / "out")
    assert [c["seed"] for c in res["cells"]] == [0, 1]
    runs = sorted((tmp_path / "out" / "train" / "bc" / "FactoryPegInsert-v0").iterdir())
    assert [r.name for r in runs] == ["seed_0", "seed_1"] and all((r / "done").exists() for r in runs)
    assert yaml.safe_load((runs[1] / "config.yaml").read_text())["seed"] == 1
    assert len(list((tmp_path / "out" / "demos").glob("*.zarr"))) == 1  # shared by both seeds
    assert res["aggregates"]["all"]["runs"]["bc"] == 2
    (tmp_path / "out" / "cells" / "bc" / "FactoryPegInsert-v0" / "lab" / "seed_1.json").unlink()
    mtime = (runs[1] / "checkpoint" / "policy.json").stat().st_mtime_ns
    again = run_bench(cfg, tmp_path / "out")  # re-evaluates seed 1 from its finished run, no retraining
    assert (runs[1] / "checkpoint" / "policy.json").stat().st_mtime_ns == mtime
    assert again["cells"] == res["cells"]
    # train/ and demos/ copied into a new output are reused as they are (no training, no collection)
    import shutil

    for part in ("train", "demos"):
        shutil.copytree(tmp_path / "out" / part, tmp_path / "copy" / part)

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("loopsim.training.train", no_training)
    monkeypatch.setattr("loopsim.rollout.collect", no_training)
    assert run_bench(cfg, tmp_path / "copy")["cells"] == res["cells"]


# ======================================================================================== statistics
def test_aggregate_on_known_scores() -> None:
    # 4 runs x 2 tasks; the IQM of 8 scores is the mean of the middle 4.
    x = np.array([[0.0, 0.1], [0.2, 0.3], [0.4, 0.5], [0.6, 1.0]])
    y = np.zeros((3, 2))
    state = np.random.get_state()  # noqa: NPY002
    agg = aggregate({"x": x, "y": y}, [("x", "y"), ("y", "x")], seed=0, reps=100)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # noqa: NPY002 - global RNG restored
    assert agg["iqm"]["x"]["value"] == pytest.approx(np.mean([0.2, 0.3, 0.4, 0.5]))
    assert agg["mean"]["x"]["value"] == pytest.approx(x.mean())
    lo, hi = agg["mean"]["x"]["ci"]
    assert 0.0 <= lo < x.mean() < hi <= 1.0
    assert agg["iqm"]["y"] == {"value": 0.0, "ci": [0.0, 0.0]}
    # every run of x beats every run of y on task 2; on task 1 one run of x ties (0.0 vs 0.0):
    # P(x > y) = mean over tasks of P(X > Y) + 0.5 P(X = Y) = ((3 + 0.5) / 4 + 1) / 2
    assert agg["probability_of_improvement"]["x,y"]["value"] == pytest.approx((3.5 / 4 + 1) / 2)
    assert agg["probability_of_improvement"]["y,x"]["value"] == pytest.approx(1 - (3.5 / 4 + 1) / 2)
    assert agg == aggregate({"x": x, "y": y}, [("x", "y"), ("y", "x")], seed=0, reps=100)  # seeded
    with pytest.raises(ValueError, match="different numbers of tasks"):
        aggregate({"x": x, "z": np.zeros((2, 3))}, [("x", "z")], seed=0)
    with pytest.raises(ValueError, match="must be"):
        aggregate({"x": np.zeros(3)}, [], seed=0)


# =============================================================================================== CLI
def test_cli_bench_prints_the_table_and_refuses_bad_overrides(tmp_path: Path) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(_tiny(sites=["lab"])))
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", str(path), "eval.episode=3", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "eval.episode: unknown key" in bad.output
    typo = runner.invoke(app, ["bench", "factory-v1", "--out", str(tmp_path / "o")])
    assert typo.exit_code == 2 and "not a bundled suite; the suites are ['factory-v0'," in typo.output
    ok = runner.invoke(app, ["bench", str(path), "--out", str(tmp_path / "o")])
    assert ok.exit_code == 0, ok.output
    assert "| expert | 1 | 100% [100%, 100%] |" in ok.output and "results.csv" in ok.output


def test_cli_bench_interrupted_says_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(_tiny(sites=["lab"])))

    def interrupted(*_args: Any, **_kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_mod, "run_bench", interrupted)
    res = CliRunner().invoke(app, ["bench", str(path), "eval.episodes=2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 130
    assert "interrupted: every finished cell and training run is kept in" in res.output
    again = f"resume with: loopsim bench {path} eval.episodes=2 --out {tmp_path / 'o'}"
    assert again in " ".join(res.output.split())


def _cell(policy: str, env_id: str, successes: list[int], seed: int | None = None) -> dict[str, Any]:
    """A finished cell as ``run_bench`` writes it, from per-episode successes (return = success - 1)."""
    n = len(successes)
    return {
        "policy": policy, "policy_type": "expert", "env_id": env_id, "site": "lab", "seed": seed,
        "episodes": n, "success_rate": sum(successes) / n, "success_ci": [0.0, 1.0],
        "mean_return": sum(successes) / n - 1, "return_ci": [-1.0, 0.0], "mean_length": 10.0,
        "failure_modes": {}, "env_kwargs": {},
        "per_episode": [{"seed": i, "success": bool(s), "return": s - 1.0} for i, s in enumerate(successes)],
    }


def test_summary_compares_policies_on_their_common_tasks() -> None:
    pick = "loopsim/FactoryPickPlace-v0"
    cfg = _cfg(envs=[{"id": PEG}, {"id": pick}], sites=["lab"],
               policies={"a": {"type": "expert"}, "b": {"type": "random", "envs": [PEG]}})
    cells = [_cell("a", PEG, [1, 1]), _cell("a", pick, [1, 0]), _cell("b", PEG, [0, 0])]
    res = bench_mod.summarize(cfg, cells)
    agg = res["aggregates"]["all"]
    assert agg["tasks"] == {"a": ["FactoryPegInsert-v0@lab", "FactoryPickPlace-v0@lab"],
                            "b": ["FactoryPegInsert-v0@lab"]}
    assert agg["iqm"]["a"]["value"] == pytest.approx(0.75) and agg["mean"]["b"]["value"] == 0.0
    assert agg["pair_tasks"] == {"a,b": ["FactoryPegInsert-v0@lab"]}
    assert agg["probability_of_improvement"]["a,b"] == {"value": 1.0, "ci": [1.0, 1.0]}
    per = {(r["policy"], r["task"]): r for r in res["per_task"]}
    assert per[("a", "FactoryPickPlace-v0@lab")]["success_rate"] == 0.5
    assert per[("a", "FactoryPickPlace-v0@lab")]["mean_return"] == -0.5
    md = bench_mod.markdown(res)
    assert "| b | 1 | 0% [0%, 0%] | - |" in md and "| all (1) | a | b | 1.00 [1.00, 1.00] |" in md


def test_markdown_gives_each_runs_success_and_the_failure_modes_per_task() -> None:
    cfg = _cfg(sites=["lab"], policies={"a": {"type": "expert"},
                                        "b": {"type": "train", "per_env": {PEG: {"config": "x.yaml"}}}},
               train_seeds=[0, 1, 2])
    b_cells = [_cell("b", PEG, s, seed=i) for i, s in enumerate([[1, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 1]])]
    b_cells[1]["failure_modes"] = {"dropped": 1, "timeout": 1}
    b_cells[2]["failure_modes"] = {"timeout": 2, "dropped": 1}
    res = bench_mod.summarize(cfg, [_cell("a", PEG, [1, 1, 1, 1]), *b_cells])
    per = {r["policy"]: r for r in res["per_task"]}
    assert per["b"]["success_per_run"] == [1.0, 0.5, 0.25]
    assert per["b"]["failure_modes"] == {"timeout": 3, "dropped": 2}  # summed, largest first
    md = bench_mod.markdown(res)
    assert "| a | 1 | no failures |" in md
    assert "| b | 3 | (100%, 50%, 25%); timeout 3, dropped 2 |" in md


@pytest.mark.parametrize("n_policies", [1, 2, 4, 6])
def test_aggregate_plot_label_clears_the_tick_labels(n_policies: int) -> None:
    """The x label sits below the tick labels, and the two panels' tick labels do not touch.

    With a fixed ``xlabel_y_coordinate`` (a fraction of the figure height) the label ran into the
    tick labels of a 2-policy suite (shift-v0: expert, BC).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = {m: {f"p{i}": {"value": 0.5, "ci": [0.4, 0.6]} for i in range(n_policies)} for m in ("iqm", "mean")}
    fig = bench_mod._aggregate_figure(agg, "all", "suite")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    label = next(t for t in fig.texts if t.get_text() == "suite: success rate (95% CI)")
    label_box = label.get_window_extent(renderer)
    ticks = [[t.get_window_extent(renderer) for t in ax.get_xticklabels()] for ax in fig.axes]
    assert label_box.y1 < min(b.y0 for boxes in ticks for b in boxes)  # below every tick label
    assert ticks[0][-1].x1 < ticks[1][0].x0  # left panel's "1.0" before the right panel's "0.0"
    plt.close(fig)


def test_csv_rows_and_per_task_tables_share_one_bootstrap() -> None:
    """A one-run policy's cell has the same intervals in results.csv as in the per-task tables."""
    from loopsim.rollout import bootstrap_ci

    cfg = _cfg(sites=["lab"], seed=7, reps=300, policies={"a": {"type": "expert"}})
    cell = _cell("a", PEG, [1, 0, 1, 1, 0, 1, 1, 1])  # its stored intervals: placeholders [0, 1]
    res = bench_mod.summarize(cfg, [cell])
    row, task = res["cells"][0], res["per_task"][0]
    successes = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert [row["success_low"], row["success_high"]] == task["success_ci"] == list(
        bootstrap_ci(successes, seed=7, reps=300))
    assert [row["return_low"], row["return_high"]] == task["return_ci"] != [-1.0, 0.0]
