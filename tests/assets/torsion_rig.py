import math

from twin_ml import Input, Output, Parameter, PhysicsSystem, Regime, State, register_system


@register_system("torsion_rotor")
class TorsionRig(PhysicsSystem):
    """A flywheel on a torsion shaft: J a'' = tau(t) - k a - c a' - d a' |a'| (air drag).

    TorsionRig(drag=False) drops the drag term (the incomplete physics of a hybrid model).
    """

    states = (State("angle", "rad", bounds=(-0.5, 0.5)), State("rate", "rad/s", bounds=(-1, 1)))
    inputs = (
        Input(
            "torque",
            "N m",
            bounds=(-1.0, 1.0),
            limits=(-5.0, 5.0),
            interpolation="zoh",
            signal={"kind": "prbs", "hold": 0.5},
        ),
    )
    outputs = (Output("angle", "rad"),)
    parameters = (
        Parameter("stiffness", "N m/rad", nominal=4.0, bounds=(2.0, 8.0), limits=(0, math.inf)),
        Parameter("friction", "N m s/rad", nominal=0.4, bounds=(0.1, 1.0), limits=(0, math.inf)),
        Parameter("drag", "N m s^2", nominal=0.5, bounds=(0.2, 1.0), limits=(0, math.inf)),
        Parameter("inertia", "kg m^2", nominal=1.0, bounds=(0.5, 2.0), limits=(1e-6, math.inf)),
    )
    regimes = {"stiff": Regime("a stiff shaft", parameters={"stiffness": (6.0, 8.0)})}
    default_horizon = (10.0, 0.05)  # (t_end, dt) in seconds

    def __init__(self, *, drag: bool = True):
        self.drag = drag

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        angle, rate = x[..., 0], x[..., 1]
        k, c, d, inertia = p[..., 0], p[..., 1], p[..., 2], p[..., 3]
        torque = u[..., 0] - k * angle - c * rate
        if self.drag:
            torque = torque - d * rate * xp.abs(rate)
        return xp.stack([rate, torque / inertia], axis=-1)
