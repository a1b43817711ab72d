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


# ---- the conformal shift: std * (1 + beta d) outside the training box ----------------------------


def _shifted(rng, n, t, b, *, claimed=1.0):
    """Gaussian data whose true std grows with the distance d as (1 + b d), per output b [ny], and
    a model that claims `claimed` (its in-domain std) everywhere: y, mean, std [n, t, ny], d [n]."""
    b = np.asarray(b, dtype=float)
    d = rng.uniform(0.0, 0.5, n)  # up to the design's default margin of 0.25 box widths, and more
    true = 1.0 + d[:, None, None] * b[None, None, :]
    y = true * rng.standard_normal((n, t, len(b)))
    return y, np.zeros_like(y), np.full_like(y, claimed), d


@pytest.mark.parametrize("b", [(0.5, 2.0), (1.0, 4.0)])
def test_the_fitted_beta_recovers_the_true_growth_and_covers_at_the_conformal_level(b):
    """Oracle: with beta = b every point's interval is the true one (coverage 0.9 exactly in
    expectation), and coverage is monotone in beta, so the fit converges to b. Its error: the
    empirical coverage at b scatters by sqrt(0.9 * 0.1 / n) over n independent points, and
    dC/dbeta = mean(2 phi(z) z d / (1 + b d)) turns that into beta; the finite-sample level adds at
    most 2 / n of coverage. Four such sigmas, plus that bias."""
    from twin_ml.uq import shift_beta

    rng = np.random.default_rng(10)
    y, mean, std, d = _shifted(rng, 4000, 3, b)
    beta, notes = shift_beta(y, mean, std, d, 0.9)
    assert notes == []
    z = norm.ppf(0.95)
    n = y.shape[0] * y.shape[1]
    k = int(np.ceil((n + 1) * 0.9))  # the finite-sample level, as conformal_scale takes it
    for j, bj in enumerate(b):
        slope = np.mean(2 * norm.pdf(z) * z * d / (1 + bj * d))
        assert abs(beta[j] - bj) < (4 * np.sqrt(0.09 / n) + 2 / n) / slope, (j, beta[j], bj)
        widened = std[..., j] * (1 + beta[j] * d[:, None])
        covered = int(np.sum(np.abs(y[..., j] - mean[..., j]) <= z * widened))
        assert k <= covered <= k + 1  # the 'higher' quantile: its own point, and no more
        less = std[..., j] * (1 + beta[j] * (1 - 1e-9) * d[:, None])  # the smallest such beta:
        assert np.sum(np.abs(y[..., j] - mean[..., j]) <= z * less) == covered - 1  # one less


def test_beta_is_zero_where_the_in_domain_scale_already_covers():
    from twin_ml.uq import cross_fit_shift, shift_beta

    rng = np.random.default_rng(11)
    y, mean, std, d = _shifted(rng, 300, 4, (0.0, 0.0), claimed=1.5)  # wider than the truth
    beta, notes = shift_beta(y, mean, std, d, 0.9)
    assert beta.tolist() == [0.0, 0.0] and notes == []
    fit = cross_fit_shift(y, mean, std, d, seed=3)
    assert fit.beta.tolist() == [0.0, 0.0] and np.all(fit.factor == 1.0)
    # points at distance 0 are never widened, whatever beta
    y2, mean2, std2, d2 = _shifted(rng, 300, 4, (2.0, 2.0))
    d2[:50] = 0.0
    fit2 = cross_fit_shift(y2, mean2, std2, d2, seed=3)
    assert np.all(fit2.beta > 0) and np.all(fit2.factor[:50] == 1.0)


def test_cross_fitted_scores_never_use_the_scenario_s_own_half():
    """Each scenario's factor is 1 + beta d with beta fitted on the other half alone; and making
    one scenario's errors enormous changes the factors of the other half (the ones its half's beta
    scores), never its own or its own half's."""
    from twin_ml.contract.card import widening
    from twin_ml.uq import cross_fit_shift, shift_beta

    rng = np.random.default_rng(12)
    y, mean, std, d = _shifted(rng, 41, 6, (1.0, 3.0))
    fit = cross_fit_shift(y, mean, std, d, seed=5)
    assert sorted(np.bincount(fit.half).tolist()) == [20, 21] and fit.n_fit == 41
    for h in (0, 1):
        own, other = fit.half == h, fit.half != h
        beta_other, _ = shift_beta(y[other], mean[other], std[other], d[other], 0.9)
        assert np.array_equal(fit.beta_halves[1 - h], beta_other)
        assert np.array_equal(fit.factor[own], widening(beta_other, d[own]))
    i = int(np.flatnonzero(fit.half == 0)[0])
    y_bad = y.copy()
    y_bad[i] *= 50.0
    bad = cross_fit_shift(y_bad, mean, std, d, seed=5)
    assert np.array_equal(bad.half, fit.half)  # the halves depend on the seed and n, not the data
    assert np.array_equal(bad.factor[fit.half == 0], fit.factor[fit.half == 0])
    assert np.all(bad.factor[fit.half == 1] > fit.factor[fit.half == 1])
    # the deployed beta is fitted on all of them
    assert np.array_equal(fit.beta, shift_beta(y, mean, std, d, 0.9)[0])
    assert fit.summary()["cross_fit"]["n_halves"] == [20, 21]


def test_no_extrapolation_scenario_gives_beta_zero_with_a_note():
    from twin_ml.uq import ShiftFit, cross_fit_shift

    fit = cross_fit_shift(np.zeros((0, 5, 2)), np.zeros((0, 5, 2)), np.ones((0, 5, 2)), np.zeros(0))
    assert fit.beta.tolist() == [0.0, 0.0] and fit.n_fit == 0
    assert "no extrapolation split" in fit.notes[0]
    card = fit.card()
    assert card.beta == [0.0, 0.0] and card.n_fit == 0 and card.notes == fit.notes
    assert ShiftFit.none(3, "telemetry").summary()["beta"] == [0.0, 0.0, 0.0]
    one = cross_fit_shift(np.ones((1, 2, 1)), np.zeros((1, 2, 1)), np.ones((1, 2, 1)), [0.5])
    assert one.factor.tolist() == [[1.0]] and any("one extrapolation" in n for n in one.notes)


def test_points_no_beta_can_cover_are_named_and_the_rest_covered():
    """Missed points at distance 0 (an input the box does not measure, say) cannot be reached by
    any beta: when more are missed than the level allows, beta covers every other point."""
    from twin_ml.uq import shift_beta

    y = np.array([5.0, 5.0, 4.0, 0.0])[:, None, None]
    d = np.array([0.0, 0.0, 1.0, 1.0])
    beta, notes = shift_beta(y, np.zeros_like(y), np.ones_like(y), d, 0.9)
    assert beta[0] == pytest.approx(4.0 / norm.ppf(0.95) - 1.0, rel=1e-12)
    assert "2 of 4 points are missed at distance 0" in notes[0]


def test_calibration_sd_counts_scenarios_not_points():
    """The coverage a split-conformal scale gives scatters with the calibration sample by about
    sqrt(p (1 - p) / N) over N independent scores (the empirical CDF at a refitted quantile).
    Scenarios whose T points move together count once each; T independent points per scenario
    count T times (the std shrinks by sqrt(T))."""
    from twin_ml.uq.metrics import calibration_sd

    rng = np.random.default_rng(0)
    n, t = 400, 20
    together = np.repeat(rng.standard_normal((n, 1, 1)), t, axis=1)
    apart = rng.standard_normal((n, t, 1))
    zero, one = np.zeros_like(apart), np.ones_like(apart)
    sd_together = calibration_sd(together, zero, one, 0.9)
    sd_apart = calibration_sd(apart, zero, one, 0.9)
    # 200 bootstrap draws estimate an sd to ~5% (1 / sqrt(2 x 199)): 4 of those either side
    assert 0.8 < sd_together / np.sqrt(0.09 / n) < 1.25
    assert sd_together / sd_apart > np.sqrt(t) / 2


def test_per_scenario_relative_error_is_what_accuracy_summarizes():
    """rel_l2: each scenario's ||y_hat - y|| / ||y|| over its measured points, by hand; NaN for a
    scenario with none, which accuracy's median and p95 leave out."""
    from twin_ml.evaluate.metrics import accuracy, rel_l2

    y = np.array([[[3.0], [4.0]], [[1.0], [np.nan]], [[np.nan], [np.nan]]])
    mean = np.array([[[3.3], [3.6]], [[2.0], [9.0]], [[1.0], [1.0]]])
    rel = rel_l2(y, mean)
    assert rel[0] == pytest.approx(np.hypot(0.3, 0.4) / 5.0, rel=1e-15)
    assert rel[1] == pytest.approx(1.0, rel=1e-15)  # the unmeasured second step is left out
    assert np.isnan(rel[2])
    acc = accuracy(y, mean, np.ones(1), ["a"])
    assert acc["rel_l2_median"] == pytest.approx(np.median(rel[:2]), rel=1e-15)
