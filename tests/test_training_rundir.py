"""Run directories: creation, refusal, resume checks, evaluations.csv and TensorBoard logs."""

import pytest

from loopsim.config import TrainConfig, load_config
from loopsim.policies import ExpertPolicy
from loopsim.training import RunDir, RunDirError, default_run_dir

BASE = {
    "env": {"id": "loopsim/FactoryPickPlace-v0"},
    "policy": {"type": "bc"},
    "train": {"stores": ["demos.zarr"]},
    "eval": {"sites": ["lab", "fast_conveyor"], "episodes": 2, "seed": 100},
}


def cfg(*overrides):
    return load_config(TrainConfig, BASE, list(overrides))


def test_new_run_dir_and_refusals(tmp_path):
    run = RunDir.start(tmp_path / "run", cfg(), resume=False)
    assert (run.path / "config.yaml").is_file()
    assert load_config(TrainConfig, run.path / "config.yaml") == cfg()
    # while a process trains into it, no other may (new or resumed): two writers renamed their
    # checkpoints and resume states under each other and killed each other's runs
    with pytest.raises(RunDirError, match=r"in use by another `loopsim train` \(its lock .*held\)"):
        RunDir.start(tmp_path / "run", cfg(), resume=True)
    # a new run into it said "already exists; pass --resume", which would be refused as well
    with pytest.raises(RunDirError, match=r"in use by another `loopsim train`"):
        RunDir.start(tmp_path / "run", cfg(), resume=False)
    run.close()
    with pytest.raises(RunDirError, match="already exists; pass --resume"):
        RunDir.start(tmp_path / "run", cfg(), resume=False)
    epochs = cfg().train.epochs
    changed = rf"differs from the run's config.yaml \(train.epochs: {epochs} in the run, 3 now\)"
    with pytest.raises(RunDirError, match=changed):
        RunDir.start(tmp_path / "run", cfg("train.epochs=3"), resume=True)
    resumed = RunDir.start(tmp_path / "run", cfg(), resume=True)  # the refusal released the lock
    assert resumed.path == run.path
    resumed.close()
    # run_dir=... then --run-dir (or another spelling), and other evaluation workers: the same run
    # (it was refused as "differs at ['run_dir']")
    RunDir.start(tmp_path / "run", cfg(f"run_dir={tmp_path}/./run", "eval.workers=2"), resume=True).close()
    resumed.close()  # idempotent
    with pytest.raises(RunDirError, match="holds no run"):
        RunDir.start(tmp_path / "nothing", cfg(), resume=True)
    assert not (tmp_path / "nothing").exists()


def test_default_run_dir(tmp_path):
    assert str(default_run_dir("configs/train/factory_pick_bc.yaml", cfg())) == "runs/factory_pick_bc"
    assert str(default_run_dir(None, cfg(f"run_dir={tmp_path}/x"))) == f"{tmp_path}/x"


def test_evaluate_logs_csv_and_tensorboard(tmp_path):
    import gymnasium as gym
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir.start(tmp_path / "run", cfg(), resume=False)
    env = gym.make("loopsim/FactoryPickPlace-v0")
    policy = ExpertPolicy.for_env(env)
    results = run.evaluate(policy, step=5)
    assert set(results) == {"lab", "fast_conveyor"}
    assert [e.seed for e in results["lab"].episodes] == [100, 101]
    run.evaluate(policy, step=10)
    run.evaluate(policy, step=10)  # a re-run of the same step (after a resume) replaces its rows
    rows = run.evaluations()
    assert [(r["step"], r["site"]) for r in rows] == [(5, "lab"), (5, "fast_conveyor"), (10, "lab"),
                                                      (10, "fast_conveyor")]
    assert rows[0]["success_rate"] == 1.0 and rows[0]["episodes"] == 2
    assert rows[0]["success_low"] <= rows[0]["success_rate"] <= rows[0]["success_high"]
    run.close()
    env.close()
    acc = EventAccumulator(str(run.tb_dir))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("eval/lab/success_rate")]
    assert 5 in steps and 10 in steps


def test_a_new_run_dir_holding_only_a_stale_lock_file_is_new(tmp_path):
    """A run killed before it wrote config.yaml leaves only its (released) lock file behind."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".loopsim-train.lock").write_text("")
    run = RunDir.start(tmp_path / "run", cfg(), resume=False)
    run.close()
    assert (tmp_path / "run" / "config.yaml").is_file()


@pytest.mark.parametrize("text", ["", "[1, 2]\n", "env: {id: [\n", b"\xff\xfe"])
def test_resume_refuses_a_damaged_config_yaml_with_one_line(tmp_path, text):
    """A damaged config.yaml was a YAML ParserError traceback (or "differs at ['']" when empty)."""
    run = RunDir.start(tmp_path / "run", cfg(), resume=False)
    run.close()
    path = tmp_path / "run" / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RunDirError, match=r"--resume: .*config.yaml (cannot be read|holds no config)"):
        RunDir.start(tmp_path / "run", cfg(), resume=True)
    again = RunDir.start(tmp_path / "run2", cfg(), resume=False)  # nothing left locked
    again.close()


def test_a_folder_that_is_not_a_run_is_not_offered_resume(tmp_path):
    """It said "pass --resume to continue it", which then said "holds no run"."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("x")
    with pytest.raises(RunDirError, match=r"exists and is not a loopsim run \(no config.yaml\); choose"):
        RunDir.start(tmp_path / "notes", cfg(), resume=False)
