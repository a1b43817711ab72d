"""Exothermic continuous stirred-tank reactor (CSTR), first-order A -> B with Arrhenius kinetics.

::

    r       = k0 * exp(-E_R / T) * C_A
    dC_A/dt = q/V (C_Af - C_A) - r
    dT/dt   = q/V (T_f - T) + (-dH)/(rho Cp) * r + UA/(V rho Cp) (T_c - T)

Inputs: coolant temperature T_c (set by a controller, zero-order hold) and feed temperature T_f.
The exponential rate couples a fast reaction with slow flow and heat removal near the ignition
point, so explicit solvers crawl there: solve with LSODA, Radau or BDF. Fixed: q = 100 L/min,
V = 100 L, C_Af = 1 mol/L, rho = 1000 g/L, Cp = 0.239 J/(g K). Time in minutes.

Reference: D. E. Seborg, T. F. Edgar, D. A. Mellichamp, F. J. Doyle III, *Process Dynamics and
Control*, 4th ed., Wiley 2016, example 2.5 / appendix; the parameter set is the widely used
"Seborg CSTR" (e.g. in the do-mpc and APMonitor examples).
"""

from twin_ml.physics.registration import register_system
from twin_ml.physics.system import Input, Output, Parameter, PhysicsSystem, Regime, State

Q, V, CAF, RHO, CP = 100.0, 100.0, 1.0, 1000.0, 0.239


@register_system("cstr")
class CSTR(PhysicsSystem):
    states = (
        State("C_A", "mol/L", bounds=(0.2, 0.9), limits=(0.0, 1.0)),
        State("T", "K", bounds=(320.0, 380.0), limits=(250.0, 600.0)),
    )
    inputs = (
        Input(
            "T_c",
            "K",
            bounds=(290.0, 305.0),
            interpolation="zoh",
            signal={"kind": "step", "hold": 2.0},
        ),
        Input(
            "T_f",
            "K",
            bounds=(345.0, 355.0),
            interpolation="linear",
            signal={"kind": "multisine", "f_min": 0.1, "f_max": 1.0, "n_tones": 3},
        ),
    )
    outputs = (Output("C_A", "mol/L"), Output("T", "K"))
    parameters = (
        Parameter("k0", "1/min", nominal=7.2e10, bounds=(6.5e10, 8.0e10), limits=(1e8, 1e13)),
        Parameter("E_R", "K", nominal=8750.0, bounds=(8700.0, 8800.0), limits=(5000.0, 12000.0)),
        Parameter("dH", "J/mol", nominal=-5.0e4, bounds=(-5.5e4, -4.5e4), limits=(-2e5, 0.0)),
        Parameter("UA", "J/(min K)", nominal=5.0e4, bounds=(4.5e4, 5.5e4), limits=(1e3, 1e6)),
    )
    regimes = {
        "nominal": Regime("low conversion, stable", inputs={"T_c": (290.0, 298.0)}),
        "ignition": Regime(
            "near ignition: fast, stiff",
            inputs={"T_c": (300.0, 305.0)},
            states={"T": (350.0, 380.0)},
        ),
    }
    time_unit = "min"
    default_horizon = (10.0, 0.05)
    stiffness = "stiff"
    solver = "LSODA"
    divergence_limit = 1e5

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        ca, temp = x[..., 0], x[..., 1]
        tc, tf = u[..., 0], u[..., 1]
        k0, e_r, dh, ua = (p[..., i] for i in range(4))
        r = k0 * xp.exp(-e_r / temp) * ca
        dca = Q / V * (CAF - ca) - r
        dtemp = Q / V * (tf - temp) + (-dh) / (RHO * CP) * r + ua / (V * RHO * CP) * (tc - temp)
        return xp.stack([dca, dtemp], axis=-1)
