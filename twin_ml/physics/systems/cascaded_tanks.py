"""Cascaded tanks with Torricelli outflow, a pump, and overflow of the upper tank.

A pump (voltage u) fills the upper tank; it drains through a small opening into the lower tank,
which drains to the reservoir. Levels are in the sensor's units (volts; the level sensors are
linear in the water height), as in the benchmark data::

    q_1    = k_of * max(h1 - h1_max, 0)                          (overflow of the upper tank)
    q_2    = k_of * max(h2 - h2_max, 0)                          (overflow of the lower tank)
    dh1/dt = k4 * u - k1 * sqrt(h1) - q_1
    dh2/dt = k2 * sqrt(h1) + k_lin * h1 - k3 * sqrt(h2) + k5 * q_1 - q_2

The fraction k5 of the upper tank's overflow reaches the lower tank; the rest, and all of the
lower tank's overflow, is lost to the reservoir.
``linear_inflow`` (k_lin, off by default) adds a part of the lower tank's inflow linear in the upper
level. It is empirical: on the real rig it halves the physics' error (least squares on the
estimation record's first 80%: 0.39 V without it, 0.20 V with it; on the test record 0.63 and
0.30 V; see benchmarks/tanks_physics.py).
``CascadedTanks(overflow=False)`` drops both overflows (pure Torricelli), the model a hybrid
surrogate has to correct on the real rig, where tank 1 overflows and the sensor clips at 10 V.
Measured output: the lower tank level h2, or min(h2, sensor_max) with ``sensor_max`` set (the
rig's level sensor saturates at 10 V).

Reference: M. Schoukens, P. Mattsson, T. Wigren, J.-P. Noel, "Cascaded tanks benchmark combining
soft and hard nonlinearities", Workshop on Nonlinear System Identification Benchmarks, 2016
(nonlinearbenchmark.org); the real data in shared/data/real/cascaded_tanks comes from that rig.
"""

from twin_ml.physics.registration import register_system
from twin_ml.physics.system import Input, Output, Parameter, PhysicsSystem, Regime, State


@register_system("cascaded_tanks")
class CascadedTanks(PhysicsSystem):
    states = (
        State("h1", "V", bounds=(1.0, 8.0), limits=(0.0, 20.0)),
        State("h2", "V", bounds=(1.0, 8.0), limits=(0.0, 20.0)),
    )
    inputs = (
        Input(
            "pump",
            "V",
            bounds=(1.0, 9.0),
            interpolation="zoh",
            limits=(0.0, 10.0),
            signal={"kind": "step", "hold": 128.0},
        ),
    )
    outputs = (Output("h2", "V"),)
    parameters = (
        # +-10%: the two outlets are alike on the rig; a wider k2/k3 ratio would fill the lower tank
        # far beyond its 10 V sensor range ((k2/k3)^2 times the upper level at steady state)
        Parameter("k1", "V^0.5/s", nominal=0.05, bounds=(0.045, 0.055), limits=(1e-4, 1.0)),
        Parameter("k2", "V^0.5/s", nominal=0.05, bounds=(0.045, 0.055), limits=(1e-4, 1.0)),
        Parameter("k3", "V^0.5/s", nominal=0.05, bounds=(0.045, 0.055), limits=(1e-4, 1.0)),
        Parameter("k4", "1/s", nominal=0.025, bounds=(0.0225, 0.0275), limits=(1e-4, 1.0)),
        Parameter("k5", "1", nominal=0.5, bounds=(0.2, 0.8), limits=(0.0, 1.0)),
    )
    regimes = {
        "nominal": Regime("mid-range pump voltage, no overflow", inputs={"pump": (2.0, 6.0)}),
        "low_level": Regime(
            "nearly empty tanks",
            inputs={"pump": (1.0, 3.0)},
            states={"h1": (1.0, 3.0), "h2": (1.0, 3.0)},
        ),
        "near_overflow": Regime(
            "high pump voltage, the upper tank overflows",
            inputs={"pump": (6.0, 9.0)},
            states={"h1": (5.0, 8.0), "h2": (5.0, 8.0)},
        ),
    }
    time_unit = "s"
    default_horizon = (1024.0, 4.0)  # the benchmark samples every 4 s
    stiffness = "moderate"  # the overflow term is fast compared with the drain
    solver = "LSODA"

    def __init__(
        self,
        *,
        overflow: bool = True,
        h1_max: float = 10.0,
        h2_max: float = 10.0,
        k_overflow: float = 0.5,
        sensor_max: float | None = None,
        linear_inflow: float | None = None,
    ):
        if min(h1_max, h2_max, k_overflow) <= 0:
            raise ValueError(
                f"h1_max, h2_max and k_overflow must be > 0, got {h1_max}, {h2_max}, {k_overflow}"
            )
        if sensor_max is not None and not float(sensor_max) > 0:
            raise ValueError(f"sensor_max must be > 0 or null, got {sensor_max}")
        self.overflow, self.k_overflow = bool(overflow), float(k_overflow)
        self.h1_max, self.h2_max = float(h1_max), float(h2_max)
        if linear_inflow is not None and not float(linear_inflow) >= 0:
            raise ValueError(f"linear_inflow must be >= 0 or null, got {linear_inflow}")
        self.sensor_max = None if sensor_max is None else float(sensor_max)
        self.linear_inflow = None if linear_inflow is None else float(linear_inflow)

    def observe(self, x, u, p):
        y = x[..., 1:2]
        if self.sensor_max is None:
            return y
        return self.xp(x).clip(y, max=self.sensor_max)

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        h1, h2 = (
            xp.clip(x[..., 0], min=0.0),
            xp.clip(x[..., 1], min=0.0),
        )  # a tank cannot be below empty
        k1, k2, k3, k4, k5 = (p[..., i] for i in range(5))
        dh1 = k4 * u[..., 0] - k1 * xp.sqrt(h1)
        dh2 = k2 * xp.sqrt(h1) - k3 * xp.sqrt(h2)
        if self.linear_inflow is not None:
            dh2 = dh2 + self.linear_inflow * h1
        if self.overflow:
            q1 = self.k_overflow * xp.clip(h1 - self.h1_max, min=0.0)
            q2 = self.k_overflow * xp.clip(h2 - self.h2_max, min=0.0)
            dh1, dh2 = dh1 - q1, dh2 + k5 * q1 - q2
        return xp.stack([dh1, dh2], axis=-1)
