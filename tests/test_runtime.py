"""The serving runtime (onnxruntime, no torch): answers against the torch model, batching by
horizon, domain flags, and a clear error naming the field for every kind of bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from conftest import rollout_tol

from twin_ml.export.export import export_run
from twin_ml.models import load_trained

pytestmark = pytest.mark.numeric  # also run in `make test-portable`

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def exported(tmp_path_factory, pendulum_hybrid_run):
    """The session's shared pendulum hybrid (conftest: 3 members, 2 epochs on 24 scenarios),
    exported in this process (which only reads the run)."""
    root = tmp_path_factory.mktemp("runtime")
    run = pendulum_hybrid_run[0]
    blob, manifest = export_run(
        run, name="pendulum_hybrid", version="v1", parity_scenarios=8, parity_steps=20
    )
    path = root / "model.onnx"
    path.write_bytes(blob)
    model, _ = load_trained(run / "model")
    return path, manifest, model


@pytest.fixture(scope="module")
def rt(exported):
    from serving.runtime import Runtime

    path, manifest, _ = exported
    return Runtime(path, manifest, max_scenarios=8)


def scenario(n_steps=20, **over):
    t = np.arange(n_steps + 1) * 0.1
    sc = {
        "parameters": {"length": 1.0, "damping": 0.2, "mass": 1.2},
        "initial_state": {"theta": 0.4, "omega": 0.0},
        "t_end": round(n_steps * 0.1, 10),
        "inputs": {"torque": (0.3 * np.sin(t)).tolist()},
        "quantiles": [0.05, 0.5, 0.95],
    }
    sc.update(over)
    return sc


def test_answer_matches_the_torch_model_with_gaussian_quantiles(rt, exported):
    _, _, model = exported
    sc = scenario(30)
    ans = rt.simulate(sc)[0]
    t = torch.tensor(ans["times"], dtype=torch.float32)
    ref = model.predict(
        torch.tensor([[0.4, 0.0]]),
        torch.tensor(sc["inputs"]["torque"], dtype=torch.float32)[None, :, None],
        torch.tensor([[1.0, 0.2, 1.2]]),
        t,
    )
    out = ans["outputs"]["theta"]
    assert len(out["mean"]) == 31 and ans["in_domain"] and ans["domain_reasons"] == []
    # onnxruntime's graph and torch's eager ops: two float32 programs of the same 30-step rollout;
    # the std moves by at most the members' difference (times the conformal scale)
    tol = rollout_tol(30, np.abs(ref["members"].numpy()).max())
    assert np.allclose(out["mean"], ref["mean"][0, :, 0].numpy(), rtol=0, atol=tol)
    assert np.allclose(
        out["std"],
        ref["std"][0, :, 0].numpy(),
        rtol=0,
        atol=tol * max(exported[1].conformal_scale),
    )
    z = NormalDist().inv_cdf(0.95)
    # float64: the runtime forms mean + z * std from the same float64 values the answer carries
    assert np.allclose(
        out["quantiles"]["0.95"], np.array(out["mean"]) + z * np.array(out["std"]), atol=1e-12
    )
    assert out["quantiles"]["0.5"] == pytest.approx(out["mean"])
    assert ans["model"] == {"name": "pendulum_hybrid", "version": "v1"}


def test_mixed_horizons_batch_like_single_calls(rt):
    from serving.runtime import plan

    scs = [
        scenario(10),
        scenario(25, parameters={"length": 1.5, "damping": 0.1, "mass": 0.7}),
        scenario(10, t_end=1.0),
    ]
    scs.append({**scenario(40), "times": (np.arange(41) * 0.1).tolist()})
    del scs[-1]["t_end"]
    scs += [scenario(30, initial_state={"theta": -0.5, "omega": 0.3}), scenario(22)]
    # padded groups: 41 and 31 points share a batch, 26 and 23 another, the two 11s a third
    assert plan([len(rt.parse(sc).t) for sc in scs]) == [[3, 4], [1, 5], [0, 2]]
    together = rt.simulate(scs)
    for sc, a in zip(scs, together):
        alone = rt.simulate(sc)[0]
        assert a["times"] == alone["times"]
        # another batch size and padding: the same float32 rollout, rounded by other kernels
        n, scale = len(a["times"]) - 1, np.abs(alone["outputs"]["theta"]["mean"]).max()
        tol = rollout_tol(n, scale + 3 * np.max(alone["outputs"]["theta"]["std"]))
        assert np.allclose(
            a["outputs"]["theta"]["mean"], alone["outputs"]["theta"]["mean"], rtol=0, atol=tol
        )
        assert np.allclose(
            a["outputs"]["theta"]["std"],
            alone["outputs"]["theta"]["std"],
            rtol=0,
            atol=tol * max(rt.card.conformal_scale),
        )


def test_out_of_domain_is_flagged_with_reasons_and_refused_in_strict_mode(rt, exported):
    from serving.runtime import RequestError, Runtime

    sc = scenario(10, parameters={"length": 2.6, "damping": 0.2, "mass": 1.0})
    ans = rt.simulate(sc)[0]
    assert not ans["in_domain"]
    assert ans["domain_reasons"] == [
        "parameter length = 2.6 is above the training range [0.5, 2] by 0.6 (40% of its width)"
    ]
    big = scenario(10)
    big["inputs"]["torque"][3] = -3.0
    assert any(
        r.startswith("input torque = -3 is below") for r in rt.simulate(big)[0]["domain_reasons"]
    )
    strict = Runtime(exported[0], exported[1], strict=True)
    with pytest.raises(RequestError, match="strict mode"):
        strict.simulate(sc)
    missing_x0 = scenario(5)
    del missing_x0["initial_state"]
    assert "initial state theta, omega not given" in rt.simulate(missing_x0)[0]["warnings"][0]


@pytest.mark.parametrize(
    "mutate, field, text",
    [
        (
            lambda s: s["parameters"].update(length=float("nan")),
            "scenarios[0].parameters.length",
            "finite",
        ),
        (
            lambda s: s["inputs"]["torque"].__setitem__(2, math.inf),
            "scenarios[0].inputs.torque[2]",
            "finite",
        ),
        (
            lambda s: s["inputs"].update(torque=[0.0] * 7),
            "scenarios[0].inputs.torque",
            "has 7 values, but the time grid has 21",
        ),
        (
            lambda s: s["parameters"].update(gravity=9.8),
            "scenarios[0].parameters",
            "unknown names ['gravity']",
        ),
        (lambda s: s["parameters"].pop("mass"), "scenarios[0].parameters", "missing ['mass']"),
        (
            lambda s: s["parameters"].update(mass="heavy"),
            "scenarios[0].parameters.mass",
            "must be a number, got str",
        ),
        (
            lambda s: s.update(t_end=100.0),
            "scenarios[0].t_end",
            "exceed this model's maximum of 80",
        ),
        (lambda s: s.update(dt=0.0), "scenarios[0].dt", "must be > 0"),
        (lambda s: s.update(dt=0.05), "scenarios[0].dt", "must equal the model's dt = 0.1"),
        (lambda s: s.update(quantiles=[1.5]), "scenarios[0].quantiles[0]", "must be in (0, 1)"),
        (
            lambda s: s.update(quantiles=[0.05, 0.0500000001]),
            "scenarios[0].quantiles",
            "levels must differ",
        ),
        (
            lambda s: s.update(t_end=1e300),
            "scenarios[0].t_end",
            "exceed this model's maximum of 80",
        ),
        (lambda s: s.update(colour="red"), "scenarios[0]", "unknown fields ['colour']"),
    ],
)
def test_bad_input_names_the_field(rt, mutate, field, text):
    from serving.runtime import RequestError

    sc = scenario(20)
    mutate(sc)
    with pytest.raises(RequestError) as e:
        rt.simulate([sc])
    assert e.value.field == field and text in str(e.value)
    assert rt.simulate(scenario(5))[0]["in_domain"]  # and the next valid request is answered


def test_request_level_limits(rt):
    from serving.runtime import RequestError

    with pytest.raises(RequestError, match="non-empty list"):
        rt.simulate([])
    with pytest.raises(RequestError, match="9 scenarios exceed the limit of 8"):
        rt.simulate([scenario(5)] * 9)


def test_runtime_does_not_import_torch(exported):
    path = exported[0]
    code = (
        "import sys; import serving.runtime; from twin_ml import registry; "
        "print(','.join(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=path.parent
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == ""


def test_a_model_exported_in_the_previous_format_still_serves(exported, rt):
    """A file whose metadata holds a v1 manifest (the layout before the typed card: one flat box
    keyed "parameter:NAME", provenance at the top level) is read and answers the same."""
    import onnx

    from serving.runtime import Runtime
    from twin_ml.export.onnx_export import read_metadata

    path, card, _ = exported
    v2 = card.to_json()
    box = {f"parameter:{k}": v for k, v in v2["domain"]["parameters"].items()}
    box |= {f"state:{k}": v for k, v in v2["domain"]["states"].items()}
    for k, r in v2["domain"]["inputs"].items():
        box |= {f"input:{k}:offset": r["offset"], f"input:{k}:amplitude": r["amplitude"]}
    v1 = {k: v for k, v in v2.items() if k not in ("domain", "provenance")}
    v1 |= {"format": "twin-ml/onnx/v1", "domain": {"box": box, "regime": None}}
    v1 |= v2["provenance"]
    mp = onnx.load_from_string(path.read_bytes())
    del mp.metadata_props[:]
    onnx.helper.set_model_props(mp, {"twin_ml.manifest": json.dumps(v1)})
    old = mp.SerializeToString()
    old_card = read_metadata(old)
    assert old_card.domain == card.domain and old_card.provenance == card.provenance
    sc = scenario(12)
    assert Runtime(old, old_card).simulate(sc) == rt.simulate(sc)
