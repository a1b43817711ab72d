"""A calibration problem: observations, the inputs that drove the system, what to fit, within
which bounds, and the noise model. The request is checked by the model's contract
(`twin_ml.contract.parse_calibration`, which documents the request's fields), or, for the
physics solver alone, against the system (`SolverTarget`); every error is a `RequestError`
naming its field, raised before any model or solver call.

Observations also come from twin-ingest's output (`read_ingested`: telemetry aligned onto a grid,
with each sample's validity) through `observations_from_telemetry`, the one conversion that
twin-calibrate and POST /calibrate share. Torch-free (the server's /calibrate uses it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twin_ml.contract import CalibrationRequest, ModelCard, RequestError, parse_calibration
from twin_ml.contract.requests import SolverTarget, numbers

# a calibration request the model cannot run: the contract's one request error
CalibrationError = RequestError


class Problem(CalibrationRequest):
    """A checked calibration problem; build it with `Problem.build`."""

    @property
    def n_fit(self) -> int:
        return len(self.fit)

    @classmethod
    def build(
        cls,
        request: Any,
        card: ModelCard | SolverTarget | dict[str, Any],
        notes: Sequence[str] = (),
    ) -> Problem:
        """Check `request` against the model's card (names, dt, training domain, limits), or
        against a `SolverTarget` (the system alone). `notes` (e.g. `observations_from_telemetry`'s)
        lead the problem's warnings."""
        target = card if isinstance(card, SolverTarget) else ModelCard.of(card)
        problem = parse_calibration(target, request, cls)
        problem.warnings[:0] = list(notes)
        return problem

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


# ---- observations from telemetry ---------------------------------------------------------------
@dataclass(frozen=True)
class Ingested:
    """twin-ingest's output read back: signals on the contract's grid, invalid samples NaN."""

    path: Path
    times: np.ndarray  # [T] seconds from the grid's start
    signals: dict[str, np.ndarray]  # name -> [T] values in `units`, NaN where invalid
    units: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # the contract's role of each signal
    system: str | None = None  # the system the contract is for


def read_ingested(path: str | Path, where: str = "observations") -> Ingested:
    """twin-ingest's output: its directory (which holds telemetry.parquet) or that file. The file
    is wide: `timestamp`, a column "<signal> [<unit>]" per signal and a boolean validity column
    per signal ("<signal>.valid", or "<signal>.mask" in files written before that name; True =
    valid either way); the contract (signals, roles, units) is in its metadata. Errors are
    `RequestError`s naming `where`."""
    import pandas as pd

    from twin_ml.data.telemetry import read_metadata

    path = Path(path)
    if path.is_dir():
        if not (path / "telemetry.parquet").is_file():
            raise RequestError(
                where, f"{path} holds no telemetry.parquet: give twin-ingest's output directory"
            )
        path = path / "telemetry.parquet"
    try:
        meta = read_metadata(path)
        frame = pd.read_parquet(path)
    except Exception as e:  # not Parquet, unreadable: one line that names the file
        raise RequestError(
            where, f"cannot read {path} as Parquet ({type(e).__name__}: {e})"
        ) from None
    contract = meta.get("contract") if isinstance(meta, dict) else None
    if not meta.get("aligned") or not isinstance(contract, dict):
        raise RequestError(
            where,
            f"{path} is not twin-ingest's output (no aligned-telemetry metadata): run "
            "twin-ingest source=<file> contract=<contract> first, and give its out_dir",
        )
    if "timestamp" not in frame.columns or len(frame) == 0:
        raise RequestError(where, f"{path}: no timestamp column or no rows")
    stamps = pd.to_datetime(frame["timestamp"], utc=True)
    times = ((stamps - stamps.iloc[0]).dt.total_seconds()).to_numpy(dtype=np.float64)
    signals, units, roles = {}, {}, {}
    for spec in contract.get("signals") or []:
        name, unit = spec["name"], spec.get("unit") or ""
        column = next(
            (c for c in (f"{name} [{unit}]", name) if c in frame.columns),
            next((c for c in frame.columns if str(c).startswith(f"{name} [")), None),
        )
        if column is None:
            raise RequestError(where, f"{path}: no column for signal {name!r}")
        values = frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
        validity = next((f"{name}{s}" for s in (".valid", ".mask") if f"{name}{s}" in frame), None)
        ok = np.isfinite(values)
        if validity is not None:
            ok &= frame[validity].to_numpy(dtype=bool)
        signals[name] = np.where(ok, values, np.nan)
        units[name], roles[name] = unit, str(spec.get("role", ""))
    return Ingested(path, times, signals, units, roles, contract.get("system"))


def observations_from_telemetry(
    system: Any,
    times: Any,
    signals: Any,
    *,
    outputs: Sequence[str] | None = None,
    units: Mapping[str, str] | None = None,
    roles: Mapping[str, str] | None = None,
    where: str = "telemetry",
    outputs_field: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The observations of a calibration request ({"times", "outputs", "inputs"}) from telemetry
    on a grid, and notes on what was left out or filled (they become the problem's warnings).

    `system`: the system's card (a `SystemCard` or a `PhysicsSystem`: its input and output
    names and units). `signals`: name -> values on `times`, NaN or None where a sample is
    invalid. Signals are matched to the system's inputs and outputs by name; any other signal
    (an extra sensor, a role the system does not know), and any signal whose `roles` entry is
    "extra" whatever its name, is ignored with a note. Outputs: the
    measured outputs named in `outputs` (default: every output among the signals with a valid
    sample); invalid samples are missing observations (null). Inputs: every system input is
    required; its invalid samples hold the last valid value (the model needs every point), with
    a note. `units` (the signals' units, e.g. the contract's): a signal in other units than the
    system's is converted (pint). Errors name `where` (`outputs_field`: where the selection
    came from, default `<where>.outputs`)."""
    declared_in = [getattr(v, "name", v) for v in system.inputs]
    declared_out = [getattr(v, "name", v) for v in system.outputs]
    unit_of = {
        getattr(v, "name", ""): getattr(v, "unit", "") for v in (*system.inputs, *system.outputs)
    }
    sys_name = getattr(system, "name", "the system")
    sel_field = outputs_field or f"{where}.outputs"
    t = numbers(times, f"{where}.times")
    if not isinstance(signals, Mapping) or not signals:
        raise RequestError(f"{where}.signals", "must be an object: signal name -> values")
    values: dict[str, np.ndarray] = {}
    for name, v in signals.items():
        if roles and roles.get(name) == "extra":
            continue  # the contract says it is no input or output, whatever its name
        if name in declared_in or name in declared_out:
            at = f"{where}.signals.{name}"
            values[name] = numbers(v, at, len(t), allow_null=True, per=" (one per time point)")
            values[name] = _to_system_unit(values[name], (units or {}).get(name), unit_of[name], at)
    notes: list[str] = []
    ignored = [n for n in signals if n not in values]
    if ignored:
        shown = ", ".join(f"{n} ({roles[n]})" if roles and roles.get(n) else n for n in ignored)
        notes.append(
            f"{where}: signals that are neither inputs nor outputs of {sys_name} were ignored: "
            f"{shown}"
        )
    missing = [n for n in declared_in if n not in values]
    if missing:
        raise RequestError(
            f"{where}.signals",
            f"no signal for the input(s) {missing}: every input that drove {sys_name} is "
            f"required (signals: {', '.join(signals)})",
        )
    inputs = {}
    for name in declared_in:
        v = values[name]
        ok = np.isfinite(v)
        if not ok.any():
            raise RequestError(
                f"{where}.signals.{name}",
                "every sample is invalid: the input is needed at every time point",
            )
        if not ok.all():
            idx = np.where(ok, np.arange(len(v)), 0)
            np.maximum.accumulate(idx, out=idx)
            held = v[idx]
            held[: int(np.argmax(ok))] = v[int(np.argmax(ok))]
            notes.append(
                f"{where}.signals.{name}: {int((~ok).sum())} invalid samples of the input hold "
                "the last valid value"
            )
            v = held
        inputs[name] = v.tolist()
    measured = [n for n in declared_out if n in values]
    if outputs is not None:
        if isinstance(outputs, str) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise RequestError(
                sel_field, f"must be a non-empty list of output names ({', '.join(declared_out)})"
            )
        bad = [o for o in outputs if o not in declared_out]
        if bad:
            raise RequestError(
                sel_field,
                f"unknown outputs {bad}; the outputs of {sys_name}: {', '.join(declared_out)}",
            )
        absent = [o for o in outputs if o not in values]
        if absent:
            raise RequestError(
                sel_field,
                f"{absent} are not measured: the telemetry's outputs are "
                f"{', '.join(measured) or 'none'}",
            )
        for o in outputs:
            if not np.isfinite(values[o]).any():
                raise RequestError(f"{where}.signals.{o}", "every sample is invalid")
        left = [n for n in measured if n not in outputs]
        if left:
            notes.append(
                f"{where}: measured outputs not selected ({sel_field}) were ignored: "
                + ", ".join(left)
            )
        chosen = list(dict.fromkeys(outputs))
    else:
        chosen = [n for n in measured if np.isfinite(values[n]).any()]
        empty = [n for n in measured if n not in chosen]
        if empty:
            notes.append(f"{where}: outputs with no valid sample were ignored: {', '.join(empty)}")
        if not chosen:
            raise RequestError(
                f"{where}.signals",
                f"no valid sample of any output of {sys_name} ({', '.join(declared_out)})",
            )
    observed = {n: [None if np.isnan(x) else float(x) for x in values[n]] for n in chosen}
    return {"times": t.tolist(), "outputs": observed, "inputs": inputs}, notes


def _to_system_unit(v: np.ndarray, unit: str | None, target: str, where: str) -> np.ndarray:
    """`v` in `unit` converted to the system's `target` unit (same spelling: as it is)."""
    if not unit or not target or unit.replace(" ", "") == target.replace(" ", ""):
        return v
    from twin_ml.data.telemetry import conversion

    try:
        scale, offset = conversion(unit, target, where)
    except ValueError as e:
        raise RequestError(
            where, f"its unit {unit!r} does not convert to the system's {target!r} ({e})"
        ) from None
    return v * scale + offset
