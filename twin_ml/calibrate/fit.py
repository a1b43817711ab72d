"""Calibration: weighted least squares with multi-start, MCMC (emcee), and solver verification.

The least squares weigh each observed point by its variance sigma^2 + s^2: sigma is the noise
std, s the surrogate's calibrated std at that point, so the surrogate's own uncertainty widens
the likelihood (the solver's s is 0). Parameters are searched in the unit box of their bounds.

MCMC's likelihood (`log_likelihood`, `noise_model`): "ar1" (the default) lets each output's
normalized residual be a stationary AR(1) process with lag-1 correlation rho, estimated once
from the residuals at the least-squares estimate (`ar1_rho`); "white" treats every point as
independent (rho = 0 exactly). Real records' residuals are correlated in time (the noise is
coloured and the model is imperfect), and white noise then makes the posterior far too narrow:
n correlated points carry about n (1 - rho) / (1 + rho) points' worth of information. Why AR(1):
it is an exact Gaussian likelihood, O(T) per candidate, adds one number per output (estimated,
not sampled), equals the white likelihood at rho = 0, and takes missing points exactly (the
correlation across a gap of k steps is rho^k). An effective-sample-size correction (dividing
the log-likelihood by (1 + rho) / (1 - rho)) would get the width right only for slowly varying
sensitivities and is no likelihood; a model-discrepancy term (a Gaussian process, Kennedy and
O'Hagan) adds hyperparameters that trade off against the physical parameters and costs O(T^3)
per candidate. What AR(1) cannot describe (long-memory drifts, a misfit that grows over the
record) still makes the intervals too narrow; verification's RMS band and per-output residuals
are where that shows.

MCMC stops when the chain is long enough for the problem (`posterior`): `steps` is a maximum;
the sampler runs in chunks and stops once the kept chain is longer than TAU_LENGTHS
autocorrelation times and their estimate changed by less than TAU_CHANGE (emcee's documented
convergence test), or when `max_seconds` of wall time are spent. The defaults are
`MCMC_DEFAULTS` (the CLI and the server import them).

`calibrate` returns a `CalibrationResult`: frozen dataclasses, whose `as_dict()` is the JSON that
`twin-calibrate` writes and `POST /calibrate` answers. Torch-free.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import numpy as np
from scipy.optimize import least_squares
from scipy.stats import chi2, qmc

from twin_ml.calibrate.backends import CorrectedSurrogate
from twin_ml.calibrate.problem import CalibrationError, Problem

BAD = 1e3  # residual given to a point the model could not predict (a failed solve, NaN)
FD_STEP = 1e-3  # finite-difference step in the unit box (float32 surrogates: well above round-off)
# least-squares stopping tolerances (scipy's xtol, ftol, gtol). One standard error moves the cost by
# 0.5 while costs are about half the observed points, so a relative change of 1e-6 in a cost of a
# few hundred is ~1e-2 standard errors; tighter tolerances only added iterations (13-26 per start
# at 1e-10, 5-17 at 1e-6, the same costs to 1e-3, measured on the benchmark's problems)
TOL = 1e-6
SLOPE_STEP = 1e-2  # the solver's secant step for a first-order correction (about a posterior width)
MIN_KEPT = 20  # MCMC steps per walker after burn-in, at least (R-hat splits them in halves)
# MCMC diagnostics outside these ranges come back as warnings (`mcmc_warnings`):
# R-hat above 1.05: the two halves of the kept chain still differ (the walkers have not forgotten
# where they started). 1.05, not Vehtari et al.'s (2021) 1.01, which is meant for rank-normalized
# R-hat over independent chains: an ensemble's walkers are not independent, and split R-hat of
# the plain kind here stays above 1.01 long after the chain forgets its start (1.02-1.04 on the
# tests' pendulum with 8 walkers x 1500 steps).
RHAT_MAX = 1.05
# effective samples per parameter, at least: Vehtari et al.'s (2021) minimum for a reliable R-hat
# and posterior summary. The mean is then known to 1/sqrt(100) = 0.1 posterior std, a 5% or 95%
# quantile to ~0.2 std (sqrt(0.05 * 0.95 / 100) / pdf(1.645)); fewer, and the 90% interval's ends
# move by more than that from run to run.
ESS_MIN = 100
# the kept chain should be longer than 50 autocorrelation times: below that emcee's estimate of
# the autocorrelation time (and so the ESS) is itself unreliable, usually too small (emcee's
# guidance, the `tol` of its get_autocorr_time)
TAU_LENGTHS = 50
# the convergence test's second half: the autocorrelation time's estimate moved by less than this
# (relative) since the last check (emcee's documented pattern: "Saving & monitoring progress")
TAU_CHANGE = 0.01
CHECK_EVERY = 50  # steps between convergence checks (one FFT over the kept chain each)
NOISE_MODELS = ("ar1", "white")
# the AR(1) correlation is clipped to [0, RHO_MAX]: at 1 the process is a random walk (no
# stationary variance) and its conditional variance 1 - rho^2 vanishes
RHO_MAX = 0.99
# MCMC's settings when none are given: walkers, the most steps, the burn-in at that length (see
# `posterior` for a chain that stops early), the noise model, and the wall-time budget (None: no
# limit). The CLI and POST /calibrate take the same names and defaults.
MCMC_DEFAULTS: dict[str, Any] = {
    "walkers": 32,
    "steps": 1000,
    "burn": 300,
    "noise_model": "ar1",
    "max_seconds": None,
}


# ---- results: frozen dataclasses; `as_dict()` gives their JSON ---------------------------------
@dataclass(frozen=True)
class Posterior:
    """The MCMC posterior of one fitted value: mean, std and the 90% credible interval."""

    mean: float
    std: float
    q05: float
    q95: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "q05": self.q05, "q95": self.q95}


@dataclass(frozen=True)
class Estimate:
    """One fitted value (a parameter or a "state:<name>" initial state), in physical units."""

    value: float  # the least-squares estimate (after the solver's output corrections)
    std_error: float  # from the least-squares Jacobian at the estimate
    bounds: tuple[float, float]  # the box it was searched in
    uncorrected: float  # the estimate of the multi-start fit, before any output correction
    posterior: Posterior | None = None  # with MCMC (surrogate backend)
    refined: float | None = None  # with refine: the solver-in-the-loop refinement


@dataclass(frozen=True)
class StartRun:
    """One start of the multi-start least squares: where it began and ended (physical units)."""

    start: tuple[float, ...]
    theta: tuple[float, ...]
    cost: float
    nfev: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": list(self.start),
            "theta": list(self.theta),
            "cost": self.cost,
            "nfev": self.nfev,
        }


@dataclass(frozen=True, eq=False)
class LeastSquares:
    """`point_estimate`'s answer: the best start's optimum and the covariance there."""

    theta: np.ndarray  # [n_fit] the estimate, physical units
    z: np.ndarray  # [n_fit] the same in the unit box
    cov_z: np.ndarray  # [n_fit, n_fit] from the Jacobian, unit box
    cost: float
    std_error: np.ndarray  # [n_fit] physical units
    starts: tuple[StartRun, ...]  # every start, in start order
    jac: np.ndarray  # [n_residuals, n_fit] the normalized residuals' Jacobian there, unit box


@dataclass(frozen=True)
class MCMCDiagnostics:
    """The sampler's settings and convergence diagnostics; per-value lists in `fit`'s order, None
    where a diagnostic could not be computed (JSON has no NaN). `steps` are the steps run, `burn`
    the steps discarded of them (see `posterior`), `max_steps` the most that were allowed, and
    `stopped` why the run ended: "converged" (longer than TAU_LENGTHS autocorrelation times, and
    their estimate settled), "max_steps", or "time budget" (`max_seconds` spent). `noise_model`
    is the likelihood's; `noise_ar1_rho` the AR(1) lag-1 correlation used per observed output
    (None with "white")."""

    walkers: int
    steps: int
    burn: int
    acceptance: float  # mean acceptance fraction over the walkers
    autocorr_time: tuple[float | None, ...]  # steps
    ess: tuple[float | None, ...]  # effective sample size
    rhat: tuple[float | None, ...]  # split R-hat, walkers as chains
    chain_over_50_tau: bool  # the kept chain is longer than TAU_LENGTHS autocorrelation times
    max_steps: int | None = None  # the `steps` asked for (None: as many as were run)
    stopped: Literal["converged", "max_steps", "time budget"] = "max_steps"
    max_seconds: float | None = None  # the wall-time budget (None: none)
    noise_model: Literal["ar1", "white"] = "white"
    noise_ar1_rho: dict[str, float] | None = None  # per observed output, with "ar1"

    def as_dict(self) -> dict[str, Any]:
        return {
            "walkers": self.walkers,
            "steps": self.steps,
            "burn": self.burn,
            "acceptance": self.acceptance,
            "autocorr_time": list(self.autocorr_time),
            "ess": list(self.ess),
            "rhat": list(self.rhat),
            "chain_over_50_tau": self.chain_over_50_tau,
            "max_steps": self.steps if self.max_steps is None else self.max_steps,
            "stopped": self.stopped,
            "max_seconds": self.max_seconds,
            "noise_model": self.noise_model,
            "noise_ar1_rho": None if self.noise_ar1_rho is None else dict(self.noise_ar1_rho),
        }


@dataclass(frozen=True, eq=False)
class MCMCRun:
    """`posterior`'s answer: the kept samples, their summary, the diagnostics and the warnings
    (`mcmc_warnings`). Arrays are per fitted value, physical units."""

    samples: np.ndarray  # [S, n_fit]
    mean: np.ndarray
    std: np.ndarray
    q05: np.ndarray
    q95: np.ndarray
    diagnostics: MCMCDiagnostics
    warnings: tuple[str, ...]
    rho: np.ndarray | None = None  # [ny] the AR(1) correlation per output (0 unobserved); "ar1"


@dataclass(frozen=True)
class Verification:
    """The solver's check of the candidates (the estimate first, then posterior samples); see
    `verify`."""

    n_candidates: int
    within_2std: tuple[float, ...]  # per candidate: share of points within 2 stated stds
    rms_residual_solver: tuple[float, ...]  # per candidate: RMS normalized residual, solver
    rms_residual_surrogate: tuple[float, ...]  # the same with the (corrected) surrogate
    rms_residual_solver_by_output: dict[str, float]  # at the estimate, per observed output
    rms_residual_band: tuple[float, float]  # `rms_band`: accepted for the solver's at the estimate
    n_observed: int
    solver_failed: tuple[bool, ...]  # per candidate
    verified: bool
    # with output corrections: the share within 2 stds of the uncorrected surrogate at the estimate
    uncorrected_within_2std: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_candidates": self.n_candidates,
            "within_2std": list(self.within_2std),
            "rms_residual_solver": list(self.rms_residual_solver),
            "rms_residual_surrogate": list(self.rms_residual_surrogate),
            "rms_residual_solver_by_output": dict(self.rms_residual_solver_by_output),
            "rms_residual_band": list(self.rms_residual_band),
            "n_observed": self.n_observed,
            "solver_failed": list(self.solver_failed),
            "verified": self.verified,
        }
        if self.uncorrected_within_2std is not None:
            out["uncorrected_within_2std"] = self.uncorrected_within_2std
        return out


@dataclass(frozen=True)
class Timings:
    """Seconds: the multi-start fit (of it, inside the model), least squares with the corrections,
    and, where they ran, MCMC, verification and refinement; the whole call."""

    multistart_s: float
    multistart_model_s: float
    least_squares_s: float
    mcmc_s: float | None
    verification_s: float | None
    refine_s: float | None
    total_s: float

    def as_dict(self) -> dict[str, float]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


@dataclass(frozen=True)
class Evaluations:
    """Calls, scenarios and seconds of the surrogate and of the solver over the whole call."""

    surrogate_calls: int
    surrogate_scenarios: int
    surrogate_s: float
    solver_calls: int
    solver_scenarios: int
    solver_s: float

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """What `calibrate` found. `as_dict()` is the JSON of `twin-calibrate` and `POST /calibrate`
    (without their own keys: model, system, ...); `to_json()` the same as text. The arrays for
    plots (`mean`, `std`, `y_solver`, `samples`) are not part of it."""

    backend: Literal["surrogate", "solver"]
    fit: tuple[str, ...]
    estimates: dict[str, Estimate]  # by fitted name, in `fit`'s order
    cost: float  # the least-squares cost at the estimate
    starts: tuple[StartRun, ...]  # the last fit's starts
    corrections: tuple[dict[str, float], ...]  # the estimate after each output correction
    # per round, how far its correction would move the estimate (first order, standard errors)
    correction_shifts: tuple[float, ...]
    noise: dict[str, float]  # the noise std used, per observed output
    noise_estimated: tuple[str, ...]  # the observed outputs whose noise was estimated
    # the problem's, then every MCMC diagnostic out of range, then why the estimate is unverified
    warnings: tuple[str, ...]
    timings: Timings
    evaluations: Evaluations
    mean: np.ndarray  # [T, ny] the calibrated prediction at the estimate
    std: np.ndarray  # [T, ny] its stated std
    y_solver: np.ndarray | None = None  # [T, ny] the solver at the estimate (surrogate backend)
    samples: np.ndarray | None = None  # [S, n_fit] posterior samples (with MCMC)
    diagnostics: MCMCDiagnostics | None = None  # with MCMC
    verification: Verification | None = None  # surrogate backend

    @property
    def estimate(self) -> dict[str, float]:
        """The estimate by fitted name."""
        return {k: e.value for k, e in self.estimates.items()}

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready result: plain dicts, lists, numbers and strings, keys in the documented
        order."""
        est = self.estimates
        out: dict[str, Any] = {
            "backend": self.backend,
            "fit": list(self.fit),
            "estimate": {k: e.value for k, e in est.items()},
            "std_error": {k: e.std_error for k, e in est.items()},
            "cost": self.cost,
            "starts": [s.as_dict() for s in self.starts],
            "uncorrected_estimate": {k: e.uncorrected for k, e in est.items()},
            "corrections": [dict(c) for c in self.corrections],
            "correction_shifts": list(self.correction_shifts),
            "bounds": {k: list(e.bounds) for k, e in est.items()},
            "noise": dict(self.noise),
            "noise_estimated": list(self.noise_estimated),
            "warnings": list(self.warnings),
        }
        if self.diagnostics is not None:
            out["posterior"] = {
                k: e.posterior.as_dict() for k, e in est.items() if e.posterior is not None
            }
            out["diagnostics"] = self.diagnostics.as_dict()
        if self.verification is not None:
            out["verification"] = self.verification.as_dict()
        refined = {k: e.refined for k, e in est.items() if e.refined is not None}
        if refined:
            out["refined"] = refined
        out["timings"] = self.timings.as_dict()
        out["evaluations"] = self.evaluations.as_dict()
        return out

    def to_json(self, **kwargs: Any) -> str:
        """`as_dict()` as JSON text; keyword arguments go to `json.dumps`."""
        return json.dumps(self.as_dict(), **kwargs)


def residuals(problem: Problem, mean: np.ndarray, std: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Normalized residuals [K, n_observed] of predictions mean/std [K, T, ny]."""
    mask = ~np.isnan(problem.y)
    var = sigma[None, None, :] ** 2 + std**2
    r = (problem.y[None] - mean) / np.sqrt(var)
    r = r[:, mask]
    return np.where(np.isfinite(r), r, BAD)


def log_likelihood(
    problem: Problem,
    mean: np.ndarray,
    std: np.ndarray,
    sigma: np.ndarray,
    rho: np.ndarray | None = None,
) -> np.ndarray:
    """Gaussian log-likelihood [K] of the observations under predictions mean/std [K, T, ny].
    Each observed point's residual e_t has variance v_t = sigma^2 + s_t^2 (s the model's std).

    rho None: white noise, independent points (the "white" noise model). rho [ny]: per output,
    the normalized residual r_t = e_t / sqrt(v_t) is a stationary AR(1) process with unit
    variance, r_t = rho r_{t-1} + eta_t, eta_t ~ N(0, 1 - rho^2), so the residuals' covariance
    is D R D with D = diag(sqrt(v)), R_ts = rho^|t - s|; outputs are independent. The exact
    likelihood factorizes: the first observed point with the stationary variance, each later
    one conditional on the previous observed one. Missing points (NaN in `problem.y`) are
    skipped exactly: across a gap of k grid steps the correlation is a = rho^k, so
    r_t | r_prev ~ N(a r_prev, 1 - a^2). With rho = 0 this is the white likelihood (to rounding).
    A non-finite prediction gives -inf."""
    if rho is None:
        mask = ~np.isnan(problem.y)
        var = (sigma[None, None, :] ** 2 + std**2)[:, mask]
        r2 = ((problem.y[None] - mean)[:, mask]) ** 2 / var
        ll = -0.5 * (r2 + np.log(2 * math.pi * var)).sum(axis=1)
        return np.where(np.isfinite(ll), ll, -np.inf)
    ll = np.zeros(len(mean))
    with np.errstate(invalid="ignore", over="ignore"):
        for j in range(problem.y.shape[1]):
            idx = np.flatnonzero(~np.isnan(problem.y[:, j]))
            if not len(idx):
                continue
            var = sigma[j] ** 2 + std[:, idx, j] ** 2  # [K, n]
            r = (problem.y[idx, j][None] - mean[:, idx, j]) / np.sqrt(var)
            a = float(rho[j]) ** np.diff(idx).astype(float)  # [n - 1] correlation over each gap
            c = 1.0 - a**2  # conditional variance of r_t given the previous observed point
            e = r[:, 1:] - a[None] * r[:, :-1]
            ll -= 0.5 * (
                len(idx) * math.log(2 * math.pi)
                + np.log(var).sum(axis=1)
                + r[:, 0] ** 2
                + np.log(c).sum()
                + (e**2 / c[None]).sum(axis=1)
            )
    return np.where(np.isfinite(ll), ll, -np.inf)


def ar1_rho(
    problem: Problem,
    mean: np.ndarray,
    std: np.ndarray,
    sigma: np.ndarray,
    jac: np.ndarray | None = None,
) -> np.ndarray:
    """The AR(1) noise model's lag-1 correlation per output [ny], from a prediction mean/std
    [T, ny] at the least-squares estimate: the normalized residuals' r_t = (obs - mean) /
    sqrt(sigma^2 + std^2) lag-1 autocorrelation, sum(r_t r_{t+1}) / n_pairs over consecutive
    observed pairs (a pair across a missing point is not one) divided by sum(r_t^2) / n_obs
    over the observed points, clipped to [0, RHO_MAX]. Not centred: the noise model is zero
    mean, so a residual's offset (a model error) counts as correlation. 0 for an output with no
    observed pair or no finite residual (nothing to estimate).

    `jac` [N, n_fit] (the normalized residuals' Jacobian at the estimate, rows as `residuals`
    orders them): the estimate is corrected for what the fit absorbed. A least-squares fit
    takes out of the residuals the noise along its n_fit sensitivities, which are slow, so the
    slow, most correlated part of the noise goes first: on 48 of the tests' records (rho 0.85,
    301 points, 2 fitted values) the plain estimate averaged 0.821, the corrected one 0.834,
    and the same estimate from the noise itself 0.838 (the rest is the lag-1 estimator's own
    bias, about -2 rho / n). Corrected, rho is the value whose expected residual statistics,
    E[r r^T] = M R M with M = I - P the fit's residual projector and R the AR(1) correlation,
    give the observed ratio (a moment estimator that knows the fit; `_ar1_moment_rho`). It
    matters most on long records with rho near 1 (a model error), where (1 + rho) / (1 - rho),
    and so the posterior's width, is most sensitive to rho."""
    ny = problem.y.shape[1]
    plain = np.full(ny, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (problem.y - mean) / np.sqrt(sigma[None, :] ** 2 + std**2)
    for j in range(ny):
        rj = r[:, j]
        ok = np.isfinite(rj)
        pairs = ok[1:] & ok[:-1]
        if not pairs.any():
            continue
        lag1 = float(np.mean(rj[:-1][pairs] * rj[1:][pairs]))
        var = float(np.mean(rj[ok] ** 2))
        if var > 0 and math.isfinite(lag1 / var):
            plain[j] = lag1 / var
    out = np.clip(np.nan_to_num(plain, nan=0.0), 0.0, RHO_MAX)
    if (
        jac is not None
        and np.all(np.isfinite(jac))
        and np.all(np.isfinite(r[~np.isnan(problem.y)]))
    ):
        out = _ar1_moment_rho(problem, plain, out, jac)
    return out


def _ar1_cov_times(idx: np.ndarray, rho: float, v: np.ndarray) -> np.ndarray:
    """R v for the unit-variance AR(1) correlation R_ab = rho^|idx_a - idx_b| of points at grid
    indices idx [n] (sorted), v [n, m]: the observed points of an AR(1) process are a Markov
    chain, so R's inverse is tridiagonal (L^T C^-1 L, L the chain's innovations); a banded solve."""
    from scipy.linalg import solve_banded

    if rho == 0.0:
        return v.copy()
    a = rho ** np.diff(idx).astype(float)  # correlation to the previous observed point
    c = np.concatenate([[1.0], 1.0 - a**2])  # innovation variances
    ab = np.zeros((3, len(idx)))
    ab[1] = 1.0 / c
    ab[1, :-1] += a**2 / c[1:]
    ab[0, 1:] = ab[2, :-1] = -a / c[1:]
    return solve_banded((1, 1), ab, v)


def _ar1_moment_rho(
    problem: Problem, plain: np.ndarray, start: np.ndarray, jac: np.ndarray
) -> np.ndarray:
    """`ar1_rho`'s correction for the fit: per output j, the rho in [0, RHO_MAX] at which the
    expected lag-1 ratio of the least-squares residuals, E[sum_pairs r_a r_b] / n_pairs over
    E[sum r_i^2] / n_obs, equals the observed one (`plain`). With the residuals r = M e,
    M = I - Q Q^T (Q an orthonormal basis of the Jacobian's columns) and e ~ N(0, R) (R block
    diagonal over outputs, AR(1) within), E[r r^T] = R - Q S^T - S Q^T + Q G Q^T with S = R Q
    and G = Q^T R Q. G couples the outputs, so the outputs are solved in turn, three sweeps
    (the coupling is weak: the fit's few directions). The observed ratio below the value at
    rho = 0 gives 0; above that at RHO_MAX, RHO_MAX. O(N n_fit) per evaluation."""
    from scipy.optimize import brentq

    mask = ~np.isnan(problem.y)
    t_of, j_of = np.nonzero(mask)  # each residual row's grid index and output (`residuals`)
    u, sv, _ = np.linalg.svd(jac, full_matrices=False)
    q = u[:, sv > sv[0] * 1e-8] if len(sv) and sv[0] > 0 else u[:, :0]
    if q.shape[1] == 0 or q.shape[1] >= len(q):
        return start
    rows = [np.flatnonzero(j_of == j) for j in range(problem.y.shape[1])]  # sorted by time
    pairs = [(rr[:-1][np.diff(t_of[rr]) == 1], rr[1:][np.diff(t_of[rr]) == 1]) for rr in rows]
    rho = start.copy()
    s_blocks = {
        j: _ar1_cov_times(t_of[rows[j]], float(rho[j]), q[rows[j]]) for j in range(len(rows))
    }

    def ratio(j: int, value: float) -> float:
        rr, (pa, pb) = rows[j], pairs[j]
        s = np.zeros_like(q)
        for k, block in s_blocks.items():
            s[rows[k]] = block
        s[rr] = _ar1_cov_times(t_of[rr], value, q[rr])
        g = q.T @ s
        qg = q @ g
        num = len(pa) * value - np.sum(q[pa] * s[pb] + s[pa] * q[pb] - qg[pa] * q[pb])
        den = len(rr) - np.sum(2 * q[rr] * s[rr] - qg[rr] * q[rr])
        return float((num / len(pa)) / (den / len(rr)))

    for _ in range(3):
        for j in range(len(rows)):
            if not math.isfinite(plain[j]) or not len(pairs[j][0]):
                continue
            lo, hi = ratio(j, 0.0), ratio(j, RHO_MAX)
            if plain[j] <= lo:
                rho[j] = 0.0
            elif plain[j] >= hi:
                rho[j] = RHO_MAX
            else:
                rho[j] = brentq(
                    lambda x, jj, target: ratio(jj, x) - target,
                    0.0,
                    RHO_MAX,
                    args=(j, float(plain[j])),
                    xtol=1e-6,
                )
            s_blocks[j] = _ar1_cov_times(t_of[rows[j]], float(rho[j]), q[rows[j]])
    return rho


def starts(problem: Problem, n: int, seed: int) -> np.ndarray:
    """n starting points in the unit box: its centre, then a scrambled Sobol sequence."""
    if n < 1:
        raise ValueError(f"starts must be >= 1, got {n}")
    pts = [np.full(problem.n_fit, 0.5)]
    if n > 1:
        with warnings.catch_warnings():  # n - 1 need not be a power of 2 for starting points
            warnings.simplefilter("ignore", UserWarning)
            pts += list(qmc.Sobol(problem.n_fit, scramble=True, seed=seed).random(n - 1))
    return np.array(pts)


class _Lockstep:
    """The starts' least-squares runs, each in its own thread, meet at every model call: once every
    running start has submitted its candidates, they go to the backend in one call (in start
    order, so the batches and so the results are deterministic). A vectorized surrogate then
    costs about one call per iteration for all starts; a looped solver still solves them one by
    one; a stacked one in one vectorized solve."""

    def __init__(self, backend, problem: Problem, n: int):
        self.backend, self.problem = backend, problem
        self.cv = threading.Condition()
        self.active = n
        self.pending: dict[int, np.ndarray] = {}
        self.results: dict[int, Any] = {}

    def predict(self, i: int, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.cv:
            self.pending[i] = theta
            self._flush_if_ready()
            while i not in self.results:
                self.cv.wait()
            out = self.results.pop(i)
        if isinstance(out, BaseException):
            raise out
        return out

    def leave(self) -> None:
        with self.cv:
            self.active -= 1
            self._flush_if_ready()

    def _flush_if_ready(self) -> None:
        if not self.pending or len(self.pending) < self.active:
            return
        keys = sorted(self.pending)
        thetas = [self.pending[k] for k in keys]
        self.pending = {}
        try:
            mean, std = self.backend.predict(self.problem, np.vstack(thetas))
            edges = np.cumsum([0] + [len(t) for t in thetas])
            for k, a, b in zip(keys, edges[:-1], edges[1:]):
                self.results[k] = (mean[a:b], std[a:b])
        except Exception as e:  # every waiting start gets the failure
            for k in keys:
                self.results[k] = e
        self.cv.notify_all()


def _fd_steps(z: np.ndarray, h: float = FD_STEP) -> np.ndarray:
    """Difference steps of size h in the unit box (backward at the upper bound)."""
    return np.where(z + h <= 1.0, h, -h)


def point_estimate(
    backend, problem: Problem, sigma: np.ndarray, z0s: np.ndarray, *, max_nfev: int = 60
) -> LeastSquares:
    """Multi-start least squares (scipy, trust-region reflective) on the normalized residuals. The
    starts run in lockstep (`_Lockstep`), and each forward-difference Jacobian is computed from
    one vectorized set of candidates. A backend that batches (`batched` True: the surrogate, a
    stacked solver; absent means False) gets every candidate's Jacobian points with the candidate
    itself, so an iteration of all starts is one call (the points of a rejected candidate are
    wasted, which costs a batching backend little); a looped solver gets them only when the
    optimizer asks for the Jacobian, so it simulates no more than plain least squares does."""
    gate = _Lockstep(backend, problem, len(z0s))
    speculative = bool(getattr(backend, "batched", False))

    def one(i: int, z0: np.ndarray) -> tuple[StartRun, np.ndarray, np.ndarray]:
        """(the start's run, its optimum in the unit box, the Jacobian there)"""
        last: dict[
            bytes, tuple[np.ndarray, np.ndarray | None]
        ] = {}  # z -> (residuals, Jacobian or None)

        def evaluate(z: np.ndarray, with_jac: bool, r0: np.ndarray | None = None):
            """(residuals, forward-difference Jacobian or None) at z in one backend call; a known
            r0 is not simulated again."""
            steps = _fd_steps(z)
            zs = (z[None] + np.diag(steps)) if with_jac else np.zeros((0, len(z)))
            if r0 is None:
                zs = np.vstack([z[None], zs])
            mean, std = gate.predict(i, problem.from_unit(zs))
            r = residuals(problem, mean, std, sigma)
            if r0 is None:
                r0, r = r[0], r[1:]
            j = ((r - r0[None]) / steps[:, None]).T if with_jac else None
            last.clear()
            last[z.tobytes()] = (r0, j)
            return r0, j

        def fun(z):
            return evaluate(z, speculative)[0]

        def jac(z):
            r0, j = last.get(z.tobytes(), (None, None))
            return j if j is not None else evaluate(z, True, r0)[1]

        try:
            res = least_squares(
                fun,
                z0,
                jac=jac,
                bounds=(0.0, 1.0),
                method="trf",
                max_nfev=max_nfev,
                xtol=TOL,
                ftol=TOL,
                gtol=TOL,
            )
        finally:
            gate.leave()
        run = StartRun(
            start=tuple(problem.from_unit(z0).tolist()),
            theta=tuple(problem.from_unit(res.x).tolist()),
            cost=float(res.cost),
            nfev=int(res.nfev),
        )
        return run, res.x, res.jac

    if len(z0s) == 1:
        runs = [one(0, z0s[0])]
    else:
        with ThreadPoolExecutor(max_workers=len(z0s), thread_name_prefix="twin-ml-start") as pool:
            runs = list(pool.map(one, range(len(z0s)), z0s))
    best, z, jac = min(runs, key=lambda r: r[0].cost)
    cov_z = np.linalg.pinv(jac.T @ jac)
    scale = problem.upper - problem.lower
    std_err = np.sqrt(np.clip(np.diag(cov_z), 0, None)) * scale
    return LeastSquares(
        theta=np.array(best.theta),
        z=z,
        cov_z=cov_z,
        cost=best.cost,
        std_error=std_err,
        starts=tuple(r[0] for r in runs),
        jac=jac,
    )


def unpredicted(problem: Problem, y: np.ndarray) -> list[int]:
    """The outputs with no declared noise where the prediction y [T, ny] has no finite value at
    any observed point (a model far outside what it can predict): no residual to estimate from."""
    return [
        int(j)
        for j in np.flatnonzero(np.isnan(problem.noise))
        if not np.isfinite(y[~np.isnan(problem.y[:, j]), j]).any()
    ]


def estimate_noise(problem: Problem, y: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """`sigma` [ny] with its NaN entries (outputs with no declared noise) estimated from the
    residuals of a prediction y [T, ny] at an estimate (an output with no finite prediction
    there, `unpredicted`, is a CalibrationError: give it a value in `sigma` first): per output j,
    sigma_j^2 = sum_j (obs - y)^2 / (n_j (N - n_fit) / N), n_j its observed points, N all observed
    points. At a least-squares optimum the residuals have N - n_fit degrees of freedom (shared out
    over the outputs by their share of the points), so this is about unbiased for sigma_j^2 there.

    Give it the solver's prediction: the solver's error is negligible, so its residual is the
    noise. A surrogate's residual also holds the surrogate's error, so from a surrogate this is an
    upper bound (a provisional weight, until the solver has simulated the estimate). Nothing is
    subtracted for the surrogate's stated std: that std is an uncertainty, not the surrogate's
    actual error at this point, and when it is wider than the residual (conservative intervals)
    subtracting it left only a floor of 1e-3 x the residual, a noise 1000x too small."""
    out = sigma.copy()
    unknown = np.flatnonzero(np.isnan(sigma))
    n_total = int(np.sum(~np.isnan(problem.y)))
    if len(unknown) and n_total <= problem.n_fit:
        j = int(unknown[0])
        raise CalibrationError(
            f"noise.{problem.outputs[j]}",
            f"cannot be estimated from {n_total} observed points for "
            f"{problem.n_fit} fitted values (give the noise std)",
        )
    dof = (n_total - problem.n_fit) / n_total
    for j in unknown:
        m = ~np.isnan(problem.y[:, j]) & np.isfinite(y[:, j])
        if not m.any():
            raise CalibrationError(
                f"noise.{problem.outputs[j]}",
                "cannot be estimated: the model predicts no finite value at the "
                "estimate (give the noise std)",
            )
        var = float(np.sum((problem.y[m, j] - y[m, j]) ** 2)) / (int(m.sum()) * dof)
        out[j] = math.sqrt(max(var, 1e-24))  # 0 for an exact fit (noise-free data): no 0 division
    return out


def _rhat(chain: np.ndarray) -> np.ndarray:
    """Split-chain Gelman-Rubin R-hat per parameter; chain [S, W, n] (walkers as chains)."""
    s = chain.shape[0] // 2
    chains = np.concatenate([chain[:s], chain[s : 2 * s]], axis=1)  # [s, 2W, n]
    w = chains.var(axis=0, ddof=1).mean(axis=0)
    b = s * chains.mean(axis=0).var(axis=0, ddof=1)
    var = (s - 1) / s * w + b / s
    return np.sqrt(var / np.maximum(w, 1e-300))


def _finite(x: float) -> float | None:
    """JSON has no NaN: a diagnostic that could not be computed is None."""
    x = float(x)
    return x if math.isfinite(x) else None


def mcmc_warnings(diagnostics: MCMCDiagnostics, names: list[str]) -> list[str]:
    """One warning per parameter and diagnostic outside its accepted range (RHAT_MAX, ESS_MIN,
    TAU_LENGTHS) in `posterior`'s diagnostics; each names the parameter, the value and what to do.
    A diagnostic that could not be computed (None) is a warning too. Before them: a run the time
    budget stopped (with the steps it did), and every output whose AR(1) correlation reached
    RHO_MAX (the residuals wander like a random walk: the model misses something)."""
    steps, burn, walkers = diagnostics.steps, diagnostics.burn, diagnostics.walkers
    kept = steps - burn
    now = f"(now steps={steps}, burn={burn}, walkers={walkers})"
    out = []
    if diagnostics.stopped == "time budget":
        of = "" if diagnostics.max_steps is None else f" of at most {diagnostics.max_steps}"
        out.append(
            f"mcmc: stopped on the time budget (max_seconds={diagnostics.max_seconds}) after "
            f"{steps}{of} steps, before the chain converged (longer than {TAU_LENGTHS} "
            f"autocorrelation times): the posterior may be too narrow or off-centre; raise "
            f"max_seconds, or use fewer walkers {now}"
        )
    for output, rho in (diagnostics.noise_ar1_rho or {}).items():
        if rho >= RHO_MAX:
            out.append(
                f"mcmc: the residuals of {output} at the estimate are correlated at lag 1 by "
                f"{rho:.3g} or more (the AR(1) noise model's limit): they drift like a random "
                f"walk, so the model misses something there (physics, inputs, fixed values), "
                f"and the intervals are only approximate; check the fit's residuals"
            )
    for name, rhat, ess, tau in zip(
        names, diagnostics.rhat, diagnostics.ess, diagnostics.autocorr_time
    ):
        if rhat is None or rhat > RHAT_MAX:
            value = "could not be computed" if rhat is None else f"is {rhat:.3g} (> {RHAT_MAX})"
            out.append(
                f"mcmc: R-hat of {name} {value}: the two halves of the kept chain "
                f"disagree, so the walkers have not converged and the posterior of {name} "
                f"is not to be trusted; run more steps with a longer burn-in {now}"
            )
        if ess is None or ess < ESS_MIN:
            value = "could not be computed" if ess is None else f"is {ess:.0f} (< {ESS_MIN})"
            out.append(
                f"mcmc: the effective sample size of {name} {value}: its posterior mean "
                f"and 90% interval rest on too few independent samples; run more steps or "
                f"walkers {now}"
            )
        if tau is None:
            out.append(
                f"mcmc: the autocorrelation time of {name} could not be estimated, so its "
                f"effective sample size is unknown; run more steps {now}"
            )
        elif kept < TAU_LENGTHS * tau:
            need = math.ceil(TAU_LENGTHS * tau)
            out.append(
                f"mcmc: the autocorrelation time of {name} is {tau:.3g} steps, and the "
                f"{kept} kept steps are fewer than {TAU_LENGTHS} of them ({need}), so that "
                f"time and the effective sample size are unreliable (usually too small); "
                f"run at least steps={burn + need} {now}"
            )
    return out


def _discard(done: int, steps: int, burn: int) -> int:
    """The burn-in of a chain that ran `done` of at most `steps` steps: the share burn / steps of
    the steps done, never more than `burn` (so a full-length run discards exactly `burn`)."""
    return min(burn, done * burn // steps)


def posterior(
    backend,
    problem: Problem,
    sigma: np.ndarray,
    z_hat: np.ndarray,
    *,
    walkers: int = MCMC_DEFAULTS["walkers"],
    steps: int = MCMC_DEFAULTS["steps"],
    burn: int = MCMC_DEFAULTS["burn"],
    noise_model: str = MCMC_DEFAULTS["noise_model"],
    max_seconds: float | None = MCMC_DEFAULTS["max_seconds"],
    progress: bool = False,
    seed: int = 0,
    cov_z: np.ndarray | None = None,
) -> MCMCRun:
    """emcee's affine-invariant ensemble sampler, vectorized: every walker move is one backend call.
    Uniform prior on the bounds times the optional normal priors. Walkers start drawn from the
    Laplace approximation at the point estimate (covariance `cov_z`, from the least-squares
    Jacobian) when given, else in a small ball around it: a ball far narrower than the posterior
    takes many autocorrelation times to spread, and a short chain then understates the width.

    The likelihood (`log_likelihood`): noise_model "ar1" (default) estimates each output's AR(1)
    correlation once, from the residuals of the model at z_hat (`ar1_rho`), and keeps it fixed;
    "white" is the independent-points likelihood (see the module doc for why AR(1)).

    `steps` is a maximum. The sampler runs in chunks of CHECK_EVERY steps; after each it
    estimates the autocorrelation time tau of the kept chain and stops ("converged") once the
    kept chain is longer than TAU_LENGTHS x tau and tau moved by less than TAU_CHANGE since the
    last check (emcee's documented test); or when `max_seconds` of wall time are spent in the
    sampling ("time budget", checked every step, but never before MIN_KEPT steps are kept, so a
    summary and R-hat exist; the least squares before it are not counted); else it runs all
    `steps` ("max_steps"). The burn-in of a chain that stopped
    after n steps is the same share of it as asked for: min(burn, n x burn / steps), exactly
    `burn` at full length. At convergence the kept chain is > TAU_LENGTHS tau, so that burn-in is
    > TAU_LENGTHS x burn / (steps - burn) tau (21 tau at the defaults), well past the few tau
    emcee's guidance asks for. `progress`: a progress bar on stderr, off by default: steps done
    of the maximum, the time to the maximum at the current pace, and at each check the kept
    steps against the TAU_LENGTHS x tau that convergence needs, and the budget left. The
    diagnostics record the steps run, the burn-in used, why it stopped and the AR(1)
    correlations; its `warnings` name every diagnostic outside its accepted range
    (`mcmc_warnings`)."""
    import emcee
    from emcee.ensemble import walkers_independent
    from tqdm import tqdm

    n = problem.n_fit
    walkers = max(walkers, 2 * n + 2)
    if noise_model not in NOISE_MODELS:
        raise ValueError(f"mcmc: noise_model must be one of {NOISE_MODELS}, got {noise_model!r}")
    if max_seconds is not None and not (
        isinstance(max_seconds, int | float)
        and not isinstance(max_seconds, bool)
        and math.isfinite(max_seconds)
        and max_seconds > 0
    ):
        raise ValueError(f"mcmc: max_seconds must be a number > 0 or None, got {max_seconds!r}")
    if not 0 <= burn or steps - burn < MIN_KEPT:
        raise ValueError(
            f"mcmc: steps - burn must be >= {MIN_KEPT} (kept steps per walker), got steps={steps}, "
            f"burn={burn}"
        )
    prior_idx = [(problem.fit.index(k), mu, sd) for k, (mu, sd) in problem.priors.items()]
    rho: np.ndarray | None = None
    if noise_model == "ar1":
        # the model at the estimate and its difference steps: the residuals and their Jacobian
        steps_z = _fd_steps(z_hat)
        zs = np.vstack([z_hat[None], z_hat[None] + np.diag(steps_z)])
        at_hat, std_hat = backend.predict(problem, problem.from_unit(zs))
        r_all = residuals(problem, at_hat, std_hat, sigma)
        jac = ((r_all[1:] - r_all[:1]) / steps_z[:, None]).T
        rho = ar1_rho(problem, at_hat[0], std_hat[0], sigma, jac)

    def log_prob(zs):
        zs = np.atleast_2d(zs)
        out = np.full(len(zs), -np.inf)
        inside = np.all((zs >= 0) & (zs <= 1), axis=1)
        if inside.any():
            theta = problem.from_unit(zs[inside])
            mean, std = backend.predict(problem, theta)
            lp = log_likelihood(problem, mean, std, sigma, rho)
            for k, mu, sd in prior_idx:
                lp = lp - 0.5 * ((theta[:, k] - mu) / sd) ** 2
            out[inside] = lp
        return out

    rng = np.random.default_rng(seed)
    if cov_z is not None and np.all(np.isfinite(cov_z)):
        w, v = np.linalg.eigh((cov_z + cov_z.T) / 2)
        w = np.clip(w, 1e-6, None)  # a floor: a singular cov_z would put every walker on one line
        p0 = z_hat[None] + rng.standard_normal((walkers, n)) @ (v * np.sqrt(w)).T
    else:
        p0 = z_hat[None] + 1e-3 * rng.standard_normal((walkers, n))
    p0 = np.clip(p0, 1e-6, 1 - 1e-6)
    if not walkers_independent(p0):
        # a covariance far wider than the box in a direction the data do not pin down clips the
        # walkers onto the box's faces, where they are no longer linearly independent (emcee
        # refuses such a start): start them in the small ball around the estimate instead
        p0 = np.clip(z_hat[None] + 1e-3 * rng.standard_normal((walkers, n)), 1e-6, 1 - 1e-6)
    sampler = emcee.EnsembleSampler(walkers, n, log_prob, vectorize=True)
    sampler.random_state = np.random.RandomState(seed).get_state()

    logger = logging.getLogger("emcee")
    level = logger.level
    logger.setLevel(logging.ERROR)  # a short chain is reported in the diagnostics instead
    stopped = "max_steps"
    t0 = time.perf_counter()
    last_tau: np.ndarray | None = None
    bar = tqdm(
        total=steps, desc="mcmc", unit="step", file=sys.stderr, disable=not progress, leave=False
    )
    try:
        for _ in sampler.sample(p0, iterations=steps):
            done = sampler.iteration
            bar.update(1)
            kept = done - _discard(done, steps, burn)
            if done % CHECK_EVERY == 0 and kept >= MIN_KEPT and done < steps:
                tau = sampler.get_autocorr_time(discard=done - kept, quiet=True)
                if np.all(np.isfinite(tau)):
                    settled = last_tau is not None and bool(
                        np.all(np.abs(last_tau - tau) < TAU_CHANGE * tau)
                    )
                    if settled and kept > TAU_LENGTHS * float(np.max(tau)):
                        stopped = "converged"
                        break
                    last_tau = tau
                    # the kept steps against the TAU_LENGTHS x tau the test needs
                    post = {"kept": f"{kept}/{math.ceil(TAU_LENGTHS * float(np.max(tau)))}"}
                    if max_seconds is not None:
                        left = max_seconds - (time.perf_counter() - t0)
                        post["budget_left"] = f"{max(left, 0.0):.0f}s"
                    bar.set_postfix(post, refresh=False)
            if (
                max_seconds is not None
                and kept >= MIN_KEPT
                and done < steps
                and time.perf_counter() - t0 >= max_seconds
            ):
                stopped = "time budget"
                break
        done = sampler.iteration
        discard = _discard(done, steps, burn)
        tau = sampler.get_autocorr_time(discard=discard, quiet=True)
    finally:
        bar.close()
        logger.setLevel(level)
    chain = sampler.get_chain(discard=discard)  # [S, W, n], unit box
    flat = problem.from_unit(chain.reshape(-1, n))
    q05, q95 = np.quantile(flat, [0.05, 0.95], axis=0)
    observed = [j for j in range(len(problem.outputs)) if not np.all(np.isnan(problem.y[:, j]))]
    diagnostics = MCMCDiagnostics(
        walkers=walkers,
        steps=done,
        burn=discard,
        acceptance=float(np.mean(sampler.acceptance_fraction)),
        autocorr_time=tuple(_finite(x) for x in tau),
        ess=tuple(_finite(chain.shape[0] * walkers / max(x, 1.0)) for x in tau),
        rhat=tuple(_finite(x) for x in _rhat(chain)),
        chain_over_50_tau=bool(chain.shape[0] >= TAU_LENGTHS * float(np.max(tau))),
        max_steps=steps,
        stopped=stopped,
        max_seconds=None if max_seconds is None else float(max_seconds),
        noise_model=noise_model,
        noise_ar1_rho=None
        if rho is None
        else {problem.outputs[j]: float(rho[j]) for j in observed},
    )
    return MCMCRun(
        samples=flat,
        mean=flat.mean(axis=0),
        std=flat.std(axis=0),
        q05=q05,
        q95=q95,
        diagnostics=diagnostics,
        warnings=tuple(mcmc_warnings(diagnostics, problem.fit)),
        rho=rho,
    )


def rms_band(n_observed: int, n_fit: int) -> tuple[float, float]:
    """The accepted range of the solver's RMS normalized residual at the estimate. With the right
    model and noise, the sum of squared normalized residuals at a least-squares optimum is
    chi-square with N - n_fit degrees of freedom (N observed points), so the RMS is sqrt(chi2 / N).
    The band is the wider of [0.5, 2] (a factor of 2 either side of 1) and that RMS's 0.1% and
    99.9% quantiles. The quantiles alone narrow to 0.89-1.11 at N = 400, but real noise is not
    exactly Gaussian nor independent in time, and a declared std is itself an estimate (a
    datasheet value): correct fits would fail. A noise misstated by 2x or more (4x in variance)
    is an error worth stopping for. The quantiles are the wider below ~20 points (e.g. 0.29-2 at
    N = 10 with two fitted values), where a chance RMS of 0.4 is no evidence of a wrong noise.
    """
    dof = max(n_observed - n_fit, 1)
    lo = math.sqrt(chi2.ppf(0.001, dof) / max(n_observed, 1))
    hi = math.sqrt(chi2.ppf(0.999, dof) / max(n_observed, 1))
    return min(lo, 0.5), max(hi, 2.0)


def correction_shift(
    best: LeastSquares,
    problem: Problem,
    sigma_fit: np.ndarray,
    sigma: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    y_solver: np.ndarray,
) -> float:
    """How far an output correction at the estimate would move it, to first order, in the
    standard errors the data allow (the largest over the fitted values): with residuals weighted
    by the noise s = sigma, the correction changes them by -(y_solver - mean) / s, and the
    Gauss-Newton step from an optimum (J^T r = 0) is -(J^T J)^-1 J^T of that change. The noise
    alone, not the model's stated std: a model that states wide intervals must not excuse its
    error. `best` was fitted with the noise `sigma_fit` and the model's std; its Jacobian's rows
    are re-weighted to s. mean, std [1, T, ny]: the model at the estimate; y_solver [1, T, ny]:
    the solver there."""
    mask = ~np.isnan(problem.y)
    s_fit = np.sqrt(sigma_fit[None, :] ** 2 + std[0] ** 2)[mask]
    s = np.broadcast_to(sigma[None, :], std[0].shape)[mask]
    change = -(y_solver[0] - mean[0])[mask] / s
    jac = best.jac * (s_fit / s)[:, None]
    if not (np.all(np.isfinite(change)) and np.all(np.isfinite(jac))):
        return math.inf
    cov = np.linalg.pinv(jac.T @ jac)
    se = np.sqrt(np.clip(np.diag(cov), 1e-300, None))
    return float(np.max(np.abs(cov @ (jac.T @ change)) / se))


def verify(
    surrogate,
    solver,
    problem: Problem,
    sigma: np.ndarray,
    thetas: np.ndarray,
    y_known: np.ndarray | None = None,
) -> tuple[Verification, np.ndarray, list[str]]:
    """Re-simulate candidates thetas [K, n_fit] (the estimate first) with the solver. Per candidate:
    the fraction of grid points where the solver lies within 2 stated stds of the surrogate mean,
    and the RMS normalized residual against the observations with each. Verified when, at the
    estimate, the fraction is >= 0.9, the solve succeeded, and the solver's RMS normalized
    residual lies in `rms_band` (outside it, the noise std is misstated or the model cannot fit
    the observations: the standard errors and intervals, which scale with the noise, are then
    wrong whatever the surrogate did). Returns the `Verification`, the solver at the estimate
    ([T, ny], for plots) and the warnings: why the estimate is unverified, and what to do.
    `y_known`: the solver at the estimate [T, ny], simulated already (not again)."""
    if y_known is None:
        y_solver, _ = solver.predict(problem, thetas)
    elif len(thetas) > 1:
        y_solver = np.concatenate([y_known[None], solver.predict(problem, thetas[1:])[0]])
    else:
        y_solver = y_known[None]
    mean, std = surrogate.predict(problem, thetas)
    mask = ~np.isnan(problem.y)
    within = (np.abs(y_solver - mean) <= 2 * std)[:, mask].mean(axis=1)
    r_solver = residuals(problem, y_solver, np.zeros_like(std), sigma)  # [K, N], mask's row order
    chi_solver = np.sqrt(np.mean(r_solver**2, axis=1))
    chi_surrogate = np.sqrt(np.mean(residuals(problem, mean, std, sigma) ** 2, axis=1))
    failed = ~np.all(np.isfinite(y_solver[:, mask]), axis=1)
    n_observed = int(mask.sum())
    lo, hi = rms_band(n_observed, problem.n_fit)
    observed = [j for j in range(len(problem.outputs)) if mask[:, j].any()]
    column = np.nonzero(mask)[1]  # the output of each residual: which output's noise is off
    by_output = {
        problem.outputs[j]: float(np.sqrt(np.mean(r_solver[0, column == j] ** 2))) for j in observed
    }
    warns = []
    if failed[0]:  # its residuals are BAD, not a noise level: no band to compare
        warns.append(
            "unverified: the solver failed at the estimate (see "
            "verification.solver_failed): the physics cannot be simulated there; check "
            "the bounds"
        )
    elif not lo <= chi_solver[0] <= hi:
        declared = [problem.outputs[j] for j in observed if not np.isnan(problem.noise[j])]
        noise = f"declared for {', '.join(declared)}" if declared else "estimated"
        if declared and len(declared) < len(observed):
            noise += ", estimated for the others"
        detail = ""
        if len(by_output) > 1:
            detail = f" ({', '.join(f'{k} {v:.3g}' for k, v in by_output.items())})"
        head = (
            f"unverified: the solver's RMS normalized residual at the estimate is "
            f"{chi_solver[0]:.3g}{detail}, outside the {lo:.2g}-{hi:.2g} accepted for "
            f"{n_observed} observed points (noise std {noise}): "
        )
        if chi_solver[0] > hi:
            warns.append(
                head + "the observations lie further from the physics than the noise "
                "allows, so either the noise std is too small or the model cannot "
                "reproduce the observations (physics, inputs, fixed parameters, or "
                "bounds that exclude the truth), and the standard errors and intervals "
                "are too narrow. Check the noise std against the sensor's; if it is "
                "right, the model is wrong here (leaving the noise out would only hide "
                "that: an estimated noise absorbs the misfit)"
            )
        else:
            warns.append(
                head + "the observations lie closer to the physics than the noise "
                "allows, so the noise std is too large, and the standard errors and "
                "intervals are too wide. Check the noise std (leave it out to have it "
                "estimated)"
            )
    if within[0] < 0.9:
        warns.append(
            f"unverified: {100 * within[0]:.0f}% of the solver's points at the estimate "
            "lie within 2 stated stds of the surrogate (90% needed): the surrogate is "
            "overconfident there (see verification); use corrections (the solver's "
            "output correction) or refine, or retrain the model with data near the "
            "estimate"
        )
    verification = Verification(
        n_candidates=int(len(thetas)),
        within_2std=tuple(within.tolist()),
        rms_residual_solver=tuple(chi_solver.tolist()),
        rms_residual_surrogate=tuple(chi_surrogate.tolist()),
        rms_residual_solver_by_output=by_output,
        rms_residual_band=(lo, hi),
        n_observed=n_observed,
        solver_failed=tuple(failed.tolist()),
        verified=not warns,
    )
    return verification, y_solver[0], warns


def calibrate(
    problem: Problem,
    surrogate,
    solver,
    *,
    backend: Literal["surrogate", "solver"] = "surrogate",
    n_starts: int = 8,
    max_nfev: int = 60,
    mcmc: dict[str, Any] | None = None,
    verify_samples: int = 8,
    refine_nfev: int = 0,
    corrections: int = 2,
    slopes: bool = True,
    correction_tol: float = 0.1,
    seed: int = 0,
) -> CalibrationResult:
    """The whole loop. backend="surrogate": least squares (and MCMC when `mcmc` is given) on the
    surrogate, then solver verification (and optional solver-in-the-loop refinement from the
    surrogate's optimum). backend="solver": the same least squares, same starts, on the solver.

    `mcmc`: None for no MCMC, else `posterior`'s settings by name (walkers, steps, burn,
    noise_model, max_seconds as in MCMC_DEFAULTS, which fills the ones left out; progress);
    an unknown name is a ValueError. The diagnostics (with the AR(1) correlations,
    "noise_ar1_rho", the steps run and why the chain stopped) come back in `diagnostics`.

    `corrections` > 0 (surrogate backend): after the multi-start fit, the solver simulates the
    estimate, the difference to the surrogate becomes an additive output correction, and the fit
    restarts from the estimate on the corrected surrogate; repeated `corrections` times (one
    solver simulation each). This removes the surrogate's systematic error near the optimum,
    which its per-point std cannot describe (the error is correlated in time), so estimates and
    credible intervals follow the physics. With `slopes`, the last round also measures the
    correction's slope (n_fit more simulations, secant steps of SLOPE_STEP in the unit box, solved
    with the estimate in one stacked solve): the corrected surrogate then has the solver's
    sensitivities at the estimate, which set the posterior's width. MCMC and verification then
    use the corrected surrogate. Each round first measures how far its correction would move
    the estimate (`correction_shift`, to first order, in standard errors); at most
    `correction_tol`, the corrections end there: the model already agrees with the solver at its
    estimate to within what the data can tell apart, and that solve verifies the estimate. A
    surrogate accurate at the estimate then costs one solve, an inaccurate one every round.

    Outputs with no declared noise std: a first fit with a rough scale gives a first estimate, and
    the noise is estimated from the residuals there (`estimate_noise`). With the surrogate backend
    that residual is the surrogate's, which holds the surrogate's error too, so it only weights the
    fit until the solver's is there: each correction round re-estimates it from the solver at its
    estimate (simulated anyway), and finally the solver simulates the final estimate once more
    (one solve), whose residual gives the noise, and the fit restarts from the estimate with it
    (surrogate calls only). The surrogate's stated std is never subtracted: see `estimate_noise`.
    The result's `warnings` hold the problem's warnings, every MCMC diagnostic outside its accepted
    range (`mcmc_warnings`) and every reason the solver did not verify the estimate (`verify`).
    Its arrays for plots: `samples` (posterior samples [S, n_fit]), `y_solver` (the solver at the
    estimate, [T, ny]) and `mean`, `std` (the calibrated prediction at the estimate, [T, ny])."""
    if backend not in ("surrogate", "solver"):
        raise ValueError(f"backend must be 'surrogate' or 'solver', got {backend!r}")
    if mcmc is not None:
        unknown_keys = sorted(set(mcmc) - {*MCMC_DEFAULTS, "progress"})
        if unknown_keys:
            raise ValueError(
                f"mcmc: unknown settings {unknown_keys}; valid: "
                f"{', '.join([*MCMC_DEFAULTS, 'progress'])}"
            )
    engine = surrogate if backend == "surrogate" else solver
    t_start = time.perf_counter()
    z0s = starts(problem, n_starts, seed)
    sigma = problem.noise.copy()
    unknown = bool(np.isnan(sigma).any())
    blind: list[int] = []
    if unknown:  # a first fit with a rough scale, then the noise from its residuals
        rough = np.where(np.isnan(sigma), 0.05 * np.nanstd(problem.y, axis=0) + 1e-12, sigma)
        first = point_estimate(engine, problem, rough, z0s, max_nfev=max_nfev)
        # the solver's residual when it is the engine; else the surrogate's, provisional (an
        # upper bound: the surrogate's error is in it) until the solver simulates the estimate
        y_first, _ = engine.predict(problem, first.theta[None])
        # an output the model cannot predict there (no finite value) keeps the rough scale, said
        # in a warning, as a fit with the noise given answers (its verification fails there)
        blind = unpredicted(problem, y_first[0])
        given = problem.noise.copy()
        given[blind] = rough[blind]
        sigma = estimate_noise(problem, y_first[0], given)
        z0s = np.vstack([first.z[None], z0s[: max(0, n_starts - 1)]])
    t0, model_s = time.perf_counter(), engine.seconds
    best = point_estimate(engine, problem, sigma, z0s, max_nfev=max_nfev)
    multistart_s = time.perf_counter() - t0  # the fit before any correction
    multistart_model_s = engine.seconds - model_s  # of which, inside the model's calls
    raw_estimate = best.theta
    history: list[dict[str, float]] = []
    shifts: list[float] = []
    y_known: np.ndarray | None = None  # the solver at the final estimate, when a round has it
    if backend == "surrogate":
        for round_ in range(corrections):
            z = best.z
            zs = z[None]
            if slopes and round_ == corrections - 1:
                steps = _fd_steps(z, SLOPE_STEP)
                zs = np.vstack([z[None], z[None] + np.diag(steps)])
            y_solver, _ = solver.predict(problem, problem.from_unit(zs), together=len(zs) > 1)
            if len(zs) > 1 and not np.all(
                np.isfinite(y_solver)
            ):  # a stacked solve fails as a whole
                y_solver, _ = solver.predict(problem, problem.from_unit(zs))
            if not np.all(np.isfinite(y_solver[0])):
                break  # the solver failed there: keep the last estimate (verification reports it)
            sigma_fit = sigma
            if unknown:  # the refit weighs by the solver's residual (simulated anyway)
                sigma = estimate_noise(problem, y_solver[0], problem.noise)
                blind = []  # the solver's finite prediction (checked above) estimated them all
            at_z = engine.predict(problem, problem.from_unit(z[None]))
            shifts.append(correction_shift(best, problem, sigma_fit, sigma, *at_z, y_solver[:1]))
            if shifts[-1] <= correction_tol:
                # the engine already agrees with the solver at its estimate to within what the
                # data can tell apart: a correction would move the estimate by a fraction of a
                # standard error, and this solve verifies the estimate (unchanged: no refit)
                if unknown:  # a refit with the solver's noise (surrogate calls only)
                    best = point_estimate(engine, problem, sigma, z[None], max_nfev=max_nfev)
                else:
                    y_known = y_solver[0]
                break
            mean, _ = surrogate.predict(problem, problem.from_unit(zs))
            d = y_solver - mean
            slope = None
            if len(zs) > 1 and np.all(np.isfinite(d)):
                slope = (d[1:] - d[:1]) / steps[:, None, None]
            engine = CorrectedSurrogate(surrogate, d[0], z0=z, slope=slope)
            best = point_estimate(engine, problem, sigma, z[None], max_nfev=max_nfev)
            history.append(dict(zip(problem.fit, best.theta.tolist())))
        else:  # every round ran (after a failed solve, the same point would only fail again)
            if unknown and corrections:
                # the noise from the solver at the final estimate: the rounds' solves lie one refit
                # behind it, where the residual still holds that estimate's error (the test
                # pendulum's first corrected estimate, 22% off in damping, gave 1.6x the noise)
                y_solver, _ = solver.predict(problem, best.theta[None])
                if np.all(np.isfinite(y_solver[0])):  # else verification reports the failed solve
                    sigma = estimate_noise(problem, y_solver[0], problem.noise)
                    blind = []
                    # a refit from the estimate with that noise (surrogate calls only): the
                    # weights, the standard errors and the posterior scale with it
                    best = point_estimate(engine, problem, sigma, best.z[None], max_nfev=max_nfev)
    least_squares_s = time.perf_counter() - t0
    observed = [j for j in range(len(problem.outputs)) if not np.all(np.isnan(problem.y[:, j]))]
    warns = list(problem.warnings) + [
        f"noise.{problem.outputs[j]}: not estimated: the model predicts no finite value at the "
        f"first estimate (far outside what it can predict?), so the fit weighs it by 5% of the "
        f"observations' std ({sigma[j]:.3g}); give the noise std"
        for j in blind
    ]
    samples = np.zeros((0, problem.n_fit))
    run: MCMCRun | None = None
    mcmc_s: float | None = None
    verification_s: float | None = None
    refine_s: float | None = None
    if mcmc is not None and backend == "surrogate":
        t0 = time.perf_counter()
        run = posterior(
            engine, problem, sigma, best.z, seed=seed, cov_z=best.cov_z, **{**MCMC_DEFAULTS, **mcmc}
        )
        mcmc_s = time.perf_counter() - t0
        samples = run.samples
        warns += run.warnings
    verification: Verification | None = None
    y_solver_at_estimate: np.ndarray | None = None
    refined: np.ndarray | None = None
    if backend == "surrogate":
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed + 1)
        picks = (
            samples[rng.choice(len(samples), size=min(verify_samples, len(samples)), replace=False)]
            if len(samples)
            else samples
        )
        verification, y_solver_at_estimate, why = verify(
            engine, solver, problem, sigma, np.vstack([best.theta[None], picks]), y_known
        )
        warns += why
        if engine is not surrogate:  # how far the uncorrected surrogate was from the solver there
            raw_mean, raw_std = surrogate.predict(problem, best.theta[None])
            mask = ~np.isnan(problem.y)
            within = np.abs(y_solver_at_estimate - raw_mean[0]) <= 2 * raw_std[0]
            verification = replace(verification, uncorrected_within_2std=float(within[mask].mean()))
        verification_s = time.perf_counter() - t0
        if refine_nfev > 0:
            t0 = time.perf_counter()
            ref = point_estimate(solver, problem, sigma, best.z[None], max_nfev=refine_nfev)
            refined = ref.theta
            refine_s = time.perf_counter() - t0
    mean, std = engine.predict(problem, best.theta[None])  # the calibrated prediction, for plots
    timings = Timings(
        multistart_s=multistart_s,
        multistart_model_s=multistart_model_s,
        least_squares_s=least_squares_s,
        mcmc_s=mcmc_s,
        verification_s=verification_s,
        refine_s=refine_s,
        total_s=time.perf_counter() - t_start,
    )
    evaluations = Evaluations(
        surrogate_calls=surrogate.calls if surrogate else 0,
        surrogate_scenarios=surrogate.scenarios if surrogate else 0,
        surrogate_s=surrogate.seconds if surrogate else 0.0,
        solver_calls=solver.calls,
        solver_scenarios=solver.scenarios,
        solver_s=solver.seconds,
    )
    estimates = {
        name: Estimate(
            value=float(best.theta[i]),
            std_error=float(best.std_error[i]),
            bounds=(float(problem.lower[i]), float(problem.upper[i])),
            uncorrected=float(raw_estimate[i]),
            posterior=None
            if run is None
            else Posterior(
                mean=float(run.mean[i]),
                std=float(run.std[i]),
                q05=float(run.q05[i]),
                q95=float(run.q95[i]),
            ),
            refined=None if refined is None else float(refined[i]),
        )
        for i, name in enumerate(problem.fit)
    }
    return CalibrationResult(
        backend=backend,
        fit=tuple(problem.fit),
        estimates=estimates,
        cost=best.cost,
        starts=best.starts,
        corrections=tuple(history),
        correction_shifts=tuple(shifts),
        noise={problem.outputs[j]: float(sigma[j]) for j in observed},
        noise_estimated=tuple(
            problem.outputs[j] for j in observed if np.isnan(problem.noise[j]) and j not in blind
        ),
        warnings=tuple(warns),
        timings=timings,
        evaluations=evaluations,
        mean=mean[0],
        std=std[0],
        y_solver=y_solver_at_estimate,
        samples=None if run is None else run.samples,
        diagnostics=None if run is None else run.diagnostics,
        verification=verification,
    )
