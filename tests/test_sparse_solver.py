"""The reference solver on a spatially discretized system: the Jacobian's declared sparsity (BDF,
Radau, LSODA), and the process-pool solve, against the analytic decay of a heat-equation
eigenmode (method of lines)."""

import math

import numpy as np
import pytest
from scipy.sparse import diags

from twin_ml.physics import (
    Output,
    Parameter,
    PhysicsSystem,
    SolverSettings,
    State,
    solve_looped,
    solve_pooled,
    solve_stacked,
)

pytestmark = pytest.mark.numeric

LENGTH = 1.0


class Rod(PhysicsSystem):
    """u_t = alpha u_xx on (0, L), u = 0 at both ends, central differences on `cells` interior
    nodes (module level: the process pool pickles it by reference)."""

    states = ()  # set per instance: the nodes
    outputs = (Output("u_mid", "K"),)
    parameters = (Parameter("alpha", "m^2/s", nominal=0.01, bounds=(0.005, 0.02)),)
    stiffness = "stiff"
    solver = "BDF"

    def __init__(self, *, cells: int = 15, sparse: bool = True):
        self.cells, self.sparse = cells, sparse
        self.states = tuple(State(f"u{i}", "K", bounds=(-1.0, 1.0)) for i in range(cells))

    def rhs(self, t, x, u, p):
        h = LENGTH / (self.cells + 1)
        xp = self.xp(x)
        zero = xp.zeros_like(x[..., :1])
        padded = xp.concat([zero, x, zero], axis=-1)
        lap = (padded[..., 2:] - 2 * padded[..., 1:-1] + padded[..., :-2]) / h**2
        return p[..., 0:1] * lap

    def observe(self, x, u, p):
        return x[..., self.cells // 2 : self.cells // 2 + 1]

    def jacobian_sparsity(self):
        if not self.sparse:
            return None
        n = self.cells
        return diags([1, 1, 1], [-1, 0, 1], shape=(n, n), dtype=bool)


def rod(n_cells: int, sparse: bool = True) -> PhysicsSystem:
    return Rod(cells=n_cells, sparse=sparse)


def mode(n_cells: int, k: int = 1) -> np.ndarray:
    x = np.arange(1, n_cells + 1) * LENGTH / (n_cells + 1)
    return np.sin(k * math.pi * x / LENGTH)


def discrete_rate(n_cells: int, alpha: float, k: int = 1) -> float:
    """The eigenvalue of the central-difference Laplacian for mode k (decay rate of the
    semi-discrete system, exactly)."""
    h = LENGTH / (n_cells + 1)
    return 4 * alpha / h**2 * math.sin(k * math.pi * h / (2 * LENGTH)) ** 2


def solve(system, t, alphas, x0, method="BDF", how=solve_looped, rtol=1e-9, **kw):
    n = len(alphas)
    settings = SolverSettings(method=method, rtol=rtol, atol=1e-12)
    u = np.zeros((n, t.size, 0))
    return how(system, t, u, np.array(alphas)[:, None], x0, settings, **kw)


@pytest.mark.parametrize("method", ["BDF", "Radau"])
def test_an_eigenmode_decays_at_the_discrete_rate_with_the_sparse_jacobian(method):
    n_cells, alpha = 63, 0.01
    t = np.linspace(0.0, 2.0, 21)
    res = solve(rod(n_cells), t, [alpha], mode(n_cells)[None], method=method)
    assert res.n_failed == 0, res.reasons
    exact = np.exp(-discrete_rate(n_cells, alpha) * t)[:, None] * mode(n_cells)[None]
    # a stiff solve at rtol 1e-9: the error is the solver's, a few hundred x rtol at most
    assert np.max(np.abs(res.x[0] - exact)) <= 1e-6


def test_the_sparsity_pattern_saves_rhs_evaluations_and_changes_nothing_else():
    """Dense finite differences cost nx evaluations per Jacobian estimate, a tridiagonal
    pattern 3."""
    n_cells = 63
    t = np.linspace(0.0, 2.0, 11)
    x0 = mode(n_cells, 2)[None] + 0.3 * mode(n_cells, 5)[None]
    sparse = solve(rod(n_cells), t, [0.01], x0)
    dense = solve(rod(n_cells, sparse=False), t, [0.01], x0)
    assert sparse.n_failed == dense.n_failed == 0
    assert np.max(np.abs(sparse.x - dense.x)) <= 1e-6  # both within the solver's tolerance
    # the Jacobian of this linear system is estimated about once: one estimate's worth saved
    assert dense.nfev[0] - sparse.nfev[0] >= n_cells // 2, (sparse.nfev, dense.nfev)


@pytest.mark.parametrize("method", ["BDF", "LSODA"])
def test_stacked_scenarios_use_the_block_pattern_and_match_single_solves(method):
    n_cells = 31
    t = np.linspace(0.0, 1.0, 11)
    alphas = [0.005, 0.01, 0.02]
    x0 = np.stack([mode(n_cells, k) for k in (1, 2, 3)])
    stacked = solve(rod(n_cells), t, alphas, x0, method=method, how=solve_stacked)
    assert stacked.n_failed == 0, stacked.reasons
    for i, (a, k) in enumerate(zip(alphas, (1, 2, 3))):
        exact = np.exp(-discrete_rate(n_cells, a, k) * t)[:, None] * mode(n_cells, k)[None]
        assert np.max(np.abs(stacked.x[i] - exact)) <= 1e-6


def test_the_process_pool_returns_the_scenarios_in_order_with_their_failures():
    n_cells = 15
    t = np.linspace(0.0, 1.0, 6)
    alphas = [0.005, 0.01, 0.015, 0.02, 0.01]
    x0 = np.stack([mode(n_cells, k) for k in (1, 2, 1, 2, 3)])
    x0[4, 3] = np.nan  # a broken scenario: recorded as failed in its part, not raised
    pooled = solve(rod(n_cells), t, alphas, x0, how=solve_pooled, workers=2, stacked=False)
    looped = solve(rod(n_cells), t, alphas, x0)
    assert pooled.status.tolist() == looped.status.tolist() and pooled.status[4] != 0
    assert pooled.reasons == looped.reasons
    np.testing.assert_array_equal(pooled.x[:4], looped.x[:4])  # the same per-scenario solves
    stacked = solve(rod(n_cells), t, alphas[:4], x0[:4], how=solve_pooled, workers=2)
    assert stacked.n_failed == 0 and np.max(np.abs(stacked.x - looped.x[:4])) <= 1e-6
    # in stacks of at most 2 (3 parts for 5 scenarios): the broken one fails with its stack only
    chunked = solve(rod(n_cells), t, alphas, x0, how=solve_pooled, workers=2, chunk=2)
    assert chunked.status.tolist() == looped.status.tolist()
    assert np.max(np.abs(chunked.x[:4] - looped.x[:4])) <= 1e-6
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        solve(rod(n_cells), t, alphas, x0, how=solve_pooled, chunk=0)


def test_the_semi_discrete_decay_converges_at_second_order_in_the_grid():
    """The exact continuous rate alpha (pi / L)^2 against the solved decay on grids h and h/2:
    central differences err as h^2, so halving h divides the error by 4."""
    alpha, t_end = 0.01, 5.0
    t = np.array([0.0, t_end])
    errors = []
    for n_cells in (15, 31, 63):  # h = L / 16, L / 32, L / 64
        res = solve(rod(n_cells), t, [alpha], mode(n_cells)[None], rtol=1e-11)
        mid = n_cells // 2  # the mode's peak node
        solved = res.x[0, -1, mid] / res.x[0, 0, mid]
        errors.append(abs(solved - math.exp(-alpha * (math.pi / LENGTH) ** 2 * t_end)))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(3.8 <= r <= 4.2 for r in ratios), (errors, ratios)


def test_a_pattern_of_the_wrong_shape_is_refused():
    bad = rod(7)
    bad.jacobian_sparsity = lambda: np.ones((3, 3), dtype=bool)
    with pytest.raises(ValueError, match=r"jacobian_sparsity\(\) has shape \(3, 3\)"):
        solve(bad, np.linspace(0, 1, 3), [0.01], mode(7)[None])
    with pytest.raises(ValueError, match=r"jacobian_sparsity\(\) has shape \(3, 3\)"):
        solve(bad, np.linspace(0, 1, 3), [0.01, 0.01], np.stack([mode(7)] * 2), how=solve_stacked)
