"""Your own data, end to end, as the README's "Bring your own data" walks through it.

A user's project directory outside the repository holds the system's module, `system/`,
`contract/` and `experiment/`, and a lab rig's CSV records: its own column names, the position
in counts of 0.125 m, the force in mN, float32 timestamps in seconds after a local start, an
ambient temperature in degF the model does not use and a column of notes. Every command runs as a
subprocess from that directory, the way a user runs them:

1. `twin-ingest` reads each record through the contract alone (no script): every sample is kept
   and the values are the true ones in the model's units;
2. `twin-train --config-dir .` trains the user's experiment on the ingested files;
3. `twin-calibrate backend=solver system=...` fits the spring and damping constants to the
   ingested record with the solver alone (no exported model anywhere), and recovers the values
   the records were simulated with.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_telemetry_training import OSCILLATOR

BIN = Path(sys.executable).parent
K, C = 4.0, 0.8  # the rig's true spring and damping constants
X0 = (0.3, 0.0)
N, DT = 240, 0.1
QSC = 0.125  # metres per count of the position sensor
SIGMA_M = 0.004  # position noise [m]

CONTRACT = """\
system: my_osc
period_s: 0.1
timestamp: {column: t_rel, unit: s, epoch: "2024-05-02T08:00:00+02:00"}
unit_aliases: {qsc: "0.125 m"}
signals:
  - {name: force, role: input, unit: N, column: F_act, source_unit: mN, interpolation: zoh}
  - {name: pos, role: output, unit: m, column: Pos_raw, source_unit: qsc}
  - {name: vel, role: output, unit: m/s, required: false}   # no velocity sensor on the rig
  - {name: t_amb, role: extra, unit: degC, column: T_amb, source_unit: degF}
"""

SYSTEM = "_target_: twin_ml.physics.make_system\nname: my_osc:Oscillator\n"

EXPERIMENT = """\
# @package _global_
defaults:
  - override /system: my_osc
  - override /model: hybrid
telemetry:
  dataset: null
  files: {est: ingested/est/telemetry.parquet, test: ingested/test/telemetry.parquet}
  contract: my_osc
  dt: 0.1
  train: [est]
  test: [test]
  derivatives: {vel: pos}
  window: 16
  consistency: 1.0
  state_lr: 4.0e-3
  iterations_per_epoch: 4
  init_samples: 10
  calibration_tail: 0.0
model:
  net: {hidden: 8, depth: 2}
ensemble: {size: 2}
trainer: {max_epochs: 1}
threads: 1
"""


def _run(root: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,  # the user's module imports from here; relative paths are the user's
        env={**os.environ, "BENTOML_HOME": str(root / "store")},
    )
    assert r.returncode == 0, f"{args[0]} failed:\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The user's directory with its two CSV records (solver-simulated, with position noise);
    returns (dir, {record: true position [m] at the samples})."""
    import importlib.util

    from twin_ml.physics import SolverSettings, solve_looped

    root = tmp_path_factory.mktemp("rig_project")
    (root / "my_osc.py").write_text(OSCILLATOR)
    for sub, name, text in (
        ("system", "my_osc.yaml", SYSTEM),
        ("contract", "my_osc.yaml", CONTRACT),
        ("experiment", "rig.yaml", EXPERIMENT),
    ):
        (root / sub).mkdir()
        (root / sub / name).write_text(text)
    spec = importlib.util.spec_from_file_location("my_osc_records", root / "my_osc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    truth = {}
    for name, seed in (("est", 0), ("test", 1)):
        rng = np.random.default_rng(seed)
        t = np.arange(N) * DT
        u = np.repeat(rng.uniform(-1.0, 1.0, N // 20), 20)[:, None]
        ref = solve_looped(
            module.Oscillator(),
            t,
            u[None],
            np.array([[K, C]]),
            np.array([X0]),
            SolverSettings(rtol=1e-10, atol=1e-12),
        )
        pos = ref.y[0][:, 0]
        truth[name] = pos
        noisy = pos + SIGMA_M * rng.standard_normal(N)
        # float32 timestamps a little after a start 1500 s into the logger's run, as the rig's
        # logger writes them
        stamps = (1500.0 + t).astype(np.float32)
        pd.DataFrame(
            {
                "t_rel": stamps,
                "F_act": u[:, 0] * 1e3,  # mN
                "Pos_raw": noisy / QSC,  # counts of 0.125 m
                "T_amb": np.full(N, 68.0),  # degF
                "notes": ["ok"] * N,
            }
        ).to_csv(root / f"{name}.csv", index=False)
    return root, truth


@pytest.fixture(scope="module")
def ingested(project):
    root, truth = project
    # the contract as a path, and by name from the user's config directory
    for name, contract in (
        ("est", ["contract=contract/my_osc.yaml"]),
        ("test", ["config_dir=.", "contract=my_osc"]),
    ):
        _run(root, "twin-ingest", f"source={name}.csv", *contract, f"out_dir=ingested/{name}")
    return root, truth


def test_a_foreign_csv_ingests_through_its_contract_alone(ingested):
    """Every one of the 240 float32-stamped samples is on the grid, in the model's units: the
    position is counts x 0.125 m, the force N, the ambient 68 degF exactly 20 degC; the grid
    starts at the contract's epoch + 1500 s."""
    root, truth = ingested
    for name in truth:
        df = pd.read_parquet(root / "ingested" / name / "telemetry.parquet")
        assert len(df) == N
        assert df["pos.valid"].all() and df["force.valid"].all() and df["t_amb.valid"].all()
        raw = pd.read_csv(root / f"{name}.csv")
        # the CSV's text holds the float64 values; the conversion multiplies by exactly 1/8
        np.testing.assert_allclose(
            df["pos [m]"], raw["Pos_raw"] * QSC, rtol=4 * np.finfo(np.float64).eps
        )
        np.testing.assert_allclose(
            df["force [N]"], raw["F_act"] / 1e3, rtol=4 * np.finfo(np.float64).eps
        )
        assert (df["t_amb [degC]"] == 20.0).all()
        start = pd.Timestamp("2024-05-02T06:00:00Z") + pd.Timedelta(seconds=1500)
        assert df["timestamp"].iloc[0] == start
        quality = json.loads((root / "ingested" / name / "quality.json").read_text())
        assert "notes" in json.dumps(quality)  # the notes column is reported as ignored


def test_trains_on_the_ingested_records_from_a_config_dir_outside_the_repo(ingested):
    """twin-train --config-dir . with the user's experiment on the ingested files: metrics for the
    measured position (finite, strict JSON), null for the velocity the rig does not measure."""
    root, _ = ingested
    out = root / "runs" / "rig"
    _run(root, "twin-train", "--config-dir", ".", "experiment=rig", f"out_dir={out}", "logger=none")

    def refuse(constant):
        raise ValueError(f"metrics.json holds {constant}")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["test/test/points"] == N
    assert 0.0 <= metrics["test/test/coverage_90_pos"] <= 1.0
    assert math.isfinite(metrics["test/test/rmse_pos"])
    assert metrics["test/test/rmse_vel"] is None
    assert (out / "model" / "model.json").is_file()


def test_calibrates_from_the_ingested_record_with_the_solver_and_no_model(ingested):
    """twin-calibrate backend=solver system=my_osc:Oscillator on the ingested directory, the
    velocity unmeasured and the noise estimated: k and c within 4 of their standard errors of the
    values the record was simulated with, and the noise within its own sampling error.

    solver_mode=stacked: each call's candidates (a start's point and its finite-difference steps)
    in one vectorized solve of the user's system, rather than one solve_ivp each (the default,
    run by test_calibrate.py's twin-calibrate backend=solver): the same estimates (measured: to
    1e-8 relative) in under a third of the solver time here (1.5 s against 6.5 s)."""
    root, _ = ingested
    r = _run(
        root,
        "twin-calibrate",
        "backend=solver",
        "system=my_osc:Oscillator",
        "observations=ingested/est",
        "fit=k,c",
        f"initial_state=pos:{X0[0]},vel:{X0[1]}",
        "out_dir=cal",
        "starts=2",
        "solver_mode=stacked",
    )
    path = root / r.stdout.strip().splitlines()[-1]  # printed relative to where it ran
    assert path.resolve() == (root / "cal" / "calibration.json").resolve()
    result = json.loads(path.read_text())
    assert result["backend"] == "solver" and result["model"] is None
    for name, value in (("k", K), ("c", C)):
        err = abs(result["estimate"][name] - value)
        assert err <= 4 * result["std_error"][name], (name, result["estimate"], result["std_error"])
    assert result["noise"]["pos"] == pytest.approx(SIGMA_M, rel=4 / math.sqrt(2 * N))
    assert (root / "cal" / "calibration.png").is_file()
