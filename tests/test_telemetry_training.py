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


def test_calibration_tail_is_held_out_of_training_and_sets_the_scale(tmp_path):
    """telemetry.calibration_tail=0.25: the estimation record's last quarter trains nothing (a copy
    whose tail reads 1 V lower gives bit-identical weights), while the conformal scale, fitted on
    it, grows with the tail's error. A fraction outside [0, 0.5] is refused by name."""
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
    write_telemetry(frames["test"], tmp_path / "test.parquet")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "store")}
    runs = {}
    for name, frame in (("clean", est), ("lowered", lowered)):
        write_telemetry(frame, tmp_path / f"{name}.parquet")
        out = tmp_path / name
        r = subprocess.run(
            [
                str(BIN / "twin-train"),
                "experiment=cascaded_tanks_real",
                f"out_dir={out}",
                "logger=none",
                "telemetry.dataset=null",
                f"telemetry.files={{estimation: '{tmp_path / f'{name}.parquet'}', "
                f"test: '{tmp_path / 'test.parquet'}'}}",
                "telemetry.calibration_tail=0.25",
                "ensemble.size=2",
                "trainer.max_epochs=1",
                "telemetry.iterations_per_epoch=4",
                "telemetry.window=16",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = torch.load(out / "model" / "model.pt", map_location="cpu", weights_only=True)
    assert tail.sum() == 256
    clean, lowered = (runs[k].pop("conformal_scale") for k in ("clean", "lowered"))
    assert runs["clean"].keys() == runs["lowered"].keys()
    for key, value in runs["clean"].items():  # every trained weight, bit for bit
        assert torch.equal(value, runs["lowered"][key]), key
    assert float(lowered.min()) > float(
        clean.max()
    )  # the tail's 1 V errors widen the bands fitted on it
    r = subprocess.run(
        [
            str(BIN / "twin-train"),
            "experiment=cascaded_tanks_real",
            f"out_dir={tmp_path / 'bad'}",
            "logger=none",
            "telemetry.calibration_tail=0.7",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert (
        r.returncode == 2
        and "telemetry.calibration_tail must be a fraction in [0, 0.5], got 0.7" in r.stderr
    )
    # a tail the contract masks (readings over the sensor's 10 V range) leaves nothing to
    # calibrate on
    unreadable = est.copy()
    unreadable.loc[tail, "value"] = 12.0
    write_telemetry(unreadable, tmp_path / "unreadable.parquet")
    r = subprocess.run(
        [
            str(BIN / "twin-train"),
            "experiment=cascaded_tanks_real",
            f"out_dir={tmp_path / 'bad2'}",
            "logger=none",
            "telemetry.dataset=null",
            f"telemetry.files={{estimation: '{tmp_path / 'unreadable.parquet'}', "
            f"test: '{tmp_path / 'test.parquet'}'}}",
            "telemetry.calibration_tail=0.2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert (
        r.returncode == 2
        and "holds out 205 samples with [0] measured points per output" in r.stderr
    ), r.stderr
