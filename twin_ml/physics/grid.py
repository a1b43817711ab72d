"""A uniform 1D or 2D grid for spatially resolved systems (method of lines): cell-centred
coordinates, the 5-point (2D) / 3-point (1D) Laplacian written once against the array namespace,
and that stencil's sparsity pattern for the implicit solvers.

Boundaries, per side: "dirichlet" (the field is held at a boundary value given per call, on the
face: a ghost cell mirrors it) or "neumann" (no flux through the face). A Robin (convective)
face is a Neumann face plus the system's own flux term in its edge cells, which is how a cooled
edge is written: the stencil stays the same, the physics adds `h (T_inf - T) / dx` there.

    grid = Grid(shape=(32, 32), extent=(0.1, 0.1))      # ny, nx cells; metres
    lap = grid.laplacian(T, bc={"west": ("dirichlet", 300.0)})   # T [..., ny * nx]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SIDES_1D = ("west", "east")
SIDES_2D = ("south", "north", "west", "east")  # y = 0, y = Ly, x = 0, x = Lx


@dataclass(frozen=True)
class Grid:
    """`shape`: (n,) or (ny, nx) cells; `extent`: the lengths of the domain along those axes."""

    shape: tuple[int, ...]
    extent: tuple[float, ...]

    def __post_init__(self):
        shape = tuple(self.shape)
        extent = tuple(self.extent)
        if len(shape) not in (1, 2):
            raise ValueError(f"grid.shape must have 1 or 2 axes, got {shape}")
        if len(extent) != len(shape):
            raise ValueError(
                f"grid.extent needs one length per axis of shape {shape}, got {extent}"
            )
        for n in shape:
            if isinstance(n, bool) or not isinstance(n, int) or n < 3:
                raise ValueError(
                    f"grid.shape: {n!r} cells is too few for the 3-point stencil (at least 3)"
                )
        for length in extent:
            if not (isinstance(length, (int, float)) and math.isfinite(length) and length > 0):
                raise ValueError(f"grid.extent: lengths must be finite and > 0, got {length!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "extent", tuple(float(v) for v in extent))

    @property
    def cells(self) -> int:
        return math.prod(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(length / n for length, n in zip(self.extent, self.shape))

    @property
    def cell_volume(self) -> float:
        return math.prod(self.spacing)

    @property
    def sides(self) -> tuple[str, ...]:
        return SIDES_1D if len(self.shape) == 1 else SIDES_2D

    def coordinates(self) -> tuple[np.ndarray, ...]:
        """Cell centres per axis, each [n_axis]."""
        return tuple((np.arange(n) + 0.5) * h for n, h in zip(self.shape, self.spacing))

    def index(self, *position: float) -> int:
        """The flat index of the cell holding `position` (y, x for 2D); outside: ValueError."""
        if len(position) != len(self.shape):
            raise ValueError(f"a position needs {len(self.shape)} coordinates, got {position}")
        idx = []
        for p, length, n, h in zip(position, self.extent, self.shape, self.spacing):
            if not 0.0 <= p <= length:
                raise ValueError(f"position {position} is outside the domain [0, {self.extent}]")
            idx.append(min(int(p / h), n - 1))
        return int(np.ravel_multi_index(tuple(idx), self.shape))

    def laplacian(self, field, bc: dict[str, tuple[str, Any]] | None = None):
        """The Laplacian of `field` [..., cells] (numpy or torch), with boundary conditions per
        side: ("dirichlet", value) or ("neumann", None); unnamed sides are Neumann (no flux).
        A Dirichlet value is a number, or an array that broadcasts against the edge layer
        (the batch axes, then the grid axes with the face's normal axis of length 1)."""
        from twin_ml.physics.system import PhysicsSystem

        xp = PhysicsSystem.xp(field)
        bc = dict(bc or {})
        unknown = sorted(set(bc) - set(self.sides))
        if unknown:
            raise ValueError(f"unknown sides {unknown}; sides: {', '.join(self.sides)}")
        f = xp.reshape(field, (*field.shape[:-1], *self.shape))
        out = 0
        for axis, h in enumerate(self.spacing):
            ax = axis - len(self.shape)  # from the end: the batch axes stay in front
            low, high = self.sides[2 * axis], self.sides[2 * axis + 1]
            first = _take(xp, f, 0, 1, ax)
            last = _take(xp, f, f.shape[ax] - 1, f.shape[ax], ax)
            ghost_lo = _ghost(xp, first, bc.get(low))
            ghost_hi = _ghost(xp, last, bc.get(high))
            padded = xp.concat([ghost_lo, f, ghost_hi], axis=ax)
            n = f.shape[ax]
            out = (
                out + (_take(xp, padded, 2, n + 2, ax) - 2 * f + _take(xp, padded, 0, n, ax)) / h**2
            )
        return xp.reshape(out, field.shape)

    def laplacian_pattern(self):
        """The stencil's sparsity pattern [cells, cells] (scipy sparse, boolean)."""
        from scipy.sparse import diags, identity, kron

        def line(n):
            return diags([1, 1, 1], [-1, 0, 1], shape=(n, n), dtype=bool)

        if len(self.shape) == 1:
            return line(self.shape[0]).tocsc()
        ny, nx = self.shape
        eye_y, eye_x = identity(ny, dtype=bool), identity(nx, dtype=bool)
        return (kron(line(ny), eye_x) + kron(eye_y, line(nx))).astype(bool).tocsc()


def _take(xp, a, start: int, stop: int, axis: int):
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


def _ghost(xp, edge, condition):
    """The ghost layer beyond a face: Neumann mirrors the edge cell (zero gradient), Dirichlet
    reflects it about the face value (the face holds the value to second order)."""
    if condition is None or condition[0] == "neumann":
        return edge
    kind, value = condition
    if kind != "dirichlet":
        raise ValueError(f"boundary condition {kind!r}: use 'dirichlet' or 'neumann'")
    return 2 * value - edge
