"""The grid of spatially resolved systems: its Laplacian against the exact eigenvectors of the
discrete operator, conservation under no-flux boundaries, numpy = torch, the sparsity pattern
against the operator itself, a 2D heat equation solved with it, and its input checks."""

import math

import numpy as np
import pytest
import torch

from twin_ml.physics import Output, Parameter, PhysicsSystem, SolverSettings, State, solve_stacked
from twin_ml.physics.grid import Grid

pytestmark = pytest.mark.numeric

EPS64 = np.finfo(np.float64).eps


def sine(grid: Grid, *k: int) -> np.ndarray:
    """The Dirichlet eigenmode prod sin(k pi x / L) on the cell centres, flat [cells]."""
    axes = [np.sin(kk * math.pi * c / L) for kk, c, L in zip(k, grid.coordinates(), grid.extent)]
    return np.multiply.outer(*axes).ravel() if len(axes) == 2 else axes[0]


def eigenvalue(grid: Grid, *k: int) -> float:
    return -sum(
        4 / h**2 * math.sin(kk * math.pi * h / (2 * L)) ** 2
        for kk, h, L in zip(k, grid.spacing, grid.extent)
    )


DIRICHLET_0 = {
    "south": ("dirichlet", 0.0),
    "north": ("dirichlet", 0.0),
    "west": ("dirichlet", 0.0),
    "east": ("dirichlet", 0.0),
}


@pytest.mark.parametrize("shape, extent, k", [((17,), (2.0,), (3,)), ((12, 9), (1.0, 0.5), (2, 1))])
def test_sine_modes_are_exact_eigenvectors_with_dirichlet_faces(shape, extent, k):
    grid = Grid(shape, extent)
    bc = {s: DIRICHLET_0[s] for s in grid.sides}
    u = sine(grid, *k)
    lap = grid.laplacian(u[None], bc)[0]
    lam = eigenvalue(grid, *k)
    # 5 terms of size |u| / h^2 each, rounded: a few eps of 4/h^2 per term
    tol = 16 * EPS64 * sum(4 / h**2 for h in grid.spacing)
    assert np.max(np.abs(lap - lam * u)) <= tol


def test_no_flux_faces_conserve_the_total_and_cosines_are_eigenvectors():
    grid = Grid((10, 14), (1.0, 2.0))
    rng = np.random.default_rng(0)
    field = rng.normal(size=(3, grid.cells))
    total = grid.laplacian(field).sum(axis=-1) * grid.cell_volume
    scale = np.abs(field).sum(axis=-1) * grid.cell_volume * 4 / min(grid.spacing) ** 2
    assert np.all(np.abs(total) <= 64 * EPS64 * scale)  # telescoping: zero up to rounding
    cy, cx = (
        np.cos(k * math.pi * c / L) for k, c, L in zip((1, 3), grid.coordinates(), grid.extent)
    )
    mode = np.multiply.outer(cy, cx).ravel()
    lam = eigenvalue(grid, 1, 3)
    assert np.max(np.abs(grid.laplacian(mode) - lam * mode)) <= 16 * EPS64 * abs(lam) * 4


def test_numpy_and_torch_give_the_same_laplacian():
    grid = Grid((6, 5), (1.0, 1.0))
    rng = np.random.default_rng(1)
    field = rng.normal(size=(2, grid.cells))
    bc = {"west": ("dirichlet", 1.5), "north": ("neumann", None)}
    a = grid.laplacian(field, bc)
    b = grid.laplacian(torch.tensor(field), bc).numpy()
    assert np.max(np.abs(a - b)) <= 16 * EPS64 * np.abs(a).max()


def test_the_pattern_holds_every_nonzero_of_the_operator():
    for grid in (Grid((7,), (1.0,)), Grid((4, 6), (1.0, 1.0))):
        columns = [grid.laplacian(np.eye(grid.cells)[j]) for j in range(grid.cells)]
        jac = np.stack(columns, axis=1)  # d(lap)/d(field): constant, the operator itself
        pattern = grid.laplacian_pattern().toarray()
        assert np.array_equal(jac != 0, pattern)


class Plate(PhysicsSystem):
    """u_t = alpha lap(u) on a plate held at 0 on every edge (test-only)."""

    states = ()
    outputs = (Output("centre", "K"),)
    parameters = (Parameter("alpha", "m^2/s", nominal=1e-3, bounds=(5e-4, 2e-3)),)
    solver = "BDF"
    stiffness = "stiff"

    def __init__(self, *, ny: int = 8, nx: int = 6):
        self.grid = Grid((ny, nx), (0.1, 0.1))
        self.states = tuple(State(f"T{i}", "K", bounds=(-1.0, 1.0)) for i in range(ny * nx))

    def rhs(self, t, x, u, p):
        return p[..., 0:1] * self.grid.laplacian(x, DIRICHLET_0)

    def observe(self, x, u, p):
        return x[..., self.grid.cells // 2 : self.grid.cells // 2 + 1]

    def jacobian_sparsity(self):
        return self.grid.laplacian_pattern()


def test_a_plate_mode_decays_at_its_discrete_rate_in_the_sparse_stacked_solve():
    plate = Plate()
    alphas = np.array([[5e-4], [2e-3]])
    x0 = np.stack([sine(plate.grid, 1, 1), sine(plate.grid, 2, 1)])
    t = np.linspace(0.0, 2.0, 11)
    settings = SolverSettings(method="BDF", rtol=1e-9, atol=1e-12)
    res = solve_stacked(plate, t, np.zeros((2, t.size, 0)), alphas, x0, settings)
    assert res.n_failed == 0, res.reasons
    for i, k in enumerate(((1, 1), (2, 1))):
        rate = alphas[i, 0] * eigenvalue(plate.grid, *k)
        exact = np.exp(rate * t)[:, None] * x0[i][None]
        assert np.max(np.abs(res.x[i] - exact)) <= 1e-6  # the solver's tolerance, not round-off


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"shape": (2, 8), "extent": (1.0, 1.0)}, "too few for the 3-point stencil"),
        ({"shape": (8, 8, 8), "extent": (1.0, 1.0, 1.0)}, "1 or 2 axes"),
        ({"shape": (8,), "extent": (1.0, 1.0)}, "one length per axis"),
        ({"shape": (8,), "extent": (-1.0,)}, "finite and > 0"),
    ],
)
def test_bad_grids_name_the_field(kwargs, text):
    with pytest.raises(ValueError, match=text):
        Grid(**kwargs)


def test_positions_and_sides_are_checked():
    grid = Grid((4, 5), (1.0, 2.0))
    assert grid.index(0.99, 1.99) == grid.cells - 1 and grid.index(0.0, 0.0) == 0
    with pytest.raises(ValueError, match="outside the domain"):
        grid.index(1.5, 0.5)
    with pytest.raises(ValueError, match="unknown sides"):
        grid.laplacian(np.zeros(grid.cells), {"top": ("dirichlet", 0.0)})
    with pytest.raises(ValueError, match="'robin'"):
        grid.laplacian(np.zeros(grid.cells), {"west": ("robin", 0.0)})
