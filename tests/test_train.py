"""twin-train end to end on tiny configs: contract, resume, checkpoints, loggers, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_here
from omegaconf import OmegaConf

BIN = Path(sys.executable).parent / "twin-train"
TINY = [
    "ensemble.size=2",
    "trainer.max_epochs=4",
    "data.batch_size=8",
    "model.net.hidden=16",
    "model.optim.curriculum_start=5",
    "model.optim.curriculum_every=1",
    "speed_scenarios=4",
]


def run(*args, env=None):
    e = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=600, env=e)


def error_here(*overrides) -> str:
    """The message twin-train would print for these overrides (the cause hydra wraps, as `fail`
    shows it)."""
    with pytest.raises(Exception) as info:
        train_here(*overrides)
    err = info.value
    while err.__cause__ is not None and type(err).__name__ == "InstantiationException":
        err = err.__cause__
    assert isinstance(err, (ValueError, KeyError)), repr(err)
    return err.args[0] if isinstance(err, KeyError) else str(err)


# Each logger's test reads the run of a command another test starts anyway (each start of
# twin-train costs ~6 s of imports): wandb's the node's below, csv's the emulator's.
OFFLINE = {"WANDB_API_KEY": "", "NO_PROXY": "*"}


@pytest.fixture(scope="module")
def node_run(pendulum_data, tmp_path_factory):
    """(run_dir, completed process): twin-train experiment=pendulum_node, 2 members for 3 epochs,
    seed 1, logged to wandb offline. Shared by the module's tests: copy it before changing any
    of its files."""
    out = tmp_path_factory.mktemp("node") / "run"
    r = run(
        "experiment=pendulum_node",
        f"data_dir={pendulum_data}",
        f"out_dir={out}",
        "ensemble.size=2",
        "trainer.max_epochs=3",
        "logger=wandb",
        "seed=1",
        *TINY[2:],
        env=OFFLINE,
    )
    return out, r


def test_contract_trains_and_writes_metrics_with_coverage(node_run, tmp_path):
    out, r = node_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip().splitlines()[-1]) == out / "summary.json"
    m = json.loads((out / "metrics.json").read_text())
    for split in ("test", "extrapolation"):
        assert 0.0 <= m[f"{split}/coverage_90"] <= 1.0 and m[f"{split}/rel_l2_median"] > 0
    assert {
        "test/coverage_50",
        "test/coverage_95",
        "test/nll",
        "test/crps",
        "test/width_90",
    } <= set(m)
    assert m["detail"]["speed"]["speedup_vs_looped"] > 0
    for f in (
        "report.html",
        "trajectories.png",
        "parity.png",
        "calibration.png",
        "error_vs_horizon.png",
        "config.yaml",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "model/model.pt",
        "model/model.json",
    ):
        assert (out / f).exists(), f
    # checkpoints and weights hold no pickled objects
    ck = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["twin_model_config"]["kind"] == "node" and ck["twin_model_config"]["members"] == 2
    from twin_ml.models import model_from_config

    meta = json.loads((out / "model" / "model.json").read_text())
    model = model_from_config(meta["config"])
    model.load_state_dict(torch.load(out / "model" / "model.pt", weights_only=True))
    assert model.conformal_scale.tolist() == pytest.approx(meta["conformal_scale"])
    # twin-evaluate reproduces the run's own evaluation, and refuses modified weights: its config
    # and run in this process, as `train_here` (the model rebuilt from the run's files, which the
    # command above wrote; the command's own start, summary and exit status: test_own_system.py's
    # twin-evaluate)
    from hydra import compose, initialize_config_dir

    from training._common import CONFIG_DIR
    from training.evaluate import evaluate

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        evaluate(compose(config_name="evaluate", overrides=[f"run_dir={out}"]))
    em = json.loads((out / "evaluation" / "metrics.json").read_text())
    for k in ("test/rel_l2_median", "test/coverage_90", "extrapolation/crps"):
        assert em[k] == pytest.approx(m[k], rel=1e-6), k
    out = Path(shutil.copytree(out, tmp_path / "run"))  # the module's run stays as it was
    w = out / "model" / "model.pt"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 does not match model.json"):
        evaluate(
            OmegaConf.create(
                {
                    "run_dir": str(out),
                    "data_dir": None,
                    "out_dir": str(out / "ev2"),
                    "speed_scenarios": 4,
                }
            )
        )


RESUME = ["experiment=pendulum_hybrid", "logger=none", *TINY, "trainer.max_epochs=6"]
# the same computation on the same machine, resumed or not; only a reduction's order can differ
# (thread counts), float32 round-off (~1e-7) grown over a few dozen optimizer steps: 1e-5 leaves
# room
SAME_RUN = {"rel": 1e-5, "abs": 1e-7}
# continuous metrics: a coverage moves in steps of one point and would flip on the last bit
RESUME_METRICS = ("val/rel_l2_median", "test/rel_l2_median", "test/nll", "extrapolation/nll")


@pytest.fixture(scope="module")
def uninterrupted(pendulum_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    flat, _ = train_here(*RESUME, f"data_dir={pendulum_data}", f"out_dir={out}")
    return flat


def test_resumed_run_reaches_the_same_metrics(pendulum_data, uninterrupted, tmp_path):
    """Stopped cleanly after 2 epochs, then resume=true: twin-train's config and run in this
    process, both (`train_here`); the command resuming in a process of its own, after a SIGKILL,
    is the next test's."""
    common = [*RESUME, f"data_dir={pendulum_data}", f"out_dir={tmp_path / 'part'}"]
    train_here(*common, "stop_after_epochs=2")
    assert (
        not (tmp_path / "part" / "metrics.json").exists()
        and (tmp_path / "part" / "checkpoints" / "last.ckpt").exists()
    )
    train_here(*common, "resume=true")
    b = json.loads((tmp_path / "part" / "metrics.json").read_text())
    for k in RESUME_METRICS:
        assert b[k] == pytest.approx(uninterrupted[k], **SAME_RUN), k


def test_run_killed_mid_epoch_resumes_to_the_same_metrics(pendulum_data, uninterrupted, tmp_path):
    """SIGKILL (no clean-up) half-way through the epoch after the first checkpoint: every checkpoint
    on disk loads whole, and resume=true finishes with the uninterrupted run's metrics."""
    import signal
    import time

    out = tmp_path / "killed"
    epoch_s = uninterrupted["train/fit_seconds"] / uninterrupted["train/epochs"]
    proc = subprocess.Popen(
        [str(BIN), *RESUME, f"data_dir={pendulum_data}", f"out_dir={out}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.5 * epoch_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert not (out / "metrics.json").exists()
    for ckpt in (out / "checkpoints").glob("*.ckpt"):  # whole: they load, without pickled objects
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["epoch"] < 6, ckpt
    resumed = run(*RESUME, f"data_dir={pendulum_data}", f"out_dir={out}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from last.ckpt" in resumed.stdout + resumed.stderr
    assert not list((out / "checkpoints").glob(".*.tmp"))
    b = json.loads((out / "metrics.json").read_text())
    for k in RESUME_METRICS:
        assert b[k] == pytest.approx(uninterrupted[k], **SAME_RUN), k


@pytest.fixture(scope="module")
def emulator_run(tmp_path_factory):
    """(data_dir, run_dir, completed process): 24 pendulum scenarios of 2 s at dt 0.1 with half as
    many calibration scenarios (12), and twin-train experiment=pendulum_emulator on them, logged
    to csv."""
    from twin_ml.data import ScenarioDesign, generate_dataset
    from twin_ml.physics import make_system

    root = tmp_path_factory.mktemp("emulator")
    data, out = root / "data", root / "e"
    design = ScenarioDesign(t_end=2.0, dt=0.1, calibration_fraction=0.5)
    generate_dataset(make_system("pendulum"), design, n_scenarios=24, seed=0, out_dir=data)
    no_curriculum = [a for a in TINY if "curriculum" not in a]  # no rollout windows
    r = run(
        "experiment=pendulum_emulator",
        f"data_dir={data}",
        f"out_dir={out}",
        "logger=csv",
        *no_curriculum,
        env=OFFLINE,
    )
    return data, out, r


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_loggers_work_offline(request, logger):
    """csv: the emulator's run (`emulator_run`); wandb, offline with no account: the node's
    (`node_run`)."""
    if logger == "csv":
        _, out, r = request.getfixturevalue("emulator_run")
    else:
        out, r = request.getfixturevalue("node_run")
    assert r.returncode == 0, r.stderr[-3000:]
    if logger == "csv":
        assert list(out.glob("csv/version_0/metrics.csv"))
    else:
        assert list(out.glob("wandb/offline-run-*"))


def test_emulator_trains_and_calibrates_on_the_calibration_split(emulator_run):
    """The emulator trains; a dataset with calibration scenarios calibrates on them, not on val;
    the record says so and how precisely; 12 scenarios are too few, and the command says that
    with what to change."""
    import numpy as np

    from twin_ml.data.torch_data import ScenarioDataModule
    from twin_ml.evaluate.evaluate import predict_numpy
    from twin_ml.models import load_trained
    from twin_ml.uq import conformal_scale

    data, out, r = emulator_run
    assert r.returncode == 0, r.stderr[-3000:]
    detail = json.loads((out / "metrics.json").read_text())["detail"]
    assert detail["train"]["members"] == 2
    cal = detail["calibration"]
    assert cal["split"] == "calibration" and cal["n_scenarios"] == 12
    assert cal["coverage_90_sd"] > 0.015
    needed = int(np.ceil(12 * (cal["coverage_90_sd"] / 0.01) ** 2))
    assert "calibrated on 12 calibration scenarios" in r.stderr
    assert f"about {needed} calibration scenarios would fix it to +-0.02" in r.stderr
    # the oracle: the scale recomputed from the trained ensemble's raw std on each split
    model, meta = load_trained(out / "model")
    dm = ScenarioDataModule(str(data), model.system, seed=0)
    model.conformal_scale.fill_(1.0)

    def scale_on(split):
        d = dm.numpy(split)
        return conformal_scale(d["y"], *predict_numpy(model, d, dm.t_grid), 0.9)

    # float32 predictions: the picked residual ratio agrees to a few float32 ulps
    eps = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(meta["conformal_scale"], scale_on("calibration"), rtol=64 * eps)
    assert not np.allclose(meta["conformal_scale"], scale_on("val"), rtol=64 * eps)


def test_bad_input_is_one_line_from_the_command(pendulum_data, tmp_path):
    """The command's own path: an unknown config group choice (checked before Hydra), and an error
    raised inside the run, each one line on stderr with exit status 2."""
    r = run(
        f"data_dir={pendulum_data}",
        f"out_dir={tmp_path / 'x'}",
        "logger=none",
        "experiment=pendulm_node",
    )
    assert r.returncode == 2 and r.stderr.startswith(
        "error: experiment='pendulm_node' is unknown; known experiment configs: "
    ), r.stderr[-2000:]
    assert "pendulum_node" in r.stderr.splitlines()[0], r.stderr[-2000:]
    r = run(
        f"data_dir={pendulum_data}", f"out_dir={tmp_path / 'x'}", "logger=none", "data.horizon=500"
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert (
        r.stderr.strip().splitlines()[-1]
        == "error: data.horizon (500 steps) must be in [1, 20]: the data has 21 time points"
    )
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["experiment=cascaded_tanks_hybrid"], "was made for system pendulum"),
        (["data.horizon=500"], "data.horizon (500 steps) must be in [1, 20]"),
        (
            ["+model.net.learn_parameters=[dampng]", "model=hybrid"],
            "model.learn_parameters: unknown ['dampng']",
        ),
    ],
)
def test_bad_input_fails_before_training(pendulum_data, tmp_path, args, message):
    assert message in error_here(
        f"data_dir={pendulum_data}", f"out_dir={tmp_path / 'x'}", "logger=none", *args
    )
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_missing_data_dir_and_nan_in_data(pendulum_data, tmp_path):
    assert "does not exist; make it with twin-generate" in error_here(
        f"data_dir={tmp_path / 'nope'}", f"out_dir={tmp_path / 'x'}", "logger=none"
    )
    # a dataset whose kept scenarios hold NaN (re-hashed so only the NaN check can catch it)
    import shutil

    import numpy as np

    from twin_ml._io import npz_bytes, sha256_file
    from twin_ml.data.generate import dataset_sha256

    bad = tmp_path / "bad"
    shutil.copytree(pendulum_data, bad)
    m = json.loads((bad / "manifest.json").read_text())
    f = bad / m["shards"][0]["file"]
    z = dict(np.load(f, allow_pickle=False))
    z["x"][1, 3, 0] = np.nan
    f.write_bytes(npz_bytes(z))
    m["shards"][0]["sha256"] = sha256_file(f)
    m["dataset_sha256"] = dataset_sha256(m["settings_sha256"], [s["sha256"] for s in m["shards"]])
    (bad / "manifest.json").write_text(json.dumps(m))
    message = error_here(f"data_dir={bad}", f"out_dir={tmp_path / 'y'}", "logger=none")
    assert "NaN or inf in" in message and f"[{int(z['index'][1])}]" in message


def test_optuna_sweep_returns_the_optimized_metric(pendulum_data, tmp_path):
    import yaml

    r = run(
        "-m",
        "hparams_search=pendulum_node_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"data_dir={pendulum_data}",
        f"paths.root_dir={tmp_path}",
        "logger=none",
        *TINY[:4],
        "trainer.max_epochs=1",
        "speed_scenarios=2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    trials = sorted((tmp_path / "multirun" / "pendulum-optuna").glob("*/metrics.json"))
    assert len(trials) == 2  # one run directory per trial
    values = [json.loads(p.read_text())["val/rel_l2_median"] for p in trials]
    (result,) = list((tmp_path / "multirun").glob("*/optimization_results.yaml"))
    assert yaml.safe_load(result.read_text())["best_value"] == pytest.approx(min(values), rel=1e-6)


def test_a_diverged_training_names_its_cause(tmp_path):
    """A stiff CSTR near ignition (the reaction's rate ~1e3/min at the hot end) blows up the
    hybrid's explicit RK4 physics step at the data step: the run ends with one line that says
    training diverged and what to change, instead of a crash on writing NaN metrics."""
    from twin_ml.data import ScenarioDesign, generate_dataset
    from twin_ml.physics import make_system

    data = tmp_path / "cstr"
    generate_dataset(
        make_system("cstr"),
        ScenarioDesign(regime="ignition", t_end=2.0, dt=0.05),
        n_scenarios=12,
        seed=0,
        out_dir=data,
        progress=False,
    )
    r = run(
        "system=cstr",
        "model=hybrid",
        f"data_dir={data}",
        f"out_dir={tmp_path / 'run'}",
        "logger=none",
        "trainer.max_epochs=2",
        "ensemble.size=2",
        "threads=1",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: val/loss is nan"), last
    assert "model=flowmap" in last and "model.net.step_fraction" in last, last
    assert not (tmp_path / "run" / "metrics.json").exists()
