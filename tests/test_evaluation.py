"""Expert evaluation and its confidence intervals."""

from __future__ import annotations

import pytest

from loopsim.envs import SiteError
from loopsim.evaluation import run_expert, wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Reference values: Brown, Cai & DasGupta (2001), and statsmodels proportion_confint(method="wilson").
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (5, 10, 0.2366, 0.7634),
        (81, 263, 0.2553, 0.3662),
    ],
)
def test_wilson_interval_matches_reference_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)


@pytest.mark.parametrize(("k", "n"), [(1, 0), (-1, 5), (6, 5)])
def test_wilson_interval_refuses_impossible_counts(k, n):
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(k, n)


def test_run_expert_uses_consecutive_seeds_and_is_reproducible():
    a = run_expert("loopsim/FactoryPegInsert-v0", "heavy_slippery", episodes=3, seed=5)
    b = run_expert("loopsim/FactoryPegInsert-v0", "heavy_slippery", episodes=3, seed=5)
    assert [e.seed for e in a.episodes] == [5, 6, 7]
    assert a.episodes == b.episodes
    assert a.site == "heavy_slippery"
    masses = [e.site_params["part_mass"] for e in a.episodes]
    assert all(0.5 <= m <= 1.0 for m in masses) and len(set(masses)) == 3
    assert 0.0 <= a.success_rate <= 1.0 and a.mean_length > 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"episodes": 0}, ValueError), ({"seed": -1}, ValueError), ({"site": "moon"}, SiteError)],
)
def test_run_expert_refuses_bad_arguments(kwargs, error):
    with pytest.raises(error):
        run_expert("loopsim/FactoryPickPlace-v0", **{"episodes": 1, **kwargs})


def test_run_expert_refuses_unknown_env():
    with pytest.raises(KeyError, match="unknown env id"):
        run_expert("loopsim/Nope-v0")
