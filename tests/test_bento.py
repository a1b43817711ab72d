"""Serving replicas as a Bento: `twin-models bento` builds one from the project's bentofile.yaml
with a stored model inside (the session's tiny pendulum hybrid); the Bento exported as a file
holds that model and its manifest; imported into a model store that never held the model,
`bentoml serve <tag>` (a real server on 127.0.0.1, no TWIN_ML_MODEL, no twin-serve) answers
/simulate as the model's ONNX file run directly in onnxruntime."""

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.request
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import yaml
from brokers import free_port
from conftest import EPS32, rollout_tol, stored_pendulum

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TAG = "pend:t1"  # the Bento's tag (a fixed version: the test knows its folder)
T = 12  # steps of the scenarios sent


def _run(args, env, timeout=300):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


@pytest.fixture(scope="module")
def built(pendulum_hybrid_run, tmp_path_factory):
    """The session's tiny pendulum hybrid stored as pend:v1, a Bento of it built by
    `twin-models bento pend:latest` (latest resolved to v1) and exported to a file: (env of that
    store, onnx bytes, card, the Bento's folder in the store, the exported file)."""
    run, _ = pendulum_hybrid_run
    root = tmp_path_factory.mktemp("bento")
    env, blob, card = stored_pendulum(run, root)
    env = {k: v for k, v in env.items() if k != "TWIN_ML_MODEL"}
    r = _run([str(BIN / "twin-models"), "bento", "pend:latest", "--version", "t1"], env)
    assert r.stdout.strip().splitlines()[-1] == TAG  # the tag last, for scripts
    exported = root / "pend.bento"
    _run([str(BIN / "bentoml"), "export", TAG, str(exported)], env)
    return env, blob, card, Path(env["BENTOML_HOME"]) / "bentos" / "pend" / "t1", exported


def _pins(path: Path) -> list[str]:
    lines = (raw.split("#")[0].strip() for raw in path.read_text().splitlines())
    return [line for line in lines if line]


def test_the_bento_holds_the_service_the_model_and_the_bentofile_settings(built):
    _, blob, card, folder, exported = built
    info = yaml.safe_load((folder / "bento.yaml").read_text())
    assert info["service"] == "serving.service:TwinService" and info["name"] == "pend"
    assert info["args"] == {"model": "pend:v1"}  # the version, never `latest` or a stage
    assert [m["tag"] for s in info["services"] for m in s["models"]] == ["pend:v1"]
    assert info["labels"]["project"] == "twin-ml"
    assert {"name": "BENTOML_DO_NOT_TRACK", "value": "True", "stage": "all"} in info["envs"]
    assert info["services"][0]["config"]["http"] == {"host": "127.0.0.1"}
    # the source the service needs, and nothing else of the project (no training, tests, data)
    src = folder / "src"
    assert (src / "serving" / "service.py").is_file() and (src / "twin_ml" / "_ort.py").is_file()
    assert sorted(p.name for p in src.iterdir()) == ["bentofile.yaml", "serving", "twin_ml"]
    assert not list(src.rglob("__pycache__")) and not list(src.rglob("*.pyc"))
    # the image's requirements: serving/requirements.txt as pinned in pyproject.toml, BentoML's
    # own pin added by the build, none of the training stack
    wanted = _pins(ROOT / "serving" / "requirements.txt")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert wanted and set(wanted) <= set(declared)
    image = _pins(folder / "env" / "python" / "requirements.txt")
    assert sorted(image) == sorted([*wanted, f"bentoml=={version('bentoml')}"])
    assert not any(p.split("==")[0] in ("torch", "lightning", "hydra-core") for p in image)
    assert "ENV BENTOML_DO_NOT_TRACK=" in (folder / "env" / "docker" / "Dockerfile").read_text()
    # the exported Bento (what `bentoml containerize` puts in the image) carries the model: the
    # ONNX file as stored, and the manifest whose sha256 the model's metadata records
    with tarfile.open(exported) as tar:
        files = {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar if m.isfile()}
    assert files["models/pend/v1/model.onnx"] == blob
    manifest = files["models/pend/v1/manifest.json"]
    meta = yaml.safe_load(files["models/pend/v1/model.yaml"])["metadata"]
    assert hashlib.sha256(manifest).hexdigest() == meta["manifest_sha256"]
    stored = json.loads(manifest)
    assert stored["files"]["model.onnx"] == hashlib.sha256(blob).hexdigest()
    assert (stored["name"], stored["version"]) == (card.name, card.version) == ("pend", "v1")


@pytest.fixture(scope="module")
def served(built, tmp_path_factory):
    """The exported Bento imported into a fresh store (which never held the model), and
    `bentoml serve pend:t1` from it on 127.0.0.1: (url, env)."""
    env, _, _, _, exported = built
    home = tmp_path_factory.mktemp("bento-fresh") / "store"
    env = {**env, "BENTOML_HOME": str(home)}
    _run([str(BIN / "bentoml"), "import", str(exported)], env)
    assert (home / "models" / "pend" / "v1" / "model.onnx").is_file()  # brought by the Bento
    port = free_port()
    log_path = home.parent / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "bentoml"), "serve", TAG, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=home.parent,  # not the project: the Bento's own source is served
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"127.0.0.1:{port}"
    try:
        for _ in range(480):  # a hang guard, not a timing check
            try:
                if urllib.request.urlopen(f"http://{url}/readyz", timeout=1).status == 200:
                    break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.25)
        else:
            pytest.fail("the Bento's server did not become ready:\n" + log_path.read_text()[-3000:])
        if proc.poll() is not None:
            pytest.fail("the Bento's server exited:\n" + log_path.read_text()[-3000:])
        yield url, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # never leave a server behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def _call(url: str, method: str, path: str, body=None):
    conn = http.client.HTTPConnection(url, timeout=120)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_bentoml_serve_of_the_bento_answers_simulate_as_onnxruntime(built, served):
    from twin_ml._ort import session

    _, blob, card, _, _ = built
    url, log_path = served
    s, box = card.system, card.domain
    rng = np.random.default_rng(7)
    lo = np.array([box.parameters[n][0] for n in s.parameter_names])
    hi = np.array([box.parameters[n][1] for n in s.parameter_names])
    p = (lo + (hi - lo) * rng.uniform(0.2, 0.8, size=(2, len(lo)))).astype(np.float32)
    x0 = np.array([[sum(box.states[n]) / 4 for n in s.state_names]] * 2, dtype=np.float32)
    x0[1] *= -1
    u = (0.1 * np.sin(np.arange(T) / 3)[None, :, None] * np.array([1, -1])[:, None, None]).astype(
        np.float32
    )
    scenarios = [
        {
            "parameters": dict(zip(s.parameter_names, p[b].tolist())),
            "initial_state": dict(zip(s.state_names, x0[b].tolist())),
            "t_end": (T - 1) * card.time.dt,
            "inputs": {n: u[b, :, j].tolist() for j, n in enumerate(s.input_names)},
        }
        for b in range(2)
    ]
    status, answers = _call(url, "POST", "/simulate", {"scenarios": scenarios})
    assert status == 200, answers
    mean, std = session(blob).run(["mean", "std"], {"x0": x0, "u": u, "p": p})
    scale = max(np.abs(mean).max(), np.abs(std).max())
    tol = rollout_tol(T - 1, scale) + 2 * EPS32 * scale  # float32 rollouts, maybe other kernels
    for b, a in enumerate(answers):
        assert a["in_domain"] and a["model"] == {"name": "pend", "version": "v1"}
        for j, name in enumerate(s.output_names):
            assert len(a["outputs"][name]["mean"]) == T
            assert np.allclose(a["outputs"][name]["mean"], mean[b, :, j], rtol=0, atol=tol)
            assert np.allclose(a["outputs"][name]["std"], std[b, :, j], rtol=0, atol=tol)
    # the verified manifest of the model the Bento carries
    status, model = _call(url, "GET", "/model")
    assert status == 200 and (model["name"], model["version"]) == ("pend", "v1")
    assert model["files"]["model.onnx"] == hashlib.sha256(blob).hexdigest()
    assert "Traceback" not in log_path.read_text()


def test_a_bento_refuses_a_model_that_moves_and_a_second_model(monkeypatch):
    """The Bento's `model` argument is one stored version: NAME:latest or NAME:<stage> would
    name another model (or none) where the Bento runs; TWIN_ML_MODEL naming another model beside
    it is refused, not silently ignored."""
    from bentoml._internal.utils.args import set_arguments

    from serving import service

    monkeypatch.delenv("TWIN_ML_MODEL", raising=False)
    try:
        for ref in ("pend:production", "pend:latest", "pend"):
            set_arguments({"model": ref})
            with pytest.raises(RuntimeError, match=r"--arg model=.*NAME:VERSION"):
                service._bento_model()
        set_arguments({"model": "pend:v1"})
        assert service._bento_model() == "pend:v1"
        monkeypatch.setenv("TWIN_ML_MODEL", "other:v2")
        with pytest.raises(RuntimeError, match=r"TWIN_ML_MODEL='other:v2'.*unset TWIN_ML_MODEL"):
            service._bento_model()
        set_arguments({})
        assert service._bento_model() is None  # twin-serve's way: TWIN_ML_MODEL alone
    finally:
        set_arguments({})


def test_twin_models_bento_names_what_is_wrong(built, tmp_path):
    env = built[0]
    r = subprocess.run(
        [str(BIN / "twin-models"), "bento", "pend:production"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: no version of pend is promoted to production")
    r = subprocess.run(
        [str(BIN / "twin-models"), "bento", "pend:v1", "--bentofile", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 1 and r.stderr.startswith("error: --bentofile ")
