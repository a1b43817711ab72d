"""Filtering telemetry: an ensemble of the twin's states (and, jointly, some of its parameters)
stepped by a forecast model and corrected by each measurement with `analysis.etkf` / `enkf`.

`EnsembleFilter` is the running filter, one measurement at a time (what a live twin keeps between
messages; `state()` / `EnsembleFilter.restore` carry it through JSON); `run_filter` filters a
whole record; `score_record` measures it as the live twin is judged: the k-step-ahead predictions
made after each assimilated sample against the measurements, beside the open loop.

The forecast is any callable `forecast(X [N, nx], P [N, np], t0, t1, u0 [nu], u1 [nu]) -> X at
t1`, with an attribute `dt`: the one interval it steps (`None`: any interval). `SolverForecast`
steps the physics system itself with its reference solver (a twin whose physics is trusted, and
the reference the exported ensemble's forecast is compared with); `OnnxForecast` the exported
ensemble. A longer interval (a gap in the telemetry) is forecast as consecutive steps, the inputs
linear across it (held ones held), the members' spread growing with every step. The predicted
measurements are the system's own observation function of the forecast states.

Joint state-parameter estimation: the parameters named in `FilterSettings.parameters` are part of
the filtered vector, in log space (they stay positive), and follow a random walk of std `walk`
per step (a relative change: 0.01 lets a parameter move ~1% per step), which is what lets the
filter follow a parameter that drifts. `process`: an additive model error on the states per step
(std per state, in the states' units), for a forecast whose members do not spread as much as the
model is wrong (a physics-only forecast has no spread of its own).

Per step the filter gives the one-step prediction (the forecast's predicted measurements, mean
and std with the measurement noise: what the twin expected to see), the filtered outputs (after
the measurement), the states' and parameters' mean and std, and the innovation with its
normalized square (NIS): chi-square with as many degrees of freedom as outputs were measured
while the model explains the data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from twin_ml.assimilate.analysis import Diverged, Innovation, enkf, etkf, etkf_many, letkf
from twin_ml.physics.solver import SolverSettings, solve_stacked

log = logging.getLogger(__name__)

METHODS = ("etkf", "enkf")
Z90 = 1.6448536269514722  # the standard normal's 95% quantile: a central 90% band is +- Z90 std


@dataclass(frozen=True)
class FilterSettings:
    method: str = "etkf"
    members: int = 32
    inflation: float = 1.0  # multiplicative prior inflation (>= 1)
    parameters: tuple[str, ...] = ()  # estimated jointly with the state, in log space
    walk: float = 0.01  # the estimated parameters' random-walk std per step, relative
    process: tuple[float, ...] = ()  # additive state noise std per step, per state (empty: none)
    seed: int = 0
    # per state, per output: the weight in [0, 1] a measurement of that output has in that
    # state's analysis (the local ETKF, `analysis.letkf`; empty: every weight 1, the ETKF); the
    # estimated parameters take every measurement whole
    localization: tuple[tuple[float, ...], ...] = ()
    # per output, the factor on the one-step prediction's std: the band the filter reports, not
    # its gain (the process noise sets that); a split-conformal scale fitted on a tuning record
    # (`band_scale`), so a process noise chosen for the best prediction keeps a band that covers
    # 90% of new measurements; empty: 1 (the members' spread with the measurement noise)
    band_scale: tuple[float, ...] = ()
    # ((h, per output factor), ...) for horizons h > 1 steps: the same for the h-step
    # predictions (the members run on without data, whose spread alone undercovers where the
    # model's error grows faster than it), fitted on a tuning record (`horizon_scale`); between
    # two fitted horizons the log factor is linear in log h (h = 1: band_scale), past the last
    # it stays; empty: 1 beyond the first step
    horizon_scale: tuple[tuple[int, tuple[float, ...]], ...] = ()
    # the model's own error on each output as an autoregressive process, carried in the members
    # (a coloured measurement error in the filtered vector, Bryson & Henrikson 1968; Box &
    # Jenkins' noise model): y = h(x) + d + v, d_k = sum_i error_ar[o][i] d_{k-i} + e_k with
    # e_k ~ N(0, error_std[o]^2) per step. Per output the coefficients (one count for all,
    # zero-padded; a stationary process) and the driving std, fitted on a tuning record's
    # open-loop residuals (`error_model`); empty: none
    error_ar: tuple[tuple[float, ...], ...] = ()
    error_std: tuple[float, ...] = ()

    def band_at(self, h: int, n_outputs: int) -> np.ndarray:
        """The factor [n_outputs] on the std of a prediction h >= 1 steps after the last
        analysis."""
        ones = np.ones(n_outputs)
        one = np.asarray(self.band_scale, dtype=np.float64) if self.band_scale else ones
        if h <= 1:
            return one
        if not self.horizon_scale:
            return ones
        knots = [(1, one), *((k, np.asarray(v, dtype=np.float64)) for k, v in self.horizon_scale)]
        if h >= knots[-1][0]:
            return knots[-1][1]
        for (h0, f0), (h1, f1) in zip(knots, knots[1:]):
            if h0 <= h <= h1:
                w = np.log(h / h0) / np.log(h1 / h0)
                return np.exp((1 - w) * np.log(f0) + w * np.log(f1))
        return one  # not reached: the knots start at 1 and h > 1

    def check(
        self, parameter_names: list[str], n_states: int | None = None, n_outputs: int | None = None
    ) -> FilterSettings:
        if self.method not in METHODS:
            raise ValueError(f"filter.method must be one of {METHODS}, got {self.method!r}")
        if self.members < 2:
            raise ValueError(f"filter.members must be >= 2, got {self.members}")
        if not self.inflation >= 1:
            raise ValueError(f"filter.inflation must be >= 1, got {self.inflation}")
        if not self.walk >= 0:
            raise ValueError(f"filter.walk must be >= 0, got {self.walk}")
        if self.process:
            if n_states is not None and len(self.process) != n_states:
                raise ValueError(
                    f"filter.process needs one std per state ({n_states}), got {len(self.process)}"
                )
            if not all(np.isfinite(v) and v >= 0 for v in self.process):
                raise ValueError(
                    f"filter.process: stds must be finite and >= 0, got {self.process}"
                )
        if self.localization:
            if self.method != "etkf":
                raise ValueError("filter.localization is built for the ETKF: set method etkf")
            W = np.asarray(self.localization, dtype=np.float64)
            want = (n_states, n_outputs)
            if W.ndim != 2 or any(w is not None and w != g for w, g in zip(want, W.shape)):
                raise ValueError(
                    f"filter.localization: one weight per state and output {want}, got {W.shape}"
                )
            if not (np.isfinite(W).all() and (W >= 0).all() and (W <= 1).all()):
                raise ValueError("filter.localization: weights must lie in [0, 1]")
        if self.band_scale:
            if n_outputs is not None and len(self.band_scale) != n_outputs:
                raise ValueError(
                    f"filter.band_scale needs one factor per output ({n_outputs}), got "
                    f"{len(self.band_scale)}"
                )
            if not all(np.isfinite(v) and v > 0 for v in self.band_scale):
                raise ValueError(
                    f"filter.band_scale: factors must be finite and > 0, got {self.band_scale}"
                )
        if self.horizon_scale:
            hs = [h for h, _ in self.horizon_scale]
            if any(isinstance(h, bool) or int(h) != h or h < 2 for h in hs) or hs != sorted(
                set(hs)
            ):
                raise ValueError(
                    f"filter.horizon_scale: horizons must be integers >= 2, increasing, got {hs}"
                )
            for h, v in self.horizon_scale:
                if n_outputs is not None and len(v) != n_outputs:
                    raise ValueError(
                        f"filter.horizon_scale[{h}] needs one factor per output ({n_outputs}), "
                        f"got {len(v)}"
                    )
                if not all(np.isfinite(x) and x > 0 for x in v):
                    raise ValueError(
                        f"filter.horizon_scale[{h}]: factors must be finite and > 0, got {v}"
                    )
        if self.error_ar or self.error_std:
            check_error_model(self.error_ar, self.error_std, n_outputs)
        unknown = sorted(set(self.parameters) - set(parameter_names))
        if unknown:
            raise ValueError(
                f"filter.parameters: unknown names {unknown}; declared: "
                f"{', '.join(parameter_names)}"
            )
        return self


def check_error_model(ar, std, n_outputs: int | None) -> None:
    """Refuse, naming the setting, an output error model that is not one stationary
    autoregressive process per output (coefficients `ar`, driving stds `std`)."""
    A = np.asarray(ar, dtype=np.float64)
    if A.ndim != 2 or A.shape[1] < 1 or (n_outputs is not None and len(A) != n_outputs):
        raise ValueError(
            f"filter.error_ar: one list of coefficients per output ({n_outputs}), all of one "
            f"length >= 1, got {list(ar)}"
        )
    if len(std) != len(A):
        raise ValueError(
            f"filter.error_std: one std per output ({len(A)}), got {len(std)}: give it with "
            "filter.error_ar"
        )
    if not (np.isfinite(A).all() and all(np.isfinite(v) and v >= 0 for v in std)):
        raise ValueError("filter.error_ar / error_std: finite coefficients and stds >= 0")
    for o, row in enumerate(A):
        radius = np.abs(np.linalg.eigvals(_companion(row))).max()
        if not radius < 1:
            raise ValueError(
                f"filter.error_ar[{o}]: not a stationary process (its companion matrix's "
                f"spectral radius is {radius:.4g}, must be < 1)"
            )


def _companion(ar: np.ndarray) -> np.ndarray:
    """[p, p]: the lags (d_k, ..., d_{k-p+1}) one step on, of d_k = sum_i ar[i] d_{k-i}."""
    p = len(ar)
    C = np.eye(p, k=-1)
    C[0] = ar
    return C


def error_model(
    residuals: np.ndarray, max_order: int = 16, orders: tuple[int, ...] | None = None
) -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]:
    """`FilterSettings.error_ar` / `error_std` from a tuning record's residuals [T, ny] (the
    measurements less the model's open loop from an estimated initial state; NaN: not
    measured, left out, the lags running across it; the mean removed: the process is
    zero-mean): per output the Yule-Walker fit (Box & Jenkins; stationary by construction) of
    the order from 1 to `max_order` with the least AIC, or the given `orders` per output;
    zero-padded to one length. Fit it on a tuning record, never on the one it is scored on."""
    from scipy.linalg import solve_toeplitz

    R = np.asarray(residuals, dtype=np.float64)
    if R.ndim != 2:
        raise ValueError(f"residuals must be [T, ny], got shape {R.shape}")
    if orders is not None and (
        len(orders) != R.shape[1] or not all(1 <= int(p) <= max_order for p in orders)
    ):
        raise ValueError(f"orders: one per output ({R.shape[1]}) in [1, {max_order}], got {orders}")
    fits = []
    for o in range(R.shape[1]):
        r = R[:, o][np.isfinite(R[:, o])]
        n = len(r)
        if n < 4 * max_order + 8:
            raise ValueError(
                f"residuals[:, {o}]: {n} finite values cannot fit an order up to {max_order} "
                f"(need >= {4 * max_order + 8})"
            )
        r = r - r.mean()
        acov = np.array([r[: n - k] @ r[k:] / n for k in range(max_order + 1)])
        if not acov[0] > 0:
            raise ValueError(f"residuals[:, {o}] are constant: no error process to fit")
        best = None
        for p in range(1, max_order + 1) if orders is None else (int(orders[o]),):
            phi = solve_toeplitz(acov[:p], acov[1 : p + 1])
            var = acov[0] - phi @ acov[1 : p + 1]
            aic = n * np.log(var) + 2 * p
            if best is None or aic < best[0]:
                best = (aic, phi, var)
        fits.append(best[1:])
    p = max(len(phi) for phi, _ in fits)
    ar = tuple(tuple(float(v) for v in np.pad(phi, (0, p - len(phi)))) for phi, _ in fits)
    return ar, tuple(float(np.sqrt(max(var, 0.0))) for _, var in fits)


def open_loop_residuals(
    system,
    forecast: Callable[..., np.ndarray],
    times: np.ndarray,
    u: np.ndarray,
    y: np.ndarray,
    noise: np.ndarray,
    x0: tuple[np.ndarray, np.ndarray],
    p: tuple[np.ndarray, np.ndarray],
    settings: FilterSettings = FilterSettings(),
    *,
    init: int = 1,
) -> np.ndarray:
    """[T - init, ny]: a record's measurements less the model's open loop, what `error_model` is
    fitted on: `score_record`'s open loop (`run_filter`'s arguments; the filter without process
    noise, error model or factors) given the first `init` samples (an estimated initial
    state), then none, so its one-step predictions are the model's simulation from there."""
    y = np.asarray(y, dtype=np.float64)
    if not 1 <= init < len(y):
        raise ValueError(f"init must be in [1, {len(y) - 1}], got {init}")
    free = y.copy()
    free[init:] = np.nan
    res = run_filter(system, forecast, times, u, free, noise, x0, p, _open_loop(settings))
    return (y - res.predicted_mean)[init:]


def _open_loop(settings: FilterSettings) -> FilterSettings:
    """The settings of the model's own simulation: no process noise, error model or factors."""
    return replace(settings, process=(), band_scale=(), horizon_scale=(), error_ar=(), error_std=())


class SolverForecast:
    """The physics system stepped over one interval for every member at once (its reference
    solver on the stacked states), inputs linear across the interval (held where the system
    holds them)."""

    dt = None  # any interval in one step

    def __init__(self, system, settings: SolverSettings = SolverSettings()):
        self.system, self.settings = system, settings

    def __call__(self, X, P, t0: float, t1: float, u0, u1) -> np.ndarray:
        n = len(X)
        u = np.broadcast_to(np.stack([u0, u1])[None], (n, 2, len(u0)))
        out = solve_stacked(self.system, np.array([t0, t1]), u, P, X, self.settings)
        if out.n_failed:
            raise RuntimeError(f"the forecast's solver failed: {out.reasons[0]}")
        return out.x[:, -1]


def one_interval_graph(onnx_model: str | bytes) -> bytes | None:
    """The exported rollout graph cut down to what one forecast step needs: the Loop's body
    inlined once, from the members' own states (`x_members`) to their states one interval on
    (`x_end`), every node that only feeds the outputs (observation, ensemble mean and spread,
    quantiles) left out. onnxruntime's cost for such a small graph is its per-node overhead, so
    the step costs ~20% less than the rollout with a horizon of 1 (no Loop, fewer nodes). None
    when the graph is not the export's (one Loop whose body carries the state as its third input
    and second output). The same float32 operations in the same order: `OnnxForecast` checks
    the two graphs agree before it uses this one."""
    import onnx
    from onnx import TensorProto, helper

    m = (
        onnx.load_model(onnx_model)
        if isinstance(onnx_model, str)
        else onnx.load_from_string(onnx_model)
    )
    g = m.graph
    loops = [i for i, n in enumerate(g.node) if n.op_type == "Loop"]
    if len(loops) != 1 or "x_end" not in {o.name for o in g.output}:
        return None
    loop = g.node[loops[0]]
    body = next((a.g for a in loop.attribute if a.name == "body"), None)
    if body is None or len(body.input) != 3 or len(body.output) < 2 or loop.output[0] != "x_end":
        return None
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in body.node
        for a in n.attribute
    ):
        return None  # a nested subgraph would need its outer-scope names renamed too
    own = {o for n in body.node for o in n.output} | {t.name for t in body.initializer}
    ren = {name: f"one_step/{name}" for name in own}
    ren.update(
        {
            body.input[0].name: "one_step/iteration",
            body.input[1].name: "one_step/condition",
            body.input[2].name: "x_members",  # the carried state: the members' own
        }
    )
    nodes = list(g.node[: loops[0]])
    for n in body.node:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = f"one_step/{n.name}" if n.name else ""
        del c.input[:], c.output[:]
        c.input.extend(ren.get(i, i) if i else i for i in n.input)
        c.output.extend(ren.get(o, o) for o in n.output)
        nodes.append(c)
    nodes.append(helper.make_node("Identity", [ren.get(body.output[1].name)], ["x_end"]))
    inits = [*g.initializer]
    for t in body.initializer:
        c = TensorProto()
        c.CopyFrom(t)
        c.name = ren[t.name]
        inits.append(c)
    inits += [
        helper.make_tensor("one_step/iteration", TensorProto.INT64, [], [0]),
        helper.make_tensor("one_step/condition", TensorProto.BOOL, [], [True]),
    ]
    need, keep = {"x_end"}, []
    for n in reversed(nodes):  # what x_end depends on, nothing else
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(i for i in n.input if i)
    inputs = [i for i in g.input if i.name in need]
    if "x_members" not in {i.name for i in inputs}:
        return None
    graph = helper.make_graph(
        keep[::-1],
        f"{g.name}_one_interval",
        inputs,
        [o for o in g.output if o.name == "x_end"],
        initializer=[t for t in inits if t.name in need and t.name not in {"x_members"}],
    )
    out = helper.make_model(graph, opset_imports=m.opset_import, ir_version=m.ir_version)
    onnx.checker.check_model(out)
    return out.SerializeToString()


class OnnxForecast:
    """The exported ensemble as the forecast (torch-free): filter member i is stepped by the
    ensemble's network i mod M, from its own state (the file's `x_members` input, its `x_end`
    output), one grid interval of the model's dt per call. Every network steps every member's
    state in one call (M x N member-intervals): the file's batch, one onnxruntime call per step.

    Inputs inside the interval are the model's own: the one-interval graph (`one_interval_graph`)
    is given the interval's two ends [u0, u1], and its prelude interpolates them at each stage
    time as the rollout and the training did (linear inputs; held ones stay at u0). The first
    call checks that graph against the rollout (two intervals of the rollout against the graph
    twice, state for state) and steps with it from then on. A file whose graph cannot be cut, or
    disagrees, is stepped by the rollout with a horizon of 1, whose one input value per interval
    is the midpoint of linear inputs: second order for the RK4 kinds, and a worse model where
    the input changes fast within a step (the Silverbox's multisine: its free run 3x off).

    `widen`: the networks' disagreement is the ensemble's estimate of its own error, and the
    model card's conformal scale c says how much wider the calibrated band is than the raw
    ensemble's. Where c > 1 each member's step is moved away from the networks' mean step from
    its state by (c - 1) times its own deviation, so the members spread as much as the calibrated
    error (c: the median over outputs; c <= 1 or one network: nothing to widen)."""

    def __init__(self, onnx: str | bytes, card, threads: int = 1, widen: bool = True):
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
        # the one-interval graph, once the first step showed it agrees with the rollout's
        lean = one_interval_graph(onnx)
        self._lean = None if lean is None else session(lean, threads=threads)
        self._lean_inputs = [] if lean is None else [i.name for i in self._lean.get_inputs()]
        self._lean_checked = False
        self.members, self.dt = self.card.members, self.card.time.dt
        self.held = np.array([v.interpolation == "zoh" for v in self.card.system.build().inputs])
        scale = float(np.median(self.card.conformal_scale)) if self.card.conformal_scale else 1.0
        self.widening = max(scale, 1.0) - 1.0 if widen and self.members > 1 else 0.0
        # (rows, ensemble size) -> (network, member) index
        self._own: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, X, P, t0: float, t1: float, u0, u1, *, size: int | None = None):
        """X [n, nx] stepped from t0 to t1 = t0 + dt with the parameters P [n, np] and the inputs
        u0, u1 at both ends ([nu], or [n, nu] per member). `size`: the rows are ensembles of
        `size` members each, stacked (several twins in one call); member j of each is stepped
        by network j mod M, as it would be alone (default: one ensemble of n)."""
        if abs(t1 - t0 - self.dt) > 1e-6 * self.dt:
            raise ValueError(
                f"the model steps dt = {self.dt:g}; an interval of {t1 - t0:g} cannot be "
                "forecast (resample the telemetry onto the model's grid first)"
            )
        n, m = len(X), self.members
        size = n if size is None else size
        if size < 1 or n % size:
            raise ValueError(f"size must divide the {n} rows into whole ensembles, got {size}")
        x32 = np.asarray(X, dtype=np.float32)
        ends = np.empty((n, 2, np.shape(u0)[-1]), dtype=np.float32)  # [n, 2, nu]
        ends[:, 0], ends[:, 1] = u0, u1  # [nu] or [n, nu] each
        feeds = {
            "x0": x32,
            "u": ends,
            "p": np.asarray(P, dtype=np.float32),
            "x_members": np.repeat(x32[None], m, axis=0),
        }
        if self._lean is not None and not self._lean_checked:
            self._check_lean(feeds)
        lean = self._lean if self._lean_checked else None  # one read: another thread may drop it
        if lean is not None:
            (x_end,) = lean.run(["x_end"], {k: feeds[k] for k in self._lean_inputs})
        else:  # the rollout, one interval: one input value, linear ones at the midpoint
            start, end = feeds["u"][:, :1], feeds["u"][:, 1:]
            feeds["u"] = np.where(self.held, start, (start + end) / 2)
            (x_end,) = self.session.run(["x_end"], feeds)  # [M, N, nx]
        x_end = x_end.astype(np.float64)
        idx = self._own.get((n, size))
        if idx is None:
            idx = self._own[n, size] = (np.arange(n) % size % m, np.arange(n))
        own = x_end[idx]
        if self.widening:
            own = own + self.widening * (own - x_end.sum(axis=0) / m)
        return own

    @property
    def lean(self) -> bool:
        """Whether the steps run on the one-interval graph (`one_interval_graph`)."""
        return self._lean is not None and self._lean_checked

    def _check_lean(self, feeds: dict) -> None:
        """Use the one-interval graph from now on if, given [u0, u1] and then [u1] (held), it
        lands where the rollout's two intervals over [u0, u1] do (float32: the same operations;
        kernels chosen for another graph may round their last bits apart)."""
        lean = {k: feeds[k] for k in self._lean_inputs}
        graph = self._lean
        (first,) = graph.run(["x_end"], lean)
        lean.update(x_members=first, u=feeds["u"][:, 1:])
        (second,) = graph.run(["x_end"], {k: lean[k] for k in self._lean_inputs})
        (rolled,) = self.session.run(["x_end"], feeds)
        if not all(np.isfinite(a).all() for a in (first, second, rolled, *feeds.values())):
            return  # nothing to judge by (a diverging call): decided on a later one
        scale = max(float(np.abs(rolled).max()), 1.0)
        if second.shape == rolled.shape and np.allclose(
            second, rolled, rtol=1e-5, atol=1e-6 * scale
        ):
            self._lean_checked = True
        else:
            log.warning(
                "model %s:%s: its one-interval graph disagrees with its rollout by %.3g; "
                "stepping with the rollout (inputs at the interval's midpoint)",
                self.card.name,
                self.card.version,
                float(np.abs(second - rolled).max()) if second.shape == rolled.shape else np.inf,
            )
            self._lean = None


_EMPTY = np.zeros(0)
_EMPTY.setflags(write=False)


def _moments(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof 1) over the members (axis 0) of A [N, k]."""
    n = len(A)
    mean = A.sum(axis=0) / n
    D = A - mean
    return mean, np.sqrt(np.einsum("ij,ij->j", D, D) / (n - 1))


@dataclass(frozen=True)
class Estimate:
    """One assimilated sample at time `t`: the one-step prediction of the measurements
    (`predicted_*`, std with the measurement noise), the outputs, states and estimated parameters
    after the measurement (mean and std over the members), and the analysis's innovation."""

    t: float
    predicted_mean: np.ndarray
    predicted_std: np.ndarray
    filtered_mean: np.ndarray
    filtered_std: np.ndarray
    state_mean: np.ndarray
    state_std: np.ndarray
    parameter_mean: np.ndarray
    parameter_std: np.ndarray
    innovation: Innovation


class EnsembleFilter:
    """The running filter: members X [N, nx], the estimated parameters' logs TH [N, q], the
    output errors' lags D [N, ny * p] (`FilterSettings.error_ar`; output o's d_{k-i} in column
    o p + i; p = 0 without an error model), the parameters' values `p` [np] (the estimated ones
    overwritten per member), the time `t` and the inputs `u` [nu] of the last analysis."""

    def __init__(
        self,
        system,
        forecast: Callable[..., np.ndarray],
        noise,
        settings: FilterSettings,
        *,
        X: np.ndarray,
        TH: np.ndarray,
        p: np.ndarray,
        t: float,
        u: np.ndarray,
        rng: np.random.Generator,
        D: np.ndarray | None = None,
    ):
        self.system, self.forecast = system, forecast
        self.settings = settings.check(
            system.parameter_names, len(system.state_names), len(system.output_names)
        )
        self.noise = np.asarray(noise, dtype=np.float64)
        if self.noise.shape != (len(system.output_names),) or not np.all(self.noise > 0):
            raise ValueError(
                f"noise: one std > 0 per output ({', '.join(system.output_names)}), got "
                f"{np.asarray(noise).tolist()}"
            )
        self.est = [system.parameter_names.index(n) for n in self.settings.parameters]
        self.X, self.TH = np.asarray(X, dtype=np.float64), np.asarray(TH, dtype=np.float64)
        self.p = np.asarray(p, dtype=np.float64)
        self.t, self.u = float(t), np.asarray(u, dtype=np.float64)
        self.rng = rng
        self._process = np.asarray(self.settings.process, dtype=np.float64)
        ny = len(system.output_names)
        self._ar = np.asarray(self.settings.error_ar, dtype=np.float64).reshape(ny, -1)
        self._ar_std = np.asarray(self.settings.error_std, dtype=np.float64)
        self.D = (
            np.zeros((len(self.X), self._ar.size))
            if D is None
            else np.asarray(D, dtype=np.float64).reshape(len(self.X), self._ar.size)
        )
        self._fixed: np.ndarray | None = None  # parameters() when none is estimated
        self._weights = None  # the localization's weights [nx + q, ny] (parameters' rows 1)
        if self.settings.localization:
            loc = np.asarray(self.settings.localization, dtype=np.float64)
            self._weights = np.vstack([loc, np.ones((len(self.est), loc.shape[1]))])

    @classmethod
    def start(
        cls,
        system,
        forecast: Callable[..., np.ndarray],
        noise,
        x0: tuple[Any, Any],
        p: tuple[Any, Any],
        t0: float,
        u0,
        settings: FilterSettings = FilterSettings(),
    ) -> EnsembleFilter:
        """Members drawn from the prior: initial state mean and std `x0` ([nx], [nx]),
        parameters `p` ([np] values, [np] relative stds of the estimated ones; the others stay
        at their values)."""
        settings = settings.check(
            system.parameter_names, len(system.state_names), len(system.output_names)
        )
        rng = np.random.default_rng(settings.seed)
        n, nx = settings.members, len(system.state_names)
        est = [system.parameter_names.index(name) for name in settings.parameters]
        values = np.asarray(p[0], dtype=np.float64)
        X = np.asarray(x0[0], dtype=np.float64) + rng.standard_normal((n, nx)) * np.asarray(x0[1])
        TH = (
            np.log(np.broadcast_to(values[est], (n, len(est))))
            + rng.standard_normal((n, len(est))) * np.asarray(p[1], dtype=np.float64)[est]
        )
        D = _stationary_draw(settings, len(system.output_names), n, rng)
        return cls(
            system, forecast, noise, settings, X=X, TH=TH, p=values, t=t0, u=u0, rng=rng, D=D
        )

    # ---- the members -----------------------------------------------------------------------
    def parameters(self, TH: np.ndarray | None = None) -> np.ndarray:
        """[N, np]: every member's parameters (read-only where none is estimated)."""
        TH = self.TH if TH is None else TH
        if not self.est:
            if self._fixed is None or len(self._fixed) != len(TH):
                self._fixed = np.broadcast_to(self.p, (len(TH), len(self.p)))
            return self._fixed
        P = np.repeat(self.p[None], len(TH), axis=0)
        P[:, self.est] = np.exp(TH)
        return P

    def steps_to(self, t1: float) -> int:
        """Forecast steps from the last analysis to `t1` (> the filter's time)."""
        dt = getattr(self.forecast, "dt", None)
        span = t1 - self.t
        if dt is None:
            return 1
        n = int(round(span / dt))
        if n < 1 or abs(n * dt - span) > 1e-6 * abs(span) + 1e-9 * max(1.0, abs(dt)):
            raise ValueError(
                f"the model steps dt = {dt:g}: {span:g} after the last sample is not a whole "
                "number of steps (resample the telemetry onto the model's grid first)"
            )
        return n

    def _advance(self, X, TH, t1: float, u1, *, walk: bool, rng, D=None) -> np.ndarray:
        """X stepped from (self.t, self.u) to (t1, u1), in whole forecast steps; `walk`: the
        estimated parameters' random walk per step (TH is updated in place); `D`: the output
        errors' lags of these members, stepped by their process (in place)."""
        n = self.steps_to(t1)
        u0, u1 = self.u, np.asarray(u1, dtype=np.float64)
        process = self._process
        # X may stack several ensembles of this filter's size (`Ahead`'s origins): member j of
        # each keeps its network
        kw = {"size": len(self.X)} if isinstance(self.forecast, OnnxForecast) else {}
        for i in range(n):
            if n == 1:
                X = self.forecast(X, self.parameters(TH), self.t, t1, u0, u1, **kw)
            else:
                a, b = i / n, (i + 1) / n
                X = self.forecast(
                    X,
                    self.parameters(TH),
                    self.t + a * (t1 - self.t),
                    self.t + b * (t1 - self.t),
                    u0 + a * (u1 - u0),
                    u0 + b * (u1 - u0),
                    **kw,
                )
            if process.size:
                X = X + rng.standard_normal(X.shape) * process
            if walk:
                TH += rng.standard_normal(TH.shape) * self.settings.walk
            if D is not None and D.size:
                D[:] = self._error_step(D, rng)
        return X

    def _error_step(self, D: np.ndarray, rng) -> np.ndarray:
        """The output errors' lags D [N, ny p] one step on."""
        ny, p = self._ar.shape
        L = D.reshape(len(D), ny, p)
        new = (
            np.einsum("nop,op->no", L, self._ar) + rng.standard_normal((len(D), ny)) * self._ar_std
        )
        return np.concatenate([new[:, :, None], L[:, :, :-1]], axis=2).reshape(len(D), ny * p)

    def observe_members(self, X, u, TH=None, D=None) -> np.ndarray:
        """[N, ny]: the members' outputs h(x) (+ their output errors' current values, with D)."""
        P = self.parameters(TH)
        U = np.repeat(np.asarray(u)[None], len(X), axis=0)
        H = np.asarray(self.system.observe(X, U, P), dtype=np.float64)
        if D is not None and D.size:
            H = H + self._errors_now(D)
        return H

    def _errors_now(self, D: np.ndarray) -> np.ndarray:
        """[N, ny]: each output's current error d_k from the lags D [N, ny p]."""
        return D[:, :: self._ar.shape[1]]

    # ---- one sample --------------------------------------------------------------------------
    def step(self, t: float, u, y) -> Estimate:
        """Forecast to `t` (unless it is the filter's own time: the first sample) and assimilate
        the measurements `y` [ny] (NaN: not measured) taken with inputs `u` [nu]."""
        u = np.asarray(u, dtype=np.float64)
        if t > self.t:
            self.X = self._advance(self.X, self.TH, t, u, walk=True, rng=self.rng, D=self.D)
        elif t < self.t:
            raise ValueError(f"t = {t:g} is before the filter's time {self.t:g}")
        self.t, self.u = float(t), u
        s = self.settings
        HX = self.observe_members(self.X, u, D=self.D)
        pm, ps = _moments(HX)
        ps = np.sqrt(ps**2 * s.inflation + self.noise**2)
        if s.band_scale:
            ps = ps * np.asarray(s.band_scale)
        Z = np.concatenate([self.X, self.TH, self.D], axis=1)
        y = np.asarray(y, dtype=np.float64)
        if self._weights is not None:
            W = self._weights  # the output errors' rows: every measurement whole
            W = np.vstack([W, np.ones((self.D.shape[1], W.shape[1]))]) if self.D.size else W
            Z, inn = letkf(Z, HX, y, self.noise, W, s.inflation)
        elif s.method == "etkf":
            Z, inn = etkf(Z, HX, y, self.noise, s.inflation)
        else:
            Z, inn = enkf(Z, HX, y, self.noise, self.rng, s.inflation)
        _in_range(Z)
        nx, q = self.X.shape[1], self.TH.shape[1]
        self.X, self.TH, self.D = Z[:, :nx], Z[:, nx : nx + q], Z[:, nx + q :]
        HX = self.observe_members(self.X, u, D=self.D)
        pe = _moments(np.exp(self.TH)) if self.est else (_EMPTY, _EMPTY)
        mean, std = _moments(np.concatenate([HX, self.X], axis=1))  # column by column
        ny = HX.shape[1]
        return Estimate(float(t), pm, ps, mean[:ny], std[:ny], mean[ny:], std[ny:], *pe, inn)

    # ---- ahead of the data --------------------------------------------------------------------
    def forecast_ahead(self, times, u) -> dict[str, np.ndarray]:
        """The members run on from the last analysis over `times` [K] (after it, on the model's
        grid) with inputs `u` [K, nu], no measurement and the parameters held: per time the
        outputs' member values [K, N, ny] (`outputs`), their mean and std, the std with the
        measurement noise (`std_measured`, the band a new measurement falls in: times its
        horizon's factor, `FilterSettings.band_at`), and the states' mean and std [K, nx]. The
        filter itself is left as it was."""
        times = np.asarray(times, dtype=np.float64)
        u = np.asarray(u, dtype=np.float64)
        rng = np.random.default_rng([self.settings.seed, len(times), int(self.t * 1e6) % 2**32])
        X, TH, D, t0, u0 = self.X.copy(), self.TH.copy(), self.D.copy(), self.t, self.u
        members, states, steps = [], [], []
        dt = getattr(self.forecast, "dt", None)
        try:
            for tk, uk in zip(times, u):
                steps.append(round((tk - t0) / dt) if dt else len(steps) + 1)
                X = self._advance(X, TH, tk, uk, walk=False, rng=rng, D=D)
                self.t, self.u = float(tk), uk  # the next interval starts here
                members.append(self.observe_members(X, uk, TH, D))
                states.append(X)
        finally:
            self.t, self.u = t0, u0
        H = np.stack(members) if members else np.zeros((0, len(X), len(self.noise)))
        S = np.stack(states) if states else np.zeros((0, *X.shape))
        std = H.std(axis=1, ddof=1) * np.sqrt(self.settings.inflation)
        ny = len(self.noise)
        factor = np.array([self.settings.band_at(h, ny) for h in steps]).reshape(-1, ny)
        return {
            "outputs": H,
            "mean": H.mean(axis=1),
            "std": std,
            "std_measured": np.sqrt(std**2 + self.noise**2) * factor,
            "state_mean": S.mean(axis=1),
            "state_std": S.std(axis=1, ddof=1),
        }

    # ---- persistence ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything the filter needs to go on, as JSON values (floats kept exactly: Python's
        JSON writes the shortest repr, which reads back bit for bit)."""
        return {
            "t": self.t,
            "u": self.u.tolist(),
            "X": self.X.tolist(),
            "TH": self.TH.tolist(),
            **({"D": self.D.tolist()} if self.D.size else {}),
            "p": self.p.tolist(),
            "rng": self.rng.bit_generator.state,
        }

    @classmethod
    def restore(
        cls, system, forecast, noise, settings: FilterSettings, state: dict[str, Any]
    ) -> EnsembleFilter:
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        nx = len(system.state_names)
        X = np.asarray(state["X"], dtype=np.float64).reshape(-1, nx)
        TH = np.asarray(state["TH"], dtype=np.float64).reshape(len(X), -1)
        return cls(
            system,
            forecast,
            noise,
            settings,
            X=X,
            TH=TH,
            p=np.asarray(state["p"]),
            t=state["t"],
            u=np.asarray(state["u"]),
            rng=rng,
            D=np.asarray(state["D"], dtype=np.float64) if "D" in state else None,
        )


def step_many(filters: list[EnsembleFilter], t, u, y) -> list[Estimate]:
    """`filters[i].step(t[i], u[i], y[i])` for every i (the filters of distinct twins), with one
    forecast call and one vectorized analysis (`analysis.etkf_many`) for those that can share
    them: one `OnnxForecast` object, the ETKF without localization, the same members, states,
    estimated parameters' count and output error lags, a sample one model step after the
    filter's time and every output measured. The rest step alone. Each filter draws its process
    noise, random walk and output error from its own generator in the order `step` does, so a
    filter's estimates are those it gives alone, up to the forecast's float32 rounding in a
    larger batch."""
    if len(filters) == 1:
        return [filters[0].step(t[0], u[0], y[0])]
    ests: list[Estimate | None] = [None] * len(filters)
    group = [i for i, f in enumerate(filters) if _can_join(f, t[i], y[i])]
    group = [i for i in group if _alike(filters[i], filters[group[0]])]
    if len(group) < 2:
        group = []
    for i in sorted(set(range(len(filters))) - set(group)):
        ests[i] = filters[i].step(t[i], u[i], y[i])
    if not group:
        return ests  # type: ignore[return-value]
    fs = [filters[i] for i in group]
    f0, K, N = fs[0], len(fs), len(fs[0].X)
    nx = f0.X.shape[1]
    ts = [float(t[i]) for i in group]
    us = np.array([np.asarray(u[i], dtype=np.float64) for i in group])  # [K, nu]
    ys = np.array([np.asarray(y[i], dtype=np.float64) for i in group])  # [K, ny]

    def rows(a: np.ndarray) -> np.ndarray:  # [K, ...] -> [K N, ...]: one row per member
        return np.repeat(a, N, axis=0)

    P = np.concatenate([f.parameters() for f in fs])
    u0 = rows(np.array([f.u for f in fs]))
    X = f0.forecast(np.concatenate([f.X for f in fs]), P, f0.t, f0.t + f0.forecast.dt, u0,
                    rows(us), size=N).reshape(K, N, nx)  # fmt: skip
    for k, f in enumerate(fs):  # as `_advance`, then `step`
        if f._process.size:
            X[k] = X[k] + f.rng.standard_normal((N, nx)) * f._process
        f.TH += f.rng.standard_normal(f.TH.shape) * f.settings.walk
        if f.D.size:
            f.D = f._error_step(f.D, f.rng)
        f.X, f.t, f.u = X[k], ts[k], us[k]
    U = rows(us)
    P = np.concatenate([f.parameters() for f in fs])

    def observe(X: np.ndarray) -> np.ndarray:  # [K, N, nx] -> [K, N, ny], the errors added
        H = np.asarray(f0.system.observe(X.reshape(K * N, nx), U, P), dtype=np.float64)
        H = H.reshape(K, N, -1)
        if f0.D.size:
            H = H + np.stack([f._errors_now(f.D) for f in fs])
        return H

    HX = observe(X)
    pm, ps = _moments_many(HX)
    infl = np.array([f.settings.inflation for f in fs])
    noise = np.array([f.noise for f in fs])
    ps = np.sqrt(ps**2 * infl[:, None] + noise**2)
    for k, f in enumerate(fs):
        if f.settings.band_scale:
            ps[k] = ps[k] * np.asarray(f.settings.band_scale)
    Z = np.concatenate([X, np.stack([f.TH for f in fs]), np.stack([f.D for f in fs])], axis=2)
    Z, inns = etkf_many(Z, HX, ys, noise, infl)
    _in_range(Z)
    q = f0.TH.shape[1]
    for f, z in zip(fs, Z):
        f.X, f.TH, f.D = z[:, :nx], z[:, nx : nx + q], z[:, nx + q :]
    P = np.concatenate([f.parameters() for f in fs])
    fm, fsd = _moments_many(observe(Z[:, :, :nx]))
    sm, ssd = _moments_many(Z[:, :, :nx])
    pe = _moments_many(np.exp(Z[:, :, nx : nx + q])) if f0.est else None
    for k, i in enumerate(group):
        e = (pe[0][k], pe[1][k]) if pe else (_EMPTY, _EMPTY)
        ests[i] = Estimate(ts[k], pm[k], ps[k], fm[k], fsd[k], sm[k], ssd[k], *e, inns[k])
    return ests  # type: ignore[return-value]


_F32_MAX = float(np.finfo(np.float32).max)


def _in_range(Z: np.ndarray) -> None:
    """An analysis the exported (float32) forecast can step from; else `Diverged`, blamed on
    the sample that moved the members there (e.g. a measurement float32 cannot hold)."""
    if not np.abs(Z).max(initial=0.0) < _F32_MAX:
        raise Diverged("the analysis moved the members beyond float32's range", "outputs")


def _can_join(f: EnsembleFilter, t: float, y) -> bool:
    """Whether f's next step fits a shared forecast call and analysis (see `step_many`)."""
    try:
        one_step = t > f.t and f.steps_to(t) == 1
    except ValueError:
        return False  # step() raises it for this filter alone
    return (
        one_step
        and isinstance(f.forecast, OnnxForecast)
        and f.settings.method == "etkf"
        and f._weights is None
        and bool(np.isfinite(np.asarray(y, dtype=np.float64)).all())
    )  # the members are finite: every analysis checks them (`_in_range`)


def _alike(f: EnsembleFilter, f0: EnsembleFilter) -> bool:
    """One forecast object, and ensembles of one shape (the same model's system)."""
    return (
        f.forecast is f0.forecast
        and type(f.system) is type(f0.system)
        and f.X.shape == f0.X.shape
        and f.TH.shape == f0.TH.shape
        and f.D.shape == f0.D.shape
    )


def _moments_many(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_moments` of K ensembles A [K, N, k] -> ([K, k], [K, k])."""
    n = A.shape[1]
    mean = A.sum(axis=1) / n
    D = A - mean[:, None]
    return mean, np.sqrt(np.einsum("kij,kij->kj", D, D) / (n - 1))


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
    times, u, y = (np.asarray(a, dtype=np.float64) for a in (times, u, y))
    f = EnsembleFilter.start(system, forecast, noise, x0, p, times[0], u[0], settings)
    return _result(system, settings, [f.step(tk, uk, yk) for tk, uk, yk in zip(times, u, y)])


def _result(system, settings: FilterSettings, steps: list[Estimate]) -> FilterResult:
    return FilterResult(
        system.output_names,
        list(settings.parameters),
        *(np.stack([getattr(e, k) for e in steps]) for k in _SERIES),
        np.array([e.innovation.nis for e in steps]),
        np.array([e.innovation.measured for e in steps], dtype=int),
    )


_SERIES = (
    "predicted_mean",
    "predicted_std",
    "filtered_mean",
    "filtered_std",
    "parameter_mean",
    "parameter_std",
)


class Ahead:
    """The members run on without data from past analyses, to say what the twin predicted h
    grid steps before each new sample (h > 1; the one-step prediction is the filter's own):
    after each analysis `spawn` copies the members (an origin); before the next, `advance` steps
    every open origin to the new sample's time and input with the filter's forecast (one call for
    all of them, the estimated parameters held, the process noise drawn from a generator seeded
    by the call's number: restorable without keeping its state) and returns, per horizon whose
    origin is exactly h steps back, the outputs' mean and std (with the measurement noise, times
    the horizon's factor `FilterSettings.band_at`).
    `every`: spawn at every `every`-th analysis only. `dt`: the grid step horizons count in
    (default: the forecast's own step; a forecast of any interval, the physics solver, needs it).
    `state()` / `Ahead(..., state=...)` go through JSON."""

    def __init__(
        self, horizons, every: int = 1, state: dict | None = None, dt: float | None = None
    ):
        self.horizons = sorted(int(h) for h in horizons if int(h) > 1)
        if any(int(h) < 1 for h in horizons):
            raise ValueError(f"horizons must be >= 1, got {list(horizons)}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.dt = every, dt
        s = state or {}
        self.calls, self.spawned = int(s.get("calls", 0)), int(s.get("spawned", 0))
        # (origin time, X, TH, D) per open origin (D: the output errors' lags, `EnsembleFilter`)
        self.origins = [
            (o[0], *(np.asarray(a, dtype=np.float64) for a in o[1:3]), _lags(o, len(o[1])))
            for o in s.get("origins", [])
        ]

    def state(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "spawned": self.spawned,
            "origins": [
                [t, X.tolist(), TH.tolist(), *([D.tolist()] if D.size else [])]
                for t, X, TH, D in self.origins
            ],
        }

    def advance(self, f: EnsembleFilter, t: float, u) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        if not self.origins or t <= f.t:
            return {}
        n, dt = len(f.X), self.dt or getattr(f.forecast, "dt", None)
        if not dt:
            raise ValueError("Ahead needs dt: the forecast steps any interval")
        rng = np.random.default_rng([f.settings.seed, 1, self.calls])
        self.calls += 1
        D = np.concatenate([o[3] for o in self.origins])
        X = f._advance(
            np.concatenate([o[1] for o in self.origins]),
            np.concatenate([o[2] for o in self.origins]),
            t,
            u,
            walk=False,
            rng=rng,
            D=D,
        )
        self.origins = [
            (o, X[i * n : (i + 1) * n], c, D[i * n : (i + 1) * n])
            for i, (o, _, c, _) in enumerate(self.origins)
        ]
        out = {}
        for origin, Xc, THc, Dc in self.origins:
            h = round((t - origin) / dt)
            if h in self.horizons:
                mean, std = _moments(f.observe_members(Xc, np.asarray(u, dtype=float), THc, Dc))
                band = f.settings.band_at(h, len(f.noise))
                out[h] = (mean, np.sqrt(std**2 * f.settings.inflation + f.noise**2) * band)
        longest = self.horizons[-1] if self.horizons else 0
        self.origins = [o for o in self.origins if round((t - o[0]) / dt) < longest]
        return out

    def spawn(self, f: EnsembleFilter) -> None:
        if self.horizons and self.spawned % self.every == 0:
            self.origins.append((f.t, f.X.copy(), f.TH.copy(), f.D.copy()))
        self.spawned += 1


def _lags(origin: list, n: int) -> np.ndarray:
    """An origin's output-error lags from its JSON (none stored: no error model)."""
    return np.asarray(origin[3], dtype=np.float64) if len(origin) > 3 else np.zeros((n, 0))


def _stationary_draw(settings: FilterSettings, ny: int, n: int, rng) -> np.ndarray:
    """[n, ny p]: the output errors' lags drawn from their process's stationary law (each
    output's lag covariance solves P = C P C' + e e' s^2, C its companion matrix)."""
    if not settings.error_ar:
        return np.zeros((n, 0))
    from scipy.linalg import solve_discrete_lyapunov

    ar = np.asarray(settings.error_ar, dtype=np.float64)
    p = ar.shape[1]
    D = np.empty((n, ny, p))
    for o in range(ny):
        Q = np.zeros((p, p))
        Q[0, 0] = settings.error_std[o] ** 2
        P = solve_discrete_lyapunov(_companion(ar[o]), Q)
        w, V = np.linalg.eigh((P + P.T) / 2)
        D[:, o] = (rng.standard_normal((n, p)) * np.sqrt(np.maximum(w, 0.0))) @ V.T
    return D.reshape(n, ny * p)


@dataclass
class RecordScore:
    """The filter run over a record, scored as a live twin is: after each assimilated sample from
    `init` - 1 on (`every`-th), the members run on without data; the prediction h steps ahead is
    compared with the measurement there. h = 1 is the filter's own one-step prediction (with the
    parameters' random walk); longer horizons hold the parameters. The open loop: the model's
    simulation, the same filter without process noise or band factor given only the first `init`
    samples (what fixes the initial state in a free-run benchmark), then none, scored on every
    later sample: the same whatever process noise the filter runs with (with it, the members
    would random-walk away and the ratio would flatter a large process noise). Per horizon: RMSE
    over the measured outputs (pooled, and per output), the 90% band's coverage (mean +- 1.645
    std with the measurement noise), the number of scored points, and the RMSE over the open
    loop's on the same outputs."""

    horizons: list[int]
    rmse: dict[int, float]
    rmse_per_output: dict[int, list[float]]
    coverage_90: dict[int, float]
    points: dict[int, int]
    open_loop_rmse: float
    open_loop_rmse_per_output: list[float]
    open_loop_coverage_90: float
    result: FilterResult
    # per horizon, every scored point's |error| over its band's std [n, ny] (NaN: not measured):
    # what `horizon_scale` fits factors from
    z: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def ratio(self, h: int) -> float:
        return self.rmse[h] / self.open_loop_rmse

    def table(self) -> list[dict[str, float | int]]:
        return [
            {
                "horizon": h,
                "rmse": self.rmse[h],
                "open_loop_rmse": self.open_loop_rmse,
                "ratio": self.ratio(h),
                "coverage_90": self.coverage_90[h],
                "points": self.points[h],
            }
            for h in self.horizons
        ]


def band_scale(result: FilterResult, y: np.ndarray, init: int = 1, level: float = 0.9):
    """Per output, the split-conformal factor on a filter run's one-step std (`result`, run
    without a band scale on the record y [T, ny], scored from sample `init` on, as
    `score_record` scores) that makes its `level` band cover that record's measurements:
    `FilterSettings.band_scale` for the records to come. Fit it on a tuning record, never on
    the one it is scored on."""
    from twin_ml.uq.metrics import conformal_scale

    y = np.asarray(y, dtype=np.float64)[init:]
    mean, std = result.predicted_mean[init:], result.predicted_std[init:]
    return conformal_scale(y[None], mean[None], std[None], level)


def horizon_scale(
    score: RecordScore, settings: FilterSettings | None = None, level: float = 0.9
) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """`FilterSettings.horizon_scale` from a tuning record's score (`score_record` with the
    horizons to calibrate, > 1): per horizon and output, the split-conformal factor that makes
    the `level` band of the h-step predictions cover that record (as `band_scale` does for the
    first step). `settings`: those the score ran with, when they held a horizon_scale already
    (the factors found are then relative to it, and multiplied in). Fit it on a tuning record,
    never on the one it is scored on."""
    from twin_ml.uq.metrics import conformal_scale

    out = []
    for h in score.horizons:
        if h < 2:
            continue
        r = score.z[h]  # |error| / std: the scores of a zero mean and a unit std
        before = settings.band_at(h, r.shape[1]) if settings is not None else np.ones(r.shape[1])
        f = conformal_scale(r[None], 0.0, 1.0, level) * before
        out.append((int(h), tuple(float(v) for v in f)))
    return tuple(out)


def _pooled(err: list[np.ndarray], z: list[np.ndarray], ny: int):
    E = np.concatenate(err) if err else np.zeros((0, ny))
    C = (np.concatenate(z) if z else np.zeros((0, ny))) <= Z90  # inside the 90% band
    ok = np.isfinite(E)
    rmse = float(np.sqrt(np.mean(E[ok] ** 2))) if ok.any() else float("nan")
    per = [
        float(np.sqrt(np.mean(E[ok[:, j], j] ** 2))) if ok[:, j].any() else float("nan")
        for j in range(ny)
    ]
    cov = float(np.mean(C[ok])) if ok.any() else float("nan")
    return rmse, per, cov, int(ok.sum())


def score_record(
    system,
    forecast: Callable[..., np.ndarray],
    times: np.ndarray,
    u: np.ndarray,
    y: np.ndarray,
    noise: np.ndarray,
    x0: tuple[np.ndarray, np.ndarray],
    p: tuple[np.ndarray, np.ndarray],
    settings: FilterSettings = FilterSettings(),
    *,
    horizons: tuple[int, ...] = (1, 10, 50),
    init: int = 1,
    every: int = 1,
    progress: bool = False,
) -> RecordScore:
    """`run_filter`'s arguments; see `RecordScore`. The members ahead of the data are stepped
    together with the filter's own, in one forecast call per sample (a batch of N x the open
    origins: for an exported ensemble keep N a multiple of its size M, so every member keeps its
    network)."""
    if not horizons or min(horizons) < 1:
        raise ValueError(f"horizons must be >= 1, got {list(horizons)}")
    if init < 1 or every < 1:
        raise ValueError(f"init and every must be >= 1, got {init}, {every}")
    times, u, y = (np.asarray(a, dtype=np.float64) for a in (times, u, y))
    T, ny = y.shape
    if init >= T:
        raise ValueError(f"init = {init} leaves no sample of the {T} to score")
    f = EnsembleFilter.start(system, forecast, noise, x0, p, times[0], u[0], settings)
    # the open loop: the model's own simulation
    ol = EnsembleFilter.start(system, forecast, noise, x0, p, times[0], u[0], _open_loop(settings))
    tracker = Ahead(horizons, every, dt=float(np.median(np.diff(times))))
    err = {h: [] for h in horizons}
    zs = {h: [] for h in horizons}  # |error| / the band's std
    err_ol, z_ol = [], []
    steps = []
    for k in tqdm(range(T), desc="filter", disable=not progress, leave=False):
        for h, (mean, std) in tracker.advance(f, times[k], u[k]).items():
            e = y[k] - mean
            err[h].append(e[None])
            zs[h].append((np.abs(e) / std)[None])
        est = f.step(times[k], u[k], y[k])
        steps.append(est)
        e_ol = ol.step(times[k], u[k], y[k] if k < init else np.full(ny, np.nan))
        if k >= init:
            if 1 in err:
                e = y[k] - est.predicted_mean
                err[1].append(e[None])
                zs[1].append((np.abs(e) / est.predicted_std)[None])
            e = y[k] - e_ol.predicted_mean
            err_ol.append(e[None])
            z_ol.append((np.abs(e) / e_ol.predicted_std)[None])
        if k >= init - 1 and k < T - 1:
            tracker.spawn(f)
    result = _result(system, settings, steps)
    ol_rmse, ol_per, ol_cov, _ = _pooled(err_ol, z_ol, ny)
    scored = {h: _pooled(err[h], zs[h], ny) for h in horizons}
    return RecordScore(
        sorted(horizons),
        {h: s[0] for h, s in scored.items()},
        {h: s[1] for h, s in scored.items()},
        {h: s[2] for h, s in scored.items()},
        {h: s[3] for h, s in scored.items()},
        ol_rmse,
        ol_per,
        ol_cov,
        result,
        {h: np.concatenate(v) if v else np.zeros((0, ny)) for h, v in zs.items()},
    )
