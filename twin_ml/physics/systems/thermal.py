"""Building-zone thermal network, 3R2C: zone air and building envelope.

Two capacities (zone air + furnishings C_a, envelope C_w) and three resistances (air-envelope
R_aw, envelope-outdoor R_wo, air-outdoor through windows and infiltration R_win)::

    C_a dT_a/dt = (T_w - T_a)/R_aw + (T_o - T_a)/R_win + Q_h + f_sol * Q_sol
    C_w dT_w/dt = (T_a - T_w)/R_aw + (T_o - T_w)/R_wo + (1 - f_sol) * Q_sol

Inputs: outdoor temperature T_o, solar gain Q_sol, heating power Q_h (held by the controller,
zero-order hold). Time in hours, capacities in kWh/K, resistances in K/kW, powers in kW. With
constant inputs the steady state solves a 2x2 linear system (a test oracle).

Reference: P. Bacher, H. Madsen, "Identifying suitable models for the heat dynamics of
buildings", Energy and Buildings 43(7):1511-1522, 2011; ISO 13790:2008 (5R1C simple hourly
method, of which this is the lumped two-capacity variant).
"""

from twin_ml.physics.registration import register_system
from twin_ml.physics.system import Input, Output, Parameter, PhysicsSystem, Regime, State


@register_system("thermal_rc")
class ThermalRC(PhysicsSystem):
    states = (
        State("T_air", "degC", bounds=(12.0, 24.0)),
        State("T_wall", "degC", bounds=(10.0, 22.0)),
    )
    inputs = (
        Input(
            "T_out",
            "degC",
            bounds=(-15.0, 35.0),
            interpolation="linear",
            signal={"kind": "multisine", "f_min": 1 / 72, "f_max": 1 / 6, "n_tones": 4},
        ),
        Input(
            "Q_sol",
            "kW",
            bounds=(0.0, 3.0),
            interpolation="linear",
            limits=(0.0, 20.0),
            signal={"kind": "bandlimited", "f_cut": 0.25},
        ),
        Input(
            "Q_heat",
            "kW",
            bounds=(0.0, 5.0),
            interpolation="zoh",
            limits=(0.0, 50.0),
            signal={"kind": "step", "hold": 3.0},
        ),
    )
    outputs = (Output("T_air", "degC"),)
    parameters = (
        Parameter("C_air", "kWh/K", nominal=0.5, bounds=(0.3, 0.8), limits=(1e-3, 1e3)),
        Parameter("C_wall", "kWh/K", nominal=10.0, bounds=(5.0, 15.0), limits=(1e-3, 1e4)),
        Parameter("R_aw", "K/kW", nominal=2.0, bounds=(1.0, 3.0), limits=(1e-3, 1e3)),
        Parameter("R_wo", "K/kW", nominal=5.0, bounds=(3.0, 8.0), limits=(1e-3, 1e3)),
        Parameter("R_win", "K/kW", nominal=10.0, bounds=(6.0, 15.0), limits=(1e-3, 1e3)),
        Parameter("f_sol", "1", nominal=0.3, bounds=(0.1, 0.5), limits=(0.0, 1.0)),
    )
    regimes = {
        "nominal": Regime("mild weather", inputs={"T_out": (0.0, 20.0)}),
        "winter": Regime(
            "cold, low sun, heating on",
            inputs={"T_out": (-15.0, 5.0), "Q_sol": (0.0, 1.0), "Q_heat": (1.0, 5.0)},
        ),
        "summer": Regime(
            "warm, high sun, heating off", inputs={"T_out": (15.0, 35.0), "Q_heat": (0.0, 0.5)}
        ),
    }
    time_unit = "h"
    default_horizon = (72.0, 0.25)
    stiffness = "moderate"  # air (~1 h) and envelope (~15 h) time constants
    solver = "RK45"

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        Ta, Tw = x[..., 0], x[..., 1]
        To, Qs, Qh = u[..., 0], u[..., 1], u[..., 2]
        Ca, Cw, Raw, Rwo, Rwin, fs = (p[..., i] for i in range(6))
        dTa = ((Tw - Ta) / Raw + (To - Ta) / Rwin + Qh + fs * Qs) / Ca
        dTw = ((Ta - Tw) / Raw + (To - Tw) / Rwo + (1.0 - fs) * Qs) / Cw
        return xp.stack([dTa, dTw], axis=-1)
