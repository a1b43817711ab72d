"""What calibration calls in its loop: the exported surrogate (onnxruntime, vectorized over
candidates) or the physics solver (scipy), behind one interface:

    backend.predict(problem, theta [K, n_fit]) -> (mean [K, T, ny], std [K, T, ny])

The solver's std is 0, and its predict also takes `together=True` (the calibration's correction
uses it; a wrapper around a solver backend passes it on). Both count their calls, the scenarios
they simulated and the seconds spent in them. Torch-free.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from twin_ml.calibrate.problem import Problem
from twin_ml.contract import ModelCard
from twin_ml.contract.requests import SolverTarget
from twin_ml.physics import PhysicsSystem, SolverSettings, solve_looped, solve_stacked


class SurrogateBackend:
    """The exported surrogate in onnxruntime. Its std is the graph's (the in-domain conformal
    scale), not widened by the card's conformal_shift as /simulate widens it outside the training
    box: candidates stay in the box by default (d = 0, where the two agree), a widening would
    reward a fit for leaving it, and the solver verifies the estimate."""

    name = "surrogate"
    batched = True  # K candidates cost about one call: the optimizer may send extra ones

    def __init__(
        self, onnx: str | Path | bytes, card: ModelCard | dict[str, Any], threads: int = 1
    ):
        from twin_ml._ort import session

        self.session = session(onnx, threads=threads)
        self.card = ModelCard.of(card)
        self.calls = self.scenarios = 0
        self.seconds = 0.0

    def predict(self, problem: Problem, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        p, x0 = problem.arguments(theta)
        u = np.repeat(problem.u[None], len(p), axis=0)
        mean, std = self.session.run(
            ["mean", "std"],
            {"x0": x0.astype(np.float32), "u": u.astype(np.float32), "p": p.astype(np.float32)},
        )
        self.calls += 1
        self.scenarios += len(p)
        self.seconds += time.perf_counter() - t0
        return mean.astype(np.float64), std.astype(np.float64)


class SolverBackend:
    """The system's reference solver: `looped` (one solve_ivp per candidate, as a plain calibration
    loop does) or `stacked` (all candidates of a call in one vectorized solve). The system: a
    model's card (its system rebuilt), a `SolverTarget` or the `PhysicsSystem` itself."""

    name = "solver"

    def __init__(
        self,
        card: ModelCard | SolverTarget | PhysicsSystem | dict[str, Any],
        mode: str = "looped",
        settings: SolverSettings | None = None,
    ):
        if mode not in ("looped", "stacked"):
            raise ValueError(f"solver mode must be 'looped' or 'stacked', got {mode!r}")
        if isinstance(card, PhysicsSystem):
            self.system = card
        elif isinstance(card, SolverTarget):
            self.system = card.system.build()
        else:
            self.system = ModelCard.of(card).system.build()
        self.mode, self.settings = mode, settings or SolverSettings()
        self.batched = mode == "stacked"
        self.calls = self.scenarios = 0
        self.seconds = 0.0

    def predict(
        self, problem: Problem, theta: np.ndarray, *, together: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """`together`: one stacked solve for this call whatever the mode (a point and its
        difference steps: one step sequence for all, so their differences carry no step noise)."""
        t0 = time.perf_counter()
        p, x0 = problem.arguments(theta)
        u = np.repeat(problem.u[None], len(p), axis=0)
        solve = solve_stacked if together or self.mode == "stacked" else solve_looped
        res = solve(self.system, problem.times, u, p, x0, self.settings)
        y = res.y.astype(np.float64)
        y[res.status != 0] = (
            np.nan
        )  # a failed solve: no prediction (the objective makes it a bad fit)
        self.calls += 1
        self.scenarios += len(p)
        self.seconds += time.perf_counter() - t0
        return y, np.zeros_like(y)


class CorrectedSurrogate:
    """The surrogate plus an output correction measured by the solver at one point z0 (unit box of
    the fitted values): d(t) = solver - surrogate there (zero order, multi-fidelity output
    correction), and optionally its slope, d(t) + (z - z0) . dd/dz (first order, so the corrected
    surrogate matches the solver's value and sensitivities at z0; its optimum is then a stationary
    point of the solver's objective, and its posterior width follows the solver's sensitivities).
    Its std stays the surrogate's own."""

    name = "surrogate"
    batched = True

    def __init__(
        self,
        surrogate: SurrogateBackend,
        correction: np.ndarray,
        z0: np.ndarray | None = None,
        slope: np.ndarray | None = None,
    ):
        self.surrogate, self.correction = surrogate, correction  # [T, ny]
        self.z0, self.slope = z0, slope  # [n_fit], [n_fit, T, ny]

    @property
    def calls(self) -> int:
        return self.surrogate.calls

    @property
    def scenarios(self) -> int:
        return self.surrogate.scenarios

    @property
    def seconds(self) -> float:
        return self.surrogate.seconds

    def predict(self, problem: Problem, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = self.surrogate.predict(problem, theta)
        mean = mean + self.correction[None]
        if self.slope is not None:
            dz = problem.to_unit(np.atleast_2d(theta)) - self.z0[None]
            mean = mean + np.einsum("kf,fty->kty", dz, self.slope)
        return mean, std
