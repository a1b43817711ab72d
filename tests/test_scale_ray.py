"""Data generation on Ray (executor=ray): a real local Ray runtime gives the local workers' dataset
byte for byte, resumes from the shards on disk, surfaces a failed task with its shard, and refuses
bad settings naming the field. One runtime for the module (Ray starts in seconds); the command's
test lets twin-generate start and stop its own. Every runtime has a temp dir of its own
(RAY_TMPDIR), by which the tests find its processes and check that none outlives it."""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before ray is imported: nothing sent

import numpy as np
import psutil
import pytest
import ray

import twin_ml.data.generate as gen
from twin_ml._version import code_version
from twin_ml.data import ScenarioDesign, generate_dataset
from twin_ml.data.extend import DatasetExtension, Request
from twin_ml.data.generate import ShardError, _check_seen, _ray_shard, solve_shards
from twin_ml.physics import SolverSettings, make_system

BIN = Path(sys.executable).parent / "twin-generate"
SMALL = ScenarioDesign(t_end=2.0, dt=0.1)
KW = {"n_scenarios": 16, "seed": 3, "shard_size": 4, "progress": False}  # 5 shards


def _gen(out, **kw):
    return generate_dataset(make_system("pendulum"), SMALL, out_dir=out, **{**KW, **kw})


def _shard_bytes(res):
    return [(res.path / s["file"]).read_bytes() for s in res.manifest["shards"]]


def _ray_tmpdir() -> str:
    """A short temp dir of a Ray runtime's own (its Unix sockets' paths must stay < 108 bytes)."""
    return tempfile.mkdtemp(prefix="tm-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)


def _ray_processes(tmpdir: str) -> list[psutil.Process]:
    """The processes of the Ray runtime whose RAY_TMPDIR is `tmpdir`: those that name it (in
    their arguments or environment), and their children (Ray's agents name neither)."""
    found = {}
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and (
                p.environ().get("RAY_TMPDIR") == tmpdir or any(tmpdir in a for a in p.cmdline())
            ):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return list(found.values())


def _assert_ray_gone(tmpdir: str, patience: float = 30.0) -> None:
    """No process of that runtime is left (shutting down takes a moment)."""
    deadline = time.monotonic() + patience
    while (left := _ray_processes(tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = []
    for p in left:
        try:
            names.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            pass
    assert not names, f"Ray processes left running: {names}"
    shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def user_ray():
    """A Ray runtime the user started (2 CPUs, no dashboard): generation uses it and leaves it
    running; after the module, nothing of it is left running."""
    tmpdir, before = _ray_tmpdir(), os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmpdir  # the runtime's processes inherit it
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        assert _ray_processes(tmpdir)
        yield ray
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        _assert_ray_gone(tmpdir)


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


def test_a_node_on_other_code_is_refused_naming_the_node(user_ray, tmp_path, monkeypatch):
    """The nodes compare the code version the manifest records (version and commit), not the
    release alone: a driver on another commit stops the run at its first shard."""
    monkeypatch.setattr(gen, "code_version", lambda: "0.1.0+g0000000")  # the driver only
    node = socket.gethostname()
    other = rf"RuntimeError: twin-ml code version .* on Ray node {re.escape(node)}, the driver "
    other += r"runs 0\.1\.0\+g0000000: every node must run the same twin-ml"
    with pytest.raises(ShardError, match=r"shard shards/0000\d\.npz failed on Ray: " + other):
        _gen(tmp_path / "ds", executor="ray")
    assert not list((tmp_path / "ds" / "shards").glob("*.npz"))
    assert user_ray.is_initialized()


def test_the_task_checks_its_nodes_code_version(tmp_path):
    """The task itself (run here): the driver's code version, not the release number."""
    release = code_version().split("+")[0]
    job = (None, 0, str(tmp_path / "shards" / "00000.npz"), None)
    node = socket.gethostname()
    with pytest.raises(RuntimeError, match=rf"code version .* on Ray node {re.escape(node)}, the"):
        _ray_shard(None, job, release + "+gdeadbee")


def test_a_cluster_without_a_cpu_is_refused_before_a_task_is_submitted(
    user_ray, tmp_path, monkeypatch
):
    """num_cpus=1 tasks would wait forever: a clear error instead of a silent hang."""
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"memory": 1e9, "node:1.2.3.4": 1.0})
    submitted = []
    monkeypatch.setattr(ray, "put", lambda *a: submitted.append(a))
    refused = r"executor=ray .*: the Ray cluster has no CPU \(its resources: memory=1e\+09\)"
    with pytest.raises(ValueError, match=refused + r".*ray start --num-cpus"):
        _gen(tmp_path / "ds", executor="ray")
    assert not submitted and user_ray.is_initialized()


def test_a_run_whose_cluster_lost_its_cpus_warns_and_keeps_waiting(
    user_ray, local, tmp_path, monkeypatch, caplog
):
    """No task finished for RAY_STALL_S and the cluster has no CPU (its nodes gone): a warning,
    not a hang without a word, nor an error (the tasks here run and the dataset is the same)."""
    monkeypatch.setattr(gen, "RAY_POLL_S", 0.01)
    monkeypatch.setattr(gen, "RAY_STALL_S", 0.0)
    calls = []
    real = ray.cluster_resources

    def lost_after_the_first_look():  # the check before submitting sees the CPUs
        calls.append(1)
        return real() if len(calls) == 1 else {"memory": 1e9}

    monkeypatch.setattr(ray, "cluster_resources", lost_after_the_first_look)
    with caplog.at_level(logging.WARNING, logger=gen.__name__):
        res = _gen(tmp_path / "ds", executor="ray")
    assert res.manifest["dataset_sha256"] == local.manifest["dataset_sha256"]
    warned = [r.getMessage() for r in caplog.records if r.name == gen.__name__]
    assert warned and all("the Ray cluster has no CPU now" in w for w in warned), warned
    assert "pending shards wait until a node with CPUs joins" in warned[0]


def test_a_run_with_cpus_says_nothing_while_shards_take_long(
    user_ray, tmp_path, monkeypatch, caplog
):
    """Long shards on a cluster with CPUs are no news: no warning, however long they take."""
    monkeypatch.setattr(gen, "RAY_POLL_S", 0.01)
    monkeypatch.setattr(gen, "RAY_STALL_S", 0.0)
    with caplog.at_level(logging.WARNING, logger=gen.__name__):
        assert _gen(tmp_path / "ds", executor="ray").complete
    assert not [r for r in caplog.records if r.name == gen.__name__]


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


def _stop(proc: subprocess.Popen, patience: float = 60.0) -> None:
    """Stop a command still running: SIGTERM first (Ray's handler in the command exits through
    ray.shutdown(), which stops the runtime's processes), SIGKILL only when it does not end."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.communicate(timeout=patience)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def test_the_address_is_checked_once_per_run_before_anything_is_written(tmp_path, monkeypatch):
    """twin-generate checks its settings, and generate_dataset alone opens a connection to
    ray_address (something answers: a listening socket) before out_dir exists."""
    from training.generate import generate

    opened = []
    real = socket.create_connection

    def connect(*a, **k):
        opened.append(a)
        return real(*a, **k)

    monkeypatch.setattr(gen.socket, "create_connection", connect)
    seen = []

    def stop_here(out, *a, **k):
        seen.append(out.exists())
        raise RuntimeError("stopped before solving")

    monkeypatch.setattr(gen, "solve_shards", stop_here)
    with socket.create_server(("127.0.0.1", 0)) as head:
        address = f"127.0.0.1:{head.getsockname()[1]}"
        with pytest.raises(RuntimeError, match="stopped before solving"):
            generate(_compose("executor=ray", f"ray_address={address}", f"out_dir={tmp_path}/ds"))
    assert len(opened) == 1 and opened[0][0] == ("127.0.0.1", int(address.split(":")[1]))
    assert seen == [True]


def test_twin_generate_executor_ray_gives_the_local_commands_dataset(tmp_path):
    """The acceptance command: twin-generate starts (and stops) a Ray runtime of its own; the
    same command without executor=ray (its config and run, in this process meanwhile) is the
    reference."""
    from training.generate import generate

    # the executors, not the calibration split: without its 51 scenarios, still two shards; nor
    # the horizon: 2 s at dt 0.1 (SMALL's) instead of the pendulum's 10 s at 0.05
    args = ["system=pendulum", "n_scenarios=64", "seed=7", "progress=false"]
    args += ["design.calibration_fraction=0", "design.t_end=2.0", "design.dt=0.1"]
    tmpdir = _ray_tmpdir()  # the command's runtime's own
    proc = subprocess.Popen(
        [str(BIN), *args, f"out_dir={tmp_path / 'ray'}", "executor=ray"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": tmpdir},
    )
    try:
        cfg = _compose(*args, f"out_dir={tmp_path / 'local'}")
        assert cfg.executor == "local" and cfg.ray_address is None
        ref = generate(cfg)
        out, err = proc.communicate(timeout=600)
    finally:
        _stop(proc)  # only when the test failed before the command ended
        _assert_ray_gone(tmpdir)  # the command stopped the runtime it started
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
