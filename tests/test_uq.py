"""Interval metrics and conformal calibration against known distributions."""

import numpy as np
import pytest
from scipy.stats import norm

from twin_ml.uq import conformal_scale, coverage, crps_gaussian, interval_report, nll_gaussian

pytestmark = pytest.mark.numeric  # also run in `make test-portable`


def test_coverage_of_a_true_gaussian_is_nominal():
    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=(200, 50, 2)), rng.uniform(0.5, 2.0, size=(200, 50, 2))
    y = mean + std * rng.standard_normal(mean.shape)
    for level in (0.5, 0.9, 0.95):
        assert abs(coverage(y, mean, std, level) - level) < 0.01
    assert abs(nll_gaussian(y, mean, std) - np.mean(norm.logpdf(y, mean, std)) * -1) < 1e-9


def test_conformal_scale_recovers_an_underestimated_std():
    rng = np.random.default_rng(1)
    mean = np.zeros((400, 30, 1))
    y = 3.0 * rng.standard_normal(mean.shape)
    s = conformal_scale(y, mean, np.ones_like(mean), 0.9)  # the model claims std 1, the truth is 3
    assert abs(s[0] - 3.0) < 0.1
    y2 = 3.0 * rng.standard_normal(mean.shape)  # fresh data: calibrated intervals cover
    assert abs(coverage(y2, mean, s * np.ones_like(mean), 0.9) - 0.9) < 0.01


def test_crps_matches_its_monte_carlo_definition():
    rng = np.random.default_rng(2)
    y, mu, sd = 0.7, 0.1, 1.3
    a, b = rng.normal(mu, sd, 400_000), rng.normal(mu, sd, 400_000)
    mc = np.mean(np.abs(a - y)) - 0.5 * np.mean(np.abs(a - b))  # E|X-y| - E|X-X'|/2
    assert crps_gaussian(np.array(y), np.array(mu), np.array(sd)) == pytest.approx(mc, abs=5e-3)


def test_report_has_every_level():
    r = interval_report(np.zeros(10), np.zeros(10), np.ones(10))
    assert set(r) >= {"coverage_50", "coverage_90", "coverage_95", "width_90", "nll", "crps"}
    assert r["coverage_50"] == 1.0 and r["width_90"] == pytest.approx(2 * 1.6448536, rel=1e-6)


def test_metrics_use_the_measured_points_only_and_none_when_there_is_none():
    """A mask (or NaN in y) leaves points out of every metric: the result equals the metric of the
    measured points alone; with no measured point a metric is None (absent), never NaN."""
    rng = np.random.default_rng(3)
    mean, std = rng.normal(size=(4, 30, 2)), rng.uniform(0.5, 2.0, size=(4, 30, 2))
    y = mean + std * rng.standard_normal(mean.shape)
    mask = rng.uniform(size=y.shape) < 0.6
    mask[..., 1] = False  # the second output is never measured
    full = interval_report(y[mask], mean[mask], std[mask])
    assert interval_report(y, mean, std, mask=mask) == full
    y_nan = np.where(mask, y, np.nan)  # not measured, spelled as NaN
    assert interval_report(y_nan, mean, std) == full
    assert all(v is not None and np.isfinite(v) for v in full.values())
    none = interval_report(y[..., 1], mean[..., 1], std[..., 1], mask=mask[..., 1])
    assert set(none) == set(full) and all(v is None for v in none.values())
    assert coverage(y_nan[..., 1], mean[..., 1], std[..., 1], 0.9) is None
    assert nll_gaussian(y_nan[..., 1], mean[..., 1], std[..., 1]) is None
    assert crps_gaussian(y_nan[..., 1], mean[..., 1], std[..., 1]) is None
    # the conformal scale of an output without a measured point stays 1; the other is its own
    scale = conformal_scale(y_nan, mean, std, 0.9)
    assert scale[1] == 1.0
    m0 = mask[..., 0]
    alone = conformal_scale(*(a[..., 0][m0][None, :, None] for a in (y, mean, std)), 0.9)
    assert scale[0] == alone[0]
