"""Physics from an FMU: the damped oscillator of twin_ml/physics/fmus/damped_oscillator, an FMI 2.0
model-exchange FMU written in C, compiled here with the machine's C compiler against FMPy's FMI
headers (once per module), loaded by FMPy and integrated by the project's scipy solver.

Oracles: the same equations written in numpy (the right-hand side and the computed output), and
the exact solution of the linear system under a held input (a matrix exponential per grid
interval). Then the whole chain once, on a tiny setting, from configs/system/
damped_oscillator_fmu.yaml: twin-generate (two worker processes, each rebuilding the system from
its options), twin-train (node and emulator), twin-export (ONNX parity against torch), twin-serve
(/simulate and the domain check) and twin-calibrate (a least-squares fit of the stiffness, refined
and verified with the solver through the FMU).
"""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import train_here
from scipy.linalg import expm

from twin_ml._io import canonical_json
from twin_ml.physics import SolverSettings, solve_looped, solve_stacked, system_from_description
from twin_ml.physics.fmu import FMUError, FMUSystem, build_fmu

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "twin_ml" / "physics" / "fmus" / "damped_oscillator"
BIN = Path(sys.executable).parent
EPS = float(np.finfo(np.float64).eps)
MASS = 1.0  # the FMU's start value (not exposed below)
DESIGN = {
    "parameters": {"stiffness": [2.0, 8.0], "damping": [0.1, 1.0]},
    "states": {"position": [-1.0, 1.0], "velocity": [-1.0, 1.0]},
    "inputs": {"force": {"bounds": [-1.0, 1.0], "interpolation": "zoh"}},
}


@pytest.fixture(scope="module")
def fmu(tmp_path_factory) -> Path:
    return build_fmu(SOURCE, tmp_path_factory.mktemp("fmu") / "damped_oscillator.fmu")


def oscillator(fmu, **changes) -> FMUSystem:
    return FMUSystem(fmu=str(fmu), **{**DESIGN, **changes})


def equations(x, u, p):
    """The C model's equations in numpy (the same operations in the same order)."""
    k, c = p[..., 0], p[..., 1]
    dv = (u[..., 0] - k * x[..., 0] - c * x[..., 1]) / MASS
    return np.stack([x[..., 1], dv], axis=-1)


# ---- the FMU against independent oracles ---------------------------------------------------------


def test_declarations_come_from_the_model_description(fmu):
    s = oscillator(fmu)
    assert (s.name, s.state_names, s.input_names) == (
        "damped_oscillator",
        ["position", "velocity"],
        ["force"],
    )
    assert s.output_names == ["position", "spring_force"]  # all Real outputs by default
    assert s.parameter_names == ["stiffness", "damping"]  # the ones the YAML names
    units = [v.unit for v in (*s.states, *s.inputs, *s.outputs, *s.parameters)]
    assert units == ["m", "m/s", "N", "m", "N", "N/m", "N.s/m"]
    assert s.nominal_parameters.tolist() == [4.0, 0.4]  # the FMU's start values
    assert s.parameters[0].limits == (0.0, np.inf)  # its min/max
    assert s.inputs[0].limits == (-5.0, 5.0) and s.inputs[0].interpolation == "zoh"
    assert s.default_horizon == (10.0, 0.05)  # the DefaultExperiment
    assert s.options["sha256"] == s.fmu_sha256 and s.options["fmu"] == str(fmu)


@pytest.mark.numeric
def test_rhs_and_computed_output_are_the_equations(fmu, rng):
    s = oscillator(fmu)
    x = rng.uniform(-1, 1, (3, 4, 2))
    u = rng.uniform(-1, 1, (3, 4, 1))
    p = rng.uniform([2.0, 0.1], [8.0, 1.0], (3, 1, 2))  # broadcast over the middle axis
    want = equations(x, u, p)
    # a handful of flops per value: a few ulps of the largest term
    tol = (
        4
        * EPS
        * (np.abs(u[..., 0]) + np.abs(p[..., 0] * x[..., 0]) + np.abs(p[..., 1] * x[..., 1]))
    )
    got = s.rhs(0.0, x, u, p)
    assert got.shape == (3, 4, 2)
    assert np.all(np.abs(got[..., 1] - want[..., 1]) <= tol)
    np.testing.assert_array_equal(got[..., 0], x[..., 1])  # a copy
    y = s.observe(x, u, p)  # position: the state itself; spring_force: the FMU's k * position
    np.testing.assert_array_equal(y[..., 0], x[..., 0])
    assert np.all(np.abs(y[..., 1] - p[..., 0] * x[..., 0]) <= EPS * np.abs(p[..., 0] * x[..., 0]))


def exact(t, u, p, x0):
    """The linear oscillator's exact solution under the held input: per grid interval,
    exp([[A, B u_k], [0, 0]] h) applied to [x, 1]."""
    k, c = p
    out = [np.asarray(x0, dtype=float)]
    for i in range(len(t) - 1):
        m = np.zeros((3, 3))
        m[0, 1], m[1, 0], m[1, 1], m[1, 2] = 1.0, -k / MASS, -c / MASS, u[i, 0] / MASS
        out.append((expm(m * (t[i + 1] - t[i])) @ np.append(out[-1], 1.0))[:2])
    return np.array(out)


@pytest.mark.numeric
def test_trajectories_match_the_exact_solution(fmu, rng):
    s = oscillator(fmu, outputs=["position"])
    t = np.linspace(0.0, 4.0, 41)
    n = 3
    u = np.repeat(rng.uniform(-1, 1, (n, 4, 1)), 10, axis=1)  # held levels, 4 steps
    u = np.concatenate([u, u[:, -1:]], axis=1)
    p = rng.uniform([2.0, 0.1], [8.0, 1.0], (n, 2))
    x0 = rng.uniform(-1, 1, (n, 2))
    settings = SolverSettings(method="DOP853", rtol=1e-10, atol=1e-12)
    looped = solve_looped(s, t, u, p, x0, settings)
    stacked = solve_stacked(s, t, u, p, x0, settings)
    assert looped.n_failed == 0 and stacked.n_failed == 0
    for i in range(n):
        want = exact(t, u[i], p[i], x0[i])
        # each accepted DOP853 step (12 evaluations) errs by at most atol + rtol |x|; along a
        # damped (non-expanding) flow the steps' errors add up at most
        for res, nfev in ((looped, looped.nfev[i]), (stacked, stacked.nfev[i])):
            tol = nfev / 12 * (settings.atol + settings.rtol * np.abs(want).max())
            assert np.abs(res.x[i] - want).max() <= tol, (np.abs(res.x[i] - want).max(), tol)
        np.testing.assert_array_equal(looped.y[i, :, 0], looped.x[i, :, 0])


def test_pickles_as_its_options_and_refuses_a_changed_file(fmu, tmp_path):
    s = oscillator(fmu)
    again = pickle.loads(pickle.dumps(s))  # what a worker process gets: no FMU instance
    assert again.options == s.options and again.describe() == s.describe()
    x, u, p = np.array([0.3, -0.2]), np.array([0.5]), np.array([4.0, 0.4])
    np.testing.assert_array_equal(again.rhs(0.0, x, u, p), s.rhs(0.0, x, u, p))
    # what a dataset, a run and a model card record (JSON with sorted keys) rebuilds the same
    # system: the parameter vector keeps its order (the FMU's, whatever the mapping's)
    recorded = json.loads(canonical_json(s.describe()))
    assert list(recorded["options"]["parameters"]) == ["damping", "stiffness"]
    rebuilt = system_from_description(recorded)
    assert rebuilt.parameter_names == ["stiffness", "damping"] and rebuilt.options == s.options
    np.testing.assert_array_equal(rebuilt.rhs(0.0, x, u, p), s.rhs(0.0, x, u, p))
    copy = tmp_path / "copy.fmu"
    copy.write_bytes(fmu.read_bytes())
    recorded = oscillator(copy).options
    with zipfile.ZipFile(copy, "a") as zf:  # the same model, other bytes
        zf.comment = b"changed"
    with pytest.raises(FMUError, match="sha256 .* was recorded with") as e:
        FMUSystem(**recorded)
    assert recorded["sha256"] in str(e.value)


# ---- bad FMUs and YAMLs: errors that name the cause --------------------------------------------


def rewritten(fmu: Path, out: Path, *, drop=(), xml=None) -> Path:
    """The FMU with members dropped and/or its modelDescription.xml rewritten by `xml`."""
    with zipfile.ZipFile(fmu) as src:
        members = {n: src.read(n) for n in src.namelist() if not n.startswith(tuple(drop))}
    if xml is not None:
        members["modelDescription.xml"] = xml(members["modelDescription.xml"].decode()).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    out.write_bytes(buf.getvalue())
    return out


def _cosimulation_only(text: str) -> str:
    start, end = text.index("<ModelExchange"), text.index("</ModelExchange>")
    block = text[start : end + len("</ModelExchange>")]
    cs = block.replace("ModelExchange", "CoSimulation").replace(
        ' completedIntegratorStepNotNeeded="true"', ""
    )
    return text.replace(block, cs)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_binary", r"no binary for this platform \(binaries/linux64/damped_oscillator\.so"),
        ("fmi1", r"is an FMI 1\.0 FMU; FMUSystem runs FMI 2\.0 model-exchange FMUs"),
        ("fmi3", r"is an FMI 3\.0 FMU; FMUSystem runs FMI 2\.0 model-exchange FMUs"),
        ("cosimulation", r"has no model-exchange interface \(co-simulation only\)"),
        ("not_a_zip", r"is not an FMU \(not a zip file\)"),
        ("missing", r"fmu: no file .*missing\.fmu"),
    ],
)
def test_bad_fmus_are_refused_naming_the_cause(fmu, tmp_path, case, message):
    import fmpy

    if case == "no_binary" and fmpy.platform != "linux64":
        pytest.skip("the message names this platform's binary")
    bad = tmp_path / f"{case}.fmu"
    if case == "no_binary":
        rewritten(fmu, bad, drop=["binaries/"])
    elif case in ("fmi1", "fmi3"):
        version = {"fmi1": "1.0", "fmi3": "3.0"}[case]
        rewritten(fmu, bad, xml=lambda t: t.replace('fmiVersion="2.0"', f'fmiVersion="{version}"'))
    elif case == "cosimulation":
        rewritten(fmu, bad, xml=_cosimulation_only)
    elif case == "not_a_zip":
        bad.write_text("not an FMU")
    else:
        bad = tmp_path / "missing.fmu"
    with pytest.raises(FMUError, match=message):
        oscillator(bad)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"parameters": {"stifness": [2.0, 8.0]}},
            "parameters.stifness: the FMU has no parameter 'stifness'; its parameters: "
            "damping, mass, stiffness",
        ),
        (
            {"states": {"pos": [0.0, 1.0]}},
            "states.pos: the FMU has no continuous state 'pos'; its continuous states: "
            "position, velocity",
        ),
        (
            {"inputs": {"forse": [0, 1]}},
            "inputs.forse: the FMU has no input 'forse'; its inputs: force",
        ),
        (
            {"outputs": ["velocity"]},
            "outputs.velocity: the FMU has no output 'velocity'; its outputs: "
            "position, spring_force",
        ),
        (
            {"regimes": {"stiff": {"parameters": {"mass": [1.0, 2.0]}}}},
            "regime 'stiff' names unknown parameter 'mass'; known: ['damping', 'stiffness']",
        ),
        (
            {"parameters": {"stiffness": [5.0, 8.0]}},
            "parameters.stiffness: .*nominal 4.0 is outside",
        ),
        ({"parameters": {"stiffness": "soft"}}, "parameters.stiffness.bounds: expected a pair"),
    ],
)
def test_names_and_boxes_the_fmu_lacks_are_refused(fmu, changes, message):
    with pytest.raises(FMUError, match=message.replace("(", r"\(").replace("[", r"\[")):
        oscillator(fmu, **changes)


def test_torch_models_that_need_the_rhs_or_a_computed_output_are_refused(fmu, rng):
    """The hybrid adds the physics rhs inside a torch model: an FMU cannot run there; and a
    neural ODE observes states, so an output the FMU computes cannot be observed in torch."""
    import torch

    from twin_ml.models import build_model, compute_stats

    s = oscillator(fmu)
    x = rng.uniform(-1, 1, (4, 5, 2))
    u, p, t = rng.uniform(-1, 1, (4, 5, 1)), rng.uniform(2, 8, (4, 2)), np.linspace(0, 0.4, 5)
    stats = compute_stats(x, u, p, s.observe(x, u, p[:, None]), t)
    args = [torch.tensor(a, dtype=torch.float32) for a in (x[:, 0], u, p, t)]
    hybrid = build_model("hybrid", s, stats, members=2, seed=0, hidden=8)
    with pytest.raises(
        FMUError, match="is an FMU: its right-hand side runs on numpy arrays only"
    ) as e:
        hybrid(*args)
    assert "model=hybrid" in str(e.value) and "model=node" in str(e.value)
    node = build_model("node", s, stats, members=2, seed=0, hidden=8)
    with pytest.raises(FMUError, match=r"its outputs \['spring_force'\] \(computed by the FMU"):
        node(*args)
    # with the state output alone, the neural ODE observes in torch
    only = oscillator(fmu, outputs=["position"])
    node = build_model(
        "node",
        only,
        {**stats, "y_mean": stats["y_mean"][:1], "y_std": stats["y_std"][:1]},
        members=2,
        seed=0,
        hidden=8,
    )
    xs, y = node(*args)
    torch.testing.assert_close(y, xs[..., :1], rtol=0, atol=0)


# ---- the chain, once: configs/system/damped_oscillator_fmu.yaml ---------------------------------

T_END, DT = 2.0, 0.1
SYSTEM = ["system=damped_oscillator_fmu"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, fmu):
    """twin-generate (in this process, two worker processes) and twin-train (node and emulator,
    2 members, 2 epochs) from the shipped config; the FMU path overridden to the one built here."""
    from hydra import compose, initialize_config_dir

    from training._common import CONFIG_DIR
    from training.generate import generate

    root = tmp_path_factory.mktemp("fmu_chain")
    system = [*SYSTEM, f"system.fmu={fmu}"]
    data = root / "data"
    gen = [f"design.t_end={T_END}", f"design.dt={DT}", "n_scenarios=16", "shard_size=6"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="generate",
            overrides=[*system, *gen, "workers=2", "progress=false", f"out_dir={data}"],
        )
    summary = generate(cfg)
    small = ["ensemble.size=2", "trainer.max_epochs=2", "data.batch_size=8", "model.net.hidden=16"]
    fast = ["speed_scenarios=2", "logger=none", f"data_dir={data}"]
    runs = {}
    for kind in ("node", "emulator"):
        runs[kind] = root / kind
        train_here(*system, f"model={kind}", *small, *fast, f"out_dir={runs[kind]}")
    env = {
        **os.environ,
        "BENTOML_HOME": str(root / "store"),
        "BENTOML_DO_NOT_TRACK": "True",
        "WANDB_MODE": "offline",
    }
    return root, data, summary, runs, env


def cli(env, command, *args):
    r = subprocess.run(
        [str(BIN / command), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


def test_generate_and_train_record_the_fmu(chain, fmu):
    from twin_ml.data import Dataset

    root, data, summary, runs, _ = chain
    ds = Dataset.open(data)
    recorded = ds.card.system
    assert (
        recorded.options["fmu"] == str(fmu)
        and recorded.options["sha256"] == oscillator(fmu).fmu_sha256
    )
    assert recorded.name == "damped_oscillator_fmu" and recorded.output_names == ["position"]
    assert summary["counts"]["failed"] == 0
    # the dataset is the FMU solved by scipy: a test scenario against the exact solution
    test = ds.load("test")
    want = exact(test["t"], test["u"][0], test["p"][0], test["x0"][0])
    settings = SolverSettings(**json.loads((data / "manifest.json").read_text())["solver"])
    again = solve_looped(
        ds.card.system.build(), test["t"], test["u"][:1], test["p"][:1], test["x0"][:1], settings
    )
    # RK45: 6 evaluations per accepted step, each step's error within atol + rtol |x|
    tol = again.nfev[0] / 6 * (settings.atol + settings.rtol * np.abs(want).max())
    assert np.abs(test["x"][0] - want).max() <= tol, (np.abs(test["x"][0] - want).max(), tol)
    for kind, run in runs.items():
        meta = json.loads((run / "model" / "model.json").read_text())
        assert meta["config"]["system"]["class"] == "twin_ml.physics.fmu:FMUSystem", kind


@pytest.fixture(scope="module")
def exported(chain):
    root, _, _, runs, env = chain
    cli(
        env,
        "twin-export",
        f"run_dir={runs['node']}",
        "name=osc",
        "version=v1",
        "parity_scenarios=4",
        "stage=production",
    )
    return json.loads((runs["node"] / "export" / "manifest.json").read_text())


def test_export_checks_parity_and_records_the_fmu(exported, fmu):
    assert exported["system"]["options"]["sha256"] == oscillator(fmu).fmu_sha256
    assert exported["parity"], exported.get("parity")


def observations(data):
    """A test scenario of the dataset (the FMU's solution) plus 0.1% noise: fit the stiffness,
    the damping and the initial state given."""
    from twin_ml.data import Dataset

    test = Dataset.open(data).load("test")
    y = test["y"][0, :, 0]
    sigma = 1e-3 * float(np.ptp(y))
    noisy = y + sigma * np.random.default_rng(0).standard_normal(y.shape)
    request = {
        "times": test["t"].tolist(),
        "outputs": {"position": noisy.tolist()},
        "inputs": {"force": test["u"][0, :, 0].tolist()},
        "fit": ["stiffness"],
        "parameters": {"damping": float(test["p"][0, 1])},
        "initial_state": {"position": float(test["x0"][0, 0]), "velocity": float(test["x0"][0, 1])},
        "noise": {"position": sigma},
    }
    return request, float(test["p"][0, 0])


def test_twin_calibrate_fits_through_the_fmu(chain, exported):
    root, data, _, _, env = chain
    request, truth = observations(data)
    obs = root / "obs.json"
    obs.write_text(json.dumps(request))
    args = ["model=osc:production", f"observations={obs}", "mcmc=false", "starts=2", "refine=30"]
    out = cli(env, "twin-calibrate", *args, f"out_dir={root / 'cal'}")
    result = json.loads(out.read_text())
    assert set(result["estimate"]) == {"stiffness"}
    assert result["evaluations"]["solver_scenarios"] > 0 and "verified" in result["verification"]
    # the solver-in-the-loop refinement is a least-squares fit through the FMU: with 0.1% noise
    # on 21 points it lands within a few tenths of a percent of the truth (1% allowed)
    assert abs(result["refined"]["stiffness"] - truth) <= 0.01 * truth, (result["refined"], truth)


def test_served_model_simulates_and_checks_the_domain(chain, exported):
    from test_service import _start, _stop, post

    root, _, _, _, env = chain
    proc, url = _start(env, root / "server.log", "osc:production")
    try:
        steps = round(T_END / DT)
        body = {
            "parameters": {"stiffness": 4.0, "damping": 0.4},
            "initial_state": {"position": 0.1, "velocity": 0.0},
            "t_end": T_END,
            "inputs": {"force": [0.2] * (steps + 1)},
        }
        status, answer = post(url, {"scenarios": [body]})
        assert status == 200, answer
        mean = answer[0]["outputs"]["position"]["mean"]
        assert len(mean) == steps + 1 and np.isfinite(mean).all() and answer[0]["in_domain"]
        # below the FMU's min of the stiffness: refused, naming the field and the range
        status, err = post(
            url, {"scenarios": [{**body, "parameters": {"stiffness": -1.0, "damping": 0.4}}]}
        )
        text = json.dumps(err)
        assert status == 400 and "scenarios[0].parameters.stiffness" in text, text
        # outside the design's box, inside the FMU's limits: answered, flagged
        status, out = post(
            url, {"scenarios": [{**body, "parameters": {"stiffness": 9.0, "damping": 0.4}}]}
        )
        assert status == 200 and not out[0]["in_domain"], out
    finally:
        _stop(proc)
    log = (root / "server.log").read_text()
    assert "/calibrate is unavailable" not in log, log[-3000:]  # it rebuilt the FMU system
