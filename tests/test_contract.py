"""The model contract on its own (no torch, no export): the card's JSON in both formats, the
domain box's reasons, the time grid's checks, and the requests' one validation."""

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from twin_ml.contract import (
    CardError,
    ConformalShift,
    DomainBox,
    ModelCard,
    RequestError,
    parse_scenario,
)
from twin_ml.physics import make_system

BOX_V1 = {
    "parameter:length": [0.5, 2.0],
    "parameter:damping": [0.05, 0.5],
    "parameter:mass": [0.5, 2.0],
    "state:theta": [-2.5, 2.5],
    "state:omega": [-2.0, 2.0],
    "input:torque:offset": [-2.0, 2.0],
    "input:torque:amplitude": [0.0, 1.0],
}
PROVENANCE = {
    "dataset_sha256": "d" * 64,
    "config_sha256": "c" * 64,
    "weights_sha256": "w" * 64,
    "code_version": "0.1.0+test",
    "created_at": "2026-01-01T00:00:00+00:00",
}


def v1_manifest() -> dict:
    """A manifest exactly as twin-export wrote it before the typed contract (format v1)."""
    return {
        "format": "twin-ml/onnx/v1",
        "name": "pend",
        "version": "v1",
        "kind": "hybrid",
        "members": 3,
        "system": make_system("pendulum").describe(),
        "interface": {"dtype": "float32"},
        "time": {
            "t0": 0.0,
            "dt": 0.1,
            "unit": "s",
            "train_steps": 20,
            "max_steps": 80,
            "fixed_steps": False,
        },
        "domain": {"box": BOX_V1, "regime": None},
        "normalization": {
            k: [0.0, 1.0] for k in ("x_mean", "x_std", "u_mean", "u_std", "p_mean", "p_std")
        }
        | {"y_mean": [0.0], "y_std": [1.0], "dx_std": [1.0, 1.0]},
        "conformal_scale": [1.2],
        "metrics": {"test": {"rmse": 0.01}},
        "parity": {"passed": True},
        "integrator_error": None,
        **PROVENANCE,
        "onnx_sha256": "o" * 64,
        "files": {"model.onnx": "o" * 64},
    }


@pytest.fixture
def card() -> ModelCard:
    return ModelCard.from_json(v1_manifest())


def test_a_v1_manifest_reads_into_the_v2_card_and_round_trips(card):
    assert card.format == "twin-ml/onnx/v2"
    assert card.domain.parameters["length"] == (0.5, 2.0)
    assert card.domain.inputs["torque"].offset == (-2.0, 2.0)
    assert card.domain.inputs["torque"].amplitude == (0.0, 1.0)
    assert card.provenance.model_dump() == PROVENANCE
    assert card.system.class_path == "twin_ml.physics.systems.pendulum:Pendulum"
    assert card.onnx_sha256 == "o" * 64 and card.files == {"model.onnx": "o" * 64}
    # written as v2, read back equal; the file's copy leaves out the store's own fields
    again = ModelCard.from_json(card.dumps(store=True))
    assert again == card
    inside = json.loads(card.dumps())
    assert "files" not in inside and "onnx_sha256" not in inside
    assert inside["domain"]["parameters"]["mass"] == [0.5, 2.0]
    assert inside["provenance"]["code_version"] == "0.1.0+test"
    # the system is rebuilt from the card, with its options
    system = card.system.build()
    assert system.name == "pendulum" and system.parameter_names == ["length", "damping", "mass"]


@pytest.mark.parametrize(
    "mutate, text",
    [
        (lambda m: m.update(format="twin-ml/onnx/v9"), "'twin-ml/onnx/v9' is not one this version"),
        (lambda m: m.pop("format"), "format None"),
        (lambda m: m["domain"].update(box={"weird:x": [0, 1]}), "unknown key 'weird:x'"),
        (lambda m: m.pop("time"), "time"),
        (lambda m: m["time"].update(dt="fast"), "time.dt"),
    ],
)
def test_an_unreadable_card_is_refused_with_a_re_export_message(mutate, text):
    m = v1_manifest()
    mutate(m)
    with pytest.raises(CardError) as e:
        ModelCard.from_json(m)
    assert text in str(e.value) and "re-export" in str(e.value)


def test_the_domain_box_says_what_left_it_and_by_how_much(card):
    system = card.system
    inside = card.domain.reasons(system, np.array([1.0, 0.2, 1.0]), np.zeros(2), np.zeros((5, 1)))
    assert inside == []
    u = np.zeros((5, 1))
    u[2, 0] = 3.0
    out = card.domain.reasons(system, np.array([2.3, 0.2, 1.0]), np.array([0.0, -2.5]), u)
    assert out == [
        "parameter length = 2.3 is above the training range [0.5, 2] by 0.3 (20% of its width)",
        "initial state omega = -2.5 is below the training range [-2, 2] by 0.5 (12% of its width)",
        "input torque = 3 is above the training range [-2, 2] by 1 (25% of its width)",
    ]
    assert DomainBox.from_design(BOX_V1) == card.domain
    assert DomainBox.of_design({"box": BOX_V1, "regime": None, "sampler": "lhs"}) == card.domain


def test_the_distance_to_the_box_is_the_largest_fraction_its_reasons_report(card):
    system, box = card.system, card.domain
    p_in, x_in = np.array([1.0, 0.2, 1.0]), np.zeros(2)
    assert box.distance(system, p_in, x_in, np.zeros((5, 1))) == 0.0
    faces = (np.array([2.0, 0.05, 0.5]), np.array([2.5, -2.0]), np.full((5, 1), -2.0))
    assert box.distance(system, *faces) == 0.0 and box.reasons(system, *faces) == []
    # length 0.3 above [0.5, 2]: 0.3 / 1.5 of its width; omega 0.5 below [-2, 2]: 0.5 / 4
    p_out, x_out = np.array([2.3, 0.2, 1.0]), np.array([0.0, -2.5])
    assert box.distance(system, p_out, x_in, np.zeros((5, 1))) == (2.3 - 2.0) / 1.5
    assert box.distance(system, p_in, x_out, np.zeros((5, 1))) == 0.125
    u = np.zeros((5, 1))
    u[2, 0] = 3.0  # one step of the input 1 above [-2, 2]: 1 / 4 of its width, the largest
    assert box.distance(system, p_out, x_out, u) == 0.25
    assert box.check(system, p_out, x_out, u) == (box.reasons(system, p_out, x_out, u), 0.25)
    # N scenarios at once (what training computes on the design's box): the same numbers
    rng = np.random.default_rng(0)
    n = 64
    p = rng.uniform([0.2, 0.0, 0.3], [2.4, 0.6, 2.3], (n, 3))
    x0 = rng.uniform(-2.8, 2.8, (n, 2))
    u = rng.uniform(-2.2, 2.2, (n, 7, 1))
    d = box.distances(system, p, x0, u)
    assert d.tolist() == [box.distance(system, p[i], x0[i], u[i]) for i in range(n)]
    assert [x > 0 for x in d] == [bool(box.reasons(system, p[i], x0[i], u[i])) for i in range(n)]
    assert 0 < (d > 0).sum() < n
    # one scenario's check (a plain-Python pass when it is inside) = the full comparison
    for i in range(n):
        ex = box.excesses(system, p[i : i + 1], x0[i : i + 1], u[i : i + 1])
        assert box.check(system, p[i], x0[i], u[i]) == (ex.messages(), float(ex.distances()[0]))
    assert box.check(system, *faces) == ([], 0.0)
    assert box.distances(system, p.astype(np.float32), x0, u).dtype == np.float64


def test_a_parsed_scenario_carries_its_distance(card):
    assert parse_scenario(card, scenario()).distance == 0.0
    out = parse_scenario(card, scenario(parameters={"length": 2.3, "damping": 0.2, "mass": 1.0}))
    assert out.distance == (2.3 - 2.0) / 1.5 and not out.in_domain


def test_a_card_without_a_conformal_shift_reads_as_beta_zero(card):
    """Cards written before the conformal shift (v1, and v2 without the field) load with beta 0:
    the std is never widened. A card with one widens by 1 + beta d and round-trips."""
    ny = len(card.system.outputs)
    assert card.conformal_shift == ConformalShift() and card.conformal_shift.beta == []
    assert card.conformal_shift.factor(0.3, ny).tolist() == [1.0] * ny
    v2 = json.loads(card.dumps())
    del v2["conformal_shift"]
    assert ModelCard.from_json(v2).conformal_shift == ConformalShift()
    shifted = ModelCard.from_json({**v2, "conformal_shift": {"beta": [0.5] * ny, "n_fit": 7}})
    assert shifted.conformal_shift.factor(0.2, ny).tolist() == [1.1] * ny
    assert shifted.conformal_shift.factor(np.zeros(3), ny).tolist() == [[1.0] * ny] * 3
    assert ModelCard.from_json(shifted.dumps()) == shifted
    for bad, text in (([0.5] * (ny + 1), "outputs"), ([-0.1] * ny, "finite and >= 0")):
        with pytest.raises(CardError, match="conformal_shift") as e:
            ModelCard.from_json({**v2, "conformal_shift": {"beta": bad}})
        assert text in str(e.value)


def scenario(n=10, **over):
    sc = {
        "parameters": {"length": 1.0, "damping": 0.2, "mass": 1.0},
        "t_end": 0.1 * n,
        "inputs": {"torque": [0.0] * (n + 1)},
    }
    sc.update(over)
    return sc


def test_a_scenario_is_parsed_onto_the_model_grid(card):
    s = parse_scenario(card, scenario(10, quantiles=[0.05, 0.95]))
    assert np.allclose(s.t, np.arange(11) * 0.1) and s.u.shape == (11, 1)
    assert s.in_domain and s.quantiles == [0.05, 0.95]
    assert s.defaulted_states == ["theta", "omega"] and np.all(s.x0 == 0.0)  # the box's middle
    times = parse_scenario(card, {**scenario(3), "t_end": None, "times": [0.2, 0.3, 0.4, 0.5]})
    assert np.allclose(times.t, [0.2, 0.3, 0.4, 0.5])


@pytest.mark.parametrize(
    "sc, field, text",
    [
        # physical limits: refused, whatever the training box (a negative length, a negative mass)
        (
            scenario(parameters={"length": -1.0, "damping": 0.2, "mass": 1.0}),
            "scenario.parameters.length",
            "outside the physical limits [0.05, 100]",
        ),
        (
            scenario(parameters={"length": 1.0, "damping": 0.2, "mass": -6.0}),
            "scenario.parameters.mass",
            "-6 [kg] is outside the physical limits [0.01, 1000]",
        ),
        (scenario(t_end=0.25), "scenario.t_end", "must be a multiple of dt = 0.1"),
        (scenario(t_end=9.0), "scenario.t_end", "90 steps exceed this model's maximum of 80"),
        (
            {**scenario(3), "t_end": None, "times": [0.0, 0.1, 0.1, 0.2]},
            "scenario.times",
            "duplicated timestamp 0.1",
        ),
        (
            {**scenario(3), "t_end": None, "times": [0.0, 0.2, 0.4, 0.6]},
            "scenario.times",
            "must be uniform with the model's step dt = 0.1",
        ),
        (scenario(2, inputs={"torque": [0.0, 1.0]}), "scenario.inputs.torque", "has 2 values"),
    ],
)
def test_bad_scenarios_name_their_field(card, sc, field, text):
    with pytest.raises(RequestError) as e:
        parse_scenario(card, sc)
    assert e.value.field == field and text in str(e.value)


def test_a_server_limit_on_steps_stays_within_the_models(card):
    with pytest.raises(RequestError, match="maximum of 15"):
        parse_scenario(card, scenario(20), max_steps=15)
    assert (
        len(parse_scenario(card, scenario(20), max_steps=500).t) == 21
    )  # capped by the model's 80
    with pytest.raises(RequestError, match="maximum of 80"):
        parse_scenario(card, scenario(81), max_steps=500)


def test_an_emulator_answers_on_its_training_grid_only():
    m = v1_manifest()
    m["time"].update(max_steps=20, fixed_steps=True)
    emu = ModelCard.from_json(m)
    assert len(parse_scenario(emu, scenario(20)).t) == 21
    with pytest.raises(RequestError, match="training grid only"):
        parse_scenario(emu, scenario(10))


def test_open_limits_are_null_in_json_and_infinite_in_the_card(card):
    theta = card.system.states[0]
    assert theta.limits == (None, None) and theta.physical == (-math.inf, math.inf)
    raw = copy.deepcopy(v1_manifest())
    assert raw["system"]["states"][0]["limits"] == [None, None]


def test_the_contract_is_torch_free():
    code = (
        "import sys, twin_ml.contract, serving.runtime, serving.schemas; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_horizon_below_one_step_is_refused(card):
    with pytest.raises(RequestError, match="at least one step"):
        parse_scenario(card, scenario(t_end=1e-12))


def test_the_store_fields_are_written_only_when_known(card):
    bare = card.model_copy(update={"onnx_sha256": None, "files": None})
    assert "files" not in bare.to_json(store=True) and "onnx_sha256" not in bare.to_json(store=True)
    assert card.to_json(store=True)["files"] == {"model.onnx": "o" * 64}
    assert card.to_json()["converted_from"] == "twin-ml/onnx/v1"  # said, not hidden


USER_SYSTEM = """
from twin_ml.physics import Output, Parameter, PhysicsSystem, State

class Decay(PhysicsSystem):
    states = (State("x", "m", bounds=(0.0, 1.0)),)
    outputs = (Output("x", "m"),)
    parameters = (Parameter("k", "1/s", nominal=1.0, bounds=(0.5, 2.0), limits=(0.0, 1e3)),)

    def rhs(self, t, x, u, p):
        return -p[..., 0:1] * x
"""

FIND_AGAIN = """
import json, sys
from twin_ml.physics import system_from_description as find
for desc in json.loads(sys.argv[1]):
    print(type(find(desc)).__name__, end=" ")
"""


def test_an_unregistered_system_is_found_again_by_any_recorded_spelling(tmp_path):
    """By its class path, by the name it was addressed with (pkg.mod:Class or pkg.mod.Class),
    also as older runs recorded it (no class path), from the working directory, each in a
    fresh process; a module that fails on import is one KeyError naming it."""
    (tmp_path / "usersys.py").write_text(USER_SYSTEM)
    (tmp_path / "broken.py").write_text("raise RuntimeError('half-written module')\n")
    descs = [
        {"name": "usersys:Decay", "class": "usersys:Decay", "options": {}},
        {"name": "usersys.Decay", "class": "usersys:Decay", "options": {}},
        {"name": "usersys.Decay", "options": {}},  # a run recorded before the class path was
        {"name": "usersys:Decay", "options": {}},
    ]
    r = subprocess.run(
        [sys.executable, "-c", FIND_AGAIN, json.dumps(descs)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.split() == ["Decay"] * 4, r.stderr[-2000:]
    bad = [{"name": "broken:Thing", "class": "broken:Thing", "options": {}}]
    r = subprocess.run(
        [sys.executable, "-c", FIND_AGAIN, json.dumps(bad)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 1 and "KeyError" in r.stderr
    assert "RuntimeError: half-written module" in r.stderr and "PYTHONPATH" in r.stderr
