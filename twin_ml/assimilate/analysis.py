"""The analysis step of an ensemble Kalman filter (torch-free, numpy only).

An ensemble X [N, n] of N members (the state, and the parameters in a joint estimation) and the
observations each member predicts, HX [N, m], are updated by measurements y [m] with independent
noise of std r [m]. A NaN in y is an output not measured at this time: it takes no part.

- `etkf`: the ensemble transform Kalman filter (Hunt, Kostelich & Szunyogh 2007, Physica D 230),
  deterministic: the analysis mean and anomalies come from one N x N transform in the ensemble's
  own space. For a linear observation operator, with the ensemble's sample mean and covariance as
  the prior, its analysis mean and sample covariance are the Kalman filter's exactly (a test
  checks this to float64 rounding).
- `enkf`: the stochastic EnKF (Burgers, van Leeuwen & Evensen 1998): each member assimilates the
  measurements perturbed by draws of their noise; its moments match the Kalman filter's in
  expectation only.

Both take a multiplicative prior inflation (`inflation` >= 1 scales the anomalies by its square
root, so the covariance by it: a small ensemble underestimates its spread) and return the
`Innovation` of the step: y - mean(HX), its predicted covariance HPH' + R, and the normalized
innovation squared (NIS), chi-square with m degrees of freedom when the filter is consistent, the
statistic a twin watches to tell that its model no longer explains the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Innovation:
    """What one analysis saw: per measured output the innovation d = y - mean(HX) and its
    predicted std sqrt(diag(HPH' + R)); `nis` = d' (HPH' + R)^-1 d over the measured outputs
    (chi-square with `measured` degrees of freedom for a consistent filter)."""

    d: np.ndarray  # [m], NaN where not measured
    std: np.ndarray  # [m], NaN where not measured
    nis: float
    measured: int


def _check(X: np.ndarray, HX: np.ndarray, y: np.ndarray, r: np.ndarray, inflation: float):
    X, HX = np.asarray(X, dtype=np.float64), np.asarray(HX, dtype=np.float64)
    y, r = np.asarray(y, dtype=np.float64), np.asarray(r, dtype=np.float64)
    if X.ndim != 2 or HX.ndim != 2 or len(X) != len(HX):
        raise ValueError(f"X [N, n] and HX [N, m] must share N, got {X.shape} and {HX.shape}")
    if len(X) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(X)}")
    if y.shape != (HX.shape[1],) or r.shape != y.shape:
        raise ValueError(f"y and r must be [m] = [{HX.shape[1]}], got {y.shape} and {r.shape}")
    if not (np.all(np.isfinite(r)) and np.all(r > 0)):
        raise ValueError(f"observation noise stds must be finite and > 0, got {r.tolist()}")
    if not inflation >= 1:
        raise ValueError(f"inflation must be >= 1, got {inflation}")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(HX))):
        raise ValueError("the ensemble holds non-finite values (a diverged forecast?)")
    return X, HX, y, r


def _innovation(Yp: np.ndarray, d: np.ndarray, r: np.ndarray, keep: np.ndarray, m: int):
    n = len(Yp)
    S = Yp.T @ Yp / (n - 1) + np.diag(r**2)  # HPH' + R over the measured outputs
    nis = float(d @ np.linalg.solve(S, d)) if len(d) else 0.0
    full_d, full_std = np.full(m, np.nan), np.full(m, np.nan)
    full_d[keep], full_std[keep] = d, np.sqrt(np.diag(S))
    return Innovation(full_d, full_std, nis, int(keep.sum()))


def etkf(
    X: np.ndarray, HX: np.ndarray, y: np.ndarray, r: np.ndarray, inflation: float = 1.0
) -> tuple[np.ndarray, Innovation]:
    """The ETKF analysis of X [N, n] given HX [N, m], measurements y [m] (NaN: not measured) and
    their noise stds r [m] -> (the analysis ensemble [N, n], the step's `Innovation`)."""
    X, HX, y, r = _check(X, HX, y, r, inflation)
    n_members, m = len(X), HX.shape[1]
    keep = np.isfinite(y)
    xm = X.mean(axis=0)
    A = (X - xm) * np.sqrt(inflation)
    ym = HX[:, keep].mean(axis=0)
    Yp = (HX[:, keep] - ym) * np.sqrt(inflation)
    d = y[keep] - ym
    innovation = _innovation(Yp, d, r[keep], keep, m)
    if not keep.any():  # nothing measured: the (inflated) forecast is the analysis
        return xm + A, innovation
    # the analysis covariance in ensemble space, Pa = [(N-1) I + S S']^-1 with S = Yp R^-1/2
    # [N, k] (k outputs measured, usually far fewer than members): from the thin SVD
    # S = U diag(s) V', (N-1) I + S S' has the eigenvalues (N-1) + s^2 on U's columns and N-1 on
    # their complement, so Pa = I / (N-1) + U diag(1 / ((N-1) + s^2) - 1 / (N-1)) U', and its
    # symmetric square root sqrt((N-1) Pa) = I + U diag(sqrt((N-1) / ((N-1) + s^2)) - 1) U'
    # (Hunt et al.'s eigendecomposition of the N x N matrix, in O(N k^2) instead of O(N^3))
    nm1 = n_members - 1.0
    S = Yp / r[keep]
    U, sv, _ = np.linalg.svd(S, full_matrices=False)
    lam = nm1 + sv**2
    Sd = S @ (d / r[keep])  # Yp R^-1 d
    w = Sd / nm1 + U @ ((1.0 / lam - 1.0 / nm1) * (U.T @ Sd))  # the mean's weights, Pa Yp R^-1 d
    # analysis = xm + (W + w)' A with W = I + U diag(g) U' (symmetric): A + U diag(g) U'A + w'A
    UA = U.T @ A
    g = np.sqrt(nm1 / lam) - 1.0
    return xm + A + U @ (g[:, None] * UA) + w @ A, innovation


def enkf(
    X: np.ndarray,
    HX: np.ndarray,
    y: np.ndarray,
    r: np.ndarray,
    rng: np.random.Generator,
    inflation: float = 1.0,
) -> tuple[np.ndarray, Innovation]:
    """The stochastic EnKF analysis (perturbed measurements drawn from `rng`), same arguments and
    result as `etkf`."""
    X, HX, y, r = _check(X, HX, y, r, inflation)
    n_members, m = len(X), HX.shape[1]
    keep = np.isfinite(y)
    xm = X.mean(axis=0)
    A = (X - xm) * np.sqrt(inflation)
    Xf = xm + A
    ym = HX[:, keep].mean(axis=0)
    Yp = (HX[:, keep] - ym) * np.sqrt(inflation)
    d = y[keep] - ym
    innovation = _innovation(Yp, d, r[keep], keep, m)
    if not keep.any():
        return Xf, innovation
    Pxy = A.T @ Yp / (n_members - 1)
    S = Yp.T @ Yp / (n_members - 1) + np.diag(r[keep] ** 2)
    K = np.linalg.solve(S, Pxy.T).T  # [n, m]
    perturbed = y[keep] + rng.standard_normal((n_members, int(keep.sum()))) * r[keep]
    return Xf + (perturbed - (ym + Yp)) @ K.T, innovation
