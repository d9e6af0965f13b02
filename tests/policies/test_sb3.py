"""Tests of the ``sb3`` policy kind: safe checkpoints, normalisation, image layout, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from loopsim.policies import CheckpointError, SB3Policy, load_policy
from loopsim.policies.sb3 import policy_kwargs_from_json, policy_kwargs_to_json

torch.set_num_threads(1)

ACTION_SPACE = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
STATE = gym.spaces.Box(-5.0, 5.0, shape=(22,), dtype=np.float32)
SPACES: dict[str, gym.Space] = {
    "state": STATE,
    "goal": gym.spaces.Dict(
        {
            "observation": STATE,
            "achieved_goal": gym.spaces.Box(-10.0, 10.0, shape=(3,), dtype=np.float32),
            "desired_goal": gym.spaces.Box(-10.0, 10.0, shape=(3,), dtype=np.float32),
        }
    ),
    "rgb": gym.spaces.Box(0, 255, shape=(40, 40, 3), dtype=np.uint8),
}


class StubEnv(gym.Env):
    """Spaces of a loopsim env, random observations offset from zero (so normalisation matters)."""

    def __init__(self, observation_space: gym.Space) -> None:
        self.observation_space = observation_space
        self.action_space = ACTION_SPACE

    def _obs(self) -> Any:
        obs = self.observation_space.sample()
        if isinstance(obs, dict):
            return {k: (v * 0.1 + 2.0).astype(np.float32) for k, v in obs.items()}
        return obs if obs.dtype == np.uint8 else (obs * 0.1 + 2.0).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.observation_space.seed(seed)
        return self._obs(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self._obs(), float(-np.abs(action).sum()), False, False, {}


def _obs_batch(space: gym.Space, n: int, seed: int = 0) -> Any:
    env = StubEnv(space)
    env.reset(seed=seed)
    obs = [env._obs() for _ in range(n)]
    if isinstance(space, gym.spaces.Dict):
        return {k: np.stack([o[k] for o in obs]) for k in space.spaces}
    return np.stack(obs)


def _row(obs: Any, i: int) -> Any:
    return {k: v[i] for k, v in obs.items()} if isinstance(obs, dict) else obs[i]


def _model(mode: str, normalize: bool = True) -> tuple[Any, Any]:
    """A briefly trained SB3 model on the stub env (SAC for state/goal, PPO + CnnPolicy for rgb)."""
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    venv = DummyVecEnv([lambda: StubEnv(SPACES[mode])])
    vn = VecNormalize(venv, norm_reward=False) if normalize and mode != "rgb" else None
    kwargs = {"net_arch": [16, 16], "activation_fn": torch.nn.Tanh}
    if mode == "rgb":
        model = PPO(
            "CnnPolicy",
            venv,
            n_steps=16,
            batch_size=16,
            n_epochs=1,
            seed=0,
            policy_kwargs=kwargs,
            device="cpu",
        )
    else:
        model = SAC(
            "MultiInputPolicy" if mode == "goal" else "MlpPolicy",
            vn or venv,
            learning_starts=8,
            batch_size=8,
            buffer_size=100,
            seed=0,
            policy_kwargs=kwargs,
            device="cpu",
        )
    model.learn(32)
    return model, vn


def _sb3_actions(model: Any, vn: Any, obs: Any) -> np.ndarray:
    """What the SB3 model itself does (obs normalised by hand, as SB3 users must)."""
    return model.predict(vn.normalize_obs(obs) if vn is not None else obs, deterministic=True)[0]


@pytest.fixture(scope="module", params=list(SPACES))
def trained(request: pytest.FixtureRequest) -> tuple[str, Any, Any]:
    model, vn = _model(request.param)
    return request.param, model, vn


# ============================================================================================ tests
def test_snapshot_acts_like_the_model(trained: tuple[str, Any, Any]) -> None:
    mode, model, vn = trained
    policy = SB3Policy.from_model(model, vn)
    assert policy.observation_space == SPACES[mode]  # the env's layout (HWC), not SB3's transposed one
    obs = _obs_batch(SPACES[mode], 5)
    expected = _sb3_actions(model, vn, obs)
    got, state = policy.predict(obs, deterministic=True)
    assert state is None
    assert got.shape == (5, 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    one, _ = policy.predict(_row(obs, 2), deterministic=True)
    assert one.shape == (4,)
    np.testing.assert_allclose(one, expected[2], rtol=0, atol=1e-6)


def test_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    # One subprocess for all three observation kinds (importing SB3 takes seconds).
    expected = {}
    for mode in SPACES:
        model, vn = _model(mode)
        policy = SB3Policy.from_model(model, vn)
        policy.provenance = {"timesteps": 32}
        policy.save(tmp_path / mode)
        obs = _obs_batch(SPACES[mode], 6, seed=3)
        np.savez(tmp_path / f"{mode}.npz", **(obs if isinstance(obs, dict) else {"obs": obs}))
        expected[mode] = policy.predict(obs, deterministic=True)[0]
        np.testing.assert_allclose(expected[mode], _sb3_actions(model, vn, obs), rtol=0, atol=1e-6)
    # torch's CPU kernels may round differently with another thread count (seen on AMD EPYC: 1 ULP in
    # 2 of 24 actions with 2 threads against this module's 1): the fresh process uses the same count
    script = textwrap.dedent(f"""
        import numpy as np
        import torch
        from loopsim.policies import load_policy
        torch.set_num_threads({torch.get_num_threads()})
        for mode in {list(SPACES)!r}:
            p = load_policy({str(tmp_path)!r} + "/" + mode)
            f = np.load({str(tmp_path)!r} + "/" + mode + ".npz")
            obs = f["obs"] if list(f.keys()) == ["obs"] else {{k: f[k] for k in f.keys()}}
            np.save({str(tmp_path)!r} + "/" + mode + "-actions.npy", p.predict(obs, deterministic=True)[0])
            print(mode, type(p).__name__, p.provenance["timesteps"])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [line.split() for line in out.stdout.splitlines() if line.split()[0] in SPACES] == [
        [mode, "SB3Policy", "32"] for mode in SPACES
    ]
    for mode in SPACES:
        np.testing.assert_array_equal(np.load(tmp_path / f"{mode}-actions.npy"), expected[mode])


def test_load_in_process_and_metadata(trained: tuple[str, Any, Any], tmp_path: Path) -> None:
    mode, model, vn = trained
    SB3Policy.from_model(model, vn).save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "policy.json").read_text())
    assert meta["kind"] == "sb3"
    assert meta["policy"]["algo"] == ("PPO" if mode == "rgb" else "SAC")
    assert meta["policy"]["policy_kwargs"]["activation_fn"] == "tanh"
    assert meta["policy"]["policy_kwargs"]["net_arch"] == [16, 16]
    loaded = SB3Policy.load(tmp_path / "ckpt")
    obs = _obs_batch(SPACES[mode], 4, seed=9)
    np.testing.assert_array_equal(
        loaded.predict(obs, deterministic=True)[0],
        SB3Policy.from_model(model, vn).predict(obs, deterministic=True)[0],
    )
    assert not loaded.policy.training


def test_stochastic_predict_samples(trained: tuple[str, Any, Any]) -> None:
    mode, model, vn = trained
    policy = SB3Policy.from_model(model, vn)
    obs = _obs_batch(SPACES[mode], 8)
    a, b = policy.predict(obs)[0], policy.predict(obs)[0]
    assert not np.array_equal(a, b)
    assert np.all(np.abs(a) <= 1.0)


def test_vecnormalize_statistics_are_applied(tmp_path: Path) -> None:
    model, vn = _model("state")
    with_stats = SB3Policy.from_model(model, vn)
    without = SB3Policy.from_model(model, vec_normalize=False)
    assert SB3Policy.from_model(model).normalizer is not None  # found in the model's env
    obs = _obs_batch(STATE, 4)
    assert not np.allclose(
        with_stats.predict(obs, deterministic=True)[0], without.predict(obs, deterministic=True)[0]
    )
    np.testing.assert_array_equal(with_stats.normalizer(obs), vn.normalize_obs(obs))
    with_stats.save(tmp_path / "ckpt")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ckpt" / "weights.safetensors"))
    np.testing.assert_array_equal(tensors["obs_rms.mean"].numpy(), vn.obs_rms.mean)
    np.testing.assert_array_equal(tensors["obs_rms.var"].numpy(), vn.obs_rms.var)
    # A snapshot: later updates of the running statistics do not change the policy.
    vn.obs_rms.mean += 1.0
    np.testing.assert_array_equal(load_policy(tmp_path / "ckpt").normalizer(obs), with_stats.normalizer(obs))


def test_dict_normalisation_keys(tmp_path: Path) -> None:
    model, vn = _model("goal")
    policy = SB3Policy.from_model(model, vn)
    policy.save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "policy.json").read_text())
    assert sorted(meta["policy"]["normalization"]["keys"]) == sorted(SPACES["goal"].spaces)
    obs = _obs_batch(SPACES["goal"], 3)
    normalized = load_policy(tmp_path / "ckpt").normalizer(obs)
    for key, value in vn.normalize_obs(obs).items():
        np.testing.assert_array_equal(normalized[key], value)


def _edit(path: Path, **changes: Any) -> None:
    meta = json.loads((path / "policy.json").read_text())
    for key, value in changes.items():
        if key == "policy_kwargs":
            meta["policy"]["policy_kwargs"].update(value)
        else:
            meta["policy"][key] = value
    (path / "policy.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algo": "os.system"}, "unknown SB3 algorithm 'os.system'"),
        ({"algo": "stable_baselines3.SAC"}, "unknown SB3 algorithm"),
        ({"policy": "builtins.eval"}, "SAC has no policy 'builtins.eval'"),
        (
            {"policy_kwargs": {"activation_fn": "subprocess.Popen"}},
            "activation_fn='subprocess.Popen' is not allowed",
        ),
        ({"policy_kwargs": {"features_extractor_class": "os.system"}}, "features_extractor_class"),
        ({"policy_kwargs": {"optimizer_class": "torch.optim.LBFGS"}}, "optimizer_class"),
        ({"policy_kwargs": {"not_a_kwarg": 1}}, "does not accept policy_kwargs ['not_a_kwarg']"),
        ({"policy_kwargs": {"net_arch": [8]}}, "weights do not fit"),
    ],
)
def test_refuses_names_outside_the_allow_lists(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    model, vn = _model("state", normalize=False)
    SB3Policy.from_model(model).save(tmp_path / "ckpt")
    _edit(tmp_path / "ckpt", **change)
    with pytest.raises(CheckpointError) as err:
        load_policy(tmp_path / "ckpt")
    assert message in str(err.value)


def test_refuses_unrepresentable_policy_kwargs() -> None:
    from stable_baselines3 import SAC
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv([lambda: StubEnv(STATE)])
    model = SAC(
        "MlpPolicy", venv, buffer_size=10, policy_kwargs={"activation_fn": torch.nn.Hardswish}, device="cpu"
    )
    with pytest.raises(ValueError, match=r"activation_fn=.*Hardswish.*allowed: \['elu'"):
        SB3Policy.from_model(model)
    with pytest.raises(ValueError, match="optimizer_kwargs=.*not a JSON value"):
        policy_kwargs_to_json({"optimizer_kwargs": {"betas": object()}})
    with pytest.raises(ValueError, match="activation_fn='swish' is not allowed"):
        policy_kwargs_from_json({"activation_fn": "swish"})
    assert policy_kwargs_from_json({"activation_fn": "relu", "net_arch": {"pi": [8], "qf": [8]}}) == {
        "activation_fn": torch.nn.ReLU,
        "net_arch": {"pi": [8], "qf": [8]},
    }


def test_damaged_metadata_and_weights(tmp_path: Path) -> None:
    model, _ = _model("state", normalize=False)
    SB3Policy.from_model(model).save(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "policy.json").read_text())
    del meta["policy"]["policy_observation_space"]
    (tmp_path / "ckpt" / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="damaged"):
        load_policy(tmp_path / "ckpt")


def test_only_safetensors_and_json_are_read(tmp_path: Path) -> None:
    model, vn = _model("state")
    SB3Policy.from_model(model, vn).save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["policy.json", "weights.safetensors"]
