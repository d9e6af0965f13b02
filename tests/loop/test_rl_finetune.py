"""The ``rl_finetune`` loop strategy: SB3 off-policy fine-tuning on the operational store."""

import json
import tempfile

import numpy as np
import pytest
import torch

from loopsim.config import ConfigError, load_config
from loopsim.datasets import EpisodeStore
from loopsim.loop import LoopConfig, LoopRun, check_loop_config, run_loop
from loopsim.policies import SB3Policy, load_policy

ENV = "loopsim/FactoryPegInsert-v0"


def _sac_checkpoint(path, algo="SAC", steps=300):
    """A briefly trained off-policy SB3 policy at lab, saved as a loopsim checkpoint."""
    import gymnasium as gym
    from stable_baselines3 import PPO, SAC

    import loopsim  # noqa: F401 - registers the envs

    env = gym.make(ENV, site="lab")
    if algo == "SAC":
        model = SAC("MlpPolicy", env, learning_starts=100, batch_size=64, seed=0, device="cpu",
                    policy_kwargs={"net_arch": [32, 32]})
    else:
        model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, seed=0, device="cpu",
                    policy_kwargs={"net_arch": [32, 32]})
    model.learn(steps)
    policy = SB3Policy.from_model(model)
    policy.config = {"env": {"id": ENV}}  # as `loopsim train` records it
    policy.save(path)
    env.close()
    return path


@pytest.fixture(scope="module")
def sac_checkpoint(tmp_path_factory):
    return _sac_checkpoint(tmp_path_factory.mktemp("sac") / "checkpoint")


def config(checkpoint, *overrides):
    data = {
        "seed": 0,
        "env": {"id": ENV},
        "strategy": {"type": "rl_finetune", "checkpoint": str(checkpoint), "gradient_steps": 40,
                     "batch_size": 64},
        "loop": {"iterations": 1, "episodes": 2, "deploy_sites": ["noisy_sensors"], "workers": 1},
        "eval": {"episodes": 2, "workers": 1, "lab": False},
    }
    return load_config(LoopConfig, data, list(overrides))


def _weights(path):
    policy = load_policy(path)
    return {k: v.clone() for k, v in policy.policy.state_dict().items()}


def test_rl_finetune_trains_the_checkpoint_on_every_operational_transition(tmp_path, sac_checkpoint,
                                                                         monkeypatch):
    path = tmp_path / "run"
    # SB3's default logger makes a folder under $SB3_LOGDIR or the temp directory: the refine must not.
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    rows = run_loop(config(sac_checkpoint), path)["runs"][0]
    assert list((tmp_path / "tmp").glob("SB3-*")) == []
    assert not (path / "demos.zarr").exists()  # the first policy is the checkpoint: no demonstrations
    first, second = path / "iterations" / "000" / "checkpoint", path / "iterations" / "001" / "checkpoint"
    w0, w1, w_src = _weights(first), _weights(second), _weights(sac_checkpoint)
    assert all(torch.equal(w0[k], w_src[k]) for k in w_src)  # iteration 0 is the given policy
    # Actor, critics and target critics all moved: the algorithm itself continued, not a new one.
    for prefix in ("actor.", "critic.", "critic_target."):
        assert any(not torch.equal(w0[k], w1[k]) for k in w0 if k.startswith(prefix)), prefix
    with EpisodeStore.open(path / "operational.zarr") as op:
        transitions = int(op.metadata()["length"].sum())
        assert "expert_action" not in op.step_extras  # no expert labels are needed, none are paid for
    refine = json.loads((path / "iterations" / "001" / "refine.json").read_text())
    assert refine["operational_transitions"] == transitions == refine["training_samples"]
    assert refine["gradient_steps"] == 40 and refine["expert_actions"] == 0
    assert np.isfinite(refine["losses"]["critic_loss"]) and refine["losses"]["n_updates"] == 40
    meta = json.loads((second / "policy.json").read_text())
    assert meta["provenance"]["initial_checkpoint"] == str(sac_checkpoint)
    assert {r["iteration"] for r in rows} == {0, 1}
    assert all(r["expert_actions"] == 0 for r in rows)
    # No expert effort was spent, so its return is undefined (not a "0 points per 1000 actions").
    assert all(np.isnan(r["return_on_expert_effort"]) for r in rows)


def test_replay_buffer_holds_the_store_transitions(tmp_path, sac_checkpoint):
    from stable_baselines3 import SAC
    from stable_baselines3.common.vec_env import DummyVecEnv

    from loopsim.datasets.sampling import TransitionDataset
    from loopsim.loop import _replay_buffer

    path = tmp_path / "run"
    cfg = config(sac_checkpoint)
    run = LoopRun(cfg, path)
    run.start()
    run._refine(0)
    run._deploy(1)
    with EpisodeStore.open(path / "operational.zarr") as op:
        ds = TransitionDataset(op)
        episodes = [op.episode(i) for i in range(len(op))]
    venv = DummyVecEnv([lambda: cfg.env.make(site="lab")])
    model = SAC("MlpPolicy", venv, buffer_size=len(ds), device="cpu")
    assert _replay_buffer(model, ds, None) == len(ds)
    buf = model.replay_buffer
    assert buf.full or buf.pos == len(ds)
    ep = episodes[0]
    n = len(ep.actions)
    np.testing.assert_array_equal(buf.observations[:n, 0], ep.observations[:-1])
    np.testing.assert_array_equal(buf.next_observations[:n, 0], ep.observations[1:])
    np.testing.assert_array_equal(buf.actions[:n, 0], ep.actions)
    np.testing.assert_array_equal(buf.rewards[:n, 0], ep.rewards.astype(np.float32))
    # done on the last step only; a time-limit ending is marked so SB3 still bootstraps through it.
    assert buf.dones[: n - 1, 0].sum() == 0 and buf.dones[n - 1, 0] == 1
    assert buf.timeouts[n - 1, 0] == float(bool(ep.truncated[-1]) and not bool(ep.terminated[-1]))
    venv.close()


def test_rl_finetune_refine_is_deterministic(tmp_path, sac_checkpoint):
    a, b = tmp_path / "a", tmp_path / "b"
    rows_a = run_loop(config(sac_checkpoint), a)["runs"][0]
    rows_b = run_loop(config(sac_checkpoint), b)["runs"][0]
    wa = _weights(a / "iterations" / "001" / "checkpoint")
    wb = _weights(b / "iterations" / "001" / "checkpoint")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    keys = ("iteration", "site", "arm", "success_rate", "mean_return", "operational_transitions")
    assert [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]


def test_bad_rl_finetune_configs_are_refused_before_any_work(tmp_path, sac_checkpoint):
    with pytest.raises(ConfigError, match="nowhere.* does not exist; .*run `loopsim train CONFIG`"):
        check_loop_config(config(tmp_path / "nowhere"))
    ppo = _sac_checkpoint(tmp_path / "ppo", algo="PPO", steps=64)
    with pytest.raises(ConfigError, match="holds a PPO policy; rl_finetune needs an off-policy"):
        check_loop_config(config(ppo))
    with pytest.raises(ConfigError, match="ent_coef"):
        config(sac_checkpoint, "strategy.ent_coef=auto_x")
    with pytest.raises(ConfigError, match="gradient_steps"):
        config(sac_checkpoint, "strategy.gradient_steps=0")
    # A checkpoint of another env is refused, even when the spaces have the same shapes (PickPlace's
    # observations are 22 numbers too)...
    with pytest.raises(ConfigError, match="was trained on loopsim/FactoryPegInsert-v0, but env.id = "
                       "'loopsim/FactoryPickPlace-v0'"):
        check_loop_config(config(sac_checkpoint, "env.id=loopsim/FactoryPickPlace-v0"))
    # ...and one whose spaces do not fit the env (no env id recorded) too.
    unknown = load_policy(sac_checkpoint)
    unknown.config = {}
    unknown.save(tmp_path / "no_env_id")
    with pytest.raises(ConfigError, match="expects observations"):
        check_loop_config(config(tmp_path / "no_env_id", "env.id=loopsim/FactorySort-v0"))
    assert not (tmp_path / "run").exists()


def test_eval_refuses_a_checkpoint_of_another_env_with_the_same_shapes(tmp_path, sac_checkpoint):
    """check_policy (eval, collect, bench, loop) reads the env id the checkpoint records, not only shapes."""
    from typer.testing import CliRunner

    from loopsim.cli import app

    result = CliRunner().invoke(app, ["eval", str(sac_checkpoint), "--env", "loopsim/FactoryPickPlace-v0",
                                      "--site", "lab", "--episodes", "1"])
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "was trained on loopsim/FactoryPegInsert-v0, but the env is loopsim/FactoryPickPlace-v0" in out
    ok = CliRunner().invoke(app, ["eval", str(sac_checkpoint), "--env", "loopsim/FactoryPegInsert-v0",
                                  "--site", "lab", "--episodes", "1"])
    assert ok.exit_code == 0, ok.output
