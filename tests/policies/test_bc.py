"""Tests of the ``bc`` policy kind: shapes, normalisation, checkpoints, training mechanics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from loopsim.policies import BCPolicy, CheckpointError, RandomPolicy, load_policy
from loopsim.policies.bc import BCTrainer, fit_bc

torch.set_num_threads(1)

ACTION_SPACE = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
SPACES: dict[str, gym.Space] = {
    "state": gym.spaces.Box(-np.inf, np.inf, shape=(22,), dtype=np.float32),
    "rgb": gym.spaces.Box(0, 255, shape=(48, 48, 3), dtype=np.uint8),
    "goal": gym.spaces.Dict({
        "observation": gym.spaces.Box(-np.inf, np.inf, shape=(22,), dtype=np.float32),
        "achieved_goal": gym.spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32),
        "desired_goal": gym.spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32),
    }),
}


def _obs_batch(space: gym.Space, n: int, seed: int = 0) -> Any:
    rng = np.random.default_rng(seed)
    if isinstance(space, gym.spaces.Dict):
        return {k: _obs_batch(s, n, seed + i + 1) for i, (k, s) in enumerate(space.spaces.items())}
    if space.dtype == np.uint8:
        return rng.integers(0, 256, size=(n, *space.shape), dtype=np.uint8)
    return rng.normal(size=(n, *space.shape)).astype(np.float32)


def _first(obs: Any) -> Any:
    return {k: v[0] for k, v in obs.items()} if isinstance(obs, dict) else obs[0]


def _policy(mode: str, **kwargs: Any) -> BCPolicy:
    torch.manual_seed(0)
    return BCPolicy(SPACES[mode], ACTION_SPACE, hidden_sizes=(32, 32), cnn_channels=(8, 16, 16), **kwargs)


@pytest.mark.parametrize("mode", sorted(SPACES))
def test_predict_shapes_single_and_batch(mode: str) -> None:
    policy = _policy(mode)
    batch = _obs_batch(SPACES[mode], 5)
    actions, state = policy.predict(batch)
    assert state is None
    assert actions.shape == (5, 4) and actions.dtype == np.float32
    assert np.all(actions >= -1) and np.all(actions <= 1)
    single, _ = policy.predict(_first(batch))
    assert single.shape == (4,)
    np.testing.assert_allclose(single, actions[0], rtol=1e-5, atol=1e-6)
    # deterministic and stochastic calls are the same: BC has no action noise.
    np.testing.assert_array_equal(policy.predict(batch, deterministic=True)[0],
                                  policy.predict(batch, deterministic=False)[0])


@pytest.mark.parametrize("obs_mode", ["state", "rgb", "goal"])
def test_acts_in_real_env(obs_mode: str) -> None:
    env = gym.make("loopsim:loopsim/FactoryPickPlace-v0", obs_mode=obs_mode, image_size=48)
    try:
        torch.manual_seed(0)
        policy = BCPolicy(env.observation_space, env.action_space, hidden_sizes=(16,), cnn_channels=(4, 8))
        obs, _ = env.reset(seed=0)
        for _ in range(3):
            action, _ = policy.predict(obs)
            assert env.action_space.contains(action)
            obs, *_ = env.step(action)
    finally:
        env.close()


def test_normalisation_is_fitted_applied_and_saved(tmp_path: Path) -> None:
    policy = _policy("state")
    rng = np.random.default_rng(1)
    data = rng.normal(loc=3.0, scale=2.0, size=(5000, 22)).astype(np.float32)
    data[:, 5] = 7.0  # a constant feature: centred only (std set to 1), never divided by ~0
    policy.fit_normalization(data)
    mean, std = policy.net.obs_mean.numpy(), policy.net.obs_std.numpy()
    np.testing.assert_allclose(mean, data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.delete(std, 5), np.delete(data.std(0), 5), rtol=1e-4)
    assert std[5] == 1.0 and mean[5] == pytest.approx(7.0)
    # applied: the network sees (x - mean) / std, clipped to +-obs_clip
    obs = data[:3]
    with torch.no_grad():
        y = policy.net.mlp(torch.from_numpy((obs - mean) / std))
    np.testing.assert_allclose(policy.predict(obs)[0], torch.tanh(y).numpy(), rtol=1e-5, atol=1e-6)
    far = obs.copy()
    far[:, 0] = 1e6
    far2 = obs.copy()
    far2[:, 0] = mean[0] + 10 * std[0]
    np.testing.assert_allclose(policy.predict(far)[0], policy.predict(far2)[0], rtol=1e-5, atol=1e-6)
    # stored in the checkpoint
    policy.save(tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt")
    np.testing.assert_array_equal(loaded.net.obs_mean.numpy(), mean)
    np.testing.assert_array_equal(loaded.net.obs_std.numpy(), std)
    meta = json.loads((tmp_path / "ckpt" / "policy.json").read_text())
    assert meta["kind"] == "bc" and meta["policy"]["hidden_sizes"] == [32, 32]


def test_goal_normalisation_uses_sorted_keys() -> None:
    policy = _policy("goal")
    obs = _obs_batch(SPACES["goal"], 100)
    obs["desired_goal"] = obs["desired_goal"] + 5.0
    policy.fit_normalization(obs)
    # sorted keys: achieved_goal (3), desired_goal (3), observation (22)
    np.testing.assert_allclose(policy.net.obs_mean.numpy()[3:6], obs["desired_goal"].mean(0), rtol=1e-5)


def test_images_are_scaled_not_normalised() -> None:
    policy = _policy("rgb")
    policy.fit_normalization(_obs_batch(SPACES["rgb"], 4))  # a no-op for images
    assert policy.net.obs_mean.numel() == 0
    with pytest.raises(ValueError, match="too small"):
        BCPolicy(gym.spaces.Box(0, 255, (16, 16, 3), np.uint8), ACTION_SPACE)


def test_refuses_unsupported_spaces() -> None:
    with pytest.raises(TypeError, match="action space"):
        BCPolicy(SPACES["state"], gym.spaces.Discrete(3))
    with pytest.raises(TypeError, match="observation"):
        BCPolicy(gym.spaces.Discrete(5), ACTION_SPACE)
    with pytest.raises(ValueError, match="activation"):
        BCPolicy(SPACES["state"], ACTION_SPACE, activation="swish")


_CHILD = textwrap.dedent("""
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    from loopsim.policies import load_policy
    policy = load_policy(sys.argv[1])
    data = np.load(sys.argv[2])
    obs = {k[4:]: data[k] for k in data.files if k.startswith("obs_")} or data["obs"]
    np.save(sys.argv[3], policy.predict(obs)[0])
""")


@pytest.mark.parametrize("mode", ["state", "goal"])
def test_save_load_identical_actions_in_fresh_process(tmp_path: Path, mode: str) -> None:
    policy = _policy(mode)
    obs = _obs_batch(SPACES[mode], 64, seed=3)
    policy.fit_normalization(_obs_batch(SPACES[mode], 200, seed=4))
    before = policy.predict(obs)[0]
    policy.provenance = {"note": "test"}
    policy.save(tmp_path / "ckpt")
    if isinstance(obs, dict):
        np.savez(tmp_path / "obs.npz", **{f"obs_{k}": v for k, v in obs.items()})
    else:
        np.savez(tmp_path / "obs.npz", obs=obs)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "obs.npz"),
                    str(tmp_path / "out.npy")], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(after, before)  # bit-identical
    assert load_policy(tmp_path / "ckpt").provenance == {"note": "test"}


def test_damaged_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    policy = _policy("state")
    ckpt = policy.save(tmp_path / "ckpt")
    weights = ckpt / "weights.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError, match="damaged"):
        load_policy(ckpt)

    weights.write_bytes(good)
    meta = json.loads((ckpt / "policy.json").read_text())
    meta["policy"]["hidden_sizes"] = [64]
    (ckpt / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_policy(ckpt)

    del meta["policy"]["activation"]
    (ckpt / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="settings"):
        load_policy(ckpt)

    random_ckpt = RandomPolicy(SPACES["state"], ACTION_SPACE).save(tmp_path / "random")
    with pytest.raises(CheckpointError, match="not 'bc'"):
        BCPolicy.load(random_ckpt)


class _ToyDataset:
    """Transitions of a known map: action = tanh(W obs)."""

    def __init__(self, n: int = 2048) -> None:
        rng = np.random.default_rng(0)
        self.obs = rng.normal(size=(n, 22)).astype(np.float32)
        w = rng.normal(size=(22, 4)).astype(np.float32) / 3
        self.act = np.tanh(self.obs @ w).astype(np.float32)
        self.arrays = {"observation": self.obs}

    def __len__(self) -> int:
        return len(self.obs)

    def get_batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {"observation": torch.from_numpy(self.obs[idx]), "action": torch.from_numpy(self.act[idx])}


def test_fit_bc_learns_and_is_reproducible() -> None:
    data = _ToyDataset()
    runs = []
    for _ in range(2):
        policy = _policy("state")
        stats = fit_bc(policy, data, epochs=15, batch_size=64, lr=3e-3,
                       generator=torch.Generator().manual_seed(1))
        runs.append((policy, stats))
    (p1, s1), (p2, s2) = runs
    assert [s.epoch for s in s1] == list(range(1, 16))
    assert s1[-1].loss < 0.1 * s1[0].loss
    assert s1[0].batches == 32
    for a, b in zip(p1.net.state_dict().values(), p2.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    pred = p1.predict(data.obs[:256])[0]
    assert float(np.mean((pred - data.act[:256]) ** 2)) < 0.01


def test_trainer_state_dict_resumes_bit_identically() -> None:
    data = _ToyDataset(512)

    def trainer() -> BCTrainer:
        policy = _policy("state")
        policy.fit_normalization(data.obs)
        return BCTrainer(policy, data, batch_size=50, lr=1e-3, generator=torch.Generator().manual_seed(2))

    full = trainer()
    for _ in range(4):
        full.train_epoch()
    part = trainer()
    for _ in range(2):
        part.train_epoch()
    state = part.state_dict()
    resumed = trainer()
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.train_epoch()
    assert resumed.epoch == 4
    for a, b in zip(full.policy.net.state_dict().values(), resumed.policy.net.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_trainer_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="empty"):
        BCTrainer(_policy("state"), _ToyDataset(0))
    with pytest.raises(ValueError, match="batch_size"):
        BCTrainer(_policy("state"), _ToyDataset(8), batch_size=0)
    with pytest.raises(ValueError, match="epochs"):
        fit_bc(_policy("state"), _ToyDataset(8), epochs=0)


def test_gradient_clipping_is_applied() -> None:
    data = _ToyDataset(512)

    def weights(max_grad_norm: float | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        policy = _policy("state")
        policy.fit_normalization(data.obs)
        trainer = BCTrainer(policy, data, batch_size=64, lr=1e-3, generator=torch.Generator().manual_seed(0),
                            max_grad_norm=max_grad_norm)
        trainer.train_epoch()  # 8 steps: Adam's moments mix gradients of different norms
        return [p.detach().clone() for p in policy.net.parameters()]

    unclipped = weights(None)
    # A norm no gradient reaches changes nothing; a tiny one rescales every gradient and changes the result.
    assert all(torch.equal(a, b) for a, b in zip(weights(1e9), unclipped, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights(1e-6), unclipped, strict=True))
    with pytest.raises(ValueError, match="max_grad_norm"):
        BCTrainer(_policy("state"), data, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        BCTrainer(_policy("state"), data, max_grad_norm=float("nan"))
