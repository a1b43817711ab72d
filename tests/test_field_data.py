"""Datasets of field systems: the fields at a snapshot stride (float32), probes at every step;
ordinary systems' datasets as they were."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twin_ml._io import canonical_json, sha256_bytes
from twin_ml.data import Dataset, ScenarioDesign, generate_dataset
from twin_ml.physics import (
    Derived,
    Field,
    FieldSystem,
    Input,
    Parameter,
    Probe,
    SolverSettings,
    State,
    make_system,
    solve_looped,
)


class HeatedRod(FieldSystem):
    """A rod heated through its west end (held at the input's temperature), its east end
    insulated: 12 cells, 20 steps, fields every 5th (module level: the CLI imports it by path and
    the worker processes pickle it by reference)."""

    fields = (Field("T", "degC", bounds=(20.0, 100.0)),)
    states = (State("T0", "degC", bounds=(20.0, 40.0)),)
    inputs = (Input("T_west", "degC", bounds=(40.0, 90.0)),)
    parameters = (Parameter("alpha", "m^2/s", nominal=0.01, bounds=(0.005, 0.02)),)
    probes = (Probe("tc_mid", "T", (0.5,)), Probe("tc_east", "T", (0.95,)))
    derived = (Derived("T_max", "T", "max"), Derived("T_mean", "T", "mean"))
    extent, default_shape = (1.0,), (12,)
    default_horizon = (2.0, 0.1)
    snapshot_stride = 5

    def initial_state(self, x0):
        return self.uniform(x0[..., 0:1])

    def rhs(self, t, x, u, p):
        return p[..., 0:1] * self.grid.laplacian(x, {"west": ("dirichlet", u[..., 0:1])})


DESIGN = ScenarioDesign(extrapolation_fraction=0.0)
N, T, CELLS = 10, 21, 12
ROOT = Path(__file__).resolve().parent.parent


def _gen(tmp_path, name="run", system=None, **kw):
    kw = {"n_scenarios": N, "seed": 0, "shard_size": 4, "progress": False, **kw}
    return generate_dataset(system or HeatedRod(), DESIGN, out_dir=tmp_path / name, **kw)


@pytest.fixture(scope="module")
def rod_data(tmp_path_factory):
    return _gen(tmp_path_factory.mktemp("rod"))


def test_fields_at_the_stride_probes_at_every_step(rod_data):
    m = rod_data.manifest
    assert rod_data.complete and m["counts"]["failed"] == 0
    assert m["snapshot_stride"] == 5
    assert m["shapes"] == {
        "n_scenarios": N,
        "n_times": T,
        "nx": 1,
        "nu": 1,
        "ny": 4,
        "np": 1,
        "n_snapshots": 5,
        "state_size": CELLS,
    }
    ds = Dataset.open(rod_data.path)
    assert ds.snapshot_stride == ds.card.snapshot_stride == 5
    d = ds.load()
    t = d["t"]
    np.testing.assert_array_equal(ds.snapshot_times(), t[::5])
    assert d["x"].shape == (N, 5, CELLS) and d["x"].dtype == np.float32
    assert d["x0"].shape == (N, 1) and d["x0"].dtype == np.float64  # the declared states
    assert d["y"].shape == (N, T, 4) and d["u"].shape == (N, T, 1) and d["y"].dtype == np.float64
    np.testing.assert_allclose(d["x"][:, 0], np.repeat(d["x0"], CELLS, axis=1), rtol=1e-7)

    # a direct solve of the same scenarios, states at the snapshot times only
    rod, settings = HeatedRod(), SolverSettings()
    ref = solve_looped(rod, t, d["u"], d["p"], d["x0"], settings, t_out=t[::5])
    scale = np.ptp(ref.x)
    np.testing.assert_allclose(d["x"], ref.x, rtol=0, atol=settings.rtol * scale)
    full = solve_looped(rod, t, d["u"], d["p"], d["x0"], settings)
    np.testing.assert_allclose(d["y"], full.y, rtol=0, atol=settings.rtol * np.ptp(full.y))
    # the stored fields and the stored probes tell the same story at the snapshots
    seen = rod.observe(d["x"].astype(np.float64), d["u"][:, ::5], d["p"][:, None, :])
    np.testing.assert_allclose(seen, d["y"][:, ::5], rtol=0, atol=1e-5 * np.ptp(d["y"]))
    assert np.ptp(d["x"], axis=1).max() > 1.0  # the fields move between snapshots


def test_stride_is_recorded_and_chosen(tmp_path, rod_data):
    every = _gen(tmp_path, "every", snapshot_stride=1)
    d = Dataset.open(every.path).load()
    assert every.manifest["snapshot_stride"] == 1 and d["x"].shape == (N, T, CELLS)
    coarse = Dataset.open(rod_data.path).load()
    np.testing.assert_array_equal(d["x"][:, ::5], coarse["x"])  # the same solve, subsampled
    np.testing.assert_array_equal(d["y"], coarse["y"])
    assert every.manifest["dataset_sha256"] != rod_data.manifest["dataset_sha256"]
    with pytest.raises(ValueError, match="different settings"):  # another stride, same dir
        _gen(tmp_path, "every", snapshot_stride=4)


@pytest.mark.parametrize("stride", [3, 0, -5, 2.5, True, 40])
def test_a_stride_that_does_not_divide_the_horizon_is_refused(tmp_path, stride):
    with pytest.raises(ValueError, match=r"snapshot_stride .*20 grid intervals") as e:
        _gen(tmp_path, "x", snapshot_stride=stride)
    assert "valid: 1, 2, 4, 5, 10, 20" in str(e.value)
    assert not (tmp_path / "x").exists()


def test_the_systems_own_stride_must_divide_the_horizon_too(tmp_path):
    design = ScenarioDesign(t_end=2.1, dt=0.1)  # 21 intervals: 5 does not divide them
    with pytest.raises(ValueError, match=r"21 grid intervals.*got 5 \(the system's default"):
        generate_dataset(HeatedRod(), design, n_scenarios=2, seed=0, out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, rod_data):
    part = _gen(tmp_path, "part", max_new_shards=1)
    assert not part.complete and part.shards_written == 1
    resumed = _gen(tmp_path, "part")
    assert resumed.complete and resumed.shards_reused == 1 and resumed.shards_written == 2
    assert resumed.manifest["dataset_sha256"] == rod_data.manifest["dataset_sha256"]
    two = _gen(tmp_path, "two", workers=2)  # shards solved in other processes: the same bytes
    assert two.manifest["dataset_sha256"] == rod_data.manifest["dataset_sha256"]


def test_ordinary_systems_settings_and_shards_are_as_before(tmp_path):
    part = generate_dataset(
        make_system("pendulum"),
        ScenarioDesign(t_end=1.0, dt=0.1),
        n_scenarios=6,
        seed=0,
        shard_size=4,
        out_dir=tmp_path / "p",
        progress=False,
        max_new_shards=1,
        snapshot_stride=1,  # the same as null for an ordinary system
    )
    marker = json.loads((part.path / ".generating.json").read_text())
    settings = {k: v for k, v in marker.items() if k not in ("settings_sha256", "code_version")}
    assert set(settings) == {
        "format",
        "system",
        "design",
        "box",
        "signals",
        "time",
        "solver",
        "n_scenarios",
        "seed",
        "shard_size",
    }
    assert marker["settings_sha256"] == sha256_bytes(canonical_json(settings).encode())
    res = generate_dataset(
        make_system("pendulum"),
        ScenarioDesign(t_end=1.0, dt=0.1),
        n_scenarios=6,
        seed=0,
        shard_size=4,
        out_dir=tmp_path / "p",
        progress=False,
    )
    assert res.complete and res.shards_reused == 1
    m = res.manifest
    assert "snapshot_stride" not in m and set(m["shapes"]) == {"n_scenarios", "n_times"} | {
        "nx",
        "nu",
        "ny",
        "np",
    }
    ds = Dataset.open(res.path)
    assert ds.snapshot_stride == 1 and np.array_equal(ds.snapshot_times(), ds.times())
    x = ds.load()["x"]
    assert x.dtype == np.float64 and x.shape == (7, 11, 2)
    with pytest.raises(ValueError, match="snapshot_stride applies to field systems only"):
        generate_dataset(
            make_system("pendulum"),
            ScenarioDesign(t_end=1.0, dt=0.1),
            n_scenarios=6,
            seed=0,
            out_dir=tmp_path / "q",
            snapshot_stride=2,
        )


def test_twin_generate_takes_snapshot_stride(tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    args = [
        str(Path(sys.executable).parent / "twin-generate"),
        f"system.name={__name__}:HeatedRod",
        "~system.damped",
        "n_scenarios=4",
        "progress=false",
    ]
    r = subprocess.run(
        [*args, f"out_dir={out}", "snapshot_stride=4"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text())
    assert summary["shape"]["n_snapshots"] == 6 and summary["shape"]["state_size"] == CELLS
    assert Dataset.open(out).card.snapshot_stride == 4
    r = subprocess.run(
        [*args, "snapshot_stride=3", f"out_dir={tmp_path / 'bad'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 2 and not (tmp_path / "bad").exists()
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: snapshot_stride must be") and "20 grid intervals" in err[-1]
