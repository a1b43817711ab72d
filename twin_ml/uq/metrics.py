"""Interval metrics of Gaussian predictive distributions, and split-conformal calibration.

Arrays are [N, T, ny] (scenarios, steps, outputs); a prediction is a mean and a std. Intervals
are central: mean +- z_{(1+level)/2} * std.

Every metric is taken over the measured points only: those where `mask` (optional, broadcast to
y's shape; True = measured) holds and y is finite (a NaN in y is a point not measured). A metric
with no measured point is None (absent), never NaN. A non-finite prediction at a measured point is
not hidden: it makes the metric non-finite.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

LEVELS = (0.5, 0.9, 0.95)


def central_z(level: float) -> float:
    """z of the central `level` interval, mean +- z * std (0.9: 1.645)."""
    if not 0 < level < 1:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    return float(norm.ppf(0.5 + level / 2))


def measured(y, mask=None) -> np.ndarray:
    """Bool array of y's shape: the points measured (finite y, and `mask` where given)."""
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(y)
    if mask is not None:
        ok &= np.broadcast_to(np.asarray(mask, dtype=bool), y.shape)
    return ok


def _points(y, mean, std, mask):
    """(y, mean, std) at the measured points, flat; None when there is none."""
    y = np.asarray(y, dtype=float)
    mean, std = np.broadcast_to(mean, y.shape), np.broadcast_to(std, y.shape)
    ok = measured(y, mask)
    if not ok.any():
        return None
    return y[ok], np.asarray(mean, dtype=float)[ok], np.asarray(std, dtype=float)[ok]


def coverage(y, mean, std, level: float, mask=None) -> float | None:
    """Fraction of the measured y inside the central `level` interval (None: no measured
    point)."""
    z = central_z(level)
    pts = _points(y, mean, std, mask)
    if pts is None:
        return None
    y, mean, std = pts
    return float(np.mean(np.abs(y - mean) <= z * std))


def nll_gaussian(y, mean, std, mask=None) -> float | None:
    """Mean negative log-likelihood over the measured points (None: no measured point)."""
    pts = _points(y, mean, std, mask)
    if pts is None:
        return None
    y, mean, std = pts
    var = np.maximum(std, 1e-300) ** 2
    return float(np.mean(0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var)))


def crps_gaussian(y, mean, std, mask=None) -> float | None:
    """Mean continuous ranked probability score (Gneiting & Raftery 2007, closed form) over the
    measured points (None: no measured point)."""
    pts = _points(y, mean, std, mask)
    if pts is None:
        return None
    y, mean, std = pts
    s = np.maximum(std, 1e-300)
    z = (y - mean) / s
    return float(np.mean(s * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))))


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The split-conformal quantile of n scores [n]: their ceil((n+1) level) / n quantile (the
    'higher' of two neighbours, so at least that share of the scores lies at or below it; all of
    them when n is too small). Bounding a new exchangeable score by it holds with probability
    >= level."""
    n = len(scores)
    q = min(1.0, np.ceil((n + 1) * level) / n)
    return float(np.quantile(scores, q, method="higher"))


def conformal_scale(y, mean, std, level: float = 0.9) -> np.ndarray:
    """Split-conformal scale per output [ny]: multiplying std by it makes the `level` interval cover
    the calibration data with the finite-sample guarantee ceil((n+1) level) / n. Each output on its
    measured points (finite y); an output with none keeps the scale 1."""
    r = np.abs(np.asarray(y, dtype=float) - mean) / np.maximum(std, 1e-300)  # [N, T, ny]
    r = r.reshape(-1, r.shape[-1])
    z = central_z(level)
    finite_y = np.isfinite(np.asarray(y, dtype=float)).reshape(-1, r.shape[-1])
    scale = np.ones(r.shape[-1])
    for j in range(r.shape[-1]):
        rj = r[finite_y[:, j], j]
        if len(rj):
            scale[j] = conformal_quantile(rj, level) / z
    return scale


def calibration_sd(y, mean, std, level: float = 0.9, draws: int = 200, seed: int = 0) -> float:
    """How precisely a calibration set of N scenarios y, mean, std [N, T, ny] (std before the
    conformal scale) fixes the coverage of a split-conformal interval: the std of the pooled
    coverage of these points when the scale is refitted on scenario-bootstrap resamples (seeded).
    Points of one scenario are correlated, so it is the scenarios, not the points, that count:
    the coverage on new data scatters around `level` by about this much from the calibration
    sample alone (0.009-0.014 at 205 scenarios for the shipped experiments)."""
    y = np.asarray(y, dtype=float)
    r = np.abs(y - mean) / np.maximum(std, 1e-300)  # [N, T, ny]
    ok = np.isfinite(y)
    if not ok.any() or len(y) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    z = central_z(level)
    cov = []
    for _ in range(draws):
        b = rng.integers(0, len(y), size=len(y))
        scale = conformal_scale(y[b], mean[b], std[b], level)
        cov.append(np.mean((r <= z * scale)[ok]))
    return float(np.std(cov))


def interval_report(y, mean, std, levels=LEVELS, mask=None) -> dict[str, float | None]:
    """coverage_<level>, width_<level> (the mean interval width), nll and crps over the measured
    points; every value None when no point is measured."""
    pts = _points(y, mean, std, mask)
    keys = [f"{k}_{int(round(100 * lv))}" for k in ("coverage", "width") for lv in levels]
    if pts is None:
        return {**dict.fromkeys(keys), "nll": None, "crps": None}
    y, mean, std = pts
    out: dict[str, float | None] = {
        f"coverage_{int(round(100 * lv))}": coverage(y, mean, std, lv) for lv in levels
    }
    out.update(
        {f"width_{int(round(100 * lv))}": float(np.mean(2 * central_z(lv) * std)) for lv in levels}
    )
    out["nll"] = nll_gaussian(y, mean, std)
    out["crps"] = crps_gaussian(y, mean, std)
    return out
