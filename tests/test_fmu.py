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
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import train_here
from scipy.linalg import expm

from twin_ml._io import canonical_json
from twin_ml.physics import SolverSettings, solve_looped, solve_stacked, system_from_description
from twin_ml.physics import fmu as fmu_module
from twin_ml.physics.fmu import FMUError, FMUSystem
from twin_ml.physics.fmu_build import build_fmu

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
        # scipy accepts a step when its error estimate, scaled by atol + rtol |x| per component,
        # has an RMS norm <= 1 over the solve's `dim` components: taking the estimate as the
        # step's local error, its Euclidean norm is <= sqrt(dim) (atol + rtol max|x|). At most
        # nfev / 12 steps (DOP853: 12 evaluations per step). The global error is the sum of the
        # local errors, each carried to the end by the flow of x' = A x (the error of a linear
        # system does not see the input). That flow does not expand the energy norm
        # |(sqrt(k) position, sqrt(m) velocity)| (dE/dt = -c v^2 <= 0), but it can expand the
        # Euclidean norm by up to max(sqrt(k/m), sqrt(m/k)) (the energy norm's condition
        # number: an oscillation turns velocity into position). With m = 1 and k >= 1 that is
        # sqrt(k), up to 2.8 here.
        growth = max(np.sqrt(p[i, 0] / MASS), np.sqrt(MASS / p[i, 0]))
        for res, dim in ((looped, 2), (stacked, 2 * n)):  # stacked: one norm over all scenarios
            steps = res.nfev[i] / 12
            local = np.sqrt(dim) * (settings.atol + settings.rtol * np.abs(want).max())
            tol = steps * growth * local
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


SPRING_FORCE = 'name="spring_force" valueReference="8" causality="output" variability="continuous"'
STEP_NOT_NEEDED = 'completedIntegratorStepNotNeeded="true"'


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_binary", r"no binary for this platform \(binaries/linux64/damped_oscillator\.so"),
        ("fmi1", r"is an FMI 1\.0 FMU; FMUSystem runs FMI 2\.0 model-exchange FMUs"),
        ("fmi3", r"is an FMI 3\.0 FMU; FMUSystem runs FMI 2\.0 model-exchange FMUs"),
        ("cosimulation", r"has no model-exchange interface \(co-simulation only\)"),
        ("not_a_zip", r"is not an FMU \(not a zip file\)"),
        (
            "discrete",
            r'.*discrete\.fmu\' has Real variables of variability "discrete" '
            r"\(spring_force\); they change at events only",
        ),
        ("step", r".*step\.fmu\' needs fmi2CompletedIntegratorStep after every integrator step"),
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
    elif case == "discrete":
        rewritten(
            fmu,
            bad,
            xml=lambda t: t.replace(SPRING_FORCE, SPRING_FORCE.replace("continuous", "discrete")),
        )
    elif case == "step":
        rewritten(
            fmu,
            bad,
            xml=lambda t: t.replace(STEP_NOT_NEEDED, STEP_NOT_NEEDED.replace("true", "false")),
        )
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


# ---- evaluation: the extracted folder, the instances, events ----------------------------------


def _unique_copy(fmu: Path, out: Path) -> Path:
    """The same FMU with other bytes (a zip comment): its own sha256, so its own cache folder,
    which no other test or process shares."""
    out.write_bytes(fmu.read_bytes())
    with zipfile.ZipFile(out, "a") as zf:
        zf.comment = uuid.uuid4().hex.encode()
    return out


def test_an_fmu_is_extracted_once_into_a_folder_every_process_shares(fmu, tmp_path):
    copy = _unique_copy(fmu, tmp_path / "copy.fmu")
    s = oscillator(copy)
    digest, root = s.fmu_sha256, fmu_module._cache_root()
    folder = root / digest

    def mine():  # the cache folder and any temporary or stale folder of this FMU
        return sorted(p.name for p in root.iterdir() if digest[:16] in p.name)

    try:
        x, u, p = np.array([0.3, -0.2]), np.array([0.5]), np.array([4.0, 0.4])
        want = s.rhs(0.0, x, u, p)
        assert fmu_module._engine(s).dir == str(folder) and mine() == [digest]
        assert root.stat().st_mode & 0o077 == 0  # private: the binaries in it are run
        # another system, a system rebuilt from the records, an evaluator as a fresh process
        # makes: the same folder, nothing new
        again = FMUSystem(**s.options)
        np.testing.assert_array_equal(again.rhs(0.0, x, u, p), want)
        fresh = fmu_module._Engine(s._md, s._data, digest, "copy")
        assert fresh.dir == str(folder) and mine() == [digest]
        # worker processes end without cleanup (os._exit): they reuse the folder, leave nothing
        code = (
            "import os, sys, numpy as np; from twin_ml.physics.fmu import FMUSystem; "
            f"s = FMUSystem(fmu={str(copy)!r}, parameters={{'stiffness': [2.0, 8.0]}}); "
            "sys.stdout.write(repr(float(s.rhs(0.0, np.array([0.3, -0.2]), np.array([0.5]), "
            "np.array([4.0]))[1]))); sys.stdout.flush(); os._exit(0)"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0 and float(r.stdout) == want[1], r.stderr[-2000:]
        assert mine() == [digest]
        # a damaged copy (a cleaner of temporary files removed the binary) is extracted again
        binary = folder / fmu_module.binary_name(s._md)
        binary.unlink()
        assert fmu_module._Engine(s._md, s._data, digest, "copy").dir == str(folder)
        assert binary.is_file() and mine() == [digest]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def frees(monkeypatch):
    """The FMU instances freed (FMPy's freeInstance, counted)."""
    from fmpy.fmi2 import FMU2Model

    freed = []
    original = FMU2Model.freeInstance

    def free(self):
        freed.append(self)
        return original(self)

    monkeypatch.setattr(FMU2Model, "freeInstance", free)
    return freed


def test_a_failed_instance_is_freed_and_dropped(fmu, frees):
    s = oscillator(fmu, outputs=["position"])
    eng = fmu_module._Engine(s._md, s._data, s.fmu_sha256, "osc")  # its own pool
    xs, us = np.array([[0.3, -0.2]]), np.array([[0.5]])
    out = np.empty((1, 2))
    eng.evaluate("derivatives", s._vr, 0.0, xs, us, np.array([[4.0, 0.4]]), out)
    assert len(eng.instances) == 1
    # a call that fails (fmi2Error: an unknown value reference): freed, not kept
    bad = {**s._vr, "outputs": [99]}
    with pytest.raises(FloatingPointError, match="the FMU failed: FMICallException"):
        eng.evaluate("outputs", bad, None, xs, us, np.array([[4.0, 0.4]]), np.empty((1, 1)))
    assert len(eng.instances) == 0 and len(frees) == 1
    # an initialization that fails (mass <= 0): freed, not kept
    with pytest.raises(FloatingPointError, match="the FMU failed"):
        eng.evaluate("derivatives", {**s._vr, "parameters": [6]}, 0.0, xs, us, -xs[:, :1], out)
    assert len(eng.instances) == 0 and len(frees) == 2
    # a reset of the evicted instance that fails: freed, not kept
    eng.pool_size = eng.cap = 1
    eng.evaluate("derivatives", s._vr, 0.0, xs, us, np.array([[4.0, 0.4]]), out)
    evicted = next(iter(eng.instances.values()))

    def broken():
        raise RuntimeError("reset failed")

    evicted.reset = broken
    with pytest.raises(FloatingPointError, match="reset failed"):
        eng.evaluate("derivatives", s._vr, 0.0, xs, us, np.array([[5.0, 0.4]]), out)
    assert len(eng.instances) == 0 and frees[-1] is evicted
    eng.evaluate("derivatives", s._vr, 0.0, xs, us, np.array([[5.0, 0.4]]), out)  # a new one
    np.testing.assert_allclose(out, equations(xs, us, np.array([[5.0, 0.4]])), rtol=4 * EPS)
    eng.close()


def test_the_pool_grows_to_the_batch_and_each_vector_is_initialized_once(fmu, rng, monkeypatch):
    s = oscillator(fmu)
    eng = fmu_module._Engine(s._md, s._data, s.fmu_sha256, "osc")
    n = 2 * fmu_module.POOL_SIZE + 3  # more parameter vectors than the initial pool
    xs, us = rng.uniform(-1, 1, (2 * n, 2)), rng.uniform(-1, 1, (2 * n, 1))
    ps = np.tile(rng.uniform([2.0, 0.1], [8.0, 1.0], (n, 2)), (2, 1))  # each vector twice
    for _ in range(2):
        out = np.empty((2 * n, 2))
        eng.evaluate("derivatives", s._vr, 0.0, xs, us, ps, out)
        # the FMU's and numpy's equations: the same operations, a few ulps of the terms
        scale = np.abs(us[:, 0]) + np.abs(ps[:, 0] * xs[:, 0]) + np.abs(ps[:, 1] * xs[:, 1])
        assert np.all(np.abs(out - equations(xs, us, ps)) <= 4 * EPS * scale[:, None])
    # n instances, made once: the second batch re-initialized none
    assert eng.pool_size == n and len(eng.instances) == n and eng.serial == n
    # beyond the cap: one initialization per vector per batch (resets), the answers unchanged
    eng.close()
    eng.cap = eng.pool_size = 4
    from fmpy.fmi2 import FMU2Model

    resets, original = [], FMU2Model.reset
    monkeypatch.setattr(FMU2Model, "reset", lambda self: resets.append(1) or original(self))
    out2 = np.empty((2 * n, 2))
    eng.evaluate("derivatives", s._vr, 0.0, xs, us, ps, out2)
    np.testing.assert_array_equal(out2, out)
    assert len(resets) == n - 4 and len(eng.instances) == 4
    eng.close()


def test_a_time_event_is_refused_naming_the_fmu(tmp_path):
    source = tmp_path / "timed"
    shutil.copytree(SOURCE, source)
    c = source / "sources" / "damped_oscillator.c"
    text = c.read_text()
    for a, b in (
        ("info->nextEventTimeDefined = fmi2False;", "info->nextEventTimeDefined = fmi2True;"),
        ("info->nextEventTime = 0.0;", "info->nextEventTime = 1.5;"),
    ):
        assert a in text
        text = text.replace(a, b)
    c.write_text(text)
    timed = oscillator(build_fmu(source, tmp_path / "timed.fmu"))
    try:
        with pytest.raises(FMUError, match=r"timed\.fmu' schedules a time event \(at t=1\.5"):
            timed.rhs(0.0, np.array([0.3, -0.2]), np.array([0.5]), np.array([4.0, 0.4]))
        # in a solve: the scenario fails with that reason
        t = np.linspace(0.0, 1.0, 3)
        res = solve_looped(timed, t, np.zeros((1, 3, 1)), np.array([[4.0, 0.4]]), np.zeros((1, 2)))
        assert res.n_failed == 1 and "does not handle time events" in res.reasons[0], res.reasons
        assert not fmu_module._engine(timed).instances
    finally:
        shutil.rmtree(fmu_module._cache_root() / timed.fmu_sha256, ignore_errors=True)


def test_build_errors_are_fmu_errors(tmp_path):
    slow = tmp_path / "slow-cc"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(FMUError, match=r"did not finish within 0\.5 s"):
        build_fmu(SOURCE, tmp_path / "a.fmu", cc=str(slow), timeout=0.5)
    unrunnable = tmp_path / "not-executable"
    unrunnable.write_text("")
    with pytest.raises(FMUError, match="cannot run the C compiler .*not-executable"):
        build_fmu(SOURCE, tmp_path / "b.fmu", cc=str(unrunnable))
    (tmp_path / "file").write_text("")  # the output's folder cannot be made
    with pytest.raises(FMUError, match=r"building .* into .*file/c\.fmu' failed"):
        build_fmu(SOURCE, tmp_path / "file" / "c.fmu")


def test_the_build_command_runs_without_warnings(tmp_path, capsys):
    out = tmp_path / "cli.fmu"
    r = subprocess.run(
        [sys.executable, "-W", "error", "-m", "twin_ml.physics.fmu_build", str(SOURCE), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0 and r.stdout.strip() == str(out) and not r.stderr, r.stderr
    assert oscillator(out).name == "damped_oscillator"
    from twin_ml.physics.fmu_build import main

    assert main([]) == 2 and "usage: python -m twin_ml.physics.fmu_build" in capsys.readouterr().err


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


def test_served_model_simulates_checks_the_domain_and_carries_its_fmu(chain, exported, fmu):
    """The served FMU model: /simulate answers and flags the domain. twin-export stored the .fmu
    with the model, hashed in its card; with the recorded file gone (another machine, a Bento,
    the file moved), the server rebuilds the system from that copy, and /calibrate solves
    through the FMU (it answered 503 there before)."""
    from test_service import _post_path, _start, _stop, post

    root, data, _, _, env = chain
    (stored,) = (root / "store" / "models" / "osc").glob("*/manifest.json")
    assert json.loads(stored.read_text())["files"]["system.fmu"] == oscillator(fmu).fmu_sha256
    assert (stored.parent / "system.fmu").read_bytes() == fmu.read_bytes()
    request, truth = observations(data)
    away = fmu.with_name(fmu.name + ".away")
    fmu.rename(away)
    try:
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
            fit = {**request, "starts": 1, "corrections": 1, "refine": 30}
            fit["mcmc"] = {"steps": 40, "burn": 20, "walkers": 8}
            status, result = _post_path(url, "/calibrate", fit)
        finally:
            _stop(proc)
    finally:
        away.rename(fmu)
    assert status == 200 and result["evaluations"]["solver_scenarios"] > 0, result
    # the refinement is a least-squares fit through the FMU (as twin-calibrate's above)
    assert abs(result["refined"]["stiffness"] - truth) <= 0.01 * truth, (result["refined"], truth)
    log = (root / "server.log").read_text()
    assert "/calibrate is unavailable" not in log, log[-3000:]  # it rebuilt the FMU system
