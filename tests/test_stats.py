"""The paired bootstrap of spaceevo.stats on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from spaceevo.errors import UsageError
from spaceevo.stats import paired_bootstrap


def test_identical_predictions_give_a_zero_interval() -> None:
    result = paired_bootstrap(np.zeros((3, 500)), resamples=200)
    assert (result.mean, result.low, result.high) == (0.0, 0.0, 0.0)
    assert (result.seeds, result.images, result.resamples) == (3, 500, 200)


def test_a_constant_gain_is_its_own_interval() -> None:
    result = paired_bootstrap(np.full((2, 300), 1.5), resamples=200)
    assert result.mean == pytest.approx(1.5) and result.low == result.mean == result.high


def test_interval_contains_the_mean_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, 0.0, 1.0], p=[0.1, 0.75, 0.15], size=(3, 2000))
    first, again = paired_bootstrap(d, seed=4, resamples=2000), paired_bootstrap(d, seed=4, resamples=2000)
    assert first == again
    assert first.low < first.mean < first.high
    # images only: about sqrt(var / n) = sqrt(0.2475 / 6000) = 0.0064 per side standard error
    assert 0.9 * 1.96 * 0.0064 < (first.high - first.low) / 2 < 3 * 1.96 * 0.0064


def test_one_row_is_an_image_only_bootstrap() -> None:
    d = np.r_[np.ones(30), np.zeros(70)]  # a gain of 0.3 on 100 images: binomial SE 0.0458
    result = paired_bootstrap(d, resamples=4000)
    assert result.seeds == 1 and result.mean == pytest.approx(0.3)
    assert result.high - result.low == pytest.approx(2 * 1.96 * 0.0458, rel=0.15)


def test_seed_variation_widens_the_interval() -> None:
    rng = np.random.default_rng(2)
    base = rng.choice([-1.0, 0.0, 1.0], p=[0.1, 0.75, 0.15], size=2000)
    same = paired_bootstrap(np.stack([base, base, base]), resamples=2000)
    shifted = paired_bootstrap(np.stack([base - 0.2, base, base + 0.2]), resamples=2000)
    assert shifted.mean == pytest.approx(same.mean)
    assert shifted.high - shifted.low > 1.5 * (same.high - same.low)


def test_coverage_of_a_known_mean_is_near_95_percent() -> None:
    """Paired Bernoulli differences with a true mean of 0.05: ~95 % of the intervals contain it."""
    rng = np.random.default_rng(3)
    trials, covered = 300, 0
    for trial in range(trials):
        d = rng.choice([-1.0, 0.0, 1.0], p=[0.10, 0.75, 0.15], size=400)
        result = paired_bootstrap(d, resamples=500, seed=trial)
        covered += result.low <= 0.05 <= result.high
    assert 0.90 <= covered / trials <= 0.99


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.zeros((2, 0)), np.zeros((2, 2, 2)), np.array([np.nan, 1.0])])
def test_malformed_differences_are_usage_errors(bad: np.ndarray) -> None:
    with pytest.raises(UsageError):
        paired_bootstrap(bad)
