"""A user's own system, end to end, as the README's "Define your own system" shows it.

`tests/assets/torsion_rig.py` (registered as "torsion_rotor", not its import path) is copied into a
project directory of its own, and every command runs from there as a subprocess, the way a user
runs them: without PYTHONPATH, and without this process ever importing the module, so what finds
the system again in twin-evaluate, twin-export, twin-serve (/calibrate runs the solver) and
twin-calibrate is the import path the dataset, the run and the model recorded.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ASSETS
from test_service import _post_path, _start, _stop, post

from twin_ml.data import Dataset

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODULE, CLASS, NAME = "torsion_rig", "TorsionRig", "torsion_rotor"
SYSTEM = f"{MODULE}:{CLASS}"
RECORD = {"name": NAME, "class": SYSTEM, "options": {"drag": True}}  # what every artifact records
EXAMPLE = "torsion_rig_example.py"  # the README's Python example
T_END, DT = 2.0, 0.1
STEPS = round(T_END / DT)
PARAMETERS = {"stiffness": 4.0, "friction": 0.4, "drag": 0.5, "inertia": 1.0}
BOUNDS = {"stiffness": (2.0, 8.0), "friction": (0.1, 1.0)}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The user's project directory (holding only the module) and the commands' environment."""
    root = tmp_path_factory.mktemp("own_system")
    here = root / "project"
    here.mkdir()
    shutil.copy(ASSETS / f"{MODULE}.py", here)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        BENTOML_HOME=str(root / "store"),
        BENTOML_DO_NOT_TRACK="True",
        WANDB_MODE="offline",
        WANDB_DIR=str(root / "wandb"),
        WANDB_CACHE_DIR=str(root / "wandb-cache"),
        WANDB_CONFIG_DIR=str(root / "wandb-config"),
    )
    assert MODULE not in sys.modules
    return root, here, env


def cli(project, command, *args, cwd=None):
    root, here, env = project
    return subprocess.run(
        [str(BIN / command), *args],
        cwd=cwd or here,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])  # every command prints its summary's path last


@pytest.fixture(scope="module")
def trained(project):
    """twin-generate and twin-train by import path: 16 scenarios of 20 steps, a 2-member emulator
    (the fastest kind to train, evaluate and export) for 2 epochs."""
    root, _, _ = project
    data, run = root / "data", root / "run"
    system = [f"system.name={SYSTEM}", "~system.damped"]
    design = [f"design.t_end={T_END}", f"design.dt={DT}", "n_scenarios=16", "progress=false"]
    ok(cli(project, "twin-generate", *system, *design, f"out_dir={data}"))
    small = ["ensemble.size=2", "trainer.max_epochs=2", "data.batch_size=8", "model.net.hidden=16"]
    fast = ["speed_scenarios=2", "logger=none"]
    train = [*system, "model=emulator", *small, *fast, f"data_dir={data}", f"out_dir={run}"]
    ok(cli(project, "twin-train", *train))
    return data, run


def _identity(desc):
    return {k: desc.get(k) for k in ("name", "class", "options")}


def test_dataset_and_run_record_where_the_class_lives(trained):
    data, run = trained
    assert _identity(json.loads((data / "manifest.json").read_text())["system"]) == RECORD
    # the run's model.json is what twin-evaluate and twin-export rebuild the model from
    meta = json.loads((run / "model" / "model.json").read_text())
    assert _identity(meta["config"]["system"]) == RECORD, (
        "model.json's system lacks the class path: a fresh process cannot rebuild the system"
    )


def test_twin_evaluate_finds_the_system_again(project, trained):
    _, run = trained
    summary = ok(cli(project, "twin-evaluate", f"run_dir={run}", "speed_scenarios=2"))
    assert summary == run / "evaluation" / "summary.json"
    assert "test/rel_l2_median" in json.loads((run / "evaluation" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def exported(project, trained):
    """twin-export into the test's store as rotor:v1, promoted to production."""
    _, run = trained
    args = ["name=rotor", "version=v1", "parity_scenarios=8", "stage=production"]
    ok(cli(project, "twin-export", f"run_dir={run}", *args))
    return json.loads((run / "export" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def served(project, exported):
    """A real twin-serve of rotor:production, started from the project dir."""
    root, here, env = project
    manifest = exported
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(here)  # the server's working directory: where the user runs twin-serve
        proc, url = _start(env, root / "server.log", "rotor:production")
    yield url, manifest
    _stop(proc)


def scenario(**changes):
    return {
        "parameters": dict(PARAMETERS),
        "initial_state": {"angle": 0.1, "rate": 0.0},
        "t_end": T_END,
        "inputs": {"torque": [0.2] * (STEPS + 1)},
        "quantiles": [0.05, 0.95],
        **changes,
    }


def test_export_records_the_system_and_simulate_uses_its_names(served):
    url, manifest = served
    assert _identity(manifest["system"]) == RECORD
    status, body = post(url, {"scenarios": [scenario()]})
    assert status == 200, body
    [answer] = body
    assert set(answer["outputs"]) == {"angle"}  # the user's output name
    assert answer["model"] == {"name": "rotor", "version": "v1"}
    mean = answer["outputs"]["angle"]["mean"]
    assert len(mean) == STEPS + 1 and np.isfinite(mean).all() and answer["in_domain"]


def test_simulate_refuses_values_outside_the_physical_limits(served):
    url, _ = served
    status, body = post(url, {"scenarios": [scenario(parameters={**PARAMETERS, "inertia": -1.0})]})
    text = json.dumps(body)
    assert status == 400 and "scenarios[0].parameters.inertia" in text, text
    assert "1e-06" in text and "inf" in text, text  # the allowed range
    status, body = post(url, {"scenarios": [scenario(inputs={"torque": [6.0] * (STEPS + 1)})]})
    text = json.dumps(body)
    assert status == 400 and "scenarios[0].inputs.torque" in text and "[-5, 5]" in text, text
    # outside the training box but inside the limits: answered, and flagged
    status, body = post(url, {"scenarios": [scenario(parameters={**PARAMETERS, "inertia": 3.0})]})
    assert status == 200 and not body[0]["in_domain"], body


def observations(data):
    """A calibration request built from one test scenario of the dataset (the solver's truth plus
    1% noise): fit stiffness and friction, the other parameters and the initial state given."""
    test = Dataset.open(data).load("test")
    rng = np.random.default_rng(0)
    y = test["y"][0, :, 0]
    sigma = 0.01 * float(np.ptp(y)) + 1e-6
    return {
        "times": test["t"].tolist(),
        "outputs": {"angle": (y + sigma * rng.standard_normal(y.shape)).tolist()},
        "inputs": {"torque": test["u"][0, :, 0].tolist()},
        "fit": ["stiffness", "friction"],
        "parameters": {"drag": float(test["p"][0, 2]), "inertia": float(test["p"][0, 3])},
        "initial_state": {"angle": float(test["x0"][0, 0]), "rate": float(test["x0"][0, 1])},
        "noise": {"angle": sigma},
    }


def test_calibrate_endpoint_fits_with_the_users_solver(served, trained):
    url, _ = served
    request = observations(trained[0])
    status, body = _post_path(url, "/calibrate", {**request, "starts": 2})
    assert status == 200, body
    assert set(body["estimate"]) == {"stiffness", "friction"}
    for k, v in body["estimate"].items():  # inside the training box (the declared bounds)
        lo, hi = BOUNDS[k]
        assert lo <= v <= hi
    # the corrections and the verification ran the user's system in the server's solver
    assert body["evaluations"]["solver_scenarios"] > 0 and "verified" in body["verification"]
    bad = {**request, "parameters": {**request["parameters"], "inertia": -1.0}}
    status, body = _post_path(url, "/calibrate", bad)
    text = json.dumps(body)
    assert status == 400 and "parameters.inertia" in text and "1e-06" in text, text


def test_twin_calibrate_finds_the_system_from_the_project_dir(project, trained, exported):
    root, _, _ = project
    obs = root / "obs.json"
    obs.write_text(json.dumps(observations(trained[0])))
    args = ["model=rotor:production", f"observations={obs}", "mcmc=false", "starts=2"]
    out = ok(cli(project, "twin-calibrate", *args, f"out_dir={root / 'cal'}"))
    assert set(json.loads(out.read_text())["estimate"]) == {"stiffness", "friction"}


def test_twin_calibrate_elsewhere_names_the_module_it_cannot_import(project, trained, exported):
    """The control: from a directory without the module (and no PYTHONPATH) the recorded import
    path finds nothing, and the command says so in one line."""
    root, _, _ = project
    obs = root / "obs-elsewhere.json"
    obs.write_text(json.dumps(observations(trained[0])))
    args = ["model=rotor:production", f"observations={obs}", "mcmc=false", "starts=2"]
    r = cli(project, "twin-calibrate", *args, f"out_dir={root / 'cal2'}", cwd=root)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith("error: ") and MODULE in r.stderr, r.stderr


def test_a_server_started_elsewhere_simulates_and_says_why_it_cannot_calibrate(
    project, trained, exported
):
    """/simulate needs the stored model only; /calibrate needs the user's solver: started from a
    directory without the module, it answers 503 naming the module, and the server stays up."""
    root, _, env = project
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        proc, url = _start(env, root / "server-elsewhere.log", "rotor:production")
    try:
        assert post(url, {"scenarios": [scenario()]})[0] == 200
        status, body = _post_path(url, "/calibrate", observations(trained[0]))
        text = json.dumps(body)
        assert status == 503 and MODULE in text and "PYTHONPATH" in text, (status, text)
        assert post(url, {"scenarios": [scenario()]})[0] == 200
    finally:
        _stop(proc)


def test_this_process_never_imported_the_users_module():
    assert MODULE not in sys.modules


def readme_section() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Define your own system\n") :]
    return section[: section.index("\n## ")]


def test_readme_shows_the_tested_system_and_python_example(tmp_path):
    section = readme_section()
    for asset in (f"{MODULE}.py", EXAMPLE):
        assert (ASSETS / asset).read_text() in section, f"README drifted from tests/assets/{asset}"
    imports = [
        ln for ln in section.splitlines() if ln.startswith(("from twin_ml", "import twin_ml"))
    ]
    assert imports and all(ln.startswith("from twin_ml import ") for ln in imports), imports
    # the Python example runs from the user's project dir, and stays torch-free
    for asset in (f"{MODULE}.py", EXAMPLE):
        shutil.copy(ASSETS / asset, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = f"import runpy, sys; runpy.run_path({EXAMPLE!r}); print('torch' in sys.modules)"
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    r = subprocess.run([sys.executable, "-c", code], **run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "what the drag term is worth" in r.stdout and r.stdout.split()[-1] == "False", r.stdout


def test_readme_commands_compose():
    """The README's twin-generate / twin-train lines are valid Hydra overrides that say what the
    README says: the system by import path, the pendulum's option removed, the hybrid's physics
    without drag; and `+system.drag=false` sets the data system's option."""
    from hydra import compose, initialize_config_dir

    lines = {
        ln.split()[0]: shlex.split(ln, comments=True)[1:]
        for ln in readme_section().splitlines()
        if ln.startswith(("twin-generate ", "twin-train "))
    }
    assert set(lines) == {"twin-generate", "twin-train"}
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        gen = compose(config_name="generate", overrides=lines["twin-generate"])
        drop = compose(
            config_name="generate", overrides=[*lines["twin-generate"], "+system.drag=false"]
        )
        train = compose(config_name="train", overrides=lines["twin-train"])
    for cfg in (gen, train):
        assert cfg.system.name == SYSTEM and "damped" not in cfg.system
    assert drop.system.drag is False
    assert train.model.net.kind == "hybrid"
    assert dict(train.model.net.physics_options) == {"drag": False}


PUBLIC = """
import sys, twin_ml
light = [n for n in twin_ml.__all__ if n not in ("load_trained", "build_model", "export_run")]
for name in light:
    getattr(twin_ml, name)
from twin_ml import Problem
from twin_ml.calibrate import calibrate
assert callable(calibrate) and twin_ml.calibrate.Problem is Problem
torch_free = "torch" not in sys.modules
missing = [n for n in twin_ml.__all__ if getattr(twin_ml, n, None) is None]
assert set(twin_ml.__all__) <= set(dir(twin_ml))
print(torch_free, missing)
"""


def test_public_surface_resolves_and_import_twin_ml_stays_torch_free():
    r = subprocess.run([sys.executable, "-c", PUBLIC], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split(None, 1) == ["True", "[]\n"], r.stdout
