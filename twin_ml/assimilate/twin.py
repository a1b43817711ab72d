"""A live twin: one asset's running estimate (an `EnsembleFilter` on a served model), fed one
batch of telemetry at a time, checked, watched for drift, and kept as JSON between batches (the
store persists `Twin.state()`; `Twin.restore` goes on from it bit for bit).

Requests (JSON objects; every error a `RequestError` naming the field, `Conflict` for a time the
twin has already passed):

- create: `inputs` {input: value} at `t0` (default 0, seconds), `noise` {output: std > 0} (the
  measurement noise), optional `initial_state` {state: value} and `initial_std` {state: std}
  (default: the training box's middle and a quarter of its width), `parameters` {name: value}
  (default: the training box's middle), `estimate` {parameter: relative std} (estimated jointly,
  in log space), `filter` {method, members, inflation, walk, process {state: std per step},
  seed, localization {state: {output: weight in [0, 1]}} (the local ETKF: a measurement's weight
  in each state's analysis, missing pairs 1; `analysis.gaspari_cohn` turns distances into
  weights), band {output: factor > 0} (the one-step band's factor, `filter.band_scale` fitted
  on a tuning record; missing outputs 1), horizon_band {h: {output: factor > 0}} (the same for
  the h-step predictions, h >= 2 steps: the `ahead` reports and forecast bands, log-linear in
  log h between the given horizons, `filter.horizon_scale`), error {output: {ar: [c1, ...],
  std}} (the model's error on that output as an autoregressive process carried in the members,
  d_k = sum_i c_i d_{k-i} + N(0, std^2), stationary, up to 32 coefficients: `filter.error_ar`,
  fitted by `filter.error_model` on a tuning record's open-loop residuals)}, `alarms` {window,
  nis_low, nis_high, reference, slack, threshold}, `ahead` [h, ...] (up to 4 horizons in steps: each
  sample then also reports what the twin predicted h steps before it, from the analysis then and
  the inputs that came since, `filter.Ahead`).
- observe: `times` [T] (seconds, after the twin's time, on the model's grid from `t0`),
  `outputs` {output: [T] numbers or null (not measured)}, `inputs` {input: [T]}: the inputs that
  drove the asset at those times (required: the forecast needs them). A gap between samples is
  forecast across, in whole model steps, the inputs linear across it, the band growing; a gap
  longer than the model's longest rollout is refused (the estimate would be a free run far past
  what the model was checked on: create a new twin).
- forecast: `times` [K] or `steps`, `inputs` {input: [K]} ahead of the twin's time, `quantiles`.

Alarms (`Watch`), per window of `window` samples:
- the window's mean NIS per measured output against `nis_low` / `nis_high`: a consistent filter's
  is 1 (its innovations have the std it predicts); far above, the model no longer explains the
  measurements (or the filter diverged); far below, the band is much wider than the errors;
- the drift CUSUM (`twin_ml.drift.cusum_step`, the one twin-monitor runs) on every output's
  window level (mean z, z = innovation / its predicted std) and spread (log RMS z), standardized
  by the twin's first `reference` windows (as twin-monitor standardizes by a clean reference:
  on real data the innovations are correlated and their windows' statistics vary more than white
  noise's), or by the theory's N(0, 1) with `reference` 0; slack and threshold in those units.
An alarm is reported once, when raised; the twin's `alarm` stays on until it is deleted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from twin_ml.assimilate.analysis import Diverged
from twin_ml.assimilate.filter import (
    METHODS,
    Ahead,
    EnsembleFilter,
    Estimate,
    FilterSettings,
    check_error_model,
    step_many,
)
from twin_ml.contract import ModelCard, RequestError
from twin_ml.contract.requests import by_name, number, numbers, physical, quantile_levels
from twin_ml.drift import cusum_step

CREATE_FIELDS = (
    "t0", "inputs", "noise", "initial_state", "initial_std", "parameters", "estimate",
    "filter", "alarms", "ahead",
)  # fmt: skip
MAX_AHEAD = 4  # horizons a twin may track
OBSERVE_FIELDS = ("times", "outputs", "inputs")
FORECAST_FIELDS = ("times", "steps", "inputs", "quantiles")
MAX_MEMBERS = 512
MAX_HORIZON_BANDS, MAX_HORIZON_BAND = 16, 100_000  # filter.horizon_band: horizons, steps
MAX_ERROR_ORDER = 32  # filter.error: coefficients per output


class Conflict(RequestError):
    """A time the twin has already assimilated (duplicated or out of order): HTTP 409."""


def _unknown(body: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise RequestError(where or extra[0], f"unknown fields {extra}; allowed: {list(allowed)}")


def _object(body: Any, where: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(where or "body", "must be a JSON object")
    return body


@dataclass(frozen=True)
class AlarmSettings:
    window: int = 20  # samples per test window
    nis_low: float = 0.2  # the window's mean NIS per measured output below this: an alarm
    nis_high: float = 5.0  # ... above this: an alarm
    reference: int = 10  # windows that standardize the CUSUMs (0: the theory's N(0, 1))
    slack: float = 1.0  # CUSUM allowance (standardized units)
    threshold: float = 8.0  # CUSUM alarm level

    def check(self) -> AlarmSettings:
        if not 2 <= self.window <= 100_000:
            raise RequestError("alarms.window", f"must be in [2, 100000], got {self.window}")
        if not 0 <= self.nis_low < 1 < self.nis_high:
            raise RequestError(
                "alarms.nis_low", f"need 0 <= nis_low < 1 < nis_high, got {self.nis_low}, "
                f"{self.nis_high}"
            )  # fmt: skip
        if not 0 <= self.reference <= 10_000:
            raise RequestError("alarms.reference", f"must be in [0, 10000], got {self.reference}")
        for name in ("slack", "threshold"):
            if not getattr(self, name) >= 0:
                raise RequestError(f"alarms.{name}", f"must be >= 0, got {getattr(self, name)}")
        return self


class Watch:
    """The alarms of a twin (see the module doc), fed one analysis at a time."""

    def __init__(self, outputs: list[str], settings: AlarmSettings, state: dict | None = None):
        self.outputs, self.settings = outputs, settings
        ny = len(outputs)
        s = state or {}
        self.z = [list(v) for v in s.get("z", [[] for _ in range(ny)])]  # this window's z
        self.nis, self.dof = float(s.get("nis", 0.0)), int(s.get("dof", 0))
        self.samples = int(s.get("samples", 0))
        # the reference windows' (level, spread) per output, until `reference` are in
        self.ref = [list(map(list, v)) for v in s.get("ref", [[] for _ in range(ny)])]
        self.scale = s.get("scale")  # per output [level mean, level sd, spread mean, spread sd]
        self.level = [list(v) for v in s.get("level", [[0.0, 0.0] for _ in range(ny)])]
        self.spread = [list(v) for v in s.get("spread", [[0.0, 0.0] for _ in range(ny)])]
        self.raised = list(s.get("raised", []))  # every alarm so far

    def state(self) -> dict[str, Any]:
        return {
            "z": self.z,
            "nis": self.nis,
            "dof": self.dof,
            "samples": self.samples,
            "ref": self.ref,
            "scale": self.scale,
            "level": self.level,
            "spread": self.spread,
            "raised": self.raised,
        }

    def _scales(self, n: int) -> list[list[float]] | None:
        """Per output the location and scale of a window's level and spread: the theory's for
        white N(0, 1) innovations (`reference` 0), else the reference windows' own."""
        if not self.settings.reference:
            return [[0.0, 1 / math.sqrt(n), 0.0, 1 / math.sqrt(2 * n)] for _ in self.outputs]
        if self.scale is None and min(len(r) for r in self.ref) >= self.settings.reference:
            self.scale = []
            for r in self.ref:
                a = np.asarray(r)
                self.scale.append(
                    [
                        a[:, 0].mean(),
                        max(a[:, 0].std(), 1e-6),
                        a[:, 1].mean(),
                        max(a[:, 1].std(), 1e-6),
                    ]
                )
        return self.scale

    def feed(self, est: Estimate) -> list[dict[str, Any]]:
        """The alarms this analysis raised (at the end of a window; none in between)."""
        inn, s = est.innovation, self.settings
        for j in range(len(self.outputs)):
            if np.isfinite(inn.d[j]):
                self.z[j].append(float(inn.d[j] / inn.std[j]))
        self.nis += inn.nis
        self.dof += inn.measured
        self.samples += 1
        if self.samples < s.window:
            return []
        new = []
        if self.dof:
            mean = self.nis / self.dof
            if mean > s.nis_high:
                what = (
                    f"too large: their mean NIS {mean:.3g} over a window is above {s.nis_high:g} "
                    "(the model no longer explains the measurements)"
                )
                new.append(self._alarm(est.t, "nis_high", None, mean, what))
            elif mean < s.nis_low:
                what = (
                    f"too small: their mean NIS {mean:.3g} over a window is below {s.nis_low:g} "
                    "(the band is much wider than the errors: noise or spread overstated)"
                )
                new.append(self._alarm(est.t, "nis_low", None, mean, what))
        for j, name in enumerate(self.outputs):
            z = np.asarray(self.z[j])
            if len(z) < 2:
                continue
            level, spread = float(z.mean()), float(0.5 * math.log(max(np.mean(z**2), 1e-24)))
            scales = self._scales(len(z))
            if scales is None:  # still gathering the reference
                self.ref[j].append([level, spread])
                continue
            lm, ls, sm, ss = scales[j]
            self.level[j] = list(cusum_step(*self.level[j], (level - lm) / ls, s.slack, True))
            self.spread[j] = list(cusum_step(*self.spread[j], (spread - sm) / ss, s.slack, False))
            if max(self.level[j]) > s.threshold:
                what = "its innovations' mean has shifted (a bias, a drifting parameter)"
                new.append(self._alarm(est.t, "cusum_level", name, max(self.level[j]), what))
                self.level[j] = [0.0, 0.0]
            if self.spread[j][0] > s.threshold:
                what = "its innovations have grown beyond their usual size"
                new.append(self._alarm(est.t, "cusum_spread", name, self.spread[j][0], what))
                self.spread[j] = [0.0, 0.0]
        self.z = [[] for _ in self.outputs]
        self.nis, self.dof, self.samples = 0.0, 0, 0
        self.raised.extend(new)
        return new

    def _alarm(self, t, kind, output, value, what) -> dict[str, Any]:
        on = f"output {output}" if output else "the innovations"
        return {
            "t": t,
            "kind": kind,
            "output": output,
            "statistic": value,
            "message": f"{on}: {what}",
        }


@dataclass(frozen=True)
class TwinSpec:
    """A created twin's checked settings (kept with it, JSON)."""

    t0: float
    u0: list[float]
    noise: list[float]
    x0: list[float]
    x0_std: list[float]
    p: list[float]
    p_std: list[float]  # relative, of the estimated ones (0 elsewhere)
    filter: dict[str, Any]
    alarms: dict[str, Any]
    ahead: list[int] = field(default_factory=list)  # steps: the predictions each sample reports

    def settings(self) -> FilterSettings:
        f = dict(self.filter)
        loc = tuple(tuple(row) for row in f.get("localization", ()))
        return FilterSettings(
            **{
                **f,
                "parameters": tuple(f["parameters"]),
                "process": tuple(f["process"]),
                "localization": loc,
                "band_scale": tuple(f.get("band_scale", ())),
                "horizon_scale": tuple((int(h), tuple(v)) for h, v in f.get("horizon_scale", ())),
                "error_ar": tuple(tuple(row) for row in f.get("error_ar", ())),
                "error_std": tuple(f.get("error_std", ())),
            }
        )


def _horizon_band(system, given: Any) -> list[list]:
    """filter.horizon_band {h: {output: factor > 0}} (h: whole steps >= 2, as a string in JSON;
    an output not given: 1) -> [[h, [factor per output]], ...] by increasing h."""
    given = _object(given, "filter.horizon_band")
    if len(given) > MAX_HORIZON_BANDS:
        raise RequestError("filter.horizon_band", f"at most {MAX_HORIZON_BANDS} horizons")
    out = []
    for key, factors in given.items():
        try:
            h = int(key)
        except (TypeError, ValueError):
            h = None
        if h is None or str(h) != str(key).strip() or not 2 <= h <= MAX_HORIZON_BAND:
            raise RequestError(
                f"filter.horizon_band.{key}",
                f"a horizon in whole steps from 2 to {MAX_HORIZON_BAND}",
            )
        out.append([h, _factors(system, factors, f"filter.horizon_band.{key}")])
    return sorted(out)


def _factors(system, given: Any, where: str) -> list[float]:
    """{output: factor > 0} at `where` -> a factor per output (an output not given: 1)."""
    row = by_name(given, system.output_names, where, required=False)
    band = [number(row.get(o, 1.0), f"{where}.{o}") for o in system.output_names]
    for o, v in zip(system.output_names, band):
        if not v > 0:
            raise RequestError(f"{where}.{o}", f"a factor > 0, got {v}")
    return band


def _error(system, given: Any) -> tuple[list[list[float]], list[float]]:
    """filter.error {output: {ar: [coefficients], std: s >= 0}} (an output not given: none) ->
    (coefficients per output, zero-padded to one length; driving std per output)."""
    rows = by_name(given, system.output_names, "filter.error", required=False)
    if not rows:
        raise RequestError("filter.error", f"name at least one of {system.output_names}")
    ar, std = {}, {}
    for name, row in rows.items():
        where = f"filter.error.{name}"
        row = _object(row, where)
        _unknown(row, ("ar", "std"), where)
        if "ar" not in row or "std" not in row:
            raise RequestError(where, "give ar (the coefficients) and std (the driving std)")
        if not isinstance(row["ar"], list) or not 1 <= len(row["ar"]) <= MAX_ERROR_ORDER:
            raise RequestError(f"{where}.ar", f"a list of 1 to {MAX_ERROR_ORDER} coefficients")
        ar[name] = [float(v) for v in numbers(row["ar"], f"{where}.ar")]
        std[name] = number(row["std"], f"{where}.std")
        if not std[name] >= 0:
            raise RequestError(f"{where}.std", f"a std >= 0, got {std[name]}")
        try:
            check_error_model([ar[name]], [std[name]], 1)
        except ValueError as e:
            raise RequestError(f"{where}.ar", str(e).split(": ", 1)[-1]) from None
    p = max(len(a) for a in ar.values())
    return (
        [ar.get(o, []) + [0.0] * (p - len(ar.get(o, []))) for o in system.output_names],
        [std.get(o, 0.0) for o in system.output_names],
    )


def _localization(system, given: Any, method: str) -> list[list[float]]:
    """filter.localization {state: {output: weight in [0, 1]}} -> weights [nx][ny] (a pair not
    given: 1)."""
    rows = by_name(given, system.state_names, "filter.localization", required=False)
    if method != "etkf":
        raise RequestError("filter.localization", "is built for the ETKF: set filter.method etkf")
    out = []
    for name in system.state_names:
        where = f"filter.localization.{name}"
        w = by_name(rows.get(name) or {}, system.output_names, where, required=False)
        row = [number(w.get(o, 1.0), f"{where}.{o}") for o in system.output_names]
        for o, v in zip(system.output_names, row):
            if not 0 <= v <= 1:
                raise RequestError(f"{where}.{o}", f"a weight in [0, 1], got {v}")
        out.append(row)
    return out


def _half_width(rng) -> float:
    return (rng[1] - rng[0]) / 2 if rng else 0.0


def parse_create(card: ModelCard, body: Any) -> TwinSpec:
    body = _object(body, "")
    _unknown(body, CREATE_FIELDS, "")
    system, box = card.system, card.domain
    t0 = number(body.get("t0", 0.0), "t0")
    given_u = by_name(body.get("inputs"), system.input_names, "inputs", required=True)
    u0 = []
    for var in system.inputs:
        u0.append(number(given_u[var.name], f"inputs.{var.name}"))
        physical(var, u0[-1], f"inputs.{var.name}")
    given_r = by_name(body.get("noise"), system.output_names, "noise", required=True)
    noise = [number(given_r[n], f"noise.{n}") for n in system.output_names]
    for n, r in zip(system.output_names, noise):
        if not r > 0:
            raise RequestError(f"noise.{n}", f"must be > 0 (the measurement noise std), got {r}")
    given_x = by_name(
        body.get("initial_state"), system.state_names, "initial_state", required=False
    )
    given_xs = by_name(body.get("initial_std"), system.state_names, "initial_std", required=False)
    x0, x0_std = [], []
    for var in system.states:
        rng = box.states.get(var.name)
        x0.append(
            number(given_x[var.name], f"initial_state.{var.name}")
            if var.name in given_x
            else box.state_middle(var.name)
        )
        physical(var, x0[-1], f"initial_state.{var.name}")
        sd = (
            number(given_xs[var.name], f"initial_std.{var.name}")
            if var.name in given_xs
            else _half_width(rng) / 2
        )
        if not sd >= 0:
            raise RequestError(f"initial_std.{var.name}", f"must be >= 0, got {sd}")
        x0_std.append(sd)
    given_p = by_name(body.get("parameters"), system.parameter_names, "parameters", required=False)
    p = []
    for var in system.parameters:
        rng = box.parameters.get(var.name)
        if var.name in given_p:
            p.append(number(given_p[var.name], f"parameters.{var.name}"))
        elif rng:
            p.append((rng[0] + rng[1]) / 2)
        else:
            raise RequestError(
                f"parameters.{var.name}", "is required: the training box does not range it"
            )
        physical(var, p[-1], f"parameters.{var.name}")
    given_e = by_name(body.get("estimate"), system.parameter_names, "estimate", required=False)
    p_std = [0.0] * len(p)
    for i, name in enumerate(system.parameter_names):
        if name in given_e:
            p_std[i] = number(given_e[name], f"estimate.{name}")
            if not 0 <= p_std[i] <= 2:
                raise RequestError(
                    f"estimate.{name}", f"a relative prior std in [0, 2], got {p_std[i]}"
                )
            if not p[i] > 0:
                raise RequestError(
                    f"parameters.{name}",
                    f"an estimated parameter must be > 0 (log space), got {p[i]}",
                )
    f = _object(body.get("filter") or {}, "filter")
    _unknown(
        f,
        (
            "method",
            "members",
            "inflation",
            "walk",
            "process",
            "seed",
            "localization",
            "band",
            "horizon_band",
            "error",
        ),
        "filter",
    )
    given_q = by_name(f.get("process"), system.state_names, "filter.process", required=False)
    process = [number(given_q.get(n, 0.0), f"filter.process.{n}") for n in system.state_names]
    method = f.get("method", "etkf")
    if method not in METHODS:
        raise RequestError("filter.method", f"must be one of {list(METHODS)}, got {method!r}")
    members = f.get("members", 32)
    if isinstance(members, bool) or not isinstance(members, int) or not 2 <= members <= MAX_MEMBERS:
        raise RequestError("filter.members", f"must be an integer in [2, {MAX_MEMBERS}]")
    seed = f.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RequestError("filter.seed", "must be an integer >= 0")
    settings = {
        "method": method,
        "members": members,
        "inflation": number(f.get("inflation", 1.0), "filter.inflation"),
        "walk": number(f.get("walk", 0.01), "filter.walk"),
        "process": process if any(process) else [],
        "parameters": [n for n in system.parameter_names if n in given_e],
        "seed": seed,
    }
    if f.get("localization") is not None:
        settings["localization"] = _localization(system, f["localization"], method)
    if f.get("band") is not None:  # the one-step band's factor per output
        settings["band_scale"] = _factors(system, f["band"], "filter.band")
    if f.get("horizon_band") is not None:  # the same for h-step predictions: {h: {output: f}}
        settings["horizon_scale"] = _horizon_band(system, f["horizon_band"])
    if f.get("error") is not None:  # the model's output error: {output: {ar: [...], std}}
        settings["error_ar"], settings["error_std"] = _error(system, f["error"])
    if not settings["inflation"] >= 1:
        raise RequestError("filter.inflation", f"must be >= 1, got {settings['inflation']}")
    if not 0 <= settings["walk"] <= 1:
        raise RequestError("filter.walk", f"must be in [0, 1], got {settings['walk']}")
    if any(v < 0 for v in process):
        raise RequestError("filter.process", "stds must be >= 0")
    a = _object(body.get("alarms") or {}, "alarms")
    _unknown(a, tuple(AlarmSettings.__dataclass_fields__), "alarms")
    ints = {}
    for k in ("window", "reference"):
        if k in a:
            if isinstance(a[k], bool) or not isinstance(a[k], int):
                raise RequestError(f"alarms.{k}", "must be an integer")
            ints[k] = a[k]
    floats = {k: number(a[k], f"alarms.{k}") for k in a if k not in ints}
    alarms = AlarmSettings(**ints, **floats).check()
    ahead = body.get("ahead") or []
    if not isinstance(ahead, list) or len(ahead) > MAX_AHEAD:
        raise RequestError("ahead", f"must be a list of at most {MAX_AHEAD} horizons (steps)")
    for i, h in enumerate(ahead):
        if isinstance(h, bool) or not isinstance(h, int) or not 2 <= h <= card.time.max_steps:
            raise RequestError(
                f"ahead[{i}]", f"must be an integer in [2, {card.time.max_steps}] (steps)"
            )
    return TwinSpec(
        t0, u0, noise, x0, x0_std, p, p_std, settings, asdict(alarms), sorted(set(ahead))
    )


@dataclass(frozen=True)
class Observation:
    times: np.ndarray  # [T]
    u: np.ndarray  # [T, nu]
    y: np.ndarray  # [T, ny], NaN: not measured


def _times(card: ModelCard, t: np.ndarray, t_last: float, t0: float, where: str) -> None:
    """Times after the twin's, increasing, on the model's grid, no gap past its longest rollout."""
    dt = card.time.dt
    if len(t) < 1:
        raise RequestError(where, "must hold at least one timestamp")
    if len(t) > card.time.max_steps + 1:
        raise RequestError(where, f"at most {card.time.max_steps + 1} per request")
    for i in range(len(t)):
        before = t_last if i == 0 else t[i - 1]
        if t[i] <= before:
            raise Conflict(
                f"{where}[{i}]",
                f"{t[i]:g} is not after {'the twin' if i == 0 else 'the previous sample'}'s "
                f"time {before:g}: duplicated or out-of-order samples are refused (a sample is "
                "assimilated once, in time order)",
            )
        k = (t[i] - t0) / dt
        if not math.isclose(k, round(k), rel_tol=0, abs_tol=1e-6 * max(1.0, abs(k))):
            raise RequestError(
                f"{where}[{i}]",
                f"{t[i]:g} is not on the model's grid (t0 + k * dt, dt = {dt:g}): resample first",
            )
    gaps = np.diff(np.concatenate([[t_last], t])) / dt
    worst = int(np.argmax(gaps))
    if gaps[worst] > card.time.max_steps + 1e-6:
        raise RequestError(
            f"{where}[{worst}]",
            f"a gap of {gaps[worst]:.0f} steps after the previous sample exceeds the model's "
            f"longest rollout ({card.time.max_steps} steps): start a new twin",
        )


def _inputs(card: ModelCard, given: Any, n: int, where: str) -> np.ndarray:
    """[n, nu]: every input's series, within its physical limits."""
    given = by_name(given, card.system.input_names, where, required=True)
    u = np.zeros((n, len(card.system.inputs)))
    for j, var in enumerate(card.system.inputs):
        at = f"{where}.{var.name}"
        u[:, j] = numbers(given[var.name], at, n, per=" (one per time)")
        physical(var, float(u[:, j].max()), at, float(u[:, j].min()))
    return u


def parse_observe(card: ModelCard, body: Any, t_last: float, t0: float) -> Observation:
    body = _object(body, "")
    _unknown(body, OBSERVE_FIELDS, "")
    system = card.system
    t = numbers(body.get("times"), "times")
    _times(card, t, t_last, t0, "times")
    given_y = by_name(body.get("outputs"), system.output_names, "outputs", required=False)
    if not given_y:
        raise RequestError("outputs", f"must name at least one of {system.output_names}")
    y = np.full((len(t), len(system.outputs)), np.nan)
    for j, name in enumerate(system.output_names):
        if name in given_y:
            y[:, j] = numbers(
                given_y[name], f"outputs.{name}", len(t), allow_null=True, per=" (one per time)"
            )
    return Observation(t, _inputs(card, body.get("inputs"), len(t), "inputs"), y)


class Twin:
    """One live twin on a model (`card`) with a forecast (`OnnxForecast` on its file, or any
    forecast `EnsembleFilter` takes)."""

    def __init__(
        self,
        card: ModelCard,
        spec: TwinSpec,
        filt: EnsembleFilter,
        watch: Watch,
        ahead: dict | None = None,
    ):
        self.card, self.spec, self.filter, self.watch = card, spec, filt, watch
        self.ahead = Ahead(spec.ahead, state=ahead) if spec.ahead else None

    @classmethod
    def create(cls, card: ModelCard, forecast, body: Any) -> Twin:
        spec = parse_create(card, body)
        system = card.system.build()
        filt = EnsembleFilter.start(
            system,
            forecast,
            spec.noise,
            (np.array(spec.x0), np.array(spec.x0_std)),
            (np.array(spec.p), np.array(spec.p_std)),
            spec.t0,
            np.array(spec.u0),
            spec.settings(),
        )
        return cls(card, spec, filt, Watch(card.system.output_names, AlarmSettings(**spec.alarms)))

    def state(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "filter": self.filter.state(),
            "watch": self.watch.state(),
            **({"ahead": self.ahead.state()} if self.ahead else {}),
        }

    @classmethod
    def restore(cls, card: ModelCard, forecast, state: dict[str, Any]) -> Twin:
        spec = TwinSpec(**state["spec"])
        filt = EnsembleFilter.restore(
            card.system.build(), forecast, spec.noise, spec.settings(), state["filter"]
        )
        watch = Watch(card.system.output_names, AlarmSettings(**spec.alarms), state["watch"])
        return cls(card, spec, filt, watch, state.get("ahead"))

    @property
    def t(self) -> float:
        return self.filter.t

    def observe(self, body: Any) -> dict[str, Any]:
        """Assimilate a batch (see the module doc): per sample the one-step prediction and the
        filtered outputs, then the estimate after the last one, and the alarms raised."""
        obs = parse_observe(self.card, body, self.t, self.spec.t0)
        try:
            return self.assimilate(obs)
        except Diverged as e:  # the request's doing; this object is left part-way (not to save)
            raise RequestError(
                e.field,
                f"these samples' forecast or analysis diverged ({e}): nothing was assimilated "
                "(values far outside what the model was trained on?)",
            ) from None

    def assimilate(self, obs: Observation) -> dict[str, Any]:
        return assimilate_many([self], [obs])[0]

    def _sample(self, est: Estimate, before: dict) -> dict[str, Any]:
        """One assimilated sample's answer; `before`: the `Ahead` reports for it."""
        names = self.card.system.output_names
        sample = {
            "t": est.t,
            "predicted": _by_name(names, est.predicted_mean, est.predicted_std),
            "filtered": _by_name(names, est.filtered_mean, est.filtered_std),
            "nis": est.innovation.nis,
            "measured": est.innovation.measured,
        }
        if self.ahead:  # what the twin predicted h steps before (std with the noise)
            sample["ahead"] = {str(h): _by_name(names, *before[h]) for h in sorted(before)}
        return sample

    def estimate(self) -> dict[str, Any]:
        f, sys = self.filter, self.card.system
        X = f.X
        H = f.observe_members(X, f.u, D=f.D)
        P = np.exp(f.TH)
        return {
            "t": f.t,
            "states": _by_name(sys.state_names, X.mean(0), X.std(0, ddof=1)),
            "outputs": _by_name(sys.output_names, H.mean(0), H.std(0, ddof=1)),
            "parameters": _by_name(list(f.settings.parameters), P.mean(0), P.std(0, ddof=1)),
            "alarm": bool(self.watch.raised),
            "alarms_raised": len(self.watch.raised),
        }

    def forecast(self, body: Any) -> dict[str, Any]:
        body = _object(body, "")
        _unknown(body, FORECAST_FIELDS, "")
        dt, t_now = self.card.time.dt, self.t
        if ("times" in body) == ("steps" in body):
            raise RequestError("forecast", "give exactly one of times or steps")
        if "steps" in body:
            n = body["steps"]
            if (
                isinstance(n, bool)
                or not isinstance(n, int)
                or not 1 <= n <= self.card.time.max_steps
            ):
                raise RequestError(
                    "forecast.steps", f"must be an integer in [1, {self.card.time.max_steps}]"
                )
            k_now = round((t_now - self.spec.t0) / dt)  # on the grid: t0 + k dt, k whole
            times = self.spec.t0 + dt * np.arange(k_now + 1, k_now + n + 1)
        else:
            times = numbers(body["times"], "forecast.times")
            _times(self.card, times, t_now, self.spec.t0, "forecast.times")
        u = _inputs(self.card, body.get("inputs"), len(times), "forecast.inputs")
        qs = quantile_levels(body.get("quantiles"), "forecast.quantiles")
        out = self.filter.forecast_ahead(times, u)
        if not (np.isfinite(out["mean"]).all() and np.isfinite(out["std_measured"]).all()):
            raise RequestError(
                "forecast.inputs",
                "the forecast diverged (non-finite members): inputs far outside what the model "
                "was trained on?",
            )
        from scipy.stats import norm

        answer = {"times": times.tolist(), "outputs": {}}
        for j, name in enumerate(self.card.system.output_names):
            mean, std = out["mean"][:, j], out["std_measured"][:, j]
            answer["outputs"][name] = {
                "mean": mean.tolist(),
                "std": std.tolist(),
                "quantiles": {f"{q:g}": (mean + norm.ppf(q) * std).tolist() for q in qs},
            }
        return answer


def assimilate_many(twins: list[Twin], observations: list[Observation]) -> list[dict[str, Any]]:
    """`twin.assimilate(obs)` for each pair (distinct twins), their samples taken in rounds: the
    r-th sample of every twin that has one in one `step_many` (one forecast call and one
    vectorized analysis where the twins allow it; a fleet of twins of one model on one
    consumer). Each twin's answer is the one it gives alone."""
    if len(twins) != len(observations) or len({id(tw) for tw in twins}) != len(twins):
        raise ValueError("assimilate_many takes distinct twins, one observation each")
    answers = [{"samples": [], "alarms": []} for _ in twins]
    for r in range(max((len(o.times) for o in observations), default=0)):
        now = [k for k, o in enumerate(observations) if r < len(o.times)]
        row = [(float(observations[k].times[r]), observations[k].u[r], observations[k].y[r])
               for k in now]  # fmt: skip
        before = [
            twins[k].ahead.advance(twins[k].filter, tk, uk) if twins[k].ahead else {}
            for k, (tk, uk, _) in zip(now, row)
        ]
        ests = step_many([twins[k].filter for k in now], *zip(*row))
        for k, est, ahead in zip(now, ests, before):
            tw, answer = twins[k], answers[k]
            if tw.ahead:
                tw.ahead.spawn(tw.filter)
            answer["alarms"] += tw.watch.feed(est)
            answer["samples"].append(tw._sample(est, ahead))
    return [{**a, **tw.estimate()} for tw, a in zip(twins, answers)]


def _by_name(names: list[str], mean: np.ndarray, std: np.ndarray) -> dict[str, dict[str, float]]:
    return {n: {"mean": float(m), "std": float(s)} for n, m, s in zip(names, mean, std)}
