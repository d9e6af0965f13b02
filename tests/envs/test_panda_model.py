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
