"""The Policy protocol, checkpoints and the scripted policies (expert, random)."""

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import loopsim  # noqa: F401
from loopsim.policies import (
    BasePolicy,
    CheckpointError,
    ExpertPolicy,
    Policy,
    RandomPolicy,
    is_checkpoint,
    load_policy,
    read_checkpoint,
    write_checkpoint,
)
from loopsim.policies.checkpoint import CHECKPOINT_FORMAT_VERSION

ENV_ID = "loopsim/FactoryPickPlace-v0"


@pytest.fixture
def env():
    e = gym.make(ENV_ID)
    yield e
    e.close()


def test_policies_satisfy_the_protocol(env):
    assert isinstance(ExpertPolicy.for_env(env), Policy)
    assert isinstance(RandomPolicy(env.observation_space, env.action_space), Policy)


def test_expert_policy_acts_like_the_scripted_expert(env):
    from loopsim.envs import make_expert

    policy = ExpertPolicy.for_env(env)
    expert = make_expert(env)
    obs, _ = env.reset(seed=3)
    for _ in range(30):
        action, state = policy.predict(obs, deterministic=True)
        assert state is None
        assert action.shape == (4,) and action.dtype == np.float32
        np.testing.assert_array_equal(action, expert.act())
        obs, *_ = env.step(action)


def test_expert_noise_only_when_not_deterministic_and_seeded(env):
    policy = ExpertPolicy.for_env(env, noise_std=0.3)
    obs, _ = env.reset(seed=0)
    clean = policy.predict(obs, deterministic=True)[0]
    policy.reset(seed=5)
    a = policy.predict(obs, deterministic=False)[0]
    policy.reset(seed=5)
    b = policy.predict(obs, deterministic=False)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:3], clean[:3])
    assert a[3] == clean[3]  # the gripper command is never noised
    assert np.all(np.abs(a) <= 1.0)


def test_expert_noise_covers_every_motion_command_of_a_two_dim_action():
    """Warehouse actions are (v, w): both get noise (regression: noise was added to [:3] of a (2,) action)."""
    env = gym.make("loopsim/WarehouseNavigate-v0")
    try:
        policy = ExpertPolicy.for_env(env, noise_std=0.3)
        obs, _ = env.reset(seed=0)
        clean = policy.predict(obs, deterministic=True)[0]
        policy.reset(seed=5)
        noisy = np.array([policy.predict(obs, deterministic=False)[0] for _ in range(20)])
        assert noisy.shape == (20, 2) and noisy.dtype == np.float32
        assert (np.abs(noisy - clean).max(axis=0) > 0.05).all()
    finally:
        env.close()


def test_unbound_expert_and_batch_mismatch_are_refused(env):
    policy = ExpertPolicy(env.observation_space, env.action_space)
    obs, _ = env.reset(seed=0)
    with pytest.raises(RuntimeError, match="bind"):
        policy.predict(obs)
    policy.bind(env)
    with pytest.raises(ValueError, match="needs 2 bound envs"):
        policy.predict(np.stack([obs, obs]))
    with pytest.raises(ValueError, match="neither one observation"):
        policy.predict(obs[:5])


def test_random_policy_batches_and_is_seeded(env):
    policy = RandomPolicy(env.observation_space, env.action_space, seed=1)
    obs, _ = env.reset(seed=0)
    batch = np.stack([obs] * 5)
    actions, _ = policy.predict(batch)
    assert actions.shape == (5, 4) and actions.dtype == np.float32
    assert env.action_space.contains(actions[0])
    policy.reset(seed=9)
    x = policy.predict(obs)[0]
    policy.reset(seed=9)
    np.testing.assert_array_equal(x, policy.predict(obs)[0])


def test_expert_checkpoint_round_trip(env, tmp_path):
    policy = ExpertPolicy.for_env(env, noise_std=0.2)
    policy.config = {"note": "kept"}
    policy.provenance = {"source": "test"}
    path = policy.save(tmp_path / "ck")
    assert is_checkpoint(path)
    meta, tensors = read_checkpoint(path)
    assert meta["kind"] == "expert" and meta["policy"] == {"noise_std": 0.2}
    assert meta["format_version"] == CHECKPOINT_FORMAT_VERSION and tensors == {}
    loaded = load_policy(path, env=env)
    assert isinstance(loaded, ExpertPolicy) and loaded.noise_std == 0.2
    assert loaded.config == {"note": "kept"} and loaded.provenance == {"source": "test"}
    obs, _ = env.reset(seed=1)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0],
                                  policy.predict(obs, deterministic=True)[0])
    with pytest.raises(CheckpointError, match="holds a 'expert' policy, not 'random'"):
        RandomPolicy.load(path)


def test_checkpoint_replaces_a_checkpoint_but_nothing_else(tmp_path):
    import torch

    write_checkpoint(tmp_path / "ck", {"kind": "x", "v": 1}, {"w": torch.ones(3)})
    write_checkpoint(tmp_path / "ck", {"kind": "x", "v": 2}, {"w": torch.zeros(2)})
    meta, tensors = read_checkpoint(tmp_path / "ck")
    assert meta["v"] == 2 and tensors["w"].tolist() == [0.0, 0.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary leftovers
    other = tmp_path / "data"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a loopsim policy checkpoint"):
        write_checkpoint(other, {"kind": "x"})
    assert (other / "keep.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="non-finite"):
        write_checkpoint(tmp_path / "nan", {"kind": "x", "v": float("nan")})
    assert not (tmp_path / "nan").exists()


def test_a_full_disk_while_writing_weights_is_an_oserror_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """safetensors raises its own SafetensorError for an I/O error: a loop whose refine hit a full disk
    ended in a traceback (every other write's failure is an OSError, printed as one line)."""
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    write_checkpoint(tmp_path / "ck", {"kind": "x", "v": 1}, {"w": torch.ones(3)})

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match=r"cannot write the checkpoint .*ck: .*No space left on device"):
        write_checkpoint(tmp_path / "ck", {"kind": "x", "v": 2}, {"w": torch.zeros(2)})
    meta, tensors = read_checkpoint(tmp_path / "ck")
    assert meta["v"] == 1 and tensors["w"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("missing", "no policy.json"),
        ("garbage_json", "damaged"),
        ("foreign_json", "not loopsim policy metadata"),
        ("newer", "checkpoint format 99"),
        ("unknown_kind", "unknown kind 'alien'"),
        ("bad_weights", "damaged"),
        ("bad_space", "stored spaces are damaged"),
    ],
)
def test_damaged_checkpoints_give_clear_errors(env, tmp_path, damage, match):
    path = RandomPolicy(env.observation_space, env.action_space).save(tmp_path / "ck")
    meta_file = path / "policy.json"
    meta = json.loads(meta_file.read_text())
    if damage == "missing":
        meta_file.unlink()
    elif damage == "garbage_json":
        meta_file.write_text("{not json")
    elif damage == "foreign_json":
        meta_file.write_text(json.dumps({"hello": 1}))
    elif damage == "newer":
        meta_file.write_text(json.dumps({**meta, "format_version": 99}))
    elif damage == "unknown_kind":
        meta_file.write_text(json.dumps({**meta, "kind": "alien"}))
    elif damage == "bad_weights":
        (path / "weights.safetensors").write_bytes(b"\x00" * 10)
    elif damage == "bad_space":
        meta_file.write_text(json.dumps({**meta, "observation_space": "{]"}))
    with pytest.raises(CheckpointError, match=match):
        load_policy(path)


def test_loading_never_unpickles(env, tmp_path):
    """A pickle planted as the weights file is refused, not executed."""
    import pickle

    path = RandomPolicy(env.observation_space, env.action_space).save(tmp_path / "ck")
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "weights.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError):
        load_policy(path)
    assert not marker.exists()


def test_base_policy_is_abstract(env):
    with pytest.raises(TypeError):
        BasePolicy(env.observation_space, env.action_space)


def test_expert_checkpoint_loads_in_a_fresh_process(env, tmp_path):
    path = ExpertPolicy.for_env(env).save(tmp_path / "ck")
    obs, _ = env.reset(seed=4)
    here = ExpertPolicy.for_env(env).predict(obs, deterministic=True)[0]
    code = (
        "import gymnasium as gym, numpy as np, loopsim\n"
        "from loopsim.policies import load_policy\n"
        f"env = gym.make({ENV_ID!r}); obs, _ = env.reset(seed=4)\n"
        f"p = load_policy({str(path)!r}, env=env)\n"
        "print(p.predict(obs, deterministic=True)[0].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here.tolist()


def test_a_kill_between_the_renames_keeps_the_old_checkpoint_readable(env, tmp_path):
    import os

    path = RandomPolicy(env.observation_space, env.action_space).save(tmp_path / "ck")
    # What a writer killed after moving the old checkpoint aside (before moving the new one in) leaves.
    os.replace(path, tmp_path / ".ck.old-abc123")
    (tmp_path / ".ck.tmp-def456").mkdir()  # and a half-written new one
    assert isinstance(load_policy(path), RandomPolicy)
    ExpertPolicy.for_env(env).save(path)  # the next write restores order and removes the leftovers
    assert isinstance(load_policy(path, env=env), ExpertPolicy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("settings", [{"kind": ["random"]}, {"policy": "x"}, {"policy": {"noise_std": -1}}])
def test_damaged_metadata_values_give_checkpoint_errors(env, tmp_path, settings):
    path = ExpertPolicy.for_env(env).save(tmp_path / "ck")
    meta = json.loads((path / "policy.json").read_text())
    (path / "policy.json").write_text(json.dumps({**meta, **settings}))
    with pytest.raises(CheckpointError):
        load_policy(path)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_checkpoint_gets_the_modes_the_umask_allows(tmp_path, umask):
    """The folder was 0700 (mkdtemp) and the weights 0600 (safetensors) whatever the umask: under
    umask 022 no other user could deploy the checkpoint."""
    import os
    import stat

    import torch

    old = os.umask(umask)
    try:
        path = write_checkpoint(tmp_path / "ckpt", {"kind": "test"}, {"w": torch.zeros(3)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    assert modes == {"policy.json": 0o666 & ~umask, "weights.safetensors": 0o666 & ~umask}


def test_a_flipped_bit_in_the_weights_is_refused(tmp_path):
    """safetensors checks its header, not the numbers: a flipped byte inside a tensor loaded silently."""
    import torch

    from loopsim.policies import CheckpointError, read_checkpoint

    path = write_checkpoint(tmp_path / "ckpt", {"kind": "test"}, {"w": torch.arange(8, dtype=torch.float32)})
    meta, tensors = read_checkpoint(path)
    assert len(meta["weights_sha256"]) == 64 and torch.equal(tensors["w"], torch.arange(8.0))
    data = bytearray((path / "weights.safetensors").read_bytes())
    data[-3] ^= 0x01  # inside the last float
    (path / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged: its sha256 differs from the one policy.json records"):
        read_checkpoint(path)


def test_a_missing_weights_file_is_named(tmp_path):
    """It was a 40-key "Missing key(s) in state_dict" dump, though policy.json records the weights."""
    import torch

    from loopsim.policies import CheckpointError, read_checkpoint

    path = write_checkpoint(tmp_path / "ckpt", {"kind": "test"}, {"w": torch.zeros(2)})
    (path / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"weights.safetensors is missing \(policy.json records"):
        read_checkpoint(path)
