"""Trajectory plots: replayed end-effector paths over the workcell, and the per-domain view registry."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
from typer.testing import CliRunner

from loopsim.cli import app
from loopsim.config import CollectConfig, EnvConfig, RandomPolicyConfig
from loopsim.datasets import EpisodeStore
from loopsim.rollout import collect
from loopsim.trajectory import (
    FAILURE_COLOR,
    SUCCESS_COLOR,
    TRAJECTORY_VIEWS,
    TrajectoryView,
    episode_tracks,
    plot_trajectories,
    register_trajectory_view,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two expert successes and one random-policy failure (appended), state observations."""
    path = str(tmp_path_factory.mktemp("paths") / "s.zarr")
    env = EnvConfig(id="loopsim/FactoryPickPlace-v0", kwargs={"obs_mode": "state"})
    collect(CollectConfig(env=env, episodes=2, store=path))
    collect(CollectConfig(env=env, episodes=1, seed=2, store=path, mode="append",
                          policy=RandomPolicyConfig()))
    return path


def test_tracks_are_the_end_effector_path(store):
    with EpisodeStore.open(store) as s:
        tracks = episode_tracks(s, [0, 1, 2])
        for tr in tracks:
            obs = s.episode(tr.index).observations
            assert tr.points.shape == (len(obs), 1, 2)
            # state observation entries 0, 1 are the end effector's (x, y) [m] (float32)
            assert np.allclose(tr.points[:, 0], obs[:, :2], atol=1e-6)
            assert tr.reproduced
        assert [t.success for t in tracks] == [True, True, False]
        assert tracks[2].failure_mode != ""


def _count(img: np.ndarray, hex_color: str) -> int:
    rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img[..., :3].astype(int) - rgb).sum(-1) < 40).sum())


def test_plot_colours_successes_and_failures(store, tmp_path):
    with EpisodeStore.open(store) as s:
        out = plot_trajectories(s, [0, 1, 2], tmp_path / "p.png")
        img = iio.imread(out)
        assert img.shape[0] > 300 and img[..., :3].std() > 10
        assert _count(img, SUCCESS_COLOR) > 50 and _count(img, FAILURE_COLOR) > 50
        only_ok = iio.imread(plot_trajectories(s, [0, 1], tmp_path / "q.png"))
        assert _count(only_ok, FAILURE_COLOR) < _count(img, FAILURE_COLOR) / 2


def test_cli_paths(store, tmp_path):
    out = runner.invoke(app, ["paths", store, "-o", str(tmp_path / "x.png"), "-e", "0", "-e", "2"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "x.png").stat().st_size > 1000
    for args, msg in [(["-o", str(tmp_path / "x.gif")], "suffix"),
                      (["-o", str(tmp_path / "x.png"), "-e", "9"], "out of range"),
                      (["-o", str(tmp_path / "nope" / "x.png")], "cannot write")]:
        out = runner.invoke(app, ["paths", store, *args])
        assert out.exit_code == 2 and msg in out.output, out.output


def test_a_registered_view_is_used(store, monkeypatch):
    calls = []
    view = TrajectoryView(track=lambda env: np.array([[1.0, 2.0], [3.0, 4.0]]),
                          draw_scene=lambda ax, env: calls.append("scene"),
                          draw_episode=lambda ax, env, color: calls.append(color))
    monkeypatch.setitem(TRAJECTORY_VIEWS, "factory", view)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    with EpisodeStore.open(store) as s:
        (tr,) = episode_tracks(s, [2], ax=ax)
    plt.close(fig)
    assert tr.points.shape[1:] == (2, 2) and np.all(tr.points[:, 1] == [3.0, 4.0])
    assert calls == ["scene", FAILURE_COLOR]


def test_registry_refuses_bad_views_and_unknown_domains(store, monkeypatch):
    with pytest.raises(TypeError):
        register_trajectory_view("warehouse", object())
    with pytest.raises(TypeError):
        register_trajectory_view("", TRAJECTORY_VIEWS["factory"])
    monkeypatch.delitem(TRAJECTORY_VIEWS, "factory")
    with EpisodeStore.open(store) as s, pytest.raises(KeyError, match="no trajectory view for domain"):
        episode_tracks(s, [0])



@pytest.mark.parametrize("env_id", ["loopsim/WarehouseNavigate-v0", "loopsim/WarehouseCartPush-v0"])
def test_warehouse_paths_are_the_robot_and_cart_on_the_map(env_id, tmp_path):
    from loopsim.replay import replay_store

    path = str(tmp_path / "w.zarr")
    env = EnvConfig(id=env_id, kwargs={"obs_mode": "state"})
    collect(CollectConfig(env=env, episodes=1, store=path))
    # A warehouse store replays bit for bit too (the reproducibility audit).
    assert all(r.exact for r in replay_store(path))
    with EpisodeStore.open(path) as s:
        (track,) = episode_tracks(s, [0])
        obs = s.episode(0).observations
        # state observation entries 0, 1 are the robot's (x, y) [m]; CartPush also tracks its cart
        assert track.points.shape == (len(obs), 2 if "Cart" in env_id else 1, 2)
        assert np.allclose(track.points[:, 0], obs[:, :2], atol=1e-5)
        assert track.success and track.reproduced
        img = iio.imread(plot_trajectories(s, [0], tmp_path / "w.png"))
        assert _count(img, SUCCESS_COLOR) > 50
        assert _count(img, "#8c6d46") > 0 or (img[..., :3].std() > 10)  # shelves drawn (blended colour)
