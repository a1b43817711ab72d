"""The Open Inference Protocol v2 (serving/v2.py) beside /simulate, driven by its own client
(tritonclient.http) against a live twin-serve of the session's tiny pendulum hybrid: readiness,
model metadata, inference in JSON and in the binary tensor extension answering as /simulate does
(domain flag included), and errors in the protocol's shape with 400 / 404."""

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.http as tc
from conftest import EPS32, rollout_tol
from test_openapi_contract import _post, served  # noqa: F401  (served: a live twin-serve)
from tritonclient.utils import InferenceServerException

from twin_ml.contract import ModelCard

pytestmark = pytest.mark.numeric
T = 11  # time points (10 steps)


@pytest.fixture(scope="module")
def client(served):  # noqa: F811
    url, _ = served
    c = tc.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def card(served):  # noqa: F811
    url, _ = served
    return ModelCard.of(json.loads(urllib.request.urlopen(f"{url}/model", timeout=10).read()))


def _batch(card):
    """Three scenarios as the tensors (float32) and as /simulate's scenarios: two inside the
    training box, the third with its length 20% of the box's width above it."""
    s, box = card.system, card.domain
    rng = np.random.default_rng(0)
    mid = {n: sum(box.parameters[n]) / 2 for n in s.parameter_names}
    p = np.array([[mid[n] for n in s.parameter_names]] * 3)
    p[1] *= 0.9
    lo, hi = box.parameters["length"]
    p[2, s.parameter_names.index("length")] = hi + 0.2 * (hi - lo)
    x0 = np.array([[sum(box.states[n]) / 4 for n in s.state_names]] * 3)
    x0[1] *= -1
    u = 0.2 * np.sin(np.arange(T) / 3)[None, :, None] + 0.05 * rng.standard_normal((3, T, 1))
    x0, u, p = (a.astype(np.float32) for a in (x0, u, p))
    scenarios = [
        {
            "parameters": dict(zip(s.parameter_names, p[b].tolist())),
            "initial_state": dict(zip(s.state_names, x0[b].tolist())),
            "t_end": (T - 1) * card.time.dt,
            "inputs": {n: u[b, :, j].tolist() for j, n in enumerate(s.input_names)},
        }
        for b in range(3)
    ]
    return {"x0": x0, "u": u, "p": p}, scenarios


def _inputs(arrays, binary=True, dtype="FP32"):
    out = []
    for name, a in arrays.items():
        t = tc.InferInput(name, list(a.shape), dtype)
        t.set_data_from_numpy(a, binary_data=binary)
        out.append(t)
    return out


def _outputs(binary):
    return [tc.InferRequestedOutput(n, binary_data=binary) for n in ("mean", "std", "members")] + [
        tc.InferRequestedOutput("in_domain", binary_data=binary)
    ]


def test_ready_and_metadata(client, card):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("pend") and client.is_model_ready("pend", "v1")
    assert not client.is_model_ready("other") and not client.is_model_ready("pend", "v9")
    meta = client.get_model_metadata("pend")
    nx, nu, n_p, ny = (
        len(v) for v in (card.system.states, card.system.inputs, card.system.parameters,
                         card.system.outputs)
    )  # fmt: skip
    assert meta["name"] == "pend" and meta["versions"] == ["v1"]
    assert meta["inputs"] == [
        {"name": "x0", "datatype": "FP32", "shape": [-1, nx]},
        {"name": "u", "datatype": "FP32", "shape": [-1, -1, nu]},
        {"name": "p", "datatype": "FP32", "shape": [-1, n_p]},
    ]
    assert meta["outputs"] == [
        {"name": "mean", "datatype": "FP32", "shape": [-1, -1, ny]},
        {"name": "std", "datatype": "FP32", "shape": [-1, -1, ny]},
        {"name": "members", "datatype": "FP32", "shape": [card.members, -1, -1, ny]},
        {"name": "in_domain", "datatype": "BOOL", "shape": [-1]},
    ]
    assert meta["parameters"]["parameters"] == ",".join(card.system.parameter_names)
    assert client.get_model_metadata("pend", "v1") == meta
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]


def test_infer_answers_as_simulate_in_json_and_binary(client, card, served):  # noqa: F811
    url, _ = served
    arrays, scenarios = _batch(card)
    status, answers = _post(url, "/simulate", json.dumps({"scenarios": scenarios}).encode())
    assert status == 200
    names = card.system.output_names
    ref_mean = np.array([[a["outputs"][n]["mean"] for n in names] for a in answers])
    ref_std = np.array([[a["outputs"][n]["std"] for n in names] for a in answers])
    ref_mean, ref_std = ref_mean.transpose(0, 2, 1), ref_std.transpose(0, 2, 1)  # [B, T, ny]

    binary = client.infer("pend", _inputs(arrays))  # tritonclient's defaults: binary both ways
    as_json = client.infer("pend", _inputs(arrays, binary=False), outputs=_outputs(False))
    for got in (binary, as_json):
        mean, std, members = (got.as_numpy(n) for n in ("mean", "std", "members"))
        assert mean.dtype == std.dtype == members.dtype == np.float32
        assert mean.shape == std.shape == (3, T, len(names))
        assert members.shape == (card.members, 3, T, len(names))
        assert got.as_numpy("in_domain").tolist() == [a["in_domain"] for a in answers]
        assert got.as_numpy("in_domain").tolist() == [True, True, False]
        # the same checked scenarios on the same runtime: only float32 rounding may differ (the
        # batch is the same; the answers are float32 here, float64 of float32 in /simulate)
        scale = max(np.abs(ref_mean).max(), np.abs(ref_std).max(), np.abs(members).max())
        tol = rollout_tol(T - 1, scale) + 2 * EPS32 * scale
        assert np.allclose(mean, ref_mean, rtol=0, atol=tol)
        assert np.allclose(std, ref_std, rtol=0, atol=tol)
        # the ensemble's mean is its members' mean (the std is calibrated: not theirs)
        assert np.allclose(members.mean(axis=0), mean, rtol=0, atol=tol)
    assert binary.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 4 * 3 * T * len(
        names
    )
    assert "data" in as_json.get_response()["outputs"][0]
    # one output asked, binary, from JSON inputs; the request id comes back
    one = client.infer(
        "pend",
        _inputs(arrays, binary=False),
        outputs=[tc.InferRequestedOutput("in_domain")],
        request_id="r1",
    )
    assert [o["name"] for o in one.get_response()["outputs"]] == ["in_domain"]
    assert one.get_response()["id"] == "r1" and one.as_numpy("in_domain").tolist()[2] is False
    # without x0: the training box's middle, as /simulate without initial_state
    no_x0 = client.infer("pend", _inputs({"u": arrays["u"], "p": arrays["p"]}))
    status, middle = _post(
        url,
        "/simulate",
        json.dumps({"scenarios": [{**s, "initial_state": {}} for s in scenarios]}).encode(),
    )
    ref = np.array([[a["outputs"][n]["mean"] for n in names] for a in middle]).transpose(0, 2, 1)
    assert status == 200 and np.allclose(no_x0.as_numpy("mean"), ref, rtol=0, atol=tol)


def _refused(client, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        client.infer(*args, **kwargs)
    return e.value


def test_errors_name_the_tensor_and_what_is_allowed(client, card, served):  # noqa: F811
    arrays, _ = _batch(card)
    n_p = len(card.system.parameters)
    wide = {**arrays, "p": np.concatenate([arrays["p"], arrays["p"][:, :1]], axis=1)}
    e = _refused(client, "pend", _inputs(wide))
    assert e.status() == "400" and e.message().startswith("inputs.p: shape [3, 4] does not match")
    assert f"[B, {n_p}]" in e.message()
    e = _refused(client, "pend", _inputs({k: v.astype(np.float64) for k, v in arrays.items()},
                                         dtype="FP64"))  # fmt: skip
    assert e.status() == "400" and "must be FP32" in e.message() and "FP64" in e.message()
    e = _refused(client, "other", _inputs(arrays))
    assert e.status() == "404" and "no model 'other' here; this server serves 'pend'" in e.message()
    e = _refused(client, "pend", _inputs(arrays), model_version="v9")
    assert e.status() == "404" and "no version 'v9'" in e.message()
    # over the server's scenario limit (twin-serve's default: 256), as /simulate
    many = {k: np.repeat(v[:1], 257, axis=0)[:, : (2 if k == "u" else None)] for k, v in
            arrays.items()}  # fmt: skip
    e = _refused(client, "pend", _inputs(many))
    assert e.status() == "400" and "257 scenarios exceed the limit of 256" in e.message()
    # over the model's horizon
    steps = card.time.max_steps
    long = {**arrays, "u": np.zeros((3, steps + 2, 1), np.float32)}
    e = _refused(client, "pend", _inputs(long))
    assert e.status() == "400" and e.message().startswith(f"inputs.u: T = {steps + 2} time points")
    # a value outside the physical limits: refused as /simulate refuses it, named by tensor
    bad = {**arrays, "p": arrays["p"].copy()}
    bad["p"][1, card.system.parameter_names.index("length")] = 1e4
    e = _refused(client, "pend", _inputs(bad, binary=False))
    assert e.status() == "400", e.message()
    assert e.message().startswith("inputs.p[1]: parameter length (p[1, 0]): 10000 [m] is outside")
    nan = {**arrays, "u": arrays["u"].copy()}
    nan["u"][0, 3, 0] = np.nan
    e = _refused(client, "pend", _inputs(nan))  # binary: NaN arrives, and the checks refuse it
    assert e.status() == "400" and "input torque (u[0, 3, 0])" in e.message()
    assert "must be finite" in e.message()
    e = _refused(client, "pend", _inputs({"u": arrays["u"]}))
    assert e.status() == "400" and e.message().startswith("inputs: missing p")


def test_raw_http_error_shape_and_media(served, card):  # noqa: F811
    url, _ = served
    status, body = _post(url, "/v2/models/pend/infer", b'{"inputs": [{"name": "q"}]}')
    assert status == 400 and set(body) == {"error", "detail"}
    assert (
        body["error"] == "inputs[0].name: 'q' is not an input of this model; its inputs: x0, u, p"
    )
    assert body["detail"][0]["loc"] == ["inputs", 0, "name"]
    req = {
        "inputs": [{"name": "p", "datatype": "FP32", "shape": [1, 3], "data": [[1.0, 0.2, 1.0]]},
                   {"name": "u", "datatype": "FP32", "shape": [1, 2, 1], "data": [0, "x"]}],
        "outputs": [{"name": "in_domain"}],
    }  # fmt: skip
    status, body = _post(url, "/v2/models/pend/infer", json.dumps(req).encode())
    assert status == 400 and body["error"] == "inputs.u.data: must hold numbers only (FP32)"
    req["inputs"][1]["data"] = [0, 0.5]
    status, body = _post(url, "/v2/models/pend/infer", json.dumps(req).encode())
    assert status == 200 and [o["name"] for o in body["outputs"]] == ["in_domain"]
    assert body["outputs"][0]["shape"] == [1] and body["outputs"][0]["data"] in ([True], [False])
    status, body = _post(url, "/v2/models/pend/infer", json.dumps(req).encode(), "text/plain")
    assert status == 415 and "application/octet-stream" in body["error"]
    meta = json.loads(urllib.request.urlopen(f"{url}/v2/models/pend", timeout=10).read())
    assert meta["platform"] == "onnxruntime_onnx"
    assert json.loads(urllib.request.urlopen(f"{url}/v2", timeout=10).read())["version"] == "2"


def test_v2_and_simulate_share_the_batcher(client, card, served):  # noqa: F811
    """Concurrent v2 and /simulate requests may share a model call (members fetched for the v2
    ones): every answer is its request's alone, within float32 rounding."""
    from concurrent.futures import ThreadPoolExecutor

    url, _ = served
    arrays, scenarios = _batch(card)
    names = card.system.output_names
    alone = client.infer("pend", _inputs(arrays)).as_numpy("mean")

    def v2(_):
        c = tc.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
        try:
            return c.infer("pend", _inputs(arrays)).as_numpy("mean")
        finally:
            c.close()

    def simulate(_):
        status, answers = _post(url, "/simulate", json.dumps({"scenarios": scenarios}).encode())
        assert status == 200
        return np.array([[a["outputs"][n]["mean"] for n in names] for a in answers]).transpose(
            0, 2, 1
        )

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: (v2 if i % 2 else simulate)(i), range(16)))
    tol = rollout_tol(T - 1, np.abs(alone).max()) + 2 * EPS32 * np.abs(alone).max()
    for g in got:
        assert g.shape == alone.shape and np.allclose(g, alone, rtol=0, atol=tol)
