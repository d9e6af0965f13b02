"""The ``loopsim`` console commands, run through Typer's test runner and as a real console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from loopsim.cli import app
from loopsim.envs import ENV_ENTRY_POINTS, available_sites

CONFIGS = Path(__file__).parents[1] / "configs"

runner = CliRunner()


def test_envs_lists_every_env_with_spaces_and_sites():
    result = runner.invoke(app, ["envs"], terminal_width=300)
    assert result.exit_code == 0, result.output
    for env_id in ENV_ENTRY_POINTS:
        assert env_id in result.output
    for site in available_sites("factory"):
        assert site in result.output
    assert "Box(4,) float32" in result.output  # the action space
    assert "uint8" in result.output  # the rgb observation space
    assert "25 Hz" in result.output
    for site in available_sites("warehouse"):
        assert site in result.output
    assert "Box(2,) float32" in result.output and "10 Hz" in result.output  # the warehouse robots


def test_sites_warehouse_lists_its_parameters_and_sites():
    result = runner.invoke(app, ["sites", "warehouse"], terminal_width=300)
    assert result.exit_code == 0, result.output
    names = ("aisle_width", "floor_friction", "lidar_dropout", "cart_mass", "narrow_aisles", "heavy_carts")
    for name in names:
        assert name in result.output


def test_sites_shows_parameters_and_what_each_site_changes():
    result = runner.invoke(app, ["sites", "factory"], terminal_width=300)
    assert result.exit_code == 0, result.output
    for name in ("part_mass", "conveyor_speed", "gripper_fault_prob", "heavy_slippery", "uniform"):
        assert name in result.output


def test_sites_refuses_unknown_domain():
    result = runner.invoke(app, ["sites", "kitchen"])
    assert result.exit_code == 2
    assert "unknown domain" in result.output


def test_expert_reports_success_per_site():
    args = ["expert", "loopsim/FactoryPegInsert-v0", "--site", "lab", "--site", "gripper_faults", "-n", "4"]
    result = runner.invoke(app, args, terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "lab" in result.output and "gripper_faults" in result.output
    assert "100%" in result.output  # the peg expert solves these lab seeds
    assert "95% CI" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["expert", "loopsim/Nope-v0"], "unknown env id"),
        (["expert", "loopsim/FactoryPickPlace-v0", "--site", "moon"], "unknown factory site"),
        (["expert", "loopsim/FactoryPickPlace-v0", "--episodes", "0"], "Invalid value"),
    ],
)
def test_expert_refuses_bad_input_before_running(args, message):
    result = runner.invoke(app, args, terminal_width=300)
    assert result.exit_code == 2
    assert message in result.output


def test_console_script_is_installed():
    exe = shutil.which("loopsim") or str(__import__("pathlib").Path(sys.executable).with_name("loopsim"))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "envs" in out.stdout and "expert" in out.stdout


@pytest.mark.parametrize(
    "command, texts",
    [
        (["replay"], ["[px]", "[default: the control rate]", "[observation units: m, m/s...]"]),
        (["expert"], ["[default: lab]"]),
        (["loop"], ["[default: run_dir from the config, else runs/<config stem>]"]),
        (["report"], ["[default: RUN_DIR/report.html]"]),
    ],
)
def test_help_keeps_units_and_defaults_in_brackets(command, texts):
    """Help texts are plain text: bracketed units and defaults are not eaten as rich markup tags."""
    result = runner.invoke(app, [*command, "--help"], terminal_width=300)
    assert result.exit_code == 0
    flat = " ".join(result.output.split())
    for text in texts:
        assert text in flat, (text, flat)


def _site_file(path, text):
    path.write_text(text)
    return str(path)


def test_expert_runs_at_a_site_file_of_ones_own(tmp_path):
    from loopsim.evaluation import run_expert

    path = _site_file(tmp_path / "dock3.yaml", "description: worn fingers\nparams:\n  gripper_force: 8.0\n")
    env_id = "loopsim/FactoryPegInsert-v0"
    result = runner.invoke(app, ["expert", env_id, "--site", "lab", "--site", path, "-n", "4"],
                           terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "dock3" in result.output and "lab" in result.output
    # the same episodes as the API at the same conditions (success count and mean return)
    direct = run_expert(env_id, {"name": "dock3", "params": {"gripper_force": 8.0}}, 4, 0)
    assert direct.site == "dock3"
    row = next(line for line in result.output.splitlines() if "dock3" in line)
    assert f"{direct.success_rate:.0%}" in row and f"{direct.mean_return:.2f}" in row


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("unknown_param.yaml", "params:\n  part_mas: 0.5\n", "unknown parameter(s) ['part_mas']"),
        ("unknown_key.yaml", "parms:\n  part_mass: 0.5\n", "unknown keys ['parms']"),
        ("no_params.yaml", "description: nothing\n", "needs 'params'"),
        ("not_yaml.yaml", "params: [1, 2\n", "is not valid YAML"),
        ("repeated.yaml", "params:\n  part_mass: 0.5\n  part_mass: 0.6\n", "twice"),
        ("out_of_range.yaml", "params:\n  part_mass: -1.0\n", "part_mass"),
        ("lab.yaml", "params:\n  part_mass: 0.9\n", "a bundled factory site has that name"),
        ("missing.yaml", None, "cannot be read"),
        ("exponent.yaml", "params:\n  sensor_noise: 5e-3\n", "without a dot or a sign as text: write 0.005"),
        ("unsigned.yaml", "params:\n  part_mass: 1.5e0\n", "without a dot or a sign as text: write 1.5"),
        ("quoted.yaml", "params:\n  sensor_noise: '0.5'\n", "a number in quotes is text: write 0.5 without"),
        ("unhashable.yaml", "params:\n  ? [a]\n  : 1\n", "line 2, column 5: found unhashable key"),
    ],
)
def test_expert_refuses_a_bad_site_file_before_running(tmp_path, monkeypatch, name, text, message):
    import loopsim.evaluation

    def no_episodes(*_a, **_k):
        raise AssertionError("an episode ran before the site file was checked")

    monkeypatch.setattr(loopsim.evaluation, "run_expert", no_episodes)
    path = str(tmp_path / name) if text is None else _site_file(tmp_path / name, text)
    result = runner.invoke(app, ["expert", "loopsim/FactoryPickPlace-v0", "--site", "lab", "--site", path],
                           terminal_width=400)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert message in flat and name in flat


def test_expert_refuses_two_sites_under_one_name(tmp_path):
    path = _site_file(tmp_path / "a.yaml", "name: dock\nparams:\n  part_mass: 0.5\n")
    other = _site_file(tmp_path / "b.yaml", "name: dock\nparams:\n  part_mass: 0.6\n")
    result = runner.invoke(app, ["expert", "loopsim/FactoryPickPlace-v0", "--site", path, "--site", other],
                           terminal_width=300)
    assert result.exit_code == 2 and "two different sites are named 'dock'" in result.output
    assert result.output.count("--site:") == 1  # the caller names the option, once
    # the same site twice (a name, or a file with the same conditions) runs once
    same = _site_file(tmp_path / "c.yaml", "name: dock\nparams:\n  part_mass: 0.5\n")
    args = ["expert", "loopsim/FactoryPegInsert-v0", "-n", "1", "-s", "lab", "-s", "lab", "-s", path,
            "-s", same]
    result = runner.invoke(app, args, terminal_width=300)
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1].strip() for line in result.output.splitlines() if line.startswith("│")]
    assert rows == ["lab", "dock"]


def test_cli_messages_keep_bracketed_words(tmp_path):
    """rich read '[lo, hi]' or '[draft]' as a markup tag and dropped it from errors and tables."""
    bad = _site_file(tmp_path / "[draft]plant.yaml", "params:\n  part_mass: {uniform: [0.5, 0.3]}\n")
    result = runner.invoke(app, ["expert", "loopsim/FactoryPickPlace-v0", "--site", bad], terminal_width=400)
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "[lo, hi]" in flat and "[draft]plant.yaml" in flat and "site '[draft]plant'" in flat
    good = _site_file(tmp_path / "[v2]dock.yaml", "params:\n  gripper_force: 30.0\n")
    result = runner.invoke(app, ["expert", "loopsim/FactoryPegInsert-v0", "-n", "1", "--site", good],
                           terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "[v2]dock" in result.output


def test_unknown_site_name_mentions_site_files():
    result = runner.invoke(app, ["expert", "loopsim/FactoryPickPlace-v0", "--site", "hevy_slippery"],
                           terminal_width=300)
    assert result.exit_code == 2
    assert "did you mean 'heavy_slippery'" in result.output and "site file" in result.output


def test_expert_refuses_a_fifo_instead_of_blocking(tmp_path):
    import os

    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    result = runner.invoke(app, ["expert", "loopsim/FactoryPickPlace-v0", "--site", str(fifo)],
                           terminal_width=300)
    assert result.exit_code == 2 and "not a regular file" in result.output


@pytest.mark.parametrize(
    ("first", "second"),
    [("Plant", "plant"), ("caf\u00e9", "cafe\u0301"), ("plant", "\uff50\uff4c\uff41\uff4e\uff54")],
    ids=["case", "NFC", "fullwidth"],
)
def test_expert_refuses_site_names_that_differ_only_in_case_or_unicode_form(tmp_path, first, second):
    a = _site_file(tmp_path / "a.yaml", f"name: {first}\nparams:\n  part_mass: 0.5\n")
    b = _site_file(tmp_path / "b.yaml", f"name: {second}\nparams:\n  part_mass: 0.5\n")
    result = runner.invoke(app, ["expert", "loopsim/FactoryPickPlace-v0", "--site", a, "--site", b],
                           terminal_width=300)
    assert result.exit_code == 2 and "differ only in case or Unicode form" in result.output


def test_a_bundled_name_wins_over_a_file_of_that_name_with_a_note(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lab").write_text("params:\n  gripper_force: 8.0\n")
    result = runner.invoke(app, ["expert", "loopsim/FactoryPegInsert-v0", "-n", "1", "--site", "lab"],
                           terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "note: --site lab is the bundled site; for the file of that name give ./lab" in result.output
    result = runner.invoke(app, ["expert", "loopsim/FactoryPegInsert-v0", "-n", "1", "--site", "./lab"],
                           terminal_width=300)
    assert result.exit_code == 2 and "a bundled factory site has that name" in result.output


def _empty_store(path):
    import gymnasium as gym

    from loopsim.datasets import EpisodeStore

    box = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    EpisodeStore.create(path, observation_space=box, action_space=box).close()


def test_a_collect_interrupted_before_its_store_exists_says_to_run_it_again(tmp_path, monkeypatch):
    """It printed 'continue with: ... mode=append', which then failed: 'needs an existing store'."""
    import loopsim.rollout as rollout_mod

    def interrupted(config, on_episode=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(rollout_mod, "collect", interrupted)
    store = tmp_path / "s.zarr"
    result = runner.invoke(app, ["collect", str(CONFIGS / "collect" / "factory_pick_lab.yaml"),
                                 f"store={store}"], terminal_width=400)
    assert result.exit_code == 130, result.output
    text = " ".join(result.output.split())
    assert f"interrupted before {store} was created: nothing was written; run the command again" in text
    assert "mode=append" not in text


def test_a_train_interrupted_during_its_checks_says_to_run_it_again(tmp_path, monkeypatch):
    """It printed 'continue with: ... --resume', which then failed: 'holds no run (no config.yaml)'."""
    import loopsim.training as training_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_mod, "train", interrupted)
    run = tmp_path / "run"
    config = str(CONFIGS / "train" / "factory_pick_sac.yaml")
    result = runner.invoke(app, ["train", config, "--run-dir", str(run)], terminal_width=400)
    assert result.exit_code == 130, result.output
    text = " ".join(result.output.split())
    assert f"interrupted before the run started: nothing was written to {run}; run the command again" in text
    assert "--resume" not in text


def test_a_ctrl_c_while_the_config_is_read_says_nothing_was_written(monkeypatch):
    """It exited 130 with no word."""
    import loopsim.config as config_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(config_mod, "load_config", interrupted)
    for command in (["collect", "c.yaml"], ["train", "t.yaml"], ["loop", "l.yaml"], ["bench", "factory-v0"]):
        result = runner.invoke(app, command, terminal_width=400)
        assert result.exit_code == 130, (command, result.output)
        assert "interrupted before any work started: nothing was written" in result.output, command


@pytest.mark.parametrize("finished", [15, 20])
def test_an_interrupted_collect_says_how_to_continue_with_its_overrides(tmp_path, monkeypatch, finished):
    """The hint dropped the overrides: followed, it appended to the config's own store, at its site."""
    import loopsim.rollout as rollout_mod

    def interrupted(config, on_episode=None):
        for _ in range(finished):
            on_episode(None)
        raise KeyboardInterrupt

    monkeypatch.setattr(rollout_mod, "collect", interrupted)
    store = tmp_path / "my store.zarr"
    _empty_store(store)  # the job had created it
    result = runner.invoke(
        app,
        ["collect", "configs/collect/factory_pick_lab.yaml", f"store={store}", "env.site=noisy_sensors",
         "episodes=20", "seed=3", "mode=create"],
        terminal_width=400,
    )
    assert result.exit_code == 130, result.output
    text = " ".join(result.output.split())
    if finished == 20:  # "episodes=0" was suggested, which collect refuses
        assert "interrupted after the last episode: all 20 are committed" in text
        return
    quoted = "'" + f"store={store}" + "'"
    again = (f"continue with: loopsim collect configs/collect/factory_pick_lab.yaml {quoted} "
             "env.site=noisy_sensors mode=append seed=18 episodes=5")
    assert again in text


def test_expert_refuses_seeds_past_the_largest_seed():
    """eval and collect refused them; expert ran seeds 2147483647..2147483648 into a store."""
    result = runner.invoke(app, ["expert", "loopsim/FactoryPickPlace-v0", "-n", "2", "--seed", "2147483647"],
                           terminal_width=300)
    assert result.exit_code == 2 and "exceeds the largest seed 2147483647" in result.output


def test_expert_store_refuses_seeds_it_holds_and_other_env_kwargs(tmp_path):
    """It recorded seeds 0, 1 again into a store holding them (collect's append refuses that), and
    appended default-kwargs episodes to a store recorded with other kwargs."""
    from loopsim.datasets import EpisodeStore

    store = tmp_path / "s.zarr"
    pick = "loopsim/FactoryPickPlace-v0"
    result = runner.invoke(app, ["expert", pick, "-n", "2", "--store", str(store)], terminal_width=400)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["expert", pick, "-n", "2", "--store", str(store)], terminal_width=400)
    assert result.exit_code == 2
    assert "already holds 2 episodes of these seeds at these sites (e.g. seed 0)" in result.output
    assert "continue with --seed 2" in result.output
    result = runner.invoke(app, ["expert", pick, "-n", "1", "--seed", "2", "--store", str(store)],
                           terminal_width=400)
    assert result.exit_code == 0, result.output
    with EpisodeStore.open(store) as s:
        assert s.metadata()["seed"].tolist() == [0, 1, 2]
    # another site: the same seeds are other episodes
    result = runner.invoke(app, ["expert", pick, "-n", "1", "--site", "noisy_sensors", "--store", str(store)],
                           terminal_width=400)
    assert result.exit_code == 0, result.output
    sparse = tmp_path / "sparse.zarr"
    result = runner.invoke(app, ["collect", str(CONFIGS / "collect" / "factory_pick_lab.yaml"), "episodes=1",
                                 "workers=1", f"store={sparse}", "env.kwargs.reward_type=sparse"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["expert", pick, "-n", "1", "--seed", "5", "--store", str(sparse)],
                           terminal_width=400)
    assert result.exit_code == 2 and "was recorded with env kwargs" in result.output, result.output
