"""Interval metrics of Gaussian predictive distributions, and split-conformal calibration.

Arrays are [N, T, ny] (scenarios, steps, outputs); a prediction is a mean and a std. Intervals
are central: mean +- z_{(1+level)/2} * std.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

LEVELS = (0.5, 0.9, 0.95)


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"interval level must be in (0, 1), got {level}")
    return float(norm.ppf(0.5 + level / 2))


def coverage(y, mean, std, level: float) -> float:
    """Fraction of y inside the central `level` interval."""
    return float(np.mean(np.abs(y - mean) <= _z(level) * std))


def nll_gaussian(y, mean, std) -> float:
    var = np.maximum(std, 1e-300) ** 2
    return float(np.mean(0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var)))


def crps_gaussian(y, mean, std) -> float:
    """Mean continuous ranked probability score (Gneiting & Raftery 2007, closed form)."""
    s = np.maximum(std, 1e-300)
    z = (y - mean) / s
    return float(np.mean(s * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))))


def conformal_scale(y, mean, std, level: float = 0.9) -> np.ndarray:
    """Split-conformal scale per output [ny]: multiplying std by it makes the `level` interval cover
    the calibration data with the finite-sample guarantee ceil((n+1) level) / n."""
    r = np.abs(y - mean) / np.maximum(std, 1e-300)  # [N, T, ny]
    r = r.reshape(-1, r.shape[-1])
    n = r.shape[0]
    q = min(1.0, np.ceil((n + 1) * level) / n)
    return np.quantile(r, q, axis=0, method="higher") / _z(level)


def interval_report(y, mean, std, levels=LEVELS) -> dict[str, float]:
    out = {f"coverage_{int(round(100 * lv))}": coverage(y, mean, std, lv) for lv in levels}
    out.update({f"width_{int(round(100 * lv))}": float(np.mean(2 * _z(lv) * std)) for lv in levels})
    out["nll"] = nll_gaussian(y, mean, std)
    out["crps"] = crps_gaussian(y, mean, std)
    return out
