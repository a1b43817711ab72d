"""A reduced-order model of a field system, end to end through the commands: twin-generate ->
twin-train (rom) -> twin-export -> twin-serve on 127.0.0.1 (a real BentoML server; the first two
run in this process, see `served`), then /simulate with the `fields` option: the decoded fields,
their probes consistent with the served probes, the size limit (413) and bad field times (400). A
6 x 6 plate and a short horizon keep it fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import rollout_tol, train_here
from test_service import _start, _stop

from twin_ml.contract import ModelCard
from twin_ml.physics import make_system

BIN = os.path.dirname(sys.executable)
SHAPE = [6, 6]
LIMIT = 3 * 2 * 36  # three fields of 36 cells (mean and std) per request


def _generate_here(*overrides):
    """twin-generate's config and run in this process, as `train_here` does for twin-train (the
    command's one-line errors and exit status are tested by subprocess in test_field_data.py and
    test_cli.py)."""
    from hydra import compose, initialize_config_dir

    from training._common import CONFIG_DIR
    from training.generate import generate

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return generate(compose(config_name="generate", overrides=list(overrides)))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """twin-generate and twin-train (their configs and runs, in this process: a subprocess each
    only added their imports, ~10 s), then twin-export and twin-serve as commands (their own
    processes: the model store is BENTOML_HOME's, read when bentoml is imported)."""
    root = tmp_path_factory.mktemp("fields")
    data, run, home = root / "data", root / "run", root / "store"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    shape = f"+system.shape=[{SHAPE[0]},{SHAPE[1]}]"
    _generate_here(
        "system=heat_plate",
        shape,
        "design.t_end=30.0",
        "n_scenarios=24",
        f"out_dir={data}",
        "progress=false",
        "snapshot_stride=5",
    )
    train_here(
        "experiment=heat_plate_rom",
        shape,
        f"data_dir={data}",
        f"out_dir={run}",
        "model.net.rank=4",
        "ensemble.size=3",
        "trainer.max_epochs=1",
        "data.batch_size=8",
        "model.net.hidden=16",
        "speed_scenarios=2",
        "logger=none",
    )
    export = ["twin-export", f"run_dir={run}", "name=plate", "version=v1", "parity_scenarios=8"]
    export.append("parity_steps=20")  # the data's 20 steps (parity is test_export.py's subject)
    r = subprocess.run(
        [os.path.join(BIN, export[0]), *export[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, f"twin-export: {r.stderr[-3000:]}"
    proc, url = _start(env, root / "server.log", "plate:v1", f"max_field_values={LIMIT}")
    card = ModelCard.from_json((run / "export" / "manifest.json").read_text())
    yield url, card
    _stop(proc)


def _post(url, body):
    req = urllib.request.Request(
        f"{url}/simulate",
        data=json.dumps({"scenarios": body}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _scenario(n_steps=20, **extra):
    n = n_steps + 1
    return {
        "parameters": {"k": 170.0, "rho_c": 2.4e6, "h": 1000.0},
        "initial_state": {"T0": 25.0},
        "t_end": 1.5 * n_steps,
        "inputs": {"power": [12.0] * n, "T_coolant": [20.0] * n},
        **extra,
    }


def test_fields_come_back_on_the_grid_and_agree_with_the_served_probes(served):
    """The fields at the requested times, [time][row][column]; the system's own probes and maximum
    read from the decoded mean field equal the served outputs' mean there (two paths through the
    same latent state: the probe map and the decoder), to float32 round-off."""
    url, card = served
    assert card.kind == "rom" and card.system.grid.shape == SHAPE
    status, answers = _post(url, _scenario(fields=[0.0, 15.0, 30.0]))
    assert status == 200, answers
    f = answers[0]["fields"]
    assert f["times"] == [0.0, 15.0, 30.0] and f["shape"] == SHAPE and f["T"]["unit"] == "degC"
    mean = np.array(f["T"]["mean"])
    std = np.array(f["T"]["std"])
    assert mean.shape == (3, *SHAPE) and std.shape == mean.shape and (std >= 0).all()
    system = make_system("heat_plate", shape=SHAPE)
    from_field = system.observe(mean.reshape(3, -1), None, None)  # [3, ny]
    outs = answers[0]["outputs"]
    served_y = np.array([[outs[o]["mean"][k] for o in system.output_names] for k in (0, 10, 20)])
    n_probe = len(system.probes)
    scale = float(np.abs(served_y).max())
    tol = rollout_tol(20, scale) + 1e-6 * scale  # + the answer's 6-decimal rounding of the fields
    assert np.abs(from_field[:, :n_probe] - served_y[:, :n_probe]).max() <= tol
    assert np.abs(mean[0] - 25.0).max() < 0.5  # the plate starts uniform at T0 (its projection)
    assert "fields" not in _post(url, _scenario())[1][0]  # none asked, none sent


def test_fields_beyond_the_limit_get_413_and_bad_times_400(served):
    url, _ = served
    status, body = _post(url, [_scenario(fields=[0.0, 1.5]), _scenario(fields=[3.0, 4.5])])
    assert status == 413 and "limit of 216 values" in body["error"], body
    status, _ = _post(url, _scenario(fields=[0.0, 1.5, 3.0]))
    assert status == 200  # exactly at the limit
    status, body = _post(url, _scenario(fields=[0.7]))
    assert status == 400 and "scenarios[0].fields[0]" in json.dumps(body), body
    status, body = _post(url, _scenario(fields=[45.0]))
    assert status == 400 and "not a time of the scenario's grid" in json.dumps(body), body


def test_the_schema_names_the_fields_option(served):
    url, _ = served
    with urllib.request.urlopen(f"{url}/docs.json", timeout=30) as r:
        doc = json.loads(r.read())
    text = json.dumps(doc)
    assert "times of the grid at which to return the fields" in text


def test_calibrate_a_field_system_through_its_reduced_model(served):
    """/calibrate on the plate's rom: conductivity and convective coefficient from the probes
    (synthetic: the solver at known values, 1% noise); the estimate is checked by the solver on
    the plate itself, and the answer says whether it verified."""
    from twin_ml.calibrate.synthetic import synthetic_request

    url, card = served
    request, truth = synthetic_request(card, ["k", "h"], seed=1, noise_level=0.01)
    body = {**request, "starts": 2, "mcmc": {"steps": 60, "burn": 20, "walkers": 8}}
    req = urllib.request.Request(
        f"{url}/calibrate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        answer = json.loads(r.read())
    assert set(answer["estimate"]) == {"k", "h"}
    ver = answer["verification"]
    lo, hi = ver["rms_residual_band"]
    assert ver["verified"] == (
        ver["within_2std"][0] >= 0.9
        and not ver["solver_failed"][0]
        and lo <= ver["rms_residual_solver"][0] <= hi
    )
    for k, v in truth.items():  # inside the posterior's 99.9% range (the solver verified it)
        post = answer["posterior"][k]
        assert abs(answer["estimate"][k] - v) <= 3.3 * post["std"] + 1e-9 * abs(v), (k, v, post)
