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
import os
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
    max_step: float | None = math.inf  # None = no limit
    max_rhs_evals: int = 200_000

    def __post_init__(self):
        if self.max_step is None:  # JSON/YAML null: no limit
            object.__setattr__(self, "max_step", math.inf)
        if self.method is not None and self.method not in SOLVER_METHODS:
            raise ValueError(
                f"solver.method must be one of {SOLVER_METHODS} (or null), got {self.method!r}"
            )
        for k in ("rtol", "atol", "max_step"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"solver.{k} must be > 0, got {getattr(self, k)}")
        if (
            isinstance(self.max_rhs_evals, bool)
            or not isinstance(self.max_rhs_evals, int)
            or self.max_rhs_evals < 1
        ):
            raise ValueError(f"solver.max_rhs_evals must be >= 1, got {self.max_rhs_evals}")

    def resolved(self, system: PhysicsSystem) -> SolverSettings:
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


def _check_batch(system: PhysicsSystem, t, u, p, x0, t_out):
    t = np.asarray(t, dtype=np.float64)
    u, p, x0 = (np.asarray(a, dtype=np.float64) for a in (u, p, x0))
    nx, nu, n_p = len(system.states), len(system.inputs), len(system.parameters)
    if t.ndim != 1 or t.size < 2 or not np.all(np.diff(t) > 0):
        raise ValueError(
            f"t must be a strictly increasing 1-D grid of >= 2 times, got shape {t.shape}"
        )
    n = x0.shape[0] if x0.ndim == 2 else -1
    expect = {"x0": ((n, nx), x0), "p": ((n, n_p), p), "u": ((n, t.size, nu), u)}
    for name, (shape, a) in expect.items():
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (N, ...), got {a.shape}")
    x0 = np.asarray(system.initial_state(x0), dtype=np.float64)  # a field system's whole field
    if t_out is None:
        t_out = t
    else:
        t_out = np.asarray(t_out, dtype=np.float64)
        if t_out.ndim != 1 or t_out.size < 1 or np.any(np.diff(t_out) <= 0):
            raise ValueError(
                f"t_out must be a strictly increasing 1-D array, got shape {t_out.shape}"
            )
        if t_out[0] < t[0] or t_out[-1] > t[-1]:
            raise ValueError(
                f"t_out must lie inside the input grid [{t[0]}, {t[-1]}], "
                f"got [{t_out[0]}, {t_out[-1]}]"
            )
    return t, u, p, x0, t_out


def _segments(t: np.ndarray, u: np.ndarray, zoh: np.ndarray) -> list[tuple[int, int]]:
    """Grid-index intervals [ka, kb] between changes of any held (zoh) input.

    A held input jumps where its value changes; an adaptive solver can step right over a jump
    (a short pulse vanishes), so each interval is integrated on its own, restarting at the jump.
    Linear inputs only have kinks, which error control handles.
    """
    last = t.size - 1
    if not zoh.any():
        return [(0, last)]
    uz = np.moveaxis(u[..., zoh], -2, 0)  # [T, ..., n_zoh]
    changed = np.flatnonzero((uz[1:] != uz[:-1]).reshape(last, -1).any(axis=1)) + 1
    cuts = [0, *changed.tolist()]
    if cuts[-1] != last:
        cuts.append(last)
    return list(zip(cuts[:-1], cuts[1:]))


def _integrate(make_f, t, t_out, y0, settings, segments, **kwargs) -> np.ndarray:
    """solve_ivp over each segment in turn; the states at t_out, [state, len(t_out)]."""
    out = np.empty((y0.size, t_out.size))
    y, filled = y0, 0
    for ka, kb in segments:
        stop = int(np.searchsorted(t_out, t[kb], side="right"))
        want = t_out[filled:stop]
        t_eval = np.union1d(want, [t[kb]])
        sol = solve_ivp(
            make_f(kb - 1),
            (t[ka], t[kb]),
            y,
            method=settings.method,
            t_eval=t_eval,
            rtol=settings.rtol,
            atol=settings.atol,
            max_step=settings.max_step,
            **kwargs,
        )
        if not sol.success:
            raise _Abort(FAILED_SOLVER, str(sol.message))
        if sol.y.shape[1] != t_eval.size:
            raise _Abort(FAILED_SOLVER, "the solver stopped before the end of the horizon")
        out[:, filled:stop] = sol.y[:, np.searchsorted(t_eval, want)]
        y, filled = sol.y[:, -1], stop
    if not np.all(np.isfinite(out)):
        raise _Abort(FAILED_NONFINITE, "non-finite values in the solution")
    return out


def _guard(
    count: list[int], settings: SolverSettings, limit: float, tt: float, xx: np.ndarray
) -> None:
    """Count a right-hand-side call and abort on too many calls, non-finite or diverged states."""
    count[0] += 1
    if count[0] > settings.max_rhs_evals:
        raise _Abort(
            FAILED_MAX_STEPS,
            f"more than {settings.max_rhs_evals} right-hand-side evaluations (t={tt:.6g})",
        )
    m = np.max(np.abs(xx))
    if not m <= limit:  # also true for NaN
        if np.isfinite(m):
            raise _Abort(FAILED_DIVERGED, f"|state| exceeded {limit:g} at t={tt:.6g}")
        raise _Abort(FAILED_NONFINITE, f"non-finite state at t={tt:.6g}")


def solve_looped(
    system: PhysicsSystem, t, u, p, x0, settings: SolverSettings = SolverSettings(), *, t_out=None
) -> SolveResult:
    """One solve_ivp call per scenario: t [T], u [N, T, nu], p [N, np], x0 [N, nx].

    Inputs are given on the grid `t`; states and outputs come back at `t_out` (default: `t`),
    x [N, len(t_out), nx].
    """
    t, u, p, x0, t_out = _check_batch(system, t, u, p, x0, t_out)
    settings = settings.resolved(system)
    n, nx = x0.shape
    zoh = _zoh_mask(system)
    x = np.full((n, t_out.size, nx), np.nan)
    status = np.zeros(n, dtype=np.int8)
    reasons = [""] * n
    nfev = np.zeros(n, dtype=np.int64)
    kwargs = _implicit_kwargs(system, settings, 1)
    for i in range(n):
        count = [0]
        u_at = interpolator(t, u[i], zoh)

        def make_f(k_max, u_at=u_at, count=count, p_i=p[i]):
            def f(tt, xx):
                _guard(count, settings, system.divergence_limit, tt, xx)
                dx = system.rhs(tt, xx, u_at(tt, k_max), p_i)
                if not np.isfinite(dx).all():
                    raise _Abort(FAILED_NONFINITE, f"non-finite derivative at t={tt:.6g}")
                return dx

            return f

        try:
            with np.errstate(all="ignore"):
                x[i] = _integrate(
                    make_f, t, t_out, x0[i], settings, _segments(t, u[i], zoh), **kwargs
                ).T
        except _Abort as e:
            status[i], reasons[i] = e.status, e.reason
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as e:
            status[i], reasons[i] = FAILED_SOLVER, f"{type(e).__name__}: {e}"
        nfev[i] = count[0]
    return _finish(system, t, u, p, x, status, reasons, nfev, t_out)


def solve_stacked(
    system: PhysicsSystem, t, u, p, x0, settings: SolverSettings = SolverSettings(), *, t_out=None
) -> SolveResult:
    """All N scenarios in one solve_ivp call on the stacked state [N * nx].

    The error norm is shared, so step sizes follow the hardest scenario; held inputs restart the
    integration wherever any scenario's held input changes. A failure fails the whole batch
    (recorded for every scenario).
    """
    t, u, p, x0, t_out = _check_batch(system, t, u, p, x0, t_out)
    settings = settings.resolved(system)
    n, nx = x0.shape
    zoh = _zoh_mask(system)
    count = [0]
    u_at = interpolator(t, u, zoh)

    def make_f(k_max):
        def f(tt, xx):
            _guard(count, settings, system.divergence_limit, tt, xx)
            return system.rhs(tt, xx.reshape(n, nx), u_at(tt, k_max), p).reshape(-1)

        return f

    kwargs = _implicit_kwargs(system, settings, n)
    x = np.full((n, t_out.size, nx), np.nan)
    status = np.zeros(n, dtype=np.int8)
    reasons = [""] * n
    try:
        with np.errstate(all="ignore"):
            y = _integrate(
                make_f, t, t_out, x0.reshape(-1), settings, _segments(t, u, zoh), **kwargs
            )
        x = y.reshape(n, nx, t_out.size).transpose(0, 2, 1).copy()
    except _Abort as e:
        status[:], reasons = e.status, [e.reason] * n
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as e:
        status[:], reasons = FAILED_SOLVER, [f"{type(e).__name__}: {e}"] * n
    return _finish(system, t, u, p, x, status, reasons, np.full(n, count[0], dtype=np.int64), t_out)


def _implicit_kwargs(system: PhysicsSystem, settings: SolverSettings, n: int) -> dict[str, Any]:
    """What the implicit methods get for n stacked scenarios: BDF and Radau the Jacobian's
    sparsity (block diagonal, each block the system's own pattern, dense if it declares none),
    LSODA its bandwidth."""
    nx = system.state_size
    pattern = system.jacobian_sparsity()
    from scipy.sparse import csc_matrix, identity, kron

    if settings.method in ("Radau", "BDF"):
        if pattern is None and n == 1:
            return {}  # one dense block: scipy's own dense Jacobian
        block = csc_matrix(np.ones((nx, nx)) if pattern is None else pattern, dtype=bool)
        if block.shape != (nx, nx):
            raise ValueError(
                f"{type(system).__name__}.jacobian_sparsity() has shape {block.shape}, "
                f"the system has {nx} states"
            )
        return {"jac_sparsity": kron(identity(n, format="csc"), block, format="csc")}
    if settings.method == "LSODA" and n > 1:
        if pattern is None:
            return {"lband": nx - 1, "uband": nx - 1}  # block diagonal => banded
        rows, cols = csc_matrix(pattern).nonzero()
        return {
            "lband": int(max(0, (rows - cols).max())),
            "uband": int(max(0, (cols - rows).max())),
        }
    return {}


def solve_pooled(
    system: PhysicsSystem,
    t,
    u,
    p,
    x0,
    settings: SolverSettings = SolverSettings(),
    *,
    t_out=None,
    workers: int | None = None,
    stacked: bool = True,
    chunk: int | None = None,
) -> SolveResult:
    """The scenarios split over a process pool of `workers` (default: every core), each part
    solved stacked (or looped): the parallel baseline a user with several cores could run.
    `chunk`: parts of at most this many scenarios (default: one part per worker). Small stacks
    can be the fastest: they share the per-call overhead, while in a big one the stiffest
    scenario sets every scenario's steps and the sparse LU grows (heat_plate: 0.19 s per
    scenario stacked by 16, 0.40 s by 64).

    Same arguments and result as `solve_looped`; a part's failure is recorded for its scenarios
    only (stacked: for every scenario of that part)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t, u, p, _, t_out = _check_batch(system, t, u, p, x0, t_out)
    x0 = np.asarray(x0, dtype=np.float64)  # as declared: each part lifts its own
    n = x0.shape[0]
    n_proc = min(n, workers or os.cpu_count() or 1)
    solve = solve_stacked if stacked else solve_looped
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be an integer >= 1 or None, got {chunk!r}")
    n_parts = n_proc if chunk is None else max(n_proc, -(-n // chunk))
    if n_parts <= 1:
        return solve(system, t, u, p, x0, settings, t_out=t_out)
    parts = np.array_split(np.arange(n), n_parts)
    ctx = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    with ProcessPoolExecutor(n_proc, mp_context=ctx) as pool:
        futures = [
            pool.submit(solve, system, t, u[i], p[i], x0[i], settings, t_out=t_out) for i in parts
        ]
        results = [f.result() for f in futures]
    return SolveResult(
        x=np.concatenate([r.x for r in results]),
        y=np.concatenate([r.y for r in results]),
        status=np.concatenate([r.status for r in results]),
        reasons=[reason for r in results for reason in r.reasons],
        nfev=np.concatenate([r.nfev for r in results]),
    )


def _zoh_mask(system: PhysicsSystem) -> np.ndarray:
    return np.array([i.interpolation == "zoh" for i in system.inputs], dtype=bool)


def _finish(system, t, u, p, x, status, reasons, nfev, t_out) -> SolveResult:
    n, T, _ = x.shape
    ny = len(system.outputs)
    if t_out is not t:  # the inputs at the output times
        u = np.stack([interpolator(t, u, _zoh_mask(system))(tt) for tt in t_out], axis=-2)
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
