"""The reference solver: scipy.integrate.solve_ivp around a PhysicsSystem.

Two ways to solve many scenarios:

- `solve_looped`: one solve_ivp call per scenario. Each scenario gets its own step-size control and
  its own failure record; this is what dataset generation uses.
- `solve_stacked`: all scenarios in one solve_ivp call on the stacked state [N * nx] with a
  vectorized right-hand side (block-diagonal Jacobian sparsity for the implicit methods). This is
  the strong baseline surrogates are measured against.

A failure (non-finite state, divergence, too many right-hand-side evaluations, the solver's own
failure) is recorded per scenario with its reason; it never raises out of the batch, and the
failed scenario's rows are NaN with `status != 0` so no NaN is ever unmarked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.integrate import solve_ivp

from twin_ml.physics.signals import interpolator
from twin_ml.physics.system import SOLVER_METHODS, PhysicsSystem

# status codes stored per scenario in datasets
OK, FAILED_SOLVER, FAILED_NONFINITE, FAILED_DIVERGED, FAILED_MAX_STEPS = 0, 1, 2, 3, 4
STATUS_NAMES = {
    OK: "ok",
    FAILED_SOLVER: "solver failure",
    FAILED_NONFINITE: "non-finite state or derivative",
    FAILED_DIVERGED: "diverged",
    FAILED_MAX_STEPS: "too many steps",
}


@dataclass(frozen=True)
class SolverSettings:
    """solve_ivp settings.

    `method=None` takes the system's preferred solver. `max_rhs_evals` bounds the work of one
    scenario (a solve that needs more is recorded as "too many steps", not left running).
    """

    method: str | None = None
    rtol: float = 1e-6
    atol: float = 1e-8
    max_step: float = math.inf
    max_rhs_evals: int = 200_000

    def __post_init__(self):
        if self.method is not None and self.method not in SOLVER_METHODS:
            raise ValueError(f"solver.method must be one of {SOLVER_METHODS} (or null), got {self.method!r}")
        for k in ("rtol", "atol", "max_step"):
            if not getattr(self, k) > 0:
                raise ValueError(f"solver.{k} must be > 0, got {getattr(self, k)}")
        if self.max_rhs_evals < 1:
            raise ValueError(f"solver.max_rhs_evals must be >= 1, got {self.max_rhs_evals}")

    def resolved(self, system: PhysicsSystem) -> "SolverSettings":
        return self if self.method else SolverSettings(**{**asdict(self), "method": system.solver})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_step"] = None if math.isinf(self.max_step) else self.max_step
        return d


@dataclass
class SolveResult:
    """Trajectories of a batch: x [N, T, nx], y [N, T, ny]; status [N] (0 = ok); reasons [N]."""

    x: np.ndarray
    y: np.ndarray
    status: np.ndarray
    reasons: list[str]
    nfev: np.ndarray  # [N] right-hand-side evaluations (per scenario; stacked: the shared count)

    @property
    def n_failed(self) -> int:
        return int((self.status != OK).sum())


class _Abort(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _check_batch(system: PhysicsSystem, t, u, p, x0):
    t = np.asarray(t, dtype=np.float64)
    u, p, x0 = (np.asarray(a, dtype=np.float64) for a in (u, p, x0))
    nx, nu, n_p = len(system.states), len(system.inputs), len(system.parameters)
    if t.ndim != 1 or t.size < 2 or not np.all(np.diff(t) > 0):
        raise ValueError(f"t must be a strictly increasing 1-D grid of >= 2 times, got shape {t.shape}")
    n = x0.shape[0] if x0.ndim == 2 else -1
    expect = {"x0": ((n, nx), x0), "p": ((n, n_p), p), "u": ((n, t.size, nu), u)}
    for name, (shape, a) in expect.items():
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (N, ...), got {a.shape}")
    return t, u, p, x0


def solve_looped(system: PhysicsSystem, t, u, p, x0, settings: SolverSettings = SolverSettings()) -> SolveResult:
    """One solve_ivp call per scenario: t [T], u [N, T, nu], p [N, np], x0 [N, nx]."""
    t, u, p, x0 = _check_batch(system, t, u, p, x0)
    settings = settings.resolved(system)
    n, nx = x0.shape
    zoh = np.array([i.interpolation == "zoh" for i in system.inputs], dtype=bool)
    x = np.full((n, t.size, nx), np.nan)
    status = np.zeros(n, dtype=np.int8)
    reasons = [""] * n
    nfev = np.zeros(n, dtype=np.int64)
    for i in range(n):
        xi, status[i], reasons[i], nfev[i] = _solve_one(system, t, u[i], p[i], x0[i], zoh, settings)
        if status[i] == OK:
            x[i] = xi
    return _finish(system, t, u, p, x, status, reasons, nfev)


def _guard(count: list[int], settings: SolverSettings, limit: float, tt: float, xx: np.ndarray) -> None:
    """Count a right-hand-side call and abort on too many calls, non-finite or diverged states."""
    count[0] += 1
    if count[0] > settings.max_rhs_evals:
        raise _Abort(FAILED_MAX_STEPS, f"more than {settings.max_rhs_evals} right-hand-side evaluations (t={tt:.6g})")
    m = np.max(np.abs(xx))
    if not m <= limit:  # also true for NaN
        if np.isfinite(m):
            raise _Abort(FAILED_DIVERGED, f"|state| exceeded {limit:g} at t={tt:.6g}")
        raise _Abort(FAILED_NONFINITE, f"non-finite state at t={tt:.6g}")


def _solve_one(system, t, u, p, x0, zoh, settings):
    count = [0]
    u_at = interpolator(t, u, zoh)

    def f(tt, xx):
        _guard(count, settings, system.divergence_limit, tt, xx)
        dx = system.rhs(tt, xx, u_at(tt), p)
        if not np.isfinite(dx).all():
            raise _Abort(FAILED_NONFINITE, f"non-finite derivative at t={tt:.6g}")
        return dx

    try:
        with np.errstate(all="ignore"):
            sol = solve_ivp(
                f, (t[0], t[-1]), x0, method=settings.method, t_eval=t,
                rtol=settings.rtol, atol=settings.atol, max_step=settings.max_step,
            )
    except _Abort as e:
        return None, e.status, e.reason, count[0]
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as e:
        return None, FAILED_SOLVER, f"{type(e).__name__}: {e}", count[0]
    if not sol.success:
        return None, FAILED_SOLVER, str(sol.message), count[0]
    if sol.y.shape[1] != t.size or not np.all(np.isfinite(sol.y)):
        return None, FAILED_NONFINITE, "non-finite or missing values in the solution", count[0]
    return sol.y.T, OK, "", count[0]


def solve_stacked(system: PhysicsSystem, t, u, p, x0, settings: SolverSettings = SolverSettings()) -> SolveResult:
    """All N scenarios in one solve_ivp call on the stacked state [N * nx].

    The error norm is shared, so step sizes follow the hardest scenario. A failure fails the
    whole batch (recorded for every scenario).
    """
    t, u, p, x0 = _check_batch(system, t, u, p, x0)
    settings = settings.resolved(system)
    n, nx = x0.shape
    zoh = np.array([i.interpolation == "zoh" for i in system.inputs], dtype=bool)
    count = [0]
    u_at = interpolator(t, u, zoh)

    def f(tt, xx):
        _guard(count, settings, system.divergence_limit, tt, xx)
        return system.rhs(tt, xx.reshape(n, nx), u_at(tt), p).reshape(-1)

    kwargs: dict[str, Any] = {}
    if settings.method in ("Radau", "BDF"):
        from scipy.sparse import block_diag

        kwargs["jac_sparsity"] = block_diag([np.ones((nx, nx))] * n, format="csc")
    elif settings.method == "LSODA":
        kwargs.update(lband=nx - 1, uband=nx - 1)  # block diagonal => banded
    x = np.full((n, t.size, nx), np.nan)
    status = np.zeros(n, dtype=np.int8)
    try:
        with np.errstate(all="ignore"):
            sol = solve_ivp(
                f, (t[0], t[-1]), x0.reshape(-1), method=settings.method, t_eval=t,
                rtol=settings.rtol, atol=settings.atol, max_step=settings.max_step, **kwargs,
            )
        if not sol.success:
            raise _Abort(FAILED_SOLVER, str(sol.message))
        x = sol.y.reshape(n, nx, t.size).transpose(0, 2, 1).copy()
        reasons = [""] * n
    except _Abort as e:
        status[:], reasons = e.status, [e.reason] * n
    bad = ~np.all(np.isfinite(x), axis=(1, 2)) & (status == OK)
    status[bad] = FAILED_NONFINITE
    reasons = [r or ("non-finite values in the solution" if bad[i] else "") for i, r in enumerate(reasons)]
    return _finish(system, t, u, p, x, status, reasons, np.full(n, count[0], dtype=np.int64))


def _finish(system, t, u, p, x, status, reasons, nfev) -> SolveResult:
    n, T, _ = x.shape
    ny = len(system.outputs)
    y = np.full((n, T, ny), np.nan)
    ok = status == OK
    if ok.any():
        with np.errstate(all="ignore"):
            y[ok] = system.observe(x[ok], u[ok], p[ok][:, None, :])
        bad = ok & ~np.all(np.isfinite(y), axis=(1, 2))
        for i in np.flatnonzero(bad):
            status[i], reasons[i] = FAILED_NONFINITE, "non-finite observation"
    x[status != OK] = np.nan
    y[status != OK] = np.nan
    return SolveResult(x=x, y=y, status=status, reasons=reasons, nfev=nfev)
