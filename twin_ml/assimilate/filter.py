"""Filtering a record: an ensemble of the twin's states (and, jointly, some of its parameters)
stepped by a forecast model and corrected by each measurement with `analysis.etkf` / `enkf`.

The forecast is any callable `forecast(X [N, nx], P [N, np], t0, t1, u0 [nu], u1 [nu]) -> X at
t1`; `SolverForecast` steps the physics system itself with its reference solver (a twin whose
physics is trusted, and the reference the exported ensemble's forecast is compared with). The
predicted measurements are the system's own observation function of the forecast states.

Joint state-parameter estimation: the parameters named in `FilterSettings.parameters` are part of
the filtered vector, in log space (they stay positive), and follow a random walk of std `walk`
per step (a relative change: 0.01 lets a parameter move ~1% per step), which is what lets the
filter follow a parameter that drifts.

Per step the result holds the one-step prediction (the forecast's predicted measurements, mean
and std with the measurement noise: what the twin expected to see), the filtered outputs (after
the measurement), the parameters' mean and std, and the normalized innovation squared (NIS):
chi-square with as many degrees of freedom as outputs were measured while the model explains the
data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from twin_ml.assimilate.analysis import enkf, etkf
from twin_ml.physics.solver import SolverSettings, solve_stacked

METHODS = ("etkf", "enkf")


@dataclass(frozen=True)
class FilterSettings:
    method: str = "etkf"
    members: int = 32
    inflation: float = 1.0  # multiplicative prior inflation (>= 1)
    parameters: tuple[str, ...] = ()  # estimated jointly with the state, in log space
    walk: float = 0.01  # the estimated parameters' random-walk std per step, relative
    seed: int = 0

    def check(self, parameter_names: list[str]) -> FilterSettings:
        if self.method not in METHODS:
            raise ValueError(f"filter.method must be one of {METHODS}, got {self.method!r}")
        if self.members < 2:
            raise ValueError(f"filter.members must be >= 2, got {self.members}")
        if not self.inflation >= 1:
            raise ValueError(f"filter.inflation must be >= 1, got {self.inflation}")
        if not self.walk >= 0:
            raise ValueError(f"filter.walk must be >= 0, got {self.walk}")
        unknown = sorted(set(self.parameters) - set(parameter_names))
        if unknown:
            raise ValueError(
                f"filter.parameters: unknown names {unknown}; declared: "
                f"{', '.join(parameter_names)}"
            )
        return self


class SolverForecast:
    """The physics system stepped over one interval for every member at once (its reference
    solver on the stacked states), inputs linear across the interval (held where the system
    holds them)."""

    def __init__(self, system, settings: SolverSettings = SolverSettings()):
        self.system, self.settings = system, settings

    def __call__(self, X, P, t0: float, t1: float, u0, u1) -> np.ndarray:
        n = len(X)
        u = np.broadcast_to(np.stack([u0, u1])[None], (n, 2, len(u0)))
        out = solve_stacked(self.system, np.array([t0, t1]), u, P, X, self.settings)
        if out.n_failed:
            raise RuntimeError(f"the forecast's solver failed: {out.reasons[0]}")
        return out.x[:, -1]


class OnnxForecast:
    """The exported ensemble as the forecast (torch-free): filter member i is stepped by the
    ensemble's network i mod M, from its own state (the file's `x_members` input, its `x_end`
    output), one grid interval of the model's dt per call. Within the interval the graph is
    given one input value: held inputs their value at the interval's start, linear ones the
    interval's midpoint value (exact for a flow map, which evaluates its network at the middle;
    second order for the RK4 kinds). Every network steps every member's state in one call (M x N
    member-intervals): the file's batch, one onnxruntime call per step."""

    def __init__(self, onnx: str | bytes, card, threads: int = 1):
        from twin_ml._ort import session
        from twin_ml.contract import ModelCard

        self.card = ModelCard.of(card)
        if "x_end" not in (self.card.interface or {}).get("outputs", {}):
            raise ValueError(
                f"model {self.card.name}:{self.card.version} ({self.card.kind}) does not take "
                "its members' states (x_members / x_end): filtering needs a state-space kind "
                "(node, hybrid, flowmap, flowmap_hybrid) exported by this version"
            )
        self.session = session(onnx, threads=threads)
        self.members, self.dt = self.card.members, self.card.time.dt
        self.held = np.array([v.interpolation == "zoh" for v in self.card.system.build().inputs])

    def __call__(self, X, P, t0: float, t1: float, u0, u1) -> np.ndarray:
        if not np.isclose(t1 - t0, self.dt, rtol=1e-6):
            raise ValueError(
                f"the model steps dt = {self.dt:g}; an interval of {t1 - t0:g} cannot be "
                "forecast (resample the telemetry onto the model's grid first)"
            )
        n, m = len(X), self.members
        u = np.where(self.held, u0, (np.asarray(u0) + np.asarray(u1)) / 2)
        feeds = {
            "x0": np.asarray(X, dtype=np.float32),
            "u": np.broadcast_to(u, (n, 1, len(u))).astype(np.float32),
            "p": np.asarray(P, dtype=np.float32),
            "x_members": np.broadcast_to(np.asarray(X), (m, *np.shape(X))).astype(np.float32),
        }
        (x_end,) = self.session.run(["x_end"], feeds)  # [M, N, nx]
        return x_end[np.arange(n) % m, np.arange(n)].astype(np.float64)


@dataclass
class FilterResult:
    """Per time step k (the first: the prior): `predicted_mean`/`predicted_std` [T, ny] the
    one-step prediction of the measurements (std with the measurement noise), `filtered_mean`/
    `filtered_std` [T, ny] the outputs after the measurement, `parameter_mean`/`parameter_std`
    [T, q] the estimated parameters, `nis` [T] and `measured` [T] (outputs measured)."""

    outputs: list[str]
    parameters: list[str]
    predicted_mean: np.ndarray
    predicted_std: np.ndarray
    filtered_mean: np.ndarray
    filtered_std: np.ndarray
    parameter_mean: np.ndarray
    parameter_std: np.ndarray
    nis: np.ndarray
    measured: np.ndarray


def run_filter(
    system,
    forecast: Callable[..., np.ndarray],
    times: np.ndarray,
    u: np.ndarray,
    y: np.ndarray,
    noise: np.ndarray,
    x0: tuple[np.ndarray, np.ndarray],
    p: tuple[np.ndarray, np.ndarray],
    settings: FilterSettings = FilterSettings(),
) -> FilterResult:
    """Filter a record: `times` [T], inputs `u` [T, nu], measurements `y` [T, ny] (NaN: not
    measured), their noise stds `noise` [ny]; the prior: initial state mean and std `x0`
    ([nx], [nx]) and parameters `p` ([np] values, [np] relative stds of the estimated ones;
    the others stay at their values)."""
    settings = settings.check(system.parameter_names)
    times, u, y = (np.asarray(a, dtype=np.float64) for a in (times, u, y))
    noise = np.asarray(noise, dtype=np.float64)
    rng = np.random.default_rng(settings.seed)
    n, nx = settings.members, len(system.state_names)
    est = [system.parameter_names.index(name) for name in settings.parameters]
    X = x0[0] + rng.standard_normal((n, nx)) * x0[1]
    P = np.broadcast_to(np.asarray(p[0], dtype=np.float64), (n, len(system.parameter_names)))
    P = P.copy()
    TH = np.log(P[:, est]) + rng.standard_normal((n, len(est))) * np.asarray(p[1])[est]
    T, ny = y.shape
    out = {k: np.full((T, ny), np.nan) for k in ("pm", "ps", "fm", "fs")}
    par_m, par_s = np.full((T, len(est)), np.nan), np.full((T, len(est)), np.nan)
    nis, measured = np.zeros(T), np.zeros(T, dtype=int)
    for k in range(T):
        if k:
            P[:, est] = np.exp(TH)
            X = forecast(X, P, times[k - 1], times[k], u[k - 1], u[k])
            TH = TH + rng.standard_normal(TH.shape) * settings.walk
        P[:, est] = np.exp(TH)
        HX = np.asarray(system.observe(X, u[k][None].repeat(n, 0), P), dtype=np.float64)
        out["pm"][k] = HX.mean(axis=0)
        out["ps"][k] = np.sqrt(HX.var(axis=0, ddof=1) * settings.inflation + noise**2)
        Z = np.concatenate([X, TH], axis=1)
        if settings.method == "etkf":
            Z, inn = etkf(Z, HX, y[k], noise, settings.inflation)
        else:
            Z, inn = enkf(Z, HX, y[k], noise, rng, settings.inflation)
        X, TH = Z[:, :nx], Z[:, nx:]
        P[:, est] = np.exp(TH)
        HX = np.asarray(system.observe(X, u[k][None].repeat(n, 0), P), dtype=np.float64)
        out["fm"][k], out["fs"][k] = HX.mean(axis=0), HX.std(axis=0, ddof=1)
        par = np.exp(TH)
        par_m[k], par_s[k] = par.mean(axis=0), par.std(axis=0, ddof=1)
        nis[k], measured[k] = inn.nis, inn.measured
    return FilterResult(
        system.output_names,
        list(settings.parameters),
        out["pm"],
        out["ps"],
        out["fm"],
        out["fs"],
        par_m,
        par_s,
        nis,
        measured,
    )
