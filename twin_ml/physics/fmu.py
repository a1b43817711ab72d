"""Physics from FMUs: a PhysicsSystem whose right-hand side is an FMI 2.0 model-exchange FMU.

The FMU (a zip: modelDescription.xml + a compiled binary per platform) gives the derivatives
(`fmi2GetDerivatives`) for given states, inputs and parameters; FMPy loads it, and the project's
scipy solver (`twin_ml.physics.solver`) integrates them, as it integrates a Python system. The
variables come from the model description: its continuous states (ModelStructure/Derivatives),
its Real inputs, its Real outputs and the parameters you name, with their units, start values
and min/max (the physical limits). A small YAML adds what a scenario design needs and an FMU does
not say: the box initial states, inputs and parameters are sampled from, and named regimes::

    # configs/system/damped_oscillator_fmu.yaml
    _target_: twin_ml.physics.fmu.FMUSystem
    name: damped_oscillator_fmu
    fmu: ${paths.data_dir}/fmu/damped_oscillator.fmu
    parameters: {stiffness: [2.0, 8.0], damping: [0.1, 1.0]}   # the others keep their start
    states: {position: [-1.0, 1.0], velocity: [-1.0, 1.0]}
    inputs: {force: {bounds: [-1.0, 1.0], interpolation: zoh}}
    outputs: [position]

What every dataset, run and model records is `reference()`: the class path and the options
above, with the FMU's absolute path and its sha256. Rebuilding the system (a data generation
worker, twin-train, twin-export, the server's /calibrate, twin-calibrate) reads the file again and
refuses it when its sha256 differs. The FMU instances live in the process that evaluates them and
are never pickled: a system pickles as its options.

What an FMU cannot do here: the hybrid models (a physics term inside a torch model) need a Python
right-hand side written against an array namespace; an FMU's runs on numpy arrays only, and asking
for one in torch says so. Outputs the FMU computes (not states) are evaluated by the FMU for the
datasets; a neural ODE observes states only, so pick outputs that are states (`outputs:`) or train
an emulator. FMUs whose results would be silently wrong here are refused with an error that says
so: event indicators (state events), a time event scheduled at initialization (found when an
instance is first initialized), Real variables of variability "discrete" (they change at events
only), and `completedIntegratorStepNotNeeded` not "true" (fmi2CompletedIntegratorStep is never
called); so are co-simulation-only FMUs and FMI 1.0 and 3.0 FMUs.

Each process extracts an FMU once into a cache folder shared by all processes and runs,
tempfile.gettempdir()/twin-ml-fmu-cache-<uid>/<sha256> (extracted under a temporary name and
renamed into place, so concurrent processes are safe): one folder per distinct FMU, never one per
run or worker; delete the folder to reclaim the space.

Build the example FMU (C source in twin_ml/physics/fmus/damped_oscillator/) with the machine's C
compiler against the FMI headers FMPy ships::

    python -m twin_ml.physics.fmu_build twin_ml/physics/fmus/damped_oscillator \\
        data/fmu/damped_oscillator.fmu
"""

from __future__ import annotations

import atexit
import io
import math
import os
import shutil
import stat
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from twin_ml._io import sha256_bytes
from twin_ml.physics.system import (
    SOLVER_METHODS,
    Input,
    Output,
    Parameter,
    PhysicsSystem,
    Regime,
    State,
)

SUPPORTED_FMI = ("2.0",)
STIFFNESS = ("nonstiff", "moderate", "stiff")
# initialized FMU instances kept per FMU and process, one per parameter vector (LRU): at least
# POOL_SIZE, grown to the distinct parameter vectors of the largest batch evaluated, at most
# POOL_CAP (beyond it a batch still initializes each vector once, but a next batch re-initializes)
POOL_SIZE = 32
POOL_CAP = 1024


class FMUError(ValueError):
    """An FMU that cannot be run here, or a YAML that does not fit the FMU."""


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FMUError(
            f"fmu: no file {str(path)!r}; build the example with `python -m "
            "twin_ml.physics.fmu_build <source dir> <out.fmu>`, or give the path of your own .fmu"
        ) from None
    except OSError as e:
        raise FMUError(f"fmu: cannot read {str(path)!r} ({e.strerror or e})") from None


def model_description(data: bytes, where: str):
    """The parsed model description of the FMU bytes `data` (FMPy's, validated)."""
    import xml.etree.ElementTree as ET

    from fmpy import read_model_description

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            xml = zf.read("modelDescription.xml")
    except zipfile.BadZipFile:
        raise FMUError(f"fmu: {where} is not an FMU (not a zip file)") from None
    except KeyError:
        raise FMUError(f"fmu: {where} is not an FMU (no modelDescription.xml inside)") from None
    try:  # the version first: another version's description fails FMI 2.0's schema
        version = ET.fromstring(xml).get("fmiVersion")
    except ET.ParseError as e:
        raise FMUError(f"fmu: {where}: modelDescription.xml is not XML ({e})") from None
    if version not in SUPPORTED_FMI:
        raise FMUError(
            f"fmu: {where} is an FMI {version} FMU; FMUSystem runs FMI "
            f"{', '.join(SUPPORTED_FMI)} model-exchange FMUs (export it as FMI 2.0 model exchange)"
        )
    try:
        return read_model_description(io.BytesIO(data))
    except Exception as e:  # FMPy's schema validation and parse errors: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FMUError(f"fmu: {where}: invalid modelDescription.xml ({first})") from None


def binary_name(md) -> str:
    """The shared library FMPy loads for this platform, as a path inside the FMU."""
    import fmpy

    ident = md.modelExchange.modelIdentifier
    folder = fmpy.platform if md.fmiVersion.startswith("2.") else fmpy.platform_tuple
    return f"binaries/{folder}/{ident}{fmpy.sharedLibraryExtension}"


def _check_runnable(md, data: bytes, where: str) -> None:
    """Refuse an FMU this system cannot run, saying why and what would work."""
    import fmpy

    if md.modelExchange is None:
        raise FMUError(
            f"fmu: {where} has no model-exchange interface (co-simulation only); FMUSystem "
            "integrates the FMU's derivatives with scipy, so it needs model exchange (export the "
            "model with the model-exchange interface)"
        )
    if md.numberOfEventIndicators:
        raise FMUError(
            f"fmu: {where} declares {md.numberOfEventIndicators} event indicators; FMUSystem "
            "integrates continuous dynamics only and does not locate state events"
        )
    # FMPy reads FMI 2.0's completedIntegratorStepNotNeeded (default false) as its negation
    if md.modelExchange.needsCompletedIntegratorStep:
        raise FMUError(
            f"fmu: {where} needs fmi2CompletedIntegratorStep after every integrator step "
            '(completedIntegratorStepNotNeeded is not "true"); FMUSystem integrates the '
            "derivatives with scipy and never calls it, so the results could be wrong (export "
            "the model without step-completion actions)"
        )
    discrete = [
        v.name
        for v in md.modelVariables
        if v.type in ("Real", "Float64") and v.variability == "discrete"
    ]
    if discrete:
        shown = ", ".join(discrete[:5]) + (f" (+{len(discrete) - 5})" if len(discrete) > 5 else "")
        raise FMUError(
            f'fmu: {where} has Real variables of variability "discrete" ({shown}); they change '
            "at events only, which FMUSystem does not handle: their values would be wrong"
        )
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
    binary = binary_name(md)
    if binary not in names:
        have = sorted(
            {n.split("/")[1] for n in names if n.startswith("binaries/") and "/" in n[9:]}
        )
        raise FMUError(
            f"fmu: {where} has no binary for this platform ({binary} is missing; binaries for: "
            f"{', '.join(have) or 'none'}); compile its sources for {fmpy.platform} first "
            "(`python -m twin_ml.physics.fmu_build` for a source folder)"
        )


def _number(v) -> float | None:
    return None if v is None else float(v)


def _unit(v) -> str:
    if v.unit:
        return v.unit
    dt = v.declaredType
    return (getattr(dt, "unit", None) or "") if dt is not None else ""


def _limits(v) -> tuple[float, float]:
    lo, hi = _number(v.min), _number(v.max)
    return (-math.inf if lo is None else lo, math.inf if hi is None else hi)


def _pair(field: str, value: Any) -> list[float]:
    """[low, high] from a YAML pair, checked (the field named in the error)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise FMUError(f"{field}: expected a pair [low, high] of numbers, got {value!r}")
    try:
        lo, hi = (float(b) for b in value)
    except (TypeError, ValueError):
        raise FMUError(f"{field}: expected a pair [low, high] of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise FMUError(f"{field}: expected finite [low, high] with low <= high, got {value!r}")
    return [lo, hi]


def _entry(field: str, value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """A YAML entry for one variable, canonical: `[lo, hi]` or a mapping with `bounds` and the
    optional `keys`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        return {"bounds": _pair(f"{field}.bounds", value)}
    unknown = set(value) - {"bounds", *keys}
    if unknown:
        raise FMUError(f"{field}: unknown keys {sorted(unknown)}; allowed: {['bounds', *keys]}")
    out: dict[str, Any] = {}
    if value.get("bounds") is not None:
        out["bounds"] = _pair(f"{field}.bounds", value["bounds"])
    for k in keys:
        v = value.get(k)
        if v is None:
            continue
        if k == "limits":
            out[k] = _pair(f"{field}.{k}", v)
        elif k == "nominal":
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                raise FMUError(f"{field}.nominal: expected a number, got {v!r}") from None
        elif k == "signal":
            if not isinstance(v, Mapping):
                raise FMUError(f"{field}.signal: expected a mapping (kind: ...), got {v!r}")
            out[k] = dict(v)
        else:
            out[k] = v
    return out


def _lookup(field: str, given: Mapping[str, Any] | None, known: Sequence[str], kind: str) -> None:
    unknown = [n for n in (given or {}) if n not in known]
    if unknown:
        raise FMUError(
            f"{field}.{unknown[0]}: the FMU has no {kind} {unknown[0]!r}; its {kind}s: "
            f"{', '.join(known) or 'none'}"
        )


class FMUSystem(PhysicsSystem):
    """A PhysicsSystem whose right-hand side and outputs are an FMI 2.0 model-exchange FMU's.

    fmu: path of the .fmu (recorded absolute). sha256: its expected hash (recorded by the first
    build; a rebuild refuses a file that changed). name: the system's name (default: the FMU's
    modelName). parameters: the FMU parameters the system exposes, by name, each `[low, high]`
    (the design's box) or `{bounds, nominal, limits}`; nominal defaults to the FMU's start value,
    limits to its min/max; the FMU's other parameters keep their start values. states: the
    initial-state box per continuous state (default: the start value). inputs: per Real input
    `[low, high]` or `{bounds, interpolation, limits, signal}` (default: its start value,
    linear). outputs: the Real outputs to keep (default: all). regimes: named sub-boxes,
    `{name: {description, parameters, inputs, states}}`. default_horizon: `[t_end, dt]`
    (default: the FMU's DefaultExperiment). solver, stiffness: the scipy method and the hint.

    Evaluation: each parameter vector runs in its own initialized FMU instance (a "fixed"
    parameter can only be set before initialization), kept per process in a pool that grows to
    the distinct parameter vectors of the largest batch evaluated (a stacked solve's scenarios,
    calibration's MCMC walkers), at most POOL_CAP (1024) instances (a module constant: lower it
    for an FMU whose instances take much memory). A batch evaluates its rows grouped by
    parameter vector, so beyond the cap each vector is still initialized once per
    right-hand-side call, but every call then resets and re-initializes instances: correct,
    much slower. An FMU that can be instantiated only once per process keeps one instance:
    batches with several parameter vectors re-initialize it on every call.

    >>> FMUSystem(fmu="data/fmu/damped_oscillator.fmu")  # doctest: +SKIP
    """

    name = "fmu"  # an instance's own name replaces it

    def __init__(
        self,
        *,
        fmu: str,
        name: str | None = None,
        sha256: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        states: Mapping[str, Any] | None = None,
        inputs: Mapping[str, Any] | None = None,
        outputs: Sequence[str] | None = None,
        regimes: Mapping[str, Any] | None = None,
        default_horizon: Sequence[float] | None = None,
        solver: str = "RK45",
        stiffness: str = "nonstiff",
    ):
        path = Path(os.path.expanduser(str(fmu))).resolve()
        data = _read(path)
        digest = sha256_bytes(data)
        if sha256 is not None and sha256 != digest:
            raise FMUError(
                f"fmu: {str(path)!r} has sha256 {digest}, but this system was recorded with "
                f"{sha256}: the FMU changed since; rebuild the dataset and model from it, or "
                "restore the recorded file"
            )
        where = repr(str(path))
        md = model_description(data, where)
        _check_runnable(md, data, where)
        from twin_ml.physics.catalog import list_systems

        self.name = str(name or md.modelName)
        if self.name in list_systems():
            raise FMUError(
                f"name: {self.name!r} is a registered system's name; give the FMU system another"
            )
        if solver not in SOLVER_METHODS:
            raise FMUError(f"solver: must be one of {SOLVER_METHODS}, got {solver!r}")
        if stiffness not in STIFFNESS:
            raise FMUError(f"stiffness: must be one of {STIFFNESS}, got {stiffness!r}")
        self.solver, self.stiffness = solver, stiffness
        self._md, self._data, self._sha256 = md, data, digest
        reals = [v for v in md.modelVariables if v.type in ("Real", "Float64")]

        # states: in the order of ModelStructure/Derivatives (the order of the state vector)
        state_vars = [d.variable.derivative for d in md.derivatives]
        opts: dict[str, Any] = {}
        opts["states"] = {k: _entry(f"states.{k}", v, ()) for k, v in dict(states or {}).items()}
        _lookup("states", opts["states"], [v.name for v in state_vars], "continuous state")
        self.states = tuple(
            State(
                v.name,
                _unit(v),
                bounds=tuple(
                    opts["states"].get(v.name, {}).get("bounds")
                    or self._start_box(f"states.{v.name}", v)
                ),
                limits=_limits(v),
            )
            for v in state_vars
        )

        # inputs: every Real input (the FMU needs a value for each)
        input_vars = [v for v in reals if v.causality == "input"]
        other = [
            v.name for v in md.modelVariables if v.causality == "input" and v not in input_vars
        ]
        if other:
            raise FMUError(
                f"fmu: {where} has non-Real inputs {other}; FMUSystem drives Real inputs only"
            )
        keys = ("interpolation", "limits", "signal")
        opts["inputs"] = {k: _entry(f"inputs.{k}", v, keys) for k, v in dict(inputs or {}).items()}
        _lookup("inputs", opts["inputs"], [v.name for v in input_vars], "input")
        self.inputs = tuple(self._input(v, opts["inputs"].get(v.name, {})) for v in input_vars)

        # parameters: the ones named
        param_vars = {v.name: v for v in reals if v.causality == "parameter"}
        opts["parameters"] = {
            k: _entry(f"parameters.{k}", v, ("nominal", "limits"))
            for k, v in dict(parameters or {}).items()
        }
        _lookup("parameters", opts["parameters"], sorted(param_vars), "parameter")
        # in the FMU's order, not the YAML's: a mapping's order does not survive the JSON of the
        # records (sorted keys), and the parameter vector's order must
        self.parameters = tuple(
            self._parameter(v, opts["parameters"][k])
            for k, v in param_vars.items()
            if k in opts["parameters"]
        )

        # outputs: the Real outputs (ModelStructure order), or the ones named
        output_vars = [u.variable for u in md.outputs if u.variable in reals] or [
            v for v in reals if v.causality == "output"
        ]
        if outputs is not None:
            if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence):
                raise FMUError(f"outputs: expected a list of output names, got {outputs!r}")
            opts["outputs"] = [str(o) for o in outputs]
            _lookup(
                "outputs", dict.fromkeys(opts["outputs"]), [v.name for v in output_vars], "output"
            )
            named = {v.name: v for v in output_vars}
            output_vars = [named[o] for o in opts["outputs"]]
        if not output_vars:
            raise FMUError(f"fmu: {where} has no Real outputs; a surrogate needs at least one")
        self.outputs = tuple(Output(v.name, _unit(v)) for v in output_vars)

        opts["regimes"] = {str(k): self._regime(k, r) for k, r in dict(regimes or {}).items()}
        self.regimes = {k: Regime(**r) for k, r in opts["regimes"].items()}
        self._validate_declarations()
        if default_horizon is not None:
            try:
                t_end, dt = (float(v) for v in default_horizon)
            except (TypeError, ValueError):
                t_end = dt = math.nan
            if not 0 < dt <= t_end < math.inf:
                raise FMUError(
                    "default_horizon: expected [t_end, dt] with 0 < dt <= t_end, "
                    f"got {default_horizon!r}"
                )
            opts["default_horizon"] = [t_end, dt]
            self.default_horizon = (t_end, dt)
        else:
            ex = md.defaultExperiment
            stop = _number(ex.stopTime) if ex is not None else None
            step = _number(ex.stepSize) if ex is not None else None
            start = (_number(ex.startTime) or 0.0) if ex is not None else 0.0
            if stop is not None and step is not None and 0 < step <= stop - start:
                self.default_horizon = (stop - start, step)

        # evaluation: value references of what rhs and observe set and get
        state_vr = [v.valueReference for v in state_vars]
        self._vr = {
            "states": state_vr,
            "inputs": [v.valueReference for v in input_vars],
            "parameters": [param_vars[p.name].valueReference for p in self.parameters],
            "outputs": [v.valueReference for v in output_vars],
        }
        # an output that is a state (the same variable, or an FMI 2.0 alias: the same value
        # reference) is selected from the state vector: numpy and torch alike
        self._output_state = [
            state_vr.index(v.valueReference) if v.valueReference in state_vr else None
            for v in output_vars
        ]
        # the options as recorded: canonical, so a rebuild from JSON records the same
        self._options = {
            "fmu": str(path),
            "sha256": digest,
            "name": self.name,
            **{k: v for k, v in opts.items() if v},
            "solver": solver,
            "stiffness": stiffness,
        }

    # ---- declarations ------------------------------------------------------------------------
    @staticmethod
    def _start_box(field: str, v) -> tuple[float, float]:
        start = _number(v.start)
        if start is None:
            raise FMUError(f"{field}: the FMU gives no start value; give its bounds [low, high]")
        return (start, start)

    def _input(self, v, e: Mapping[str, Any]) -> Input:
        limits = tuple(e.get("limits") or _limits(v))
        kw: dict[str, Any] = {}
        if "signal" in e:
            kw["signal"] = e["signal"]
        try:
            return Input(
                v.name,
                _unit(v),
                bounds=tuple(e.get("bounds") or self._start_box(f"inputs.{v.name}", v)),
                interpolation=e.get("interpolation", "linear"),
                limits=limits,
                **kw,
            )
        except ValueError as err:
            raise FMUError(f"inputs.{v.name}: {err}") from None

    def _parameter(self, v, e: Mapping[str, Any]) -> Parameter:
        nominal = e.get("nominal", _number(v.start))
        if nominal is None:
            raise FMUError(f"parameters.{v.name}: the FMU gives no start value; give its nominal")
        if "bounds" not in e:
            raise FMUError(f"parameters.{v.name}: give its bounds [low, high]")
        try:
            return Parameter(
                v.name,
                _unit(v),
                nominal=nominal,
                bounds=tuple(e["bounds"]),
                limits=tuple(e.get("limits") or _limits(v)),
            )
        except ValueError as err:
            raise FMUError(f"parameters.{v.name}: {err}") from None

    @staticmethod
    def _regime(name: str, r: Any) -> dict[str, Any]:
        if not isinstance(r, Mapping):
            raise FMUError(f"regimes.{name}: expected a mapping (description, parameters, ...)")
        unknown = set(r) - {"description", "parameters", "inputs", "states"}
        if unknown:
            raise FMUError(
                f"regimes.{name}: unknown keys {sorted(unknown)}; allowed: description, "
                "parameters, inputs, states"
            )
        out: dict[str, Any] = {"description": str(r.get("description") or "")}
        for kind in ("parameters", "inputs", "states"):
            box = r.get(kind) or {}
            if not isinstance(box, Mapping):
                raise FMUError(f"regimes.{name}.{kind}: expected {{name: [low, high]}}")
            out[kind] = {k: _pair(f"regimes.{name}.{kind}.{k}", b) for k, b in box.items()}
        return out

    def _validate_declarations(self) -> None:
        """The checks PhysicsSystem makes of a subclass's declarations (unique names, regimes
        inside the bounds), made of this instance's: through a throwaway subclass, so the rules
        stay in one place."""
        attrs = {
            "states": self.states,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "parameters": self.parameters,
            "regimes": self.regimes,
            "solver": self.solver,
        }
        try:
            type(f"FMUSystem[{self.name}]", (PhysicsSystem,), attrs)
        except TypeError as e:
            raise FMUError(str(e)) from None

    @property
    def fmu_sha256(self) -> str:
        return self._sha256

    # ---- the physics -------------------------------------------------------------------------
    def rhs(self, t, x, u, p):
        """dx/dt [..., nx] from the FMU (numpy arrays only; the batch is evaluated point by
        point, grouped by parameter vector, each in an FMU instance initialized with it)."""
        self._numpy_only("right-hand side", x, u, p)
        x, u, p = (np.asarray(a, dtype=np.float64) for a in (x, u, p))
        shape = np.broadcast_shapes(x.shape[:-1], u.shape[:-1], p.shape[:-1])
        xs, us, ps = (_rows(a, shape) for a in (x, u, p))
        out = np.empty((xs.shape[0], len(self.states)))
        if len(out):
            tt = 0.0 if t is None else float(t)
            _engine(self).evaluate("derivatives", self._vr, tt, xs, us, ps, out)
        return out.reshape(*shape, len(self.states))

    def observe(self, x, u, p):
        """y [..., ny]: outputs that are states are selected from x; the others are the FMU's
        (numpy arrays only)."""
        if all(i is not None for i in self._output_state):
            xp = self.xp(x)
            return xp.stack([x[..., i] for i in self._output_state], axis=-1)
        computed = [o.name for o, i in zip(self.outputs, self._output_state) if i is None]
        self._numpy_only(f"outputs {computed} (computed by the FMU, not states)", x, u, p)
        x, u, p = (np.asarray(a, dtype=np.float64) for a in (x, u, p))
        shape = np.broadcast_shapes(x.shape[:-1], u.shape[:-1], p.shape[:-1])
        xs, us, ps = (_rows(a, shape) for a in (x, u, p))
        out = np.empty((xs.shape[0], len(self.outputs)))
        if len(out):
            _engine(self).evaluate("outputs", self._vr, None, xs, us, ps, out)
        return out.reshape(*shape, len(self.outputs))

    def _numpy_only(self, what: str, *arrays) -> None:
        bad = next((a for a in arrays if not isinstance(a, (np.ndarray, float, int))), None)
        if bad is None:
            return
        raise FMUError(
            f"system {self.name!r} is an FMU: its {what} runs on numpy arrays only, got "
            f"{type(bad).__module__}.{type(bad).__name__}. The hybrid models (model=hybrid, "
            "model=flowmap_hybrid) need a Python right-hand side written against an array "
            "namespace (a PhysicsSystem subclass); on an FMU system use model=node (outputs that "
            "are states) or model=emulator"
        )

    def __reduce__(self):
        # FMU instances are never pickled: a worker process rebuilds the system from its options
        # (reading the file again, sha256 verified) and loads the FMU when it first evaluates it
        return (_rebuild, (type(self), self.options))


def _rebuild(cls, options):
    return cls(**options)


def _rows(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """a [..., k] broadcast to [*shape, k] and flattened to [n, k]."""
    return np.broadcast_to(a, (*shape, a.shape[-1])).reshape(-1, a.shape[-1])


# ---- evaluation: FMPy's FMU2Model, per process, per FMU ----------------------------------------
_ENGINES: dict[tuple[str, int], _Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _engine(system: FMUSystem) -> _Engine:
    """The evaluator of `system`'s FMU in this process (created on first use: a forked or
    spawned worker makes its own)."""
    key = (system.fmu_sha256, os.getpid())
    with _ENGINES_LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            where = repr(system.options["fmu"])
            eng = _ENGINES[key] = _Engine(system._md, system._data, system.fmu_sha256, where)
        return eng


def _cache_root() -> Path:
    """The folder FMUs are extracted into: tempfile.gettempdir()/twin-ml-fmu-cache-<uid>, one
    subfolder per FMU sha256, shared by this user's processes and runs. Private (0700): the
    binaries in it are loaded and run, so a folder another user owns or can write to is
    refused."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    root = Path(tempfile.gettempdir()) / f"twin-ml-fmu-cache-{'' if uid is None else uid}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        st = root.lstat()
    except OSError as e:
        raise FMUError(f"fmu: cannot create the extraction folder {str(root)!r} ({e})") from None
    if uid is not None and (not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022):
        raise FMUError(
            f"fmu: the extraction folder {str(root)!r} is not this user's private folder (a "
            "link, another user's, or writable by others); remove it, or set TMPDIR elsewhere"
        )
    return root


def _intact(folder: Path, data: bytes, binary: str) -> bool:
    """Whether `folder` holds the FMU's files: every member at its size, the binary byte for
    byte (a temporary-files cleaner may have removed files since)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            f = folder / info.filename
            try:
                if f.stat().st_size != info.file_size:
                    return False
                if info.filename == binary and f.read_bytes() != zf.read(info):
                    return False
            except OSError:
                return False
    return True


def _extracted(data: bytes, digest: str, binary: str) -> Path:
    """The FMU extracted once per sha256 into the shared cache folder and reused by every
    process and run (nothing accumulates: worker processes end without cleanup). Extracted to a
    temporary name and renamed into place, so a reader never sees a partial folder; when two
    processes race, the second rename fails and that process uses the first's folder. A folder
    found damaged is moved aside, removed and extracted again."""
    root = _cache_root()
    final = root / digest
    for _ in range(3):
        if final.is_dir():
            if _intact(final, data, binary):
                return final
            stale = Path(tempfile.mkdtemp(prefix=f".stale-{digest[:16]}-", dir=root))
            try:
                os.rename(final, stale / "fmu")  # atomic: a racing process finds it gone
            except OSError:
                pass  # another process moved it first
            shutil.rmtree(stale, ignore_errors=True)
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=root))
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                zf.extractall(tmp)  # zipfile drops absolute and ".." parts of member names
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # not a lost race: a real failure
                    raise
        except OSError as e:
            raise FMUError(f"fmu: cannot extract the FMU into {str(final)!r} ({e})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename
    raise FMUError(f"fmu: the extracted copy in {str(final)!r} keeps changing; remove it")


FATAL = 4  # fmi2Fatal: no further call to any instance is allowed


def _free(fmu, error: BaseException | None = None) -> None:
    """Free an instance (guarded: a failing free must not hide the error being raised). After
    fmi2Fatal the standard forbids every call: the instance is dropped only."""
    if getattr(error, "status", None) == FATAL:
        return
    try:
        fmu.freeInstance()  # fmi2FreeInstance, then unload the library
    except Exception:
        try:
            fmu.freeLibrary()
        except Exception:
            pass


class _Engine:
    """An FMU extracted (once per sha256, in a cache folder shared by processes and runs, see
    `_extracted`), and its initialized instances, one per parameter vector, least recently used
    first out. A parameter of variability "fixed" can only be set before initialization, so a new
    parameter vector gets an instance reset and initialized with it. The pool grows to the
    number of distinct parameter vectors of the largest batch seen (calibration's walkers, a
    stacked solve's scenarios), up to POOL_CAP; a batch evaluates its rows grouped by parameter
    vector, so each vector is initialized at most once per batch even beyond the cap. An
    instance whose call failed is freed and dropped (FMI 2.0 allows only reset or free after
    fmi2Error). Calls are serialized (one FMU instance is not thread-safe)."""

    def __init__(self, md, data: bytes, digest: str, where: str):
        self.md, self.where = md, where
        self.pid = os.getpid()
        self.dir = str(_extracted(data, digest, binary_name(md)))
        once = md.modelExchange.canBeInstantiatedOnlyOncePerProcess
        self.cap = 1 if once else POOL_CAP
        self.pool_size = min(POOL_SIZE, self.cap)
        self.instances: OrderedDict[bytes, Any] = OrderedDict()
        self.lock = threading.Lock()
        self.serial = 0
        atexit.register(self.close)

    def close(self) -> None:
        """Free the instances (the extracted folder stays: it is shared)."""
        if os.getpid() != self.pid:
            return  # a forked child's copy: the instances are its parent's
        with self.lock:
            while self.instances:
                _free(self.instances.popitem()[1])

    def _instance(self, key: bytes, vr: dict[str, list[int]], p: np.ndarray):
        fmu = self.instances.get(key)
        if fmu is not None:
            self.instances.move_to_end(key)
            return fmu
        from fmpy.fmi2 import FMU2Model

        fmu = None
        try:
            if len(self.instances) >= self.pool_size:
                _, fmu = self.instances.popitem(last=False)
                fmu.reset()
            else:
                self.serial += 1
                fmu = FMU2Model(
                    guid=self.md.guid,
                    unzipDirectory=self.dir,
                    modelIdentifier=self.md.modelExchange.modelIdentifier,
                    instanceName=f"twin_ml_{self.serial}",
                )
                fmu.instantiate()
            fmu.setupExperiment(startTime=0.0)
            if vr["parameters"]:
                fmu.setReal(vr["parameters"], p.tolist())
            fmu.enterInitializationMode()
            fmu.exitInitializationMode()
            for _ in range(100):  # event iteration at initialization (none for a plain ODE)
                needed, terminate, _, _, timed, when = fmu.newDiscreteStates()
                if terminate:
                    raise RuntimeError("the FMU asked to terminate at initialization")
                if not needed:
                    break
            else:
                raise RuntimeError("the event iteration at initialization did not converge")
            if timed:
                raise FMUError(
                    f"fmu: {self.where} schedules a time event (at t={when:.6g}, "
                    "nextEventTimeDefined at initialization); FMUSystem integrates continuous "
                    "dynamics only and does not handle time events: the results after it "
                    "would be wrong"
                )
            fmu.enterContinuousTimeMode()
        except BaseException as e:
            if fmu is not None:
                _free(fmu, e)
            raise
        self.instances[key] = fmu
        return fmu

    def evaluate(self, what: str, vr, t: float | None, xs, us, ps, out: np.ndarray) -> None:
        """Per row i: the derivatives (what="derivatives") or the outputs (what="outputs") at
        state xs[i], input us[i], parameters ps[i], into out[i]; rows grouped by parameter
        vector. An FMU's refusal (FMUError) ends the call; its failure is an ArithmeticError
        (see `_call_failed`)."""
        groups: dict[bytes, list[int]] = {}
        for i, row in enumerate(ps):
            groups.setdefault(row.tobytes(), []).append(i)
        prefix = np.asarray(vr["parameters"], dtype=np.int64).tobytes()
        refs = _vrs(vr["inputs"]) if us.shape[-1] else None
        get = _vrs(vr["outputs"])
        with self.lock:
            self.pool_size = min(self.cap, max(self.pool_size, len(groups)))
            for rows in groups.values():
                key = prefix + ps[rows[0]].tobytes()
                fmu = None
                try:
                    fmu = self._instance(key, vr, ps[rows[0]])
                    c = fmu.component
                    if t is not None:
                        fmu.fmi2SetTime(c, t)
                    for i in rows:
                        x, u, y = xs[i], us[i], out[i]
                        if refs is not None:
                            fmu.fmi2SetReal(c, refs, len(u), _ptr(u))
                        fmu.fmi2SetContinuousStates(c, _ptr(x), len(x))
                        if what == "derivatives":
                            fmu.fmi2GetDerivatives(c, _ptr(y), len(y))
                        else:
                            fmu.fmi2GetReal(c, get, len(y), _ptr(y))
                except FMUError:
                    raise
                except Exception as e:
                    if fmu is not None and self.instances.get(key) is fmu:
                        del self.instances[key]
                        _free(fmu, e)
                    raise _call_failed(e, t) from None


_VRS: dict[tuple[int, ...], Any] = {}


def _vrs(refs: list[int]):
    """A ctypes array of value references (made once per list)."""
    key = tuple(refs)
    arr = _VRS.get(key)
    if arr is None:
        from ctypes import c_uint

        arr = _VRS[key] = (c_uint * len(refs))(*refs)
    return arr


def _ptr(a: np.ndarray):
    from ctypes import POINTER, c_double

    return np.ascontiguousarray(a, dtype=np.float64).ctypes.data_as(POINTER(c_double))


def _call_failed(e: Exception, t: float | None) -> Exception:
    """An FMU call's failure as an ArithmeticError: the solver records it for the scenario (a
    failed solve, with this reason) instead of ending the batch."""
    at = "" if t is None else f" at t={t:.6g}"
    return FloatingPointError(f"the FMU failed{at}: {type(e).__name__}: {e}")
