"""Cooled tubular reactor with axial dispersion: exothermic first-order A -> B (1D, finite
volumes).

A liquid flows at velocity `V` through a jacketed tube of length `LENGTH` and diameter `DIAMETER`;
the exothermic first-order reaction A -> B follows Arrhenius kinetics, and the wall exchanges heat
with a jacket (pseudo-homogeneous axial-dispersion model, equal dispersion of mass and heat)::

    dC/dt = -v dC/dz + D d2C/dz2 - r
    dT/dt = -v dT/dz + D d2T/dz2 + dT_ad_per_C r + (4 U / (d rho_cp)) (T_j - T)
    r     = k_ref exp(-E_R (1/T - 1/T_REF)) C,      dT_ad_per_C = (-DH) / rho_cp
    inlet  (z = 0, Danckwerts):  v C_in = v C - D dC/dz,   v T_in = v T - D dT/dz
    outlet (z = L):              dC/dz = dT/dz = 0

Units: z in m, t in s, C in mol/m^3, T in K. Fixed: L = 1 m, v = 0.01 m/s (residence time
100 s), d = 0.05 m, rho_cp = 4.0 MJ/(m^3 K) (water-like), -DH = 60 kJ/mol, so the adiabatic
temperature rise is 15 K per 1000 mol/m^3. Inputs (measured, linear interpolation): inlet
concentration C_in, inlet temperature T_in, jacket temperature T_j. Parameters: the rate
constant at T_REF = 330 K, k_ref [1/s] (Damkohler number k_ref L / v of 0.4 to 2), the activation
temperature E_R = E / R [K], the axial dispersion coefficient D [m^2/s] (Peclet number v L / D of
10 to 50) and the wall heat-transfer coefficient U [W/(m^2 K)] (cooling rate 4 U / (d rho_cp) of
0.004 to 0.02 1/s). Within these bounds the rate is strongly nonlinear in T (a 10 K rise
multiplies it by 1.7 to 2.5) and the hot spot ranges from none to about 20 K above the hotter of
feed and jacket (about 30 K where a signal's amplitude reaches past the bounds), bounded by the
adiabatic rise: no runaway. The declared states are the uniform initial concentration and
temperature C0, T0; the fields are C and T on the grid.

Discretization (finite volumes, cells of width dz): dispersion is the grid's 3-point Laplacian
with no-flux faces (second order); convection is first-order upwind (the face flux is v times
the upstream cell), which adds a numerical dispersion v dz / 2 (with 64 cells 7.8e-5 m^2/s,
against D >= 2e-4 m^2/s): first-order accurate in dz, and monotone on every grid. The
Danckwerts inlet is exact in this form: the total (convective + dispersive) flux through the
inlet face is the feed's v C_in, so the first cell receives v C_in and no dispersive flux; the
outlet face carries v C of the last cell and no dispersive flux. Hence, exactly in the scheme,
d/dt sum(C) dz = v (C_in - C_out) - sum(r) dz (moles per unit cross-section), and with k_ref = 0
a constant inlet is a steady state.

References: P. V. Danckwerts, "Continuous flow systems: distribution of residence times",
Chem. Eng. Sci. 2:1-13, 1953 (the inlet and outlet conditions); J. F. Wehner, R. H. Wilhelm,
"Boundary conditions of flow reactor", Chem. Eng. Sci. 6:89-93, 1956 (the steady isothermal
first-order solution); G. F. Froment, K. B. Bischoff, J. De Wilde, *Chemical Reactor Analysis
and Design*, 3rd ed., Wiley 2011 (axial dispersion, pseudo-homogeneous models, parametric
sensitivity); H. S. Fogler, *Elements of Chemical Reaction Engineering*, 5th ed., Prentice Hall
2016 (dispersion models of nonideal reactors); R. J. LeVeque, *Finite Volume Methods for
Hyperbolic Problems*, Cambridge University Press 2002 (upwind schemes).
"""

from __future__ import annotations

from twin_ml.physics.field import Derived, Field, FieldSystem, Probe
from twin_ml.physics.registration import register_system
from twin_ml.physics.system import Input, Parameter, Regime, State

LENGTH = 1.0  # m
V = 0.01  # m/s: superficial velocity
DIAMETER = 0.05  # m
RHO_CP = 4.0e6  # J/(m^3 K)
DH = -6.0e4  # J/mol: reaction enthalpy (exothermic)
T_REF = 330.0  # K: where k_ref is the rate constant


@register_system("tubular_reactor")
class TubularReactor(FieldSystem):
    fields = (
        Field("C", "mol/m^3", bounds=(0.0, 1500.0), limits=(0.0, 1e4)),
        Field("T", "K", bounds=(310.0, 380.0), limits=(200.0, 800.0)),
    )
    states = (
        State("C0", "mol/m^3", bounds=(0.0, 1000.0), limits=(0.0, 1e4)),
        State("T0", "K", bounds=(315.0, 340.0), limits=(250.0, 450.0)),
    )
    inputs = (
        Input(
            "C_in",
            "mol/m^3",
            bounds=(500.0, 1500.0),
            interpolation="linear",
            limits=(0.0, 5000.0),
            signal={"kind": "bandlimited", "f_cut": 1 / 50},
        ),
        Input(
            "T_in",
            "K",
            bounds=(320.0, 340.0),
            interpolation="linear",
            limits=(250.0, 450.0),
            signal={"kind": "multisine", "f_min": 1 / 400, "f_max": 1 / 40, "n_tones": 4},
        ),
        Input(
            "T_j",
            "K",
            bounds=(315.0, 335.0),
            interpolation="linear",
            limits=(250.0, 450.0),
            signal={"kind": "multisine", "f_min": 1 / 400, "f_max": 1 / 60, "n_tones": 3},
        ),
    )
    parameters = (
        Parameter("k_ref", "1/s", nominal=0.01, bounds=(0.004, 0.02), limits=(0.0, 1.0)),
        Parameter("E_R", "K", nominal=8000.0, bounds=(6000.0, 10000.0), limits=(0.0, 3e4)),
        Parameter("D", "m^2/s", nominal=5e-4, bounds=(2e-4, 1e-3), limits=(1e-6, 1e-1)),
        Parameter("U", "W/(m^2 K)", nominal=500.0, bounds=(200.0, 1000.0), limits=(0.0, 1e4)),
    )
    probes = (
        Probe("C_out", "C", (LENGTH,)),
        Probe("T_out", "T", (LENGTH,)),
        Probe("T_025", "T", (0.25 * LENGTH,)),
        Probe("T_050", "T", (0.5 * LENGTH,)),
        Probe("T_075", "T", (0.75 * LENGTH,)),
    )
    derived = (Derived("T_max", "T", "max"),)
    regimes = {
        "nominal": Regime("mild feed", inputs={"C_in": (500.0, 1000.0), "T_in": (320.0, 330.0)}),
        "hot_spot": Regime(
            "rich, hot feed and weak cooling: a pronounced hot spot",
            inputs={"C_in": (1000.0, 1500.0), "T_in": (330.0, 340.0)},
            parameters={"U": (200.0, 500.0)},
        ),
    }
    extent = (LENGTH,)
    default_shape = (64,)
    default_horizon = (400.0, 2.0)  # 4 residence times
    snapshot_stride = 10
    stiffness = "stiff"  # dispersion D / dz^2 up to 4 1/s against a 400 s horizon
    solver = "BDF"
    divergence_limit = 1e5

    def initial_state(self, x0):
        return self.uniform(x0[..., 0:2])

    def rate(self, c, temp, p):
        """The reaction rate r [mol/(m^3 s)] per cell, [..., cells]."""
        xp = self.xp(c)
        k_ref, e_r = p[..., 0:1], p[..., 1:2]
        return k_ref * xp.exp(-e_r * (1.0 / temp - 1.0 / T_REF)) * c

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        n = self.grid.cells
        dz = self.grid.spacing[0]
        c, temp = x[..., :n], x[..., n:]
        c_in, t_in, t_j = u[..., 0:1], u[..., 1:2], u[..., 2:3]
        d, wall = p[..., 2:3], p[..., 3:4]
        r = self.rate(c, temp, p)

        def convection(f, f_in):  # -v df/dz, upwind: the face flux is v times the upstream cell
            upstream = xp.concat([xp.broadcast_to(f_in, (*f.shape[:-1], 1)), f[..., :-1]], axis=-1)
            return V * (upstream - f) / dz

        dc = convection(c, c_in) + d * self.grid.laplacian(c) - r
        dtemp = (
            convection(temp, t_in)
            + d * self.grid.laplacian(temp)
            + (-DH / RHO_CP) * r
            + (4.0 * wall / (DIAMETER * RHO_CP)) * (t_j - temp)
        )
        return xp.concat([dc, dtemp], axis=-1)
