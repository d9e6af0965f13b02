"""The Panda model loopsim generates (convex-hull meshes) collides exactly as pybullet_data's stock one."""

from __future__ import annotations

import numpy as np
import pybullet as p
import pybullet_data
import pytest

from loopsim.envs.core.panda import FINGER_JOINTS, panda_urdf_path


@pytest.fixture
def client():
    cid = p.connect(p.DIRECT)
    yield cid
    p.disconnect(cid)


def test_hull_model_has_the_stock_collision_geometry(client):
    stock = p.loadURDF(
        f"{pybullet_data.getDataPath()}/franka_panda/panda.urdf", [0, 0, 0], useFixedBase=True,
        physicsClientId=client,
    )
    # the same place as the stock arm: only queried, never stepped
    ours = p.loadURDF(panda_urdf_path(), [0, 0, 0], useFixedBase=True, physicsClientId=client)
    assert p.getNumJoints(ours, physicsClientId=client) == p.getNumJoints(stock, physicsClientId=client) == 12
    probe = p.createMultiBody(
        0.0, p.createCollisionShape(p.GEOM_SPHERE, radius=0.005, physicsClientId=client),
        physicsClientId=client,
    )
    rng = np.random.default_rng(0)
    for q in ([0.3, -0.5, 0.2, -2.0, 0.4, 1.8, 0.6], [-1.0, 0.4, 0.8, -1.2, -0.7, 2.9, -2.0]):
        for body in (stock, ours):
            for j, v in enumerate(q):
                p.resetJointState(body, j, v, physicsClientId=client)
            for j in FINGER_JOINTS:
                p.resetJointState(body, j, 0.03, physicsClientId=client)
        p.performCollisionDetection(physicsClientId=client)
        for link in range(-1, 11):
            a = np.array(p.getAABB(stock, link, physicsClientId=client))
            b = np.array(p.getAABB(ours, link, physicsClientId=client))
            np.testing.assert_array_equal(b, a)  # bit-identical bounds: the same extreme points
            # distances from probe points around the link to its surface agree (same convex shape)
            if not p.getCollisionShapeData(stock, link, physicsClientId=client):
                continue  # a frame without geometry (panda_link8)
            lo, hi = a
            for point in rng.uniform(lo - 0.02, hi + 0.02, size=(5, 3)):
                d = []
                p.resetBasePositionAndOrientation(probe, point, [0, 0, 0, 1], physicsClientId=client)
                for body in (stock, ours):
                    hits = p.getClosestPoints(probe, body, 0.5, linkIndexB=link, physicsClientId=client)
                    d.append(min(h[8] for h in hits))
                assert d[1] == pytest.approx(d[0], abs=1e-6), (link, point)


def test_model_files_are_generated_once_per_user(tmp_path):
    """A process that finds the generated files (manifest and sizes) does not regenerate them: no
    Qhull, no SciPy import (~0.6 s of start-up for every worker process otherwise)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, loopsim.envs.core.panda as p; path = p.panda_urdf_path(); "
        "print(path, 'scipy.spatial' in sys.modules)"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    (path1, generated1), (path2, generated2) = (r.stdout.split()[-2:] for r in runs)
    assert path1 == path2 and path1.startswith(str(tmp_path))
    assert generated1 == "True" and generated2 == "False"
    # Every file written atomically: the folder holds the manifest's files and nothing else.
    import json
    from pathlib import Path

    folder = Path(path1).parent
    listed = set(json.loads((folder / "manifest.json").read_text()))
    assert {p.name for p in folder.iterdir()} == listed | {"manifest.json"}


@pytest.fixture
def fresh_tmp(tmp_path, monkeypatch):
    """A temp directory of its own (sticky and world-writable, as /tmp) and no model found yet."""
    import os

    from loopsim.envs.core import panda

    tmp = tmp_path / "tmp dir ü"  # a space and a non-ASCII letter on the way, as some TMPDIRs have
    tmp.mkdir()
    os.chmod(tmp, 0o1777)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setattr(panda, "_MODEL", None)
    return tmp


def _planted_folder(tmp):
    """The shared folder's path, and the model files with a tampered URDF (a 99.9 kg base link)."""
    import os

    from loopsim.envs.core import panda

    src_dir, meshes, digest = panda._sources()
    files = panda._generate(src_dir, meshes)
    assert '<mass value="2.9"/>' in files[-1][1]
    files[-1] = ("panda.urdf", files[-1][1].replace('<mass value="2.9"/>', '<mass value="99.9"/>', 1))
    folder = tmp / f"loopsim-panda-{os.getuid()}-{digest}"
    return folder, files


def _plant(folder, files):
    import hashlib
    import json

    folder.mkdir()
    for name, text in files:
        (folder / name).write_text(text)
    entries = {n: [len(t.encode()), hashlib.sha256(t.encode()).hexdigest()] for n, t in files}
    (folder / "manifest.json").write_text(json.dumps(entries))


@pytest.mark.parametrize("how", ["world_writable", "other_user", "symlink"])
def test_model_folder_planted_by_someone_else_is_not_trusted(fresh_tmp, how):
    """The shared folder's name is predictable: a folder another user made (or could write), or a
    symlink in its place, is neither read nor written; the process generates a private model."""
    import os

    from loopsim.envs.core import panda

    folder, files = _planted_folder(fresh_tmp)
    if how == "symlink":  # pointing at a folder of the victim's: nothing may be written there
        target = fresh_tmp / "victim"
        target.mkdir()
        os.symlink(target, folder)
    else:
        _plant(folder, files)
        if how == "other_user":
            if os.getuid() != 0:
                pytest.skip("needs root to give the folder to another user")
            for path in [folder, *folder.iterdir()]:
                os.chown(path, 65534, 65534)
        else:
            os.chmod(folder, 0o777)
    with pytest.warns(RuntimeWarning, match="does not trust the Panda model"):
        path = panda.panda_urdf_path()
    assert not path.startswith(str(folder) + os.sep)
    assert os.path.dirname(os.path.dirname(path)) == str(fresh_tmp)
    st = os.stat(os.path.dirname(path))
    assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700
    assert '<mass value="99.9"/>' not in open(path).read() and '<mass value="2.9"/>' in open(path).read()
    if how == "symlink":
        assert os.listdir(fresh_tmp / "victim") == []
    assert panda.panda_urdf_path() == path  # the process keeps its private model (no new warning)


@pytest.mark.parametrize("umask", [0o000, 0o002])
def test_model_files_others_could_write_are_written_again(fresh_tmp, umask):
    """Only the folder's mode was checked: with files written under umask 000 (or 002, for the group)
    another user rewrote panda.urdf in place, manifest to match, and the next process loaded it."""
    import os
    import stat

    from loopsim.envs.core import panda

    old = os.umask(umask)
    try:
        path = panda.panda_urdf_path()  # generated under this umask
    finally:
        os.umask(old)
    folder = os.path.dirname(path)
    assert {stat.S_IMODE(os.stat(os.path.join(folder, f)).st_mode) for f in os.listdir(folder)} == {0o644}
    # the files of an earlier loopsim, or chmod'ed since, writable by others and tampered with
    tampered_folder, files = _planted_folder(fresh_tmp)
    assert str(tampered_folder) == folder
    for name, text in files:
        target = os.path.join(folder, name)
        os.unlink(target)
        with open(target, "w") as f:
            f.write(text)
        os.chmod(target, 0o666)
    import hashlib
    import json

    entries = {n: [len(t.encode()), hashlib.sha256(t.encode()).hexdigest()] for n, t in files}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        f.write(json.dumps(entries))
    os.chmod(os.path.join(folder, "manifest.json"), 0o666)
    panda._MODEL = None  # as a new process
    assert panda.panda_urdf_path() == path  # the folder is the user's own: its files are made again
    text = open(path).read()
    assert '<mass value="99.9"/>' not in text and '<mass value="2.9"/>' in text
    assert {stat.S_IMODE(os.stat(os.path.join(folder, f)).st_mode) for f in os.listdir(folder)} == {0o644}


@pytest.mark.parametrize("name", ["hull_link6.obj", "panda.urdf"])
def test_model_file_of_the_right_size_but_other_bytes_is_rewritten(fresh_tmp, name):
    """Zeros left by a crash after the rename keep the size the per-reset check looks at: a new process
    checks the digests (without it PyBullet dropped link 6's collision shape, or refused the URDF)."""
    import os

    import gymnasium as gym

    from loopsim.envs.core import panda

    path = panda.panda_urdf_path()
    target = os.path.join(os.path.dirname(path), name)
    good = open(target, "rb").read()
    with open(target, "wb") as f:
        f.write(b"\0" * len(good))
    panda._MODEL = None  # as a new process
    assert panda.panda_urdf_path() == path
    assert open(target, "rb").read() == good
    env = gym.make("loopsim/FactoryPickPlace-v0")
    try:
        env.reset(seed=0)
        body = env.unwrapped.robot.body
        shape = p.getCollisionShapeData(body, 6, physicsClientId=env.unwrapped.sim.id)
        assert shape and shape[0][2] == p.GEOM_MESH
    finally:
        env.close()


def test_no_writable_temp_directory_is_a_clear_error(tmp_path, monkeypatch):
    """Every temp directory candidate read-only (a sandbox with a read-only root): the error says what
    loopsim writes and to set TMPDIR, instead of tempfile's bare FileNotFoundError from gym.make."""
    import gymnasium as gym

    from loopsim.envs.core import panda

    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setattr("tempfile._candidate_tempdir_list", lambda: [str(tmp_path / "missing")])
    monkeypatch.setattr(panda, "_MODEL", None)
    with pytest.raises(OSError, match="Panda model.*set TMPDIR to a writable directory"):
        gym.make("loopsim/FactoryPickPlace-v0")
