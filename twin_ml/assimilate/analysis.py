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


class Diverged(ValueError):
    """The ensemble holds non-finite values: the forecast into this analysis diverged (inputs or
    states far outside what the model can step), or an analysis moved it where the forecast
    cannot step from. The filter cannot go on from it. `field`: what the request gave that
    caused it (inputs, or outputs for a measurement)."""

    def __init__(self, message: str, field: str = "inputs"):
        super().__init__(message)
        self.field = field


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
    if not (np.isfinite(r).all() and (r > 0).all()):
        raise ValueError(f"observation noise stds must be finite and > 0, got {r.tolist()}")
    if not inflation >= 1:
        raise ValueError(f"inflation must be >= 1, got {inflation}")
    if not (np.isfinite(X).all() and np.isfinite(HX).all()):
        raise Diverged("the ensemble holds non-finite values (a diverged forecast?)")
    return X, HX, y, r


def _measured(HX: np.ndarray, y: np.ndarray, r: np.ndarray, inflation: float):
    """(keep [m], the scaled predicted anomalies S = Yp R^-1/2 [N, k], the scaled innovation
    d / r [k], d [k], r [k]) over the k measured outputs."""
    keep = np.isfinite(y)
    if not keep.all():
        HX, y, r = HX[:, keep], y[keep], r[keep]
    ym = HX.sum(axis=0) / len(HX)
    d = y - ym
    S = (HX - ym) * (np.sqrt(inflation) / r)
    return keep, S, d / r, d, r


def _gram(S: np.ndarray, ds: np.ndarray, nm1: float):
    """From the k x k Gram matrix G = S'S: the weights c = (nm1 I + G)^-1 ds [k] and the
    k x k Q with sqrt(nm1 Pa) = I + S Q S' (see `etkf`)."""
    k = S.shape[1]
    if k == 1:  # one measured output: scalars
        g = float(S[:, 0] @ S[:, 0])
        lam = nm1 + g
        c = ds / lam
        # (sqrt(nm1 / lam) - 1) / g, written so it stays exact as g -> 0 (limit -1 / (2 nm1))
        q = -1.0 / (np.sqrt(lam) * (np.sqrt(lam) + np.sqrt(nm1)))
        return c, np.array([[q]]), np.array([g])
    G = S.T @ S
    s2, V = np.linalg.eigh(G)
    s2 = np.maximum(s2, 0.0)
    lam = nm1 + s2
    c = V @ ((V.T @ ds) / lam)
    q = -1.0 / (np.sqrt(lam) * (np.sqrt(lam) + np.sqrt(nm1)))
    return c, (V * q) @ V.T, np.diag(G)


def _innovation(d, r, g_diag, c, ds, nm1: float, keep: np.ndarray) -> Innovation:
    """The innovation d, its predicted std sqrt(diag(HPH' + R)) = r sqrt(1 + diag(G) / nm1),
    and NIS = d' (HPH' + R)^-1 d = ds' (I + G / nm1)^-1 ds = nm1 ds'c."""
    m = len(keep)
    std = r * np.sqrt(1.0 + g_diag / nm1)
    nis = float(nm1 * (ds @ c)) if len(d) else 0.0
    if keep.all():
        return Innovation(d, std, nis, m)
    full_d, full_std = np.full(m, np.nan), np.full(m, np.nan)
    full_d[keep], full_std[keep] = d, std
    return Innovation(full_d, full_std, nis, int(keep.sum()))


def etkf(
    X: np.ndarray, HX: np.ndarray, y: np.ndarray, r: np.ndarray, inflation: float = 1.0
) -> tuple[np.ndarray, Innovation]:
    """The ETKF analysis of X [N, n] given HX [N, m], measurements y [m] (NaN: not measured) and
    their noise stds r [m] -> (the analysis ensemble [N, n], the step's `Innovation`)."""
    X, HX, y, r = _check(X, HX, y, r, inflation)
    n_members = len(X)
    nm1 = n_members - 1.0
    xm = X.sum(axis=0) / n_members
    A = (X - xm) * np.sqrt(inflation)
    keep, S, ds, d, rk = _measured(HX, y, r, inflation)
    if not keep.any():  # nothing measured: the (inflated) forecast is the analysis
        return xm + A, Innovation(np.full(len(y), np.nan), np.full(len(y), np.nan), 0.0, 0)
    # the analysis covariance in ensemble space is Pa = [nm1 I + S S']^-1 (S = Yp R^-1/2 [N, k],
    # k outputs measured, usually far fewer than the N members). With G = S'S = V diag(s2) V'
    # (k x k), S S' has the eigenvalues s2 on the columns of U = S V diag(s2)^-1/2 and 0 on their
    # complement, so (Woodbury) the mean's weights are Pa S ds = S c with c = (nm1 I + G)^-1 ds,
    # and the symmetric square root sqrt(nm1 Pa) = I + U diag(sqrt(nm1 / lam) - 1) U' =
    # I + S Q S' with Q = V diag(q) V', q = (sqrt(nm1 / lam) - 1) / s2, lam = nm1 + s2 (Hunt et
    # al.'s N x N eigendecomposition in O(N k^2); for one output, scalars)
    c, Q, g_diag = _gram(S, ds, nm1)
    innovation = _innovation(d, rk, g_diag, c, ds, nm1, keep)
    # analysis = xm + (W + w)' A with W = I + S Q S' (symmetric) and w = S c
    SA = S.T @ A  # [k, n]
    return xm + A + S @ (Q @ SA) + c @ SA, innovation


def etkf_many(
    X: np.ndarray, HX: np.ndarray, y: np.ndarray, r: np.ndarray, inflation
) -> tuple[np.ndarray, list[Innovation]]:
    """`etkf` of K independent ensembles at once (several twins, one vectorized analysis): X
    [K, N, n], HX [K, N, m], y [K, m] (every output measured: a NaN is refused; give such an
    ensemble to `etkf`), r [K, m], inflation [K] -> (the analysis ensembles [K, N, n], the K
    steps' `Innovation`s). The same arithmetic as `etkf` ensemble by ensemble: equal to it up
    to float64 rounding (a test checks it)."""
    X, HX = np.asarray(X, dtype=np.float64), np.asarray(HX, dtype=np.float64)
    y, r = np.asarray(y, dtype=np.float64), np.asarray(r, dtype=np.float64)
    K, N, _ = X.shape
    m = HX.shape[2] if HX.ndim == 3 else -1
    if HX.shape[:2] != (K, N) or y.shape != (K, m) or r.shape != (K, m):
        raise ValueError(
            f"X [K, N, n], HX [K, N, m], y and r [K, m] must agree, got {X.shape}, {HX.shape}, "
            f"{y.shape} and {r.shape}"
        )
    infl = np.broadcast_to(np.asarray(inflation, dtype=np.float64), (K,))
    if N < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {N}")
    if not (np.isfinite(r).all() and (r > 0).all()):
        raise ValueError("observation noise stds must be finite and > 0")
    if not (infl >= 1).all():
        raise ValueError(f"inflation must be >= 1, got {infl.tolist()}")
    if not np.isfinite(y).all():
        raise ValueError("etkf_many takes fully measured samples; give those with NaNs to etkf")
    if not (np.isfinite(X).all() and np.isfinite(HX).all()):
        raise Diverged("the ensemble holds non-finite values (a diverged forecast?)")
    nm1 = N - 1.0
    root = np.sqrt(infl)[:, None, None]
    xm = X.sum(axis=1, keepdims=True) / N
    A = (X - xm) * root
    ym = HX.sum(axis=1) / N
    d = y - ym  # [K, m]
    S = (HX - ym[:, None]) * (root / r[:, None])  # [K, N, m]
    ds = d / r
    if m == 1:  # scalars per ensemble, as `_gram`
        g = np.einsum("kn,kn->k", S[..., 0], S[..., 0])[:, None]  # [K, 1]
        lam = nm1 + g
        c = ds / lam
        q = -1.0 / (np.sqrt(lam) * (np.sqrt(lam) + np.sqrt(nm1)))
        Q = q[:, :, None]  # [K, 1, 1]
    else:
        G = np.einsum("kni,knj->kij", S, S)
        s2, V = np.linalg.eigh(G)
        s2 = np.maximum(s2, 0.0)
        lam = nm1 + s2
        c = np.einsum("kij,kj->ki", V, np.einsum("kji,kj->ki", V, ds) / lam)
        q = -1.0 / (np.sqrt(lam) * (np.sqrt(lam) + np.sqrt(nm1)))
        Q = (V * q[:, None]) @ np.swapaxes(V, 1, 2)
        g = np.einsum("kii->ki", G)
    std = r * np.sqrt(1.0 + g / nm1)
    nis = nm1 * np.einsum("ki,ki->k", ds, c)
    SA = np.swapaxes(S, 1, 2) @ A  # [K, m, n]
    out = xm + A + S @ (Q @ SA) + np.einsum("ki,kin->kn", c, SA)[:, None]
    return out, [Innovation(d[k], std[k], float(nis[k]), m) for k in range(K)]


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
    n_members = len(X)
    nm1 = n_members - 1.0
    xm = X.mean(axis=0)
    A = (X - xm) * np.sqrt(inflation)
    Xf = xm + A
    keep, S, ds, d, rk = _measured(HX, y, r, inflation)
    if not keep.any():
        return Xf, Innovation(np.full(len(y), np.nan), np.full(len(y), np.nan), 0.0, 0)
    c, _, g_diag = _gram(S, ds, nm1)
    innovation = _innovation(d, rk, g_diag, c, ds, nm1, keep)
    Yp = S * rk  # the (inflated) predicted anomalies of the measured outputs
    Pxy = A.T @ Yp / nm1
    C = Yp.T @ Yp / nm1 + np.diag(rk**2)
    K = np.linalg.solve(C, Pxy.T).T  # [n, k]
    perturbed = y[keep] + rng.standard_normal((n_members, int(keep.sum()))) * rk
    return Xf + (perturbed - (HX[:, keep].mean(axis=0) + Yp)) @ K.T, innovation


def gaspari_cohn(distance, radius: float) -> np.ndarray:
    """The Gaspari & Cohn (1999, QJRMS 125, eq. 4.10) fifth-order taper: 1 at distance 0, 0 from
    2 x `radius` on, smooth and a valid correlation function in between; the weights a
    localized analysis gives an observation at that distance from a state component."""
    if not radius > 0:
        raise ValueError(f"localization radius must be > 0, got {radius}")
    z = np.abs(np.asarray(distance, dtype=np.float64)) / radius
    w = np.zeros_like(z)
    a, b = z <= 1, (z > 1) & (z < 2)
    za, zb = z[a], z[b]
    w[a] = -0.25 * za**5 + 0.5 * za**4 + 0.625 * za**3 - 5 / 3 * za**2 + 1
    w[b] = zb**5 / 12 - 0.5 * zb**4 + 0.625 * zb**3 + 5 / 3 * zb**2 - 5 * zb + 4 - 2 / (3 * zb)
    return np.clip(w, 0.0, 1.0)


def letkf(
    X: np.ndarray,
    HX: np.ndarray,
    y: np.ndarray,
    r: np.ndarray,
    weights: np.ndarray,
    inflation: float = 1.0,
) -> tuple[np.ndarray, Innovation]:
    """The local ETKF (Hunt et al. 2007, section 2.3, with R-localization): each component i of
    X [N, n] is analysed with the measurements weighted by `weights` [n, m] in [0, 1] (their noise
    variance divided by the weight; 0: left out), e.g. `gaspari_cohn` of the distance between the
    component and the sensor. A large state seen by a small ensemble has spurious sample
    correlations between far-apart components; localization stops a measurement from moving
    what it cannot tell about. Weights of 1 everywhere give `etkf`. Components with the same
    weights share one transform. The innovation is the global one (as `etkf`'s)."""
    X, HX, y, r = _check(X, HX, y, r, inflation)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (X.shape[1], HX.shape[1]):
        raise ValueError(
            f"localization weights must be [n, m] = [{X.shape[1]}, {HX.shape[1]}], got "
            f"{weights.shape}"
        )
    if not (np.isfinite(weights).all() and (weights >= 0).all() and (weights <= 1).all()):
        raise ValueError("localization weights must lie in [0, 1]")
    n_members = len(X)
    nm1 = n_members - 1.0
    xm = X.sum(axis=0) / n_members
    A = (X - xm) * np.sqrt(inflation)
    keep, S, ds, d, rk = _measured(HX, y, r, inflation)
    if not keep.any():
        return xm + A, Innovation(np.full(len(y), np.nan), np.full(len(y), np.nan), 0.0, 0)
    c, _, g_diag = _gram(S, ds, nm1)
    innovation = _innovation(d, rk, g_diag, c, ds, nm1, keep)
    out = xm + A
    W = weights[:, keep]
    groups, which = np.unique(W, axis=0, return_inverse=True)
    for g, w in enumerate(groups):
        cols = np.flatnonzero(which.ravel() == g)
        use = w > 0
        if not use.any():
            continue  # no measurement near: the forecast stays
        sw = np.sqrt(w[use])
        Sl, dl = S[:, use] * sw, ds[use] * sw
        cl, Ql, _ = _gram(Sl, dl, nm1)
        SA = Sl.T @ A[:, cols]
        out[:, cols] += Sl @ (Ql @ SA) + cl @ SA
    return out, innovation
