"""Forced Duffing oscillator: the physics behind the Silverbox benchmark.

The Silverbox is an electronic circuit that mimics a mass-spring-damper with a cubic hard spring::

    dy/dt = v
    dv/dt = -2 zeta omega0 v - omega0^2 y - alpha y^3 + b u

y is the output voltage (the "displacement"), u the input voltage. Parameters: natural angular
frequency omega0, damping ratio zeta, cubic stiffness alpha, input gain b. With alpha = 0 it is a
linear oscillator with a closed-form response (a test oracle).

References: G. Duffing, *Erzwungene Schwingungen bei veraenderlicher Eigenfrequenz*, Vieweg
1918; T. Wigren, J. Schoukens, "Three free data sets for development and benchmarking in
nonlinear system identification", ECC 2013 (the Silverbox, sampled at 10^7/2^14 = 610.35 Hz).
"""

from twin_ml.physics.registration import register_system
from twin_ml.physics.system import Input, Output, Parameter, PhysicsSystem, Regime, State

FS = 1e7 / 2**14  # Silverbox sampling rate [Hz]


@register_system("duffing")
class Duffing(PhysicsSystem):
    states = (State("y", "V", bounds=(-0.05, 0.05)), State("v", "V/s", bounds=(-5.0, 5.0)))
    inputs = (
        Input(
            "u",
            "V",
            bounds=(-0.2, 0.2),
            interpolation="linear",
            signal={"kind": "multisine", "f_min": 5.0, "f_max": 150.0, "n_tones": 12},
        ),
    )
    outputs = (Output("y", "V"),)
    parameters = (
        Parameter("omega0", "rad/s", nominal=380.0, bounds=(330.0, 430.0), limits=(1.0, 1e4)),
        Parameter("zeta", "1", nominal=0.05, bounds=(0.02, 0.1), limits=(0.0, 10.0)),
        Parameter("alpha", "1/(V^2 s^2)", nominal=2.0e6, bounds=(0.5e6, 4.0e6), limits=(0.0, 1e9)),
        Parameter("b", "1/s^2", nominal=1.44e5, bounds=(1.0e5, 2.0e5), limits=(0.0, 1e8)),
    )
    regimes = {
        "linear": Regime("small amplitude, the cubic term negligible", inputs={"u": (-0.05, 0.05)}),
        "nominal": Regime("Silverbox-like excitation", inputs={"u": (-0.2, 0.2)}),
    }
    time_unit = "s"
    default_horizon = (300 / FS, 1 / FS)  # 300 samples at the Silverbox rate
    stiffness = "nonstiff"
    # RK45: the input's kinks at every sample cost DOP853 ~10x more steps for no gain at rtol 1e-6
    solver = "RK45"

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        y, v = x[..., 0], x[..., 1]
        omega0, zeta, alpha, b = p[..., 0], p[..., 1], p[..., 2], p[..., 3]
        dv = -2.0 * zeta * omega0 * v - omega0**2 * y - alpha * y**3 + b * u[..., 0]
        return xp.stack([v, dv], axis=-1)
