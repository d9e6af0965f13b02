"""Fixtures shared by the env tests.

Every test that takes ``env_id`` runs once per id in :data:`loopsim.envs.ENV_ENTRY_POINTS`, so a new
task is covered by adding its registration line. An id whose module does not exist yet is skipped here
(``test_registration.py::test_entry_point_imports`` fails for it instead, so the gap stays visible).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import gymnasium as gym
import pytest

import loopsim  # noqa: F401  (registers the env ids)
from loopsim.envs import ENV_ENTRY_POINTS, env_class

ENV_IDS = sorted(ENV_ENTRY_POINTS)
HELPERS_PATH = Path(__file__).with_name("_helpers.py")


def _load_helpers() -> ModuleType:
    # --import-mode=importlib: test modules cannot import siblings, so load the helper file by path.
    spec = importlib.util.spec_from_file_location("loopsim_env_test_helpers", HELPERS_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


_HELPERS = _load_helpers()


def skip_if_module_missing(env_id: str) -> None:
    """Skip the calling test when the module behind ``env_id`` does not exist (yet)."""
    module = ENV_ENTRY_POINTS[env_id].partition(":")[0]
    try:
        env_class(env_id)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            pytest.skip(f"{env_id}: module {module} does not exist yet")
        raise


@pytest.fixture(params=ENV_IDS)
def env_id(request: pytest.FixtureRequest) -> str:
    """Every registered loopsim env id."""
    skip_if_module_missing(request.param)
    return request.param


@pytest.fixture(params=[i for i in ENV_IDS if i.startswith("loopsim/Factory")])
def factory_env_id(request: pytest.FixtureRequest) -> str:
    """Every registered factory env id (for test modules written for the factory tasks)."""
    skip_if_module_missing(request.param)
    return request.param


@pytest.fixture
def helpers() -> ModuleType:
    """The module ``_helpers.py`` (rollouts, comparisons, digests, scripted policies)."""
    return _HELPERS


@pytest.fixture
def make_env() -> Iterator[Callable[..., gym.Env]]:
    """``make_env(env_id, **kwargs)``: ``gymnasium.make`` whose envs are closed after the test."""
    envs: list[gym.Env] = []

    def make(env_id: str, **kwargs: Any) -> gym.Env:
        env = gym.make(env_id, **kwargs)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


@pytest.fixture
def run_python(tmp_path: Path) -> Callable[..., Any]:
    """``run_python(code_or_path, *args, procs=1, env=None)``: run Python in fresh interpreters, return JSON.

    Each child runs in ``tmp_path`` (so the repository's top-level folders cannot shadow the installed
    package), must print one JSON document as its last line of stdout, and fails the test on a non-zero
    exit status. With ``procs > 1`` that many identical children run concurrently and a list of their
    outputs is returned. ``env`` adds (or overrides) environment variables of the children.
    """

    def run(
        code: str | Path,
        *args: str,
        timeout: float = 300.0,
        procs: int = 1,
        env: dict[str, str] | None = None,
    ) -> Any:
        cmd = [sys.executable, str(code)] if isinstance(code, Path) else [sys.executable, "-c", code]
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **(env or {})}
        children = [
            subprocess.Popen(
                [*cmd, *args], cwd=tmp_path, env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            for _ in range(procs)
        ]
        outputs = []
        for child in children:
            try:
                stdout, stderr = child.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for c in children:
                    c.kill()
                raise
            assert child.returncode == 0, f"child failed ({child.returncode}):\n{stdout}\n{stderr}"
            lines = [line for line in stdout.splitlines() if line.strip()]
            assert lines, f"child printed nothing; stderr:\n{stderr}"
            outputs.append(json.loads(lines[-1]))
        return outputs[0] if procs == 1 else outputs

    return run
