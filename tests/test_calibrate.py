"""Calibration (twin_ml/calibrate, twin-calibrate): bad input, the solver backend against known
truth, the surrogate loop with MCMC and solver verification, and an unverified result when the
solver disagrees with the surrogate."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twin_ml.calibrate import CalibrationError, Problem, SolverBackend, SurrogateBackend, calibrate
from twin_ml.calibrate.synthetic import synthetic_request
from twin_ml.data import ScenarioDesign, generate_dataset
from twin_ml.physics import make_system

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A pendulum hybrid (undamped physics plus a learned residual), briefly trained, exported and
    stored: a rough surrogate, which is what verification is for."""
    root = tmp_path_factory.mktemp("calibrate")
    data, run, home = root / "data", root / "run", root / "store"
    generate_dataset(make_system("pendulum"), ScenarioDesign(t_end=2.0, dt=0.1), n_scenarios=24, seed=0,
                     out_dir=data, progress=False)
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    r = subprocess.run([str(BIN / "twin-train"), "experiment=pendulum_hybrid", f"data_dir={data}", f"out_dir={run}",
                        "ensemble.size=3", "trainer.max_epochs=2", "data.batch_size=8", "model.net.hidden=16",
                        "speed_scenarios=2", "logger=none"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(BIN / "twin-export"), f"run_dir={run}", "name=pend", "version=v1", "parity_scenarios=8"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    return run / "export" / "model.onnx", manifest, env, root


def _request(manifest, **kw):
    return synthetic_request(manifest, ["length", "damping"], seed=3, **kw)


@pytest.mark.parametrize("mutate, field, text", [
    (lambda r: r["outputs"].update(theta=[None] * len(r["times"])), "outputs.theta", "every value is missing"),
    (lambda r: r["times"].__setitem__(3, r["times"][1]), "times", "not sorted"),
    (lambda r: r["times"].__setitem__(2, r["times"][1]), "times", "duplicated timestamp"),
    (lambda r: r.update(fit=["length", "gravity"]), "fit", "unknown names ['gravity']; valid: length, damping, mass"),
    (lambda r: r["inputs"].pop("torque"), "inputs", "missing ['torque']"),
    (lambda r: r["outputs"].update(angle=[0.0] * len(r["times"])), "outputs", "unknown outputs ['angle']"),
    (lambda r: r["outputs"]["theta"].__setitem__(4, "x"), "outputs.theta[4]", "must be a number or null"),
    (lambda r: r.update(bounds={"length": [2.0, 1.0]}), "bounds.length", "low < high"),
    (lambda r: r.update(noise={"theta": -1.0}), "noise.theta", "must be > 0"),
    (lambda r: r["parameters"].pop("mass"), "parameters", "missing 'mass'"),
    (lambda r: r.update(times=r["times"][:2]), "times", "at least 3 timestamps"),
    (lambda r: r.update(priors={"length": {"normal": [1.0, 0.1, 3.0]}}), "priors.length.normal", "[mean, std]"),
    (lambda r: r["outputs"]["theta"].__setitem__(1, 10 ** 400), "outputs.theta[1]", "too large for a float"),
])
def test_bad_requests_name_the_field(exported, mutate, field, text):
    _, manifest, _, _ = exported
    request, _ = _request(manifest)
    mutate(request)
    with pytest.raises(CalibrationError) as e:
        Problem.build(request, manifest)
    assert e.value.field == field and text in str(e.value)


def test_bounds_outside_the_training_domain_warn_that_the_surrogate_extrapolates(exported):
    _, manifest, _, _ = exported
    request, _ = _request(manifest)
    request["bounds"] = {"length": [0.3, 1.5]}
    problem = Problem.build(request, manifest)
    assert any("bounds.length = [0.3, 1.5] reach outside the training domain" in w for w in problem.warnings)
    assert problem.lower[0] == 0.3
    request["parameters"]["mass"] = 5.0
    assert any("parameters.mass = 5 is outside the training domain" in w
               for w in Problem.build(request, manifest).warnings)


def test_a_posterior_needs_enough_kept_steps(exported):
    from twin_ml.calibrate.fit import posterior

    path, manifest, _, _ = exported
    problem = Problem.build(_request(manifest)[0], manifest)
    with pytest.raises(ValueError, match="steps - burn must be >= 20"):
        posterior(SurrogateBackend(path, manifest), problem, problem.noise, np.full(2, 0.5), steps=30, burn=15)


def test_solver_backend_recovers_the_true_parameters_from_clean_data(exported):
    """The oracle: data simulated by the solver at known values, fitted with the solver in the loop."""
    _, manifest, _, _ = exported
    request, truth = _request(manifest, noise_level=1e-6, missing=0.0)
    problem = Problem.build(request, manifest)
    solver = SolverBackend(manifest)
    result = calibrate(problem, None, solver, backend="solver", n_starts=2, max_nfev=40)
    for name, value in truth.items():
        assert result["estimate"][name] == pytest.approx(value, rel=1e-3)
    assert result["evaluations"]["solver_scenarios"] == solver.scenarios > 0


def test_surrogate_loop_with_mcmc_and_solver_verification(exported, tmp_path):
    path, manifest, _, _ = exported
    request, truth = _request(manifest, noise_level=0.02)
    problem = Problem.build(request, manifest)
    surrogate, solver = SurrogateBackend(path, manifest), SolverBackend(manifest)
    result = calibrate(problem, surrogate, solver, n_starts=3, mcmc={"steps": 150, "burn": 50, "walkers": 8},
                       verify_samples=4, refine_nfev=6, seed=1)
    post, diag, ver = result["posterior"], result["diagnostics"], result["verification"]
    for name in problem.fit:
        lo, hi = problem.lower[problem.fit.index(name)], problem.upper[problem.fit.index(name)]
        assert lo <= post[name]["q05"] < post[name]["q95"] <= hi
        assert lo <= result["estimate"][name] <= hi and result["std_error"][name] > 0
    assert 0 < diag["acceptance"] < 1 and len(diag["rhat"]) == 2 and all(math.isfinite(x) for x in diag["rhat"])
    assert result["_samples"].shape == (100 * 8, 2)
    # two output corrections, the estimate plus 4 posterior samples re-simulated, the refinement
    assert len(result["corrections"]) == 2 and ver["n_candidates"] == 5 and len(ver["within_2std"]) == 5
    assert 0 <= ver["uncorrected_within_2std"] <= 1
    assert ver["verified"] == (ver["within_2std"][0] >= 0.9 and not ver["solver_failed"][0])
    assert set(result["refined"]) == set(problem.fit)
    assert result["evaluations"]["solver_scenarios"] == solver.scenarios >= 2 + 5
    assert result["evaluations"]["surrogate_scenarios"] == surrogate.scenarios > 100 * 8
    # the time inside the models is counted, and the multi-start fit's share of it lies within that fit
    tm, ev = result["timings"], result["evaluations"]
    assert 0 < tm["multistart_model_s"] < tm["multistart_s"] < tm["least_squares_s"] < tm["total_s"]
    assert ev["surrogate_s"] == surrogate.seconds > tm["multistart_model_s"] and ev["solver_s"] == solver.seconds > 0
    # the refinement (solver in the loop from the estimate) lands near the truth; this rough
    # surrogate (2 epochs: the undamped physics, a residual that has barely learned the damping)
    # does not have to
    for name, value in truth.items():
        assert result["refined"][name] == pytest.approx(value, rel=0.05)


def test_an_overconfident_surrogate_is_caught_by_the_solver(exported):
    """The same surrogate with its stated std shrunk 1000x (its conformal scale edited in the file):
    the solver's trajectory at the estimate leaves that band, so the result is unverified."""
    import onnx
    from onnx import numpy_helper

    path, manifest, _, _ = exported
    request, _ = _request(manifest, noise_level=0.02)
    problem = Problem.build(request, manifest)
    honest = calibrate(problem, SurrogateBackend(path, manifest), SolverBackend(manifest), n_starts=2, mcmc=None,
                       corrections=0)
    mp = onnx.load(str(path))
    for init in mp.graph.initializer:
        if init.name == "ens/conformal_scale":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1e-3, init.name))
    shrunk = SurrogateBackend(mp.SerializeToString(), manifest)
    result = calibrate(problem, shrunk, SolverBackend(manifest), n_starts=2, mcmc=None, corrections=0)
    assert result["verification"]["within_2std"][0] < honest["verification"]["within_2std"][0]
    assert result["verification"]["verified"] is False
    assert any(w.startswith("unverified") for w in result["warnings"])


def test_twin_calibrate_cli_writes_json_and_plot(exported, tmp_path):
    _, manifest, env, _ = exported
    request, truth = _request(manifest)
    obs = tmp_path / "obs.json"
    obs.write_text(json.dumps(request))
    out = tmp_path / "cal"
    r = subprocess.run([str(BIN / "twin-calibrate"), "model=pend:v1", f"observations={obs}", f"out_dir={out}",
                        "steps=120", "burn=40", "walkers=8", "starts=2"], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(out / "calibration.json")
    result = json.loads((out / "calibration.json").read_text())
    assert set(result["estimate"]) == set(truth) and "verification" in result and "posterior" in result
    assert result["model"] == "pend:v1" and (out / "calibration.png").stat().st_size > 10_000
    bad = dict(request, fit=["length", "gravity"])
    obs.write_text(json.dumps(bad))
    r = subprocess.run([str(BIN / "twin-calibrate"), "model=pend:v1", f"observations={obs}", f"out_dir={out}"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 2 and "fit: unknown names ['gravity']; valid: length, damping, mass" in r.stderr


def test_missing_noise_is_estimated_from_the_residuals(exported):
    """No noise given: a first fit, then the residual RMS; with the solver in the loop it recovers
    the noise the synthetic data was made with."""
    _, manifest, _, _ = exported
    request, truth = _request(manifest, noise_level=0.02, missing=0.0)
    sigma = request.pop("noise")["theta"]
    problem = Problem.build(request, manifest)
    result = calibrate(problem, None, SolverBackend(manifest), backend="solver", n_starts=2, max_nfev=40)
    assert result["noise_estimated"] == ["theta"]
    assert result["noise"]["theta"] == pytest.approx(sigma, rel=0.25)
    for name, value in truth.items():
        assert result["estimate"][name] == pytest.approx(value, rel=0.05)


def test_lockstep_starts_equal_each_start_alone_and_share_calls(exported):
    """The starts run in lockstep, their candidates batched into shared backend calls: each start
    ends exactly where it ends when run alone, in fewer calls than the starts made apart."""
    from twin_ml.calibrate.fit import point_estimate, starts

    _, manifest, _, _ = exported
    problem = Problem.build(_request(manifest)[0], manifest)
    z0s = starts(problem, 3, seed=0)
    together = SolverBackend(manifest)
    joint = point_estimate(together, problem, problem.noise, z0s, max_nfev=6)
    apart_calls = apart_scenarios = 0
    for i, z0 in enumerate(z0s):
        alone = SolverBackend(manifest)
        single = point_estimate(alone, problem, problem.noise, z0[None], max_nfev=6)
        assert joint["starts"][i]["theta"] == single["starts"][0]["theta"]
        assert joint["starts"][i]["nfev"] == single["starts"][0]["nfev"]
        apart_calls += alone.calls
        apart_scenarios += alone.scenarios
    assert together.scenarios == apart_scenarios
    assert together.calls < apart_calls


def test_batched_backend_gets_jacobian_points_with_each_candidate(exported):
    """A batching backend gets each candidate's forward-difference points in the same call: the
    starts take the very same path (a looped solver answers each candidate alone, so its numbers do
    not depend on the batch), in about half the calls, paying for it in scenarios."""
    from twin_ml.calibrate.fit import point_estimate, starts

    _, manifest, _, _ = exported
    problem = Problem.build(_request(manifest)[0], manifest)
    z0s = starts(problem, 3, seed=0)
    plain, eager = SolverBackend(manifest), SolverBackend(manifest)
    assert plain.batched is False
    eager.batched = True
    a = point_estimate(plain, problem, problem.noise, z0s, max_nfev=8)
    b = point_estimate(eager, problem, problem.noise, z0s, max_nfev=8)
    assert [s["theta"] for s in a["starts"]] == [s["theta"] for s in b["starts"]]
    assert [s["nfev"] for s in a["starts"]] == [s["nfev"] for s in b["starts"]]
    assert np.array_equal(a["cov_z"], b["cov_z"])
    # every call of the eager run is one lockstep iteration: as many as the longest start's evaluations
    assert eager.calls == max(s["nfev"] for s in b["starts"]) < plain.calls
    assert eager.scenarios > plain.scenarios


def test_corrections_solve_the_estimate_and_its_slope_points_in_one_call(exported):
    """Round 1 solves the estimate; round 2 the estimate and its 2 slope points in one stacked
    solve; verification the final estimate: 3 solver calls, 5 scenarios. Solved together, the
    points share one step sequence, so their differences (the correction's slope) carry no step
    noise: closer to a tight-tolerance solver's slope than differences of separate solves."""
    from twin_ml.calibrate.fit import SLOPE_STEP, _fd_steps
    from twin_ml.physics import SolverSettings

    path, manifest, _, _ = exported
    problem = Problem.build(_request(manifest)[0], manifest)
    solver = SolverBackend(manifest)
    result = calibrate(problem, SurrogateBackend(path, manifest), solver, n_starts=2, mcmc=None, corrections=2)
    assert len(result["corrections"]) == 2
    assert (solver.calls, solver.scenarios) == (3, 5)

    z = problem.to_unit(np.array([list(result["estimate"].values())]))[0]
    steps = _fd_steps(z, SLOPE_STEP)
    thetas = problem.from_unit(np.vstack([z, z + np.diag(steps)]))

    def slope(y):
        return (y[1:] - y[:1]) / steps[:, None, None]

    tight = SolverBackend(manifest, settings=SolverSettings(rtol=1e-11, atol=1e-13))
    reference = slope(tight.predict(problem, thetas)[0])
    err_together = np.linalg.norm(slope(solver.predict(problem, thetas, together=True)[0]) - reference)
    err_apart = np.linalg.norm(slope(solver.predict(problem, thetas)[0]) - reference)
    assert err_together < 1e-3 * np.linalg.norm(reference)
    assert err_together < err_apart


def test_lockstep_backend_failure_reaches_every_start(exported):
    """A backend that raises fails the estimate with its own error, without leaving a start
    waiting for a batch that never comes."""
    from twin_ml.calibrate.fit import point_estimate, starts

    class Broken:
        calls = scenarios = 0

        def predict(self, problem, theta):
            raise RuntimeError("backend down")

    _, manifest, _, _ = exported
    problem = Problem.build(_request(manifest)[0], manifest)
    with pytest.raises(RuntimeError, match="backend down"):
        point_estimate(Broken(), problem, problem.noise, starts(problem, 4, seed=0))


def test_first_order_correction_matches_the_solver_at_its_measured_points(exported):
    """The corrected surrogate equals the solver where the correction was measured: at the
    estimate (value) and at its secant points (slopes), and the slope-free one only at the first."""
    from twin_ml.calibrate.backends import CorrectedSurrogate

    path, manifest, _, _ = exported
    problem = Problem.build(_request(manifest)[0], manifest)
    surrogate, solver = SurrogateBackend(path, manifest), SolverBackend(manifest)
    z0 = np.array([0.4, 0.6])
    zs = np.vstack([z0, z0 + np.diag([0.01, -0.01])])
    thetas = problem.from_unit(zs)
    y_solver, _ = solver.predict(problem, thetas)
    d = y_solver - surrogate.predict(problem, thetas)[0]
    slope = (d[1:] - d[:1]) / np.array([0.01, -0.01])[:, None, None]
    first = CorrectedSurrogate(surrogate, d[0], z0=z0, slope=slope)
    zero = CorrectedSurrogate(surrogate, d[0])
    scale = np.ptp(y_solver)
    np.testing.assert_allclose(first.predict(problem, thetas)[0], y_solver, atol=1e-9 * scale)
    np.testing.assert_allclose(zero.predict(problem, thetas[:1])[0], y_solver[:1], atol=1e-9 * scale)
    assert np.max(np.abs(zero.predict(problem, thetas[1:])[0] - y_solver[1:])) > 1e-6 * scale
