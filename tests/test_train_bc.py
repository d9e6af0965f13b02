"""Tests of ``loopsim train`` with ``policy.type: bc`` (loopsim.train_bc)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from loopsim.config import CollectConfig, ConfigError, TrainConfig, load_config
from loopsim.datasets import EpisodeStore
from loopsim.policies import BCPolicy, load_policy
from loopsim.rollout import collect
from loopsim.train_bc import RESUME_FILE, check_bc_config
from loopsim.training import RunDirError, train

torch.set_num_threads(1)

PICK = "loopsim/FactoryPickPlace-v0"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _collect(path: Path, episodes: int, seed: int = 0, noise_std: float = 0.0, env_id: str = PICK) -> str:
    collect(CollectConfig(seed=seed, env={"id": env_id, "site": "lab"}, episodes=episodes, store=str(path),
                          policy={"type": "expert", "noise_std": noise_std}))
    return str(path)


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Five expert episodes of FactoryPickPlace at lab (state observations)."""
    return _collect(tmp_path_factory.mktemp("demos") / "pick.zarr", episodes=5, noise_std=0.1)


def _config(stores: list[str], **overrides: Any) -> TrainConfig:
    data: dict[str, Any] = {
        "seed": 3,
        "env": {"id": PICK, "site": "lab", "kwargs": {"obs_mode": "state"}},
        "policy": {"type": "bc", "hidden_sizes": [32, 32]},
        "train": {"stores": stores, "epochs": 2, "batch_size": 64, "lr": 1e-3},
        "eval": {"sites": ["lab"], "episodes": 1, "every": 0, "seed": 1_000_000},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        data[section][name] = value
    return TrainConfig.model_validate(data)


# ------------------------------------------------------------------------------------------ checks
def test_check_accepts_a_good_store(demo_store: str) -> None:
    check_bc_config(_config([demo_store]))
    check_bc_config(_config([demo_store], train__action_key="expert_action"))
    # the same store twice trained on its episodes twice over, silently (train break-it pass)
    with pytest.raises(ValueError, match="is listed more than once; list each store once"):
        _config([demo_store, demo_store])
    folder, name = demo_store.rsplit("/", 1)
    for alias in (f"{folder}/./{name}", demo_store + "/", Path(demo_store).as_uri()):
        with pytest.raises(ValueError, match=r"is listed more than once \(as .* and .*\); list each"):
            _config([demo_store, alias])


def test_check_refuses_missing_and_non_stores(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.zarr")
    with pytest.raises(ConfigError, match=r"train\.stores: .*nope\.zarr.* does not exist"):
        check_bc_config(_config([missing]))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"train\.stores: .*plain.* not a readable loopsim episode store"):
        check_bc_config(_config([str(tmp_path / "plain")]))


def test_check_refuses_other_env_and_other_spaces(tmp_path: Path, demo_store: str) -> None:
    with EpisodeStore.open(demo_store) as good:
        obs_space, act_space = good.observation_space, good.action_space
    other = tmp_path / "sort.zarr"
    EpisodeStore.create(other, observation_space=obs_space, action_space=act_space,
                        env_id="loopsim/FactorySort-v0").close()
    with pytest.raises(ConfigError, match=r"train\.stores: .*sort\.zarr.*FactorySort-v0.*env\.id"):
        check_bc_config(_config([str(other)]))
    with pytest.raises(ConfigError, match=r"train\.stores: .*observation space"):
        check_bc_config(_config([demo_store], env__kwargs={"obs_mode": "goal"}))


def test_check_refuses_no_episodes_and_missing_labels(tmp_path: Path, demo_store: str) -> None:
    with EpisodeStore.open(demo_store) as good:
        obs_space, act_space = good.observation_space, good.action_space
    empty = tmp_path / "empty.zarr"
    EpisodeStore.create(empty, observation_space=obs_space, action_space=act_space, env_id=PICK).close()
    with pytest.raises(ConfigError, match=r"train\.stores: .*no episodes to train on.*success_only = True"):
        check_bc_config(_config([str(empty)], train__success_only=True))
    with pytest.raises(ConfigError, match=r"expert_action.*train\.action_key"):
        check_bc_config(_config([str(empty)], train__action_key="expert_action"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_check_refuses_cuda_without_cuda(demo_store: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.device = 'cuda'"):
        check_bc_config(_config([demo_store], train__device="cuda"))


# ---------------------------------------------------------------------------------------- training
def test_train_end_to_end_writes_a_run(tmp_path: Path, demo_store: str) -> None:
    config = _config([demo_store], eval__every=1, eval__episodes=1, train__max_episodes=4)
    run = train(config, tmp_path / "run", progress_bar=False)
    assert run.finished
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    assert saved["train"]["stores"] == [demo_store] and saved["train"]["epochs"] == 2
    # evaluations at epoch 1 (eval.every) and at the end, with intervals
    with open(run.path / "evaluations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), r["site"], int(r["episodes"])) for r in rows] == [(1, "lab", 1), (2, "lab", 1)]
    assert all(0.0 <= float(r["success_low"]) <= float(r["success_rate"]) <= float(r["success_high"]) <= 1.0
               for r in rows)
    assert list((run.path / "tb").glob("events.out.tfevents.*"))
    # the checkpoint: a bc policy with config and provenance
    policy = load_policy(run.checkpoint_dir)
    assert isinstance(policy, BCPolicy)
    assert policy.config["train"]["stores"] == [demo_store]
    prov = policy.provenance
    assert prov["epochs"] == 2 and prov["n_episodes"] == 4
    assert prov["stores"][0]["episodes"] == [0, 1, 2, 3]
    with EpisodeStore.open(demo_store) as store:
        assert prov["n_transitions"] == int(store.episode_ends[3])
    assert len(prov["episodes_sha256"]) == 64 and prov["train_seconds"] > 0
    assert np.isfinite(prov["final_loss"])
    assert (run.resume_dir / RESUME_FILE).exists()
    # private, as SB3's resume state is (it followed the umask: 0644)
    assert (run.resume_dir / RESUME_FILE).stat().st_mode & 0o777 == 0o600
    with pytest.raises(RunDirError, match="already exists"):
        train(config, tmp_path / "run", progress_bar=False)


def test_resume_gives_identical_weights(tmp_path: Path, demo_store: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config([demo_store], train__epochs=3, train__batch_size=32)
    whole = train(config, tmp_path / "whole", progress_bar=False)

    from loopsim.policies import bc

    original = bc.BCTrainer.train_epoch

    def crash_in_third_epoch(self: bc.BCTrainer) -> Any:
        if self.epoch == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(bc.BCTrainer, "train_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "split", progress_bar=False)
    monkeypatch.setattr(bc.BCTrainer, "train_epoch", original)
    assert load_policy(tmp_path / "split" / "checkpoint").provenance["epochs"] == 2
    resumed = train(config, tmp_path / "split", resume=True, progress_bar=False)

    a = load_file(str(whole.checkpoint_dir / "weights.safetensors"))
    b = load_file(str(resumed.checkpoint_dir / "weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert load_policy(resumed.checkpoint_dir).provenance["epochs"] == 3


def test_resume_refuses_changed_data(tmp_path: Path) -> None:
    store = _collect(tmp_path / "grow.zarr", episodes=2)
    config = _config([store], train__epochs=1)
    train(config, tmp_path / "run", progress_bar=False)
    collect(CollectConfig(seed=50, env={"id": PICK}, episodes=1, store=store, mode="append"))
    with pytest.raises(RunDirError, match="no longer hold the episodes"):
        train(config, tmp_path / "run", resume=True, progress_bar=False)


def test_resume_refuses_a_store_rewritten_with_as_many_other_episodes(tmp_path: Path) -> None:
    """Only the store's address and episode numbers were hashed: the same store rewritten
    (mode=overwrite) with as many episodes of other seeds resumed without a word."""
    store = _collect(tmp_path / "rewritten.zarr", episodes=2)
    config = _config([store], train__epochs=1)
    first = train(config, tmp_path / "run", progress_bar=False)
    assert len(load_policy(first.checkpoint_dir).provenance["data_sha256"]) == 64
    collect(CollectConfig(seed=500, env={"id": PICK}, episodes=2, store=store, mode="overwrite"))
    with pytest.raises(RunDirError, match="no longer hold the episodes"):
        train(config, tmp_path / "run", resume=True, progress_bar=False)


def test_cli_train_with_overrides(tmp_path: Path, demo_store: str) -> None:
    from typer.testing import CliRunner

    from loopsim.cli import app

    path = tmp_path / "bc.yaml"
    path.write_text(yaml.safe_dump(_config([demo_store]).model_dump(mode="json")))
    run_dir = tmp_path / "cli-run"
    result = CliRunner().invoke(app, ["train", str(path), "train.epochs=1", "policy.hidden_sizes=[8]",
                                      "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "final evaluation" in result.output
    # not a terminal: no progress bars (tqdm wrote ~100 lines per evaluation into logs)
    assert "epoch/s" not in result.output and "eval @ epoch" not in result.output, result.output
    policy = load_policy(run_dir / "checkpoint")
    assert policy.hidden_sizes == [8] and policy.provenance["epochs"] == 1
    result = CliRunner().invoke(app, ["train", str(path), "train.stores=[/no/such.zarr]",
                                      "--run-dir", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "train.stores" in result.output
    assert not (tmp_path / "bad").exists()  # refused before any work


@pytest.mark.parametrize("name", ["factory_pick_bc", "factory_sort_bc", "factory_peg_bc"])
def test_bundled_configs_validate(name: str) -> None:
    config = load_config(TrainConfig, CONFIGS / "train" / f"{name}.yaml")
    assert config.policy.type == "bc" and config.env.kwargs.get("obs_mode", "state") == "state"
    collect_cfg = load_config(CollectConfig, CONFIGS / "collect" / f"{name.removesuffix('_bc')}_lab.yaml")
    assert collect_cfg.store in config.train.stores and collect_cfg.env.id == config.env.id
    assert config.eval.seed >= collect_cfg.seed + collect_cfg.episodes  # held-out evaluation seeds


# -------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_bc_learns_pick_place_from_expert_demos(tmp_path: Path) -> None:
    store = _collect(tmp_path / "demos.zarr", episodes=30, noise_std=0.1)
    config = _config([store], train__epochs=20, train__batch_size=256, policy__hidden_sizes=[256, 256],
                     eval__episodes=20)
    run = train(config, tmp_path / "run", progress_bar=False)
    policy = load_policy(run.checkpoint_dir)
    losses = _tb_scalars(run.tb_dir, "train/loss")
    assert losses[-1] < 0.2 * losses[0]  # measured: 0.33 -> 0.030
    final = run.evaluations()[-1]
    # measured: 20/20 (with the demos' own noisy actions as targets); random acts never succeed
    assert final["success_rate"] >= 0.85, final
    from loopsim.policies import RandomPolicy
    from loopsim.rollout import evaluate_policy

    random = RandomPolicy(policy.observation_space, policy.action_space, seed=0)
    floor = evaluate_policy(random, config.env, sites=["lab"], episodes=10, seed=config.eval.seed)["lab"]
    assert floor.success_rate <= 0.1 < final["success_rate"]
    assert json.loads((run.checkpoint_dir / "policy.json").read_text())["provenance"]["n_episodes"] == 30
    assert isinstance(policy, BCPolicy)


def _tb_scalars(tb_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_a_diverged_run_stops_with_one_line_and_writes_no_nan_checkpoint(
    tmp_path: Path, demo_store: str
) -> None:
    """train.lr=1e30: a checkpoint of NaN weights was written, then the final evaluation died with
    "action must be finite, got [nan, nan, nan, nan]" (and so did loopsim eval on it)."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from loopsim.cli import app
    from loopsim.policies import CheckpointError, write_checkpoint
    from loopsim.training import TrainingDivergedError

    config = _config([demo_store], train__epochs=3, train__lr=1e30)
    with pytest.raises(TrainingDivergedError, match=r"training diverged at epoch \d: the loss is nan"):
        train(config, tmp_path / "run", progress_bar=False)
    if (tmp_path / "run" / "checkpoint").exists():  # an epoch before the NaN one: finite, loadable
        load_policy(tmp_path / "run" / "checkpoint")
    path = tmp_path / "bc.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", str(path), "--run-dir", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "training diverged at epoch" in result.output, result.output
    with pytest.raises(ValueError, match=r"weights \['w'\] hold NaN or infinite values"):
        write_checkpoint(tmp_path / "nan", {"kind": "bc"}, {"w": torch.tensor([1.0, float("nan")])})
    assert not (tmp_path / "nan").exists()
    # a NaN checkpoint (an older loopsim, a damaged file) is refused by name when loaded
    good = train(_config([demo_store], train__epochs=1), tmp_path / "good", progress_bar=False)
    checkpoint = good.checkpoint_dir
    tensors = load_file(str(checkpoint / "weights.safetensors"))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(checkpoint / "weights.safetensors"))
    with pytest.raises(CheckpointError, match=r"weights.safetensors is damaged: its sha256 differs"):
        load_policy(checkpoint)
    meta = json.loads((checkpoint / "policy.json").read_text())
    del meta["weights_sha256"]  # as an older loopsim wrote it
    (checkpoint / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"holds NaN or infinite values in \['{name}'\]"):
        load_policy(checkpoint)
