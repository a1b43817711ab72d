"""A calibration problem: observations, the inputs that drove the system, what to fit, within
which bounds, and the noise model. Checked on construction; every error names its field.

    {"times": [0, 4, 8, ...],                       # sorted, unique, the model's uniform grid
     "outputs": {"h2": [3.1, null, 3.4, ...]},      # measured outputs by name; null / NaN = missing
     "inputs": {"pump": [3.0, 3.0, ...]},           # every input, on the same timestamps
     "fit": ["k1", "k2"],                           # parameters (and "state:<name>" initial states)
     "parameters": {"k1": 0.1, ...},                # values of the parameters not fitted
     "initial_state": {"h1": 4.0, "h2": 3.0},       # values of the initial states not fitted
     "bounds": {"k1": [0.05, 0.2]},                 # default: the model's training domain
     "priors": {"k2": {"normal": [0.1, 0.02]}},     # optional, on top of the bounds (uniform)
     "noise": {"h2": 0.02}}                         # per-output noise std; missing: estimated

Torch-free (the server's /calibrate uses it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class CalibrationError(ValueError):
    """A calibration request that cannot be run; `field` names the offending part."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _array(values: Any, where: str, n: int | None = None, allow_nan: bool = False) -> np.ndarray:
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise CalibrationError(where, "must be a list of numbers")
    out = []
    for i, v in enumerate(values):
        if v is None and allow_nan:
            out.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise CalibrationError(
                f"{where}[{i}]",
                f"must be a number{' or null' if allow_nan else ''}, got {type(v).__name__}",
            )
        try:
            v = float(v)
        except OverflowError:
            raise CalibrationError(f"{where}[{i}]", "is too large for a float") from None
        if math.isinf(v) or (math.isnan(v) and not allow_nan):
            raise CalibrationError(f"{where}[{i}]", f"must be finite, got {v}")
        out.append(v)
    a = np.asarray(out, dtype=np.float64)
    if n is not None and len(a) != n:
        raise CalibrationError(where, f"has {len(a)} values, but there are {n} timestamps")
    return a


@dataclass
class Problem:
    """A checked calibration problem (see the module docstring); build it with `Problem.build`."""

    times: np.ndarray  # [T]
    y: np.ndarray  # [T, ny] observations, NaN = missing
    u: np.ndarray  # [T, nu]
    fit: list[str]  # parameter names and "state:<name>" entries
    base_p: np.ndarray  # [np] values of every parameter (fitted ones: placeholders)
    base_x0: np.ndarray  # [nx]
    lower: np.ndarray  # [n_fit]
    upper: np.ndarray  # [n_fit]
    noise: np.ndarray  # [ny], NaN = estimate
    priors: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (mean, std)
    warnings: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)

    @property
    def n_fit(self) -> int:
        return len(self.fit)

    @classmethod
    def build(cls, request: dict[str, Any], manifest: dict[str, Any]) -> Problem:
        """Check `request` against the model's manifest (names, dt, training domain)."""
        if not isinstance(request, dict):
            raise CalibrationError(
                "request", "must be an object with times, outputs, inputs and fit"
            )
        known = {
            "times",
            "outputs",
            "inputs",
            "fit",
            "parameters",
            "initial_state",
            "bounds",
            "priors",
            "noise",
        }
        unknown = sorted(set(request) - known)
        if unknown:
            raise CalibrationError("request", f"unknown fields {unknown}; allowed: {sorted(known)}")
        sysd = manifest["system"]
        params = [p["name"] for p in sysd["parameters"]]
        states = [s["name"] for s in sysd["states"]]
        inputs = [i["name"] for i in sysd["inputs"]]
        outputs = [o["name"] for o in sysd["outputs"]]
        box = {k: (float(v[0]), float(v[1])) for k, v in manifest["domain"]["box"].items()}
        dt = float(manifest["time"]["dt"])
        warnings: list[str] = []

        if "times" not in request:
            raise CalibrationError("times", "required: the observation timestamps")
        t = _array(request["times"], "times")
        if len(t) < 3:
            raise CalibrationError("times", f"needs at least 3 timestamps, got {len(t)}")
        d = np.diff(t)
        if np.any(d == 0):
            i = int(np.flatnonzero(d == 0)[0])
            raise CalibrationError(
                "times", f"duplicated timestamp {t[i]:g} at positions {i} and {i + 1}"
            )
        if np.any(d < 0):
            i = int(np.flatnonzero(d < 0)[0])
            raise CalibrationError(
                "times", f"not sorted: {t[i]:g} then {t[i + 1]:g} at position {i + 1}"
            )
        if not np.allclose(d, dt, rtol=1e-6, atol=1e-9 * max(1.0, dt)):
            raise CalibrationError(
                "times", f"must be uniform with the model's step dt = {dt:g} (resample first)"
            )
        steps = len(t) - 1
        max_steps = int(manifest["time"]["max_steps"])
        if steps > max_steps:
            raise CalibrationError(
                "times", f"{steps} steps exceed the model's maximum of {max_steps}"
            )
        if manifest["time"].get("fixed_steps") and steps != max_steps:
            raise CalibrationError(
                "times",
                f"this emulator runs on its training grid only: {max_steps + 1} "
                f"timestamps {dt:g} apart",
            )

        obs = request.get("outputs")
        if not isinstance(obs, dict) or not obs:
            raise CalibrationError(
                "outputs", f"must name at least one measured output ({', '.join(outputs)})"
            )
        bad = sorted(set(obs) - set(outputs))
        if bad:
            raise CalibrationError(
                "outputs", f"unknown outputs {bad}; the model's outputs: {', '.join(outputs)}"
            )
        y = np.full((len(t), len(outputs)), np.nan)
        for j, name in enumerate(outputs):
            if name in obs:
                col = _array(obs[name], f"outputs.{name}", len(t), allow_nan=True)
                if np.all(np.isnan(col)):
                    raise CalibrationError(
                        f"outputs.{name}", "every value is missing (all NaN / null)"
                    )
                y[:, j] = col

        given_u = request.get("inputs") or {}
        if not isinstance(given_u, dict):
            raise CalibrationError(
                "inputs", f"must be an object keyed by input name ({', '.join(inputs)})"
            )
        bad = sorted(set(given_u) - set(inputs))
        if bad:
            raise CalibrationError(
                "inputs", f"unknown inputs {bad}; the model's inputs: {', '.join(inputs) or 'none'}"
            )
        missing = [n for n in inputs if n not in given_u]
        if missing:
            raise CalibrationError(
                "inputs", f"missing {missing}: every input that drove the system is required"
            )
        u = (
            np.stack([_array(given_u[n], f"inputs.{n}", len(t)) for n in inputs], axis=-1)
            if inputs
            else np.zeros((len(t), 0))
        )

        fit = request.get("fit")
        if not isinstance(fit, list) or not fit or not all(isinstance(f, str) for f in fit):
            raise CalibrationError(
                "fit",
                f"must be a non-empty list of names: parameters ({', '.join(params)}) "
                f"or initial states as state:<name> ({', '.join(states)})",
            )
        valid = params + [f"state:{s}" for s in states]
        bad = [f for f in fit if f not in valid]
        if bad:
            raise CalibrationError("fit", f"unknown names {bad}; valid: {', '.join(valid)}")
        if len(set(fit)) != len(fit):
            raise CalibrationError("fit", "names must not repeat")

        def domain(name: str) -> tuple[float, float]:
            key = name if name.startswith("state:") else f"parameter:{name}"
            return box.get(key, (math.nan, math.nan))

        bounds = request.get("bounds") or {}
        if not isinstance(bounds, dict):
            raise CalibrationError("bounds", "must be an object: name -> [low, high]")
        bad = sorted(set(bounds) - set(fit))
        if bad:
            raise CalibrationError(
                "bounds", f"bounds for names not fitted: {bad}; fitted: {', '.join(fit)}"
            )
        lower, upper = [], []
        for name in fit:
            lo, hi = domain(name)
            if name in bounds:
                b = _array(bounds[name], f"bounds.{name}")
                if len(b) != 2 or not b[0] < b[1]:
                    raise CalibrationError(f"bounds.{name}", "must be [low, high] with low < high")
                if not (np.isnan(lo) or (lo <= b[0] and b[1] <= hi)):
                    warnings.append(
                        f"bounds.{name} = [{b[0]:g}, {b[1]:g}] reach outside the training domain "
                        f"[{lo:g}, {hi:g}]: the surrogate extrapolates there"
                    )
                lo, hi = float(b[0]), float(b[1])
            if np.isnan(lo):
                raise CalibrationError(
                    f"bounds.{name}", "required: the model has no training range for it"
                )
            lower.append(lo)
            upper.append(hi)

        priors = {}
        priors_in = request.get("priors") or {}
        if not isinstance(priors_in, dict):
            raise CalibrationError("priors", 'must be an object: name -> {"normal": [mean, std]}')
        for name, spec in priors_in.items():
            if name not in fit:
                raise CalibrationError(
                    "priors", f"prior for {name!r}, which is not fitted; fitted: {', '.join(fit)}"
                )
            if not isinstance(spec, dict) or set(spec) != {"normal"}:
                raise CalibrationError(f"priors.{name}", 'must be {"normal": [mean, std]}')
            pair = _array(spec["normal"], f"priors.{name}.normal")
            if len(pair) != 2:
                raise CalibrationError(
                    f"priors.{name}.normal", f"must be [mean, std], got {len(pair)} numbers"
                )
            mu, sd = pair
            if not sd > 0:
                raise CalibrationError(f"priors.{name}.normal", "std must be > 0")
            priors[name] = (float(mu), float(sd))

        def fixed(value: Any, field: str, key: str) -> float:
            """A value not fitted, with a warning when it lies outside the training domain."""
            v = _array([value], field)[0]
            lo, hi = box.get(key, (-math.inf, math.inf))
            if not lo <= v <= hi:
                warnings.append(
                    f"{field} = {v:g} is outside the training domain [{lo:g}, {hi:g}]: "
                    "the surrogate extrapolates there"
                )
            return v

        given_p = request.get("parameters") or {}
        if not isinstance(given_p, dict) or set(given_p) - set(params):
            raise CalibrationError(
                "parameters", f"must be an object keyed by parameter name ({', '.join(params)})"
            )
        base_p = []
        for n in params:
            if n in given_p and n not in fit:
                base_p.append(fixed(given_p[n], f"parameters.{n}", f"parameter:{n}"))
            elif n in fit:  # a placeholder: fitted values come from the optimizer's starts
                lo, hi = lower[fit.index(n)], upper[fit.index(n)]
                base_p.append((lo + hi) / 2)
            else:
                raise CalibrationError(
                    "parameters", f"missing {n!r}: give the value of every parameter not fitted"
                )
        given_x = request.get("initial_state") or {}
        if not isinstance(given_x, dict) or set(given_x) - set(states):
            raise CalibrationError(
                "initial_state", f"must be an object keyed by state name ({', '.join(states)})"
            )
        base_x0 = []
        for n in states:
            if n in given_x and f"state:{n}" not in fit:
                base_x0.append(fixed(given_x[n], f"initial_state.{n}", f"state:{n}"))
            elif f"state:{n}" in fit:
                k = fit.index(f"state:{n}")
                base_x0.append((lower[k] + upper[k]) / 2)
            else:
                lo, hi = box.get(f"state:{n}", (0.0, 0.0))
                base_x0.append((lo + hi) / 2)
                warnings.append(
                    f"initial state {n} not given: the middle of the training range ({(lo + hi) / 2:g})"
                )

        noise_in = request.get("noise") or {}
        if not isinstance(noise_in, dict) or set(noise_in) - set(outputs):
            raise CalibrationError(
                "noise", f"must be an object: output name -> noise std ({', '.join(outputs)})"
            )
        noise = np.full(len(outputs), np.nan)
        for j, n in enumerate(outputs):
            if n in noise_in:
                s = _array([noise_in[n]], f"noise.{n}")[0]
                if not s > 0:
                    raise CalibrationError(f"noise.{n}", f"must be > 0, got {s}")
                noise[j] = s
        return cls(
            times=t,
            y=y,
            u=u,
            fit=list(fit),
            base_p=np.array(base_p),
            base_x0=np.array(base_x0),
            lower=np.array(lower),
            upper=np.array(upper),
            noise=noise,
            priors=priors,
            warnings=warnings,
            outputs=outputs,
            parameters=params,
            states=states,
        )

    # ---- theta (physical units, [K, n_fit]) <-> model arguments --------------------------------
    def arguments(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p [K, np], x0 [K, nx]) for candidate values theta [K, n_fit]."""
        theta = np.atleast_2d(theta)
        p = np.repeat(self.base_p[None], len(theta), axis=0)
        x0 = np.repeat(self.base_x0[None], len(theta), axis=0)
        for k, name in enumerate(self.fit):
            if name.startswith("state:"):
                x0[:, self.states.index(name[6:])] = theta[:, k]
            else:
                p[:, self.parameters.index(name)] = theta[:, k]
        return p, x0

    def to_unit(self, theta: np.ndarray) -> np.ndarray:
        return (theta - self.lower) / (self.upper - self.lower)

    def from_unit(self, z: np.ndarray) -> np.ndarray:
        return self.lower + z * (self.upper - self.lower)
