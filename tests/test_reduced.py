"""Reduced-order models of field systems (LatentODE: kinds latent and rom) against independent
oracles: a full-rank Galerkin model with its closure at zero IS the semi-discrete physics, so it
must reproduce the sparse BDF solve to the RK4 error; the POD basis reconstructs the training
snapshots to the energy it leaves out; onnxruntime reproduces torch, the decoded fields included.
Small grids: the whole file runs in seconds."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import EPS32, rollout_tol

from twin_ml.models import build_model, field_stats, model_from_config
from twin_ml.models.surrogates import check_affine
from twin_ml.physics import SolverSettings, make_system, solve_looped

SHAPE = [6, 6]


@functools.cache
def _data(n=8, steps=20, seed=0, shape=tuple(SHAPE)):
    """Solver trajectories of heat_plate on a small grid: smooth random inputs, in-bounds
    parameters and initial temperatures (computed once; the tests only read them)."""
    system = make_system("heat_plate", shape=list(shape))
    rng = np.random.default_rng(seed)
    t = np.arange(steps + 1) * system.default_horizon[1]
    lo = np.array([v.bounds[0] for v in system.parameters])
    hi = np.array([v.bounds[1] for v in system.parameters])
    p = rng.uniform(lo, hi, (n, len(lo)))
    x0 = rng.uniform(15.0, 35.0, (n, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    power = 10.0 + 8.0 * np.sin(2 * np.pi * t[None, :] / 60.0 + phase)
    coolant = 25.0 + 5.0 * np.cos(2 * np.pi * t[None, :] / 90.0 + phase)
    u = np.stack([power, coolant], axis=-1)
    tight = SolverSettings(method="BDF", rtol=1e-9, atol=1e-9)
    r = solve_looped(system, t, u, p, x0, tight)
    assert (r.status == 0).all()
    return system, t, u, p, x0, r


def _model(kind, system, t, u, p, x0, r, rank, **kw):
    stats = field_stats(x0, u, p, r.y, t)
    kw.setdefault("mode_floor", 0.0)  # the oracles below want every mode asked for
    return build_model(
        kind, system, stats, rank=rank, snapshots=r.x, snapshot_stride=1, members=2, **kw
    )


def test_full_rank_galerkin_rom_is_the_physics():
    """rank = every cell and a zero closure: the rom integrates the system's own semi-discrete
    equations (in a rotated basis) with RK4, so it meets the tight BDF solution within the RK4
    error, which the same rollout at half the step bounds (Richardson: err(h) ~ 16/15 |y_h -
    y_h/2|)."""
    system, t, u, p, x0, r = _data()
    n = system.state_size

    def run(step_fraction):
        m = _model("rom", system, t, u, p, x0, r, n, step_fraction=step_fraction).double()
        with torch.no_grad():
            _, y = m(*(torch.tensor(a) for a in (x0, u, p, t)))
        return y.numpy()

    y1, y2 = run(0.5), run(0.25)
    assert np.allclose(y1[0], y1[1])  # both members: closure 0, the same physics
    rk4 = 16.0 / 15.0 * np.abs(y1 - y2).max()
    err = np.abs(y1[0] - r.y).max()
    scale = np.abs(r.y).max()
    assert err <= 2.0 * rk4 + 1e-7 * scale, (err, rk4)
    assert rk4 < 1e-2 * scale  # the step is resolved: the comparison means something


def test_exact_affine_rom_at_full_rank_is_the_solution_of_the_physics():
    """solver 'exact': the matrix exponential of the (full-rank) Galerkin operators with the
    inputs interpolated linearly, as the reference solver does, is the exact solution of the
    semi-discrete equations: it meets the tight BDF solve (rtol 1e-9) to that solve's own error,
    with no step error at all, from one interval to the next."""
    system, t, u, p, x0, r = _data()
    m = _model("rom", system, t, u, p, x0, r, system.state_size, solver="exact").double()
    with torch.no_grad():
        _, y = m(*(torch.tensor(a) for a in (x0, u, p, t)))
    scale = np.abs(r.y).max()
    assert np.abs(y[0].numpy() - r.y).max() <= 100 * 1e-9 * scale


def test_expm_matches_scipy():
    from scipy.linalg import expm

    from twin_ml.models.surrogates import _expm

    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 9, 9)) * np.array([0.1, 1.0, 5.0, 20.0])[:, None, None]
    want = np.stack([expm(m) for m in a])
    got = _expm(torch.tensor(a)).numpy()
    assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()


def test_affine_galerkin_operators_equal_the_projected_right_hand_side():
    """heat_plate declares its right-hand side affine in (x, u): the rom's precomputed r x r
    operators give the same rollout as projecting the whole right-hand side at every stage."""
    system, t, u, p, x0, r = _data()
    m = _model("rom", system, t, u, p, x0, r, 6, step_fraction=0.5).double()
    assert m.affine
    args = [torch.tensor(a) for a in (x0, u, p, t)]
    with torch.no_grad():
        _, y_affine = m(*args)
        m.affine = False  # the general path: the field's right-hand side, projected
        _, y_full = m(*args)
    assert torch.allclose(y_affine, y_full, rtol=0, atol=1e-10 * float(y_full.abs().max()))


def test_a_false_affine_declaration_is_caught():
    from twin_ml.physics.systems.tubular_reactor import TubularReactor

    class Claims(TubularReactor):
        affine = True

    reactor = make_system("tubular_reactor", shape=[6])
    claims = Claims(shape=[6])
    rng = np.random.default_rng(0)
    t = np.arange(11) * reactor.default_horizon[1]
    lo = np.array([v.bounds[0] for v in reactor.parameters])
    hi = np.array([v.bounds[1] for v in reactor.parameters])
    p = rng.uniform(lo, hi, (3, len(lo)))
    x0 = np.array([[v.bounds[0] + 0.5 * (v.bounds[1] - v.bounds[0]) for v in reactor.states]] * 3)
    u = np.stack([np.full((3, len(t)), 0.5 * sum(v.bounds)) for v in reactor.inputs], axis=-1)
    res = solve_looped(reactor, t, u, p, x0)
    stats = field_stats(x0, u, p, res.y, t)
    with pytest.raises(ValueError, match="declares affine = True, but"):
        check_affine(claims, res.x, seed=0)
    check_affine(make_system("heat_plate", shape=SHAPE), _data()[-1].x, seed=0)
    general = build_model("rom", reactor, stats, rank=3, snapshots=res.x, snapshot_stride=1)
    assert not general.affine  # the reactor (Arrhenius) projects its whole right-hand side


def test_pod_basis_reconstructs_snapshots_to_the_energy_it_keeps():
    """The truncation error of the projection is the discarded energy fraction (POD's optimality,
    in the scaled and centred coordinates); the probes read through the latent map equal the
    probes of the decoded field; the maximum over its support equals the true maximum on the
    training snapshots (the support holds every training argmax)."""
    system, t, u, p, x0, r = _data()
    m = _model("latent", system, t, u, p, x0, r, 4).double()
    snaps = torch.tensor(r.x)
    z = m.encode_field(snaps)
    rec = m.decode(z)
    scaled = ((snaps - m.field_mean) / m.field_scale).reshape(-1, system.state_size)
    resid = ((rec - snaps) / m.field_scale).reshape(-1, system.state_size)
    lost = float((resid**2).sum() / (scaled**2).sum())
    assert lost == pytest.approx(1.0 - m.config["pod_energy"], rel=1e-3, abs=1e-12)
    y_latent = m.observe(z, None, None).numpy()
    y_field = system.observe(rec.numpy(), None, None)
    # the map is stored in float32 (as the buffers are): a few ulps per term of its r-sum
    assert np.abs(y_latent - y_field).max() <= 4 * 4 * EPS32 * np.abs(y_field).max()
    k_max = system.output_names.index("T_max")
    full_rank = _model("latent", system, t, u, p, x0, r, system.state_size).double()
    zf = full_rank.encode_field(snaps)
    got = full_rank.observe(zf, None, None).numpy()[..., k_max]
    assert np.abs(got - r.y[..., k_max]).max() <= 4 * system.state_size * EPS32 * np.abs(r.y).max()


@pytest.mark.parametrize(
    ("kind", "solver", "closure"),
    [
        ("latent", "rk4", True),
        ("rom", "rk4", True),
        ("rom", "exact", True),
        ("rom", "exact", False),
    ],
)
def test_a_saved_reduced_model_rebuilds_and_exports_with_its_fields(kind, solver, closure):
    """config + state_dict rebuild the same model (basis, supports); the ONNX graph (the affine
    rom: its Galerkin operators before the loop; the exact rom with a closure, and without one,
    whose graph then has none) reproduces torch's members and decodes the fields asked for by
    `field_steps` (none by default)."""
    from twin_ml._ort import session
    from twin_ml.export.onnx_export import build_onnx

    system, t, u, p, x0, r = _data()
    m = _model(kind, system, t, u, p, x0, r, 5, step_fraction=0.5, solver=solver).eval()
    if closure:  # a rom's closure starts at zero: give it weights, so that the graph holds it
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for w in (m.net.weights[-1], m.net.biases[-1]):
                w.copy_(0.05 * torch.randn(w.shape, generator=gen))
    again = model_from_config(m.config)
    again.load_state_dict(m.state_dict())
    f32 = [torch.tensor(a, dtype=torch.float32) for a in (x0, u, p, t)]
    with torch.no_grad():
        z, y = m(*f32)
        _, y2 = again(*f32)
        fields = m.decode(z[:, :, [0, 7, 20]])
    assert torch.equal(y, y2)
    sess = session(build_onnx(m, float(t[1] - t[0])).SerializeToString())
    feeds = {k: a.numpy() for k, a in zip(("x0", "u", "p"), f32[:3])}
    members, f_mean, f_std = sess.run(["members", "field_mean", "field_std"], feeds)
    assert f_mean.shape == (len(p), 0, system.state_size)  # no field asked: none computed
    scale = float(np.abs(r.y).max())
    assert np.abs(members - y.numpy()).max() <= rollout_tol(len(t), scale)
    f_mean, f_std = sess.run(
        ["field_mean", "field_std"], {**feeds, "field_steps": np.array([0, 7, 20])}
    )
    want = fields.mean(dim=0).numpy()
    assert np.abs(f_mean - want).max() <= rollout_tol(len(t), scale)
    assert np.abs(f_std - fields.std(dim=0, unbiased=False).numpy()).max() <= rollout_tol(
        len(t), scale
    )


def test_reduced_models_need_a_field_system_and_a_valid_rank():
    system, t, u, p, x0, r = _data()
    with pytest.raises(ValueError, match="rank"):
        _model("latent", system, t, u, p, x0, r, system.state_size + 1)
    stats = field_stats(x0, u, p, r.y, t)
    pendulum = make_system("pendulum")
    with pytest.raises(ValueError, match="field system"):
        build_model("latent", pendulum, {**stats, "x_mean": [0, 0], "x_std": [1, 1]})


def test_a_closure_stays_only_where_it_helps_the_rollouts():
    """Member 0's closure is set to weights that make the rollouts *be* the observations (the
    observations are that closure's own rollouts): kept, at zero error against a nonzero one
    without it. Member 1's closure is the same weights scaled by 3 (wrong): dropped, and zeroed,
    so member 1 is then the projected physics alone, to the last bit."""
    system, t, u, p, x0, r = _data()
    m = _model("rom", system, t, u, p, x0, r, 5, solver="exact").double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in (m.net.weights[-1], m.net.biases[-1]):
            w[0] = 0.3 * torch.randn(w[0].shape, generator=gen, dtype=w.dtype)
            w[1] = 3 * w[0]
        args = [torch.tensor(a) for a in (x0, u, p, t)]
        observed = m(*args)[1][0].numpy()  # member 0's rollouts are the data
    report = m.prune_closures(x0, u, p, t, observed)
    assert report["kept"] == [True, False]
    assert report["rmse_with_closure"][0] == 0.0 < report["rmse_without_closure"][0]
    assert report["rmse_with_closure"][1] > report["rmse_without_closure"][1]
    assert not m.net.weights[-1][1].any() and not m.net.biases[-1][1].any()
    assert m.net.weights[-1][0].any()
    with torch.no_grad():
        pruned = m(*args)[1][1]
        m.net.weights[-1].zero_()
        m.net.biases[-1].zero_()
        physics = m(*args)[1][1]
    assert torch.equal(pruned, physics)
