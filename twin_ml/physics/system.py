"""The PhysicsSystem base class: a declared, solver-ready dynamical system.

A system declares its variables (states, inputs, outputs, parameters, with units and bounds), its
operating regimes, a stiffness hint and a preferred solver, and writes its right-hand side ONCE
against an array namespace, so the same code runs in numpy (for scipy) and in torch (for hybrid
models). Shapes follow one convention everywhere::

    x [..., nx]   u [..., nu]   p [..., np]   ->   dx/dt [..., nx],   y [..., ny]

Example (a complete 2-state system; see the README)::

    from twin_ml.physics import PhysicsSystem, State, Input, Output, Parameter, register_system

    @register_system("mass_spring")
    class MassSpring(PhysicsSystem):
        states = (State("pos", "m", bounds=(-1, 1)), State("vel", "m/s", bounds=(-1, 1)))
        inputs = (Input("force", "N", bounds=(-1, 1)),)
        outputs = (Output("pos", "m"),)
        parameters = (Parameter("k", "N/m", nominal=4.0, bounds=(2, 8)),)
        default_horizon = (10.0, 0.05)

        def rhs(self, t, x, u, p):
            xp = self.xp(x)
            return xp.stack([x[..., 1], u[..., 0] - p[..., 0] * x[..., 0]], axis=-1)
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import numpy as _NP_COMPAT

_NAMESPACES: dict[type, Any] = {}  # array type -> its array-api namespace (see PhysicsSystem.xp)


def _clip(x, /, min=None, max=None, **kwargs):
    """The array API's clip for numpy: numpy's maximum / minimum for a float array and number
    bounds (np.clip's result, as array-api-compat's, which checks and casts its bounds first and
    costs ~5x as much: solvers and filters call it every step), array-api-compat's for anything
    else."""
    if (
        not kwargs
        and getattr(x, "dtype", None) is not None
        and x.dtype.kind == "f"
        and (min is None or type(min) in (float, int))
        and (max is None or type(max) in (float, int))
        and not (min is None and max is None)
    ):
        if max is None:  # the ufuncs alone: np.clip's own checks cost more than the work
            return np.maximum(x, min)
        if min is None:
            return np.minimum(x, max)
        return np.minimum(np.maximum(x, min), max)
    return _NP_COMPAT.clip(x, min=min, max=max, **kwargs)


# array-api-compat's numpy namespace with the faster clip (a copy: the library's stays as it is)
_NP = types.SimpleNamespace(**{k: getattr(_NP_COMPAT, k) for k in dir(_NP_COMPAT)})
_NP.clip = _clip

Interpolation = Literal["zoh", "linear"]
Stiffness = Literal["nonstiff", "moderate", "stiff"]
SOLVER_METHODS = ("RK45", "DOP853", "RK23", "LSODA", "Radau", "BDF")


def check_bounds(where: str, bounds: tuple[float, float]) -> tuple[float, float]:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: bounds must be a pair (low, high) of numbers, got {bounds!r}"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{where}: bounds must be finite, got ({lo}, {hi})")
    if lo > hi:
        raise ValueError(
            f"{where}: low ({lo}) > high ({hi}); bounds are (low, high) with low <= high"
        )
    return lo, hi


@dataclass(frozen=True)
class State:
    """A state variable. `bounds` is the box initial states are sampled from by default."""

    name: str
    unit: str
    bounds: tuple[float, float] = (0.0, 0.0)
    limits: tuple[float, float] = (
        -math.inf,
        math.inf,
    )  # physically possible values (extrapolation clip)

    def __post_init__(self):
        object.__setattr__(self, "bounds", check_bounds(f"state {self.name!r}", self.bounds))


@dataclass(frozen=True)
class Input:
    """An exogenous input u(t), given on a time grid and interpolated in between.

    `interpolation` is "zoh" (zero-order hold: the value holds until the next grid point, e.g. a
    controller's set-point) or "linear" (e.g. a measured temperature). `bounds` is the range the
    training design excites; `limits` is what is physically possible (a pump voltage cannot go
    below 0), used to clip signals and extrapolation designs. `signal` is the default excitation
    (a dict for `twin_ml.physics.signals.make_signal`).
    """

    name: str
    unit: str
    bounds: tuple[float, float] = (0.0, 1.0)
    interpolation: Interpolation = "linear"
    limits: tuple[float, float] = (-math.inf, math.inf)
    signal: Mapping[str, Any] = field(default_factory=lambda: {"kind": "multisine"})

    def __post_init__(self):
        object.__setattr__(self, "bounds", check_bounds(f"input {self.name!r}", self.bounds))
        if self.interpolation not in ("zoh", "linear"):
            raise ValueError(
                f"input {self.name!r}: interpolation must be 'zoh' or 'linear', "
                f"got {self.interpolation!r}"
            )


@dataclass(frozen=True)
class Output:
    """A measured output y = h(x, u, p)."""

    name: str
    unit: str


@dataclass(frozen=True)
class Parameter:
    """A physical parameter with a nominal value and the box the training design samples."""

    name: str
    unit: str
    nominal: float
    bounds: tuple[float, float]
    limits: tuple[float, float] = (-math.inf, math.inf)

    def __post_init__(self):
        lo, hi = check_bounds(f"parameter {self.name!r}", self.bounds)
        object.__setattr__(self, "bounds", (lo, hi))
        if not lo <= self.nominal <= hi:
            raise ValueError(
                f"parameter {self.name!r}: nominal {self.nominal} is outside bounds ({lo}, {hi})"
            )


@dataclass(frozen=True)
class Regime:
    """A named operating regime: a sub-box of the parameter, input and initial-state bounds.

    Names not given keep the system's full bounds.
    """

    description: str = ""
    parameters: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    inputs: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    states: Mapping[str, tuple[float, float]] = field(default_factory=dict)


class PhysicsSystem:
    """Base class of every physics system; subclass it and declare the class attributes below.

    Subclasses take keyword-only constructor options (e.g. ``CascadedTanks(overflow=False)``);
    they are recorded so a dataset manifest can rebuild the exact system.
    """

    name: ClassVar[str] = ""  # set by @register_system
    states: ClassVar[tuple[State, ...]] = ()
    inputs: ClassVar[tuple[Input, ...]] = ()
    outputs: ClassVar[tuple[Output, ...]] = ()
    parameters: ClassVar[tuple[Parameter, ...]] = ()
    regimes: ClassVar[Mapping[str, Regime]] = {}
    time_unit: ClassVar[str] = "s"
    default_horizon: ClassVar[tuple[float, float]] = (10.0, 0.1)  # (t_end, dt)
    stiffness: ClassVar[Stiffness] = "nonstiff"
    solver: ClassVar[str] = "RK45"
    # States whose magnitude beyond this means the solve diverged.
    divergence_limit: ClassVar[float] = 1e8

    def __new__(cls, *args, **kwargs):
        if args:
            raise TypeError(f"{cls.__name__} takes keyword arguments only, got positional {args!r}")
        obj = super().__new__(cls)
        obj._options = cls._bind_options(kwargs)
        return obj

    @classmethod
    def _bind_options(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """All constructor options with defaults applied and numbers in their default's type,
        so `CascadedTanks()` and `CascadedTanks(h1_max=10)` record (and hash) the same."""
        if cls.__init__ is object.__init__:
            params: dict[str, inspect.Parameter] = {}
            hints: dict[str, Any] = {}
        else:
            params = {
                k: v for k, v in inspect.signature(cls.__init__).parameters.items() if k != "self"
            }
            try:
                hints = typing.get_type_hints(cls.__init__)
            except (
                Exception
            ):  # an annotation that does not evaluate: only float defaults count as floats
                hints = {}
        unknown = set(kwargs) - set(params)
        if unknown:
            raise ValueError(
                f"system {cls.name or cls.__name__!r}: unknown options {sorted(unknown)}; "
                f"its options are {sorted(params) or 'none'}"
            )
        out = {}
        for k, prm in params.items():
            v = kwargs.get(k, prm.default)
            if v is inspect.Parameter.empty:
                raise ValueError(f"system {cls.name or cls.__name__!r}: option {k!r} is required")
            if isinstance(prm.default, bool) and not isinstance(v, bool):
                raise ValueError(f"system option {k!r} must be true or false, got {v!r}")
            if _is_float(prm, hints.get(k)) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if v is None and prm.default is None:
                continue  # an optional feature left off is not recorded: older manifests stay equal
            out[k] = v
        return out

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for group in (cls.states, cls.inputs, cls.outputs, cls.parameters):
            seen = [v.name for v in group]
            dup = {n for n in seen if seen.count(n) > 1}
            if dup:
                raise TypeError(f"{cls.__name__}: duplicate variable names {sorted(dup)}")
        if cls.solver not in SOLVER_METHODS:
            raise TypeError(
                f"{cls.__name__}.solver must be one of {SOLVER_METHODS}, got {cls.solver!r}"
            )
        for rname, regime in cls.regimes.items():
            for kind, decl in (
                ("parameters", cls.parameters),
                ("inputs", cls.inputs),
                ("states", cls.states),
            ):
                box = {v.name: v for v in decl}
                for vname, b in getattr(regime, kind).items():
                    if vname not in box:
                        raise TypeError(
                            f"{cls.__name__}: regime {rname!r} names unknown "
                            f"{kind[:-1]} {vname!r}; "
                            f"known: {sorted(box)}"
                        )
                    lo, hi = check_bounds(
                        f"{cls.__name__}: regime {rname!r} {kind[:-1]} {vname!r}", b
                    )
                    blo, bhi = box[vname].bounds
                    if lo < blo or hi > bhi:
                        raise TypeError(
                            f"{cls.__name__}: regime {rname!r} {kind[:-1]} {vname!r} "
                            f"({lo}, {hi}) is not "
                            f"inside its bounds ({blo}, {bhi})"
                        )

    # ---- the physics -------------------------------------------------------------------------
    def rhs(self, t, x, u, p):
        """dx/dt for states x [..., nx], inputs u [..., nu], parameters p [..., np].

        Write it with `xp = self.xp(x)` so it runs on numpy and torch arrays alike.
        """
        raise NotImplementedError

    @property
    def state_size(self) -> int:
        """The length of the ODE's state vector: its declared states (a field system: every
        cell of every field)."""
        return len(self.states)

    def initial_state(self, x0):
        """The ODE's initial state [..., state_size] from the declared initial state x0
        [..., nx]: the same array here; a field system lifts its few initial conditions (say, a
        uniform temperature) to the whole field."""
        return x0

    def jacobian_sparsity(self):
        """The sparsity pattern of d(rhs)/dx, [nx, nx] (a scipy sparse matrix or a boolean array),
        or None: dense. Spatially resolved systems (stencils) declare it, so BDF and Radau solve
        with sparse LU and difference only the nonzero columns groups: the strong solver."""
        return None

    def observe(self, x, u, p):
        """y = h(x, u, p) [..., ny]. Default: outputs that share a state's name select that
        state."""
        xp = self.xp(x)
        idx = {s.name: i for i, s in enumerate(self.states)}
        missing = [o.name for o in self.outputs if o.name not in idx]
        if missing:
            raise NotImplementedError(
                f"{type(self).__name__}: outputs {missing} are not states; override observe()"
            )
        return xp.stack([x[..., idx[o.name]] for o in self.outputs], axis=-1)

    @staticmethod
    def xp(*arrays):
        """The array namespace (numpy, torch, ...) of the given arrays (one type: its namespace is
        looked up once; the solver's and the hybrid model's hot loops call this every step)."""
        kind = type(arrays[0])
        if kind is np.ndarray:
            return _NP
        if len(arrays) == 1 or all(type(a) is kind for a in arrays[1:]):
            ns = _NAMESPACES.get(kind)
            if ns is None:
                ns = _NAMESPACES[kind] = array_namespace(*arrays)
            return ns
        return array_namespace(*arrays)

    # ---- declarations as arrays --------------------------------------------------------------
    @property
    def options(self) -> dict[str, Any]:
        return dict(self._options)

    @property
    def state_names(self) -> list[str]:
        return [s.name for s in self.states]

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.outputs]

    @property
    def parameter_names(self) -> list[str]:
        return [v.name for v in self.parameters]

    @property
    def nominal_parameters(self) -> np.ndarray:
        """[np] nominal parameter values."""
        return np.array([v.nominal for v in self.parameters], dtype=np.float64)

    def regime(self, name: str | None) -> Regime:
        """The named regime; None means the full bounds."""
        if name is None:
            return Regime("full bounds")
        if name not in self.regimes:
            raise KeyError(
                f"unknown regime {name!r} for system {self.name!r}; known: {sorted(self.regimes)}"
            )
        return self.regimes[name]

    def reference(self) -> dict[str, Any]:
        """How to build this system again: its registered name, its class's import path and its
        constructor options (`twin_ml.physics.system_from_description` reads it)."""
        return {
            "name": self.name,
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "options": self.options,
        }

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: names, units, bounds, regimes, solver hints."""

        def rows(group):
            return [_jsonable(asdict(g)) for g in group]

        return {
            **self.reference(),
            "time_unit": self.time_unit,
            "states": rows(self.states),
            "inputs": rows(self.inputs),
            "outputs": rows(self.outputs),
            "parameters": rows(self.parameters),
            "regimes": {k: _jsonable(asdict(r)) for k, r in self.regimes.items()},
            "stiffness": self.stiffness,
            "solver": self.solver,
            "default_horizon": list(self.default_horizon),
        }

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"{type(self).__name__}({opts})"


def _is_float(prm: inspect.Parameter, hint: Any) -> bool:
    """A float option: a float default, or an optional one annotated `float | None` (or
    `Optional[float]`); `hint` is its evaluated annotation."""
    if isinstance(prm.default, float):
        return True
    kinds = typing.get_args(hint)
    return prm.default is None and float in kinds and int not in kinds


def _jsonable(obj):
    """Make dataclass dicts JSON-safe: tuples -> lists, inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
