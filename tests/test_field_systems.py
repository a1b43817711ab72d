"""The spatially resolved systems (heat_plate, tubular_reactor) against independent oracles: a
plate's cosine mode decays at the discrete eigenvalue's rate and converges to the continuous one
at second order, the steady plate is the analytic 1D profile (plus the scheme's known constant
offset), energy and moles balance exactly in the right-hand side, the isothermal reactor's steady
state converges at first order to the Wehner-Wilhelm solution, numpy = torch, the declared
sparsity holds every nonzero of the Jacobian, the sparse BDF solve agrees with a tight RK45
reference, and bad grids and probes name themselves. Small grids throughout."""

import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve

from twin_ml.physics import Probe, SolverSettings, make_system, solve_looped
from twin_ml.physics.solver import OK
from twin_ml.physics.systems.heat_plate import THICKNESS, HeatPlate
from twin_ml.physics.systems.tubular_reactor import DH, DIAMETER, RHO_CP, TubularReactor, V

pytestmark = pytest.mark.numeric

EPS64 = float(np.finfo(np.float64).eps)
K, RHO_C = 170.0, 2.42e6  # the plate's nominal conductivity and heat capacity


def affine_parts(f, x_base: np.ndarray):
    """(J, f(x_base)) of an affine map f: the columns f(x_base + e_j) - f(x_base), one batched
    call (exact up to the rounding of f's terms)."""
    base = f(x_base)
    cols = f(x_base[None, :] + np.eye(x_base.size)) - base[None, :]
    return cols.T, base


# ---- heat_plate ------------------------------------------------------------------------------
def plate_mode(plate: HeatPlate, ky: int, kx: int) -> np.ndarray:
    """cos(ky pi y / Ly) cos(kx pi x / Lx) on the cell centres, flat [cells]: an exact eigenvector
    of the no-flux Laplacian (h = 0 makes the cooled face no-flux too)."""
    (yc, xc), (ly, lx) = plate.grid.coordinates(), plate.grid.extent
    return np.multiply.outer(np.cos(ky * math.pi * yc / ly), np.cos(kx * math.pi * xc / lx)).ravel()


def discrete_eigenvalue(plate: HeatPlate, ky: int, kx: int) -> float:
    return -sum(
        4 / h**2 * math.sin(k * math.pi * h / (2 * length)) ** 2
        for k, h, length in zip((ky, kx), plate.grid.spacing, plate.grid.extent)
    )


def decay(plate: HeatPlate, ky: int, kx: int, t_eval: np.ndarray, rtol: float, atol: float):
    """The uncooled, unheated plate from T0 + A * mode, solved directly with the system's rhs and
    the declared sparsity (heat_plate's initial_state lifts only a uniform T0)."""
    t0, amp = 25.0, 5.0
    p, u = np.array([K, RHO_C, 0.0]), np.array([0.0, 15.0])  # h = 0: cooling off
    mode = plate_mode(plate, ky, kx)
    sol = solve_ivp(
        lambda t, x: plate.rhs(t, x, u, p),
        (0.0, t_eval[-1]),
        t0 + amp * mode,
        method="BDF",
        jac_sparsity=plate.jacobian_sparsity(),
        t_eval=t_eval,
        rtol=rtol,
        atol=atol,
    )
    assert sol.success, sol.message
    return sol.y.T, t0, amp, mode


@pytest.mark.parametrize("ky, kx", [(0, 1), (1, 1), (2, 3)])
def test_a_plate_mode_decays_at_the_discrete_rate_and_near_the_continuous_one(ky, kx):
    plate = HeatPlate(shape=[8, 8])
    alpha = K / RHO_C
    rate = alpha * discrete_eigenvalue(plate, ky, kx)  # < 0
    t = np.linspace(0.0, 2.0 / abs(rate), 9)  # two e-folds
    rtol, atol = 1e-10, 1e-10
    x, t0, amp, mode = decay(plate, ky, kx, t, rtol, atol)
    exact = t0 + amp * np.exp(rate * t)[:, None] * mode[None, :]
    # BDF keeps each step's local error within atol + rtol |T|; on this contracting linear flow
    # the global error stays within a small multiple of it (100x: the steps per e-fold)
    assert np.max(np.abs(x - exact)) <= 100 * (atol + rtol * (t0 + amp))
    # against the continuous rate -alpha pi^2 (ky^2/Ly^2 + kx^2/Lx^2): the 3-point stencil loses
    # 1 - sinc^2(k pi h / 2L) <= (k pi h / L)^2 / 12 per axis, O(h^2)
    terms = [
        ((k * math.pi / length) ** 2, (k * math.pi * h / length) ** 2 / 12)
        for k, h, length in zip((ky, kx), plate.grid.spacing, plate.grid.extent)
    ]
    continuous = -alpha * sum(lam for lam, _ in terms)
    bound = alpha * sum(lam * rel for lam, rel in terms)
    assert 0.0 < rate - continuous <= bound


def test_the_mode_decay_rate_converges_at_second_order():
    alpha = K / RHO_C
    errors = []
    for nx in (8, 16, 32):
        plate = HeatPlate(shape=[3, nx])
        continuous = -alpha * (math.pi / plate.grid.extent[1]) ** 2
        t = np.array([0.0, 1.0 / abs(continuous)])
        x, t0, amp, mode = decay(plate, 0, 1, t, rtol=1e-11, atol=1e-11)
        a = (x[-1] - t0) @ mode / (mode @ mode)  # the mode's amplitude at the end
        fitted = math.log(a / amp) / t[-1]
        errors.append(abs(fitted - continuous))
        # the solver's share of the fitted rate (~1e-9 relative) cannot move the observed order
        assert abs(fitted - alpha * discrete_eigenvalue(plate, 0, 1)) <= 1e-3 * errors[-1]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((orders >= 1.8) & (orders <= 2.2)), orders


def steady_plate(plate: HeatPlate, power: float, t_c: float, p: np.ndarray) -> np.ndarray:
    """The plate's steady field rhs(T) = 0 (the rhs is affine in T): a sparse linear solve."""
    u = np.array([power, t_c])
    jac, base = affine_parts(lambda x: plate.rhs(0.0, x, u, p), np.zeros(plate.grid.cells))
    return spsolve(csc_matrix(jac), -base), np.linalg.cond(jac)


@pytest.mark.parametrize("h", [400.0, 2500.0])
def test_the_steady_plate_is_the_analytic_profile_with_the_schemes_offset(h):
    plate = HeatPlate(shape=[8, 16])
    (ly, lx), dx = plate.grid.extent, plate.grid.spacing[1]
    power, t_c = 12.0, 20.0
    p = np.array([K, RHO_C, h])
    field, cond = steady_plate(plate, power, t_c, p)
    field = field.reshape(plate.grid.shape)
    # the insulated south/north faces make the y-average obey the 1D problem with the plate's
    # mean source q = P / V:  -k T'' = q, -k T'(0) = h (T_c - T(0)), T'(L) = 0, so
    #   T(x) = T_c + q L / h + q / (2 k) (2 L x - x^2)
    # The interior and the east face are exact for quadratics, and the west balance fixes the
    # flux exactly, so the scheme's field is that profile shifted by a constant: the half cell's
    # curvature the series conductance h_eff = h / (1 + h dx / 2k) leaves out, q dx^2 / (8 k).
    q = power / (lx * ly * THICKNESS)
    x = plate.grid.coordinates()[1]
    analytic = t_c + q * lx / h + q / (2 * K) * (2 * lx * x - x**2)
    got = field.mean(axis=0)
    scale = np.abs(field).max()
    assert np.max(np.abs(got - analytic - q * dx**2 / (8 * K))) <= 10 * cond * EPS64 * scale
    assert np.ptp(field[:, -1]) > 0.01  # the heated band makes it really 2D
    # and the solver settles there (30 cooling times rho_c Lx / h)
    t = np.linspace(0.0, 30 * RHO_C * lx / h, 31)
    res = solve_looped(
        plate,
        t,
        np.broadcast_to([power, t_c], (1, t.size, 2)),
        p[None],
        np.array([[t_c]]),
        SolverSettings(rtol=1e-9, atol=1e-9),
    )
    assert res.status[0] == OK
    assert np.max(np.abs(res.x[0, -1] - field.ravel())) <= 1e-6 * scale


def plate_loss(plate: HeatPlate, x, u, p):
    """The convective loss [W] through the cooled face: h_eff (T_0 - T_c) dy THICKNESS summed
    over the west cells (h_eff: the half cell in series with the channel)."""
    ny, nx = plate.grid.shape
    dy, dx = plate.grid.spacing
    k, h = p[..., 0:1], p[..., 2:3]
    h_eff = h / (1 + h * dx / (2 * k))
    edge = x.reshape(*x.shape[:-1], ny, nx)[..., 0]
    return (h_eff * (edge - u[..., 1:2])).sum(axis=-1) * dy * THICKNESS


def test_the_plate_balances_energy_in_its_rhs_and_along_a_solve():
    plate = HeatPlate(shape=[8, 8])
    vol = plate.grid.cell_volume * THICKNESS
    t = np.linspace(0.0, 120.0, 41)
    power = 10.0 + 8.0 * np.sin(2 * math.pi * t / 60.0)
    u = np.stack([power, 18.0 + 4.0 * np.cos(2 * math.pi * t / 200.0)], axis=-1)[None]
    p = np.array([[150.0, 2.3e6, 1500.0]])
    res = solve_looped(plate, t, u, p, np.array([[30.0]]), SolverSettings(rtol=1e-8, atol=1e-8))
    assert res.status[0] == OK
    # at every output time, from the rhs: the stored heat's rate is the power in minus the loss
    x = res.x[0]
    stored = p[0, 1] * vol * plate.rhs(t[:, None], x, u[0], p[0]).sum(axis=-1)
    balance = u[0, :, 0] - plate_loss(plate, x, u[0], p[0])
    # rounding: each cell's terms are at most k |T| 8 / dx^2 + q''' per volume, summed
    dy, dx = plate.grid.spacing
    term = (
        p[0, 0] * np.abs(x).max() * 8 / min(dx, dy) ** 2
        + power.max() * plate.source_pattern().max()
    )
    assert np.max(np.abs(stored - balance)) <= 64 * EPS64 * plate.grid.cells * vol * term
    # integrated, uncooled: the energy gained is the integral of the (linearly interpolated)
    # power, which the trapezoid rule on its grid gives exactly; the rest is the solver's error
    p0 = np.array([[150.0, 2.3e6, 0.0]])
    rtol = atol = 1e-8
    res0 = solve_looped(plate, t, u, p0, np.array([[30.0]]), SolverSettings(rtol=rtol, atol=atol))
    energy = p0[0, 1] * vol * (res0.x[0] - res0.x[0, :1]).sum(axis=-1)
    supplied = np.concatenate([[0.0], np.cumsum(np.diff(t) * (power[1:] + power[:-1]) / 2)])
    per_cell = 100 * (atol + rtol * np.abs(res0.x).max())  # as in the mode test
    assert np.max(np.abs(energy - supplied)) <= p0[0, 1] * vol * plate.grid.cells * per_cell


# ---- tubular_reactor -------------------------------------------------------------------------
def wehner_wilhelm(pe: float, da: float, xi: np.ndarray) -> np.ndarray:
    """C / C_in of the steady isothermal first-order dispersion reactor with Danckwerts
    boundaries: c''/Pe - c' - Da c = 0, c(0) - c'(0)/Pe = 1, c'(1) = 0, at xi = z / L."""
    a = math.sqrt(1 + 4 * da / pe)
    m1, m2 = pe / 2 * (1 + a), pe / 2 * (1 - a)
    # c = A exp(m1 (xi - 1)) + B exp(m2 xi): both terms bounded on [0, 1]
    lhs = np.array(
        [
            [math.exp(-m1) * (1 - m1 / pe), 1 - m2 / pe],
            [m1, m2 * math.exp(m2)],
        ]
    )
    coef_a, coef_b = np.linalg.solve(lhs, [1.0, 0.0])
    c = coef_a * np.exp(m1 * (xi - 1)) + coef_b * np.exp(m2 * xi)
    outlet = (
        4
        * a
        * math.exp(pe / 2)
        / ((1 + a) ** 2 * math.exp(a * pe / 2) - (1 - a) ** 2 * math.exp(-a * pe / 2))
    )  # their closed form
    assert abs(coef_a + coef_b * math.exp(m2) - outlet) <= 1e-12
    return c


def steady_isothermal(reactor: TubularReactor, p: np.ndarray, c_in: float) -> np.ndarray:
    """The steady concentration with E_R = 0 (the rate no longer sees T: the C equations are
    affine in C alone), by a sparse linear solve of the system's own rhs."""
    n = reactor.grid.cells
    u = np.array([c_in, 330.0, 330.0])
    base = reactor.uniform(np.array([0.0, 330.0]))

    def f(c):
        x = np.concatenate([c, np.broadcast_to(base[n:], (*c.shape[:-1], n))], axis=-1)
        return reactor.rhs(0.0, x, u, p)[..., :n]

    jac, b = affine_parts(f, base[:n])
    return spsolve(csc_matrix(jac), -b)


def test_isothermal_reactor_converges_at_first_order_to_wehner_wilhelm():
    d, k_ref, c_in = 5e-4, 0.01, 1000.0
    length = TubularReactor.extent[0]
    pe, da = V * length / d, k_ref * length / V
    p = np.array([k_ref, 0.0, d, 500.0])  # E_R = 0: isothermal kinetics
    errors = []
    for n in (32, 64, 128, 256):
        reactor = TubularReactor(shape=[n])
        xi = reactor.grid.coordinates()[0] / length
        c = steady_isothermal(reactor, p, c_in)
        errors.append(np.max(np.abs(c - c_in * wehner_wilhelm(pe, da, xi))))
    # first-order upwind: the error is the numerical dispersion v dz / 2's, halving per doubling
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((orders >= 0.8) & (orders <= 1.2)), orders
    # its size: the profile of dispersion D + v dz / 2 (64 cells: +16 %) against D's, 0.6 % of C_in
    assert errors[1] <= 0.05 * c_in


def test_without_reaction_the_feed_passes_unchanged():
    reactor = TubularReactor(shape=[16])
    c_in, t_in, t_j = 800.0, 330.0, 320.0
    p = np.array([0.0, 8000.0, 5e-4, 500.0])  # k_ref = 0: no reaction
    u = np.array([c_in, t_in, t_j])
    # a uniform feed concentration is steady, to round-off, whatever the temperature field
    x = reactor.uniform(np.array([c_in, 335.0]))
    dc = reactor.rhs(0.0, x, u, p)[: reactor.grid.cells]
    assert np.max(np.abs(dc)) <= 16 * EPS64 * c_in * (V / reactor.grid.spacing[0])
    # and an empty tube fills up to it (20 residence times)
    t = np.linspace(0.0, 2000.0, 41)
    rtol, atol = 1e-9, 1e-9
    res = solve_looped(
        reactor,
        t,
        np.broadcast_to(u, (1, t.size, 3)),
        p[None],
        np.array([[0.0, t_in]]),
        SolverSettings(rtol=rtol, atol=atol),
    )
    assert res.status[0] == OK
    c_out = res.y[0, -1, reactor.output_names.index("C_out")]
    assert abs(c_out - c_in) <= 1e-5 * c_in  # the slowest mode is e^-20 down, plus the solver's


def test_the_reactor_balances_moles_and_energy_in_its_rhs(rng):
    reactor = TubularReactor(shape=[12])
    n, dz = reactor.grid.cells, reactor.grid.spacing[0]
    x = np.concatenate(
        [rng.uniform(0.0, 1500.0, (5, n)), rng.uniform(315.0, 370.0, (5, n))], axis=-1
    )
    u = np.array([[1200.0, 330.0, 320.0]]) + rng.uniform(-10.0, 10.0, (5, 3))
    p = reactor.nominal_parameters + np.zeros((5, 1))
    f = reactor.rhs(0.0, x, u, p)
    c, temp, r = x[:, :n], x[:, n:], reactor.rate(x[:, :n], x[:, n:], p)
    beta = 4 * p[:, 3:4] / (DIAMETER * RHO_CP)
    # per unit cross-section: what enters minus what leaves (upwind outflow: the last cell)
    moles = V * (u[:, 0] - c[:, -1]) - r.sum(axis=-1) * dz
    heat = (
        V * (u[:, 1] - temp[:, -1])
        + (-DH / RHO_CP) * r.sum(axis=-1) * dz
        + (beta * (u[:, 2:3] - temp)).sum(axis=-1) * dz
    )
    # rounding: a few ulps of the largest terms (stencil, reaction, wall), summed over the cells
    stencil = V / dz + 4 * p[0, 2] / dz**2
    scale_c = (stencil * 1500.0 + r.max()) * n * dz
    scale_t = (stencil * 370.0 + (-DH / RHO_CP) * r.max() + beta.max() * 370.0) * n * dz
    assert np.max(np.abs(f[:, :n].sum(axis=-1) * dz - moles)) <= 64 * EPS64 * scale_c
    assert np.max(np.abs(f[:, n:].sum(axis=-1) * dz - heat)) <= 64 * EPS64 * scale_t


# ---- both ------------------------------------------------------------------------------------
SMALL = {"heat_plate": [6, 5], "tubular_reactor": [12]}


def random_state(sys_, rng, n: int):
    """Random fields within the declared field bounds, inputs and parameters within theirs."""
    cells = sys_.grid.cells
    x = np.concatenate([rng.uniform(*f.bounds, (n, cells)) for f in sys_.fields], axis=-1)
    u = np.stack([rng.uniform(*i.bounds, n) for i in sys_.inputs], axis=-1)
    p = np.stack([rng.uniform(*q.bounds, n) for q in sys_.parameters], axis=-1)
    return x, u, p


def term_size(sys_, x, p) -> float:
    """An upper bound on the size of the terms the rhs adds up (per cell)."""
    h = min(sys_.grid.spacing)
    if isinstance(sys_, HeatPlate):
        # conduction 8 alpha |T| / h^2; the cooled face's flux, at most 2 alpha |T| / h^2 (h_eff
        # < 2 k / dx); the source, at most the power's limit over the band
        alpha = p[:, 0] / p[:, 1]
        source = 200.0 * sys_.source_pattern().max() / p[:, 1]
        return float(np.max(alpha * 10 * np.abs(x).max() / h**2 + source))
    n = sys_.grid.cells  # convection, dispersion, reaction (both fields), wall exchange
    r = np.abs(sys_.rate(x[:, :n], x[:, n:], p)).max()
    stencil = (V / h + 4 * p[:, 2].max() / h**2) * np.abs(x).max()
    wall = 4 * p[:, 3].max() / (DIAMETER * RHO_CP) * np.abs(x).max()
    return float(stencil + r * (1 - DH / RHO_CP) + wall)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_numpy_and_torch_agree_and_the_sparsity_holds_the_jacobian(name, rng):
    torch = pytest.importorskip("torch")
    sys_ = make_system(name, shape=SMALL[name])
    x, u, p = random_state(sys_, rng, 4)
    ref = sys_.rhs(0.0, x, u, p)
    got = sys_.rhs(0.0, *(torch.from_numpy(a) for a in (x, u, p)))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64 and got.shape == ref.shape
    # the same float64 operations; exp and the sums may differ by an ulp per term: compare
    # against the size of the largest terms
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=64 * EPS64 * term_size(sys_, x, p))
    y_np = sys_.observe(x, u, p)
    y_t = sys_.observe(*(torch.from_numpy(a) for a in (x, u, p))).numpy()
    np.testing.assert_allclose(y_t, y_np, rtol=16 * EPS64)
    # the declared sparsity holds every nonzero of d(rhs)/dx (autograd: exact zeros stay zero)
    jac = torch.autograd.functional.jacobian(
        lambda xx: sys_.rhs(0.0, xx, torch.from_numpy(u[0]), torch.from_numpy(p[0])),
        torch.from_numpy(x[0]),
    ).numpy()
    pattern = sys_.jacobian_sparsity().toarray()
    assert pattern.shape == jac.shape == (sys_.state_size, sys_.state_size)
    assert not np.any((jac != 0) & ~pattern)
    if name == "heat_plate":  # one field: the pattern is exactly the stencil
        assert np.array_equal(jac != 0, pattern)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_the_sparse_bdf_solve_agrees_with_a_tight_rk45_reference(name):
    from twin_ml.data import ScenarioDesign
    from twin_ml.physics.signals import generate

    sys_ = make_system(name, shape=SMALL[name])
    design = ScenarioDesign()
    sc = design.sample(sys_, 1, seed=5).rows(0, 1)  # the in-box scenario
    t = design.time_grid(sys_)[:101]  # half the default horizon, the default signals
    rng = np.random.default_rng(7)
    u = np.stack(
        [
            generate(s, t, sc.offset[0, j], sc.amplitude[0, j], rng, clip=tuple(sc.clip[0, j]))
            for j, s in enumerate(design.signal_specs(sys_))
        ],
        axis=-1,
    )[None]
    ref = solve_looped(
        sys_, t, u, sc.p, sc.x0, SolverSettings(method="RK45", rtol=1e-10, atol=1e-10)
    )
    assert ref.status[0] == OK and np.all(np.ptp(ref.y[0], axis=0) > 0)  # every output moves
    scale = np.abs(ref.x).max()
    # the sparse BDF (the system's solver), tight and at the default tolerances: the global error
    # within 100 x the local tolerance atol + rtol |x| (as in the mode test)
    for settings in (SolverSettings(rtol=1e-8, atol=1e-8), SolverSettings()):
        got = solve_looped(sys_, t, u, sc.p, sc.x0, settings)
        assert got.status[0] == OK
        assert np.max(np.abs(got.x - ref.x)) <= 100 * (settings.atol + settings.rtol * scale)
        assert np.max(np.abs(got.y - ref.y)) <= 100 * (settings.atol + settings.rtol * scale)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_declarations_fit_the_dataset_layout(name):
    sys_ = make_system(name)
    t_end, dt = sys_.default_horizon
    assert round(t_end / dt) == 200 and 200 % sys_.snapshot_stride == 0
    assert sys_.state_size == len(sys_.fields) * sys_.grid.cells
    x0 = np.array([[s.bounds[0] for s in sys_.states]])
    lifted = sys_.initial_state(x0)
    assert lifted.shape == (1, sys_.state_size)
    for k, s in enumerate(sys_.states):  # each declared state is its field's uniform value
        assert np.all(sys_.field(lifted, sys_.fields[k].name) == s.bounds[0])


@pytest.mark.parametrize("name, shape", [("heat_plate", [2, 2]), ("tubular_reactor", [2])])
def test_a_grid_too_small_names_the_shape(name, shape):
    with pytest.raises(ValueError, match="shape"):
        make_system(name, shape=shape)


class PlateWithAStrayProbe(HeatPlate):
    probes = (*HeatPlate.probes, Probe("tc_off_plate", "T", (0.05, 0.2)))


def test_a_probe_outside_the_plate_names_itself():
    with pytest.raises(ValueError, match="tc_off_plate"):
        PlateWithAStrayProbe()
