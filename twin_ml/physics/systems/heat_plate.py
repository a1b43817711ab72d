"""Transient heat conduction in the aluminium cooling plate of a battery module (2D, finite
volumes).

A square plate (0.1 m x 0.1 m, `THICKNESS` 10 mm) carries the heat of a row of cells that sits on
its middle band (y in [Ly/4, 3Ly/4], the whole length in x) to a coolant channel along its west
edge (x = 0); the other three edges are insulated::

    rho_c dT/dt = k (d2T/dx2 + d2T/dy2) + q'''(x, y, t)
    west  (x = 0):        -k dT/dx = h (T_c - T)       (convection to the coolant)
    south, north, east:    dT/dn = 0                    (insulated)
    q''' = P(t) / V_band   in the band's cells, 0 elsewhere

Inputs: the cells' total heat generation P [W] (the whole plate receives exactly P) and the
coolant temperature T_c [degC], both measured, smooth signals (linear interpolation).
Parameters: conductivity k [W/(m K)], volumetric heat capacity rho_c [J/(m^3 K)] and the
convective coefficient h [W/(m^2 K)] of the channel; the ranges are wrought and cast aluminium
alloys (k 120-220, rho_c 2.2-2.6 MJ/(m^3 K)) and a liquid-cooled channel (h 400-2500). The
declared state is the uniform initial temperature T0; the field is T [degC] on the grid.

Discretization: cell-centred finite volumes on `Grid` (5-point Laplacian, second order). The
cooled face is Robin: the Neumann stencil plus the convective flux into the edge cells, computed
with the face temperature T_f that makes conduction over the half cell and convection agree,
k (T_f - T_0) / (dx/2) = h (T_c - T_f); the flux per face area is then

    h (T_c - T_f) = h_eff (T_c - T_0),    h_eff = h / (1 + h dx / (2 k)),

second-order accurate: at steady state the discrete field's y-average is the exact 1D quadratic
of the plate's mean source q''' plus the constant q''' dx^2 / (8 k). With nominal values
the diffusion time L^2 / alpha is about 140 s and the lumped cooling time rho_c Lx / h about
240 s; the default horizon (300 s in 200 steps of 1.5 s) spans both. Energy balance (exact in
the scheme, to round-off):

    rho_c V_cell sum_cells dT/dt = P - sum_west_cells h_eff (T_0 - T_c) dy THICKNESS

References: T. L. Bergman, A. S. Lavine, F. P. Incropera, D. P. DeWitt, *Fundamentals of Heat
and Mass Transfer*, 7th ed., Wiley 2011 (conduction, the convective boundary, lumped
capacitance); R. J. LeVeque, *Finite Difference Methods for Ordinary and Partial Differential
Equations*, SIAM 2007 (method of lines, stiffness of the heat equation); S. V. Patankar,
*Numerical Heat Transfer and Fluid Flow*, Hemisphere 1980 (control volumes, boundary
conductances in series).
"""

from __future__ import annotations

import numpy as np
from array_api_compat import device

from twin_ml.physics.field import Derived, Field, FieldSystem, Probe
from twin_ml.physics.registration import register_system
from twin_ml.physics.system import Input, Parameter, Regime, State

THICKNESS = 0.01  # m: the plate's thickness (the third dimension; the fields are uniform in it)
BAND = (0.25, 0.75)  # the heated band, as fractions of Ly: cells whose centre lies in it


@register_system("heat_plate")
class HeatPlate(FieldSystem):
    fields = (Field("T", "degC", bounds=(10.0, 70.0), limits=(-50.0, 300.0)),)
    states = (State("T0", "degC", bounds=(15.0, 35.0), limits=(-40.0, 80.0)),)
    inputs = (
        Input(
            "power",
            "W",
            bounds=(0.0, 20.0),
            interpolation="linear",
            limits=(0.0, 200.0),
            signal={"kind": "multisine", "f_min": 1 / 300, "f_max": 1 / 20, "n_tones": 5},
        ),
        Input(
            "T_coolant",
            "degC",
            bounds=(15.0, 35.0),
            interpolation="linear",
            limits=(-40.0, 90.0),
            signal={"kind": "multisine", "f_min": 1 / 600, "f_max": 1 / 100, "n_tones": 3},
        ),
    )
    parameters = (
        Parameter("k", "W/(m K)", nominal=170.0, bounds=(120.0, 220.0), limits=(1.0, 500.0)),
        Parameter("rho_c", "J/(m^3 K)", nominal=2.42e6, bounds=(2.2e6, 2.6e6), limits=(1e5, 1e7)),
        Parameter("h", "W/(m^2 K)", nominal=1000.0, bounds=(400.0, 2500.0), limits=(0.0, 1e5)),
    )
    probes = (
        Probe("tc_cooled", "T", (0.05, 0.005)),  # at the coolant channel, mid-edge
        Probe("tc_cooled_corner", "T", (0.005, 0.005)),
        Probe("tc_centre", "T", (0.05, 0.05)),
        Probe("tc_south", "T", (0.01, 0.05)),  # outside the heated band
        Probe("tc_east", "T", (0.05, 0.095)),  # far end of the band: near the hot spot
        Probe("tc_far_corner", "T", (0.095, 0.095)),
    )
    derived = (Derived("T_max", "T", "max"),)
    regimes = {
        "nominal": Regime("moderate load", inputs={"power": (0.0, 10.0)}),
        "high_load": Regime(
            "high load, weak cooling",
            inputs={"power": (10.0, 20.0)},
            parameters={"h": (400.0, 1000.0)},
        ),
    }
    extent = (0.1, 0.1)  # (Ly, Lx) m
    default_shape = (32, 32)
    default_horizon = (300.0, 1.5)
    snapshot_stride = 10
    affine = True  # linear conduction, a source linear in the power, a linear convective face
    stiffness = "stiff"  # explicit stability dt ~ dx^2 / (4 alpha) ~ 0.03 s on 32 x 32
    solver = "BDF"
    divergence_limit = 1e4

    def __init__(self, *, shape: list[int] | None = None):
        super().__init__(shape=shape)
        ny, nx = self.grid.shape
        dy, dx = self.grid.spacing
        yc, _ = self.grid.coordinates()
        ly = self.grid.extent[0]
        band = (yc >= BAND[0] * ly) & (yc <= BAND[1] * ly)
        # W/m^3 per W of input: the band's cells share the power, so the plate receives exactly P
        cell_volume = dx * dy * THICKNESS
        per_watt = np.where(band, 1.0 / (band.sum() * nx * cell_volume), 0.0)
        self._source = np.repeat(per_watt, nx)  # [cells], row-major (y, then x)

    def initial_state(self, x0):
        return self.uniform(x0[..., 0:1])

    def source_pattern(self) -> np.ndarray:
        """q''' per watt of `power` in each cell [cells] (W/m^3 per W)."""
        return self._source.copy()

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        ny, nx = self.grid.shape
        dx = self.grid.spacing[1]
        k, rho_c, h = p[..., 0:1], p[..., 1:2], p[..., 2:3]
        power, t_c = u[..., 0:1], u[..., 1:2]
        # the cooled face's temperature (conduction over the half cell in series with
        # convection), as a Dirichlet value on the west face: [..., ny, 1]
        edge = xp.reshape(x, (*x.shape[:-1], ny, nx))[..., 0:1]
        g = 2.0 * k / dx  # W/(m^2 K): the half cell's conductance
        t_face = (h[..., None] * t_c[..., None] + g[..., None] * edge) / (h + g)[..., None]
        lap = self.grid.laplacian(x, {"west": ("dirichlet", t_face)})
        source = xp.asarray(self._source, dtype=x.dtype, device=device(x))
        return (k * lap + power * source) / rho_c
