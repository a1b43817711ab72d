"""Data generation on Ray (executor=ray): a real local Ray runtime gives the local workers' dataset
byte for byte, resumes from the shards on disk, surfaces a failed task with its shard, and refuses
bad settings naming the field. One runtime for the module (Ray starts in seconds); the command's
test lets twin-generate start and stop its own."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before ray is imported: nothing sent

import numpy as np
import pytest
import ray

from twin_ml.data import ScenarioDesign, generate_dataset
from twin_ml.data.extend import DatasetExtension, Request
from twin_ml.data.generate import ShardError, _check_seen, solve_shards
from twin_ml.physics import SolverSettings, make_system

BIN = Path(sys.executable).parent / "twin-generate"
SMALL = ScenarioDesign(t_end=2.0, dt=0.1)
KW = {"n_scenarios": 16, "seed": 3, "shard_size": 4, "progress": False}  # 5 shards


def _gen(out, **kw):
    return generate_dataset(make_system("pendulum"), SMALL, out_dir=out, **{**KW, **kw})


def _shard_bytes(res):
    return [(res.path / s["file"]).read_bytes() for s in res.manifest["shards"]]


@pytest.fixture(scope="module")
def user_ray():
    """A Ray runtime the user started (2 CPUs, no dashboard): generation uses it and leaves it
    running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The reference: the same dataset solved in this process (executor=local, workers=1)."""
    res = _gen(tmp_path_factory.mktemp("local") / "ds")
    assert res.complete and len(res.manifest["shards"]) == 5
    return res


def test_ray_tasks_write_the_local_dataset_byte_for_byte(user_ray, local, tmp_path):
    res = _gen(tmp_path / "ray", executor="ray")
    assert res.complete and res.shards_written == 5 and res.shards_reused == 0
    assert res.manifest["dataset_sha256"] == local.manifest["dataset_sha256"]
    assert _shard_bytes(res) == _shard_bytes(local)
    assert user_ray.is_initialized()  # the user's runtime is left running
    assert not list((tmp_path / "ray" / "shards").glob(".*.tmp"))


def test_a_stopped_ray_run_resumes_from_the_shards_on_disk(user_ray, local, tmp_path):
    out = tmp_path / "part"
    part = _gen(out, executor="ray", max_new_shards=2)
    assert not part.complete and part.shards_written == 2
    assert len(list((out / "shards").glob("*.npz"))) == 2 and not (out / "manifest.json").exists()
    resumed = _gen(out, executor="ray")
    assert resumed.complete and resumed.shards_reused == 2 and resumed.shards_written == 3
    assert resumed.manifest["dataset_sha256"] == local.manifest["dataset_sha256"]
    # stopped by the local workers, finished on Ray: still the same dataset
    mixed = _gen(tmp_path / "mixed", max_new_shards=1)
    assert not mixed.complete
    done = _gen(tmp_path / "mixed", executor="ray")
    assert done.shards_reused == 1 and done.shards_written == 4
    assert done.manifest["dataset_sha256"] == local.manifest["dataset_sha256"]


def test_an_extension_round_on_ray_equals_the_local_round(user_ray, local, tmp_path):
    """A round of added scenarios solved on Ray is the local round, through DatasetExtension and
    through extend_dataset (what `twin-generate n_new=... executor=ray` calls)."""
    from twin_ml.active import extend_dataset

    sha = {}
    for executor in ("local", "ray"):
        path = tmp_path / executor
        shutil.copytree(local.path, path)
        ext = DatasetExtension(path)
        request = Request("random", 6, seed=1, pool_size=6, min_distance=None, weights_sha256=None)
        plan = ext.plan(request, ext.pool(6, 1), np.arange(6))
        res = ext.run(plan, progress=False, executor=executor)
        assert res.complete and res.shards_written == 2
        sha[executor] = res.manifest["dataset_sha256"]
        again = tmp_path / f"{executor}-extend"
        shutil.copytree(local.path, again)
        res = extend_dataset(again, n_new=3, acquisition="random", seed=2, progress=False,
                             executor=executor)  # fmt: skip
        sha[f"{executor}-extend"] = res.summary()["dataset_sha256"]
    assert sha["ray"] == sha["local"] != local.manifest["dataset_sha256"]
    assert sha["ray-extend"] == sha["local-extend"] != local.manifest["dataset_sha256"]


def test_a_failed_task_names_its_shard_and_does_not_hang(user_ray, tmp_path):
    """The shards folder is missing (as on a node without out_dir's storage): every task fails,
    the first failure stops the run with its shard named."""
    system = make_system("pendulum")
    scen = SMALL.sample(system, 8, 0)
    failed = r"shard shards/0000[01]\.npz failed on Ray: RuntimeError: .*shards is not there on "
    with pytest.raises(ShardError, match=failed + r"Ray node .*mounts at the same path"):
        solve_shards(
            tmp_path,
            system,
            SMALL.time_grid(system),
            SMALL.signal_specs(system),
            scen,
            SolverSettings().resolved(system),
            seed=0,
            shard_size=4,
            progress=False,
            executor="ray",
        )
    assert user_ray.is_initialized()


def test_a_shard_written_where_out_dir_is_not_shared_is_an_error(tmp_path):
    """A node whose out_dir is a disk of its own: its task succeeds, the shard is not here."""
    (tmp_path / "shards").mkdir()
    here = tmp_path / "shards" / "00000.npz"
    here.write_bytes(b"seen")
    _check_seen({str(here): "node-a"}, patience=0)
    unseen = r"shard shards/00003\.npz was written on Ray node node-b but is not in .* here"
    with pytest.raises(ShardError, match=unseen + r" \(1 shards so\).*same path"):
        _check_seen({str(here): "node-a", str(here.with_name("00003.npz")): "node-b"}, patience=0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY = "ray"


@pytest.mark.parametrize(
    "executor, address, workers, match",
    [
        ("foo", None, 1, r"executor must be one of local, ray .*got 'foo'"),
        ("local", "auto", 1, r"ray_address='auto' applies to executor=ray only"),
        (RAY, None, 2, r"workers=2 sizes executor=local's process pool"),
        (RAY, "head", 1, r"ray_address must be auto .*host:port .*got 'head'"),
        (RAY, 6379, 1, r"ray_address must be auto.*got 6379"),
        (RAY, "CLOSED", 1, r"ray_address='127\.0\.0\.1:\d+': nothing answers"),
        (RAY, "ray://CLOSED", 1, r"ray_address='ray://127.*(Ray Client|nothing answers)"),
    ],
)
def test_bad_executor_settings_are_refused_before_anything_is_written(
    executor, address, workers, match, tmp_path
):
    if isinstance(address, str):
        address = address.replace("CLOSED", f"127.0.0.1:{_closed_port()}")
    with pytest.raises(ValueError, match=match):
        _gen(tmp_path / "ds", executor=executor, ray_address=address, workers=workers)
    assert not (tmp_path / "ds").exists()


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from training._common import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides))


def test_twin_generate_executor_ray_gives_the_local_commands_dataset(tmp_path):
    """The acceptance command: twin-generate starts (and stops) a Ray runtime of its own; the
    same command without executor=ray (its config and run, in this process meanwhile) is the
    reference."""
    from training.generate import generate

    args = ["system=pendulum", "n_scenarios=64", "seed=7", "progress=false"]
    proc = subprocess.Popen(
        [str(BIN), *args, f"out_dir={tmp_path / 'ray'}", "executor=ray"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        cfg = _compose(*args, f"out_dir={tmp_path / 'local'}")
        assert cfg.executor == "local" and cfg.ray_address is None
        ref = generate(cfg)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert Path(out.strip().splitlines()[-1]) == tmp_path / "ray" / "summary.json"
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert summary["complete"] and summary["shards_written"] == 2 == len(manifest["shards"])
    assert summary["dataset_sha256"] == manifest["dataset_sha256"] == ref["dataset_sha256"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["executor=dask"], r"executor must be one of local, ray .*got 'dask'"),
        (["ray_address=auto"], r"ray_address='auto' applies to executor=ray only"),
        (["executor=ray", "workers=0", "ray_address=ray:/head"], r"ray_address must be auto"),
        (["executor=ray", "n_new=2", "acquisition=random", "workers=4"], r"workers=4 sizes"),
    ],
)
def test_the_commands_executor_settings_are_checked_first(overrides, match, tmp_path):
    from training.generate import generate

    with pytest.raises(ValueError, match=match):
        generate(_compose(*overrides, f"out_dir={tmp_path / 'ds'}"))
    assert not (tmp_path / "ds").exists()
