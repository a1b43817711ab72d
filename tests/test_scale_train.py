"""twin-train past one process: sweeps through Hydra's joblib and submitit launchers, Lightning's
DDP on two CPU processes (trainer=ddp), and trainer=gpu's config.

The oracle is one run of twin-train in this process, the same settings throughout: a sweep's job
with those settings is the same computation in another process (the same code, data, seed and one
intra-op thread), so its metrics and weights equal the run's exactly. DDP is another computation:
each of its two processes takes half of each one-process batch and DDP averages their gradients,
which is the batch mean's gradient up to the order of the float sums; those differences, a few
ulps per step, go through the RK4 rollouts the metrics are made of, so the metrics agree within
`rollout_tol` of the grid's steps (conftest), far below what other batches would change.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rollout_tol, train_here

TWIN_TRAIN = str(Path(sys.executable).parent / "twin-train")
T_END, DT = 2.0, 0.1
N_STEPS = round(T_END / DT)  # the rollouts' RK4 steps (the pendulum's grid)
BATCH = 8
TINY = [
    "ensemble.size=2",  # a deep ensemble of two members, trained together
    "trainer.max_epochs=2",
    f"data.batch_size={BATCH}",
    "model.net.hidden=16",
    "model.optim.lr=0.01",
    "speed_scenarios=2",
    "logger=none",
    "threads=1",
]
TIMING = ("speed", "seconds")  # wall-clock numbers: never compared


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """23 pendulum scenarios of 2 s at dt 0.1: 16 train (two full batches of 8), 3 val, 4 test,
    3 extrapolation."""
    from twin_ml.data import Dataset, ScenarioDesign, generate_dataset
    from twin_ml.physics import make_system

    out = tmp_path_factory.mktemp("data") / "pendulum"
    generate_dataset(
        make_system("pendulum"),
        ScenarioDesign(t_end=T_END, dt=DT),
        n_scenarios=23,
        seed=0,
        out_dir=out,
        progress=False,
    )
    assert len(Dataset.open(out).load("train")["index"]) == 2 * BATCH  # shares split evenly
    return out


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """The oracle: one run in one process (this one)."""
    out = tmp_path_factory.mktemp("single") / "run"
    train_here(*TINY, f"data_dir={data}", f"out_dir={out}")
    return out


def _twin_train(*args, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [TWIN_TRAIN, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"},
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    return r


def _metrics(run: Path) -> dict[str, float]:
    flat = json.loads((run / "metrics.json").read_text())
    return {
        k: v
        for k, v in flat.items()
        if isinstance(v, (int, float)) and not any(t in k for t in TIMING)
    }


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model" / "model.pt", map_location="cpu", weights_only=True)


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


# ---- the batches of several processes -----------------------------------------------------------


@pytest.mark.parametrize("epoch", [0, 3])
def test_shares_of_each_batch_are_the_one_process_batch(epoch):
    from twin_ml.data.torch_data import EpochSampler
    from twin_ml.train.distributed import ShardedBatches

    n, world = 19, 2  # 19: two full batches of 8, then one of 3
    one = EpochSampler(n, seed=5)
    one.set_epoch(epoch)
    order = list(one)
    shares = []
    for rank in range(world):
        sampler = EpochSampler(n, seed=5)
        batches = ShardedBatches(sampler, batch_size=BATCH, rank=rank, world_size=world)
        batches.sampler.set_epoch(epoch)  # where Lightning sets it
        shares.append(list(batches))
        assert len(batches) == math.ceil(n / BATCH) == len(shares[-1])
    for step, start in enumerate(range(0, n, BATCH)):
        batch = order[start : start + BATCH]
        assert sorted(shares[0][step] + shares[1][step]) == sorted(batch)
    assert [len(s) for s in shares[0]] == [4, 4, 2] and [len(s) for s in shares[1]] == [4, 4, 1]


def test_shares_need_a_batch_that_divides():
    from twin_ml.data.torch_data import EpochSampler
    from twin_ml.train.distributed import ShardedBatches

    with pytest.raises(ValueError, match=r"data\.batch_size \(7\) must be a multiple .* \(2"):
        ShardedBatches(EpochSampler(16, seed=0), batch_size=7, rank=0, world_size=2)
    # a batch shorter than the processes: each still gets a scenario (DDP steps together)
    shares = [list(ShardedBatches(range(1), batch_size=2, rank=r, world_size=2)) for r in (0, 1)]
    assert shares == [[[0]], [[0]]]


# ---- sweeps --------------------------------------------------------------------------------------


def test_joblib_sweep_job_reproduces_the_single_run(data, single, tmp_path):
    """Two jobs (two learning rates) in two joblib processes: each in its own folder of the sweep,
    the job with the single run's settings equal to it exactly, the sweep's last lines each
    job's summary path in job order."""
    sweep = tmp_path / "sweep"
    r = _twin_train(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
        f"data_dir={data}",
        *TINY,
        "model.optim.lr=0.01,0.003",
        cwd=tmp_path,
    )
    assert r.stdout.split() == [
        str(sweep / "0" / "summary.json"),
        str(sweep / "1" / "summary.json"),
    ]
    job = sweep / "0"
    assert json.loads((job / "summary.json").read_text())["run_dir"] == str(job)
    assert _metrics(job) == _metrics(single)
    ours, theirs = _weights(job), _weights(single)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    other = _metrics(sweep / "1")  # lr 0.003: its own run, not the first job's again
    assert other["val/rel_l2_median"] != _metrics(job)["val/rel_l2_median"]
    assert "lr: 0.003" in (sweep / "1" / "config.yaml").read_text()


def test_submitit_local_job_reproduces_the_single_run(data, single, tmp_path):
    """submitit's local executor (the Slurm launcher's twin on this machine): the job runs in a
    process submitit starts, its output goes to submitit's log, and the sweep prints its path."""
    sweep = tmp_path / "sweep"
    r = _twin_train(
        "-m",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep}",
        f"data_dir={data}",
        *TINY,
        cwd=tmp_path,
    )
    assert r.stdout.split() == [str(sweep / "0" / "summary.json")]
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # submitit ran it
    assert _metrics(sweep / "0") == _metrics(single)


# ---- DDP -----------------------------------------------------------------------------------------


def test_ddp_on_two_processes_matches_one(data, single, tmp_path):
    """trainer=ddp: two CPU processes (gloo), each half of every batch; the first alone writes the
    run (the same files as one process's), both end cleanly, and the ensemble's metrics are one
    process's within the rollouts' float32 tolerance."""
    out = tmp_path / "ddp"
    r = _twin_train("trainer=ddp", f"data_dir={data}", f"out_dir={out}", *TINY, cwd=tmp_path)
    assert "distributed_backend=gloo" in r.stderr
    assert "Starting with 2 processes" in r.stderr
    assert r.stdout.split() == [str(out / "summary.json")]  # one process prints
    assert r.stderr.count("Instantiating model") == 1  # the other logs only warnings
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    assert _files(out) == _files(single) | {"summary.json"}  # train_here writes no summary
    ours, theirs = _metrics(out), _metrics(single)
    assert ours.keys() == theirs.keys()
    assert ours["train/members"] == 2 and ours["train/epochs"] == theirs["train/epochs"]
    tol = rollout_tol(N_STEPS, 1.0)  # relative: the metrics are ratios or in normalized units
    continuous = [k for k in ours if "coverage" not in k and not k.startswith("train/")]
    assert len(continuous) > 20
    for k in continuous:
        assert abs(ours[k] - theirs[k]) <= tol * max(abs(theirs[k]), 1.0), (k, ours[k], theirs[k])
    # the two members are two models, not one trained twice
    w = _weights(out)["net.weights.0"].numpy()
    assert not np.allclose(w[0], w[1])


# ---- refusals ------------------------------------------------------------------------------------


def test_gpu_config_composes_and_is_refused_without_a_gpu(data, tmp_path):
    from hydra import compose, initialize_config_dir

    from training._common import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    assert cfg.trainer.max_epochs == 40  # the rest from trainer/default.yaml
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: trainer=gpu is not refused here")
    with pytest.raises(ValueError, match=r"trainer\.accelerator=gpu .* sees none.*trainer=default"):
        train_here("trainer=gpu", f"data_dir={data}", f"out_dir={tmp_path / 'gpu'}")
    assert not (tmp_path / "gpu").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=7"], r"data\.batch_size \(7\) must be a multiple .* processes \(2"),
        ([], r"trainer=ddp on 2 processes starts the others by running the twin-train command"),
    ],
)
def test_ddp_refusals(data, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_here("trainer=ddp", f"data_dir={data}", f"out_dir={tmp_path / 'run'}", *overrides)
    assert not (tmp_path / "run").exists()
