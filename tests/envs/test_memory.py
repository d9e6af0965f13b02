"""Memory stays flat over many resets and many make/close cycles (RSS, measured in a fresh process)."""

from __future__ import annotations

import pytest

LIMIT_MB = 4.0

_SCRIPT = r"""
import gc, json, sys
import gymnasium as gym
import numpy as np
import psutil
import loopsim
from loopsim.envs import env_class

env_id, mode, warmup, n, obs_mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
proc = psutil.Process()

try:  # glibc: hand freed heap memory back to the OS before reading RSS (see _growth)
    import ctypes
    malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    malloc_trim = lambda pad: 0

def rss_mb():
    gc.collect()
    malloc_trim(0)
    return proc.memory_info().rss / 2**20

zero = np.zeros(env_class(env_id).action_dim, dtype=np.float32)
domain = env_class(env_id).site_schema.domain
sites = {"factory": ("noisy_sensors", "fast_conveyor"), "warehouse": ("noisy_lidar", "heavy_traffic")}
noisy, other = sites[domain]
samples = []
if mode == "resets":
    env = gym.make(env_id, obs_mode=obs_mode, site=noisy)
    def cycle(i):
        env.reset(seed=i)
        if i % 10 == 0:
            env.step(zero)
else:
    def cycle(i):
        e = gym.make(env_id, obs_mode=obs_mode, site=other, render_mode="rgb_array", render_size=32)
        e.reset(seed=i)
        e.step(zero)
        e.render()
        e.close()
for i in range(warmup):
    cycle(i)
samples.append(rss_mb())
for k in range(5):
    for i in range(n // 5):
        cycle(warmup + k * (n // 5) + i)
    samples.append(rss_mb())
print(json.dumps(samples))
"""


def _growth(run_python, env_id, mode, warmup, n, obs_mode="state"):
    """RSS growth over the last four fifths of the cycles [MB], and all six samples.

    RSS is read after ``gc.collect()`` and glibc's ``malloc_trim(0)``, so memory that was freed but
    kept by the allocator does not count. Without the trim, RSS of WarehouseCartPush rgb make/close
    cycles toggled between 50.9 and 79.7 MB (up at cycles 25, 300-375, 500-525, 600-675, 775 of 800;
    down in between): a ~29 MB block freed every cycle and sometimes left at the top of the heap, not
    a leak; with the trim the same 800 cycles read 49.9-50.2 MB throughout (measured 2026-11-30).
    The first fifth still extends the warm-up (caches filled once). A leak grows with every block,
    so it shows in the later four fifths.
    """
    samples = run_python(_SCRIPT, env_id, mode, str(warmup), str(n), obs_mode, timeout=1200)
    return samples[-1] - samples[1], samples


def test_rss_flat_over_resets(env_id, run_python):
    # Every reset after the first rebuilds the physics world (~7-10 ms of CPU): 300 resets are 300
    # worlds built and freed (~3 s); growth is taken over the last 240, so a leak of 17 kB per world
    # exceeds the limit.
    growth, samples = _growth(run_python, env_id, "resets", 60, 300)
    assert growth < LIMIT_MB, f"RSS grew {growth:.2f} MB over 300 resets: {samples}"


def test_rss_flat_over_make_close(env_id, run_python):
    growth, samples = _growth(run_python, env_id, "make_close", 20, 80)
    assert growth < LIMIT_MB, f"RSS grew {growth:.2f} MB over 80 make/close cycles: {samples}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
# Each reset builds and frees a whole physics world (~20 ms), so 2000 + 1000 + 1000 resets per env
# exercise far more allocation than the 10000 snapshot restores these counts once were, in a third of
# the time (the slow suite runs them for all five envs).
@pytest.mark.parametrize(("obs_mode", "n"), [("state", 2000), ("goal", 1000), ("rgb", 1000)])
def test_rss_flat_over_many_resets(env_id, run_python, obs_mode, n):
    growth, samples = _growth(run_python, env_id, "resets", 300, n, obs_mode)
    assert growth < LIMIT_MB, f"RSS grew {growth:.2f} MB over {n} resets: {samples}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("obs_mode", ["state", "rgb"])
def test_rss_flat_over_many_make_close(env_id, run_python, obs_mode):
    growth, samples = _growth(run_python, env_id, "make_close", 50, 500, obs_mode)
    assert growth < LIMIT_MB, f"RSS grew {growth:.2f} MB over 500 make/close cycles: {samples}"
