"""Dataset generation: determinism, resumption, failures, integrity, refusals."""

import json
import os

import numpy as np
import pytest
from conftest import SHIPPED

from twin_ml.data import Dataset, DatasetError, ScenarioDesign, generate_dataset
from twin_ml.physics import Output, Parameter, PhysicsSystem, State, make_system
from twin_ml.physics.solver import OK

SMALL = ScenarioDesign(t_end=2.0, dt=0.1)


def _gen(tmp_path, name="run", system=None, design=SMALL, **kw):
    kw = {"n_scenarios": 24, "seed": 0, "shard_size": 5, "progress": False, **kw}
    return generate_dataset(
        system or make_system("pendulum"), design, out_dir=tmp_path / name, **kw
    )


def test_same_seed_same_sha_other_seed_other_sha(tmp_path):
    a, b = _gen(tmp_path, "a"), _gen(tmp_path, "b")
    c = _gen(tmp_path, "c", seed=1)
    assert a.complete and a.manifest["dataset_sha256"] == b.manifest["dataset_sha256"]
    assert c.manifest["dataset_sha256"] != a.manifest["dataset_sha256"]
    for s, t in zip(a.manifest["shards"], b.manifest["shards"]):
        assert (a.path / s["file"]).read_bytes() == (b.path / t["file"]).read_bytes()


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    full = _gen(tmp_path, "full")
    part = _gen(tmp_path, "part", max_new_shards=2)
    assert not part.complete and not (part.path / "manifest.json").exists()
    assert (part.path / ".generating.json").exists()
    with pytest.raises(DatasetError, match="did not finish"):
        Dataset.open(part.path)
    resumed = _gen(tmp_path, "part")
    assert resumed.complete and resumed.shards_reused == 2 and resumed.shards_written == 4
    assert resumed.manifest["dataset_sha256"] == full.manifest["dataset_sha256"]
    assert not (part.path / ".generating.json").exists()
    again = _gen(tmp_path, "part")  # complete: nothing to do
    assert (
        again.shards_written == 0
        and again.manifest["dataset_sha256"] == full.manifest["dataset_sha256"]
    )


def test_parallel_workers_give_the_same_dataset(tmp_path):
    one = _gen(tmp_path, "one", workers=1)
    two = _gen(tmp_path, "two", workers=2)
    assert one.manifest["dataset_sha256"] == two.manifest["dataset_sha256"]


def test_a_torn_shard_is_rewritten_on_resume(tmp_path):
    full = _gen(tmp_path, "full")
    part = _gen(tmp_path, "part", max_new_shards=3)
    shard = part.path / "shards" / "00001.npz"
    shard.write_bytes(shard.read_bytes()[:100])  # e.g. a disk that lost the tail
    (part.path / "shards" / ".00002.npz.abc.tmp").write_bytes(
        b"junk"
    )  # a temp file of a killed run
    resumed = _gen(tmp_path, "part")
    assert resumed.shards_reused == 2 and resumed.shards_written == 4
    assert resumed.manifest["dataset_sha256"] == full.manifest["dataset_sha256"]
    assert not list((part.path / "shards").glob(".*.tmp"))


def test_manifest_and_shards_are_readable_with_numpy_alone(tmp_path):
    res = _gen(tmp_path)
    m = json.loads((res.path / "manifest.json").read_text())
    assert m["format"] == "twin-ml/dataset/v1" and len(m["dataset_sha256"]) == 64
    assert [s["name"] for s in m["system"]["states"]] == ["theta", "omega"]
    assert m["system"]["parameters"][0] == {
        "name": "length",
        "unit": "m",
        "nominal": 1.0,
        "bounds": [0.5, 2.0],
        "limits": [0.05, 100.0],
    }
    assert m["shapes"] == {"n_scenarios": 27, "n_times": 21, "nx": 2, "nu": 1, "ny": 1, "np": 3}
    assert (
        m["counts"]["extrapolation"] == 3
        and sum(m["counts"][k] for k in ("train", "val", "test")) == 24
    )
    assert set(m) >= {
        "design",
        "regimes",
        "solver",
        "seeds",
        "splits",
        "code_version",
        "shards",
        "time",
    }
    z = np.load(res.path / m["shards"][0]["file"], allow_pickle=False)
    assert z["x"].shape == (5, 21, 2) and z["u"].shape == (5, 21, 1) and z["p"].shape == (5, 3)
    np.testing.assert_allclose(z["x"][:, 0], z["x0"])  # trajectories start at their initial state
    np.testing.assert_allclose(z["y"][..., 0], z["x"][..., 0])  # y = theta
    # the splits in the manifest and in the shards agree
    ds = Dataset.open(res.path)
    assert sorted(ds.load("val")["index"].tolist()) == m["splits"]["val"]


def test_stored_trajectories_match_an_independent_solve(tmp_path):
    from twin_ml.physics import SolverSettings, solve_looped

    res = _gen(tmp_path)
    d = Dataset.open(res.path).load("train")
    ref = solve_looped(
        make_system("pendulum"),
        d["t"],
        d["u"][:3],
        d["p"][:3],
        d["x0"][:3],
        SolverSettings(method="DOP853", rtol=1e-11, atol=1e-12),
    )
    # the default tolerances (rtol 1e-6) through kinks in the interpolated input: ~1e-4 of the range
    np.testing.assert_allclose(d["x"][:3], ref.x, atol=1e-4 * np.ptp(ref.x))


def test_tampered_shard_is_refused(tmp_path):
    res = _gen(tmp_path)
    f = res.path / res.manifest["shards"][1]["file"]
    data = bytearray(f.read_bytes())
    data[-9] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="sha256 .* does not match the manifest"):
        Dataset.open(res.path)


class Fragile(PhysicsSystem):
    """dx/dt = p x^2 from x0 = 1: blows up at t = 1/p inside the horizon for p > 0.5."""

    states = (State("x", "1", bounds=(1.0, 1.0)),)
    outputs = (Output("x", "1"),)
    parameters = (Parameter("p", "1", nominal=0.0, bounds=(-1.0, 1.0)),)
    default_horizon = (2.0, 0.1)
    divergence_limit = 1e4
    name = "fragile"

    def rhs(self, t, x, u, p):
        return p[..., None] * x**2


def test_solver_failures_are_recorded_and_never_silent(tmp_path):
    res = _gen(
        tmp_path, system=Fragile(), design=ScenarioDesign(extrapolation_fraction=0), n_scenarios=40
    )
    m = res.manifest
    assert (
        res.complete
        and 0 < m["counts"]["failed"] < 40
        and m["counts"]["failed"] == len(m["failures"])
    )
    assert all(f["reason"] and f["status"] != OK for f in m["failures"])
    raw = Dataset.open(res.path).load(include_failed=True)
    bad = raw["status"] != OK
    np.testing.assert_array_equal(np.flatnonzero(bad), sorted(f["index"] for f in m["failures"]))
    assert np.all(
        raw["p"][bad, 0] > 0.45
    )  # exactly the ones whose blow-up time falls inside the horizon
    assert np.isnan(raw["x"][bad]).all() and np.isfinite(raw["x"][~bad]).all()
    assert np.isfinite(Dataset.open(res.path).load()["x"]).all()  # the default view drops failures


def test_different_settings_in_the_same_dir_are_refused_unless_overwrite(tmp_path):
    first = _gen(tmp_path)
    with pytest.raises(ValueError, match="different settings; pass overwrite=true"):
        _gen(tmp_path, seed=9)
    assert (first.path / "manifest.json").exists() and Dataset.open(
        first.path
    ).sha256 == first.manifest["dataset_sha256"]
    again = _gen(tmp_path, seed=9, overwrite=True)
    assert again.complete and again.manifest["dataset_sha256"] != first.manifest["dataset_sha256"]


def test_foreign_and_unwritable_directories_are_refused(tmp_path):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no twin-ml dataset"):
        _gen(tmp_path, "foreign")
    assert sorted(os.listdir(tmp_path / "foreign")) == ["notes.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot be created"):
        _gen(tmp_path, "file/sub")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n_scenarios": 0}, "n_scenarios must be an integer > 0"),
        ({"shard_size": 0}, "shard_size must be"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_bad_arguments_write_nothing(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _gen(tmp_path, "x", **kw)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_system_generates_a_dataset(tmp_path, name):
    sys_ = make_system(name)
    t_end, dt = sys_.default_horizon
    res = generate_dataset(
        sys_,
        ScenarioDesign(t_end=20 * dt, dt=dt),
        n_scenarios=8,
        seed=0,
        out_dir=tmp_path / name,
        shard_size=4,
        progress=False,
    )
    assert res.complete and res.manifest["counts"]["failed"] == 0
    d = Dataset.open(res.path).load()
    # a field system keeps its whole state (every cell) at its snapshot stride, the probes at every
    # step; an ODE system its states at every step
    stride = getattr(sys_, "snapshot_stride", 1) if sys_.state_size != len(sys_.states) else 1
    assert d["x"].shape == (9, 20 // stride + 1, sys_.state_size)
    assert d["y"].shape == (9, 21, len(sys_.outputs)) and np.isfinite(d["y"]).all()
    assert np.ptp(d["x"], axis=1).max() > 0  # something moves


def test_resume_across_a_code_change_is_refused_unless_overwrite(tmp_path):
    full = _gen(tmp_path, "full")
    part = _gen(tmp_path, "part", max_new_shards=2)
    marker = part.path / ".generating.json"
    m = json.loads(marker.read_text())
    m["code_version"] = "0.0.1+gdeadbee"
    marker.write_text(json.dumps(m))
    (part.path / ".generating.json.x1y2.tmp").write_text("{")  # a marker write cut off by a kill
    with pytest.raises(ValueError, match="started by code version 0.0.1"):
        _gen(tmp_path, "part")
    restarted = _gen(tmp_path, "part", overwrite=True)
    assert (
        restarted.shards_reused == 0
        and restarted.manifest["dataset_sha256"] == full.manifest["dataset_sha256"]
    )
    assert not list(part.path.glob(".*.tmp"))


def test_a_corrupt_marker_or_manifest_is_a_clear_error(tmp_path):
    res = _gen(tmp_path)
    mf = res.path / "manifest.json"
    m = json.loads(mf.read_text())
    m["dataset_sha256"] = "0" * 64
    mf.write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="dataset_sha256 does not match the shard hashes"):
        Dataset.open(res.path)
    mf.write_text("{ not json")
    with pytest.raises(DatasetError, match="unreadable manifest"):
        Dataset.open(res.path)
    with pytest.raises(ValueError, match="unreadable JSON.*overwrite=true"):
        _gen(tmp_path)


def test_system_options_are_checked_and_normalized():
    from twin_ml._io import canonical_json
    from twin_ml.physics import make_system

    with pytest.raises(
        ValueError, match=r"unknown options \['overflw'\]; its options are \['h1_max'"
    ):
        make_system("cascaded_tanks", overflw=False)
    assert make_system("cascaded_tanks", h1_max=10).options == make_system("cascaded_tanks").options
    # an optional float option (`float | None`) given as an int records as the float too
    clipped = make_system("cascaded_tanks", sensor_max=10).options
    assert canonical_json(clipped) == canonical_json(
        make_system("cascaded_tanks", sensor_max=10.0).options
    )
    assert isinstance(clipped["sensor_max"], float)
    assert make_system("cstr").options == {}
