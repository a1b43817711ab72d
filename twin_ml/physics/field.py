"""Spatially resolved systems (method of lines): fields on a `Grid`, probes as outputs.

A `FieldSystem` is a `PhysicsSystem` whose ODE state is every cell of every declared field,
while everything the rest of twin-ml sees stays small:

- `states` declares the *initial conditions* a scenario samples and a request gives (say, the
  plate's uniform initial temperature); `initial_state` lifts them to the whole field;
- `outputs` are made from `probes` (a field's value at a named sensor position, bilinear between
  cell centres) and `derived` outputs (a field's maximum, minimum or mean);
- the right-hand side is written once against the array namespace over the flat state
  [..., n_fields * cells], fields one after another, each row-major (y, then x) on the grid.

The grid is the constructor option `shape` (default: the class's `default_shape`), so a dataset
or model card rebuilds the same discretization::

    @register_system("rod")
    class Rod(FieldSystem):
        fields = (Field("T", "degC", bounds=(0, 100)),)
        states = (State("T0", "degC", bounds=(20, 40)),)
        probes = (Probe("tc_mid", "T", (0.5,)),)
        derived = (Derived("T_max", "T", "max"),)
        extent, default_shape = (1.0,), (32,)

        def initial_state(self, x0):
            return self.uniform(x0[..., 0:1])

        def rhs(self, t, x, u, p):
            return p[..., 0:1] * self.grid.laplacian(x)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from twin_ml.physics.grid import Grid
from twin_ml.physics.system import Output, PhysicsSystem, check_bounds

Reduction = Literal["max", "min", "mean"]


@dataclass(frozen=True)
class Field:
    """A field: `bounds` is the range its values are expected in (plots, normalization);
    `limits` is what is physically possible."""

    name: str
    unit: str
    bounds: tuple[float, float] = (0.0, 1.0)
    limits: tuple[float, float] = (-math.inf, math.inf)

    def __post_init__(self):
        object.__setattr__(self, "bounds", check_bounds(f"field {self.name!r}", self.bounds))


@dataclass(frozen=True)
class Probe:
    """A point sensor (a thermocouple): the field's value at `position` ((y, x) in 2D, in the
    grid's length unit), interpolated between cell centres."""

    name: str
    field: str
    position: tuple[float, ...]


@dataclass(frozen=True)
class Derived:
    """An output reduced over the whole field: its "max", "min" or "mean"."""

    name: str
    field: str
    reduce: Reduction = "max"

    def __post_init__(self):
        if self.reduce not in ("max", "min", "mean"):
            raise ValueError(
                f"derived output {self.name!r}: reduce must be 'max', 'min' or 'mean', "
                f"got {self.reduce!r}"
            )


class FieldSystem(PhysicsSystem):
    """Base class of spatially resolved systems; declare `fields`, `probes`, `derived`,
    `extent`, `default_shape` and the initial conditions in `states`, and write `rhs` and
    `initial_state`."""

    fields: ClassVar[tuple[Field, ...]] = ()
    probes: ClassVar[tuple[Probe, ...]] = ()
    derived: ClassVar[tuple[Derived, ...]] = ()
    extent: ClassVar[tuple[float, ...]] = (1.0,)
    default_shape: ClassVar[tuple[int, ...]] = (32,)
    length_unit: ClassVar[str] = "m"
    # the snapshot stride a dataset keeps the fields at unless told otherwise (probes: every step)
    snapshot_stride: ClassVar[int] = 10
    # True: the right-hand side is affine in (x, u) for fixed parameters (linear conduction with
    # sources and convective faces); Galerkin reduced models then precompute their r x r
    # operators once per scenario (checked numerically when such a model is built)
    affine: ClassVar[bool] = False
    stiffness = "stiff"
    solver = "BDF"

    def __init_subclass__(cls, **kwargs):
        names = [f.name for f in cls.fields]
        for o in (*cls.probes, *cls.derived):
            if o.field not in names:
                raise TypeError(
                    f"{cls.__name__}: output {o.name!r} reads unknown field {o.field!r}; "
                    f"fields: {names}"
                )
        unit = {f.name: f.unit for f in cls.fields}
        cls.outputs = tuple(Output(o.name, unit[o.field]) for o in (*cls.probes, *cls.derived))
        super().__init_subclass__(**kwargs)

    def __init__(self, *, shape: list[int] | None = None):
        shape = tuple(self.default_shape if shape is None else shape)
        try:
            self.grid = Grid(shape, tuple(self.extent))
        except ValueError as e:
            raise ValueError(
                f"system {self.name or type(self).__name__!r} option shape: {e}"
            ) from None
        self._probe_terms = [self._bilinear(pr) for pr in self.probes]

    # ---- declarations --------------------------------------------------------------------------
    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def state_size(self) -> int:
        return len(self.fields) * self.grid.cells

    def field(self, x, name: str):
        """The cells of field `name` [..., cells] from the state x [..., state_size]."""
        if name not in self.field_names:
            raise KeyError(f"unknown field {name!r}; fields: {self.field_names}")
        k, n = self.field_names.index(name), self.grid.cells
        return x[..., k * n : (k + 1) * n]

    def uniform(self, values):
        """The state [..., state_size] with each field uniform at values [..., n_fields]."""
        xp = self.xp(values)
        n = self.grid.cells
        return xp.concat(
            [
                xp.broadcast_to(values[..., k : k + 1], (*values.shape[:-1], n))
                for k in range(len(self.fields))
            ],
            axis=-1,
        )

    def jacobian_sparsity(self):
        """Every field couples to its stencil neighbours and to every field in the same cell."""
        from scipy.sparse import csc_matrix, kron

        nf = len(self.fields)
        return kron(
            np.ones((nf, nf), dtype=bool), csc_matrix(self.grid.laplacian_pattern()), format="csc"
        ).astype(bool)

    def describe(self):
        d = super().describe()
        d["grid"] = {
            "shape": list(self.grid.shape),
            "extent": list(self.grid.extent),
            "length_unit": self.length_unit,
        }
        d["fields"] = [
            {"name": f.name, "unit": f.unit, "bounds": list(f.bounds)} for f in self.fields
        ]
        d["probes"] = [
            {"name": pr.name, "field": pr.field, "position": list(pr.position)}
            for pr in self.probes
        ]
        d["derived"] = [
            {"name": o.name, "field": o.field, "reduce": o.reduce} for o in self.derived
        ]
        d["snapshot_stride"] = self.snapshot_stride
        return d

    # ---- outputs -------------------------------------------------------------------------------
    def _bilinear(self, probe: Probe) -> list[tuple[int, float]]:
        """(flat cell index, weight) pairs interpolating the probe's field at its position
        (clamped to the outermost cell centres: the nearest centre's value near a wall)."""
        g = self.grid
        pos = tuple(float(v) for v in probe.position)
        if len(pos) != len(g.shape):
            raise ValueError(
                f"{type(self).__name__}: probe {probe.name!r} position {probe.position} needs "
                f"{len(g.shape)} coordinates ({'y, x' if len(g.shape) == 2 else 'x'})"
            )
        axes = []
        for v, length, n, h in zip(pos, g.extent, g.shape, g.spacing):
            if not (math.isfinite(v) and 0.0 <= v <= length):
                raise ValueError(
                    f"{type(self).__name__}: probe {probe.name!r} position {probe.position} is "
                    f"outside the domain [0, {length}] {self.length_unit} along an axis"
                )
            s = min(max(v / h - 0.5, 0.0), n - 1.0)  # in cell-centre units
            i = min(int(s), n - 2)
            axes.append(((i, 1.0 - (s - i)), (i + 1, s - i)))
        k = self.field_names.index(probe.field)
        terms: dict[int, float] = {}
        for combo in np.ndindex(*(2,) * len(axes)):
            idx = tuple(axes[a][c][0] for a, c in enumerate(combo))
            w = math.prod(axes[a][c][1] for a, c in enumerate(combo))
            if w > 0:
                flat = k * g.cells + int(np.ravel_multi_index(idx, g.shape))
                terms[flat] = terms.get(flat, 0.0) + w
        return sorted(terms.items())

    def observe(self, x, u, p):
        """Probes (interpolated) then derived outputs (reductions over the field) [..., ny]."""
        xp = self.xp(x)
        cols = [sum(w * x[..., i] for i, w in terms) for terms in self._probe_terms]
        for o in self.derived:
            f = self.field(x, o.field)
            red = {"max": xp.max, "min": xp.min, "mean": xp.mean}[o.reduce]
            cols.append(red(f, axis=-1))
        return xp.stack(cols, axis=-1)
