"""The reference solver and the shipped systems against independent oracles."""

import math

import numpy as np
import pytest
from scipy.linalg import expm

from twin_ml.physics import (
    FieldSystem,
    Input,
    Output,
    Parameter,
    PhysicsSystem,
    SolverSettings,
    State,
    list_systems,
    make_system,
    solve_looped,
    solve_stacked,
    system_class,
)
from twin_ml.physics.solver import FAILED_DIVERGED, FAILED_MAX_STEPS, FAILED_NONFINITE, OK

pytestmark = pytest.mark.numeric  # also run in `make test-portable`

ALL_METHODS = ["RK45", "DOP853", "RK23", "LSODA", "Radau", "BDF"]


class FirstOrder(PhysicsSystem):
    """dx/dt = -a x + b u: closed-form response to constant, ramp and held inputs."""

    states = (State("x", "1", bounds=(0.0, 1.0)),)
    inputs = (Input("u", "1", bounds=(0.0, 1.0), interpolation="linear"),)
    outputs = (Output("x", "1"),)
    parameters = (
        Parameter("a", "1/s", nominal=2.0, bounds=(0.5, 3.0)),
        Parameter("b", "1/s", nominal=1.5, bounds=(1, 2)),
    )

    def rhs(self, t, x, u, p):
        return -p[..., 0:1] * x + p[..., 1:2] * u


class FirstOrderHeld(FirstOrder):
    inputs = (Input("u", "1", bounds=(0.0, 1.0), interpolation="zoh"),)


class Oscillator(PhysicsSystem):
    """A linear 2-state system dx/dt = A x with A from the parameters: the matrix exponential is
    exact."""

    states = (State("q", "1", bounds=(-1, 1)), State("v", "1", bounds=(-1, 1)))
    outputs = (Output("q", "1"),)
    parameters = (
        Parameter("w2", "1/s^2", nominal=9.0, bounds=(1, 20)),
        Parameter("c", "1/s", nominal=0.3, bounds=(0, 1)),
    )

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        return xp.stack([x[..., 1], -p[..., 0] * x[..., 0] - p[..., 1] * x[..., 1]], axis=-1)


def _tol(method):
    return dict(rtol=1e-10, atol=1e-12) if method != "RK23" else dict(rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_linear_system_matches_matrix_exponential(method):
    sys_ = Oscillator()
    t = np.linspace(0.0, 5.0, 51)
    p = np.array([[9.0, 0.3], [4.0, 0.0]])
    x0 = np.array([[1.0, 0.0], [0.2, -0.5]])
    res = solve_looped(
        sys_, t, np.zeros((2, t.size, 0)), p, x0, SolverSettings(method=method, **_tol(method))
    )
    assert (res.status == OK).all()
    for i in range(2):
        A = np.array([[0.0, 1.0], [-p[i, 0], -p[i, 1]]])
        exact = np.stack([expm(A * tk) @ x0[i] for tk in t])
        np.testing.assert_allclose(res.x[i], exact, atol=2e-6 if method == "RK23" else 1e-7)


@pytest.mark.parametrize("method", ["RK45", "DOP853", "LSODA", "BDF"])
def test_ramp_input_is_interpolated_linearly(method):
    # u(t) = c0 + c1 t exactly represented by linear interpolation on any grid
    a, b, c0, c1, x0 = 2.0, 1.5, 0.3, 0.4, 0.8
    t = np.linspace(0.0, 4.0, 9)  # coarse grid: the solver must interpolate between the samples
    res = solve_looped(
        FirstOrder(),
        t,
        (c0 + c1 * t)[None, :, None],
        np.array([[a, b]]),
        np.array([[x0]]),
        SolverSettings(method=method, rtol=1e-10, atol=1e-12),
    )
    # x(t) = b/a (c0 + c1 t) - b c1 / a^2 + (x0 - b c0/a + b c1/a^2) e^{-a t}
    exact = (
        b / a * (c0 + c1 * t) - b * c1 / a**2 + (x0 - b * c0 / a + b * c1 / a**2) * np.exp(-a * t)
    )
    np.testing.assert_allclose(res.x[0, :, 0], exact, atol=1e-7)


def test_zero_order_hold_input_holds_between_samples():
    # a held input changes only at grid points: piecewise-exponential closed form
    a, b = 1.0, 1.0
    t = np.array([0.0, 1.0, 2.0, 3.0])
    u = np.array([1.0, -1.0, 0.5, 0.5])
    res = solve_looped(
        FirstOrderHeld(),
        t,
        u[None, :, None],
        np.array([[a, b]]),
        np.array([[0.0]]),
        SolverSettings(method="RK45", rtol=1e-10, atol=1e-12),
    )
    x, exact = 0.0, [0.0]
    for k in range(3):
        x = b * u[k] / a + (x - b * u[k] / a) * math.exp(-a * 1.0)
        exact.append(x)
    np.testing.assert_allclose(res.x[0, :, 0], exact, atol=1e-7)


def test_undamped_unforced_pendulum_conserves_energy():
    sys_ = make_system("pendulum", damped=False)
    t = np.linspace(0.0, 20.0, 401)
    p = np.array([[1.0, 0.0, 1.0], [1.7, 0.3, 0.6]])  # damping is dropped: the 0.3 must not matter
    x0 = np.array([[2.0, 0.0], [0.5, 1.5]])
    res = solve_looped(
        sys_,
        t,
        np.zeros((2, t.size, 1)),
        p,
        x0,
        SolverSettings(method="DOP853", rtol=1e-11, atol=1e-12),
    )
    e = sys_.energy(res.x, p[:, None, :])
    assert np.max(np.abs(e - e[:, :1]) / e[:, :1]) < 1e-8
    # and a damped one loses energy monotonically
    damped = solve_looped(make_system("pendulum"), t, np.zeros((2, t.size, 1)), p, x0)
    ed = make_system("pendulum").energy(damped.x, p[:, None, :])[1]
    assert np.all(np.diff(ed) <= 1e-9) and ed[-1] < 0.2 * ed[0]


def test_thermal_rc_reaches_analytic_steady_state():
    sys_ = make_system("thermal_rc")
    Ca, Cw, Raw, Rwo, Rwin, fs = 0.5, 10.0, 2.0, 5.0, 10.0, 0.3
    To, Qs, Qh = 5.0, 1.0, 2.0
    # 0 = (Tw-Ta)/Raw + (To-Ta)/Rwin + Qh + fs Qs ; 0 = (Ta-Tw)/Raw + (To-Tw)/Rwo + (1-fs) Qs
    # (Cramer's rule)
    a11, a12, r1 = -(1 / Raw + 1 / Rwin), 1 / Raw, -(To / Rwin + Qh + fs * Qs)
    a21, a22, r2 = 1 / Raw, -(1 / Raw + 1 / Rwo), -(To / Rwo + (1 - fs) * Qs)
    det = a11 * a22 - a12 * a21
    Ta, Tw = (r1 * a22 - a12 * r2) / det, (a11 * r2 - a21 * r1) / det
    t = np.linspace(0.0, 2000.0, 201)  # ~50 of the slow (envelope) time constant
    u = np.broadcast_to(np.array([To, Qs, Qh]), (1, t.size, 3))
    res = solve_looped(
        sys_,
        t,
        u,
        np.array([[Ca, Cw, Raw, Rwo, Rwin, fs]]),
        np.array([[15.0, 12.0]]),
        SolverSettings(rtol=1e-10, atol=1e-10),
    )
    np.testing.assert_allclose(res.x[0, -1], [Ta, Tw], atol=1e-6)


@pytest.mark.parametrize("method", ["BDF", "Radau", "LSODA"])
def test_robertson_matches_published_reference(method):
    # Hairer & Wanner, Solving ODEs II, sec. IV.1: values at t = 40
    sys_ = make_system("robertson")
    t = np.array([0.0, 40.0])
    res = solve_looped(
        sys_,
        t,
        np.zeros((1, 2, 0)),
        sys_.nominal_parameters[None],
        np.array([[1.0, 0.0, 0.0]]),
        SolverSettings(method=method, rtol=1e-10, atol=1e-14),
    )
    np.testing.assert_allclose(
        res.x[0, -1], [0.7158270687, 9.185534764e-6, 0.2841637457], rtol=1e-6
    )
    assert abs(res.x[0, -1].sum() - 1.0) < 1e-9  # mass is conserved


def test_cstr_default_solver_matches_tight_radau_reference():
    sys_ = make_system("cstr")
    t = np.linspace(0.0, 10.0, 201)
    u = np.broadcast_to(np.array([303.0, 350.0]), (1, t.size, 2)).copy()
    u[0, 100:, 0] = 298.0  # a coolant step
    p, x0 = sys_.nominal_parameters[None], np.array([[0.5, 350.0]])
    ref = solve_looped(sys_, t, u, p, x0, SolverSettings(method="Radau", rtol=1e-12, atol=1e-12))
    tight = solve_looped(
        sys_, t, u, p, x0, SolverSettings(rtol=1e-10, atol=1e-12)
    )  # LSODA, the preferred
    default = solve_looped(sys_, t, u, p, x0)  # LSODA at the default tolerances
    assert ref.status[0] == OK and tight.status[0] == OK and default.status[0] == OK
    np.testing.assert_allclose(tight.x, ref.x, rtol=1e-6, atol=1e-9)
    # through ignition the default tolerances keep the error within 0.1% of each state's range
    span = np.ptp(ref.x[0], axis=0)
    assert np.max(np.abs(default.x[0] - ref.x[0]) / span) < 1e-3
    assert np.ptp(ref.x[0, :, 1]) > 5.0  # the scenario really moves the temperature


@pytest.mark.parametrize("k_lin", [None, 0.004])
def test_cascaded_tanks_torricelli_steady_state(k_lin):
    sys_ = make_system("cascaded_tanks", overflow=False, linear_inflow=k_lin)
    k1, k2, k3, k4, pump = 0.05, 0.04, 0.06, 0.025, 4.0
    t = np.linspace(0.0, 5000.0, 101)
    res = solve_looped(
        sys_,
        t,
        np.full((1, t.size, 1), pump),
        np.array([[k1, k2, k3, k4, 0.5]]),
        np.array([[1.0, 1.0]]),
        SolverSettings(rtol=1e-10, atol=1e-12),
    )
    h1 = (k4 * pump / k1) ** 2
    inflow = (
        k2 * math.sqrt(h1) + (k_lin or 0.0) * h1
    )  # the lower tank's inflow = k3 sqrt(h2) at rest
    np.testing.assert_allclose(res.x[0, -1], [h1, (inflow / k3) ** 2], rtol=1e-6)


def test_cascaded_tanks_linear_inflow_is_checked_and_recorded():
    with pytest.raises(ValueError, match="linear_inflow must be >= 0"):
        make_system("cascaded_tanks", linear_inflow=-0.1)
    assert (
        "linear_inflow" not in make_system("cascaded_tanks").options
    )  # off: older manifests hash the same
    assert make_system("cascaded_tanks", linear_inflow=0.004).options["linear_inflow"] == 0.004


def test_cascaded_tanks_overflow_caps_the_upper_tank():
    t = np.linspace(0.0, 3000.0, 301)
    u = np.full((1, t.size, 1), 9.0)  # Torricelli alone would settle at h1 = 20.25 V
    p = np.array([[0.05, 0.05, 0.05, 0.025, 0.5]])
    free = solve_looped(
        make_system("cascaded_tanks", overflow=False), t, u, p, np.array([[5.0, 5.0]])
    )
    capped = solve_looped(make_system("cascaded_tanks"), t, u, p, np.array([[5.0, 5.0]]))
    assert free.x[0, -1, 0] > 19.0
    assert 10.0 < capped.x[0, -1, 0] < 10.5


def test_linear_duffing_matches_damped_oscillator():
    sys_ = make_system("duffing")
    w0, z = 380.0, 0.05
    t = np.linspace(0.0, 0.05, 101)
    res = solve_looped(
        sys_,
        t,
        np.zeros((1, t.size, 1)),
        np.array([[w0, z, 0.0, 1.4e5]]),
        np.array([[0.01, 0.0]]),
        SolverSettings(rtol=1e-10, atol=1e-12),
    )
    wd = w0 * math.sqrt(1 - z**2)
    exact = 0.01 * np.exp(-z * w0 * t) * (np.cos(wd * t) + z * w0 / wd * np.sin(wd * t))
    np.testing.assert_allclose(res.x[0, :, 0], exact, atol=1e-9)


def small(name: str):
    """The system, on a coarse grid when it is a field system (the same code, fewer cells)."""
    cls = system_class(name)
    if issubclass(cls, FieldSystem):
        return make_system(name, shape=[5] * len(cls.default_shape))
    return make_system(name)


@pytest.mark.parametrize("name", list_systems())
def test_numpy_and_torch_rhs_agree(name, rng):
    torch = pytest.importorskip("torch")
    sys_ = small(name)
    n = 64
    lo = np.array([s.bounds[0] for s in sys_.states]), np.array([s.bounds[1] for s in sys_.states])
    x = lo[0] + rng.random((n, len(sys_.states))) * (lo[1] - lo[0] + 1e-3)
    if sys_.state_size != len(sys_.states):  # a field system: its fields, lifted and perturbed
        x = sys_.initial_state(x) * (1.0 + 0.05 * rng.standard_normal((n, sys_.state_size)))
    u = np.array([i.bounds[0] for i in sys_.inputs]) + rng.random((n, len(sys_.inputs))) * np.array(
        [i.bounds[1] - i.bounds[0] for i in sys_.inputs]
    )
    p = np.array([q.bounds[0] for q in sys_.parameters]) + rng.random(
        (n, len(sys_.parameters))
    ) * np.array([q.bounds[1] - q.bounds[0] for q in sys_.parameters])
    ref = sys_.rhs(0.0, x, u, p)
    got = sys_.rhs(0.0, *(torch.from_numpy(a) for a in (x, u, p)))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.shape == ref.shape
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    # differentiable: the hybrid models of the next layer backpropagate through it
    xt = torch.from_numpy(x).requires_grad_(True)
    sys_.rhs(0.0, xt, torch.from_numpy(u), torch.from_numpy(p)).sum().backward()
    assert torch.isfinite(xt.grad).all()
    np.testing.assert_allclose(
        sys_.observe(torch.from_numpy(x), None, None).numpy(), sys_.observe(x, None, None)
    )


class Blowup(PhysicsSystem):
    """dx/dt = p x^2: finite-time blow-up at t = 1/(p x0) for p > 0."""

    states = (State("x", "1", bounds=(1.0, 1.0)),)
    outputs = (Output("x", "1"),)
    parameters = (Parameter("p", "1", nominal=0.0, bounds=(-1.0, 1.0)),)
    divergence_limit = 1e6

    def rhs(self, t, x, u, p):
        return p[..., None] * x**2


def test_failures_are_recorded_per_scenario_not_raised():
    t = np.linspace(0.0, 2.0, 21)
    p = np.array([[-1.0], [1.0], [0.0]])  # decays, blows up at t=1, stays
    res = solve_looped(Blowup(), t, np.zeros((3, t.size, 0)), p, np.ones((3, 1)))
    assert res.status.tolist()[0] == OK and res.status[2] == OK
    assert res.status[1] in (FAILED_DIVERGED, FAILED_NONFINITE) and res.reasons[1]
    assert np.isnan(res.x[1]).all() and np.isnan(res.y[1]).all()  # marked, never silent
    assert np.isfinite(res.x[[0, 2]]).all()
    np.testing.assert_allclose(
        res.x[0, :, 0], 1.0 / (1.0 + t), rtol=1e-5
    )  # the survivors are right


def test_too_many_steps_is_a_recorded_failure():
    sys_ = make_system("robertson")
    t = np.linspace(0.0, 40.0, 11)
    res = solve_looped(
        sys_,
        t,
        np.zeros((1, t.size, 0)),
        sys_.nominal_parameters[None],
        np.array([[1.0, 0.0, 0.0]]),
        SolverSettings(method="RK45", max_rhs_evals=500),
    )  # explicit on a stiff problem
    assert res.status[0] == FAILED_MAX_STEPS and "500" in res.reasons[0]


@pytest.mark.parametrize("name", list_systems())
def test_stacked_solve_agrees_with_looped(name, rng):
    sys_ = small(name)
    from twin_ml.data import ScenarioDesign
    from twin_ml.physics.signals import generate

    design = ScenarioDesign()
    sc = design.sample(sys_, 6, seed=3).rows(0, 6)
    t = design.time_grid(sys_)[:60]
    specs = design.signal_specs(sys_)
    u = np.zeros((6, t.size, len(specs)))
    for i in range(6):
        for j, spec in enumerate(specs):
            u[i, :, j] = generate(
                spec, t, sc.offset[i, j], sc.amplitude[i, j], rng, clip=tuple(sc.clip[i, j])
            )
    tight = SolverSettings(rtol=1e-9, atol=1e-11)
    a = solve_looped(sys_, t, u, sc.p, sc.x0, tight)
    b = solve_stacked(sys_, t, u, sc.p, sc.x0, tight)
    assert (a.status == OK).all() and (b.status == OK).all()
    scale = np.abs(a.x).max(axis=(0, 1)) + 1e-12
    assert np.max(np.abs(a.x - b.x) / scale) < 1e-5


def test_solver_settings_are_validated():
    with pytest.raises(ValueError, match="solver.method must be one of"):
        SolverSettings(method="Euler")
    with pytest.raises(ValueError, match="solver.rtol must be > 0"):
        SolverSettings(rtol=0.0)


def test_bad_batch_shapes_name_the_array():
    sys_ = make_system("pendulum")
    with pytest.raises(ValueError, match=r"u must have shape \(2, 3, 1\)"):
        solve_looped(sys_, np.arange(3.0), np.zeros((2, 4, 1)), np.ones((2, 3)), np.zeros((2, 2)))


def test_a_short_held_pulse_is_not_stepped_over():
    # one 4 s pump pulse in 1000 s: an adaptive solver over the whole horizon would jump it
    sys_ = make_system("cascaded_tanks", overflow=False)
    t = np.arange(0.0, 1004.0, 4.0)
    u = np.zeros((1, t.size, 1))
    u[0, 50, 0] = 8.0  # held on [200, 204)
    p = np.array([[0.05, 0.05, 0.05, 0.025, 0.5]])
    res = solve_looped(sys_, t, u, p, np.array([[1.0, 1.0]]))
    # during the pulse h1 gains ~k4 * u * 4 s (the drain changes little in 4 s)
    gain = res.x[0, 51, 0] - res.x[0, 50, 0]
    exact_drain_free = 0.025 * 8.0 * 4.0
    assert 0.8 * exact_drain_free < gain < 1.0 * exact_drain_free
    stacked = solve_stacked(
        sys_, t, np.repeat(u, 2, 0), np.repeat(p, 2, 0), np.array([[1.0, 1.0], [2.0, 2.0]])
    )
    np.testing.assert_allclose(stacked.x[0], res.x[0], rtol=1e-4, atol=1e-6)


def test_prbs_held_input_matches_piecewise_reference():
    # FirstOrderHeld under a fast PRBS: the exact answer is piecewise exponential, step by step
    t = np.arange(0.0, 10.05, 0.1)
    rng = np.random.default_rng(0)
    u = rng.choice([-1.0, 1.0], size=t.size)
    a, b = 3.0, 2.0
    res = solve_looped(FirstOrderHeld(), t, u[None, :, None], np.array([[a, b]]), np.array([[0.0]]))
    x, exact = 0.0, [0.0]
    for k in range(t.size - 1):
        x = b * u[k] / a + (x - b * u[k] / a) * math.exp(-a * 0.1)
        exact.append(x)
    np.testing.assert_allclose(res.x[0, :, 0], exact, atol=1e-6)


def test_outputs_on_a_requested_grid():
    t = np.linspace(0.0, 4.0, 9)
    a, b, c0, c1, x0 = 2.0, 1.5, 0.3, 0.4, 0.8
    t_out = np.array([0.05, 1.3, 2.71, 4.0])
    res = solve_looped(
        FirstOrder(),
        t,
        (c0 + c1 * t)[None, :, None],
        np.array([[a, b]]),
        np.array([[x0]]),
        SolverSettings(rtol=1e-10, atol=1e-12),
        t_out=t_out,
    )
    exact = (
        b / a * (c0 + c1 * t_out)
        - b * c1 / a**2
        + (x0 - b * c0 / a + b * c1 / a**2) * np.exp(-a * t_out)
    )
    assert res.x.shape == (1, 4, 1)
    np.testing.assert_allclose(res.x[0, :, 0], exact, atol=1e-8)
    with pytest.raises(ValueError, match="t_out must lie inside the input grid"):
        solve_looped(
            FirstOrder(), t, np.zeros((1, 9, 1)), np.array([[a, b]]), np.array([[x0]]), t_out=[5.0]
        )
