from twin_ml.physics import Input, Output, Parameter, PhysicsSystem, Regime, State, register_system


@register_system("mass_spring")
class MassSpring(PhysicsSystem):
    """Mass on a linear spring with viscous damping: m x'' = -k x - c x' + F(t).

    Reference: any mechanics text, e.g. Meriam & Kraige, Engineering Mechanics: Dynamics, ch. 8.
    """

    states = (State("pos", "m", bounds=(-0.5, 0.5)), State("vel", "m/s", bounds=(-1.0, 1.0)))
    inputs = (
        Input(
            "force",
            "N",
            bounds=(-1.0, 1.0),
            interpolation="zoh",
            signal={"kind": "prbs", "hold": 0.5},
        ),
    )
    outputs = (Output("pos", "m"),)
    parameters = (
        Parameter("k", "N/m", nominal=4.0, bounds=(2.0, 8.0)),
        Parameter("c", "N s/m", nominal=0.4, bounds=(0.1, 1.0)),
        Parameter("m", "kg", nominal=1.0, bounds=(0.5, 2.0)),
    )
    regimes = {"stiff_spring": Regime("k near its top", parameters={"k": (6.0, 8.0)})}
    default_horizon = (10.0, 0.05)  # (t_end, dt) in seconds

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        pos, vel = x[..., 0], x[..., 1]
        k, c, m = p[..., 0], p[..., 1], p[..., 2]
        return xp.stack([vel, (u[..., 0] - k * pos - c * vel) / m], axis=-1)
