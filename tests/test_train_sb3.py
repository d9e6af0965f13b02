"""Tests of ``loopsim train`` with ``policy.type: sb3``: config checks, a tiny run, checkpoints, resume."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import loopsim.train_sb3 as train_sb3_module
from loopsim.config import ConfigError, TrainConfig
from loopsim.policies import SB3Policy, load_policy
from loopsim.train_sb3 import check_sb3_config, load_resume_state, save_resume_state
from loopsim.training import RunDir, train

torch.set_num_threads(1)

PEG = "loopsim/FactoryPegInsert-v0"


def _config(**over: Any) -> TrainConfig:
    data: dict[str, Any] = {
        "seed": 0,
        "env": {"id": PEG, "kwargs": {"obs_mode": "state"}},
        "policy": {
            "type": "sb3",
            "algo": "SAC",
            "normalize": True,
            "algo_kwargs": {"learning_starts": 100, "buffer_size": 1000, "batch_size": 16},
            "policy_kwargs": {"net_arch": [16, 16]},
        },
        "train": {"total_timesteps": 200, "checkpoint_every": 100},
        "eval": {"episodes": 2, "every": 100},
    }
    for key, value in over.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return TrainConfig.model_validate(data)


# ============================================================================== config refusals
@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {
                "policy.algo": "PPO",
                "policy.her": True,
                "env.kwargs": {"obs_mode": "goal"},
                "policy.algo_kwargs": {},
            },
            "policy.her=true needs an off-policy algorithm (policy.algo is 'PPO'); allowed: [",
        ),
        ({"policy.her": True}, "policy.her=true needs goal observations (env.kwargs.obs_mode is 'state')"),
        (
            {"policy.her_kwargs": {"n_sampled_goal": 2}},
            "policy.her_kwargs={'n_sampled_goal': 2} is given but policy.her",
        ),
        (
            {
                "policy.her": True,
                "env.kwargs": {"obs_mode": "goal"},
                "policy.her_kwargs": {"goal_selection_strategy": "best"},
            },
            "goal_selection_strategy='best'; allowed: ['future', 'final', 'episode']",
        ),
        (
            {"policy.her": True, "env.kwargs": {"obs_mode": "goal"}, "policy.her_kwargs": {"k": 4}},
            "policy.her_kwargs.k is not a HerReplayBuffer setting",
        ),
        (
            {"policy.algo_kwargs": {"learning_rat": 0.001}},
            "policy.algo_kwargs.learning_rat=0.001 is not a setting of SAC",
        ),
        ({"policy.algo_kwargs": {"seed": 3}}, "policy.algo_kwargs.seed is set by loopsim; use seed"),
        ({"policy.algo_kwargs": {"replay_buffer_class": "x"}}, "use policy.her"),
        (
            {"policy.policy_kwargs": {"activation_fn": "os.system"}},
            "policy.policy_kwargs.activation_fn='os.system' is not allowed; allowed: [",
        ),
        ({"policy.policy_kwargs": {"net_arc": [8]}}, "net_arc"),
        (
            {"policy.policy": "CnnPolicyy"},
            "policy.policy='CnnPolicyy' is not a policy of SAC; allowed: ['auto', 'CnnPolicy'",
        ),
        (
            {"policy.normalize": True, "env.kwargs": {"obs_mode": "rgb"}},
            "policy.normalize=true with env.kwargs.obs_mode='rgb'",
        ),
        (
            {"policy.algo_kwargs": {"action_noise": {"type": "pink", "sigma": 0.1}}},
            "policy.algo_kwargs.action_noise=",
        ),
        (
            {"policy.algo_kwargs": {"batch_size": "big"}},
            "policy.algo_kwargs.batch_size='big' must be a number",
        ),
        ({"policy.algo_kwargs": {"batch_size": 2.5}}, "policy.algo_kwargs.batch_size=2.5 must be an integer"),
        ({"policy.algo_kwargs": {"train_freq": [1, "epoch"]}}, "policy.algo_kwargs.train_freq=[1, 'epoch']"),
        ({"policy.algo_kwargs": {"ent_coef": "sometimes"}}, "SAC refused"),
        # from the train break-it pass: NaN/inf settings trained until the first checkpoint refused
        # them, and the run could never resume (NaN differs from itself); out-of-range values
        # trained (gamma 7, buffer_size -5, batch_size 0) or failed after the run directory existed
        ({"policy.algo_kwargs": {"gamma": float("nan")}}, "policy.algo_kwargs.gamma is not a finite number"),
        ({"policy.algo_kwargs": {"tau": float("inf")}}, "policy.algo_kwargs.tau is not a finite number"),
        ({"policy.algo_kwargs": {"target_entropy": float("nan")}}, "target_entropy is not a finite"),
        (
            {"policy.algo_kwargs": {"train_freq": [1, "step"], "action_noise": {"type": "normal",
                                                                                  "sigma": float("inf")}}},
            "policy.algo_kwargs.action_noise.sigma is not a finite number",
        ),
        (
            {"policy.her": True, "env.kwargs": {"obs_mode": "goal"},
             "policy.her_kwargs": {"n_sampled_goal": float("nan")}},
            "policy.her_kwargs.n_sampled_goal is not a finite number",
        ),
        (
            {"policy.her": True, "env.kwargs": {"obs_mode": "goal"},
             "policy.her_kwargs": {"n_sampled_goal": -1}},
            "policy.her_kwargs.n_sampled_goal=-1; allowed: an integer >= 0",
        ),
        ({"policy.algo_kwargs": {"gamma": 7}}, "policy.algo_kwargs.gamma=7 is out of range; allowed: [0, 1]"),
        ({"policy.algo_kwargs": {"buffer_size": -5}}, "buffer_size=-5 is out of range; allowed: >= 1"),
        ({"policy.algo_kwargs": {"buffer_size": 0}}, "buffer_size=0 is out of range; allowed: >= 1"),
        ({"policy.algo_kwargs": {"batch_size": 0}}, "batch_size=0 is out of range; allowed: >= 1"),
        ({"policy.algo_kwargs": {"learning_rate": 0}}, "learning_rate=0 is out of range; allowed: (0, 3.4e"),
        (
            {"policy.algo_kwargs": {"buffer_size": 1000, "batch_size": 10**20}},
            "batch_size=100000000000000000000 is larger than policy.algo_kwargs.buffer_size (1000)",
        ),
        # from the second train break-it pass: each crashed mid-run, after the run directory existed
        ({"policy.algo_kwargs": {"batch_size": 32.0}}, "batch_size=32.0 must be an integer, written"),
        ({"policy.algo_kwargs": {"learning_rate": "3e-4"}}, "as text: write 0.0003"),
        ({"policy.algo_kwargs": {"gradient_steps": 2.0}}, "gradient_steps=2.0 must be an integer"),
        ({"policy.algo_kwargs": {"buffer_size": 100000.0}}, "buffer_size=100000.0 must be an integer"),
        (
            {"policy.algo_kwargs": {"train_freq": [1, "episode"]}, "train.n_envs": 2},
            "train_freq=[1, 'episode'] trains per episode, which SB3 allows with one env only",
        ),
        (
            {"policy.her": True, "env.kwargs": {"obs_mode": "goal"},
             "policy.algo_kwargs": {"learning_starts": 50}},
            "learning_starts=50: HER samples from finished episodes, and an episode of "
            "loopsim/FactoryPegInsert-v0 may last 100 steps in each of the 1 env(s); allowed: >= 100",
        ),
        ({"policy.algo_kwargs": {"learning_rate": 1e39}}, "learning_rate=1e+39 is out of range; allowed"),
        ({"policy.algo_kwargs": {"device": "meta"}}, "device='meta'; allowed: cpu, auto, cuda, cuda:<index>"),
        pytest.param(
            {"policy.algo_kwargs": {"device": "cuda"}},
            "policy.algo_kwargs.device='cuda': this machine has no CUDA device; allowed: cpu, auto",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there"),
        ),
        (
            {"policy.algo_kwargs": {"buffer_size": 10**11}},
            "policy.algo_kwargs.buffer_size=100000000000 needs about",
        ),
        (
            {"policy.algo": "PPO", "policy.algo_kwargs": {"n_steps": 16, "batch_size": 64},
             "train.n_envs": 2},
            "batch_size=64 is larger than policy.algo_kwargs.n_steps x train.n_envs (one rollout) (32)",
        ),
    ],
)
def test_check_refuses_before_any_work(tmp_path: Path, over: dict[str, Any], message: str) -> None:
    config = _config(**over)
    with pytest.raises(ConfigError) as err:
        check_sb3_config(config)
    assert message in str(err.value)
    with pytest.raises(ConfigError):
        train(config, tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run").exists()


def test_check_accepts_good_configs() -> None:
    check_sb3_config(_config())
    check_sb3_config(
        _config(
            **{
                "policy.her": True,
                "env.kwargs": {"obs_mode": "goal"},
                "policy.her_kwargs": {"n_sampled_goal": 2, "goal_selection_strategy": "final"},
            }
        )
    )
    check_sb3_config(
        _config(
            **{
                "policy.algo": "TD3",
                "policy.algo_kwargs": {
                    "action_noise": {"type": "normal", "sigma": 0.1},
                    "train_freq": [1, "episode"],
                },
            }
        )
    )
    check_sb3_config(
        _config(
            **{
                "policy.algo": "PPO",
                "policy.normalize": False,
                "policy.algo_kwargs": {"n_steps": 64, "batch_size": 32},
                "policy.policy_kwargs": {"net_arch": {"pi": [8], "vf": [8]}, "activation_fn": "tanh"},
            }
        )
    )


# =============================================================================== training runs
@pytest.mark.parametrize(("num_threads", "expected"), [(None, None), (1, 1), (2, 2)])
def test_training_runs_with_the_configured_torch_threads_and_restores_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_threads: int | None, expected: int | None
) -> None:
    """train.num_threads (default 1: a run independent of the core count) is set for the run only."""
    seen = []
    monkeypatch.setattr(train_sb3_module, "train_sb3", lambda *a, **k: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    overrides = {} if num_threads is None else {"train.num_threads": num_threads}
    config = _config(**overrides)
    if num_threads is None:
        assert config.train.num_threads == 1  # the default
        config = config.model_copy(update={"train": config.train.model_copy(update={"num_threads": None})})
    train(config, tmp_path / "run", progress_bar=False)
    assert seen == [before if expected is None else expected]
    assert torch.get_num_threads() == before


def test_tiny_run_writes_everything(tmp_path: Path) -> None:
    config = _config(
        **{
            "env.kwargs": {"obs_mode": "goal"},
            "policy.her": True,
            "policy.her_kwargs": {"n_sampled_goal": 2},
            "policy.algo_kwargs": {"learning_starts": 200, "buffer_size": 1000, "batch_size": 16},
            "train.n_envs": 2,
            "train.total_timesteps": 300,
            "train.failure_penalty": 1.0,
        }
    )
    run = train(config, tmp_path / "run", progress_bar=False)
    assert run.finished
    assert yaml.safe_load((run.path / "config.yaml").read_text())["policy"]["her"] is True
    assert (run.path / "done").exists() and (run.path / "evaluations.csv").exists()
    assert [r["step"] for r in run.evaluations()] == [100, 200, 300]
    assert list((run.tb_dir / "sb3_1").glob("events.out.tfevents.*"))  # SB3's own curves
    assert list(run.tb_dir.glob("events.out.tfevents.*"))  # evaluation curves
    policy = load_policy(run.checkpoint_dir)
    assert isinstance(policy, SB3Policy)
    assert policy.config["policy"]["algo"] == "SAC" and policy.config["seed"] == 0
    assert policy.provenance["timesteps"] == 300 and policy.provenance["algo"] == "SAC"
    assert policy.normalizer is not None and policy.policy_name == "MultiInputPolicy"
    env = config.env.make()
    obs, _ = env.reset(seed=0)
    action, _ = policy.predict(obs, deterministic=True)
    assert env.action_space.contains(action)
    env.close()
    state = load_resume_state(run.resume_dir)
    assert state is not None and json.loads((state / "state.json").read_text())["num_timesteps"] == 300


class _Interrupt(Exception):
    pass


def _buffer_size(state_dir: Path) -> int:
    with open(state_dir / "replay_buffer.pkl", "rb") as f:
        buf = pickle.load(f)  # noqa: S301 - our own private resume state
    return buf.buffer_size if buf.full else buf.pos


def test_interrupted_run_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(**{"train.total_timesteps": 300})
    original = train_sb3_module._Trainer.save_resume
    calls = []

    def checkpoint_then_die(self: Any) -> Any:
        original(self)
        calls.append(self.model.num_timesteps)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_sb3_module._Trainer, "save_resume", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "run", progress_bar=False)
    assert calls == [100]
    run = RunDir(tmp_path / "run", config)
    assert not run.finished
    state = load_resume_state(run.resume_dir)
    assert state is not None and _buffer_size(state) == 100
    assert [r["step"] for r in run.evaluations()] == [100]

    monkeypatch.setattr(train_sb3_module._Trainer, "save_resume", original)
    loaded: list[int] = []
    real_load = train_sb3_module.load_resume_state

    def spy(path: Any) -> Any:
        out = real_load(path)
        loaded.append(int(json.loads((out / "state.json").read_text())["num_timesteps"]))
        return out

    monkeypatch.setattr(train_sb3_module, "load_resume_state", spy)
    run = train(config, tmp_path / "run", resume=True, progress_bar=False)
    assert loaded == [100]
    assert run.finished
    final = real_load(run.resume_dir)
    saved = json.loads((final / "state.json").read_text())
    assert saved["num_timesteps"] == 300  # continued to total_timesteps, not 100 + 300
    assert _buffer_size(final) == 300  # 100 carried over + 200 new transitions
    assert [r["step"] for r in run.evaluations()] == [100, 200, 300]
    assert load_policy(run.checkpoint_dir).provenance["timesteps"] == 300
    assert len(list((run.tb_dir).glob("sb3_*"))) == 1  # the same TensorBoard run continues


def _stop_after_first_resume_state(
    config: TrainConfig, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Train into ``run_dir`` and stop (as Ctrl-C would) right after the first resume state is saved."""
    original = train_sb3_module._Trainer.save_resume

    def save_then_stop(self: Any) -> None:
        original(self)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train_sb3_module._Trainer, "save_resume", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train(config, run_dir, progress_bar=False)


def _run_state(run_dir: Path) -> dict[str, Any]:
    """Everything a run's learning produced: SB3's parameters (optimizers included), the replay buffer
    and the normalisation statistics of the final resume state, and the evaluation results."""
    state = load_resume_state(run_dir / "resume")
    assert state is not None
    with open(state / "model.zip", "rb") as f:
        import zipfile

        with zipfile.ZipFile(f) as z:
            params = {n: z.read(n) for n in z.namelist() if n.endswith(".pth")}
    out: dict[str, Any] = {"params": params}
    if (state / "replay_buffer.pkl").is_file():
        with open(state / "replay_buffer.pkl", "rb") as f:
            buf = pickle.load(f)  # noqa: S301 - our own private resume state
        for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
            value = getattr(buf, name)
            is_dict = isinstance(value, dict)
            out[name] = {k: v.tobytes() for k, v in value.items()} if is_dict else value.tobytes()
    if (state / "vecnormalize.pkl").is_file():
        with open(state / "vecnormalize.pkl", "rb") as f:
            vn = pickle.load(f)  # noqa: S301
        rms = vn.obs_rms
        out["obs_rms"] = (
            {k: (r.mean.tobytes(), r.var.tobytes(), r.count) for k, r in rms.items()}
            if isinstance(rms, dict) else (rms.mean.tobytes(), rms.var.tobytes(), rms.count)
        )
    out["evaluations"] = [
        {k: v for k, v in r.items() if k not in ("wall_time_s", "time")}
        for r in RunDir(run_dir, None).evaluations()  # type: ignore[arg-type]
    ]
    return out


@pytest.mark.parametrize(
    "over",
    [
        pytest.param({"train.n_envs": 2}, id="SAC-VecNormalize-2envs"),
        pytest.param(
            {
                "policy.her": True,
                "env.kwargs": {"obs_mode": "goal"},
                "policy.normalize": False,
                "policy.her_kwargs": {"n_sampled_goal": 2},
            },
            id="SAC-HER-goal",
        ),
        pytest.param(
            {
                "policy.algo": "TD3",
                "policy.algo_kwargs": {
                    "learning_starts": 100, "buffer_size": 1000, "batch_size": 16,
                    "action_noise": {"type": "ornstein_uhlenbeck", "sigma": 0.2},
                },
            },
            id="TD3-OU-noise",
        ),
        pytest.param(
            {
                "policy.algo": "PPO",
                "policy.algo_kwargs": {"n_steps": 50, "batch_size": 25},
                "train.n_envs": 2,
                "train.subproc": True,
            },
            id="PPO-subproc",
        ),
    ],
)
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, over: dict[str, Any]
) -> None:
    """Stopped right after its first checkpoint (mid-episode: PegInsert's episodes last 100 steps)
    and resumed, a run ends with the same parameters, optimizer states, replay buffer, normalisation
    statistics and evaluations as one that ran through. Before, the resumed run started fresh
    episodes under reseeded generators and drifted from the first resume on."""
    config = _config(**{"train.total_timesteps": 300, **over})
    train(config, tmp_path / "through", progress_bar=False)

    _stop_after_first_resume_state(config, tmp_path / "resumed", monkeypatch)
    first = load_resume_state(tmp_path / "resumed" / "resume")
    assert first is not None and json.loads((first / "state.json").read_text())["num_timesteps"] == 100
    with pytest.warns() as record:  # no warning of fresh episodes
        train(config, tmp_path / "resumed", resume=True, progress_bar=False)
        warnings.warn("sentinel", UserWarning, stacklevel=1)
    assert not [w for w in record if "fresh episodes" in str(w.message)]

    through, resumed = _run_state(tmp_path / "through"), _run_state(tmp_path / "resumed")
    assert resumed.keys() == through.keys()
    for key in through:
        assert resumed[key] == through[key], key
    assert [r["step"] for r in through["evaluations"]] == [100, 200, 300]


def _flip_last_action(saved: Any) -> Any:
    saved["episodes"][0]["actions"][-1] = -saved["episodes"][0]["actions"][-1]
    return saved


def _drop(key: str) -> Any:
    def damage(saved: Any) -> Any:
        del saved[key]
        return saved

    return damage


def _numpy_state_none(saved: Any) -> Any:
    saved["generators"]["numpy"] = None
    return saved


def _action_of_text(saved: Any) -> Any:
    saved["episodes"][0]["actions"][0] = "x"
    return saved


@pytest.mark.parametrize(
    ("damage", "raw", "why"),
    [
        (_flip_last_action, None, "training env 0 did not replay to the saved observation"),
        (None, b"\x80\x05not a pickle at all", "rollout_state.pkl cannot be read"),
        (None, "half", "rollout_state.pkl cannot be read"),
        (lambda saved: [saved], None, "rollout_state.pkl cannot be read"),
        (_drop("generators"), None, "rollout_state.pkl cannot be read"),
        (_numpy_state_none, None, "the saved random generators cannot be restored"),
        (_action_of_text, None, "training env 0 could not replay its episode"),
    ],
    ids=["changed-action", "garbage", "truncated", "a-list", "no-generators", "bad-generator", "bad-action"],
)
def test_a_resume_state_that_does_not_replay_starts_fresh_episodes_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: Any, raw: Any, why: str
) -> None:
    """If an episode does not replay to the observation SB3 saved (an env changed between the runs),
    or rollout_state.pkl is damaged, the run still resumes, with fresh episodes, and says it is not bit
    for bit. A damaged file was a traceback at every --resume (second break-it pass)."""
    config = _config(**{"train.total_timesteps": 200, "eval.every": 0})
    _stop_after_first_resume_state(config, tmp_path / "run", monkeypatch)
    state = load_resume_state(tmp_path / "run" / "resume")
    path = state / "rollout_state.pkl"
    if damage is not None:
        with open(path, "rb") as f:
            saved = pickle.load(f)  # noqa: S301
        with open(path, "wb") as f:
            pickle.dump(damage(saved), f)
    elif raw == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(raw)
    with pytest.warns(RuntimeWarning, match=f"resuming with fresh episodes, not bit for bit: .*{why}"):
        run = train(config, tmp_path / "run", resume=True, progress_bar=False)
    assert run.finished and load_policy(run.checkpoint_dir).provenance["timesteps"] == 200


def test_an_incomplete_resume_state_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state folder without model.zip was a 51-line RuntimeError traceback."""
    from typer.testing import CliRunner

    from loopsim.cli import app

    config = _config(**{"train.total_timesteps": 200, "eval.every": 0})
    _stop_after_first_resume_state(config, tmp_path / "run", monkeypatch)
    (load_resume_state(tmp_path / "run" / "resume") / "model.zip").unlink()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", str(path), "--run-dir", str(tmp_path / "run"), "--resume"])
    assert result.exit_code == 2, result.output
    assert "is incomplete (no model.zip or state.json); start a new run" in " ".join(result.output.split())


def test_resume_without_state_starts_over(tmp_path: Path) -> None:
    config = _config(**{"train.total_timesteps": 100, "eval.every": 0, "policy.normalize": False})
    RunDir.start(tmp_path / "run", config, resume=False)
    run = train(config, tmp_path / "run", resume=True, progress_bar=False)
    assert load_policy(run.checkpoint_dir).provenance["timesteps"] == 100
    assert [r["step"] for r in run.evaluations()] == [100]


def test_a_save_killed_midway_leaves_the_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stable_baselines3 import SAC
    from stable_baselines3.common.vec_env import DummyVecEnv

    config = _config()
    venv = DummyVecEnv([lambda: config.env.make()])
    model = SAC(
        "MlpPolicy",
        venv,
        buffer_size=200,
        learning_starts=10,
        batch_size=8,
        seed=0,
        policy_kwargs={"net_arch": [8]},
        device="cpu",
    )
    model.learn(20)
    first = save_resume_state(tmp_path / "resume", model)
    model.learn(20, reset_num_timesteps=False)

    def die(path: Any) -> None:
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt  # e.g. the process killed while writing the replay buffer

    monkeypatch.setattr(model, "save_replay_buffer", die)
    with pytest.raises(KeyboardInterrupt):
        save_resume_state(tmp_path / "resume", model)
    assert load_resume_state(tmp_path / "resume") == first
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["LATEST", first.name]
    restored = SAC.load(first / "model.zip", env=venv)
    restored.load_replay_buffer(first / "replay_buffer.pkl")
    assert restored.num_timesteps == 20 and restored.replay_buffer.pos == 20
    venv.close()


def test_final_checkpoint_acts_like_the_returned_policy(tmp_path: Path) -> None:
    from loopsim.train_sb3 import train_sb3

    config = _config(**{"train.total_timesteps": 100, "eval.every": 0})
    run = RunDir.start(tmp_path / "run", config, resume=False)
    policy = train_sb3(config, run, progress_bar=False)
    run.close()
    loaded = load_policy(run.checkpoint_dir)
    obs = np.stack([config.env.make().reset(seed=s)[0] for s in range(3)])
    np.testing.assert_array_equal(
        policy.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )


def test_failure_penalty_only_on_failed_endings() -> None:
    import gymnasium as gym

    from loopsim.train_sb3 import FailurePenalty

    class Ends(gym.Env):
        observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

        def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
            return np.zeros(1, np.float32), {}

        def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
            kind = int(action[0])  # 0: going on, 1: success, -1: failure; 2: time limit
            return (np.zeros(1, np.float32), -0.5, kind in (1, -1), kind == 2, {"is_success": kind == 1})

    env = FailurePenalty(Ends(), 3.0)
    env.reset()
    rewards = [env.step(np.array([k], np.float32))[1] for k in (0, 1, -1, 2)]
    assert rewards == [-0.5, -0.5, -3.5, -0.5]


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/train/*_sac.yaml")), ids=str)
def test_shipped_rl_configs_pass_the_checks(path: Path) -> None:
    from loopsim.config import load_config

    config = load_config(TrainConfig, path)
    check_sb3_config(config)
    assert config.eval.episodes >= 20


@pytest.mark.slow
@pytest.mark.parametrize(
    "over",
    [
        {"train.n_envs": 2, "train.subproc": True},
        {
            "policy.algo": "PPO",
            "policy.normalize": False,
            "env.kwargs": {"obs_mode": "rgb", "image_size": 48},
            "policy.algo_kwargs": {"n_steps": 64, "batch_size": 32, "n_epochs": 1},
            "train.total_timesteps": 128,
            "train.checkpoint_every": 64,
            "eval.every": 64,
        },
    ],
    ids=["sac-subproc", "ppo-rgb"],
)
def test_other_setups_train_and_deploy(tmp_path: Path, over: dict[str, Any]) -> None:
    config = _config(**over)
    check_sb3_config(config)
    run = train(config, tmp_path / "run", progress_bar=False)
    policy = load_policy(run.checkpoint_dir)
    env = config.env.make()
    obs, _ = env.reset(seed=0)
    assert policy.observation_space == env.observation_space  # rgb: HWC as the env gives it
    assert env.action_space.contains(policy.predict(obs, deterministic=True)[0])
    env.close()
    assert run.evaluations()[-1]["step"] == config.train.total_timesteps


def test_block_gripper_run_deploys_with_its_env_kwargs(tmp_path: Path) -> None:
    """A policy trained with ``block_gripper`` records it; ``loopsim eval`` deploys with it by default."""
    from typer.testing import CliRunner

    from loopsim.cli import app

    kwargs = {"obs_mode": "state", "block_gripper": True, "max_steps": 20}  # short episodes: a fast test
    config = _config(**{"env.kwargs": kwargs})
    check_sb3_config(config)
    run = train(config, tmp_path / "run", progress_bar=False)
    policy = load_policy(run.checkpoint_dir)
    assert policy.action_space.shape == (3,)
    meta = json.loads((run.checkpoint_dir / "policy.json").read_text())
    assert meta["config"]["env"]["kwargs"] == kwargs
    runner = CliRunner()
    args = ["eval", str(run.checkpoint_dir), "--env", PEG, "--site", "lab", "--episodes", "1"]
    out = tmp_path / "eval.json"
    result = runner.invoke(app, [*args, "--json", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())  # evaluated with the recorded block_gripper=True
    wrong = runner.invoke(app, [*args, "--env-kwarg", "block_gripper=false"], terminal_width=200)
    assert wrong.exit_code != 0
    assert "expects actions Box(3,)" in wrong.output and "block_gripper" in wrong.output
