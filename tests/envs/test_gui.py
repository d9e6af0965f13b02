"""``render_mode="human"`` (the PyBullet GUI) on a real X display: Debian's Xvfb, a virtual screen.

The refusals without a usable display are in ``test_misuse.py``; these tests run the success path,
which no test reached before: GUI episodes equal DIRECT ones bit for bit, a second GUI in one process
is a clear error (PyBullet allows one), a GUI opens again after ``close()``, and ``loopsim replay
--gui`` replays an episode on screen. Each check runs in a subprocess under ``xvfb-run`` (PyBullet's
GUI is process-wide), whose X server resets when its last client leaves, as a bare X server does:
the display probe once closed its connection just before PyBullet connected, and PyBullet, refused
during the reset, exited the process (2-3 runs in 12).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from loopsim.config import CollectConfig, EnvConfig
from loopsim.rollout import collect

pytestmark = pytest.mark.skipif(
    shutil.which("xvfb-run") is None, reason="needs Debian's xvfb (.ci/run installs it)"
)


def _under_xvfb(code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["xvfb-run", "-a", "-s", "-screen 0 1024x768x24", sys.executable, "-c", textwrap.dedent(code),
         *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize("env_id", ["loopsim/FactoryPickPlace-v0", "loopsim/WarehouseNavigate-v0"])
def test_gui_episodes_equal_direct_ones_and_a_second_gui_is_a_clear_error(env_id):
    out = _under_xvfb("""
        import sys, gymnasium as gym, numpy as np, loopsim
        env_id = sys.argv[1]
        gui = gym.make(env_id, render_mode="human")
        direct = gym.make(env_id)
        assert gui.unwrapped.sim.gui and not direct.unwrapped.sim.gui
        actions = np.random.default_rng(3).uniform(-1, 1, (40, *gui.action_space.shape))
        for env in (gui, direct):
            obs, _ = env.reset(seed=11)
            trace = [obs]
            for a in actions.astype(np.float32):
                trace.append(env.step(a)[0])
            env.trace = np.stack(trace)
        assert np.array_equal(gui.trace, direct.trace), env_id
        try:
            gym.make(env_id, render_mode="human")
        except RuntimeError as exc:
            print("second:", exc)
        gui.close()
        gui.close()  # idempotent
        direct.close()
        print("same:", env_id)
        # The GUI is free again after close(), every time: the X server resets when its last client
        # leaves and refused PyBullet meanwhile, which exited the process (2-5 runs in 12 here).
        for k in range(3):
            again = gym.make(env_id, render_mode="human")
            again.reset(seed=k)
            again.step(actions[0].astype(np.float32))
            again.close()
        print("reopened")
    """, env_id)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"same: {env_id}" in out.stdout and "reopened" in out.stdout
    assert out.stdout.count('one render_mode="human" env per process: close() the other one') == 1
    # PyBullet's BulletClient.__del__ raised AttributeError after a failed connect ("Exception ignored")
    assert "Exception ignored" not in out.stderr and "AttributeError" not in out.stderr


def test_replay_gui_replays_an_episode_on_screen(tmp_path):
    store = tmp_path / "s.zarr"
    collect(CollectConfig(seed=5, env=EnvConfig(id="loopsim/FactoryPickPlace-v0", kwargs={"max_steps": 30}),
                          episodes=1, store=str(store)))
    out = _under_xvfb("""
        import sys
        from loopsim.cli import app
        sys.argv = ["loopsim", "replay", sys.argv[1], "-e", "0", "--gui"]
        app()
    """, str(store))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "episode 0: reproduced exactly (bit-identical)" in out.stdout, out.stdout
