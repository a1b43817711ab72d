"""The ensemble Kalman analysis against the Kalman filter: with a linear observation operator and
the ensemble's own sample moments as the prior, the ETKF's analysis mean and sample covariance are
the Kalman filter's exactly (float64 rounding); the stochastic EnKF's are in expectation (Monte
Carlo tolerances from the ensemble size)."""

import json
import math

import numpy as np
import pytest
from conftest import assert_close, rollout_tol

from twin_ml.assimilate import enkf, etkf, gaspari_cohn, letkf

EPS = np.finfo(np.float64).eps


def _kalman(mean, P, H, y, r):
    S = H @ P @ H.T + np.diag(r**2)
    K = P @ H.T @ np.linalg.inv(S)
    d = y - H @ mean
    return mean + K @ d, (np.eye(len(mean)) - K @ H) @ P, float(d @ np.linalg.solve(S, d))


def _moments(X):
    return X.mean(axis=0), np.cov(X, rowvar=False)


@pytest.mark.parametrize("m", [1, 3])  # one output: the analysis in scalars; several: k x k
@pytest.mark.parametrize("inflation", [1.0, 1.3])
def test_etkf_is_the_kalman_filter_for_a_linear_observation(inflation, m):
    rng = np.random.default_rng(0)
    n, N = 4, 12
    X = rng.normal(size=(N, n)) @ rng.normal(size=(n, n)) + rng.normal(size=n)
    H = rng.normal(size=(m, n))
    y, r = rng.normal(size=m), np.array([0.3, 0.5, 0.8])[:m]
    mean, P = _moments(X)
    want_mean, want_P, want_nis = _kalman(mean, inflation * P, H, y, r)
    Xa, inn = etkf(X, X @ H.T, y, r, inflation=inflation)
    got_mean, got_P = _moments(Xa)
    scale = np.abs(X).max() ** 2 * N * n  # the sums behind the moments
    assert np.allclose(got_mean, want_mean, rtol=0, atol=1e3 * EPS * scale)
    assert np.allclose(got_P, want_P, rtol=0, atol=1e3 * EPS * scale)
    assert inn.nis == pytest.approx(want_nis, rel=1e6 * EPS) and inn.measured == m


@pytest.mark.parametrize("m", [1, 3])
def test_etkf_many_is_etkf_ensemble_by_ensemble(m):
    """K ensembles of their own (each its own data, noise and inflation) analysed at once give
    what `etkf` gives each alone: the same arithmetic, vectorized (float64 rounding apart)."""
    from twin_ml.assimilate.analysis import etkf_many

    rng = np.random.default_rng(5)
    K, N, n = 4, 10, 3
    X = rng.normal(size=(K, N, n)) * np.array([1.0, 10.0, 0.1])
    H = rng.normal(size=(K, m, n))
    HX = np.einsum("kni,kmi->knm", X, H)
    y, r = rng.normal(size=(K, m)), rng.uniform(0.1, 1.0, size=(K, m))
    inflation = np.array([1.0, 1.1, 1.3, 2.0])
    got, inns = etkf_many(X, HX, y, r, inflation)
    scale = np.abs(X).max() * N * n
    for k in range(K):
        want, inn = etkf(X[k], HX[k], y[k], r[k], inflation=inflation[k])
        assert np.allclose(got[k], want, rtol=0, atol=1e3 * EPS * scale)
        assert np.allclose(inns[k].d, inn.d, rtol=1e3 * EPS)
        assert np.allclose(inns[k].std, inn.std, rtol=1e3 * EPS)
        assert inns[k].nis == pytest.approx(inn.nis, rel=1e6 * EPS) and inns[k].measured == m
    with pytest.raises(ValueError, match="fully measured"):
        etkf_many(X, HX, np.where(np.arange(m) == 0, np.nan, y), r, inflation)
    with pytest.raises(ValueError, match="must agree"):
        etkf_many(X, HX[:, :, :1], y, r, inflation) if m > 1 else etkf_many(X, HX, y[:2], r, 1)


def test_an_unmeasured_output_takes_no_part():
    rng = np.random.default_rng(1)
    n, N = 3, 8
    X = rng.normal(size=(N, n))
    H = rng.normal(size=(2, n))
    y, r = np.array([0.4, np.nan]), np.array([0.2, 0.2])
    Xa, inn = etkf(X, X @ H.T, y, r)
    want_mean, want_P, _ = _kalman(*_moments(X), H[:1], y[:1], r[:1])
    got_mean, got_P = _moments(Xa)
    assert np.allclose(got_mean, want_mean, atol=1e-12) and np.allclose(got_P, want_P, atol=1e-12)
    assert inn.measured == 1 and np.isnan(inn.d[1]) and np.isnan(inn.std[1])
    nothing, inn = etkf(X, X @ H.T, np.full(2, np.nan), r)
    assert np.allclose(nothing, X, rtol=0, atol=4 * EPS * np.abs(X).max())  # x = mean + anomaly
    assert inn.measured == 0 and inn.nis == 0.0


def test_a_linear_filter_run_follows_the_kalman_filter_and_its_nis_is_chi_square():
    """x_k+1 = F x_k + w (w as inflation-free additive noise on every member: the forecast
    ensemble's sample covariance is then not exactly F P F' + Q, so the run is compared with
    the Kalman filter in distribution: the NIS has mean m over the run)."""
    rng = np.random.default_rng(2)
    F = np.array([[1.0, 0.1], [-0.2, 0.95]])
    H = np.array([[1.0, 0.0]])
    q, r = 0.05, np.array([0.1])
    truth = np.array([1.0, 0.0])
    X = rng.normal(size=(200, 2)) * 0.5
    nis = []
    for _ in range(400):
        truth = F @ truth + rng.normal(size=2) * q
        X = X @ F.T + rng.normal(size=X.shape) * q
        y = H @ truth + rng.normal(size=1) * r
        X, inn = etkf(X, X @ H.T, y, r)
        nis.append(inn.nis)
    # the NIS of a consistent filter: chi-square(1), mean 1, sd of a mean of 400 ~ sqrt(2 / 400)
    # (consecutive steps are near independent); 5 sd, plus the 200-member sampling of the prior
    assert abs(np.mean(nis) - 1.0) < 5 * np.sqrt(2 / 400) + 0.1
    assert abs(X.mean(axis=0)[0] - truth[0]) < 5 * np.sqrt(np.cov(X, rowvar=False)[0, 0])


def test_stochastic_enkf_matches_the_kalman_filter_in_expectation():
    rng = np.random.default_rng(3)
    n, m, N = 3, 2, 40_000
    L = rng.normal(size=(n, n))
    X = rng.normal(size=(N, n)) @ L + np.array([1.0, -1.0, 0.5])
    H = rng.normal(size=(m, n))
    y, r = np.array([0.3, -0.2]), np.array([0.4, 0.6])
    mean, P = _moments(X)
    want_mean, want_P, _ = _kalman(mean, P, H, y, r)
    Xa, _ = enkf(X, X @ H.T, y, r, rng)
    got_mean, got_P = _moments(Xa)
    sd = np.sqrt(np.diag(want_P))
    # the mean's Monte Carlo error: sd / sqrt(N) (the perturbations' too); 6 of it
    assert np.all(np.abs(got_mean - want_mean) < 6 * sd / np.sqrt(N) * 2)
    # a sample covariance's relative error ~ sqrt(2 / N) per element: 6 of it, on the scale
    # of the diagonal
    tol = 6 * np.sqrt(2 / N) * np.sqrt(np.outer(np.diag(want_P), np.diag(want_P)))
    assert np.all(np.abs(got_P - want_P) < tol)


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros((1, 2)), np.zeros((1, 1)), np.zeros(1), np.ones(1)), "at least 2 members"),
        ((np.zeros((3, 2)), np.zeros((2, 1)), np.zeros(1), np.ones(1)), "must share N"),
        ((np.zeros((3, 2)), np.zeros((3, 1)), np.zeros(2), np.ones(2)), "y and r must be"),
        ((np.zeros((3, 2)), np.zeros((3, 1)), np.zeros(1), np.zeros(1)), "finite and > 0"),
        ((np.full((3, 2), np.nan), np.zeros((3, 1)), np.zeros(1), np.ones(1)), "non-finite"),
    ],
)
def test_bad_arguments_are_refused_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        etkf(*args)
    with pytest.raises(ValueError, match="inflation"):
        etkf(np.zeros((3, 2)), np.zeros((3, 1)), np.zeros(1), np.ones(1), inflation=0.5)


# ---- localization ------------------------------------------------------------------------------
def test_letkf_with_zero_one_weights_is_each_component_s_kalman_filter_on_its_measurements():
    """R-localization with weights 0 or 1: each state component's analysis mean and variance are
    the Kalman filter's given only the measurements weighted 1 for it (weights of 1 everywhere:
    the global filter; a component with none: its forecast)."""
    rng = np.random.default_rng(4)
    n, m, N = 5, 3, 9
    X = rng.normal(size=(N, n)) @ rng.normal(size=(n, n))
    H = rng.normal(size=(m, n))
    y, r = rng.normal(size=m), np.array([0.4, 0.6, 0.5])
    W = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=float)
    Xa, inn = letkf(X, X @ H.T, y, r, W, inflation=1.2)
    mean, P = _moments(X)
    got_mean, got_P = _moments(Xa)
    scale = np.abs(X).max() ** 2 * N * n
    for i, w in enumerate(W):
        use = w > 0
        want_mean, want_P = mean[i], 1.2 * P[i, i]
        if use.any():
            km, kP, _ = _kalman(mean, 1.2 * P, H[use], y[use], r[use])
            want_mean, want_P = km[i], kP[i, i]
        assert got_mean[i] == pytest.approx(want_mean, abs=1e3 * EPS * scale), i
        assert got_P[i, i] == pytest.approx(want_P, abs=1e3 * EPS * scale), i
    g_mean, _ = _moments(letkf(X, X @ H.T, y, r, np.ones((n, m)))[0])
    assert np.allclose(g_mean, _moments(etkf(X, X @ H.T, y, r)[0])[0], atol=1e3 * EPS * scale)
    _, _, want_nis = _kalman(mean, 1.2 * P, H, y, r)
    assert inn.nis == pytest.approx(want_nis, rel=1e6 * EPS)  # the innovation is global
    with pytest.raises(ValueError, match=r"weights must be \[n, m\]"):
        letkf(X, X @ H.T, y, r, np.ones((n, m + 1)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        letkf(X, X @ H.T, y, r, np.full((n, m), 1.5))


def test_gaspari_cohn_is_one_at_zero_zero_from_twice_the_radius_and_continuous():
    z = np.array([0.0, 1.0 - 1e-12, 1.0 + 1e-12, 2.0, 3.0])
    w = gaspari_cohn(z * 2.5, 2.5)
    assert w[0] == 1.0 and w[3] == 0.0 and w[4] == 0.0
    assert w[1] == pytest.approx(5 / 24, abs=1e-9) and w[2] == pytest.approx(5 / 24, abs=1e-9)
    assert np.all(np.diff(gaspari_cohn(np.linspace(0, 6, 200), 2.5)) <= 0)
    with pytest.raises(ValueError, match="radius"):
        gaspari_cohn(1.0, 0.0)


def test_localization_beats_the_global_filter_on_a_large_state_with_a_small_ensemble():
    """A 40-component ring (advection and diffusion, x' = F x + w), every 2nd component
    measured, 10 members: the global ETKF's sample correlations between far components are
    noise and it does worse than the local ETKF with a Gaspari-Cohn taper (radius 2). Both are
    compared on the same record with the same draws; the filtered mean's RMS error over 250
    steps after a spin-up (measured: 0.51 global, 0.38 local)."""
    n, N = 40, 10
    F = np.zeros((n, n))
    for i in range(n):
        F[i, i], F[i, (i - 1) % n], F[i, (i + 1) % n] = 0.6, 0.25, 0.15
    obs = np.arange(0, n, 2)
    H = np.eye(n)[obs]
    r, q = np.full(len(obs), 0.5), 0.3
    dist = np.abs(np.arange(n)[:, None] - obs[None, :])
    W = gaspari_cohn(np.minimum(dist, n - dist), 2.0)

    def run(W):
        rng = np.random.default_rng(3)
        truth, X = rng.normal(size=n), rng.normal(size=(N, n))
        err = []
        for k in range(300):
            truth = F @ truth + rng.normal(size=n) * q
            X = X @ F.T + rng.normal(size=X.shape) * q
            y = H @ truth + rng.normal(size=len(obs)) * r
            X = (etkf(X, X @ H.T, y, r, 1.1) if W is None else letkf(X, X @ H.T, y, r, W, 1.1))[0]
            if k >= 50:
                err.append(np.sqrt(np.mean((X.mean(axis=0) - truth) ** 2)))
        return np.mean(err)

    glob, local = run(None), run(W)
    assert local < 0.85 * glob, (local, glob)


# ---- filtering a record: the physics as the forecast -------------------------------------------
def _tanks_record(seed=0, steps=300, drop_at=150, drop=0.8):
    """A cascaded-tanks record from the solver, dt = 4 s, a pump of random held levels, and the
    lower tank's outflow coefficient k3 dropping by 20% at step `drop_at` (a clogging outlet);
    h2 measured with noise 0.05."""
    from twin_ml.physics import make_system
    from twin_ml.physics.solver import solve_stacked

    system = make_system("cascaded_tanks")
    rng = np.random.default_rng(seed)
    t = np.arange(steps + 1) * 4.0
    u = np.repeat(rng.uniform(2.0, 6.0, steps // 20 + 1), 20)[: steps + 1, None]
    p = system.nominal_parameters.copy()
    x = np.empty((steps + 1, 2))
    x[0] = [4.0, 3.0]
    for k in range(steps):
        pk = p.copy()
        if k >= drop_at:
            pk[2] *= drop
        step = solve_stacked(system, t[k : k + 2], u[None, k : k + 2], pk[None], x[k][None])
        x[k + 1] = step.x[0, -1]
    r = np.array([0.05])
    y = x[:, [1]] + rng.normal(size=(steps + 1, 1)) * r
    return system, t, u, x, y, r, p


def test_the_filter_tracks_a_drifting_parameter_and_beats_the_open_loop():
    """Joint state-parameter ETKF on the tanks' physics (the true model), k3 estimated: before the
    drop its estimate sits at the true value, and within 50 samples after the 20% drop it has
    moved to the new one (within 5%; the estimate's own std is ~2%); the one-step
    prediction's error is far below the open loop's (simulation from the prior, no data), and
    the filtered band covers the measurements as often as its level says."""
    from twin_ml.assimilate.filter import FilterSettings, SolverForecast, run_filter

    system, t, u, x, y, r, p = _tanks_record()
    settings = FilterSettings(members=24, parameters=("k3",), walk=0.01, inflation=1.02)
    prior_p = p.copy()
    prior_p[2] *= 1.1  # a 10% wrong guess to start from
    res = run_filter(
        system,
        SolverForecast(system),
        t,
        u,
        y,
        r,
        (np.array([4.0, 3.0]), np.array([0.3, 0.3])),
        (prior_p, np.full(5, 0.1)),
        settings,
    )
    k3 = res.parameter_mean[:, 0]
    true_before, true_after = p[2], 0.8 * p[2]
    assert np.all(np.abs(k3[100:150] / true_before - 1) < 0.05), k3[100:150]
    assert np.all(np.abs(k3[200:] / true_after - 1) < 0.05), k3[200:]
    # the open loop: the physics from the prior's guess, no measurement
    from twin_ml.physics.solver import solve_stacked

    open_loop = solve_stacked(system, t, u[None], prior_p[None], np.array([[4.0, 3.0]])).x[0]
    err_open = np.sqrt(np.mean((open_loop[1:, 1] - x[1:, 1]) ** 2))
    err_1 = np.sqrt(np.mean((res.predicted_mean[1:, 0] - x[1:, 1]) ** 2))
    assert err_1 < 0.5 * err_open, (err_1, err_open)
    # the one-step prediction's 90% band (with the measurement noise) around the measurements:
    # 300 steps, binomial sd of a 0.9 coverage ~ 0.017; 4 of it, plus the filter's own
    # approximation (a 24-member ensemble)
    z = np.abs(y[1:, 0] - res.predicted_mean[1:, 0]) / res.predicted_std[1:, 0]
    assert abs(np.mean(z < 1.6449) - 0.9) < 4 * 0.017 + 0.03
    assert np.all(res.measured[1:] == 1) and np.all(np.isfinite(res.nis))


def test_filter_settings_are_checked_by_name():
    from twin_ml.assimilate.filter import FilterSettings

    names = ["k1", "k2"]
    with pytest.raises(ValueError, match="filter.method"):
        FilterSettings(method="ukf").check(names)
    with pytest.raises(ValueError, match="filter.members"):
        FilterSettings(members=1).check(names)
    with pytest.raises(ValueError, match=r"filter.parameters: unknown names \['k9'\]"):
        FilterSettings(parameters=("k9",)).check(names)
    with pytest.raises(ValueError, match="filter.localization: one weight per state"):
        FilterSettings(localization=((1.0,),)).check(names, 2, 1)
    with pytest.raises(ValueError, match="filter.localization: weights must lie"):
        FilterSettings(localization=((1.0,), (-0.1,))).check(names, 2, 1)
    with pytest.raises(ValueError, match="filter.localization is built for the ETKF"):
        FilterSettings(method="enkf", localization=((1.0,), (1.0,))).check(names, 2, 1)
    with pytest.raises(ValueError, match=r"filter.band_scale needs one factor per output \(1\)"):
        FilterSettings(band_scale=(1.0, 1.0)).check(names, 2, 1)
    with pytest.raises(ValueError, match="filter.band_scale: factors must be finite and > 0"):
        FilterSettings(band_scale=(0.0,)).check(names, 2, 1)


# ---- the exported ensemble as the forecast ------------------------------------------------------
@pytest.fixture(scope="module")
def exported_pendulum(pendulum_hybrid_run):
    from twin_ml.export.export import export_run

    run, _ = pendulum_hybrid_run
    blob, card = export_run(run, name="pend", version="v1", parity_scenarios=4, parity_steps=10)
    return blob, card


def test_the_onnx_forecast_steps_each_member_as_the_rollout_does(exported_pendulum):
    """Member i of the filter stepped by network i mod M from its own state (`x_members`) lands
    where the ensemble's own rollout puts network i's trajectory one step on (the `members`
    output at the next grid point, observed through the system's outputs), for M and 2M filter
    members. One float32 graph, different batch compositions: float32 tolerances. The first step
    runs the rollout's graph and checks the one-interval graph against it; the later steps run
    the one-interval graph (no Loop, no outputs), so both are held to the rollout here."""
    from twin_ml._ort import session
    from twin_ml.assimilate.filter import OnnxForecast, one_interval_graph

    blob, card = exported_pendulum
    system = card.system.build()
    forecast = OnnxForecast(blob, card, widen=False)  # the networks' own steps
    m, dt = card.members, card.time.dt
    x0 = np.array([0.3, -0.2])
    p = np.array([1.0, 0.2, 1.0])
    u = np.array([0.1])
    rolled = session(blob).run(
        ["members"],
        {
            "x0": x0[None].astype(np.float32),
            "u": np.full((1, 2, 1), 0.1, np.float32),  # held at 0.1 over the first interval
            "p": p[None].astype(np.float32),
        },
    )[0]  # [M, 1, 2, ny]
    for n in (m, 2 * m):
        X = np.broadcast_to(x0, (n, 2))
        P = np.broadcast_to(p, (n, 3))
        x1 = forecast(X, P, 0.0, dt, u, u)
        y1 = system.observe(x1, np.zeros((n, 1)), P)
        want = rolled[np.arange(n) % m, 0, 1]
        assert np.allclose(y1, want, rtol=1e-5, atol=1e-6), (y1, want)
        assert forecast.lean  # from the first step on, once checked
    lean = session(one_interval_graph(blob))
    assert {i.name for i in lean.get_inputs()} <= {"u", "p", "x_members"}
    assert [o.name for o in lean.get_outputs()] == ["x_end"]
    with pytest.raises(ValueError, match="the model steps dt"):
        forecast(X, P, 0.0, 2 * dt, u, u)


def test_the_onnx_forecast_takes_a_linear_input_inside_the_interval_as_the_rollout_does(
    exported_pendulum,
):
    """The torque (a linear input) ramps from 0.1 to 0.9 over one interval. Each member's step
    lands where the rollout's first interval over [0.1, 0.9] puts that network's trajectory (its
    `members` output at the next grid point): the model's own input inside the interval, as it
    was trained. Holding the midpoint torque instead (what a one-value step does) lands
    measurably elsewhere: the check can tell the two apart."""
    from twin_ml._ort import session
    from twin_ml.assimilate.filter import OnnxForecast

    blob, card = exported_pendulum
    system = card.system.build()
    forecast = OnnxForecast(blob, card, widen=False)
    m, dt = card.members, card.time.dt
    x0, p = np.array([0.3, -0.2]), np.array([1.0, 0.2, 1.0])
    u0, u1 = np.array([0.1]), np.array([0.9])

    def rolled(u):
        feeds = {"x0": x0[None].astype(np.float32), "p": p[None].astype(np.float32)}
        return session(blob).run(["members"], {**feeds, "u": np.asarray(u, np.float32)})[0]

    ramp = rolled([[[0.1], [0.9]]])[:, 0, 1]  # [M, ny]: one interval on, over the ramp
    held = rolled([[[0.5], [0.5]]])[:, 0, 1]  # the midpoint held
    X, P = np.broadcast_to(x0, (m, 2)), np.broadcast_to(p, (m, 3))
    y1 = system.observe(forecast(X, P, 0.0, dt, u0, u1), np.broadcast_to(u1, (m, 1)), P)
    tol = 1e-5 * max(1.0, float(np.abs(ramp).max()))
    assert np.allclose(y1, ramp, rtol=0, atol=tol), (y1, ramp)
    assert forecast.lean
    assert np.abs(held - ramp).max() > 10 * tol, np.abs(held - ramp).max()


def test_a_diverging_first_step_does_not_decide_the_one_interval_graph(exported_pendulum):
    """The first call checks the one-interval graph against the rollout. A first call whose
    members turn non-finite (an input float32 cannot hold) judges nothing: the graph is checked
    on the next call instead of being dropped for the process's life."""
    from twin_ml.assimilate.filter import OnnxForecast

    blob, card = exported_pendulum
    forecast = OnnxForecast(blob, card)
    m, dt = card.members, card.time.dt
    X, P = np.full((m, 2), 0.3), np.broadcast_to(np.array([1.0, 0.2, 1.0]), (m, 3))
    assert not np.isfinite(forecast(X, P, 0.0, dt, np.array([1e39]), np.array([1e39]))).all()
    assert not forecast.lean
    assert np.isfinite(forecast(X, P, 0.0, dt, np.array([0.1]), np.array([0.2]))).all()
    assert forecast.lean


@pytest.mark.parametrize("error", [False, True])
def test_filters_stepped_together_step_as_each_alone(exported_pendulum, error):
    """`step_many` over five twins' filters: three alike (their own seeds, inputs and
    measurements) share one forecast call and one analysis; one with an output not measured,
    one stochastic EnKF and, later, one whose sample comes after a gap step alone. Every filter's
    estimates and members are those it gives stepped alone; with `error`, each its own output
    error process too. The shared call steps 3 x 12
    members instead of 12: float32 rounding may differ per batch size, so the tolerance is
    float32's over the steps taken (a wrong network, input or random draw is off by the members'
    spread, ~1e-2)."""
    from twin_ml.assimilate.filter import EnsembleFilter, FilterSettings, OnnxForecast, step_many

    blob, card = exported_pendulum
    system, dt = card.system.build(), card.time.dt

    class Counted(OnnxForecast):  # the calls that stepped several ensembles at once
        shared = 0

        def __call__(self, *args, size=None, **kwargs):
            Counted.shared += size is not None and size < len(args[0])
            return super().__call__(*args, size=size, **kwargs)

    forecast = Counted(blob, card)
    kinds = ("predicted", "filtered", "state", "parameter")
    moments = [f"{kind}_{moment}" for kind in kinds for moment in ("mean", "std")]
    methods = ["etkf", "etkf", "etkf", "etkf", "enkf"]

    def start(k: int) -> EnsembleFilter:
        settings = FilterSettings(  # each its own settings: none may leak into another's
            method=methods[k],
            members=12,
            seed=k,
            process=(0.01 * (k + 1), 0.02),
            parameters=("damping",),
            inflation=1.0 + 0.05 * k,
            walk=0.01 * (k + 1),
            band_scale=(1.0 + 0.1 * k,),
            error_ar=((0.7 + 0.05 * k, -0.1),) if error else (),
            error_std=(0.01 * (k + 1),) if error else (),
        )
        x0 = (np.array([0.3 + 0.05 * k, 0.0]), np.array([0.1, 0.1]))
        p = (np.array([1.0, 0.2, 1.0]), np.array([0.0, 0.2, 0.0]))
        noise = [0.02 + 0.01 * k]
        return EnsembleFilter.start(system, forecast, noise, x0, p, 0.0, np.zeros(1), settings)

    together, alone = [start(k) for k in range(5)], [start(k) for k in range(5)]
    steps = 15
    for i in range(1, steps + 1):
        t = [i * dt] * 5
        if i > 8:
            t[2] = (i + 1) * dt  # twin 2 skips a grid point: its 9th sample is two steps on
        u = [np.array([0.1 * np.sin(0.3 * i + k)]) for k in range(5)]
        y = [np.array([0.3 * np.cos(0.2 * i) + 0.01 * k]) for k in range(5)]
        y[3] = np.array([np.nan]) if i % 3 == 0 else y[3]
        got = step_many(together, t, u, y)
        for k in range(5):
            want = alone[k].step(t[k], u[k], y[k])
            tol = rollout_tol(steps, max(1.0, float(np.abs(want.state_mean).max())))
            for name in moments:
                assert np.allclose(getattr(got[k], name), getattr(want, name), rtol=0, atol=tol)
            assert got[k].t == want.t
            assert np.allclose(together[k].X, alone[k].X, rtol=0, atol=tol)
            assert np.allclose(together[k].D, alone[k].D, rtol=0, atol=tol)
            assert together[k].D.shape == (12, 2 if error else 0)
            assert together[k].rng.bit_generator.state == alone[k].rng.bit_generator.state
    assert Counted.shared == steps  # the alike ones went together every time
    Counted.shared = 0


def test_filtering_a_record_with_the_exported_model_beats_its_open_loop(exported_pendulum):
    """A pendulum record from the solver (true parameters, 200 steps of the model's dt, theta
    measured with noise 0.02): the exported (tiny, 2-epoch) hybrid filtered with an ETKF of 30
    members predicts the next measurement with under half the error of its own open loop."""
    from twin_ml.assimilate.filter import FilterSettings, OnnxForecast, run_filter
    from twin_ml.physics.solver import solve_stacked

    blob, card = exported_pendulum
    system = card.system.build()
    dt, steps = card.time.dt, 200
    rng = np.random.default_rng(5)
    t = np.arange(steps + 1) * dt
    u = (0.2 * np.sin(0.7 * t))[:, None]
    p = np.array([1.0, 0.2, 1.0])
    truth = solve_stacked(system, t, u[None], p[None], np.array([[0.4, 0.0]])).x[0]
    r = np.array([0.02])
    y = truth[:, [0]] + rng.normal(size=(steps + 1, 1)) * r
    forecast = OnnxForecast(blob, card)
    res = run_filter(
        system,
        forecast,
        t,
        u,
        y,
        r,
        (np.array([0.3, 0.0]), np.array([0.1, 0.1])),
        (p, np.zeros(3)),
        FilterSettings(members=30, inflation=1.05),
    )
    X = np.array([[0.3, 0.0]])
    open_loop = [X[0, 0]]
    for k in range(steps):
        X = forecast(X.repeat(1, 0), p[None], t[k], t[k + 1], u[k], u[k + 1])
        open_loop.append(X[0, 0])
    err_open = np.sqrt(np.mean((np.array(open_loop)[1:] - truth[1:, 0]) ** 2))
    err_1 = np.sqrt(np.mean((res.predicted_mean[1:, 0] - truth[1:, 0]) ** 2))
    assert err_1 < 0.5 * err_open, (err_1, err_open)


# ---- one sample at a time: the live twin's filter ----------------------------------------------
class _Linear:
    """x_k+1 = F x_k + B u (a system the filter can take: names and an observation function),
    with its forecast: exact, any whole number of `dt` steps by stepping."""

    parameter_names, state_names, output_names = ["a"], ["x1", "x2"], ["y"]
    F = np.array([[1.0, 0.1], [-0.2, 0.95]])
    B = np.array([0.0, 0.1])
    dt = 1.0

    def observe(self, X, U, P):
        return X[:, :1]

    def __call__(self, X, P, t0, t1, u0, u1):
        assert self.dt is None or np.isclose(t1 - t0, self.dt)
        return X @ self.F.T + np.outer(np.full(len(X), (u0[0] + u1[0]) / 2), self.B)


def _linear_record(steps=400, seed=4, q=0.03, r=0.1, bias_from=None, bias=0.0):
    rng = np.random.default_rng(seed)
    lin = _Linear()
    t = np.arange(steps + 1) * lin.dt
    u = np.sin(0.05 * t)[:, None]
    x = np.zeros((steps + 1, 2))
    x[0] = [1.0, 0.0]
    for k in range(steps):
        x[k + 1] = lin(x[k][None], None, t[k], t[k + 1], u[k], u[k + 1])[0] + rng.normal(size=2) * q
    y = x[:, :1] + rng.normal(size=(steps + 1, 1)) * r
    if bias_from is not None:
        y[bias_from:] += bias
    return lin, t, u, x, y


def _linear_filter(lin, t, u, **kw):
    from twin_ml.assimilate.filter import EnsembleFilter, FilterSettings

    settings = FilterSettings(**{"members": 40, "process": (0.03, 0.03), **kw})
    prior = (np.array([0.8, 0.0]), np.array([0.3, 0.3]))
    return EnsembleFilter.start(
        lin, lin, [0.1], prior, (np.ones(1), np.zeros(1)), t[0], u[0], settings
    )


@pytest.mark.parametrize("method", ["etkf", "enkf"])
def test_the_filter_goes_on_from_its_json_state_bit_for_bit(method):
    """A live twin is stored between messages: the filter written to JSON after 60 samples and
    read back (a new process would do the same) goes on exactly as the one never stopped, random
    draws (process noise, the EnKF's perturbations) included."""
    import json

    from twin_ml.assimilate.filter import EnsembleFilter

    lin, t, u, _, y = _linear_record(steps=120)
    a = _linear_filter(lin, t, u, method=method)
    for k in range(61):
        a.step(t[k], u[k], y[k])
    b = EnsembleFilter.restore(lin, lin, [0.1], a.settings, json.loads(json.dumps(a.state())))
    for k in range(61, 121):
        ea, eb = a.step(t[k], u[k], y[k]), b.step(t[k], u[k], y[k])
        assert np.array_equal(ea.filtered_mean, eb.filtered_mean) and ea.innovation == eb.innovation
    assert np.array_equal(a.X, b.X)


def test_a_band_scale_sets_the_band_the_filter_reports_not_its_gain():
    """Process noise 10x the true one: the filter follows the measurements closely, and its
    one-step band is far too wide (it covers nearly every measurement). The split-conformal
    factor fitted on one record (`band_scale`) leaves every mean and every analysis as they were
    and scales the reported std by itself; the band then covers that record as the conformal
    quantile says (at least ceil((n+1) 0.9) of n points), and a fresh record of the same system
    about 90%: n = 800 points on each record, whose binomial scatter (0.011 each, the errors
    nearly independent) adds up to ~0.015 between fitting and scoring; 5 binomial stds (0.053)
    allowed. Measured: 0.871; without the factor the band covers 1.0."""
    from twin_ml.assimilate.filter import Z90, FilterSettings, band_scale, run_filter

    def run(seed, **kw):
        lin, t, u, _, y = _linear_record(steps=800, seed=seed)
        settings = FilterSettings(members=40, process=(0.3, 0.3), **kw)
        prior = (np.array([0.8, 0.0]), np.array([0.3, 0.3]))
        res = run_filter(
            lin, lin, t, u, y, np.array([0.1]), prior, (np.ones(1), np.zeros(1)), settings
        )
        return res, y

    plain, y = run(4)
    c = band_scale(plain, y, init=1)
    assert c.shape == (1,) and 0 < c[0] < 1  # the band was too wide
    scaled, _ = run(4, band_scale=tuple(c))
    assert np.array_equal(scaled.predicted_mean, plain.predicted_mean)
    assert np.array_equal(scaled.filtered_mean, plain.filtered_mean)
    assert np.allclose(scaled.predicted_std, plain.predicted_std * c, rtol=4 * EPS, atol=0)
    n = len(y) - 1
    inside = np.abs(y[1:] - scaled.predicted_mean[1:]) <= Z90 * scaled.predicted_std[1:]
    k = math.ceil((n + 1) * 0.9)  # at least k points inside (np.quantile's "higher" neighbour,
    # and the boundary point's rounding through the factor: at most 2 more)
    assert k <= inside.sum() <= k + 2
    fresh, y2 = run(5, band_scale=tuple(c))
    unscaled, _ = run(5)
    cov = np.mean(np.abs(y2[1:] - fresh.predicted_mean[1:]) <= Z90 * fresh.predicted_std[1:])
    wide = np.mean(np.abs(y2[1:] - unscaled.predicted_mean[1:]) <= Z90 * unscaled.predicted_std[1:])
    assert wide > 0.97 and abs(cov - 0.9) <= 5 * math.sqrt(0.9 * 0.1 / n), (wide, cov)


def test_horizon_factors_interpolate_log_linearly_and_are_checked():
    """`band_at`: h = 1 the one-step factor; at a fitted horizon its factor; between two, the log
    factor linear in log h (the oracle: the formula by hand); past the last, the last; none
    fitted: 1 beyond the first step. Bad factors and horizons are refused by name."""
    from twin_ml.assimilate.filter import FilterSettings

    s = FilterSettings(band_scale=(0.5,), horizon_scale=((10, (2.0,)), (100, (4.0,))))
    assert s.band_at(1, 1).tolist() == [0.5]
    assert s.band_at(10, 1) == pytest.approx([2.0], rel=4 * EPS)
    assert s.band_at(100, 1).tolist() == [4.0] and s.band_at(5000, 1).tolist() == [4.0]
    w = np.log(4 / 1) / np.log(10 / 1)
    assert s.band_at(4, 1) == pytest.approx([np.exp((1 - w) * np.log(0.5) + w * np.log(2.0))])
    w = np.log(31 / 10) / np.log(100 / 10)
    assert s.band_at(31, 1) == pytest.approx([2.0 ** (1 - w) * 4.0**w], rel=8 * EPS)
    assert FilterSettings(band_scale=(0.5,)).band_at(7, 1).tolist() == [1.0]
    names = ["a"]
    for bad, match in (
        (((1, (2.0,)),), "horizons must be integers >= 2"),
        (((10, (2.0,)), (5, (2.0,))), "increasing"),
        (((10, (2.0, 3.0)),), r"horizon_scale\[10\] needs one factor per output \(1\)"),
        (((10, (0.0,)),), r"horizon_scale\[10\]: factors must be finite and > 0"),
    ):
        with pytest.raises(ValueError, match=match):
            FilterSettings(horizon_scale=bad).check(names, 2, 1)


def test_horizon_factors_fitted_on_one_record_make_the_k_step_bands_hold_on_others():
    """A filter whose process noise (0.01) is a third of the system's (0.03): its members spread
    too little, and the more so the further they run without data: on a fresh record its 90%
    bands cover 0.79 / 0.74 / 0.70 at 1 / 5 / 20 steps. `band_scale` and `horizon_scale` fitted
    on one record (1500 samples), then three fresh records of the same system scored with them:
    the bands cover about 90% at every horizon (measured 0.85-0.90 on four fresh records; the
    h-step errors of neighbouring origins share h - 1 steps, so a record holds ~1500 / h
    independent ones and its coverage scatters by ~0.03 at h = 20: 0.06 allowed), and every mean
    is as without them."""
    from twin_ml.assimilate.filter import FilterSettings, band_scale, horizon_scale, score_record

    prior = (np.array([0.8, 0.0]), np.array([0.3, 0.3]))
    p = (np.ones(1), np.zeros(1))

    def score(seed, **kw):
        lin, t, u, _, y = _linear_record(steps=1500, seed=seed)
        settings = FilterSettings(members=40, process=(0.01, 0.01), **kw)
        return score_record(
            lin, lin, t, u, y, [0.1], prior, p, settings, horizons=(1, 5, 20), init=10
        ), y

    tune, y = score(4)
    one = tuple(band_scale(tune.result, y, init=10))
    fitted = horizon_scale(tune)
    assert [h for h, _ in fitted] == [5, 20] and all(f[0] > one[0] > 1 for _, f in fitted)
    for seed in (6, 7, 8):
        plain, _ = score(seed)
        scaled, _ = score(seed, band_scale=one, horizon_scale=fitted)
        assert scaled.rmse == plain.rmse  # the factors touch the bands only
        for h in (1, 5, 20):
            assert plain.coverage_90[h] < 0.84, (seed, h, plain.coverage_90)
            assert abs(scaled.coverage_90[h] - 0.9) <= 0.06, (seed, h, scaled.coverage_90)


def test_a_gap_is_forecast_in_whole_steps_and_its_band_grows():
    """Three samples missing: the members are stepped four times, the inputs linear across the
    gap (the oracle: the same steps by hand), and the one-step prediction after the gap is less
    certain than after a single step. A time between grid points is refused."""
    lin, t, u, _, y = _linear_record(steps=20)
    f = _linear_filter(lin, t, u, process=())
    for k in range(10):
        f.step(t[k], u[k], y[k])
    X, u0 = f.X.copy(), u[9]
    one = f.forecast_ahead(t[10:11], u[10:11])
    u13 = u[13]
    for i in range(4):  # the oracle: four steps, inputs linear from u(t9) to u(t13)
        a, b = i / 4, (i + 1) / 4
        X = lin(X, None, 0.0, 1.0, u0 + a * (u13 - u0), u0 + b * (u13 - u0))
    est = f.step(t[13], u13, y[13])
    assert np.allclose(est.predicted_mean, X[:, :1].mean(axis=0), rtol=0, atol=1e-13)
    assert est.predicted_std[0] > one["std_measured"][0, 0]
    with pytest.raises(ValueError, match="not a whole number of steps"):
        f.step(t[14] + 0.5, u[14], y[14])


def test_k_step_scores_follow_the_linear_oracle():
    """With an exact linear forecast and no model noise the ensemble mean moves as the system
    does: the h-step prediction from the analysis mean m_k is H F^h m_k (inputs as the record
    gives them). `score_record`'s RMSE per horizon against that oracle, and its one-step scores
    against `run_filter`'s own prediction."""
    from twin_ml.assimilate.filter import FilterSettings, run_filter, score_record

    lin, t, u, _, y = _linear_record(steps=150)
    settings = FilterSettings(members=40)
    prior = (np.array([0.8, 0.0]), np.array([0.3, 0.3]))
    p = (np.ones(1), np.zeros(1))
    sc = score_record(lin, lin, t, u, y, [0.1], prior, p, settings, horizons=(1, 5), init=10)
    f = _linear_filter(lin, t, u, process=())
    means = [f.step(tk, uk, yk).state_mean for tk, uk, yk in zip(t, u, y)]
    err = []
    for k in range(9, 150 - 5 + 1):
        m = means[k]
        for j in range(5):
            m = lin(m[None], None, t[k + j], t[k + j + 1], u[k + j], u[k + j + 1])[0]
        err.append(y[k + 5, 0] - m[0])
    assert sc.points[5] == len(err)
    assert sc.rmse[5] == pytest.approx(np.sqrt(np.mean(np.square(err))), rel=1e-10)
    res = run_filter(lin, lin, t, u, y, [0.1], prior, p, settings)
    e1 = y[10:, 0] - res.predicted_mean[10:, 0]
    assert sc.rmse[1] == pytest.approx(np.sqrt(np.mean(e1**2)), rel=1e-12)
    assert sc.open_loop_rmse > sc.rmse[5] > sc.rmse[1]
    # a forecast of any interval (as the physics solver's) on a record 2 s apart: horizons count
    # the record's samples
    anystep = _Linear()
    anystep.dt = None
    sc2 = score_record(
        anystep, anystep, 2 * t, u, y, [0.1], prior, p, settings, horizons=(1, 5), init=10
    )
    assert sc2.points == sc.points and sc2.rmse[5] == pytest.approx(sc.rmse[5], rel=1e-12)


def test_the_watch_is_quiet_on_a_consistent_filter_and_alarms_on_a_bias():
    """The innovations of a filter whose model is right have the std it predicts: 600 samples
    raise no alarm (CUSUMs standardized by the first 10 windows, the window's mean NIS within
    [0.2, 5]). A sensor bias of 3 noise stds from sample 300 on is caught by the level CUSUM
    within two windows, and nothing before it. A filter told a noise 5x too small sees mean NIS
    ~25: nis_high."""
    from twin_ml.assimilate.twin import AlarmSettings, Watch

    def alarms(y, noise=0.1):
        lin, t, u, _, _ = _linear_record(steps=600)
        f = _linear_filter(lin, t, u)
        f.noise = np.array([noise])
        watch = Watch(["y"], AlarmSettings())
        out = []
        for k in range(len(t)):
            out += watch.feed(f.step(t[k], u[k], y[k]))
        return out

    _, _, _, _, clean = _linear_record(steps=600)
    assert alarms(clean) == []
    _, _, _, _, biased = _linear_record(steps=600, bias_from=300, bias=0.3)
    raised = alarms(biased)
    level = [a for a in raised if a["kind"] == "cusum_level"]
    assert level and 300 <= level[0]["t"] <= 300 + 2 * AlarmSettings.window, raised
    assert all(a["t"] >= 300 for a in raised), raised
    assert {a["kind"] for a in alarms(clean, noise=0.02)} >= {"nis_high"}


# ---- a live twin's requests, on the exported ensemble ------------------------------------------
def _twin(exported, **body):
    from twin_ml.assimilate.filter import OnnxForecast
    from twin_ml.assimilate.twin import Twin

    blob, card = exported
    base = {"inputs": {"torque": 0.0}, "noise": {"theta": 0.02}, "filter": {"members": 12}}
    return Twin.create(card, OnnxForecast(blob, card), {**base, **body}), card


def _batch(card, k0, n, theta=0.1, torque=0.0):
    dt = card.time.dt
    return {
        "times": [round((k0 + i) * dt, 12) for i in range(n)],
        "outputs": {"theta": [theta] * n},
        "inputs": {"torque": [torque] * n},
    }


def test_a_twin_refuses_what_it_cannot_assimilate_by_field(exported_pendulum):
    from twin_ml.assimilate.twin import Conflict, Twin
    from twin_ml.contract import RequestError

    twin, card = _twin(exported_pendulum)
    twin.observe(_batch(card, 1, 3))
    bad = [
        (_batch(card, 3, 2), Conflict, r"times\[0\]: .* not after the twin's time"),
        ({**_batch(card, 4, 2), "times": [0.4, 0.4]}, Conflict, r"times\[1\]"),
        (
            {**_batch(card, 4, 1), "times": [4.5 * card.time.dt]},
            RequestError,
            "not on the model's grid",
        ),
        (_batch(card, 4 + card.time.max_steps, 1), RequestError, r"times\[0\]: a gap of"),
        (
            {**_batch(card, 4, 1), "outputs": {"omega": [1.0]}},
            RequestError,
            r"outputs: unknown names \['omega'\]",
        ),
        (
            {**_batch(card, 4, 1), "outputs": {"theta": ["x"]}},
            RequestError,
            r"outputs.theta\[0\]: must be a number",
        ),
        ({**_batch(card, 4, 1), "inputs": {}}, RequestError, r"inputs: missing \['torque'\]"),
        ({**_batch(card, 4, 1), "extra": 1}, RequestError, r"unknown fields \['extra'\]"),
    ]
    for body, error, message in bad:
        with pytest.raises(error, match=message):
            twin.observe(body)
    assert twin.t == pytest.approx(3 * card.time.dt)  # nothing half-assimilated
    # a torque float32 cannot hold: the members' forecast turns non-finite (a refusal, not a 500,
    # nor a forecast of nulls)
    with pytest.raises(RequestError, match="forecast.inputs: the forecast diverged"):
        twin.forecast({"steps": 3, "inputs": {"torque": [1e39] * 3}})
    with pytest.raises(RequestError, match="inputs: these samples' forecast or analysis diverged"):
        twin.observe(_batch(card, 4, 2, torque=1e39))
    # a measurement float32 cannot hold: blamed on its own sample, not on the next forecast
    twin, card = _twin(exported_pendulum)
    with pytest.raises(RequestError, match="outputs: these samples' .* beyond float32's range"):
        twin.observe(_batch(card, 1, 1, theta=1e39))
    for body, message in [
        ({"inputs": {"torque": 0.0}}, r"noise: missing \['theta'\]"),
        ({"inputs": {"torque": 0.0}, "noise": {"theta": 0.0}}, r"noise.theta: must be > 0"),
        ({"inputs": {}, "noise": {"theta": 0.1}}, r"inputs: missing \['torque'\]"),
        ({**_batch(card, 1, 1), "noise": {"theta": 0.1}}, r"unknown fields"),
    ]:
        with pytest.raises(RequestError, match=message):
            Twin.create(card, None, body)
    for spec, message in [
        ({"filter": {"members": 1}}, "filter.members"),
        ({"filter": {"method": "ukf"}}, "filter.method"),
        ({"estimate": {"nope": 0.1}}, r"estimate: unknown names \['nope'\]"),
        ({"alarms": {"window": 1}}, "alarms.window"),
        ({"filter": {"localization": {"theta": {"theta": 2}}}}, "filter.localization.theta.theta"),
        ({"filter": {"localization": {"nope": {}}}}, r"filter.localization: unknown names"),
        ({"filter": {"method": "enkf", "localization": {}}}, "built for the ETKF"),
    ]:
        with pytest.raises(RequestError, match=message):
            _twin(exported_pendulum, **spec)


def test_a_twin_goes_on_from_its_state_and_forecasts_with_bands(exported_pendulum):
    """Null is an output not measured (the sample is forecast, not corrected); the twin read back
    from its JSON state answers the next batch exactly as the one kept in memory; its forecast's
    band (with the measurement noise) widens with the horizon, the asked quantiles around the
    mean."""
    import json

    from twin_ml.assimilate.twin import Twin

    twin, card = _twin(exported_pendulum, estimate={"damping": 0.2})
    gap = twin.observe({**_batch(card, 1, 2), "outputs": {"theta": [None, 0.1]}})
    first = gap["samples"][0]
    assert first["measured"] == 0 and first["filtered"]["theta"]["mean"] == pytest.approx(
        first["predicted"]["theta"]["mean"], rel=1e-12
    )
    copy = Twin.restore(card, twin.filter.forecast, json.loads(json.dumps(twin.state())))
    a, b = twin.observe(_batch(card, 3, 5, 0.12)), copy.observe(_batch(card, 3, 5, 0.12))
    assert json.dumps(a) == json.dumps(b)
    assert set(a["parameters"]) == {"damping"} and a["parameters"]["damping"]["std"] > 0
    ahead = twin.forecast({"steps": 6, "inputs": {"torque": [0.0] * 6}, "quantiles": [0.05, 0.95]})
    theta = ahead["outputs"]["theta"]
    assert len(ahead["times"]) == 6 and ahead["times"][0] == pytest.approx(8 * card.time.dt)
    assert theta["std"][-1] > theta["std"][0] > 0
    assert all(
        lo < m < hi
        for lo, m, hi in zip(theta["quantiles"]["0.05"], theta["mean"], theta["quantiles"]["0.95"])
    )
    assert twin.t == pytest.approx(7 * card.time.dt)  # a forecast leaves the twin as it was


def test_a_twin_reports_its_k_step_predictions_as_the_record_score_does(exported_pendulum):
    """A twin asked for `ahead` [3] reports with each sample what it predicted 3 steps before;
    over a record those are score_record's 3-step predictions (the same filter, the same members
    run on): equal RMSE and coverage, also when the record comes in two batches through a JSON
    round trip of the twin."""
    import json

    from twin_ml.assimilate.filter import Z90, FilterSettings, OnnxForecast, score_record
    from twin_ml.assimilate.twin import Observation, Twin

    blob, card = exported_pendulum
    system, dt = card.system.build(), card.time.dt
    t = np.arange(41) * dt
    u = (0.2 * np.sin(0.7 * t))[:, None]
    y = (0.3 * np.cos(2.0 * t) + 0.02 * np.random.default_rng(3).normal(size=41))[:, None]
    body = {"inputs": {"torque": float(u[0, 0])}, "noise": {"theta": 0.02}, "ahead": [3]}
    body |= {
        "initial_state": {"theta": 0.3, "omega": 0.0},
        "initial_std": {"theta": 0.1, "omega": 0.1},
    }
    body |= {"parameters": {"length": 1.0, "damping": 0.2, "mass": 1.0}, "filter": {"members": 12}}
    forecast = OnnxForecast(blob, card)
    twin = Twin.create(card, forecast, body)
    a = twin.assimilate(Observation(t[:20], u[:20], y[:20]))
    twin = Twin.restore(card, forecast, json.loads(json.dumps(twin.state())))
    b = twin.assimilate(Observation(t[20:], u[20:], y[20:]))
    got = [
        (s["t"], s["ahead"]["3"]["theta"]) for s in a["samples"] + b["samples"] if s.get("ahead")
    ]
    assert [round(g[0] / dt) for g in got] == list(range(3, 41))
    e = np.array([y[round(tk / dt), 0] - g["mean"] for tk, g in got])
    z = np.abs(e) / np.array([g["std"] for _, g in got])
    s = FilterSettings(members=12)
    prior = (np.array([0.3, 0.0]), np.array([0.1, 0.1]))
    sc = score_record(
        system,
        forecast,
        t,
        u,
        y,
        [0.02],
        prior,
        (np.array([1.0, 0.2, 1.0]), np.zeros(3)),
        s,
        horizons=(3,),
        init=1,
    )
    assert sc.points[3] == len(e)
    assert sc.rmse[3] == pytest.approx(np.sqrt(np.mean(e**2)), rel=1e-12)
    assert sc.coverage_90[3] == pytest.approx(np.mean(z <= Z90), abs=1e-12)


def test_twins_assimilated_together_answer_as_each_alone(exported_pendulum):
    """`assimilate_many` over three twins (one with `ahead` [3] and an estimated parameter, one
    given fewer samples than the others, one plain) answers each as `Twin.assimilate` alone:
    every sample's prediction, filtered outputs, NIS and k-step report, the alarms and the
    estimate after the batch; float32 rounding of the larger forecast batch apart."""
    from twin_ml.assimilate.filter import OnnxForecast
    from twin_ml.assimilate.twin import Observation, Twin, assimilate_many

    blob, card = exported_pendulum
    dt = card.time.dt
    forecast = OnnxForecast(blob, card)
    base = {"inputs": {"torque": 0.0}, "noise": {"theta": 0.02}, "filter": {"members": 12}}
    bodies = [
        {**base, "ahead": [3], "estimate": {"damping": 0.2}},
        {**base, "filter": {"members": 12, "seed": 4}},
        {**base, "alarms": {"window": 5}},
    ]
    lengths = [30, 12, 30]
    obs = []
    for k, n in enumerate(lengths):
        t = np.arange(1, n + 1) * dt
        u = (0.2 * np.sin(0.7 * t + k))[:, None]
        y = (0.3 * np.cos(2.0 * t) + 0.05 * k)[:, None]
        obs.append(Observation(t, u, y))
    together = assimilate_many([Twin.create(card, forecast, b) for b in bodies], obs)
    alone = [Twin.create(card, forecast, b).assimilate(o) for b, o in zip(bodies, obs)]
    tol = rollout_tol(max(lengths), 1.0)  # float32 rounding of another batch size, relative

    for k, (got, want) in enumerate(zip(together, alone)):
        assert len(got["samples"]) == lengths[k]
        assert_close(got, want, tol, f"twin {k}")
    assert any("ahead" in smp for smp in together[0]["samples"])
    with pytest.raises(ValueError, match="distinct twins"):
        twin = Twin.create(card, forecast, base)
        assimilate_many([twin, twin], obs[:2])


def test_a_twin_s_localization_weights_reach_its_analysis(exported_pendulum):
    """A twin created with filter.localization: weights of 1 give the unlocalized twin (to float64
    rounding); omega weighted 0 for theta's measurements is left as its forecast: its members
    move exactly as a twin that measured nothing moves them (the same forecast and draws), while
    theta is corrected. The weights are kept with the twin's state."""
    from twin_ml.assimilate.twin import Twin

    ones = {"filter": {"members": 12, "localization": {"theta": {"theta": 1}, "omega": {}}}}
    zero = {"filter": {"members": 12, "localization": {"omega": {"theta": 0}}}}
    plain, card = _twin(exported_pendulum)
    same, _ = _twin(exported_pendulum, **ones)
    local, _ = _twin(exported_pendulum, **zero)
    blind, _ = _twin(exported_pendulum)
    for twin in (plain, same, local):
        twin.observe(_batch(card, 1, 1, theta=0.3))
    nothing = _batch(card, 1, 1)
    nothing["outputs"] = {"theta": [None]}
    blind.observe(nothing)
    X = {k: np.asarray(t.state()["filter"]["X"]) for k, t in
         [("plain", plain), ("same", same), ("local", local), ("blind", blind)]}  # fmt: skip
    assert np.allclose(X["same"], X["plain"], rtol=0, atol=1e3 * EPS * np.abs(X["plain"]).max())
    assert np.array_equal(X["local"][:, 1], X["blind"][:, 1])  # omega: its forecast, untouched
    assert not np.allclose(X["local"][:, 0], X["blind"][:, 0])  # theta: corrected
    again = Twin.restore(card, local.filter.forecast, json.loads(json.dumps(local.state())))
    assert again.filter.settings.localization == ((1.0,), (0.0,))


def test_a_twin_s_band_factor_scales_its_one_step_band_and_is_checked(exported_pendulum):
    """filter.band {output: factor}: the twin reports its one-step std times the factor, every
    mean as without it; the factor is kept with the twin's state; a bad one is refused by field."""
    from twin_ml.assimilate.twin import Twin
    from twin_ml.contract import RequestError

    plain, card = _twin(exported_pendulum)
    banded, _ = _twin(exported_pendulum, filter={"members": 12, "band": {"theta": 0.25}})
    a, b = (t.observe(_batch(card, 1, 3, theta=0.3)) for t in (plain, banded))
    for sa, sb in zip(a["samples"], b["samples"]):
        pa, pb = sa["predicted"]["theta"], sb["predicted"]["theta"]
        assert pb["mean"] == pa["mean"] and pb["std"] == pytest.approx(
            0.25 * pa["std"], rel=4 * EPS
        )
    again = Twin.restore(card, banded.filter.forecast, json.loads(json.dumps(banded.state())))
    assert again.filter.settings.band_scale == (0.25,)
    for band, field in (({"theta": 0}, "filter.band.theta"), ({"omega": 1}, "filter.band")):
        with pytest.raises(RequestError, match=field):
            _twin(exported_pendulum, filter={"members": 12, "band": band})


def test_a_twin_s_horizon_bands_scale_its_forecast_and_are_checked(exported_pendulum):
    """filter.horizon_band {h: {output: factor}}: the forecast's band h steps ahead is the plain
    twin's times the factor (1 at the first step, log-linear in between: `band_at`), every mean
    as without it; kept with the twin's state; bad ones refused by field."""
    from twin_ml.assimilate.twin import Twin
    from twin_ml.contract import RequestError

    plain, card = _twin(exported_pendulum)
    banded, _ = _twin(
        exported_pendulum, filter={"members": 12, "horizon_band": {"4": {"theta": 3}}}
    )
    for t in (plain, banded):
        t.observe(_batch(card, 1, 3, theta=0.3))
    ask = {"steps": 6, "inputs": {"torque": [0.0] * 6}}
    a, b = (t.forecast(ask)["outputs"]["theta"] for t in (plain, banded))
    assert b["mean"] == a["mean"]
    factor = banded.filter.settings.band_at
    for h, (sa, sb) in enumerate(zip(a["std"], b["std"]), start=1):
        want = {1: 1.0, 4: 3.0, 5: 3.0, 6: 3.0}.get(h, 3.0 ** (np.log(h) / np.log(4)))
        assert factor(h, 1)[0] == pytest.approx(want, rel=8 * EPS)
        assert sb == pytest.approx(want * sa, rel=8 * EPS), h
    again = Twin.restore(card, banded.filter.forecast, json.loads(json.dumps(banded.state())))
    assert again.filter.settings.horizon_scale == ((4, (3.0,)),)
    for band, field in (
        ({"1": {"theta": 2}}, "filter.horizon_band.1"),
        ({"x": {"theta": 2}}, "filter.horizon_band.x"),
        ({"4": {"theta": -1}}, "filter.horizon_band.4.theta"),
        ({"4": {"omega": 2}}, "filter.horizon_band.4"),
    ):
        with pytest.raises(RequestError, match=field):
            _twin(exported_pendulum, filter={"members": 12, "horizon_band": band})


# ---- the model's own output error, an autoregressive process in the members --------------------
def _ar_series(phi, s, n, seed):
    """An AR(p) series by scipy's IIR filter (not twin-ml's recursion), 500 samples of burn-in."""
    from scipy.signal import lfilter

    e = np.random.default_rng(seed).normal(size=n + 500) * s
    return lfilter([1.0], np.r_[1.0, -np.asarray(phi)], e)[500:]


def test_error_model_fits_an_autoregressive_error_by_yule_walker():
    """An AR(2) error (a resonance, as the Silverbox hybrid's) of 20000 samples: the fitted
    coefficients and driving std within 5 of their asymptotic standard errors (Box & Jenkins:
    var(phi_hat) ~ (1 - phi2^2) / n for an AR(2); var(s_hat) ~ s^2 / 2n); AIC picks order 2;
    a second output with NaN (not measured) is fitted on its measured samples; the fit is
    stationary (the settings' own check passes)."""
    from twin_ml.assimilate.filter import FilterSettings, error_model

    phi, s, n = (1.5, -0.75), 0.1, 20000
    R = np.stack([_ar_series(phi, s, n, 1), _ar_series((0.9,), 0.05, n, 2)], axis=1)
    R[::7, 1] = np.nan
    ar, std = error_model(R)
    assert len(ar[0]) == 2  # AIC's order, the second output's AR(1) zero-padded
    se = np.sqrt((1 - phi[1] ** 2) / n)
    assert np.allclose(ar[0], phi, rtol=0, atol=5 * se), ar
    assert abs(std[0] - s) < 5 * s / np.sqrt(2 * n)
    # the second output: its lags run across the dropped samples, so only loosely an AR(1)
    assert ar[1][1] == pytest.approx(0.0, abs=0.1) and ar[1][0] == pytest.approx(0.9, abs=0.1)
    FilterSettings(error_ar=ar, error_std=std).check([], 2, 2)
    forced, _ = error_model(R[:, :1], orders=(4,))
    assert len(forced[0]) == 4 and np.allclose(forced[0][2:], 0.0, atol=5 / np.sqrt(n))
    with pytest.raises(ValueError, match="cannot fit an order up to 16"):
        error_model(R[:40])
    with pytest.raises(ValueError, match=r"residuals\[:, 0\] are constant"):
        error_model(np.ones((200, 1)))
    with pytest.raises(ValueError, match="orders: one per output"):
        error_model(R, orders=(2,))


def test_error_settings_are_checked_by_name():
    from twin_ml.assimilate.filter import FilterSettings

    with pytest.raises(ValueError, match=r"filter.error_ar\[0\]: not a stationary process"):
        FilterSettings(error_ar=((1.0,),), error_std=(0.1,)).check([], 2, 1)
    with pytest.raises(ValueError, match=r"filter.error_ar\[0\]: not a stationary process"):
        FilterSettings(error_ar=((1.5, -1.0),), error_std=(0.1,)).check([], 2, 1)  # |root| 1
    with pytest.raises(ValueError, match="filter.error_std: one std per output"):
        FilterSettings(error_ar=((0.5,),), error_std=()).check([], 2, 1)
    with pytest.raises(ValueError, match="filter.error_ar: one list of coefficients per output"):
        FilterSettings(error_ar=((0.5,), (0.5,)), error_std=(0.1, 0.1)).check([], 2, 1)
    with pytest.raises(ValueError, match="finite coefficients and stds >= 0"):
        FilterSettings(error_ar=((0.5,),), error_std=(-0.1,)).check([], 2, 1)


def test_the_members_start_from_the_error_process_s_stationary_law():
    """AR(1) phi 0.9, driving std 0.1, carried as two lags: the stationary variance is
    s^2 / (1 - phi^2) and the lag-one covariance phi times it (analytic); 4000 members' sample
    moments within 5 of their standard errors (sqrt(2 / N) relative)."""
    lin, t, u, _, _ = _linear_record(steps=2)
    f = _linear_filter(lin, t, u, members=4000, error_ar=((0.9, 0.0),), error_std=(0.1,))
    var = 0.01 / (1 - 0.81)
    C = np.cov(f.D, rowvar=False)
    assert f.D.shape == (4000, 2)
    tol = 5 * np.sqrt(2 / 4000)
    assert C[0, 0] == pytest.approx(var, rel=tol) and C[1, 1] == pytest.approx(var, rel=tol)
    assert C[0, 1] == pytest.approx(0.9 * var, rel=2 * tol)


def test_an_error_model_s_analysis_is_the_kalman_filter_of_the_augmented_state():
    """At the first sample (no forecast) the ETKF analyses [x, d] with y = x1 + d_k + v: its mean
    and sample covariance are the Kalman filter's on the augmented vector, prior the members'
    own sample moments, H = [1, 0, 1, 0] (float64 rounding); the one-step prediction is the
    members' x1 + d_k."""
    lin, t, u, _, y = _linear_record(steps=2)
    f = _linear_filter(lin, t, u, error_ar=((1.2, -0.5),), error_std=(0.2,))
    Z0 = np.concatenate([f.X, f.D], axis=1)
    mean0, P0 = _moments(Z0)
    H = np.array([[1.0, 0.0, 1.0, 0.0]])
    est = f.step(t[0], u[0], y[0])
    want_mean, want_P, want_nis = _kalman(mean0, P0, H, y[0], np.array([0.1]))
    got_mean, got_P = _moments(np.concatenate([f.X, f.D], axis=1))
    scale = np.abs(Z0).max()
    assert np.allclose(got_mean, want_mean, rtol=0, atol=64 * EPS * scale)
    assert np.allclose(got_P, want_P, rtol=0, atol=64 * EPS * scale**2)
    assert est.innovation.nis == pytest.approx(want_nis, rel=1e-10)
    assert est.predicted_mean[0] == pytest.approx((H @ mean0)[0], rel=0, abs=8 * EPS * scale)


def test_the_error_steps_by_its_recursion_in_the_filter_forecast_and_k_step_reports():
    """With no driving noise and no process noise the members' errors follow
    d_k = 1.2 d_k-1 - 0.5 d_k-2 exactly: unmeasured samples' predictions are x1 + d (the
    recursion written out here, the states by the linear oracle); `forecast_ahead` and `Ahead`'s
    k-step reports from one analysis give the same means, and both carry the errors; the
    filter and its origins go on bit for bit through JSON."""
    from twin_ml.assimilate.filter import Ahead, EnsembleFilter, FilterSettings

    lin, t, u, _, y = _linear_record(steps=12)
    settings = FilterSettings(members=8, error_ar=((1.2, -0.5),), error_std=(0.0,))
    rng = np.random.default_rng(5)
    X0, D0 = rng.normal(size=(8, 2)), rng.normal(size=(8, 2)) * 0.3
    f = EnsembleFilter(
        lin, lin, [0.1], settings, X=X0.copy(), TH=np.zeros((8, 0)), p=np.ones(1), t=t[0],
        u=u[0], rng=np.random.default_rng(0), D=D0.copy(),
    )  # fmt: skip
    x, d1, d2 = X0.copy(), D0[:, 0].copy(), D0[:, 1].copy()
    for k in range(1, 6):
        est = f.step(t[k], u[k], [np.nan])
        x = lin(x, None, t[k - 1], t[k], u[k - 1], u[k])
        d1, d2 = 1.2 * d1 - 0.5 * d2, d1
        want = np.mean(x[:, 0] + d1)
        assert est.predicted_mean[0] == pytest.approx(want, rel=0, abs=64 * EPS)
    ahead = f.forecast_ahead(t[6:9], u[6:9])  # members run on from the analysis at t5
    want = []
    for k in (6, 7, 8):
        x = lin(x, None, t[k - 1], t[k], u[k - 1], u[k])
        d1, d2 = 1.2 * d1 - 0.5 * d2, d1
        want.append(np.mean(x[:, 0] + d1))
    assert np.allclose(ahead["mean"][:, 0], want, rtol=0, atol=64 * EPS)
    tracker = Ahead([3], dt=lin.dt)
    tracker.spawn(f)  # an origin at t5, through JSON with the filter
    tracker = Ahead([3], dt=lin.dt, state=json.loads(json.dumps(tracker.state())))
    g = EnsembleFilter.restore(lin, lin, [0.1], settings, json.loads(json.dumps(f.state())))
    assert np.array_equal(g.D, f.D)
    for k in (6, 7, 8):
        report = tracker.advance(g, t[k], u[k])
        g.step(t[k], u[k], [np.nan])
    assert report[3][0][0] == pytest.approx(want[2], rel=0, abs=64 * EPS)


def test_a_twin_s_error_model_goes_through_its_state_and_is_checked(exported_pendulum):
    """filter.error {output: {ar, std}}: the twin's members carry the error's lags; written to
    JSON and read back between two batches (`ahead` origins too) it answers as the twin never
    stopped; its one-step predictions differ from a twin without it; bad ones are refused by
    field."""
    from twin_ml.assimilate.twin import Twin
    from twin_ml.contract import RequestError

    error = {"theta": {"ar": [0.8, 0.1], "std": 0.01}}
    body = {"filter": {"members": 12, "error": error}, "ahead": [3]}
    a, card = _twin(exported_pendulum, **body)
    b, _ = _twin(exported_pendulum, **body)
    plain, _ = _twin(exported_pendulum, filter={"members": 12}, ahead=[3])
    assert a.filter.D.shape == (12, 2) and a.filter.settings.error_ar == ((0.8, 0.1),)
    first = [tw.observe(_batch(card, 1, 4, theta=0.3)) for tw in (a, b, plain)]
    assert first[0] == first[1]
    assert first[0]["samples"][-1]["predicted"] != first[2]["samples"][-1]["predicted"]
    b = Twin.restore(card, b.filter.forecast, json.loads(json.dumps(b.state())))
    ra, rb = (tw.observe(_batch(card, 5, 4, theta=0.25)) for tw in (a, b))
    assert ra == rb and "3" in ra["samples"][-1]["ahead"]
    bad = [
        ({"theta": {"ar": [1.0], "std": 0.1}}, r"filter.error.theta.ar: not a stationary"),
        ({"theta": {"ar": [0.5], "std": -1}}, r"filter.error.theta.std: a std >= 0"),
        ({"theta": {"ar": [0.5]}}, r"filter.error.theta: give ar"),
        ({"theta": {"ar": [0.1] * 33, "std": 0.1}}, r"filter.error.theta.ar: a list of 1 to 32"),
        ({"theta": {"ar": [0.5], "std": 0.1, "ma": [1]}}, r"filter.error.theta"),
        ({"omega": {"ar": [0.5], "std": 0.1}}, r"filter.error"),
        ({}, r"filter.error: name at least one of"),
    ]
    for err, message in bad:
        with pytest.raises(RequestError, match=message):
            _twin(exported_pendulum, filter={"members": 12, "error": err})


def test_open_loop_residuals_are_the_measurements_less_the_model_s_free_run():
    """After the first `init` samples the members run on without data: with an exact linear
    forecast and no process noise the ensemble mean moves as the system does, so the residuals
    are y - H m_k with m_k stepped from the analysis mean after `init` samples (written out
    here); a model without error leaves the measurement noise, which `error_model` finds
    white (coefficients within 5 standard errors of 0)."""
    from twin_ml.assimilate.filter import FilterSettings, error_model, open_loop_residuals

    lin, t, u, _, y = _linear_record(steps=1200, q=0.0)
    prior = (np.array([0.8, 0.0]), np.array([0.3, 0.3]))
    p = (np.ones(1), np.zeros(1))
    settings = FilterSettings(members=40, process=(0.03, 0.03))  # the open loop drops it
    r = open_loop_residuals(lin, lin, t, u, y, [0.1], prior, p, settings, init=10)
    f = _linear_filter(lin, t, u, process=())
    for k in range(10):
        m = f.step(t[k], u[k], y[k]).state_mean
    want = []
    for k in range(10, len(t)):
        m = lin(m[None], None, t[k - 1], t[k], u[k - 1], u[k])[0]
        want.append(y[k, 0] - m[0])
    assert r.shape == (len(t) - 10, 1)
    assert np.allclose(r[:, 0], want, rtol=0, atol=1e3 * EPS)
    ar, std = error_model(r[200:], orders=(2,))  # past the initial state's transient
    assert np.allclose(ar[0], 0.0, atol=5 / np.sqrt(1000))
    assert std[0] == pytest.approx(0.1, rel=5 / np.sqrt(2 * 1000))
    with pytest.raises(ValueError, match="init must be in"):
        open_loop_residuals(lin, lin, t, u, y, [0.1], prior, p, init=0)
