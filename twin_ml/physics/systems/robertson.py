"""Robertson's chemical kinetics: the classic stiff test problem.

::

    dy1/dt = -k1 y1 + k3 y2 y3
    dy2/dt =  k1 y1 - k3 y2 y3 - k2 y2^2
    dy3/dt =  k2 y2^2

Nominal rates k1 = 0.04, k2 = 3e7, k3 = 1e4 span nine orders of magnitude; explicit solvers need
~10^5 steps where BDF needs a few hundred. y1 + y2 + y3 is conserved. No inputs.

Reference: H. H. Robertson, "The solution of a set of reaction rate equations", in J. Walsh (ed.),
*Numerical Analysis: An Introduction*, Academic Press 1966, pp. 178-182; E. Hairer, G. Wanner,
*Solving Ordinary Differential Equations II*, 2nd ed., Springer 1996, sec. IV.1 (reference values
at t = 40: y1 = 0.7158270687, y2 = 9.185534764e-6, y3 = 0.2841637457).
"""

from twin_ml.physics.registration import register_system
from twin_ml.physics.system import Output, Parameter, PhysicsSystem, Regime, State


@register_system("robertson")
class Robertson(PhysicsSystem):
    states = (
        State("y1", "1", bounds=(0.9, 1.0), limits=(0.0, 1.0)),
        State("y2", "1", bounds=(0.0, 0.0), limits=(0.0, 1.0)),
        State("y3", "1", bounds=(0.0, 0.1), limits=(0.0, 1.0)),
    )
    inputs = ()
    outputs = (Output("y1", "1"), Output("y2", "1"), Output("y3", "1"))
    parameters = (
        Parameter("k1", "1/s", nominal=0.04, bounds=(0.02, 0.08), limits=(1e-6, 10.0)),
        Parameter("k2", "1/s", nominal=3e7, bounds=(1e7, 5e7), limits=(1e3, 1e10)),
        Parameter("k3", "1/s", nominal=1e4, bounds=(5e3, 2e4), limits=(1.0, 1e7)),
    )
    regimes = {"nominal": Regime("rates near the textbook values", parameters={"k1": (0.03, 0.05)})}
    time_unit = "s"
    default_horizon = (40.0, 0.1)
    stiffness = "stiff"
    solver = "BDF"

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        y1, y2, y3 = x[..., 0], x[..., 1], x[..., 2]
        k1, k2, k3 = p[..., 0], p[..., 1], p[..., 2]
        r1, r2, r3 = k1 * y1, k2 * y2**2, k3 * y2 * y3
        return xp.stack([-r1 + r3, r1 - r3 - r2, r2], axis=-1)
