"""Run a policy for many episodes: evaluation with confidence intervals, and collection into a store.

One episode is a pure function of (policy, env id and kwargs, site, seed): the env is reset with the
seed, the policy's own randomness is reseeded with it (:meth:`~loopsim.policies.BasePolicy.reset`,
and torch's generator inside :func:`torch.random.fork_rng` for stochastic SB3 policies), and the
policy acts until the episode terminates or is truncated. So results do not depend on how episodes
are spread over worker processes, and the same seeds give the same episodes, bit for bit.

Parallelism: ``workers > 1`` starts that many processes (``spawn``), each with its own env(s) and its
own copy of the policy (rebuilt from a checkpoint or a policy config), each running whole episodes
on its own — no lockstep between workers, so two workers give close to twice the episodes per
second (a lockstep vector env waits for its slowest sub-env at every step). Results come back in
seed order; recorded episodes are written by the calling process, in seed order, one
:meth:`~loopsim.datasets.EpisodeStore.add_episode` each (the store has one writer).
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np

from loopsim.config import (
    CheckpointPolicyConfig,
    CollectConfig,
    EnvConfig,
    ExpertPolicyConfig,
    RandomPolicyConfig,
)
from loopsim.evaluation import EpisodeResult, SiteSummary

__all__ = [
    "CollectResult",
    "EvaluationResult",
    "PolicyFactory",
    "bootstrap_ci",
    "collect",
    "evaluate_policy",
    "held_seeds",
    "make_policy",
    "run_episodes",
    "seeded_global_numpy",
]

PolicySpec = ExpertPolicyConfig | RandomPolicyConfig | CheckpointPolicyConfig


@runtime_checkable
class PolicyFactory(Protocol):
    """A picklable recipe for a policy that each worker process builds for itself.

    For policies that cannot be written to a loopsim checkpoint (a user's SB3 ``.zip`` model, a Python
    callable): :func:`make_policy` calls :meth:`make_policy` in every process, with its env.
    """

    def make_policy(self, env: gym.Env) -> Any:
        """The policy, bound to ``env``."""
        ...

#: Bootstrap resamples for confidence intervals (rliable's default is 2000 for point estimates).
BOOTSTRAP_REPS = 2000


@contextmanager
def seeded_global_numpy(seed: int) -> Iterator[None]:
    """Seed NumPy's global generator for the block, then restore the caller's state.

    rliable 1.2's ``StratifiedBootstrap`` draws its indices from NumPy's *global* generator and ignores
    ``random_state``, so every rliable call that resamples runs inside this block; the caller's own
    global draws are left as they were. Also silences arch's ``FutureWarning`` that ``random_state``
    will become a NumPy ``Generator``.

    Args:
        seed: Seed of the block's draws (the same seed gives the same intervals).
    """
    saved = np.random.get_state()  # noqa: NPY002 - see above
    try:
        np.random.seed(seed)  # noqa: NPY002
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        np.random.set_state(saved)  # noqa: NPY002


def bootstrap_ci(
    values: Sequence[float], seed: int = 0, reps: int = BOOTSTRAP_REPS, size: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a mean, with rliable.

    Source: R. Agarwal et al. (2021), "Deep Reinforcement Learning at the Edge of the Statistical
    Precipice", NeurIPS — ``rliable.library.get_interval_estimates`` (percentile method) with the
    episodes as runs of a single task.

    Args:
        values: ``(N,)`` per-episode values (1.0/0.0 for success, returns...), ``N >= 1``.
        seed: Seed of the resampling (the same values and seed give the same interval).
        reps: Number of bootstrap resamples.
        size: Interval size (0.95 for 95%).

    Returns:
        ``(low, high)``; ``(v, v)`` when all values are equal.

    Raises:
        ValueError: If ``values`` is empty or not finite.
    """
    from rliable import library as rly

    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"bootstrap_ci needs >= 1 finite value, got {x.size} values")
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    with seeded_global_numpy(seed):
        _, cis = rly.get_interval_estimates(
            {"x": x[:, None]},
            lambda s: np.array([np.mean(s)]),
            reps=reps,
            confidence_interval_size=size,
            random_state=np.random.RandomState(seed),
        )
    low, high = cis["x"][:, 0]
    return float(low), float(high)


@dataclass
class EvaluationResult(SiteSummary):
    """A :class:`~loopsim.evaluation.SiteSummary` whose intervals are 95% bootstrap intervals.

    Attributes:
        env_id: The env id.
        site: The site name.
        episodes: One :class:`~loopsim.evaluation.EpisodeResult` per episode, in seed order.
        ci_seed: Seed of the bootstrap resampling.
    """

    ci_seed: int = 0

    @property
    def success_ci(self) -> tuple[float, float]:
        """95% percentile-bootstrap interval of the success rate (rliable)."""
        return bootstrap_ci([float(e.success) for e in self.episodes], seed=self.ci_seed)

    @property
    def return_ci(self) -> tuple[float, float]:
        """95% percentile-bootstrap interval of the mean return (rliable)."""
        return bootstrap_ci([e.episode_return for e in self.episodes], seed=self.ci_seed)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary: counts, rates, intervals, failure modes and per-episode results."""
        return {
            "env_id": self.env_id,
            "site": self.site,
            "episodes": self.n,
            "success_rate": self.success_rate,
            "success_ci": list(self.success_ci),
            "mean_return": self.mean_return,
            "return_ci": list(self.return_ci),
            "mean_length": self.mean_length,
            "failure_modes": self.failure_modes,
            "per_episode": [
                {
                    "seed": e.seed,
                    "success": e.success,
                    "failure_mode": e.failure_mode,
                    "return": e.episode_return,
                    "length": e.length,
                }
                for e in self.episodes
            ],
        }


# ============================================================================================ policies
def make_policy(spec: Any, env: gym.Env) -> Any:
    """Build the policy a spec names, bound to ``env`` where it needs privileged state.

    Args:
        spec: A policy config (``expert``, ``random``, ``checkpoint``), a checkpoint path, a
            :class:`PolicyFactory` (its ``make_policy(env)``), or a policy object (returned as is,
            bound to ``env`` if it has ``bind``).
        env: The env the policy acts in.

    Returns:
        A :class:`~loopsim.policies.BasePolicy` (or the given object).

    Raises:
        loopsim.policies.CheckpointError: For a path that is not a usable checkpoint.
    """
    from loopsim.policies import ExpertPolicy, RandomPolicy, load_policy

    if isinstance(spec, ExpertPolicyConfig):
        return ExpertPolicy.for_env(env, noise_std=spec.noise_std)
    if isinstance(spec, RandomPolicyConfig):
        return RandomPolicy(env.observation_space, env.action_space)
    if isinstance(spec, CheckpointPolicyConfig):
        return load_policy(spec.path, env=env)
    if isinstance(spec, str | os.PathLike):
        return load_policy(spec, env=env)
    if isinstance(spec, PolicyFactory):
        return spec.make_policy(env)
    if hasattr(spec, "bind"):
        spec.bind(env)
    return spec


def _space_str(space: gym.Space) -> str:
    if isinstance(space, gym.spaces.Dict):
        return "Dict(" + ", ".join(f"{k}: {_space_str(v)}" for k, v in space.spaces.items()) + ")"
    return f"{type(space).__name__}{tuple(space.shape or ())} {space.dtype}"


def _same_shapes(a: gym.Space, b: gym.Space) -> bool:
    if isinstance(a, gym.spaces.Dict) or isinstance(b, gym.spaces.Dict):
        return (
            isinstance(a, gym.spaces.Dict)
            and isinstance(b, gym.spaces.Dict)
            and set(a.spaces) == set(b.spaces)
            and all(_same_shapes(a[k], b[k]) for k in a.spaces)
        )
    return type(a) is type(b) and tuple(a.shape or ()) == tuple(b.shape or ()) and a.dtype == b.dtype


def check_policy(spec: Any, env: EnvConfig, site: str | Mapping[str, Any] | None = None) -> None:
    """Build the policy once against the env and check that it fits, before any work.

    Args:
        spec: A policy config, a checkpoint path, or a policy object.
        env: The env config.
        site: The site to build the env at (default ``env.site``).

    Raises:
        loopsim.config.ConfigError: If the checkpoint cannot be loaded, was trained on another env id
            (recorded in its config), or the policy's observation or action space does not have the
            env's shapes and dtypes (both are named).
    """
    from loopsim.config import ConfigError
    from loopsim.policies import CheckpointError

    probe = env.make(site=site)
    try:
        try:
            policy = make_policy(spec, probe)
        except CheckpointError as exc:
            raise ConfigError(f"policy: {exc}") from None
        recorded = getattr(policy, "config", None)
        env_section = recorded.get("env") if isinstance(recorded, dict) else None
        trained_on = env_section.get("id") if isinstance(env_section, dict) else None
        if trained_on is not None and isinstance(spec, CheckpointPolicyConfig | str | os.PathLike):
            if str(trained_on).rsplit(":", 1)[-1] != env.id.rsplit(":", 1)[-1]:  # "module:id" form too
                raise ConfigError(
                    f"policy {getattr(spec, 'path', spec)} was trained on {trained_on}, but the env is "
                    f"{env.id}; deploy it on the env it was trained on (same-shaped observations of another "
                    "task mean something else)"
                )
        for what in ("observation_space", "action_space"):
            theirs, ours = getattr(policy, what, None), getattr(probe, what)
            if theirs is not None and not _same_shapes(theirs, ours):
                name = (
                    getattr(spec, "path", spec)
                    if isinstance(spec, CheckpointPolicyConfig | str | os.PathLike)
                    else getattr(spec, "path", None) or type(spec).__name__  # e.g. a user's SB3 .zip
                )
                raise ConfigError(
                    f"policy {name} expects {what.split('_')[0]}s {_space_str(theirs)}, but {env.id} with "
                    f"kwargs {env.kwargs} gives {_space_str(ours)} (was it trained with another obs_mode, "
                    "image_size or block_gripper?)"
                )
    finally:
        probe.close()


def _policy_id(spec: Any) -> str:
    if isinstance(spec, CheckpointPolicyConfig | str | os.PathLike):
        path = Path(getattr(spec, "path", spec)).resolve()
        return path.parent.name if path.name == "checkpoint" else path.name
    return getattr(spec, "type", None) or getattr(spec, "kind", "") or type(spec).__name__


def _run_one(env: gym.Env, policy: Any, seed: int, deterministic: bool) -> EpisodeResult:
    """Run one episode from ``reset(seed=seed)`` to its end."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        observation, info = env.reset(seed=seed)
        if hasattr(policy, "reset"):
            policy.reset(seed=seed)
        params = info.get("site_params", {})
        ret, length = 0.0, 0
        while True:
            action, _ = policy.predict(observation, deterministic=deterministic)
            observation, reward, terminated, truncated, info = env.step(action)
            ret += float(reward)
            length += 1
            if terminated or truncated:
                break
    success = bool(info.get("is_success", False))
    failure = None if success else info.get("failure_mode", "timeout" if truncated else None)
    return EpisodeResult(seed, success, failure, ret, length, params)


# ====================================================================================== worker side
class _MemorySink:
    """Stands in for a store inside a worker: keeps committed episodes to send to the parent."""

    writable = True

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, step_extras: list[str]) -> None:
        self.observation_space = observation_space
        self.action_space = action_space
        self.step_extras = step_extras
        self.episodes: list[Any] = []

    def add_episode(self, episode: Any) -> int:
        self.episodes.append(episode)
        return len(self.episodes) - 1


@dataclass
class _Job:
    """Everything a worker needs (picklable)."""

    policy: Any  # a policy config or a checkpoint path
    env: dict[str, Any]  # EnvConfig.model_dump()
    deterministic: bool
    record: list[str] | None = None  # step extras when recording, else None
    policy_id: str = ""
    policy_version: str = ""
    iteration: int = 0
    tags: dict[str, Any] = field(default_factory=dict)
    intervention: dict[str, Any] | None = None  # ExpertIntervention kwargs, or None


class _Runner:
    """Envs (one per site, made on first use), the policy, and the recorder of one process."""

    def __init__(self, job: _Job, policy: Any = None) -> None:
        self.job = job
        self.env_config = EnvConfig.model_validate(job.env)
        self._given_policy = policy
        self._envs: dict[str, tuple[gym.Env, Any, Any]] = {}

    def _site_key(self, site: Any) -> str:
        import json

        return site if isinstance(site, str) else json.dumps(site, sort_keys=True)

    def env(self, site: Any) -> tuple[gym.Env, Any, Any]:
        key = self._site_key(site)
        if key not in self._envs:
            from loopsim.datasets import RecordEpisodes
            from loopsim.envs import ExpertActionInfo

            env = self.env_config.make(site=site)
            if self.job.intervention is not None:
                from loopsim.envs import ExpertIntervention

                env = ExpertIntervention(env, **self.job.intervention)
            sink = None
            if self.job.record is not None:
                if "expert_action" in self.job.record:
                    env = ExpertActionInfo(env)
                sink = _MemorySink(env.observation_space, env.action_space, list(self.job.record))
                env = RecordEpisodes(
                    env,
                    sink,
                    policy_id=self.job.policy_id,
                    policy_version=self.job.policy_version,
                    iteration=self.job.iteration,
                    tags=self.job.tags,
                )
            spec = self.job.policy if self._given_policy is None else self._given_policy
            policy = make_policy(spec, env)
            self._envs[key] = (env, policy, sink)
        return self._envs[key]

    def episode(self, site: Any, seed: int) -> tuple[EpisodeResult, Any]:
        env, policy, sink = self.env(site)
        result = _run_one(env, policy, seed, self.job.deterministic)
        episode = sink.episodes.pop() if sink is not None else None
        return result, episode

    def close(self) -> None:
        for env, _, _ in self._envs.values():
            env.close()
        self._envs.clear()


_RUNNER: _Runner | None = None


def _init_worker(job: _Job, parent: int) -> None:
    import signal

    _exit_with_parent(parent)

    import torch

    # Ctrl-C is the parent's to handle (it stops the pool and closes the store); workers just end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    import loopsim  # noqa: F401 - registers the env ids in the spawned process

    torch.set_num_threads(1)
    global _RUNNER
    _RUNNER = _Runner(job)


@contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back while worker processes start inside the block; deliver it after.

    A terminal's Ctrl-C goes to the whole process group, workers included. A worker only ignores
    SIGINT once its own code runs, after it has imported loopsim, torch and its pickled job (1-2 s);
    a Ctrl-C before that printed one ``KeyboardInterrupt`` traceback per worker over the parent's
    "interrupted: ... continue with ..." line (and an SB3 ``SubprocVecEnv`` worker killed by it made
    the parent's next ``recv`` an ``EOFError``: "Aborted!", no hint). Two things happen here:

    - SIGINT is blocked in this thread's signal mask. A child inherits the mask of the thread that
      starts it (``fork`` and ``execve`` keep it, POSIX; so does a forkserver started here and every
      process it forks), so workers started in the block keep a Ctrl-C pending until they ignore it
      (``signal.signal(SIGINT, SIG_IGN)`` discards it) or forever. multiprocessing's resource
      tracker is started first: starting it unblocks SIGINT in the calling thread. A forkserver that
      was already running keeps the mask it started with.
    - In the main thread, Python's SIGINT handler is replaced by one that notes the signal (another
      thread may receive it: the mask is per thread). When the block ends the previous handler is put
      back and a noted Ctrl-C is raised again (:func:`signal.raise_signal`): held, not lost; with the
      default handler that is a ``KeyboardInterrupt`` at the end of the block, so whatever the block
      made (a pool, a vector env) exists and can be shut down.

    ``ProcessPoolExecutor`` with ``spawn`` starts its processes in ``submit`` (up to ``max_workers``),
    in the calling thread: submit every task inside the block (``pool.map`` does).

    Yields:
        Nothing. Without ``signal.pthread_sigmask`` (not POSIX) the block changes nothing.
    """
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    from multiprocessing import resource_tracker

    # started here, before the block: starting it (multiprocessing does so on the first spawn or
    # forkserver start) UNBLOCKS SIGINT in the calling thread afterwards (resource_tracker.py)
    resource_tracker.ensure_running()
    noted: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    hold = main and previous not in (signal.SIG_IGN, None)
    if hold:
        signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending SIGINT is delivered here
        if hold:
            signal.signal(signal.SIGINT, previous)
            if noted:
                signal.raise_signal(signal.SIGINT)


def _exit_with_parent(parent: int) -> None:
    """End this worker within 0.5 s of its parent process dying (SIGKILL leaves no chance to stop the pool).

    Args:
        parent: The parent's process id, as the parent saw it (``os.getpid()`` there, passed with the
            job). Read here instead, after the worker's imports, it was already 1 (or a subreaper's
            pid) when the parent had died meanwhile, and the worker then waited for ever on its
            task queue (seen under load: workers left running for minutes after a killed loop).
    """
    import threading

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="loopsim-parent-watch", daemon=True).start()


def _worker_episode(task: tuple[Any, int]) -> tuple[EpisodeResult, Any]:
    assert _RUNNER is not None
    return _RUNNER.episode(*task)


# ====================================================================================== parent side
def run_episodes(
    policy: Any,
    env: EnvConfig,
    tasks: Sequence[tuple[str | Mapping[str, Any], int]],
    *,
    workers: int = 1,
    deterministic: bool = True,
    record: Sequence[str] | None = None,
    policy_id: str = "",
    policy_version: str = "",
    iteration: int = 0,
    tags: Mapping[str, Any] | None = None,
    intervention: Mapping[str, Any] | None = None,
) -> Iterator[tuple[EpisodeResult, Any]]:
    """Run one episode per ``(site, seed)`` task; yield the results in task order.

    Args:
        policy: A policy config, a checkpoint path, a :class:`PolicyFactory` (pickled to the workers,
            each builds its own policy), or a policy object (saved to a temporary checkpoint for the
            workers when ``workers > 1``).
        env: The env config (its ``site`` is ignored: each task names its site).
        tasks: ``(site, seed)`` pairs; ``site`` is a bundled site name or an inline mapping.
        workers: Processes; 1 runs in this process.
        deterministic: Passed to ``policy.predict``.
        record: When not ``None``, the step extras to record; each result then comes with its
            :class:`~loopsim.datasets.Episode` (``expert_action`` labels come from
            :class:`~loopsim.envs.ExpertActionInfo`).
        policy_id: Policy id of recorded episodes.
        policy_version: Policy version of recorded episodes.
        iteration: Loop iteration of recorded episodes.
        tags: Tags of recorded episodes.
        intervention: When given, keyword arguments of :class:`~loopsim.envs.ExpertIntervention`: the
            expert takes over when the policy strays (record the ``intervention`` extra to keep it).

    Yields:
        ``(EpisodeResult, Episode or None)`` per task, in task order.

    Raises:
        ValueError: If ``workers < 1``.
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    job = _Job(
        policy=None,
        env=env.model_dump(mode="json"),
        deterministic=deterministic,
        record=None if record is None else list(record),
        policy_id=policy_id,
        policy_version=policy_version,
        iteration=iteration,
        tags=dict(tags or {}),
        intervention=None if intervention is None else dict(intervention),
    )
    tasks = list(tasks)
    if workers == 1 or len(tasks) <= 1:
        is_spec = isinstance(policy, PolicySpec | str | os.PathLike | PolicyFactory)
        job.policy = policy if is_spec else None
        runner = _Runner(job, policy=None if is_spec else policy)
        try:
            for site, seed in tasks:
                yield runner.episode(site, seed)
        finally:
            runner.close()
        return
    with tempfile.TemporaryDirectory(prefix="loopsim-policy-") as tmp:
        if isinstance(policy, PolicySpec | str | os.PathLike | PolicyFactory):
            job.policy = policy
        else:
            job.policy = str(policy.save(Path(tmp) / "checkpoint"))
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
            initargs=(job, os.getpid()),
        ) as pool:
            try:
                with _sigint_held():  # the workers start here (see _sigint_held)
                    results = pool.map(_worker_episode, tasks)
                yield from results
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def evaluate_policy(
    policy: Any,
    env: EnvConfig,
    *,
    sites: Sequence[str | Mapping[str, Any]] | None = None,
    episodes: int = 20,
    seed: int = 0,
    workers: int = 1,
    deterministic: bool = True,
    on_episode: Callable[[EpisodeResult], None] | None = None,
) -> dict[str, EvaluationResult]:
    """Evaluate a policy at one or more sites on the same seeds.

    Episode ``i`` at every site is reset with seed ``seed + i``, so sites (and iterations of a loop)
    are compared on the same initial states.

    Args:
        policy: A policy config, a checkpoint path, or a policy object.
        env: The env config; ``sites`` default to ``[env.site]``.
        sites: Site names (or inline mappings).
        episodes: Episodes per site (>= 1).
        seed: First seed (>= 0).
        workers: Worker processes (see the module docstring).
        deterministic: Act without exploration noise.
        on_episode: Called after each episode (e.g. to advance a progress bar).

    Returns:
        ``{site name: EvaluationResult}`` in the order of ``sites`` (named as the env names them,
        :func:`loopsim.envs.site_name`: a site document by its ``name``, an inline mapping
        ``"custom"``).

    Raises:
        ValueError: If ``episodes < 1``, ``seed < 0`` or ``workers < 1``, or two different sites
            have the same name (e.g. two inline mappings: both ``"custom"``).
    """
    if episodes < 1 or seed < 0:
        raise ValueError(f"need episodes >= 1 and seed >= 0, got episodes={episodes}, seed={seed}")
    sites = [env.site] if sites is None else list(sites)
    unique: list[Any] = []
    for site in sites:  # a repeated site is evaluated once
        if site not in unique:
            unique.append(site)
    sites = unique
    check_policy(policy, env, site=sites[0])
    tasks = [(site, seed + i) for site in sites for i in range(episodes)]
    results: dict[str, EvaluationResult] = {}
    from loopsim.envs.core.site import site_name

    names = [site_name(s) for s in sites]
    shared = sorted({n for n in names if names.count(n) > 1})
    if shared:  # their episodes would be pooled into one row
        raise ValueError(f"sites {shared} name more than one site (an inline mapping is named 'custom'); "
                         "give each its own name with a site document {name, params}")
    for k, (result, _) in enumerate(
        run_episodes(policy, env, tasks, workers=workers, deterministic=deterministic)
    ):
        name = names[k // episodes]
        results.setdefault(name, EvaluationResult(env.id, name, ci_seed=seed)).episodes.append(result)
        if on_episode is not None:
            on_episode(result)
    return results


# ============================================================================================ collect
@dataclass
class CollectResult:
    """What :func:`collect` did.

    Attributes:
        store: The store's URL.
        summary: The collected episodes' results (bootstrap intervals).
        stored_before: Episodes in the store before the job.
        stored_after: Episodes in the store after it.
    """

    store: str
    summary: EvaluationResult
    stored_before: int
    stored_after: int


def held_seeds(store: Any, sites: Sequence[str], seeds: range) -> tuple[list[int], int]:
    """Which of ``seeds`` a store already holds at any of ``sites``, for refusing an append.

    Args:
        store: An open :class:`~loopsim.datasets.EpisodeStore`.
        sites: Site names (as recorded: :func:`loopsim.envs.site_name`).
        seeds: The seeds a job would run at each of those sites.

    Returns:
        ``(sorted seeds held, the seed after the largest one held at those sites)``; ``([], ...)`` if
        the job duplicates nothing.
    """
    meta = store.metadata()
    names = set(sites)
    here = {int(sd) for st, sd in zip(meta["site"], meta["seed"], strict=True) if st in names and sd >= 0}
    return sorted(sd for sd in here if sd in seeds), max(here, default=-1) + 1


def collect(
    config: CollectConfig, on_episode: Callable[[EpisodeResult], None] | None = None
) -> CollectResult:
    """Run ``config.policy`` at ``config.env.site`` for ``config.episodes`` episodes into a store.

    Episode ``i`` is reset with seed ``config.seed + i``. The store is created (``mode: create``),
    appended to (``append``: it must hold episodes of the same env with the same spaces and step
    extras) or replaced (``overwrite``). Every finished episode is committed at once, in seed order,
    so an interrupted job keeps every episode committed before the interruption.

    Args:
        config: The collect config.
        on_episode: Called after each episode.

    Returns:
        A :class:`CollectResult`.

    Raises:
        loopsim.config.ConfigError: If the env/site cannot be built, or the store cannot take these
            episodes (exists with ``mode: create``; missing or of another env with ``append``).
        loopsim.datasets.StoreError: If the store is locked by another writer, damaged or newer.
    """
    from loopsim.config import ConfigError, check_env_config
    from loopsim.datasets import EpisodeStore
    from loopsim.envs import env_kwargs_with_defaults
    from loopsim.envs.core.site import site_name

    check_env_config(config.env)
    extras = ["is_success"] + (["expert_action"] if config.expert_labels else [])
    probe = config.env.make()
    obs_space, act_space = probe.observation_space, probe.action_space
    probe.close()
    check_policy(config.policy, config.env)
    if config.mode == "append":
        try:
            store = EpisodeStore.open(config.store, mode="a")
        except FileNotFoundError:
            raise ConfigError(f"store = {config.store!r}: mode 'append' needs an existing store") from None
        problem = None
        if store.env_id != config.env.id:
            problem = f"holds episodes of {store.env_id!r}, not {config.env.id!r}"
        elif set(store.step_extras) != set(extras):
            problem = f"has step extras {store.step_extras}, this job records {sorted(extras)}"
        elif not (
            _same_shapes(store.observation_space, obs_space) and _same_shapes(store.action_space, act_space)
        ):
            problem = (
                f"has observations {_space_str(store.observation_space)} and actions "
                f"{_space_str(store.action_space)}; the env gives {_space_str(obs_space)} and "
                f"{_space_str(act_space)}"
            )
        elif env_kwargs_with_defaults(config.env.id, store.env_kwargs) != env_kwargs_with_defaults(
            config.env.id, config.env.kwargs
        ):  # the same env either way: {} and {"obs_mode": "state"} alike
            problem = f"was recorded with env kwargs {store.env_kwargs}, this job uses {config.env.kwargs}"
        else:
            at = site_name(config.env.site)
            overlap, nxt = held_seeds(store, [at], range(config.seed, config.seed + config.episodes))
            if overlap:
                problem = (
                    f"already holds {len(overlap)} episodes of these seeds at {at!r} (e.g. seed "
                    f"{overlap[0]}): they would be duplicated; continue with seed={nxt}"
                )
        if problem:
            store.close()
            raise ConfigError(f"store = {config.store!r}: cannot append: the store {problem}")
    else:
        try:
            store = EpisodeStore.create(
                config.store,
                observation_space=obs_space,
                action_space=act_space,
                env_id=config.env.id,
                env_kwargs=config.env.kwargs,
                step_extras=extras,
                overwrite=config.mode == "overwrite",
                attrs={"collect_config": config.model_dump(mode="json")},
            )
        except FileExistsError:
            raise ConfigError(
                f"store = {config.store!r} already exists; use mode=append or mode=overwrite, or another path"
            ) from None
    policy_id = config.policy_id or _policy_id(config.policy)
    with store:
        before = len(store)
        summary = EvaluationResult(config.env.id, site_name(config.env.site), ci_seed=config.seed)
        tasks = [(config.env.site, config.seed + i) for i in range(config.episodes)]
        for result, episode in run_episodes(
            config.policy,
            config.env,
            tasks,
            workers=config.workers,
            deterministic=config.deterministic,
            record=extras,
            policy_id=policy_id,
            iteration=config.iteration,
            tags=config.tags,
        ):
            store.add_episode(episode)
            summary.episodes.append(result)
            if on_episode is not None:
                on_episode(result)
        after = len(store)
    return CollectResult(str(config.store), summary, before, after)
