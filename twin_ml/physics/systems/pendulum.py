"""Damped driven pendulum.

Equations (theta: angle from the downward vertical, omega = dtheta/dt)::

    dtheta/dt = omega
    domega/dt = -(g / L) sin(theta) - c * omega + tau / (m L^2)

with g = 9.81 m/s^2, length L, viscous damping rate c, mass m and the applied torque tau(t).
Measured output: the angle. With c = 0 and tau = 0 the energy
E = m L^2 omega^2 / 2 + m g L (1 - cos theta) is conserved (a test oracle).

``Pendulum(damped=False)`` drops the damping term: the "incomplete physics" a hybrid model has to
correct with a learned residual.

Design box: swings below the separatrix (theta within +-1.5 rad, omega within +-1.5 rad/s, torque
within +-1 N m), the regime a twin of a swinging load or arm works in. The earlier box (+-2.5 rad,
+-2 rad/s, +-2 N m) started or drove 2-10% of its pendulums over the top; those wind up to 50-120
rad in 10 s, where any phase error grows without bound and no surrogate's relative error means
anything. Going over the top is left to the extrapolation split (about 4% of it).

Reference: S. H. Strogatz, *Nonlinear Dynamics and Chaos*, 2nd ed., Westview 2015, sec. 6.7
(the damped pendulum) and sec. 8.5 (the driven pendulum).
"""

from twin_ml.physics.registration import register_system
from twin_ml.physics.system import Input, Output, Parameter, PhysicsSystem, Regime, State

G = 9.81


@register_system("pendulum")
class Pendulum(PhysicsSystem):
    states = (
        State("theta", "rad", bounds=(-1.5, 1.5)),
        State("omega", "rad/s", bounds=(-1.5, 1.5)),
    )
    inputs = (
        Input(
            "torque",
            "N m",
            bounds=(-1.0, 1.0),
            interpolation="linear",
            signal={"kind": "multisine", "f_min": 0.05, "f_max": 1.0, "n_tones": 6},
        ),
    )
    outputs = (Output("theta", "rad"),)
    parameters = (
        Parameter("length", "m", nominal=1.0, bounds=(0.5, 2.0), limits=(0.05, 100.0)),
        Parameter("damping", "1/s", nominal=0.2, bounds=(0.05, 0.5), limits=(0.0, 100.0)),
        Parameter("mass", "kg", nominal=1.0, bounds=(0.5, 2.0), limits=(0.01, 1000.0)),
    )
    regimes = {
        "nominal": Regime(
            "small swings, mild forcing",
            parameters={"length": (0.8, 1.2)},
            states={"theta": (-0.5, 0.5), "omega": (-0.5, 0.5)},
            inputs={"torque": (-1.0, 1.0)},
        ),
        "large_swing": Regime(
            "large angles (57-86 degrees), far into the nonlinear range",
            states={"theta": (1.0, 1.5)},
        ),
        "high_damping": Regime("strongly damped", parameters={"damping": (0.3, 0.5)}),
    }
    time_unit = "s"
    default_horizon = (10.0, 0.05)
    stiffness = "nonstiff"
    solver = "RK45"  # inputs interpolated on the grid have kinks; RK45 steps through them cheapest

    def __init__(self, *, damped: bool = True):
        self.damped = bool(damped)

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        theta, omega = x[..., 0], x[..., 1]
        length, damping, mass = p[..., 0], p[..., 1], p[..., 2]
        domega = -(G / length) * xp.sin(theta) + u[..., 0] / (mass * length**2)
        if self.damped:
            domega = domega - damping * omega
        return xp.stack([omega, domega], axis=-1)

    @staticmethod
    def energy(x, p):
        """Mechanical energy [J] for x [..., 2], p [..., 3] (numpy)."""
        import numpy as np

        theta, omega = x[..., 0], x[..., 1]
        length, mass = p[..., 0], p[..., 2]
        return 0.5 * mass * length**2 * omega**2 + mass * G * length * (1.0 - np.cos(theta))
