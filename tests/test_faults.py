"""Faults that must lose nothing, each against the real component: a store write killed mid-way,
concurrent exports of one name, and a full disk while generating, training, exporting and
ingesting. A full disk is the file-size limit (RLIMIT_FSIZE) of the command's process: its writes
fail with EFBIG, as they would with ENOSPC, at a size the test chooses."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_here
from test_contract import v1_manifest

BIN = Path(sys.executable).parent
TINY = [
    "experiment=pendulum_hybrid",
    "logger=none",
    "ensemble.size=2",
    "trainer.max_epochs=3",
    "data.batch_size=8",
    "model.net.hidden=16",
    "model.optim.curriculum_start=5",
    "model.optim.curriculum_every=1",
    "speed_scenarios=4",
]


def _limited(limit: int | None):
    def apply():  # in the child, before exec: only the command under test is limited
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def command(name: str, *args: str, limit: int | None = None, env: dict | None = None):
    return subprocess.run(
        [str(BIN / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        preexec_fn=_limited(limit),
    )


def assert_one_line_disk_error(r, path_part: str) -> None:
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write ") and path_part in last, r.stderr[-3000:]
    assert "free space and run the same command again" in last


def assert_nothing_half_written(root: Path) -> None:
    """No temp file of ours is left, and every file a reader would open is whole."""
    assert not [p for p in root.rglob(".*.tmp")], list(root.rglob(".*.tmp"))
    for p in root.rglob("*.json"):
        json.loads(p.read_text())
    for p in root.rglob("*.npz"):
        with np.load(p, allow_pickle=False) as z:
            [z[k] for k in z.files]
    for p in [*root.rglob("*.ckpt"), *root.rglob("*.pt")]:
        torch.load(p, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def store_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("store")
    return {"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}


# ---- the model store -------------------------------------------------------------------------

CARD = json.dumps(v1_manifest())  # a complete model card (the store reads it back to verify)

SAVE = """
import sys, time
from pathlib import Path
from twin_ml import registry
from twin_ml.contract import ModelCard
name, version, size, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
blob = Path(sys.argv[5]).read_bytes() if size == 0 else bytes(size)
while go != "-" and not Path(go).exists():  # start together
    time.sleep(0.001)
try:
    card = ModelCard.from_json(sys.argv[6]).model_copy(update={"name": name, "version": version})
    tag = registry.save(name, version, blob, card)
    registry.promote(tag, "production")
    print("stored", tag)
except registry.RegistryError as e:
    print("refused", e)
"""


def _save_proc(env, name, version, *, size=1000, go="-", blob="-"):
    return subprocess.Popen(
        [sys.executable, "-c", SAVE, name, version, str(size), go, blob, CARD],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _store_state(env) -> dict:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from twin_ml import registry; "
            "rows = registry.list_models(); "
            "print(json.dumps({'rows': rows, 'verified': [registry.verify(r['tag']).version "
            "for r in rows], 'production': registry.resolve(rows[0]['tag'].split(':')[0] + "
            "':production').tag.version if rows else None}))",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_store_write_killed_mid_way_leaves_no_model(store_env, tmp_path):
    """SIGKILL while the model's files are copied into the store: BentoML's own save copies into
    the store's folder in place, which left a half model that broke every listing; now the store
    shows nothing of it, and the same version can be stored afterwards."""
    env = {**store_env, "BENTOML_HOME": str(tmp_path / "store")}
    proc = _save_proc(env, "killed", "v1", size=256 << 20)  # 256 MB: copying it takes a while
    building = tmp_path / "store" / "twin-ml" / "staging"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if any(
            building.glob("*/models/killed/v1/*")
        ):  # BentoML is copying files into the build folder
            break
        time.sleep(0.001)
    assert proc.poll() is None, "the save finished before it could be killed: " + proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "store" / "models" / "killed" / "v1").exists()
    assert _store_state(env)["rows"] == []
    again = _save_proc(env, "killed", "v1")
    out, err = again.communicate(timeout=120)
    assert out.startswith("stored killed:v1"), err[-3000:]
    state = _store_state(env)
    assert [r["tag"] for r in state["rows"]] == ["killed:v1"] and state["verified"] == ["v1"]
    assert list(building.iterdir()) == []  # the dead writer's folder was swept


def test_concurrent_exports_of_one_name(store_env, tmp_path):
    """Six writers at once, two per version, each then promoting to production: exactly one per
    version lands, the other is refused by name; every stored model verifies, `latest` and
    production name stored versions, and the pointers file is whole."""
    scratch = tmp_path / "tmp"  # the writers' system temp folder, where BentoML builds first
    scratch.mkdir()
    env = {**store_env, "BENTOML_HOME": str(tmp_path / "store"), "TMPDIR": str(scratch)}
    go = tmp_path / "go"
    procs = [
        _save_proc(env, "twin", v, size=1 << 20, go=str(go)) for v in ("a", "a", "b", "b", "c", "c")
    ]
    time.sleep(1.0)  # every interpreter up and waiting
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    for v in ("a", "b", "c"):
        lines = sorted(o.strip() for (o, _), p in zip(outs, procs) if p.args[4] == v)
        assert (
            lines[0]
            == f"refused twin:{v} is already in the store; pick another version (or leave it unset)"
        )
        assert lines[1] == f"stored twin:{v}"
    state = _store_state(env)
    assert sorted(r["tag"] for r in state["rows"]) == ["twin:a", "twin:b", "twin:c"]
    assert sorted(state["verified"]) == ["a", "b", "c"] and state["production"] in ("a", "b", "c")
    assert (tmp_path / "store" / "models" / "twin" / "latest").read_text() in ("a", "b", "c")
    stages = json.loads((tmp_path / "store" / "twin-ml" / "stages.json").read_text())
    assert stages == {"twin": {"production": state["production"]}}
    assert list(scratch.iterdir()) == []  # no build folder left behind, refused or stored
    assert list((tmp_path / "store" / "twin-ml" / "staging").iterdir()) == []


# ---- a full disk -------------------------------------------------------------------------------


def test_disk_full_while_generating_then_resume(tmp_path):
    """Two shards written, then the disk is full at the third: one line naming the shard, the two
    shards kept whole, and the rerun resumes from them to the uninterrupted dataset."""
    args = [
        "system=pendulum",
        "n_scenarios=24",
        "seed=0",
        "design.t_end=2.0",
        "design.dt=0.1",
        "shard_size=8",
        "progress=false",
    ]
    full = command("twin-generate", *args, f"out_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    part = tmp_path / "part"
    assert command("twin-generate", *args, f"out_dir={part}", "max_new_shards=2").returncode == 0
    r = command("twin-generate", *args, f"out_dir={part}", limit=4096)  # a shard is ~9 kB
    assert_one_line_disk_error(r, str(part / "shards"))
    assert sorted(p.name for p in (part / "shards").iterdir()) == ["00000.npz", "00001.npz"]
    assert not (part / "manifest.json").exists()
    assert_nothing_half_written(part)
    r = command("twin-generate", *args, f"out_dir={part}")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text())
    assert summary["shards_reused"] == 2
    assert (
        summary["dataset_sha256"]
        == json.loads((tmp_path / "full" / "summary.json").read_text())["dataset_sha256"]
    )


@pytest.mark.parametrize(
    "limit, where",
    [
        (12_000, "checkpoints"),  # a checkpoint is ~26 kB: the first one fails
        (
            60_000,
            ".png",
        ),  # checkpoints, weights and metrics fit; the trajectory plot (~160 kB) does not
    ],
)
def test_disk_full_while_training_then_resume(pendulum_data, tmp_path, limit, where):
    out = tmp_path / "run"
    args = [*TINY, f"data_dir={pendulum_data}", f"out_dir={out}"]
    r = command("twin-train", *args, limit=limit)
    assert_one_line_disk_error(r, where)
    assert not (out / "summary.json").exists()
    assert_nothing_half_written(out)
    before = (
        json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else None
    )
    checkpoints = {
        p.name: torch.load(p, weights_only=True)["epoch"] for p in out.glob("checkpoints/*.ckpt")
    }
    after, summary = train_here(*args, "resume=true")  # space freed: the rerun, in this process
    assert summary["report"] == str(out / "report.html") and (out / "report.html").exists()
    if before is None:  # not one checkpoint made it: the rerun trained from the start
        assert checkpoints == {}
    else:  # training had finished: the rerun resumed from its last checkpoint to the same weights
        assert "last.ckpt" in checkpoints
        for k in ("test/rel_l2_median", "test/nll", "extrapolation/nll"):
            # the same training resumed, the same evaluation; only the process differs (thread
            # count, so reduction order): float32 round-off grown over a few optimizer steps,
            # far under 1e-5
            assert after[k] == pytest.approx(before[k], rel=1e-5, abs=1e-7), k


def test_disk_full_while_exporting_then_retry(pendulum_hybrid_run, store_env, tmp_path):
    """The session's tiny pendulum hybrid (conftest: experiment=pendulum_hybrid on the same 24
    scenarios as pendulum_data), copied: twin-export writes into the run directory."""
    run = tmp_path / "run"
    shutil.copytree(pendulum_hybrid_run[0], run)
    env = {**store_env, "BENTOML_HOME": str(tmp_path / "store")}
    args = [f"run_dir={run}", "name=full", "version=v1", "stage=production"]
    args += ["parity_scenarios=4", "parity_steps=10"]  # the writes are the subject, not parity
    r = command("twin-export", *args, limit=8192, env=env)  # the ONNX file is far larger
    assert_one_line_disk_error(r, "model.onnx")
    assert_nothing_half_written(run)
    assert not (tmp_path / "store" / "models" / "full").exists()
    r = command("twin-export", *args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    state = _store_state(env)
    assert [x["tag"] for x in state["rows"]] == ["full:v1"] and state["production"] == "v1"


def test_disk_full_while_ingesting_then_retry(tmp_path):
    import pandas as pd

    t = pd.date_range("2024-03-01T00:00:00Z", periods=2000, freq="4s")
    src = tmp_path / "tanks.csv"
    rng = np.random.default_rng(0)
    pd.DataFrame(
        {
            "timestamp": t.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "pump [V]": rng.uniform(2, 8, len(t)),
            "h2 [V]": rng.uniform(1, 9, len(t)),
        }
    ).to_csv(src, index=False)
    out = tmp_path / "ingested"
    args = [f"source={src}", "contract=cascaded_tanks", f"out_dir={out}"]
    r = command("twin-ingest", *args, limit=4096)
    assert_one_line_disk_error(r, str(out))
    assert_nothing_half_written(tmp_path)
    assert not (out / "telemetry.parquet").exists()
    r = command("twin-ingest", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(pd.read_parquet(out / "telemetry.parquet")) == len(t)
