"""Requests a model answers, checked once against its card: scenarios (`/simulate`, the runtime)
and calibrations (`/calibrate`, `twin-calibrate`). Every error is a `RequestError` naming its
field and what is allowed. Torch-free.

A scenario::

    {"parameters": {"length": 1.2, ...},    # every declared parameter, by name
     "initial_state": {"theta": 0.3, ...},  # optional; missing states: the training box's middle
     "t_end": 5.0, "dt": 0.05,              # or "times": [0, 0.05, ...] (uniform, the model's dt)
     "inputs": {"torque": [0.0, 0.1, ...]}, # every declared input, one value per time point
     "quantiles": [0.05, 0.95],             # optional
     "fields": [0.0, 50.0]}                 # optional, reduced-order models of field systems:
                                            # the decoded fields at these times of the grid

A calibration::

    {"times": [0, 4, 8, ...],                       # sorted, unique, the model's uniform grid
     "outputs": {"h2": [3.1, null, 3.4, ...]},      # measured outputs by name; null / NaN = missing
     "inputs": {"pump": [3.0, 3.0, ...]},           # every input, on the same timestamps
     "fit": ["k1", "k2"],                           # parameters (and "state:<name>" initial states)
     "parameters": {"k1": 0.1, ...},                # values of the parameters not fitted
     "initial_state": {"h1": 4.0, "h2": 3.0},       # values of the initial states not fitted
     "bounds": {"k1": [0.05, 0.2]},                 # default: the model's training domain
     "priors": {"k2": {"normal": [0.1, 0.02]}},     # optional, on top of the bounds (uniform)
     "noise": {"h2": 0.02}}                         # per-output noise std; missing: estimated

Values outside a variable's physical `limits` (declared by the system: a negative mass, a pump
voltage below 0) are refused; values outside the training box are answered and flagged.

A calibration is checked against an exported model's card, or, for the physics solver alone (no
model), against a `SolverTarget`: the system's card, the request's own time grid (sorted and
unique, any spacing), and the ranges the system declares as the default bounds and initial
states (no training domain: nothing extrapolates). Every check that needs the request alone
runs here, before any model or solver call: names, grid, values, bounds, priors inside the
bounds, and whether every noise std that must be estimated can be (outputs never observed need
none: no point of theirs enters the fit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from twin_ml.contract.card import (
    DomainBox,
    ModelCard,
    SystemCard,
    Variable,
    check_sorted_times,
)
from twin_ml.contract.errors import RequestError, RequestTooLarge

SCENARIO_FIELDS = (
    "parameters",
    "initial_state",
    "t_end",
    "dt",
    "times",
    "inputs",
    "quantiles",
    "fields",
)
CALIBRATION_FIELDS = (
    "times", "outputs", "inputs", "fit", "parameters", "initial_state", "bounds", "priors", "noise",
)  # fmt: skip
MAX_QUANTILES = 32


# ---- values ------------------------------------------------------------------------------------
def number(value: Any, where: str, *, allow_null: bool = False) -> float:
    """A finite number (`allow_null`: None and NaN give NaN, a missing value)."""
    if value is None and allow_null:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        kind = "a number or null" if allow_null else "a number"
        raise RequestError(where, f"must be {kind}, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:
        raise RequestError(where, "is too large for a float") from None
    if math.isinf(v) or (math.isnan(v) and not allow_null):
        raise RequestError(where, f"must be finite, got {value!r}")
    return v


def numbers(
    values: Any, where: str, n: int | None = None, *, allow_null: bool = False, per: str = ""
) -> np.ndarray:
    """A list of numbers (`n`: exactly that many; `per` names what they line up with)."""
    if not isinstance(values, (list, tuple, np.ndarray)):
        what = f"a list of {n} numbers{per}" if n is not None else "a list of numbers"
        raise RequestError(where, f"must be {what}")
    if n is not None and len(values) != n:
        raise RequestError(where, f"has {len(values)} values, but {_count(n, per)}")
    if all(type(v) is float or type(v) is int for v in values):  # plain JSON numbers: at once
        try:
            a = np.array(values, dtype=np.float64)
        except OverflowError:  # an int beyond float: the loop below names it
            a = None
        if a is not None and np.isfinite(a).all():
            return a
    return np.array(
        [number(v, f"{where}[{i}]", allow_null=allow_null) for i, v in enumerate(values)],
        dtype=np.float64,
    )


def _count(n: int, per: str) -> str:
    return "the time grid has " + f"{n} points" if per else f"there are {n} timestamps"


def by_name(given: Any, declared: list[str], where: str, *, required: bool) -> dict[str, Any]:
    """An object keyed by declared names: unknown names refused, missing ones when `required`."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise RequestError(
            where, f"must be an object keyed by name ({', '.join(declared) or 'none declared'})"
        )
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise RequestError(
            where, f"unknown names {unknown}; declared: {', '.join(declared) or 'none'}"
        )
    missing = [n for n in declared if n not in given]
    if required and missing:
        raise RequestError(
            where, f"missing {missing}; every one of {', '.join(declared)} is required"
        )
    return given


def physical(var: Variable, value: float, where: str, lo_v: float | None = None) -> None:
    """Refuse a value outside the variable's declared physical limits (`lo_v`: a series' low end,
    `value` its high end)."""
    lo, hi = var.physical
    low = value if lo_v is None else lo_v
    if low < lo or value > hi:
        bad = low if low < lo else value
        raise RequestError(
            where,
            f"{bad:g} [{var.unit}] is outside the physical limits [{lo:g}, {hi:g}] its system "
            "declares (values in the training box are answered, outside it flagged; outside "
            "the limits, refused)",
        )


def quantile_levels(given: Any, where: str) -> list[float]:
    """Requested quantile levels: at most MAX_QUANTILES numbers in (0, 1) that differ as the
    answer names them ({q:g}); none given: []."""
    qs = given or []
    if not isinstance(qs, list) or len(qs) > MAX_QUANTILES:
        raise RequestError(where, f"must be a list of at most {MAX_QUANTILES} levels in (0, 1)")
    qs = [number(q, f"{where}[{i}]") for i, q in enumerate(qs)]
    for i, q in enumerate(qs):
        if not 0 < q < 1:
            raise RequestError(f"{where}[{i}]", f"must be in (0, 1), got {q}")
    if len({f"{q:g}" for q in qs}) != len(qs):
        raise RequestError(where, f"levels must differ (as the answer names them, {{q:g}}): {qs}")
    return qs


# ---- scenarios ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """A checked scenario: arrays on the model's grid, the quantiles asked, the domain report."""

    t: np.ndarray  # [T]
    x0: np.ndarray  # [nx]
    u: np.ndarray  # [T, nu]
    p: np.ndarray  # [np]
    quantiles: list[float]
    reasons: list[str]  # why it is outside the training domain; empty: inside
    defaulted_states: list[str]
    field_steps: list[int] = field(default_factory=list)  # grid indices of the fields asked for
    distance: float = 0.0  # how far outside the training box (DomainBox.distance); 0: inside

    @property
    def in_domain(self) -> bool:
        return not self.reasons


def _scenario_grid(card: ModelCard, sc: dict[str, Any], where: str, max_steps: int) -> np.ndarray:
    grid = card.time
    if sc.get("times") is not None:
        t = numbers(sc["times"], f"{where}.times")
        grid.check_times(t, f"{where}.times", min_points=2)
        return t
    if "t_end" not in sc:
        raise RequestError(where, "give either 't_end' (and optionally 'dt') or 'times'")
    t_end = number(sc["t_end"], f"{where}.t_end")
    dt = number(sc.get("dt", grid.dt), f"{where}.dt")
    if dt <= 0:
        raise RequestError(f"{where}.dt", f"must be > 0; this model runs at dt = {grid.dt}")
    if not math.isclose(dt, grid.dt, rel_tol=1e-6):
        raise RequestError(f"{where}.dt", f"must equal the model's dt = {grid.dt}, got {dt}")
    return grid.grid(grid.steps(t_end, f"{where}.t_end", max_steps))


def parse_scenario(
    card: ModelCard,
    sc: Any,
    where: str = "scenario",
    *,
    max_steps: int | None = None,
    strict: bool = False,
) -> Scenario:
    """One scenario (see the module doc) -> a `Scenario`. `max_steps`: a server's own limit (at
    most the model's); `strict`: refuse scenarios outside the training domain."""
    if not isinstance(sc, dict):
        raise RequestError(where, "must be an object with parameters, a time grid and inputs")
    unknown = sorted(set(sc) - set(SCENARIO_FIELDS))
    if unknown:
        raise RequestError(where, f"unknown fields {unknown}")
    system = card.system
    max_steps = min(max_steps or card.time.max_steps, card.time.max_steps)
    t = _scenario_grid(card, sc, where, max_steps)
    card.time.check_horizon(len(t) - 1, f"{where}.t_end", max_steps)

    given_p = by_name(
        sc.get("parameters"), system.parameter_names, f"{where}.parameters", required=True
    )
    p = np.empty(len(system.parameters))
    for i, var in enumerate(system.parameters):
        at = f"{where}.parameters.{var.name}"
        p[i] = number(given_p[var.name], at)
        physical(var, p[i], at)
    given_x = by_name(
        sc.get("initial_state"), system.state_names, f"{where}.initial_state", required=False
    )
    x0 = np.empty(len(system.states))
    for i, var in enumerate(system.states):
        at = f"{where}.initial_state.{var.name}"
        x0[i] = (
            number(given_x[var.name], at)
            if var.name in given_x
            else card.domain.state_middle(var.name)
        )
        physical(var, x0[i], at)
    given_u = by_name(sc.get("inputs"), system.input_names, f"{where}.inputs", required=True)
    u = np.zeros((len(t), len(system.inputs)))
    for j, var in enumerate(system.inputs):
        at = f"{where}.inputs.{var.name}"
        u[:, j] = numbers(given_u[var.name], at, len(t), per=" (one per time point)")
        physical(var, float(u[:, j].max()), at, float(u[:, j].min()))

    qs = quantile_levels(sc.get("quantiles"), f"{where}.quantiles")
    field_steps = _field_steps(card, sc.get("fields"), f"{where}.fields", t)
    reasons, distance = card.domain.check(system, p, x0, u)
    if reasons and strict:
        raise RequestError(
            where, "outside the training domain (strict mode): " + "; ".join(reasons)
        )
    defaulted = [n for n in system.state_names if n not in given_x]
    return Scenario(t, x0, u, p, qs, reasons, defaulted, field_steps, distance)


def decodes_fields(card: ModelCard) -> bool:
    """Whether the model's file decodes the fields of its system (a reduced-order model)."""
    return "field_mean" in (card.interface or {}).get("outputs", {})


def _field_steps(card: ModelCard, times: Any, where: str, t: np.ndarray | None = None) -> list[int]:
    """The grid indices of the requested field times (distinct, on the scenario's grid)."""
    if times is None:
        return []
    if not decodes_fields(card):
        what = (
            f"a {card.kind} model of field system {card.system.name!r} predicts its outputs only; "
            "export a latent or rom model to get fields"
            if card.system.grid is not None
            else f"system {card.system.name!r} has no fields"
        )
        raise RequestError(where, what)
    values = numbers(times, where)
    steps = []
    for i, v in enumerate(values):
        k = int(round((v - t[0]) / card.time.dt))
        if not (
            0 <= k < len(t) and math.isclose(t[k], v, rel_tol=1e-9, abs_tol=1e-6 * card.time.dt)
        ):
            raise RequestError(
                f"{where}[{i}]",
                f"{v:g} is not a time of the scenario's grid (multiples of dt = {card.time.dt:g} "
                f"from {t[0]:g} to {t[-1]:g})",
            )
        steps.append(k)
    if len(set(steps)) != len(steps):
        raise RequestError(where, "times must differ")
    return steps


def parse_scenarios(
    card: ModelCard,
    scenarios: Any,
    *,
    max_scenarios: int,
    max_steps: int | None = None,
    strict: bool = False,
    max_field_values: int | None = None,
) -> list[Scenario]:
    """One scenario (an object) or a non-empty list of at most `max_scenarios`; the fields asked
    for, all scenarios together, at most `max_field_values` numbers (`RequestTooLarge`)."""
    if isinstance(scenarios, dict):
        scenarios = [scenarios]
    if not isinstance(scenarios, list) or not scenarios:
        raise RequestError("scenarios", "must be a scenario object or a non-empty list of them")
    if len(scenarios) > max_scenarios:
        raise RequestError(
            "scenarios",
            f"{len(scenarios)} scenarios exceed the limit of {max_scenarios} per request",
        )
    parsed = [
        parse_scenario(card, sc, f"scenarios[{i}]", max_steps=max_steps, strict=strict)
        for i, sc in enumerate(scenarios)
    ]
    n_fields = sum(len(s.field_steps) for s in parsed)
    if n_fields and max_field_values is not None:
        per = 2 * card.system.grid.cells * len(card.system.fields)  # mean and std
        if n_fields * per > max_field_values:
            raise RequestTooLarge(
                "scenarios[].fields",
                f"{n_fields} fields of {per} values each ({n_fields * per} values) exceed this "
                f"server's limit of {max_field_values} values per request "
                f"(at most {max_field_values // per} field times in all); ask for fewer times "
                "or split the request",
            )
    return parsed


# ---- calibrations ------------------------------------------------------------------------------
# the noise std given to an output that is never observed: it weighs no point (none of its points
# enters the fit or the likelihood), so it needs no value from the request and none is estimated
UNOBSERVED_NOISE = 1.0


@dataclass(frozen=True)
class SolverTarget:
    """What a calibration with the physics solver alone (no exported model) is checked against:
    the system's card. Its grid is the request's own; bounds and unspecified initial states
    default to the ranges the system declares (`domain`)."""

    system: SystemCard

    @classmethod
    def of(cls, system: Any) -> SolverTarget:
        """From a `SystemCard`, its JSON (`PhysicsSystem.describe()`) or a `PhysicsSystem`."""
        if isinstance(system, SystemCard):
            return cls(system)
        desc = system if isinstance(system, dict) else system.describe()
        return cls(SystemCard.model_validate(desc))

    @property
    def domain(self) -> DomainBox:
        """The declared ranges of the parameters and initial states (a range of zero width is no
        range: such a value needs its bounds in the request)."""

        def ranges(variables: list[Variable]) -> dict[str, tuple[float, float]]:
            return {
                v.name: (float(v.bounds[0]), float(v.bounds[1]))
                for v in variables
                if v.bounds is not None and v.bounds[0] < v.bounds[1]
            }

        return DomainBox(
            parameters=ranges(self.system.parameters), states=ranges(self.system.states)
        )


@dataclass
class CalibrationRequest:
    """A checked calibration request (see the module doc), as arrays in the model's order."""

    times: np.ndarray  # [T]
    y: np.ndarray  # [T, ny] observations, NaN = missing
    u: np.ndarray  # [T, nu]
    fit: list[str]  # parameter names and "state:<name>" entries
    base_p: np.ndarray  # [np] values of every parameter (fitted ones: placeholders)
    base_x0: np.ndarray  # [nx]
    lower: np.ndarray  # [n_fit]
    upper: np.ndarray  # [n_fit]
    noise: np.ndarray  # [ny], NaN = estimate; outputs never observed: UNOBSERVED_NOISE
    priors: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (mean, std)
    warnings: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)


C = TypeVar("C", bound=CalibrationRequest)


def parse_calibration(
    card: ModelCard | SolverTarget, request: Any, cls: type[C] = CalibrationRequest
) -> C:
    """A calibration request -> a `CalibrationRequest` (or the subclass `cls`), checked against
    the card's names, time grid, training domain and physical limits (a `SolverTarget`: the
    system's names, declared ranges and limits; any sorted grid). Every check on the request
    alone is here, so a bad request fails before the first model or solver call."""
    if not isinstance(request, dict):
        raise RequestError("request", "must be an object with times, outputs, inputs and fit")
    unknown = sorted(set(request) - set(CALIBRATION_FIELDS))
    if unknown:
        raise RequestError(
            "request", f"unknown fields {unknown}; allowed: {sorted(CALIBRATION_FIELDS)}"
        )
    system, box = card.system, card.domain
    trained = isinstance(card, ModelCard)  # else the solver alone: no training domain
    ranges = "the training range" if trained else "the range the system declares"
    params, states = system.parameter_names, system.state_names
    inputs, outputs = system.input_names, system.output_names
    warnings: list[str] = []

    if "times" not in request:
        raise RequestError("times", "required: the observation timestamps")
    t = numbers(request["times"], "times")
    if trained:
        card.time.check_times(t, "times", min_points=3)
        card.time.check_horizon(len(t) - 1, "times")
    else:
        check_sorted_times(t, "times", min_points=3)

    obs = request.get("outputs")
    if not isinstance(obs, dict) or not obs:
        raise RequestError(
            "outputs", f"must name at least one measured output ({', '.join(outputs)})"
        )
    bad = sorted(set(obs) - set(outputs))
    if bad:
        raise RequestError(
            "outputs", f"unknown outputs {bad}; the model's outputs: {', '.join(outputs)}"
        )
    y = np.full((len(t), len(outputs)), np.nan)
    for j, name in enumerate(outputs):
        if name in obs:
            col = numbers(obs[name], f"outputs.{name}", len(t), allow_null=True)
            if np.all(np.isnan(col)):
                raise RequestError(f"outputs.{name}", "every value is missing (all NaN / null)")
            y[:, j] = col

    given_u = request.get("inputs") or {}
    if not isinstance(given_u, dict):
        raise RequestError("inputs", f"must be an object keyed by input name ({', '.join(inputs)})")
    bad = sorted(set(given_u) - set(inputs))
    if bad:
        raise RequestError(
            "inputs", f"unknown inputs {bad}; the model's inputs: {', '.join(inputs) or 'none'}"
        )
    missing = [n for n in inputs if n not in given_u]
    if missing:
        raise RequestError(
            "inputs", f"missing {missing}: every input that drove the system is required"
        )
    u = np.zeros((len(t), len(inputs)))
    for j, var in enumerate(system.inputs):
        u[:, j] = numbers(given_u[var.name], f"inputs.{var.name}", len(t))
        physical(var, float(u[:, j].max()), f"inputs.{var.name}", float(u[:, j].min()))

    fit = request.get("fit")
    if not isinstance(fit, list) or not fit or not all(isinstance(f, str) for f in fit):
        raise RequestError(
            "fit",
            f"must be a non-empty list of names: parameters ({', '.join(params)}) "
            f"or initial states as state:<name> ({', '.join(states)})",
        )
    valid = params + [f"state:{s}" for s in states]
    bad = [f for f in fit if f not in valid]
    if bad:
        raise RequestError("fit", f"unknown names {bad}; valid: {', '.join(valid)}")
    if len(set(fit)) != len(fit):
        raise RequestError("fit", "names must not repeat")

    def declared(name: str) -> Variable:
        if name.startswith("state:"):
            return system.states[states.index(name[6:])]
        return system.parameters[params.index(name)]

    bounds = request.get("bounds") or {}
    if not isinstance(bounds, dict):
        raise RequestError("bounds", "must be an object: name -> [low, high]")
    bad = sorted(set(bounds) - set(fit))
    if bad:
        raise RequestError(
            "bounds", f"bounds for names not fitted: {bad}; fitted: {', '.join(fit)}"
        )
    lower, upper = [], []
    for name in fit:
        lo, hi = box.fitted(name) or (math.nan, math.nan)
        if name in bounds:
            b = numbers(bounds[name], f"bounds.{name}")
            if len(b) != 2 or not b[0] < b[1]:
                raise RequestError(f"bounds.{name}", "must be [low, high] with low < high")
            physical(declared(name), float(b[1]), f"bounds.{name}", float(b[0]))
            if trained and not (np.isnan(lo) or (lo <= b[0] and b[1] <= hi)):
                warnings.append(
                    f"bounds.{name} = [{b[0]:g}, {b[1]:g}] reach outside the training domain "
                    f"[{lo:g}, {hi:g}]: the surrogate extrapolates there"
                )
            lo, hi = float(b[0]), float(b[1])
        if np.isnan(lo):
            why = "the model has no training range" if trained else "the system declares no range"
            raise RequestError(f"bounds.{name}", f"required: {why} for it")
        lower.append(lo)
        upper.append(hi)

    priors = {}
    priors_in = request.get("priors") or {}
    if not isinstance(priors_in, dict):
        raise RequestError("priors", 'must be an object: name -> {"normal": [mean, std]}')
    for name, spec in priors_in.items():
        if name not in fit:
            raise RequestError(
                "priors", f"prior for {name!r}, which is not fitted; fitted: {', '.join(fit)}"
            )
        if not isinstance(spec, dict) or set(spec) != {"normal"}:
            raise RequestError(f"priors.{name}", 'must be {"normal": [mean, std]}')
        pair = numbers(spec["normal"], f"priors.{name}.normal")
        if len(pair) != 2:
            raise RequestError(
                f"priors.{name}.normal", f"must be [mean, std], got {len(pair)} numbers"
            )
        mu, sd = pair
        if not sd > 0:
            raise RequestError(f"priors.{name}.normal", "std must be > 0")
        lo, hi = lower[fit.index(name)], upper[fit.index(name)]
        if not lo <= mu <= hi:
            raise RequestError(
                f"priors.{name}.normal",
                f"mean {mu:g} is outside the bounds [{lo:g}, {hi:g}] of {name}: the prior must "
                f"lie inside them (move its mean, or widen bounds.{name})",
            )
        priors[name] = (float(mu), float(sd))

    def fixed(value: Any, where: str, var: Variable, rng: tuple[float, float] | None) -> float:
        """A value not fitted: refused outside the physical limits, a warning outside the box."""
        v = number(value, where)
        physical(var, v, where)
        lo, hi = rng or (-math.inf, math.inf)
        if trained and not lo <= v <= hi:
            warnings.append(
                f"{where} = {v:g} is outside the training domain [{lo:g}, {hi:g}]: "
                "the surrogate extrapolates there"
            )
        return v

    given_p = request.get("parameters") or {}
    if not isinstance(given_p, dict) or set(given_p) - set(params):
        raise RequestError(
            "parameters", f"must be an object keyed by parameter name ({', '.join(params)})"
        )
    base_p = []
    for var in system.parameters:
        n = var.name
        if n in given_p and n not in fit:
            base_p.append(fixed(given_p[n], f"parameters.{n}", var, box.parameters.get(n)))
        elif n in fit:  # a placeholder: fitted values come from the optimizer's starts
            k = fit.index(n)
            base_p.append((lower[k] + upper[k]) / 2)
        else:
            raise RequestError(
                "parameters", f"missing {n!r}: give the value of every parameter not fitted"
            )
    given_x = request.get("initial_state") or {}
    if not isinstance(given_x, dict) or set(given_x) - set(states):
        raise RequestError(
            "initial_state", f"must be an object keyed by state name ({', '.join(states)})"
        )
    base_x0 = []
    for var in system.states:
        n = var.name
        if n in given_x and f"state:{n}" not in fit:
            base_x0.append(fixed(given_x[n], f"initial_state.{n}", var, box.states.get(n)))
        elif f"state:{n}" in fit:
            k = fit.index(f"state:{n}")
            base_x0.append((lower[k] + upper[k]) / 2)
        else:
            mid = box.state_middle(n)
            base_x0.append(mid)
            warnings.append(f"initial state {n} not given: the middle of {ranges} ({mid:g})")

    noise_in = request.get("noise") or {}
    if not isinstance(noise_in, dict) or set(noise_in) - set(outputs):
        raise RequestError(
            "noise", f"must be an object: output name -> noise std ({', '.join(outputs)})"
        )
    noise = np.full(len(outputs), np.nan)
    for j, n in enumerate(outputs):
        if n in noise_in:
            s = number(noise_in[n], f"noise.{n}")
            if not s > 0:
                raise RequestError(f"noise.{n}", f"must be > 0, got {s}")
            noise[j] = s
    observed = ~np.all(np.isnan(y), axis=0)
    noise[~observed & np.isnan(noise)] = UNOBSERVED_NOISE  # weighs nothing: none is estimated
    # an unknown noise std is estimated from the residuals at the estimate: that needs more
    # observed points than fitted values (checked here, not after a first fit)
    n_observed = int(np.sum(~np.isnan(y)))
    unknown = [outputs[j] for j in np.flatnonzero(np.isnan(noise))]
    if unknown and n_observed <= len(fit):
        raise RequestError(
            f"noise.{unknown[0]}",
            f"cannot be estimated from {n_observed} observed points for {len(fit)} fitted "
            f"values: give the noise std of {', '.join(unknown)} (noise.<output> > 0), or "
            "observe more points",
        )
    return cls(
        times=t, y=y, u=u, fit=list(fit), base_p=np.array(base_p), base_x0=np.array(base_x0),
        lower=np.array(lower), upper=np.array(upper), noise=noise, priors=priors,
        warnings=warnings, outputs=outputs, parameters=params, states=states,
    )  # fmt: skip
