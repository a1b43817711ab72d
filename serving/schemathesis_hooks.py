"""Schemathesis hooks for the service's /docs.json. `schemathesis.toml` at the checkout's root
names this module, so `schemathesis run http://127.0.0.1:P/docs.json --checks all`, run anywhere
in the checkout, loads it (tests/test_openapi_contract.py runs exactly that); elsewhere,
`SCHEMATHESIS_HOOKS=serving.schemathesis_hooks` does the same (a dev install: it needs
schemathesis).

JSON Schema (OpenAPI 3.0) cannot state every rule of POST /simulate and POST /calibrate: most tie
one field to another, a few constrain one position of a pair (a prior's std > 0) or one
entry against another (low < high, quantile levels distinct as the answer names them). The
document states them in its descriptions, and the
server answers a request that breaks one with a 400 that names it. A request generated from the
schema alone breaks them at random, so `positive_data_acceptance` could not hold. These hooks
take each *positive* generated request (negative ones are left as they are: they must get a 400)
and make it keep those documented rules with the smallest change that does: a series resized to
its grid (cut, or its last value repeated), a grid made uniform at dt from its first value, a
parameter with no value fitted, an entry for a name that is not fitted dropped, a noise std
given (1, the server's own advice) where too few points are observed to estimate it, a quantile
level named as an earlier one left out. Every
other value stays as generated, so the check still fails for a request that the schema and
these rules allow and the server refuses. Every repaired request is checked against the schema
(a repair that broke it would stop the run). The rules the schema can state are left to it, not
repaired here: /calibrate's two forms of observations, one at a time (its anyOf), and a series
with a value that is not null (`not: {items: {type: null}}`: OpenAPI 3.0 has no `contains`).

Requests that only invented data could repair are filtered out instead (`filter_case`): a
series whose values that are not null all lie past the grid's end, so that cutting it leaves
none, and a fitted name with neither a
training range (the `default` of its bounds in the schema) nor bounds. With the served pendulum
neither happens in the seeded run.

/calibrate also runs a fit per accepted request: its cost settings are held low (one start, no
correction rounds, no refinement, an MCMC of 20 steps, the fewest the schema allows, all kept,
and at most 8 walkers), which the schema allows and which changes nothing the server checks, so
the run stays short.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema_rs
import schemathesis

TOLERANCE = 1e-7  # |step - dt| / dt: stricter than the server's check (1e-6)
MAX_MCMC_STEPS, MAX_MCMC_WALKERS, MIN_MCMC_KEPT = 20, 8, 20  # steps: the schema's minimum


def _positive_body(case) -> bool:
    meta = case.meta
    return (
        meta is not None
        and meta.generation.mode.is_positive
        and case.operation.path in ("/simulate", "/calibrate")
        and isinstance(case.body, dict)
    )


def _body_schema(case) -> dict[str, Any]:
    op = case.operation.schema.raw_schema["paths"][case.operation.path]["post"]
    return op["requestBody"]["content"]["application/json"]["schema"]


def _dt(case) -> float:
    """The model's dt, as the document declares it: the one value /simulate's `dt` may take."""
    scenario = case.operation.schema.raw_schema["components"]["schemas"]["Scenario"]
    return float(scenario["properties"]["dt"]["anyOf"][0]["enum"][0])


def _resized(values: list, n: int) -> list:
    """`values` with n entries: cut, or its last value repeated (each value stays one the schema
    allows)."""
    return list(values[:n]) + [values[-1]] * (n - len(values))


def _uniform(times: list[float], dt: float) -> list[float]:
    """Rule: `times` are sorted and uniform with the model's dt. The same number of points from
    the generated first one; from 0 where float64 cannot space points dt apart at that start
    (float64's own spacing there coarser than the tolerance on dt, past about 1e8 dt: no uniform
    grid exists there, whatever the request)."""
    n = len(times)
    for start in (float(times[0]), 0.0):
        grid = [start + k * dt for k in range(n)]
        if all(abs((b - a) - dt) <= TOLERANCE * dt for a, b in zip(grid, grid[1:])):
            return grid
    raise AssertionError("unreachable: a grid from 0 is uniform")


# ---- POST /simulate ----------------------------------------------------------------------------
def _simulate(body: dict[str, Any], dt: float) -> dict[str, Any]:
    scenarios = body["scenarios"]
    for sc in scenarios if isinstance(scenarios, list) else [scenarios]:
        # Rule: the grid is `times` when given (it wins over t_end), else t_end / dt + 1 points;
        # `times` are uniform with the model's dt
        if sc.get("times") is not None:
            sc["times"] = _uniform(sc["times"], dt)
            n = len(sc["times"])
        else:
            n = round(sc["t_end"] / dt) + 1
        # Rule: every input has one value per point of the grid
        for name, values in sc["inputs"].items():
            sc["inputs"][name] = _resized(values, n)
        # Rule: quantile levels are distinct as the answer names them (f"{q:g}"), which
        # uniqueItems cannot say: a level named as an earlier one is left out
        if sc.get("quantiles"):
            names = {f"{q:g}": q for q in reversed(sc["quantiles"])}
            sc["quantiles"] = [q for q in sc["quantiles"] if names[f"{q:g}"] == q]
    return body


# ---- POST /calibrate ---------------------------------------------------------------------------
def _calibrate(body: dict[str, Any], schema: dict[str, Any], dt: float) -> dict[str, Any] | None:
    """The repaired body, or None where it cannot be repaired without inventing data."""
    props = schema["properties"]
    # observations: times, outputs and inputs, or `telemetry` (the schema's anyOf: one form)
    if "telemetry" in body:
        tel = body["telemetry"]
        tel["times"] = _uniform(tel["times"], dt)  # rule: uniform with the model's dt
        n = len(tel["times"])
        declared_in = set(props["inputs"]["properties"])
        declared_out = set(props["outputs"]["properties"])
        signals = tel["signals"]
        for name in list(signals):
            if name in declared_in | declared_out:  # rule: one value per time (others: ignored)
                signals[name] = _resized(signals[name], n)
        if any(all(v is None for v in signals[name]) for name in declared_in):
            return None  # cutting left an input no valid sample (it needs one): filtered
        measured = [o for o in declared_out if o in signals and _observed(signals[o])]
        if tel.get("outputs") is not None:
            # Rule: the selected outputs are among the signals, each with a valid sample
            kept = [o for o in tel["outputs"] if o in measured]
            tel["outputs"] = kept or None
        chosen = tel.get("outputs") or measured
        if not chosen:
            return None  # cutting left no output a valid sample: nothing to fit, filtered
        series = {o: signals[o] for o in chosen}
    else:
        body["times"] = _uniform(body["times"], dt)  # rule: uniform with the model's dt
        n = len(body["times"])
        # Rule: every series of outputs and inputs has one value per timestamp
        for group in ("outputs", "inputs"):
            for name, values in body[group].items():
                body[group][name] = _resized(values, n)
        series = body["outputs"]
        if not all(_observed(v) for v in series.values()):
            return None  # cutting left an output no value that is not null: filtered

    fit = body["fit"]
    # Rule: every parameter not fitted has its value in `parameters`; one without a value can
    # only be fitted
    for name in props["parameters"]["properties"]:
        if name not in fit and name not in body.get("parameters", {}):
            fit.append(name)
    # Rule: bounds and priors name fitted names only
    for group in ("bounds", "priors"):
        if group in body:
            body[group] = {k: v for k, v in body[group].items() if k in fit}
    # Rule: bounds are [low, high] with low < high (equal ones: no interval, left out: the
    # training range applies)
    bounds = body.get("bounds", {})
    for name, (lo, hi) in list(bounds.items()):
        if lo == hi:
            del bounds[name]
        else:
            bounds[name] = [min(lo, hi), max(lo, hi)]
    defaults = {k: v.get("default") for k, v in props["bounds"]["properties"].items()}
    if any(name not in bounds and defaults.get(name) is None for name in fit):
        return None  # rule: bounds are required where there is no training range
    # Rule: a prior's std is > 0, its mean inside the name's bounds (the request's, else the
    # training range: the `default` of its bounds)
    priors = body.get("priors", {})
    for name, prior in list(priors.items()):
        mean, std = prior["normal"]
        if std == 0:
            del priors[name]
            continue
        lo, hi = bounds.get(name) or defaults[name]
        prior["normal"] = [min(max(mean, lo), hi), abs(std)]
    # Rule: a noise std missing is estimated, which needs more observed points than fitted
    # values; with too few, the noise std is given (the server's own advice), 1 for each
    n_observed = sum(v is not None for values in series.values() for v in values)
    noise = body.setdefault("noise", {})
    if n_observed <= len(fit):
        for name in series:
            noise.setdefault(name, 1.0)

    # Cost, not a rule: one start, no correction rounds, no refinement, a short MCMC
    body["starts"], body["corrections"], body["refine"] = 1, 0, 0
    mcmc = body.get("mcmc")
    if mcmc is not None:
        steps = min(mcmc.get("steps", MAX_MCMC_STEPS), MAX_MCMC_STEPS)
        walkers = min(mcmc.get("walkers", MAX_MCMC_WALKERS), MAX_MCMC_WALKERS)
        mcmc["steps"], mcmc["walkers"] = steps, walkers
        # Rule: the burn-in leaves at least 20 steps (steps - burn >= 20)
        mcmc["burn"] = min(mcmc.get("burn", steps), steps - MIN_MCMC_KEPT)
    return body


def _observed(values: list) -> bool:
    return any(v is not None for v in values)


_VALIDATORS: dict[str, jsonschema_rs.Draft4Validator] = {}


def _validator(case) -> jsonschema_rs.Draft4Validator:
    """The operation's body schema (OpenAPI 3.0: JSON Schema draft 4), its $refs resolved in the
    document's components."""
    path = case.operation.path
    if path not in _VALIDATORS:
        components = case.operation.schema.raw_schema["components"]
        _VALIDATORS[path] = jsonschema_rs.Draft4Validator(
            {**_body_schema(case), "components": components}
        )
    return _VALIDATORS[path]


def _repaired(case) -> dict[str, Any] | None:
    body = copy.deepcopy(case.body)
    if case.operation.path == "/simulate":
        body = _simulate(body, _dt(case))
    else:
        body = _calibrate(body, _body_schema(case), _dt(case))
    if body is not None:  # a repair keeps the request valid under the schema, or the run stops
        errors = [e.message for e in _validator(case).iter_errors(body)]
        assert not errors, f"the repaired body breaks the schema: {errors[:3]}"
    return body


@schemathesis.hook
def filter_case(context, case):
    """Drop the positive requests the rules make unrepairable (see the module doc)."""
    return not _positive_body(case) or _repaired(case) is not None


@schemathesis.hook
def map_case(context, case):
    """Make a positive request keep the documented cross-field rules (see the module doc)."""
    if _positive_body(case):
        case.body = _repaired(case)
    return case
