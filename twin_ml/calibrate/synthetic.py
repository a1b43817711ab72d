"""Synthetic calibration problems: observations simulated by the physics solver at known
parameters, with Gaussian noise and a few missing points (the benchmark's and the tests' oracle)."""

from __future__ import annotations

from typing import Any

import numpy as np

from twin_ml.contract import ModelCard
from twin_ml.data import ScenarioDesign
from twin_ml.data.generate import scenario_inputs
from twin_ml.physics import SolverSettings, solve_looped


def synthetic_request(
    card: ModelCard | dict[str, Any],
    fit: list[str],
    *,
    seed: int = 0,
    noise_level: float = 0.02,
    missing: float = 0.05,
    truth: dict[str, float] | None = None,
    margin: float = 0.2,
) -> tuple[dict[str, Any], dict[str, float]]:
    """(a calibration request for `fit`, the true values). The scenario (inputs, other parameters,
    initial state) is drawn from the system's default design on the model's training grid; the
    true values of the fitted parameters are drawn from the inner (1 - 2 margin) of the training
    box unless given. Noise std per output: noise_level x the range of its clean trajectory."""
    card = ModelCard.of(card)
    system = card.system.build()
    dt, steps = card.time.dt, card.time.train_steps
    design = ScenarioDesign(t_end=steps * dt, dt=dt, extrapolation_fraction=0.0)
    scen = design.sample(system, 1, seed)
    t = design.time_grid(system)
    u = scenario_inputs(t, design.signal_specs(system), scen, seed)[0]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 61]))
    p, x0 = scen.p[0].copy(), scen.x0[0].copy()
    names = system.parameter_names
    truth = dict(truth or {})
    for name in fit:
        if name not in truth:
            lo, hi = card.domain.fitted(name)
            truth[name] = float(lo + (hi - lo) * rng.uniform(margin, 1 - margin))
        if name.startswith("state:"):
            x0[system.state_names.index(name[6:])] = truth[name]
        else:
            p[names.index(name)] = truth[name]
    tight = SolverSettings(rtol=1e-9, atol=1e-11)
    res = solve_looped(system, t, u[None], p[None], x0[None], tight)
    if res.n_failed:
        raise RuntimeError(f"the solver failed on the synthetic scenario: {res.reasons[0]}")
    y = res.y[0]
    sigma = noise_level * np.ptp(y, axis=0) + 1e-12
    y_obs = y + sigma * rng.standard_normal(y.shape)
    drop = rng.uniform(size=y.shape) < missing
    drop[0] = False
    y_obs[drop] = np.nan
    outputs = system.output_names
    request = {
        "times": t.tolist(),
        "outputs": {
            n: [None if np.isnan(v) else float(v) for v in y_obs[:, j]]
            for j, n in enumerate(outputs)
        },
        "inputs": {n: u[:, j].tolist() for j, n in enumerate(system.input_names)},
        "fit": list(fit),
        "parameters": {n: float(v) for n, v in zip(names, p) if n not in fit},
        "initial_state": {
            n: float(v) for n, v in zip(system.state_names, x0) if f"state:{n}" not in fit
        },
        "noise": {n: float(s) for n, s in zip(outputs, sigma)},
    }
    return request, truth
