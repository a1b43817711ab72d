import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

# One intra-op thread in every test process and in every command a test starts (they inherit the
# environment): torch's OpenMP and OpenBLAS, read when they load, so before numpy and torch. The
# suite already runs TEST_WORKERS processes on as many cores, and its models' ops are tiny: a
# second thread per process only spins against the other worker's (a 3-member pendulum hybrid's
# twin-export: 38 s with two threads, 12 s with one, beside a second worker; the whole suite
# ~40% less CPU). As twin-train's `threads=1` says: 1 avoids oversubscription when runs share
# cores. Only a reduction's order changes, which every tolerance here already allows. A value
# set outside is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

ASSETS = Path(__file__).parent / "assets"
sys.path.insert(0, str(ASSETS))  # the user-defined example system (tests/assets/mass_spring.py)

# Tolerances follow from the dtype and the computation (they must hold on any x86-64 CPU, with or
# without AVX-512, and in `make test-portable`): a float32 result can differ in its last bits
# between batch sizes, kernels and CPUs, and those differences grow along a rollout.
EPS32 = float(np.finfo(np.float32).eps)


def rollout_tol(n_steps: int, scale: float, *, evals_per_step: int = 4) -> float:
    """How far two float32 runs of one rollout may drift apart (other kernel, batch size or graph):
    every step evaluates the vector field `evals_per_step` times (RK4: 4), each result a few ulps
    (4) off the other run's; along a flow that does not expand, the differences add up at most
    linearly over `n_steps`. `scale`: the size of the values compared (their max |.|, or 1 in
    normalized units)."""
    return 4.0 * evals_per_step * max(int(n_steps), 1) * EPS32 * max(float(scale), 1e-30)


SHIPPED = [
    "pendulum",
    "cascaded_tanks",
    "thermal_rc",
    "cstr",
    "robertson",
    "duffing",
    "heat_plate",
    "tubular_reactor",
]


def assert_close(got, want, tol: float, where: str = "") -> None:
    """JSON-like values (dicts, lists, numbers) equal, floats within tol relative to
    max(1, |want|): twins stepped in one larger float32 forecast batch (a fleet) against each
    stepped alone, whose last bits may round apart."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_close(got[k], want[k], tol, f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, tol, f"{where}[{i}]")
    elif isinstance(want, float):
        assert abs(got - want) <= tol * max(1.0, abs(want)), (where, got, want)
    else:
        assert got == want, (where, got, want)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def pendulum_data(tmp_path_factory):
    """24 pendulum scenarios of 2 s at dt 0.1 (a tiny dataset for the training tests)."""
    from twin_ml.data import ScenarioDesign, generate_dataset
    from twin_ml.physics import make_system

    out = tmp_path_factory.mktemp("data") / "pendulum"
    generate_dataset(
        make_system("pendulum"),
        ScenarioDesign(t_end=2.0, dt=0.1),
        n_scenarios=24,
        seed=0,
        out_dir=out,
        progress=False,
    )
    return out


_STORE_EXPORT = """
import sys
from pathlib import Path
from twin_ml import registry
from twin_ml._io import atomic_write_bytes, atomic_write_json
from twin_ml.export.export import export_run
run, out = Path(sys.argv[1]), Path(sys.argv[2])
blob, card = export_run(run, name="pend", version="v1", parity_scenarios=4, parity_steps=10)
registry.save("pend", "v1", blob, card)
atomic_write_bytes(out / "model.onnx", blob)
atomic_write_json(out / "manifest.json", card.to_json(store=True))
"""


def stored_pendulum(run: Path, root: Path, **env: str):
    """The run exported as pend:v1 into a model store of its own under `root`: (env with
    BENTOML_HOME and the extra `env`, the ONNX bytes, the card). The export runs once per run
    and test session, in a process of its own (the store's place is fixed when bentoml is
    imported), under a lock beside the run (the session's run is shared by the workers); each
    caller gets a copy of that store, its own to write into."""
    from twin_ml.contract import ModelCard

    env = {
        **os.environ,
        "BENTOML_HOME": str(root / "store"),
        "BENTOML_DO_NOT_TRACK": "True",
        **env,
    }
    made = run.parent / f"{run.name}-stored"
    with open(run.parent / f"{run.name}-stored.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (made / "done").exists():  # not yet, or a worker failed half-way: from the start
            shutil.rmtree(made, ignore_errors=True)
            made.mkdir()
            r = subprocess.run(
                [sys.executable, "-c", _STORE_EXPORT, str(run), str(made)],
                capture_output=True,
                text=True,
                timeout=600,
                env={**env, "BENTOML_HOME": str(made / "store")},
            )
            assert r.returncode == 0, r.stderr[-3000:]
            (made / "done").touch()
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(made / "store", root / "store")
    for name in ("model.onnx", "manifest.json"):
        shutil.copy2(made / name, root / name)
    card = ModelCard.from_json((root / "manifest.json").read_text())
    return env, (root / "model.onnx").read_bytes(), card


def train_here(*overrides):
    """twin-train's config and run in this process (the checks and the run are the command's own;
    what only the command adds, the one-line error and exit status, is tested by subprocess
    above)."""
    from hydra import compose, initialize_config_dir

    from training._common import CONFIG_DIR
    from training.train import train

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return train(cfg)


# ---- one tiny pendulum hybrid, trained once per test session -------------------------------------

# test_export, test_calibrate and test_runtime each trained this very run (the same command on the
# same dataset, seed 0): now the first worker to ask trains it, and the others wait for it
# the tiny training settings the test models share: 3 members, 2 epochs, 16 hidden units
TINY = [
    "ensemble.size=3",
    "trainer.max_epochs=2",
    "data.batch_size=8",
    "model.net.hidden=16",
    "speed_scenarios=2",
    "logger=none",
]
TINY_PENDULUM_HYBRID = ["experiment=pendulum_hybrid", *TINY]


def session_dir(tmp_path_factory) -> Path:
    """A folder all xdist workers of this test session share (their basetemps' parent, new for
    every session, so `make test-portable` builds its own); without xdist, the basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def pendulum_hybrid_run(tmp_path_factory):
    """(run_dir, data_dir): 24 pendulum scenarios of 2 s at dt 0.1 (seed 0) and twin-train
    experiment=pendulum_hybrid on them (3 members, 2 epochs), made once per session under a file
    lock. Shared by the workers, so read-only: copy the run before anything writes into it
    (twin-export writes run_dir/export)."""
    from twin_ml.data import ScenarioDesign, generate_dataset
    from twin_ml.physics import make_system

    root = session_dir(tmp_path_factory) / "pendulum-hybrid"
    root.mkdir(exist_ok=True)
    data, run, done = root / "data", root / "run", root / "done"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():  # not yet, or a worker failed half-way: from the start
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
            generate_dataset(
                make_system("pendulum"),
                ScenarioDesign(t_end=2.0, dt=0.1),
                n_scenarios=24,
                seed=0,
                out_dir=data,
                progress=False,
            )
            # twin-train's config and run in this process (train_here): a command of its own would
            # add only its start-up, while every worker waits for this run
            train_here(f"data_dir={data}", f"out_dir={run}", *TINY_PENDULUM_HYBRID)
            done.touch()
    return run, data


# ---- the order of the files on the xdist workers (make test: --dist loadfile) --------------------

# Each file runs whole on one worker (its module fixtures: trained models, live servers), so the run
# ends when the last file does. xdist hands out the files with the most tests first; these seconds
# (each file's tests on 2 cores beside the other worker, measured; rough, only their order
# matters) hand out the longest first, so that short files fill both workers' ends. A file not
# listed weighs UNLISTED_SECONDS: a new file is as likely to be long as short, and a long one
# handed out last would run alone at the end; list a new file here with its measured seconds.
FILE_SECONDS = {
    "test_cli.py": 122,
    "test_service.py": 108,
    "test_train.py": 75,
    "test_faults.py": 85,
    "test_export.py": 65,
    "test_own_system.py": 75,
    "test_telemetry_training.py": 70,
    "test_openapi_contract.py": 65,
    "test_assimilate.py": 60,
    "test_notebooks_export.py": 46,
    "test_scale_train.py": 46,
    "test_notebooks.py": 40,
    "test_scale_ray.py": 33,
    "test_fmu.py": 30,
    "test_bento.py": 20,
    "test_field_service.py": 60,
    "test_calibrate.py": 45,
    "test_live.py": 45,
    "test_monitor.py": 45,
    "test_twins.py": 45,
    "test_physics_oracles.py": 40,
    "test_regression.py": 30,
    "test_stream.py": 10,
    "test_v2_protocol.py": 25,
    "test_active.py": 20,
    "test_telemetry.py": 20,
    "test_mcmc_noise.py": 17,
    "test_own_data.py": 17,
    "test_generate.py": 13,
    "test_field_data.py": 10,
    "test_models.py": 10,
    "test_flowmap.py": 8,
    "test_field_systems.py": 6,
    "test_reduced.py": 6,
    "test_runtime.py": 5,
    "test_contract.py": 3,
    "test_imports.py": 3,
    "test_batching.py": 1,
    "test_drift.py": 1,
    "test_grid.py": 1,
    "test_portable.py": 1,
    "test_signals_design.py": 1,
    "test_sparse_solver.py": 1,
    "test_uq.py": 1,
}
UNLISTED_SECONDS = 60


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFileFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            longest = max(
                self.workqueue, key=lambda f: FILE_SECONDS.get(Path(f).name, UNLISTED_SECONDS)
            )
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

    return LongestFileFirst(config, log)
