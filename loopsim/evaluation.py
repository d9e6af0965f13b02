"""Run scripted experts (and, later, policies) at a site and summarise how they did."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from loopsim.envs import env_class, make_expert

__all__ = ["EpisodeResult", "SiteSummary", "run_expert", "wilson_interval"]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a success probability.

    Source: E. B. Wilson (1927), "Probable inference, the law of succession, and statistical
    inference", JASA 22(158); the interval recommended for binomial proportions by Brown, Cai &
    DasGupta (2001), "Interval estimation for a binomial proportion", Statistical Science 16(2).

    Args:
        successes: Number of successes, ``0 <= successes <= n``.
        n: Number of trials, ``n >= 1``.
        z: Standard-normal quantile (1.96 for a 95% interval).

    Returns:
        ``(low, high)`` bounds in ``[0, 1]``.

    Raises:
        ValueError: If ``n < 1`` or ``successes`` is outside ``[0, n]``.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got successes={successes}, n={n}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class EpisodeResult:
    """Outcome of one episode.

    Attributes:
        seed: The ``reset`` seed.
        success: ``info["is_success"]`` at the last step.
        failure_mode: ``info["failure_mode"]`` at the last step (``None`` after a success).
        episode_return: Sum of rewards.
        length: Number of steps.
        site_params: The site parameters sampled for the episode.
    """

    seed: int
    success: bool
    failure_mode: str | None
    episode_return: float
    length: int
    site_params: Mapping[str, float | int]


@dataclass
class SiteSummary:
    """Aggregate of the episodes run at one site.

    Attributes:
        env_id: The env id.
        site: The site name.
        episodes: One result per episode, in seed order.
    """

    env_id: str
    site: str
    episodes: list[EpisodeResult] = field(default_factory=list)

    @property
    def n(self) -> int:
        """Number of episodes."""
        return len(self.episodes)

    @property
    def success_rate(self) -> float:
        """Fraction of successful episodes."""
        return sum(e.success for e in self.episodes) / self.n

    @property
    def success_ci(self) -> tuple[float, float]:
        """95% Wilson interval of the success rate."""
        return wilson_interval(sum(e.success for e in self.episodes), self.n)

    @property
    def mean_return(self) -> float:
        """Mean episode return."""
        return float(np.mean([e.episode_return for e in self.episodes]))

    @property
    def mean_length(self) -> float:
        """Mean episode length [control steps]."""
        return float(np.mean([e.length for e in self.episodes]))

    @property
    def failure_modes(self) -> dict[str, int]:
        """Count of each failure mode among failed episodes, most common first."""
        return dict(
            Counter(e.failure_mode or "unknown" for e in self.episodes if not e.success).most_common()
        )


def run_expert(
    env_id: str,
    site: str | Mapping[str, Any] = "lab",
    episodes: int = 20,
    seed: int = 0,
    noise_std: float = 0.0,
    env_kwargs: Mapping[str, Any] | None = None,
    on_episode: Callable[[EpisodeResult], None] | None = None,
    wrap: Callable[[gym.Env], gym.Env] | None = None,
) -> SiteSummary:
    """Run a task's scripted expert for ``episodes`` episodes at one site.

    Episode ``i`` is reset with seed ``seed + i`` (the same seeds at every site, so sites are
    compared on the same initial states), and the expert's noise generator is seeded with it too.

    Args:
        env_id: A registered loopsim env id.
        site: Site name or inline mapping.
        episodes: Number of episodes (>= 1).
        seed: First episode seed (>= 0).
        noise_std: Expert action noise std (action units).
        env_kwargs: Extra keyword arguments for ``gymnasium.make``.
        on_episode: Called with each finished episode (e.g. to advance a progress bar).
        wrap: Applied to the env before the episodes run (e.g. an episode recorder,
            :class:`loopsim.datasets.RecordEpisodes`); the expert still acts on the env underneath.

    Returns:
        The per-site summary.

    Raises:
        KeyError: For an unknown env id.
        ValueError: For ``episodes < 1`` or ``seed < 0``.
        loopsim.envs.SiteError: For an unknown site.
    """
    env_class(env_id)
    if episodes < 1:
        raise ValueError(f"episodes={episodes} must be >= 1")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    env = gym.make(env_id, site=site, **dict(env_kwargs or {}))
    if wrap is not None:
        try:
            env = wrap(env)
        except BaseException:
            env.close()
            raise
    try:
        expert = make_expert(env, noise_std=noise_std, seed=seed)
        summary = SiteSummary(env_id, env.unwrapped.site.name)
        for i in range(episodes):
            s = seed + i
            _, info = env.reset(seed=s)
            expert.reset(seed=s)
            params = info["site_params"]
            ret, length = 0.0, 0
            while True:
                _, reward, terminated, truncated, info = env.step(expert.act())
                ret += reward
                length += 1
                if terminated or truncated:
                    break
            success = bool(info["is_success"])
            # A TimeLimit wrapper (gymnasium.make(..., max_episode_steps=N)) truncates without the env's
            # failure_mode: that is a timeout too.
            failure = None if success else info.get("failure_mode", "timeout" if truncated else None)
            result = EpisodeResult(s, success, failure, ret, length, params)
            summary.episodes.append(result)
            if on_episode is not None:
                on_episode(result)
        return summary
    finally:
        env.close()
