"""Training on telemetry: the multiple-shooting loss and the free-run evaluation against the
solver (an untrained hybrid is exactly its physics), and experiment=cascaded_tanks_real end to end
(shortened) with the benchmark's metric in metrics.json."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_here

from twin_ml.evaluate.telemetry import free_run, initial_state, record_metrics
from twin_ml.models import build_model, compute_stats
from twin_ml.models.module import TelemetryModule
from twin_ml.physics import SolverSettings, make_system, solve_looped

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def record():
    """A tanks record from the solver: a held pump signal, 200 steps of 4 s, h1 hidden."""
    system = make_system("cascaded_tanks", sensor_max=10.0)
    t = np.arange(200) * 4.0
    rng = np.random.default_rng(0)
    u = np.repeat(rng.uniform(2.0, 6.0, 200 // 25), 25)[:, None]
    p = np.array([q.nominal for q in system.parameters])
    x0 = np.array([5.3, 4.1])
    ref = solve_looped(
        system, t, u[None], p[None], x0[None], SolverSettings(rtol=1e-10, atol=1e-12)
    )
    return system, t, u, p, ref.x[0], ref.y[0]


def test_shooting_loss_vanishes_on_the_true_states_and_physics(record):
    system, t, u, p, x, y = record
    stats = compute_stats(x[None], u[None], p[None], y[None], t)
    model = build_model(
        "hybrid", system, stats, members=2, step_fraction=0.25
    )  # residual starts at 0
    module = TelemetryModule(model, init_states=x[None], window=16, nll_weight=0.0)
    module._t = lambda: torch.tensor(t, dtype=torch.float32)
    batch = {
        "u": torch.tensor(u[None], dtype=torch.float32),
        "p": torch.tensor(p[None], dtype=torch.float32),
        "y": torch.tensor(y[None], dtype=torch.float32),
        "mask": torch.ones(1, len(t), 1, dtype=torch.bool),
    }
    module.log = lambda *a, **k: None
    with torch.no_grad():
        exact = float(module.record_loss(batch, offset=3))
    assert exact < 1e-6
    with torch.no_grad():  # a wrong hidden state in the table shows up in the loss
        module.states[:, 0, :, 0] += 1.0
        assert float(module.record_loss(batch, offset=3)) > 1e3 * max(exact, 1e-9)


def test_block_bootstrap_weights_each_member_by_whole_windows(record):
    """bootstrap=true: per member, Poisson(1) counts per block of `window` samples, fixed by the
    seed (the same module twice gives the same weights), different between members; off: all 1.
    The loss is the weighted mean of the masked squared errors."""
    system, t, u, p, x, y = record
    stats = compute_stats(x[None], u[None], p[None], y[None], t)
    model = build_model("hybrid", system, stats, members=3)
    a = TelemetryModule(
        model, init_states=x[None], window=16, bootstrap=True, seed=4
    ).sample_weights
    b = TelemetryModule(
        model, init_states=x[None], window=16, bootstrap=True, seed=4
    ).sample_weights
    assert a.shape == (3, 1, len(t)) and torch.equal(a, b)
    blocks = a[:, 0, : 16 * (len(t) // 16)].reshape(3, -1, 16)
    assert torch.equal(blocks, blocks[:, :, :1].expand_as(blocks))  # constant within each block
    assert torch.equal(a, a.round()) and float(a.min()) >= 0.0 and not torch.equal(a[0], a[1])
    assert 0.6 < float(a.mean()) < 1.4  # Poisson(1): mean 1 (13 blocks x 3 members)
    off_module = TelemetryModule(model, init_states=x[None], window=16, nll_weight=0.0, seed=4)
    off = off_module.sample_weights
    assert torch.equal(off, torch.ones_like(off))
    # the loss uses them: a wrong hidden state makes it non-zero; uniform weights (any scale) leave
    # it as it is (it is a weighted mean), zero weights on the record's second half change it
    off_module._t = lambda: torch.tensor(t, dtype=torch.float32)
    off_module.log = lambda *a, **k: None
    batch = {
        "u": torch.tensor(u[None], dtype=torch.float32),
        "p": torch.tensor(p[None], dtype=torch.float32),
        "y": torch.tensor(y[None], dtype=torch.float32),
        "mask": torch.ones(1, len(t), 1, dtype=torch.bool),
    }
    with torch.no_grad():
        off_module.states[:, 0, :, 0] += 1.0
        plain = float(off_module.record_loss(batch, offset=0))
        off_module.sample_weights.fill_(3.0)
        # the same float32 losses, summed with other weights: a sum of len(t) terms rounds to
        # within len(t) * eps of the other
        tol = len(t) * float(np.finfo(np.float32).eps)
        assert float(off_module.record_loss(batch, offset=0)) == pytest.approx(plain, rel=tol)
        off_module.sample_weights[:, :, len(t) // 2 :] = 0.0
        assert abs(float(off_module.record_loss(batch, offset=0)) - plain) > 1e-3 * plain > 0


def test_free_run_with_estimated_initial_state_matches_the_solver(record):
    system, t, u, p, x, y = record
    stats = compute_stats(x[None], u[None], p[None], y[None], t)
    model = build_model("hybrid", system, stats, members=2, step_fraction=0.25).eval()
    args = [torch.tensor(a, dtype=torch.float32) for a in (u, p, y)]
    tt = torch.tensor(t, dtype=torch.float32)
    x0 = initial_state(
        model,
        args[0],
        args[1],
        args[2],
        torch.ones(len(t), 1, dtype=torch.bool),
        tt,
        init_samples=25,
        ranges=np.array([[0.0, 10.0], [0.0, 10.0]]),
        grid=201,
    )
    assert x0.shape == (2, 1, 2)
    np.testing.assert_allclose(
        x0[:, 0, 0].numpy(), 5.3, atol=0.05
    )  # the hidden h1(0), from 25 samples
    np.testing.assert_allclose(x0[:, 0, 1].numpy(), 4.1, atol=1e-6)  # h2 is measured
    pred = free_run(model, x0, args[0], args[1], tt)
    m = record_metrics(y, np.ones_like(y, dtype=bool), pred["mean"], pred["std"], ["h2"])
    assert m["rmse"] < 0.01 and m["rmse_h2"] == m["rmse"]


def test_cascaded_tanks_real_runs_and_reports_the_test_record_rmse(tmp_path):
    """The experiment, shortened (2 members, 4 steps): metrics.json carries the benchmark's
    metric."""
    out = tmp_path / "run"
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "store")}
    r = subprocess.run(
        [
            str(BIN / "twin-train"),
            "experiment=cascaded_tanks_real",
            f"out_dir={out}",
            "logger=none",
            "ensemble.size=2",
            "trainer.max_epochs=1",
            "telemetry.iterations_per_epoch=4",
            "telemetry.window=16",
            "model.net.hidden=8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # Lightning's lines print once, through Hydra's logging (its own handlers used to repeat them)
    assert r.stderr.count("GPU available") == 1 and "GPU available" not in r.stdout
    # no terminal here, so no progress bar: a progress line per epoch in the log (on stderr:
    # stdout holds only the summary path, for scripts) instead
    progress = [ln for ln in r.stderr.splitlines() if "epoch 1/" in ln]
    assert len(progress) == 1, r.stderr[-3000:]
    assert len(r.stdout.splitlines()) == 1 and r.stdout.strip().endswith("summary.json")
    assert re.search(
        r"epoch 1/1: train loss -?[\d.e+-]+, val loss [\d.e+-]+, "
        r"elapsed [\dhms.]+, left ~[\dhms.]+$",
        progress[0],
    ), progress[0]
    metrics = json.loads((out / "metrics.json").read_text())
    keys = [k for k in metrics if "test" in k and "rmse" in k]
    assert "test/rmse" in keys
    # 4 steps barely move the physics start, whose free run alone scores 0.295 V on the test record
    # (benchmarks/tanks_physics.py: least squares on the estimation record's first 80%; 0.628 V
    # without the linear inflow). The shortened run measured 0.289.
    assert 0.2 < metrics["test/rmse"] < 0.35
    assert 0.0 <= metrics["test/coverage_90"] <= 1.0
    detail = metrics["detail"]
    assert detail["quality"]["test"]["signals"]["h2"][
        "stuck_runs"
    ]  # the clipped runs were reported
    assert (out / "free_run_test.png").stat().st_size > 10_000
    summary = json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text())
    assert summary["headline"]["test/rmse"] == metrics["test/rmse"]


def test_windowed_run_carries_hidden_states_and_follows_the_solver(record):
    """Window by window (the monitor's predictions): with the exact physics, the hidden h1 carried
    across windows and h2 reset to its measurement, the prediction stays on the solver's record;
    a sensor bias from step 100 shows as residuals in the windows after it."""
    from twin_ml.evaluate.telemetry import windowed_run

    system, t, u, p, x, y = record
    model = build_model(
        "hybrid",
        system,
        compute_stats(x[None], u[None], p[None], y[None], t),
        members=2,
        step_fraction=0.25,
    ).eval()
    args = [torch.tensor(a, dtype=torch.float32) for a in (u, p, y)]
    tt, ok = torch.tensor(t, dtype=torch.float32), torch.ones(len(t), 1, dtype=torch.bool)
    ranges = np.array([[0.0, 10.0], [0.0, 10.0]])
    clean = windowed_run(model, *args, ok, tt, window=20, init_samples=25, ranges=ranges)
    assert np.max(np.abs(clean["mean"] - y)) < 0.02
    biased = y.copy()
    biased[100:] += 0.5
    run = windowed_run(
        model,
        args[0],
        args[1],
        torch.tensor(biased, dtype=torch.float32),
        ok,
        tt,
        window=20,
        init_samples=25,
        ranges=ranges,
    )
    before, after = np.abs(run["mean"] - biased)[:100], np.abs(run["mean"] - biased)[100:]
    assert before.max() < 0.02 and after.mean() > 0.1


@pytest.fixture
def in_process_training():
    """twin-train in this process (`train_here`) sets one torch thread and flushes denormals, as
    the command does; both are put back afterwards for the tests that follow on this worker."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def test_calibration_tail_is_held_out_of_training_and_sets_the_scale(tmp_path, in_process_training):
    """telemetry.calibration_tail=0.25: the estimation record's last quarter trains nothing (a copy
    whose tail reads 1 V lower gives bit-identical weights), while the conformal scale, fitted on
    it, grows with the tail's error. A fraction outside [0, 0.5] is refused by name.

    twin-train's own config and run, in this process (`train_here`: the command's one-line error
    and exit status 2 for a refused setting are tested by subprocess in test_train.py); the runs
    are seeded and single-threaded, as the command's are, so the weights can be compared bit for
    bit. The test record is only evaluated (nothing here reads its metrics), so its first 64
    samples stand for it: the initial state from its first 25 and a free run of 64 steps."""
    import pandas as pd

    from twin_ml.data import real
    from twin_ml.data.telemetry import write_telemetry

    root = Path(__file__).resolve().parent.parent
    frames = real.records(
        "cascaded_tanks", root / "data" / "real" / "cascaded_tanks" / "dataBenchmark.csv"
    )
    est = frames["estimation"]
    cut = est["timestamp"].min() + pd.Timedelta(seconds=0.75 * 1024 * 4.0)
    lowered = est.copy()
    tail = (lowered["signal"] == "h2") & (lowered["timestamp"] >= cut)
    lowered.loc[tail, "value"] -= 1.0
    test = frames["test"]
    test = test[test["timestamp"] < test["timestamp"].min() + pd.Timedelta(seconds=64 * 4.0)]
    write_telemetry(test, tmp_path / "test.parquet")

    def files(name):
        return (
            "telemetry.dataset=null",
            f"telemetry.files={{estimation: '{tmp_path / f'{name}.parquet'}', "
            f"test: '{tmp_path / 'test.parquet'}'}}",
        )

    runs = {}
    for name, frame in (("clean", est), ("lowered", lowered)):
        write_telemetry(frame, tmp_path / f"{name}.parquet")
        out = tmp_path / name
        train_here(
            "experiment=cascaded_tanks_real",
            f"out_dir={out}",
            "logger=none",
            *files(name),
            "telemetry.calibration_tail=0.25",
            "ensemble.size=2",
            "trainer.max_epochs=1",
            "telemetry.iterations_per_epoch=4",
            "telemetry.window=16",
        )
        runs[name] = torch.load(out / "model" / "model.pt", map_location="cpu", weights_only=True)
    assert tail.sum() == 256
    clean, lowered = (runs[k].pop("conformal_scale") for k in ("clean", "lowered"))
    assert runs["clean"].keys() == runs["lowered"].keys()
    for key, value in runs["clean"].items():  # every trained weight, bit for bit
        assert torch.equal(value, runs["lowered"][key]), key
    assert float(lowered.min()) > float(
        clean.max()
    )  # the tail's 1 V errors widen the bands fitted on it
    with pytest.raises(
        ValueError, match=r"telemetry.calibration_tail must be a fraction in \[0, 0.5\], got 0.7"
    ):
        train_here(
            "experiment=cascaded_tanks_real",
            f"out_dir={tmp_path / 'bad'}",
            "logger=none",
            "telemetry.calibration_tail=0.7",
        )
    # a tail the contract masks (readings over the sensor's 10 V range) leaves nothing to
    # calibrate on
    unreadable = est.copy()
    unreadable.loc[tail, "value"] = 12.0
    write_telemetry(unreadable, tmp_path / "unreadable.parquet")
    with pytest.raises(
        ValueError, match=r"holds out 205 samples with \[0\] measured points per output"
    ):
        train_here(
            "experiment=cascaded_tanks_real",
            f"out_dir={tmp_path / 'bad2'}",
            "logger=none",
            *files("unreadable"),
            "telemetry.calibration_tail=0.2",
        )


# ---- a user's project beside the clone: an oscillator whose velocity has no sensor -------------

OSCILLATOR = '''
from twin_ml.physics import Input, Output, Parameter, PhysicsSystem, State


class Oscillator(PhysicsSystem):
    """A damped linear oscillator; position and velocity are both outputs."""

    states = (State("pos", "m", bounds=(-1.0, 1.0)), State("vel", "m/s", bounds=(-2.0, 2.0)))
    inputs = (Input("force", "N", bounds=(-1.0, 1.0), interpolation="zoh"),)
    outputs = (Output("pos", "m"), Output("vel", "m/s"))
    parameters = (
        Parameter("k", "N/m", nominal=4.0, bounds=(2.0, 8.0)),
        Parameter("c", "N s/m", nominal=0.8, bounds=(0.2, 1.6)),
    )
    default_horizon = (4.0, 0.1)

    def rhs(self, t, x, u, p):
        xp = self.xp(x)
        pos, vel = x[..., 0], x[..., 1]
        return xp.stack([vel, u[..., 0] - p[..., 0] * pos - p[..., 1] * vel], axis=-1)
'''


def _strict_json(path: Path):
    """The file parsed by a strict JSON parser: NaN, Infinity and -Infinity are refused."""

    def refuse(constant):
        raise ValueError(f"{path.name} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def oscillator_project(tmp_path_factory):
    """A user's directory outside the repository: the system's module, system/, contract/ (the
    velocity's sensor optional, and absent from every record) and experiment/, and two records
    (CSV, position only) from the solver. twin-train runs the experiment from there with
    --config-dir, the contract found by name in the user's contract/. Returns (dir, run dir,
    completed process)."""
    import pandas as pd

    from twin_ml.physics import SolverSettings, solve_looped

    root = tmp_path_factory.mktemp("oscillator_project")
    (root / "my_osc.py").write_text(OSCILLATOR)
    for sub in ("system", "contract", "experiment"):
        (root / sub).mkdir()
    (root / "system" / "my_osc.yaml").write_text(
        "_target_: twin_ml.physics.make_system\nname: my_osc:Oscillator\n"
    )
    (root / "contract" / "my_osc.yaml").write_text(
        "system: my_osc\nperiod_s: 0.1\nsignals:\n"
        "  - {name: force, role: input, unit: N, interpolation: zoh}\n"
        "  - {name: pos, role: output, unit: m}\n"
        "  - {name: vel, role: output, unit: m/s, required: false}   # no sensor\n"
    )
    (root / "experiment" / "osc_tel.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /system: my_osc\n  - override /model: hybrid\n"
        "telemetry:\n  dataset: null\n  files: {est: est.csv, test: test.csv}\n"
        "  contract: my_osc\n  dt: 0.1\n  train: [est]\n  test: [test]\n"
        "  derivatives: {vel: pos}\n  window: 16\n  consistency: 1.0\n  state_lr: 4.0e-3\n"
        "  iterations_per_epoch: 4\n  init_samples: 10\n  calibration_tail: 0.0\n"
        "model:\n  net:\n    hidden: 8\n    depth: 2\n"
        "ensemble:\n  size: 2\ntrainer:\n  max_epochs: 1\nthreads: 1\n"
    )
    import importlib.util

    spec = importlib.util.spec_from_file_location("my_osc_records", root / "my_osc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    system = module.Oscillator()
    for name, seed in (("est", 0), ("test", 1)):
        rng = np.random.default_rng(seed)
        t = np.arange(240) * 0.1
        u = np.repeat(rng.uniform(-1.0, 1.0, 12), 20)[:, None]
        ref = solve_looped(
            system,
            t,
            u[None],
            np.array([[4.0, 0.8]]),
            np.array([[0.3, 0.0]]),
            SolverSettings(rtol=1e-9, atol=1e-11),
        )
        stamps = pd.Timestamp("2024-01-01T00:00:00Z") + pd.to_timedelta(t, unit="s")
        pd.DataFrame(
            {
                "timestamp": stamps.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "force [N]": u[:, 0],
                "pos [m]": ref.y[0][:, 0],
            }
        ).to_csv(root / f"{name}.csv", index=False)
    out = root / "runs" / "osc"
    r = subprocess.run(
        [
            str(BIN / "twin-train"),
            "--config-dir",
            str(root),
            "experiment=osc_tel",
            f"out_dir={out}",
            "logger=none",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,  # the user's module imports from here, the records' paths are relative to it
        env={**os.environ, "BENTOML_HOME": str(root / "store")},
    )
    return root, out, r


def test_an_output_without_measurements_is_null_with_a_note_and_never_nan(oscillator_project):
    """The experiment, system and contract from the user's --config-dir; vel is in no record:
    metrics.json (strict JSON) has finite RMSE, coverage_50/90/95, NLL and CRPS for pos, over its
    points alone, and null for vel with a note; the free-run plot labels vel "not measured"."""
    root, out, r = oscillator_project
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = _strict_json(out / "metrics.json")
    _strict_json(out / "model" / "model.json")
    summary = _strict_json(Path(r.stdout.strip().splitlines()[-1]))
    for rec in ("train/est", "test/test"):
        assert metrics[f"{rec}/rmse_vel"] is None and metrics[f"{rec}/coverage_90_vel"] is None
        assert 0.0 <= metrics[f"{rec}/coverage_90_pos"] <= 1.0
        assert metrics[f"{rec}/points"] == 240  # pos's points only
        detail = metrics["detail"][rec]
        pos, vel = detail["outputs"]["pos"], detail["outputs"]["vel"]
        for key in ("coverage_50", "coverage_90", "coverage_95", "nll", "crps", "rmse"):
            assert np.isfinite(pos[key]) and vel[key] is None, key
            assert detail[key] == pos[key]  # all measured points: pos's
        assert pos["points"] == 240 and vel["points"] == 0
        assert detail["notes"] == [vel["note"]] and "vel: not measured" in vel["note"]
    assert metrics["detail"]["notes"] == [
        f"{rec}: {metrics['detail'][rec]['outputs']['vel']['note']}"
        for rec in ("train/est", "test/test")
    ]
    assert np.isfinite(metrics["test/rmse"]) and 0.0 <= metrics["test/coverage_90"] <= 1.0
    assert summary["headline"]["test/coverage_90"] == metrics["test/coverage_90"]
    assert (out / "free_run_test.png").stat().st_size > 10_000


def test_twin_monitor_on_a_record_without_an_output(oscillator_project, tmp_path, monkeypatch):
    """twin-monitor replays a record that lacks vel against that model: vel is not monitored (a
    note in drift.json and summary.json, strict JSON, no NaN), pos is. A monitor that fails while
    writing leaves no output directory behind (nor the parents it made)."""
    import torch

    from training.monitor import DEFAULTS, run

    root, out, r = oscillator_project
    assert r.returncode == 0, r.stderr[-3000:]
    monkeypatch.chdir(root)  # the system's module (recorded as my_osc:Oscillator) imports from here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = {
            **DEFAULTS,
            "model": str(out),
            "source": str(root / "test.csv"),
            "window": "8",
            "reference_windows": "5",
            "out_dir": str(tmp_path / "monitor"),
        }
        summary = _strict_json(run(cfg))
        report = _strict_json(Path(summary["report"]))
        assert report["outputs"]["vel"]["monitored"] is False
        assert report["outputs"]["pos"]["monitored"] is True
        assert report["notes"] == summary["notes"] == [report["outputs"]["vel"]["note"]]
        assert report["reference"]["level_mean"][1] is None
        assert Path(summary["plot"]).stat().st_size > 10_000
        assert sorted(p.name for p in (tmp_path / "monitor").iterdir()) == [
            "drift.json",
            "drift.png",
            "summary.json",
        ]

        def broken(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("twin_ml.drift.plot_report", broken)
        with pytest.raises(OSError):
            run({**cfg, "out_dir": str(tmp_path / "new" / "monitor")})
        assert not (tmp_path / "new").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["monitor"]  # no staging left
    finally:
        torch.set_num_threads(threads)
