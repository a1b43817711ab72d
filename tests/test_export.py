"""ONNX export (integrator in the graph, any horizon, parity, provenance) and the model registry.

Oracles: the torch model itself (onnxruntime must reproduce its rollout at horizons and batch
sizes it was never exported at), a subprocess that has only onnxruntime and numpy, and a real
BentoML model store under a temporary BENTOML_HOME with one byte flipped.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TINY, rollout_tol, stored_pendulum, train_here

from twin_ml.data import Dataset, ScenarioDesign, generate_dataset
from twin_ml.export.export import export_run, in_domain_scenarios, parity_check
from twin_ml.export.onnx_export import ExportError, build_onnx, read_metadata
from twin_ml.models import load_trained
from twin_ml.physics import make_system

BIN = Path(sys.executable).parent
# experiment -> (system, t_end, dt): linear input + physics in the graph, held input, one-shot
CASES = {
    "pendulum_hybrid": ("pendulum", 2.0, 0.1),
    "cascaded_tanks_node": ("cascaded_tanks", 80.0, 4.0),
    "pendulum_emulator": ("pendulum", 2.0, 0.1),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pendulum_hybrid_run):
    root = tmp_path_factory.mktemp("export")
    # pendulum_hybrid is the session's shared run (conftest: this same command on these same 24
    # scenarios), copied: twin-export writes into the run directory
    shared_run, shared_data = pendulum_hybrid_run
    assert CASES["pendulum_hybrid"] == ("pendulum", 2.0, 0.1)  # the shared run's data
    shutil.copytree(shared_run, root / "pendulum_hybrid")
    out = {"pendulum_hybrid": (root / "pendulum_hybrid", shared_data)}
    for exp, (system, t_end, dt) in CASES.items():
        data = shared_data if system == "pendulum" else root / f"data-{system}"
        if exp in out:
            continue
        if not data.exists():
            generate_dataset(
                make_system(system),
                ScenarioDesign(t_end=t_end, dt=dt),
                n_scenarios=24,
                seed=0,
                out_dir=data,
                progress=False,
            )
        run = root / exp
        # twin-train's config and run in this process (`train_here`): a command of its own would
        # add only its start-up (torch, lightning), which test_train.py tests
        train_here(f"experiment={exp}", f"data_dir={data}", f"out_dir={run}", *TINY)
        out[exp] = (run, data)
    return out


def _session(data: bytes) -> ort.InferenceSession:
    from twin_ml._ort import session

    return session(
        data
    )  # the options every twin-ml session gets (the portable run's optimization level)


@pytest.mark.numeric
@pytest.mark.parametrize("exp", sorted(CASES))
def test_onnx_reproduces_torch_at_other_horizons_and_batches(runs, exp):
    run, data_dir = runs[exp]
    model, meta = load_trained(run / "model")
    data, manifest = export_run(run, name="m", version="v1", parity_scenarios=12, parity_steps=30)
    assert manifest.parity["passed"] and manifest.parity["batch_64"]["n_failed"] == 0
    sess = _session(data)
    d = Dataset.open(data_dir).load("test")
    # horizons the graph was not built for (the emulator: its fixed grid only)
    horizons = [len(d["t"])] if exp.endswith("emulator") else [2, 7, len(d["t"]), 3 * len(d["t"])]
    for n_t in horizons:
        for b in (1, 3):
            x0, p = d["x0"][:b].astype(np.float32), d["p"][:b].astype(np.float32)
            u = np.resize(d["u"][:b], (b, n_t, d["u"].shape[2])).astype(
                np.float32
            )  # any input signal will do
            t = torch.arange(n_t, dtype=torch.float32) * float(d["t"][1] - d["t"][0])
            members, mean, std = sess.run(["members", "mean", "std"], {"x0": x0, "u": u, "p": p})
            ref = model.predict(torch.tensor(x0), torch.tensor(u), torch.tensor(p), t)
            y_std = model.y_std.numpy()
            assert members.shape == (model.members, b, n_t, model.ny)
            # two float32 programs of one rollout (the graph's folded weights, torch's eager ops),
            # in normalized units. The emulator is one network pass, its outputs sums over the
            # hidden width: as many roundings as the rollout bound counts for its n_t steps, and
            # more
            scale = np.abs(ref["members"].numpy() / y_std).max()
            tol = rollout_tol(n_t, max(scale, 1.0))
            assert np.abs(members - ref["members"].numpy()).max() / y_std.min() < tol, (n_t, b)
            assert np.allclose(mean, ref["mean"].numpy(), rtol=0, atol=tol * y_std.min())
            cs = max(
                model.conformal_scale.tolist()
            )  # the std moves by at most the members' difference
            assert np.allclose(std, ref["std"].numpy(), rtol=0, atol=tol * y_std.min() * cs)


@pytest.mark.numeric
def test_parity_check_catches_a_wrong_graph(runs):
    run, _ = runs["pendulum_hybrid"]
    model, meta = load_trained(run / "model")
    other = load_trained(run / "model")[0]
    with torch.no_grad():
        other.net.biases[-1].add_(1e-3)  # a graph of slightly different weights
    wrong = build_onnx(other, meta["time"]["dt"]).SerializeToString()
    s = in_domain_scenarios(model, meta["design"], 8, 21, meta["time"]["dt"], seed=1)
    assert not parity_check(model, wrong, s)["passed"]
    right = build_onnx(load_trained(run / "model")[0], meta["time"]["dt"]).SerializeToString()
    assert parity_check(model, right, s)["passed"]


def test_exported_file_is_self_describing_and_needs_no_twin_ml(runs, tmp_path):
    run, _ = runs["pendulum_hybrid"]
    data, manifest = export_run(
        run, name="pendulum-hybrid", version="v1", parity_scenarios=8, parity_steps=20
    )
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    mp = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in mp.graph.initializer)
    assert any(n.op_type == "Loop" for n in mp.graph.node)
    card = read_metadata(path)  # the typed card, read back from the file's metadata
    assert card.format == "twin-ml/onnx/v2" and card == manifest.model_copy(
        update={"onnx_sha256": None}
    )
    assert card.system.state_names == ["theta", "omega"]
    assert card.system.parameters[0].unit == "m" and card.members == 3
    assert card.domain.parameters["length"] == (0.5, 2.0)
    assert card.integrator_error["max"] >= 0 and card.parity["passed"]
    prov = card.provenance
    assert prov.dataset_sha256 and prov.config_sha256 and prov.code_version and prov.created_at
    code = (
        f"""
import json, sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
m = json.loads(s.get_modelmeta().custom_metadata_map["twin_ml.manifest"])
x0 = np.zeros((2, 2), np.float32); x0[:, 0] = 0.3
u = np.zeros((2, 50, 1), np.float32); p = np.tile(np.array([[1.0, 0.2, 1.0]], np.float32), (2, 1))
members, mean, std = s.run(["members", "mean", "std"], {{"x0": x0, "u": u, "p": p}})
assert "twin_ml" not in sys.modules and "torch" not in sys.modules
print(json.dumps({{"name": m["name"], "shape": list(mean.shape),"""
        f""" "std_pos": bool((std > 0).all())}}))
"""
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == {"name": "pendulum-hybrid", "shape": [2, 50, 1], "std_pos": True}


def _cli(*args, home):
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=600, env=env
    )


def test_export_cli_registry_promote_and_tamper(runs, tmp_path):
    run, _ = runs["cascaded_tanks_node"]
    home = tmp_path / "store"
    # the registry's commands are the subject: parity on 8 scenarios of the data's 20 steps (the
    # ONNX/torch parity itself is tested above, in this process)
    parity = ["parity_scenarios=8", "parity_steps=20"]
    r = _cli("twin-export", f"run_dir={run}", "name=tanks", "version=v1", *parity, home=home)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text())
    assert summary["tag"] == "tanks:v1" and summary["parity"]["passed"]
    r = _cli(
        "twin-export",
        f"run_dir={run}",
        "name=tanks",
        "version=v2",
        *parity,
        "stage=staging",
        home=home,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    listing = _cli("twin-models", "list", home=home)
    assert listing.returncode == 0 and "tanks:v1" in listing.stdout and "tanks:v2" in listing.stdout
    assert (
        _cli("twin-models", "promote", "tanks:v1", "--stage", "production", home=home).returncode
        == 0
    )
    shown = _cli("twin-models", "show", "tanks:production", home=home)
    assert shown.returncode == 0 and json.loads(shown.stdout)["version"] == "v1"
    assert (
        json.loads(_cli("twin-models", "show", "tanks:latest", home=home).stdout)["version"] == "v2"
    )
    bad = _cli("twin-models", "show", "tanks:archived", home=home)
    assert bad.returncode == 1 and "no version of tanks is promoted to archived" in bad.stderr
    assert _cli("twin-models", "verify", "tanks:v1", home=home).returncode == 0
    # flip one byte of the stored ONNX file: verify fails, and nothing can open it through the
    # registry
    onnx_file = next(home.glob("models/tanks/v1/model.onnx"))
    raw = bytearray(onnx_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    onnx_file.write_bytes(bytes(raw))
    r = _cli("twin-models", "verify", "tanks:v1", home=home)
    assert r.returncode == 1 and "model.onnx does not match its sha256" in r.stderr
    assert _cli("twin-models", "verify", "tanks:v2", home=home).returncode == 0
    # a swapped manifest (re-hashed files, but not the hash recorded at save time) is caught too
    manifest = next(home.glob("models/tanks/v2/manifest.json"))
    m = json.loads(manifest.read_text())
    m["conformal_scale"] = [1.0]
    manifest.write_text(json.dumps(m))
    r = _cli("twin-models", "verify", "tanks:v2", home=home)
    assert r.returncode == 1 and "manifest.json does not match" in r.stderr


def test_export_bad_input(runs, tmp_path):
    run, _ = runs["pendulum_hybrid"]
    home = tmp_path / "store"
    r = _cli("twin-export", f"run_dir={run}", "name=Bad_Name", home=home)
    assert r.returncode == 2 and "model name 'Bad_Name' is not allowed" in r.stderr
    r = _cli("twin-export", f"run_dir={tmp_path}", home=home)
    assert r.returncode == 2 and "holds no model.json" in r.stderr
    r = _cli("twin-models", "show", "nothing-here:v1", home=home)
    assert r.returncode == 1 and "not in the store" in r.stderr
    r = _cli("twin-models", "show", "no-colon", home=home)
    assert r.returncode == 1 and "use NAME:VERSION" in r.stderr
    with pytest.raises(ExportError, match="max_steps must be >= 1"):
        export_run(run, name="x", version="v1", max_steps=-1)


def test_parity_check_fails_a_graph_that_outputs_nan(runs):
    run, _ = runs["pendulum_hybrid"]
    model, meta = load_trained(run / "model")
    mp = build_onnx(load_trained(run / "model")[0], meta["time"]["dt"])
    for init in mp.graph.initializer:  # the conformal scale -> NaN: std is NaN, and so on
        if init.name == "ens/conformal_scale":
            init.CopyFrom(
                onnx.numpy_helper.from_array(np.full(model.ny, np.nan, np.float32), init.name)
            )
    # the members themselves NaN: multiply the loop's output by the NaN scale before it is returned
    for node in mp.graph.node:
        if list(node.output) == ["members"]:
            node.output[0] = "members_raw"
    mp.graph.node.append(
        onnx.helper.make_node("Mul", ["members_raw", "ens/conformal_scale"], ["members"])
    )
    s = in_domain_scenarios(model, meta["design"], 4, 11, meta["time"]["dt"], seed=1)
    assert not parity_check(model, mp.SerializeToString(), s)["passed"]


def test_registry_refuses_an_existing_version_or_a_bad_stage_before_exporting(
    runs, pendulum_hybrid_run, tmp_path
):
    run, _ = runs["pendulum_hybrid"]
    # a store that holds pend:v1 (this run, exported once per session: conftest's
    # `stored_pendulum`; twin-export storing a model is the tests' above)
    env, _, _ = stored_pendulum(pendulum_hybrid_run[0], tmp_path)
    home = Path(env["BENTOML_HOME"])
    args = [f"run_dir={run}", "name=pend", "version=v1", "parity_scenarios=4", "parity_steps=10"]
    r = _cli("twin-export", *args, home=home)
    assert r.returncode == 2 and "pend:v1 is already in the store" in r.stderr
    # the checks twin-export runs before exporting (in-process: each CLI start costs ~8 s)
    from twin_ml import registry

    with pytest.raises(registry.RegistryError, match="stage 'live' is unknown"):
        registry.check_new("pend", "v2", "live")
    with pytest.raises(registry.RegistryError, match="not 'latest' or a stage"):
        registry.check_new("pend", "production")
    listing = _cli("twin-models", "list", home=home).stdout
    assert "pend:v1" in listing and "pend:v2" not in listing
