"""The model card: what an exported model is, as types.

Export writes a `ModelCard` into the ONNX file's metadata (key ``twin_ml.manifest``, JSON) and
beside it in the model store; the registry verifies it; serving, calibration and monitoring read
it. This module is the one place that knows the JSON's layout, and the one that reads the layout
of older exports (`ModelCard.from_json`). Torch-free (pydantic, numpy).

Format ``twin-ml/onnx/v2`` (JSON, one object)::

    format, name, version, kind, members
    system         the system card: name, class (its import path), options, time_unit, states,
                   inputs, outputs, parameters (name, unit, bounds, limits, nominal), regimes,
                   stiffness, solver, default_horizon
    interface      the graph's inputs and outputs with their shapes, dtype
    time           t0, dt, unit, train_steps, max_steps, fixed_steps
    domain         the training box: parameters / states {name: [low, high]},
                   inputs {name: {offset: [low, high], amplitude: [low, high]}}, regime
    normalization  x/u/p/y means and stds, dx_std
    conformal_scale, metrics, parity, integrator_error
    conformal_shift  the widening of the served std outside the training box (optional; absent
                   in older cards, read as beta 0): beta per output, the distance's definition,
                   the level, n_fit (the extrapolation scenarios beta was fitted on), notes.
                   Served std = std * (1 + beta * d), d = `DomainBox.distance` of the scenario
    provenance     dataset_sha256, config_sha256, weights_sha256, code_version, created_at
    (in the store only) onnx_sha256, files: sha256 of every stored file

``twin-ml/onnx/v1`` (exports before v2) differs in two places: the box was one flat map keyed
"parameter:NAME", "state:NAME", "input:NAME:offset", "input:NAME:amplitude", and the provenance
fields sat at the top level. It is read, never written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twin_ml.contract.errors import RequestError

FORMAT = "twin-ml/onnx/v2"
FORMAT_V1 = "twin-ml/onnx/v1"
READABLE = (FORMAT, FORMAT_V1)

Range = tuple[float, float]
_OPEN = ConfigDict(extra="allow", populate_by_name=True)  # a newer writer may add fields


class CardError(ValueError):
    """A model card that cannot be read (unknown format, missing or mistyped fields)."""


def _limit(v: Any, default: float) -> float:
    """JSON has no infinity: an open limit is written as null."""
    return default if v is None else float(v)


class Variable(BaseModel):
    """A declared variable of the system: a state, input, output or parameter."""

    model_config = _OPEN
    name: str
    unit: str = ""
    bounds: Range | None = None
    limits: tuple[float | None, float | None] | None = None
    nominal: float | None = None

    @cached_property
    def physical(self) -> Range:
        """(low, high) physically possible values; +-inf where open."""
        lo, hi = self.limits or (None, None)
        return _limit(lo, -math.inf), _limit(hi, math.inf)


class GridCard(BaseModel):
    """A field system's grid: cells per axis ((ny, nx) in 2D), the domain's lengths, their unit."""

    model_config = _OPEN
    shape: list[int]
    extent: list[float]
    length_unit: str = "m"

    @property
    def cells(self) -> int:
        return math.prod(self.shape)


class SystemCard(BaseModel):
    """The physics system of a model: names, units, bounds, limits, regimes, and how to build it
    again (its registered name, its class's import path, its constructor options)."""

    model_config = _OPEN
    name: str
    class_path: str | None = Field(None, alias="class")
    options: dict[str, Any] = Field(default_factory=dict)
    time_unit: str = "s"
    states: list[Variable] = Field(default_factory=list)
    inputs: list[Variable] = Field(default_factory=list)
    outputs: list[Variable] = Field(default_factory=list)
    parameters: list[Variable] = Field(default_factory=list)
    regimes: dict[str, Any] = Field(default_factory=dict)
    stiffness: str | None = None
    solver: str | None = None
    default_horizon: list[float] | None = None
    # field systems (twin_ml.physics.FieldSystem): the grid, the fields (each `grid.cells` values
    # in the state, one after another), and the stride their snapshots were kept at
    grid: GridCard | None = None
    fields: list[Variable] = Field(default_factory=list)
    snapshot_stride: int | None = None

    @cached_property
    def field_names(self) -> list[str]:
        return [v.name for v in self.fields]

    @cached_property
    def parameter_names(self) -> list[str]:
        return [v.name for v in self.parameters]

    @cached_property
    def state_names(self) -> list[str]:
        return [v.name for v in self.states]

    @cached_property
    def input_names(self) -> list[str]:
        return [v.name for v in self.inputs]

    @cached_property
    def output_names(self) -> list[str]:
        return [v.name for v in self.outputs]

    def description(self) -> dict[str, Any]:
        """The JSON of `PhysicsSystem.describe()` this card was made from."""
        return self.model_dump(mode="json", by_alias=True)

    def build(self):
        """The physics system itself (numpy/scipy; by registered name, else by import path)."""
        from twin_ml.physics.catalog import system_from_description

        return system_from_description(self.description())


def check_sorted_times(t: np.ndarray, field: str, *, min_points: int) -> None:
    """Timestamps: at least `min_points`, sorted and unique (any spacing)."""
    if len(t) < min_points:
        raise RequestError(field, f"needs at least {min_points} timestamps, got {len(t)}")
    d = np.diff(t)
    if np.any(d == 0):
        i = int(np.flatnonzero(d == 0)[0])
        raise RequestError(field, f"duplicated timestamp {t[i]:g} at positions {i} and {i + 1}")
    if np.any(d < 0):
        i = int(np.flatnonzero(d < 0)[0])
        raise RequestError(field, f"not sorted: {t[i]:g} then {t[i + 1]:g} at position {i + 1}")


class TimeGrid(BaseModel):
    """The model's uniform time grid: step `dt`, the training horizon, the longest it answers."""

    model_config = _OPEN
    t0: float = 0.0
    dt: float
    unit: str = "s"
    train_steps: int
    max_steps: int
    fixed_steps: bool = False  # an emulator: answers on its training grid only

    def grid(self, n_steps: int) -> np.ndarray:
        return np.arange(n_steps + 1) * self.dt

    def steps(self, t_end: float, field: str, max_steps: int | None = None) -> int:
        """The number of steps to `t_end`, checked: > 0, a multiple of dt, within the maximum."""
        max_steps = self.max_steps if max_steps is None else max_steps
        if t_end <= 0:
            raise RequestError(field, "must be > 0")
        n = int(round(t_end / self.dt))
        if n < 1:
            raise RequestError(field, f"must be at least one step, dt = {self.dt:g}")
        if n > max_steps:  # before any array of that length exists
            raise RequestError(
                field,
                f"{n} steps exceed this model's maximum of {max_steps} "
                f"(t_end <= {max_steps * self.dt:g})",
            )
        if not math.isclose(n * self.dt, t_end, rel_tol=1e-6, abs_tol=1e-9):
            raise RequestError(field, f"must be a multiple of dt = {self.dt}, got {t_end}")
        return n

    def check_times(self, t: np.ndarray, field: str, *, min_points: int = 2) -> None:
        """Timestamps: at least `min_points`, sorted, unique, uniform with step dt."""
        check_sorted_times(t, field, min_points=min_points)
        d = np.diff(t)
        if not np.allclose(d, self.dt, rtol=1e-6, atol=1e-9 * max(1.0, abs(self.dt))):
            raise RequestError(
                field, f"must be uniform with the model's step dt = {self.dt:g} (resample first)"
            )

    def check_horizon(self, steps: int, field: str, max_steps: int | None = None) -> None:
        """`steps` within the maximum, and the emulator's one fixed horizon. The message speaks
        of timestamps for a `times` field, of t_end otherwise."""
        max_steps = self.max_steps if max_steps is None else max_steps
        by_times = field.endswith("times")
        if steps > max_steps:
            limit = (
                f"at most {max_steps + 1} timestamps"
                if by_times
                else f"t_end <= {max_steps * self.dt:g}"
            )
            raise RequestError(
                field, f"{steps} steps exceed this model's maximum of {max_steps} ({limit})"
            )
        if self.fixed_steps and steps != self.max_steps:
            grid = f"{self.max_steps + 1} timestamps {self.dt:g} apart"
            where = grid if by_times else f"t_end = {self.max_steps * self.dt:g} ({grid})"
            raise RequestError(field, f"this emulator answers on its training grid only: {where}")


class InputRange(BaseModel):
    """An input's training range: the signal offsets and amplitudes the design sampled."""

    model_config = _OPEN
    offset: Range
    amplitude: Range | None = None


# what `DomainBox.distance` measures, as metrics.json and the card's conformal_shift name it
DISTANCE = (
    "max over the training box's parameters, initial states and inputs (their values over the "
    "scenario) of how far the value lies outside the box, in box widths (0 inside)"
)


@dataclass(frozen=True)
class Excess:
    """Where N scenarios lie against the box's V ranges: per scenario and variable the lowest and
    the highest value it takes (a parameter or an initial state: its one value; an input: its min
    and max over the scenario's time grid). `DomainBox.excesses` makes it; the in-domain reasons
    and the distance both read it."""

    labels: list[str]  # [V] "parameter length", "initial state theta", "input torque"
    lo: np.ndarray  # [V] the ranges
    hi: np.ndarray  # [V]
    low: np.ndarray  # [N, V]
    high: np.ndarray  # [N, V]

    @cached_property
    def widths(self) -> np.ndarray:
        # [V]; a variable the design fixed (low == high): any departure from it counts as far
        return np.maximum(self.hi - self.lo, 1e-12)

    def fractions(self) -> np.ndarray:
        """[N, V] how far each scenario lies outside each range, in range widths (0 inside)."""
        out = np.maximum(self.lo - self.low, self.high - self.hi)
        return np.maximum(out, 0.0) / self.widths

    def distances(self) -> np.ndarray:
        """[N] the largest of `fractions` over the variables (0 inside every range)."""
        return self.fractions().max(axis=1, initial=0.0)

    def messages(self, i: int = 0) -> list[str]:
        """Why scenario `i` is outside the ranges (per variable below, above, or both); empty
        when inside."""
        out = []
        rows = zip(
            self.labels, self.lo.tolist(), self.hi.tolist(), self.low[i].tolist(),
            self.high[i].tolist(), self.widths.tolist(),
        )  # fmt: skip
        for label, lo, hi, lo_v, hi_v, width in rows:
            if lo_v < lo:
                out.append(
                    f"{label} = {lo_v:g} is below the training range [{lo:g}, {hi:g}] by "
                    f"{lo - lo_v:g} ({100 * (lo - lo_v) / width:.0f}% of its width)"
                )
            if hi_v > hi:
                out.append(
                    f"{label} = {hi_v:g} is above the training range [{lo:g}, {hi:g}] by "
                    f"{hi_v - hi:g} ({100 * (hi_v - hi) / width:.0f}% of its width)"
                )
        return out


def widening(beta: Any, distance: Any) -> np.ndarray:
    """The factor 1 + beta * d the std is multiplied by at distance d from the training box:
    beta [ny] (>= 0), distance a number or [N] -> [ny] or [N, ny]. Exactly 1 at d = 0."""
    d = np.asarray(distance, dtype=np.float64)
    return 1.0 + np.multiply.outer(d, np.asarray(beta, dtype=np.float64))


class DomainBox(BaseModel):
    """The training domain: the box the design sampled (its regime's, or the full bounds).

    Owns the in-domain check (`reasons`), the distance to the box (`distance`, `distances`), both
    from one comparison (`excesses`), and every lookup of a variable's range."""

    model_config = _OPEN
    parameters: dict[str, Range] = Field(default_factory=dict)
    states: dict[str, Range] = Field(default_factory=dict)
    inputs: dict[str, InputRange] = Field(default_factory=dict)
    regime: str | None = None

    @classmethod
    def from_design(cls, box: dict[str, Any], regime: str | None = None) -> DomainBox:
        """From a design's flat box ("parameter:NAME", "state:NAME", "input:NAME:offset",
        "input:NAME:amplitude"), as datasets and training runs record it."""
        out: dict[str, dict[str, Any]] = {"parameters": {}, "states": {}, "inputs": {}}
        for key, rng in box.items():
            kind, _, rest = key.partition(":")
            pair = (float(rng[0]), float(rng[1]))
            if kind == "parameter":
                out["parameters"][rest] = pair
            elif kind == "state":
                out["states"][rest] = pair
            elif kind == "input":
                name, _, part = rest.rpartition(":")
                out["inputs"].setdefault(name, {})[part] = pair
            else:
                raise CardError(f"domain box: unknown key {key!r}")
        return cls(**out, regime=regime)

    @classmethod
    def of_design(cls, design: Mapping[str, Any]) -> DomainBox:
        """The box of a design's recorded settings (a dataset card's `design`, a run's
        model.json `design`): its sampled "box" and its "regime". Export writes this box into the
        card, so training (the conformal shift's fit) and serving measure the same distance."""
        return cls.from_design(design.get("box", {}), design.get("regime"))

    def fitted(self, name: str) -> Range | None:
        """The range of a calibration's fitted name: a parameter, or "state:<name>"."""
        if name.startswith("state:"):
            return self.states.get(name[6:])
        return self.parameters.get(name)

    def input_range(self, name: str) -> Range | None:
        """The range an input's values were trained on (its sampled offsets), or None."""
        rng = self.inputs.get(name)
        return rng.offset if rng else None

    def state_middle(self, name: str) -> float:
        lo, hi = self.states.get(name, (0.0, 0.0))
        return (lo + hi) / 2

    def excesses(self, card: Any, p: Any, x0: Any, u: Any) -> Excess:
        """Where scenarios p [N, np], x0 [N, nx], u [N, T, nu] lie against the ranges of the box
        (in float64), variables in the order parameters, initial states, inputs. `card`: a
        `SystemCard` or a `PhysicsSystem` (the declared names). A variable the box does not hold
        is left out."""
        p, x0, u = (np.asarray(a, dtype=np.float64) for a in (p, x0, u))
        groups = (
            ("parameter", card.parameter_names[: p.shape[-1]], self.parameters.get),
            ("initial state", card.state_names[: x0.shape[-1]], self.states.get),
            ("input", card.input_names[: u.shape[-1]], self.input_range),
        )
        labels: list[str] = []
        ranges: list[Range] = []
        cols: list[int] = []  # the columns of [p, x0, u] the box holds a range for
        k = 0
        for kind, names, get in groups:
            for n in names:
                if (rng := get(n)) is not None:
                    labels.append(f"{kind} {n}")
                    ranges.append(rng)
                    cols.append(k)
                k += 1
        n_p, n_x, n_u = (len(g[1]) for g in groups)
        u = u[:, :, :n_u]
        lows = np.concatenate([p[:, :n_p], x0[:, :n_x], u.min(axis=1, initial=np.inf)], axis=1)
        highs = np.concatenate([p[:, :n_p], x0[:, :n_x], u.max(axis=1, initial=-np.inf)], axis=1)
        if len(cols) < k:
            lows, highs = lows[:, cols], highs[:, cols]
        rng_arr = np.array(ranges, dtype=np.float64).reshape(-1, 2)
        return Excess(labels, rng_arr[:, 0], rng_arr[:, 1], lows, highs)

    def check(
        self, card: Any, p: np.ndarray, x0: np.ndarray, u: np.ndarray
    ) -> tuple[list[str], float]:
        """(`reasons`, `distance`) of one scenario, from one comparison. A scenario inside every
        range (the common case of a served request) is told in plain Python, without building
        the arrays of `excesses` (~5x cheaper); any other gets the full comparison."""
        u = np.asarray(u)
        if self._inside(card, np.asarray(p).tolist(), np.asarray(x0).tolist(), u):
            return [], 0.0
        ex = self.excesses(card, np.asarray(p)[None], np.asarray(x0)[None], u[None])
        return ex.messages(), float(ex.distances()[0])

    def _inside(self, card: Any, p: list, x0: list, u: np.ndarray) -> bool:
        """Whether every value the box holds a range for lies within it (as `excesses` reads
        them: a parameter's or initial state's value, an input's min and max over the grid).
        NaN compares False both ways: `excesses` decides then."""
        for names, values, get in (
            (card.parameter_names, p, self.parameters.get),
            (card.state_names, x0, self.states.get),
        ):
            for name, v in zip(names, values):
                rng = get(name)
                if rng is not None and not rng[0] <= v <= rng[1]:
                    return False
        if u.ndim != 2 or not len(u):
            return not any(self.input_range(n) for n in card.input_names[: u.shape[-1]])
        lows, highs = u.min(axis=0).tolist(), u.max(axis=0).tolist()
        for name, lo_v, hi_v in zip(card.input_names, lows, highs):
            rng = self.input_range(name)
            if rng is not None and not (rng[0] <= lo_v and hi_v <= rng[1]):
                return False
        return True

    def reasons(self, card: SystemCard, p: np.ndarray, x0: np.ndarray, u: np.ndarray) -> list[str]:
        """Why a scenario (p [np], x0 [nx], u [T, nu]) is outside the box; empty when inside."""
        return self.check(card, p, x0, u)[0]

    def distance(self, card: SystemCard, p: np.ndarray, x0: np.ndarray, u: np.ndarray) -> float:
        """How far a scenario (p [np], x0 [nx], u [T, nu]) lies outside the box: the largest
        amount by which a parameter, an initial state or an input's value over the scenario
        leaves its training range, as a fraction of that range's width; 0 inside. The amounts
        `reasons` reports (its "% of its width", unrounded). A variable the design fixed
        (zero width) counts its departure against a width of 1e-12: huge, as the model never saw
        it vary."""
        return self.check(card, p, x0, u)[1]

    def distances(self, card: Any, p: Any, x0: Any, u: Any) -> np.ndarray:
        """`distance` of N scenarios at once: p [N, np], x0 [N, nx], u [N, T, nu] -> [N]."""
        return self.excesses(card, p, x0, u).distances()


class ConformalShift(BaseModel):
    """How the served std widens outside the training box, per output j:

        std_served = std * (1 + beta_j * d),   d = `DomainBox.distance` of the scenario

    (std already holds the in-domain conformal scale; d = 0 inside the box, so in-domain answers
    are unchanged). beta is fitted at training time on the dataset's extrapolation split
    (`twin_ml.uq.shift`): the smallest beta >= 0 whose `level` intervals cover those points at the
    split-conformal finite-sample level. Empty `beta`: 0 for every output (cards written before
    this field, telemetry-trained models, datasets without an extrapolation split)."""

    model_config = _OPEN
    beta: list[float] = Field(default_factory=list)  # [ny], >= 0; empty: 0
    distance: str = DISTANCE
    level: float = 0.9  # the interval level beta was fitted for
    n_fit: int = 0  # the extrapolation scenarios beta was fitted on
    notes: list[str] = Field(default_factory=list)

    @field_validator("beta")
    @classmethod
    def _finite_and_nonnegative(cls, beta: list[float]) -> list[float]:
        if not all(math.isfinite(b) and b >= 0 for b in beta):
            raise ValueError(f"every beta must be finite and >= 0, got {beta}")
        return beta

    def betas(self, n_outputs: int) -> np.ndarray:
        """beta [n_outputs] (zeros when none was fitted)."""
        if not self.beta:
            return np.zeros(n_outputs)
        if len(self.beta) != n_outputs:
            raise CardError(f"conformal_shift: {len(self.beta)} betas for {n_outputs} outputs")
        return np.asarray(self.beta, dtype=np.float64)

    def factor(self, distance: Any, n_outputs: int) -> np.ndarray:
        """`widening` at `distance` (a number or [N]) -> [n_outputs] or [N, n_outputs]."""
        return widening(self.betas(n_outputs), distance)


class Normalization(BaseModel):
    """The statistics the model normalizes with (per variable, in declaration order)."""

    model_config = _OPEN
    x_mean: list[float]
    x_std: list[float]
    u_mean: list[float]
    u_std: list[float]
    p_mean: list[float]
    p_std: list[float]
    y_mean: list[float]
    y_std: list[float]
    dx_std: list[float] | None = None


class Provenance(BaseModel):
    """Where the model came from: the hashes of its data, config and weights, the code."""

    model_config = _OPEN
    dataset_sha256: str | None = None
    config_sha256: str | None = None
    weights_sha256: str | None = None
    code_version: str | None = None
    created_at: str | None = None


class ModelCard(BaseModel):
    """An exported model, as export writes it and every reader reads it (see the module doc)."""

    model_config = _OPEN
    format: Literal["twin-ml/onnx/v2"] = FORMAT
    name: str
    version: str
    kind: str
    members: int
    system: SystemCard
    interface: dict[str, Any] = Field(default_factory=dict)
    time: TimeGrid
    domain: DomainBox
    normalization: Normalization
    conformal_scale: list[float]
    # optional (cards before it read as beta 0): the widening outside the training box
    conformal_shift: ConformalShift = Field(default_factory=ConformalShift)
    metrics: dict[str, Any] = Field(default_factory=dict)
    parity: dict[str, Any] | None = None
    integrator_error: dict[str, Any] | None = None
    provenance: Provenance = Field(default_factory=Provenance)
    onnx_sha256: str | None = None  # in the store's copy (the file cannot hold its own hash)
    files: dict[str, str] | None = None  # in the store's copy: sha256 of every stored file

    @model_validator(mode="after")
    def _one_beta_per_output(self) -> ModelCard:
        n, ny = len(self.conformal_shift.beta), len(self.system.outputs)
        if n and n != ny:
            raise ValueError(f"conformal_shift.beta has {n} values for {ny} outputs")
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def to_json(self, *, store: bool = False) -> dict[str, Any]:
        """The JSON object (`store`: with the store's onnx_sha256 and files, where known)."""
        out = self.model_dump(mode="json", by_alias=True)
        for key in ("onnx_sha256", "files"):
            if not store or out[key] is None:
                del out[key]
        return out

    def dumps(self, *, store: bool = False, indent: int | None = None) -> str:
        return json.dumps(self.to_json(store=store), sort_keys=True, indent=indent)

    @classmethod
    def of(cls, card: ModelCard | str | bytes | dict[str, Any]) -> ModelCard:
        """`card` itself, or the card read from its JSON."""
        return card if isinstance(card, ModelCard) else cls.from_json(card)

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> ModelCard:
        """A card from its JSON (a string, bytes or the parsed object), v2 or v1."""
        if not isinstance(data, dict):
            try:
                data = json.loads(data)
            except (ValueError, TypeError) as e:
                raise CardError(f"model card: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise CardError("model card: not a JSON object")
        fmt = data.get("format")
        if fmt == FORMAT_V1:
            data = _from_v1(data)
        elif fmt != FORMAT:
            raise CardError(
                f"model card format {fmt!r} is not one this version reads "
                f"({', '.join(READABLE)}): re-export the model with this version (twin-export)"
            )
        try:
            card = cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise CardError(
                f"model card ({fmt}): {where}: {first['msg']} ({e.error_count()} problem(s)); "
                "re-export the model (twin-export)"
            ) from None
        return card


def _from_v1(m: dict[str, Any]) -> dict[str, Any]:
    """A v1 manifest in the v2 layout: the flat box structured, provenance grouped."""
    try:
        out = {k: v for k, v in m.items() if k not in _V1_PROVENANCE and k != "domain"}
        out["format"] = FORMAT
        out["converted_from"] = FORMAT_V1  # read from an export before the typed card
        domain = m["domain"]
        out["domain"] = DomainBox.from_design(domain["box"], domain.get("regime"))
        out["provenance"] = {k: m[k] for k in _V1_PROVENANCE if k in m}
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise CardError(
            f"model card ({FORMAT_V1}): cannot read its domain ({e!r}); "
            "re-export the model (twin-export)"
        ) from None
    return out


_V1_PROVENANCE = ("dataset_sha256", "config_sha256", "weights_sha256", "code_version", "created_at")
