"""Scenario inference on an exported model with onnxruntime: request checks, domain flags, quantiles.

Torch-free and BentoML-free: the service (issue #5) wraps a `Runtime`; tests drive it directly.
A scenario is a plain dict::

    {"parameters": {"length": 1.2, ...},            # every declared parameter, by name
     "initial_state": {"theta": 0.3, ...},          # optional; missing states: the training box's middle
     "t_end": 5.0, "dt": 0.05,                      # or "times": [0, 0.05, ...] (uniform, the model's dt)
     "inputs": {"torque": [0.0, 0.1, ...]},         # every declared input, one value per time point
     "quantiles": [0.05, 0.95]}                     # optional

and its answer holds, per output name, the ensemble mean, the calibrated std and the requested
Gaussian quantiles at every time point, an in-domain flag with reasons (which parameter, initial
state or input left the training box, and by how much), the model's name and version, and
warnings. Bad input raises `RequestError` naming the field and what is allowed.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np


class RequestError(ValueError):
    """A request the model cannot answer; `field` names the offending part."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(field, f"must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise RequestError(field, f"must be finite, got {value!r}")
    return v


def _series(values: Any, field: str, n: int) -> np.ndarray:
    if not isinstance(values, (list, tuple)):
        raise RequestError(field, f"must be a list of {n} numbers (one per time point)")
    if len(values) != n:
        raise RequestError(field, f"has {len(values)} values, but the time grid has {n} points")
    return np.array([_number(v, f"{field}[{i}]") for i, v in enumerate(values)], dtype=np.float64)


def _names(given: Any, declared: list[str], field: str, *, required: bool) -> dict[str, Any]:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise RequestError(
            field, f"must be an object keyed by name ({', '.join(declared) or 'none declared'})"
        )
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise RequestError(
            field, f"unknown names {unknown}; declared: {', '.join(declared) or 'none'}"
        )
    missing = [n for n in declared if n not in given]
    if required and missing:
        raise RequestError(
            field, f"missing {missing}; every one of {', '.join(declared)} is required"
        )
    return given


class Runtime:
    """An exported model (file or its bytes + manifest, already verified by the registry) ready to
    answer. The service passes the verified bytes, so the file on disk is never reopened."""

    def __init__(
        self,
        onnx: str | Path | bytes,
        manifest: dict[str, Any],
        *,
        max_scenarios: int = 256,
        max_steps: int | None = None,
        strict: bool = False,
        threads: int = 1,
    ):
        from twin_ml._ort import session

        self.manifest = manifest
        sysd = manifest["system"]
        self.params = [p["name"] for p in sysd["parameters"]]
        self.states = [s["name"] for s in sysd["states"]]
        self.inputs = [i["name"] for i in sysd["inputs"]]
        self.outputs = [o["name"] for o in sysd["outputs"]]
        self.dt = float(manifest["time"]["dt"])
        self.fixed_steps = bool(manifest["time"].get("fixed_steps"))
        self.max_steps = int(
            min(max_steps or manifest["time"]["max_steps"], manifest["time"]["max_steps"])
        )
        self.max_scenarios, self.strict = max_scenarios, strict
        self.box = {k: (float(v[0]), float(v[1])) for k, v in manifest["domain"]["box"].items()}
        self.session = session(onnx, threads=threads)

    # ---- request -> arrays ---------------------------------------------------------------------
    def _grid(self, sc: dict[str, Any], where: str) -> np.ndarray:
        if "times" in sc and sc["times"] is not None:
            t = _series(
                sc["times"],
                f"{where}.times",
                len(sc["times"]) if isinstance(sc["times"], list) else -1,
            )
            if len(t) < 2:
                raise RequestError(f"{where}.times", "needs at least 2 time points")
            if not np.allclose(np.diff(t), self.dt, rtol=1e-6, atol=1e-9 * max(1.0, abs(self.dt))):
                raise RequestError(
                    f"{where}.times", f"must be uniform with step {self.dt} (the model's dt)"
                )
            return t
        if "t_end" not in sc:
            raise RequestError(where, "give either 't_end' (and optionally 'dt') or 'times'")
        t_end = _number(sc["t_end"], f"{where}.t_end")
        dt = _number(sc.get("dt", self.dt), f"{where}.dt")
        if dt <= 0:
            raise RequestError(f"{where}.dt", f"must be > 0; this model runs at dt = {self.dt}")
        if not math.isclose(dt, self.dt, rel_tol=1e-6):
            raise RequestError(f"{where}.dt", f"must equal the model's dt = {self.dt}, got {dt}")
        if t_end <= 0:
            raise RequestError(f"{where}.t_end", "must be > 0")
        n = int(round(t_end / self.dt))
        if n > self.max_steps:  # before any array of that length exists
            raise RequestError(
                f"{where}.t_end",
                f"{n} steps exceed this model's maximum of {self.max_steps} "
                f"(t_end <= {self.max_steps * self.dt:g})",
            )
        if not math.isclose(n * self.dt, t_end, rel_tol=1e-6, abs_tol=1e-9):
            raise RequestError(
                f"{where}.t_end", f"must be a multiple of dt = {self.dt}, got {t_end}"
            )
        return np.arange(n + 1) * self.dt

    def parse(self, sc: Any, where: str = "scenario") -> dict[str, Any]:
        """One scenario -> arrays (x0 [nx], u [T, nu], p [np], t [T]), quantiles and domain report."""
        if not isinstance(sc, dict):
            raise RequestError(where, "must be an object with parameters, a time grid and inputs")
        unknown = sorted(
            set(sc) - {"parameters", "initial_state", "t_end", "dt", "times", "inputs", "quantiles"}
        )
        if unknown:
            raise RequestError(where, f"unknown fields {unknown}")
        t = self._grid(sc, where)
        steps = len(t) - 1
        if steps > self.max_steps:
            raise RequestError(
                f"{where}.t_end",
                f"{steps} steps exceed this model's maximum of {self.max_steps} "
                f"(t_end <= {self.max_steps * self.dt:g})",
            )
        if self.fixed_steps and steps != self.max_steps:
            raise RequestError(
                f"{where}.t_end",
                f"this emulator answers on its training grid only: "
                f"t_end = {self.max_steps * self.dt:g}",
            )
        given_p = _names(sc.get("parameters"), self.params, f"{where}.parameters", required=True)
        p = np.array([_number(given_p[n], f"{where}.parameters.{n}") for n in self.params])
        given_x = _names(
            sc.get("initial_state"), self.states, f"{where}.initial_state", required=False
        )
        x0 = np.array(
            [
                _number(given_x[n], f"{where}.initial_state.{n}")
                if n in given_x
                else float(np.mean(self.box.get(f"state:{n}", (0.0, 0.0))))
                for n in self.states
            ]
        )
        given_u = _names(sc.get("inputs"), self.inputs, f"{where}.inputs", required=True)
        u = (
            np.stack(
                [_series(given_u[n], f"{where}.inputs.{n}", len(t)) for n in self.inputs], axis=-1
            )
            if self.inputs
            else np.zeros((len(t), 0))
        )
        qs = sc.get("quantiles") or []
        if not isinstance(qs, list) or len(qs) > 32:
            raise RequestError(
                f"{where}.quantiles", "must be a list of at most 32 levels in (0, 1)"
            )
        qs = [_number(q, f"{where}.quantiles[{i}]") for i, q in enumerate(qs)]
        for i, q in enumerate(qs):
            if not 0 < q < 1:
                raise RequestError(f"{where}.quantiles[{i}]", f"must be in (0, 1), got {q}")
        if len({f"{q:g}" for q in qs}) != len(qs):
            raise RequestError(
                f"{where}.quantiles",
                f"levels must differ (as the answer names them, {{q:g}}): {qs}",
            )
        reasons = self.domain_reasons(p, x0, u)
        if reasons and self.strict:
            raise RequestError(
                where, "outside the training domain (strict mode): " + "; ".join(reasons)
            )
        return {
            "t": t,
            "x0": x0,
            "u": u,
            "p": p,
            "quantiles": qs,
            "reasons": reasons,
            "defaulted_states": [n for n in self.states if n not in given_x],
        }

    def domain_reasons(self, p: np.ndarray, x0: np.ndarray, u: np.ndarray) -> list[str]:
        """Why a scenario is outside the training box (empty: inside)."""
        out = []

        def check(key: str, label: str, lo_v: float, hi_v: float):
            if key not in self.box:
                return
            lo, hi = self.box[key]
            width = max(hi - lo, 1e-12)
            if lo_v < lo:
                out.append(
                    f"{label} = {lo_v:g} is below the training range [{lo:g}, {hi:g}] by {lo - lo_v:g} "
                    f"({100 * (lo - lo_v) / width:.0f}% of its width)"
                )
            if hi_v > hi:
                out.append(
                    f"{label} = {hi_v:g} is above the training range [{lo:g}, {hi:g}] by {hi_v - hi:g} "
                    f"({100 * (hi_v - hi) / width:.0f}% of its width)"
                )

        for n, v in zip(self.params, p):
            check(f"parameter:{n}", f"parameter {n}", v, v)
        for n, v in zip(self.states, x0):
            check(f"state:{n}", f"initial state {n}", v, v)
        for j, n in enumerate(self.inputs):
            check(f"input:{n}:offset", f"input {n}", float(u[:, j].min()), float(u[:, j].max()))
        return out

    # ---- run -----------------------------------------------------------------------------------
    def parse_request(self, scenarios: Any) -> list[dict[str, Any]]:
        """One scenario (a dict) or a list of them -> parsed scenarios; every check of `parse`,
        plus the per-request count limit."""
        if isinstance(scenarios, dict):
            scenarios = [scenarios]
        if not isinstance(scenarios, list) or not scenarios:
            raise RequestError("scenarios", "must be a scenario object or a non-empty list of them")
        if len(scenarios) > self.max_scenarios:
            raise RequestError(
                "scenarios",
                f"{len(scenarios)} scenarios exceed the limit of {self.max_scenarios} per request",
            )
        return [self.parse(sc, f"scenarios[{i}]") for i, sc in enumerate(scenarios)]

    def simulate(self, scenarios: Any) -> list[dict[str, Any]]:
        """Answers for one scenario (a dict) or a list of them, in order."""
        return self.run(self.parse_request(scenarios))

    def run(self, parsed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers for parsed scenarios, in order, in as few onnxruntime calls as `plan` allows."""
        answers: list[dict[str, Any] | None] = [None] * len(parsed)
        for idx in plan([len(s["t"]) for s in parsed]):
            n = len(parsed[idx[0]]["t"])  # the group's longest grid; shorter ones are padded
            feeds = {
                "x0": np.stack([parsed[i]["x0"] for i in idx]).astype(np.float32),
                "u": np.stack([_pad(parsed[i]["u"], n) for i in idx]).astype(np.float32),
                "p": np.stack([parsed[i]["p"] for i in idx]).astype(np.float32),
            }
            mean, std = self.session.run(["mean", "std"], feeds)
            for k, i in enumerate(idx):
                m = len(parsed[i]["t"])  # the mask: a scenario's own steps only
                answers[i] = self._answer(
                    parsed[i], mean[k, :m].astype(np.float64), std[k, :m].astype(np.float64)
                )
        return answers  # type: ignore[return-value]

    def _answer(self, s: dict[str, Any], mean: np.ndarray, std: np.ndarray) -> dict[str, Any]:
        warnings = []
        if s["defaulted_states"]:
            warnings.append(
                f"initial state {', '.join(s['defaulted_states'])} not given: the middle of the "
                "training range was used"
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            warnings.append(
                "the model produced non-finite values (far outside its training domain?)"
            )
        outputs = {}
        for j, name in enumerate(self.outputs):
            q = {
                f"{lv:g}": _list(mean[:, j] + NormalDist().inv_cdf(lv) * std[:, j])
                for lv in s["quantiles"]
            }
            outputs[name] = {"mean": _list(mean[:, j]), "std": _list(std[:, j]), "quantiles": q}
        return {
            "times": s["t"].tolist(),
            "outputs": outputs,
            "in_domain": not s["reasons"],
            "domain_reasons": s["reasons"],
            "model": {"name": self.manifest["name"], "version": self.manifest["version"]},
            "warnings": warnings,
        }


PAD_RATIO = (
    1.5  # a scenario joins a padded group when the group's longest grid is at most this much longer
)


def plan(lengths: list[int]) -> list[list[int]]:
    """Groups of scenario indices run as one batch each, longest first in every group. Scenarios
    of different horizons share a batch (padded to its longest, masked back) while the padding
    costs at most PAD_RATIO x their own steps; the rollout is causal, so a scenario's answer does
    not depend on the padding after its end."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] <= PAD_RATIO * lengths[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _list(a: np.ndarray) -> list[float | None]:
    """JSON has no NaN or inf: None in their place (the answer's warnings say why)."""
    return (
        a.tolist() if np.isfinite(a).all() else [float(v) if math.isfinite(v) else None for v in a]
    )


def _pad(u: np.ndarray, n: int) -> np.ndarray:
    """Inputs [T, nu] -> [n, nu], holding the last value after the end."""
    return u if len(u) == n else np.concatenate([u, np.repeat(u[-1:], n - len(u), axis=0)])
