"""Scenario designs: space-filling samples of parameters, initial states and input signals.

A design spans one box (a named regime of the system, or its full bounds, optionally narrowed or
widened per name) with dimensions

    parameters [np]  +  initial states [nx]  +  per input: signal offset and amplitude [2 * nu]

and samples it with Latin hypercube or Sobol (scipy.stats.qmc), seeded. In-box scenarios are split
train/val/test; an extra *extrapolation* split is sampled outside the box (up to
`extrapolation_margin` box widths beyond each face, inside the variables' physical limits) for
out-of-domain tests.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import qmc

from twin_ml.physics.signals import SignalSpec, make_signal
from twin_ml.physics.system import PhysicsSystem, check_bounds

SAMPLERS = ("lhs", "sobol", "random")
# a scenario's split code is its index here (calibration came last: older datasets have none)
SPLITS = ("train", "val", "test", "extrapolation", "calibration")


@dataclass(frozen=True)
class DesignBox:
    """The sampled box of one system under one design; rows in the order of `names`."""

    names: list[str]  # "parameter:length", "state:theta", "input:torque:offset", ...
    low: np.ndarray  # [d]
    high: np.ndarray  # [d]
    limit_low: np.ndarray  # [d] physically possible range, for extrapolation
    limit_high: np.ndarray  # [d]

    def points(self, scen: Scenarios) -> np.ndarray:
        """The design points z [N, d] of scenarios (rows in the order of `names`)."""
        sig = np.stack([scen.offset, scen.amplitude], axis=-1).reshape(len(scen), -1)
        return np.concatenate([scen.p, scen.x0, sig], axis=1)

    def coordinates(self, scen: Scenarios) -> np.ndarray:
        """Where scenarios lie in the box, [N, d'] in [0, 1] per dimension (0: low, 1: high),
        over the d' dimensions the box does not fix (zero width): the space in which distances
        between scenarios are comparable across units."""
        w = self.high - self.low
        free = w > 0
        return (self.points(scen)[:, free] - self.low[free]) / w[free]


@dataclass(frozen=True)
class Scenarios:
    """Sampled scenarios: p [N, np], x0 [N, nx], offset/amplitude [N, nu], input clip range
    [N, nu, 2]."""

    p: np.ndarray
    x0: np.ndarray
    offset: np.ndarray
    amplitude: np.ndarray
    clip: np.ndarray
    split: np.ndarray  # [N] int8, index into SPLITS

    def __len__(self) -> int:
        return self.p.shape[0]

    def rows(self, start: int, stop: int) -> Scenarios:
        return Scenarios(
            *(
                getattr(self, k)[start:stop]
                for k in ("p", "x0", "offset", "amplitude", "clip", "split")
            )
        )


@dataclass(frozen=True)
class ScenarioDesign:
    """How scenarios are sampled. All fields have defaults; Hydra builds it from configs/design/.

    parameters / states / inputs: per-name (low, high) overrides of the regime's box, e.g.
    ``{"length": (0.9, 1.1)}``; one number (or low == high) fixes a value. signals: per-input signal
    options (see `twin_ml.physics.signals`), merged over the system's default for that input.
    t_end, dt: the time grid (None: the system's `default_horizon`).
    calibration_fraction: in-box scenarios per in-domain one drawn on top, the "calibration"
    split the conformal scale is fitted on (0 here: val calibrates; twin-generate's shipped
    design, configs/design/lhs.yaml, draws 0.8).
    """

    sampler: str = "lhs"
    regime: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    states: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, Any] = field(default_factory=dict)
    signals: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    t_end: float | None = None
    dt: float | None = None
    splits: Mapping[str, float] = field(
        default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15}
    )
    extrapolation_fraction: float = 0.1
    extrapolation_margin: float = 0.25
    calibration_fraction: float = 0.0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"design.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        for k in ("t_end", "dt"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(
                    f"design.{k} must be a number > 0 (or null for the system default), got {v!r}"
                )
        if set(self.splits) != {"train", "val", "test"}:
            raise ValueError(
                f"design.splits must name exactly train, val and test, got {sorted(self.splits)}"
            )
        fr = [float(self.splits[k]) for k in ("train", "val", "test")]
        if min(fr) < 0 or not math.isclose(sum(fr), 1.0, abs_tol=1e-9):
            raise ValueError(
                f"design.splits fractions must be >= 0 and sum to 1, got {dict(self.splits)}"
            )
        if not 0 <= self.extrapolation_fraction <= 10:
            raise ValueError(
                "design.extrapolation_fraction must be in [0, 10], "
                f"got {self.extrapolation_fraction}"
            )
        if not 0 <= self.calibration_fraction <= 10:
            raise ValueError(
                "design.calibration_fraction must be in [0, 10] (calibration scenarios per "
                f"in-domain scenario), got {self.calibration_fraction}"
            )
        if not self.extrapolation_margin > 0:
            raise ValueError(
                f"design.extrapolation_margin must be > 0, got {self.extrapolation_margin}"
            )

    # ---- the grid and the signals --------------------------------------------------------------
    def time_grid(self, system: PhysicsSystem) -> np.ndarray:
        """t [T]: 0, dt, ..., t_end (t_end rounded to a whole number of steps)."""
        t_end = self.t_end if self.t_end is not None else system.default_horizon[0]
        dt = self.dt if self.dt is not None else system.default_horizon[1]
        n = int(round(t_end / dt))
        if n < 1:
            raise ValueError(f"design: t_end ({t_end}) must be at least one step dt ({dt})")
        return np.arange(n + 1, dtype=np.float64) * dt

    def signal_specs(self, system: PhysicsSystem) -> list[SignalSpec]:
        unknown = set(self.signals) - set(system.input_names)
        if unknown:
            raise ValueError(
                f"design.signals: unknown inputs {sorted(unknown)}; "
                f"inputs of {system.name}: {system.input_names}"
            )
        specs = []
        for inp in system.inputs:
            opts = {**dict(inp.signal), **dict(self.signals.get(inp.name, {}))}
            try:
                spec = make_signal(**opts)
                spec.check_grid(self.time_grid(system))
            except (TypeError, ValueError) as e:
                raise ValueError(f"design.signals.{inp.name}: {e}") from None
            specs.append(spec)
        return specs

    # ---- the box -----------------------------------------------------------------------------
    def box(self, system: PhysicsSystem) -> DesignBox:
        regime = system.regime(self.regime)
        names, lo, hi, llo, lhi = [], [], [], [], []
        for kind, decl, override, sub in (
            ("parameter", system.parameters, self.parameters, regime.parameters),
            ("state", system.states, self.states, regime.states),
            ("input", system.inputs, self.inputs, regime.inputs),
        ):
            known = [v.name for v in decl]
            unknown = set(override) - set(known)
            if unknown:
                raise ValueError(
                    f"design.{kind}s: unknown names {sorted(unknown)}; {system.name} has {known}"
                )
            for v in decl:
                b = v.bounds
                if v.name in sub:
                    b = sub[v.name]
                if v.name in override:
                    b = check_bounds(
                        f"design.{kind}s.{v.name}",
                        _pair(override[v.name], f"design.{kind}s.{v.name}"),
                    )
                limits = getattr(v, "limits", (-math.inf, math.inf))
                if b[0] < limits[0] or b[1] > limits[1]:
                    raise ValueError(
                        f"design.{kind}s.{v.name}: ({b[0]}, {b[1]}) "
                        f"leaves the physical limits {tuple(limits)}"
                    )
                if kind == "input":
                    # an input is sampled as an offset within the range and an amplitude up to
                    # half of it
                    names += [f"input:{v.name}:offset", f"input:{v.name}:amplitude"]
                    lo += [b[0], 0.0]
                    hi += [b[1], (b[1] - b[0]) / 2.0]
                    llo += [limits[0], 0.0]
                    lhi += [limits[1], (limits[1] - limits[0]) / 2.0]
                else:
                    names.append(f"{kind}:{v.name}")
                    lo.append(b[0])
                    hi.append(b[1])
                    llo.append(limits[0])
                    lhi.append(limits[1])
        return DesignBox(names, np.array(lo), np.array(hi), np.array(llo), np.array(lhi))

    # ---- sampling ----------------------------------------------------------------------------
    def n_extrapolation(self, n_scenarios: int) -> int:
        return int(math.ceil(self.extrapolation_fraction * n_scenarios))

    def n_calibration(self, n_scenarios: int) -> int:
        return int(math.ceil(self.calibration_fraction * n_scenarios))

    def sample(self, system: PhysicsSystem, n_scenarios: int, seed: int) -> Scenarios:
        """In-box scenarios (split train/val/test), then the extrapolation scenarios, then the
        calibration scenarios (in-box, drawn by the design's sampler on their own stream: the
        conformal scale's data, apart from the validation split early stopping selects on; the
        others are the same with or without them)."""
        if isinstance(n_scenarios, bool) or not (
            isinstance(n_scenarios, (int, np.integer)) and n_scenarios > 0
        ):
            raise ValueError(f"n_scenarios must be an integer > 0, got {n_scenarios!r}")
        box = self.box(system)
        self.signal_specs(system)  # validate the signal options before anything runs
        d = len(box.names)
        unit = self._unit_sample(d, n_scenarios, [seed, 0])
        z_in = box.low + unit * (box.high - box.low)
        split_in = self._split_labels(n_scenarios, seed)
        n_ex = self.n_extrapolation(n_scenarios)
        z_ex = self._extrapolation(box, n_ex, seed) if n_ex else np.zeros((0, d))
        n_cal = self.n_calibration(n_scenarios)
        z_cal = (
            box.low + self._unit_sample(d, n_cal, [seed, 4]) * (box.high - box.low)
            if n_cal
            else np.zeros((0, d))
        )
        z = np.concatenate([z_in, z_ex, z_cal])
        split = np.concatenate(
            [
                split_in,
                np.full(n_ex, SPLITS.index("extrapolation"), dtype=np.int8),
                np.full(n_cal, SPLITS.index("calibration"), dtype=np.int8),
            ]
        )
        scen = _scenarios(system, box, z, split)
        if n_ex:
            # extrapolation signals may leave the training range, up to the margin and the limits
            n_p, nx = len(system.parameters), len(system.states)
            in_lo, in_hi = box.low[n_p + nx :: 2], box.high[n_p + nx :: 2]
            w = in_hi - in_lo
            ex_lo = np.maximum(in_lo - self.extrapolation_margin * w, box.limit_low[n_p + nx :: 2])
            ex_hi = np.minimum(in_hi + self.extrapolation_margin * w, box.limit_high[n_p + nx :: 2])
            scen.clip[n_scenarios : n_scenarios + n_ex] = np.stack([ex_lo, ex_hi], axis=-1)
        return scen

    def candidates(self, system: PhysicsSystem, n: int, *, key: list[int]) -> Scenarios:
        """n more in-box scenarios, drawn with the design's own sampler from
        `SeedSequence(key)`: the box, input ranges and signal clipping of the design's train
        scenarios, all labelled train. A candidate pool for active learning (the caller scores
        and picks), or, taken whole, what a fresh design of n would add.

        >>> from twin_ml.physics import make_system
        >>> len(ScenarioDesign().candidates(make_system("pendulum"), 8, key=[0, 5, 1]))
        8
        """
        if isinstance(n, bool) or not (isinstance(n, (int, np.integer)) and n > 0):
            raise ValueError(f"the number of candidates must be an integer > 0, got {n!r}")
        box = self.box(system)
        unit = self._unit_sample(len(box.names), int(n), key)
        z = box.low + unit * (box.high - box.low)
        return _scenarios(system, box, z, np.full(int(n), SPLITS.index("train"), dtype=np.int8))

    def _unit_sample(self, d: int, n: int, key: list[int]) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence(key))
        if d == 0:
            return np.zeros((n, 0))
        if self.sampler == "lhs":
            return qmc.LatinHypercube(d, rng=rng).random(n)
        if self.sampler == "sobol":
            with (
                warnings.catch_warnings()
            ):  # balance properties need n = 2^k; other n still fill well
                warnings.simplefilter("ignore", UserWarning)
                return qmc.Sobol(d, scramble=True, rng=rng).random(n)
        return rng.random((n, d))

    def _split_labels(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        n_train = int(round(self.splits["train"] * n))
        n_val = min(int(round(self.splits["val"] * n)), n - n_train)
        labels = np.full(n, SPLITS.index("test"), dtype=np.int8)
        perm = rng.permutation(n)
        labels[perm[:n_train]] = SPLITS.index("train")
        labels[perm[n_train : n_train + n_val]] = SPLITS.index("val")
        return labels

    def _extrapolation(self, box: DesignBox, n: int, seed: int) -> np.ndarray:
        """n points in the box widened by the margin (within limits), each outside the box."""
        w = box.high - box.low
        lo = np.maximum(box.low - self.extrapolation_margin * w, box.limit_low)
        hi = np.minimum(box.high + self.extrapolation_margin * w, box.limit_high)
        if np.all((lo >= box.low) & (hi <= box.high)):
            raise ValueError(
                "design: no room for an extrapolation split "
                "(every variable's box already spans its "
                "physical limits or has zero width); set design.extrapolation_fraction=0"
            )
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
        out: list[np.ndarray] = []
        for _ in range(1000):
            cand = lo + rng.random((max(4 * n, 64), len(lo))) * (hi - lo)
            outside = np.any((cand < box.low) | (cand > box.high), axis=1)
            out.extend(cand[outside])
            if len(out) >= n:
                return np.array(out[:n])
        raise ValueError(
            "design: could not sample the extrapolation split; widen extrapolation_margin"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler,
            "regime": self.regime,
            "parameters": {k: list(_pair(v, k)) for k, v in self.parameters.items()},
            "states": {k: list(_pair(v, k)) for k, v in self.states.items()},
            "inputs": {k: list(_pair(v, k)) for k, v in self.inputs.items()},
            "signals": {k: dict(v) for k, v in self.signals.items()},
            "t_end": self.t_end,
            "dt": self.dt,
            "splits": dict(self.splits),
            "extrapolation_fraction": self.extrapolation_fraction,
            "extrapolation_margin": self.extrapolation_margin,
            # only when set: a design without calibration scenarios keeps its settings hash
            **(
                {"calibration_fraction": self.calibration_fraction}
                if self.calibration_fraction
                else {}
            ),
        }


def _scenarios(
    system: PhysicsSystem, box: DesignBox, z: np.ndarray, split: np.ndarray
) -> Scenarios:
    """Scenarios from design points z [N, d] (the box's rows), their input signals clipped to the
    box's input ranges."""
    n_p, nx, nu = len(system.parameters), len(system.states), len(system.inputs)
    p, x0, sig = z[:, :n_p], z[:, n_p : n_p + nx], z[:, n_p + nx :].reshape(len(z), nu, 2)
    in_lo, in_hi = box.low[n_p + nx :: 2], box.high[n_p + nx :: 2]  # offset rows: input ranges
    clip = np.broadcast_to(np.stack([in_lo, in_hi], axis=-1), (len(z), nu, 2)).copy()
    return Scenarios(p=p, x0=x0, offset=sig[..., 0], amplitude=sig[..., 1], clip=clip, split=split)


def _pair(v: Any, where: str) -> tuple[float, float]:
    """[low, high] from a pair, or (v, v) from one number (fixes the variable)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v), float(v)
    try:
        lo, hi = v
        return float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected [low, high], got {v!r}") from None
