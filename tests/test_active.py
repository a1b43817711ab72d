"""Active learning: twin-generate extends a dataset with solver runs picked by a trained ensemble
(or drawn by the design's sampler), round by round, in the dataset's own format."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_here

from twin_ml.active import DatasetExtension, extend_dataset, score_candidates, select_diverse
from twin_ml.data import Dataset, ScenarioDesign, generate_dataset
from twin_ml.data.generate import dataset_sha256, scenario_inputs
from twin_ml.models import build_model, load_trained
from twin_ml.physics import SolverSettings, make_system, solve_looped

BIN = Path(sys.executable).parent / "twin-generate"
SPLIT_KEYS = ("val", "test", "extrapolation")


@pytest.fixture(scope="module")
def base(tmp_path_factory, pendulum_hybrid_run):
    """(dataset, run): the session's tiny pendulum hybrid run, and a dataset on its grid and
    design with shards of 5 scenarios (27 in all: 24 in the box, 3 outside), to copy."""
    run, _ = pendulum_hybrid_run
    out = tmp_path_factory.mktemp("active") / "base"
    generate_dataset(
        make_system("pendulum"),
        ScenarioDesign(t_end=2.0, dt=0.1),
        n_scenarios=24,
        seed=0,
        out_dir=out,
        shard_size=5,
        progress=False,
    )
    return out, run


def _copy(base_dir: Path, tmp_path: Path, name: str = "ds") -> Path:
    return Path(shutil.copytree(base_dir, tmp_path / name))


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _cli(*args):
    return subprocess.run(
        [str(BIN), *map(str, args), "progress=false"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )


def test_a_round_adds_train_scenarios_in_the_box_and_keeps_everything_else(base, tmp_path):
    base_dir, run = base
    ds = _copy(base_dir, tmp_path)
    before = _manifest(ds)
    old_bytes = {s["file"]: (ds / s["file"]).read_bytes() for s in before["shards"]}
    res = extend_dataset(
        ds, n_new=6, acquisition="disagreement", extend_from=run, seed=1, pool_size=64
    )
    assert res.complete and not res.already_done and res.shards_written == 2
    m = _manifest(ds)
    # existing shards byte for byte; val, test and extrapolation as they were
    assert {f: (ds / f).read_bytes() for f in old_bytes} == old_bytes
    assert m["shards"][: len(before["shards"])] == before["shards"]
    assert all(m["splits"][s] == before["splits"][s] for s in SPLIT_KEYS)
    assert m["splits"]["train"] == before["splits"]["train"] + list(range(27, 33))
    assert m["counts"]["train"] == before["counts"]["train"] + 6 and m["counts"]["total"] == 33
    assert m["dataset_sha256"] == dataset_sha256(
        m["settings_sha256"], [s["sha256"] for s in m["shards"]]
    )
    assert m["dataset_sha256"] != before["dataset_sha256"]
    # the reader: hashes verified, the new scenarios in train only, inside the design's box
    d = Dataset.open(ds)
    new = d.load(include_failed=True)
    new = {k: v[new["index"] >= 27] for k, v in new.items() if k != "t"}
    assert new["index"].tolist() == list(range(27, 33)) and set(new["split"]) == {0}
    ext = DatasetExtension(ds)
    z = ext.box.points(_scen(new))
    assert np.all((z >= ext.box.low) & (z <= ext.box.high))
    assert len(d.load("train")["p"]) == len(Dataset.open(base_dir).load("train")["p"]) + 6
    # solved as the dataset was: the same solver settings give the same trajectories
    sol = solve_looped(
        ext.system, ext.t, new["u"], new["p"], new["x0"], SolverSettings(**m["solver"])
    )
    np.testing.assert_allclose(sol.y, new["y"], rtol=1e-12, atol=1e-12)
    # the round's record
    (rec,) = m["rounds"]
    _, meta = load_trained(run / "model")
    assert rec["round"] == 1 and rec["acquisition"] == "disagreement" and rec["n_new"] == 6
    assert rec["pool_size"] == 64 and rec["seed"] == 1 and rec["index"] == [27, 33]
    assert rec["model"]["weights_sha256"] == meta["weights_sha256"]
    assert rec["dataset_sha256_before"] == before["dataset_sha256"]
    assert rec["dataset_sha256"] == m["dataset_sha256"] and rec["failed"] == 0
    assert rec["shards"] == ["shards/00006.npz", "shards/00007.npz"]
    sc = rec["scores"]
    assert sc["picked"]["min"] >= sc["pool"]["median"] and sc["pool"]["n"] == 64
    # the same request again: done already, nothing changes
    again = extend_dataset(
        ds, n_new=6, acquisition="disagreement", extend_from=run, seed=1, pool_size=64
    )
    assert again.already_done and again.shards_written == 0
    assert _manifest(ds)["dataset_sha256"] == m["dataset_sha256"]
    # a second round appends
    extend_dataset(ds, n_new=3, acquisition="random", seed=7)
    m2 = _manifest(ds)
    assert [r["round"] for r in m2["rounds"]] == [1, 2] and m2["rounds"][1]["index"] == [33, 36]
    assert m2["rounds"][1]["model"] is None and m2["rounds"][1]["scores"] is None


def _scen(d):
    from twin_ml.data.design import Scenarios

    sig = d["signal"]
    return Scenarios(d["p"], d["x0"], sig[..., 0], sig[..., 1], None, d["split"])


def test_the_picks_are_the_ensembles_top_candidates_kept_apart(base, tmp_path):
    base_dir, run = base
    ds = _copy(base_dir, tmp_path)
    res = extend_dataset(ds, n_new=6, extend_from=run, seed=2, pool_size=64, min_distance=0.1)
    ext = DatasetExtension(base_dir)
    pool = ext.pool(64, 2, round_no=1)
    model, _ = load_trained(run / "model")
    scores = score_candidates(
        model,
        ext.t,
        pool.scenarios.x0,
        ext.inputs(pool.scenarios, pool.keys),
        pool.scenarios.p,
        "disagreement",
    )
    want, _ = select_diverse(scores, pool.coordinates, 6, 0.1)
    assert res.record["picked"] == want.tolist()
    np.testing.assert_array_equal(
        Dataset.open(ds).load()["p"][-6:], pool.scenarios.p[want]
    )  # picked in score order, each with the signal it was scored on


class Oracle(torch.nn.Module):
    """A real emulator ensemble whose members agree everywhere but where the pendulum is long
    (length > 1.75 m, the top sixth of its range): there each member is shifted by its own
    offset, so the members disagree there and only there."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.members, self.kind = inner.members, inner.kind
        self.register_buffer("y_std", inner.y_std)

    def forward(self, x0, u, p, t):
        _, y = self.inner(x0, u, p, t)
        y = y.mean(dim=0, keepdim=True).expand_as(y)  # the members agree ...
        off = torch.arange(self.members, dtype=y.dtype)[:, None, None, None]
        return None, y + off * (p[:, 0] > 1.75).to(y.dtype)[None, :, None, None]

    def predict(self, x0, u, p, t):
        return type(self.inner).predict(self, x0, u, p, t)

    @property
    def conformal_scale(self):
        return self.inner.conformal_scale

    @property
    def logvar(self):
        return self.inner.logvar


@pytest.mark.parametrize("acquisition", ["disagreement", "relative", "interval"])
def test_acquisition_picks_land_where_the_ensemble_disagrees(base, acquisition):
    base_dir, _ = base
    ext = DatasetExtension(base_dir)
    d = Dataset.open(base_dir).load("train")
    stats = _stats(d, ext.t)
    inner = build_model(
        "emulator", ext.system, stats, n_times=len(ext.t), members=4, hidden=8, depth=1
    )
    model = Oracle(inner.eval())
    pool = ext.pool(256, 5)
    u = ext.inputs(pool.scenarios, pool.keys)
    scores = score_candidates(
        model, ext.t, pool.scenarios.x0, u, pool.scenarios.p, acquisition, batch_size=50
    )
    long = pool.scenarios.p[:, 0] > 1.75
    assert 20 < long.sum() < 80  # the region is a small part of the pool
    assert scores[long].min() > scores[~long].max()
    picked, _ = select_diverse(scores, pool.coordinates, 12, 0.05)
    assert np.all(long[picked]) and len(set(picked.tolist())) == 12


class EvenOracle(Oracle):
    """Members offset by 0, 1, ..., M-1 everywhere: the same absolute spread in every scenario."""

    def forward(self, x0, u, p, t):
        _, y = self.inner(x0, u, p, t)
        y = y.mean(dim=0, keepdim=True).expand_as(y)
        return None, y + torch.arange(self.members, dtype=y.dtype)[:, None, None, None]


def test_relative_acquisition_is_the_spread_over_the_predicted_size(base):
    """With the same spread everywhere, `disagreement` cannot tell scenarios apart, while
    `relative` is the offsets' std (analytic: sqrt((M^2 - 1) / 12)) times sqrt(T ny) over the
    norm of each predicted trajectory: it ranks the smallest trajectories first."""
    base_dir, _ = base
    ext = DatasetExtension(base_dir)
    d = Dataset.open(base_dir).load("train")
    inner = build_model(
        "emulator", ext.system, _stats(d, ext.t), n_times=len(ext.t), members=4, hidden=8
    )
    model = EvenOracle(inner.eval())
    pool = ext.pool(40, 7)
    x0, u, p = pool.scenarios.x0, ext.inputs(pool.scenarios, pool.keys), pool.scenarios.p
    flat = score_candidates(model, ext.t, x0, u, p, "disagreement")
    rel = score_candidates(model, ext.t, x0, u, p, "relative", batch_size=16)
    f32 = np.finfo(np.float32).eps
    assert np.ptp(flat) <= 64 * f32 * flat.max()
    args = (torch.tensor(a, dtype=torch.float32) for a in (x0, u, p))
    mean = model.predict(*args, torch.tensor(ext.t, dtype=torch.float32))["mean"].double()
    size = np.linalg.norm(mean.numpy().reshape(len(p), -1), axis=1)
    want = np.sqrt((4**2 - 1) / 12) * np.sqrt(mean.shape[1] * mean.shape[2]) / size
    np.testing.assert_allclose(rel, want, rtol=64 * f32)


def _stats(d, t):
    from twin_ml.models import compute_stats

    return compute_stats(d["x"], d["u"], d["p"], d["y"], t)


def test_the_distance_guard_skips_near_duplicates_and_relaxes_when_it_must():
    scores = np.array([5.0, 4.9, 4.8, 1.0, 0.5])
    pts = np.array([[0.0, 0.0], [0.01, 0.0], [0.02, 0.01], [1.0, 1.0], [0.5, 0.5]])
    picked, used = select_diverse(scores, pts, 3, 0.2)
    assert picked.tolist() == [0, 3, 4] and used == 0.2
    picked, used = select_diverse(scores, pts, 4, 0.2)  # a fourth needs a smaller distance
    assert picked.tolist() == [0, 3, 4, 2] and used < 0.2
    assert select_diverse(scores, pts, 5, 0.0)[0].tolist() == [0, 1, 2, 3, 4]


def test_a_killed_round_resumes_to_the_uninterrupted_dataset(base, tmp_path):
    base_dir, run = base
    whole, part = _copy(base_dir, tmp_path, "whole"), _copy(base_dir, tmp_path, "part")
    kw = dict(n_new=8, acquisition="disagreement", extend_from=run, seed=3, pool_size=40)
    full = extend_dataset(whole, **kw)
    before = (part / "manifest.json").read_bytes()
    stopped = extend_dataset(part, **kw, max_new_shards=1)
    assert not stopped.complete and stopped.shards_written == 1
    # nothing committed: the manifest as it was, the dataset reads as before, the plan is there
    assert (part / "manifest.json").read_bytes() == before
    assert Dataset.open(part).card.counts["total"] == 27 and (part / ".extending.json").exists()
    with pytest.raises(ValueError, match="was stopped before it finished"):
        extend_dataset(part, n_new=2, acquisition="random", seed=0)
    resumed = extend_dataset(part, **kw)
    assert resumed.complete and resumed.shards_reused == 1 and resumed.shards_written == 1
    assert resumed.manifest["dataset_sha256"] == full.manifest["dataset_sha256"]
    assert not (part / ".extending.json").exists()
    # another request may discard a stopped round
    stopped = extend_dataset(part, n_new=8, acquisition="random", seed=9, max_new_shards=1)
    assert not stopped.complete
    other = extend_dataset(part, n_new=3, acquisition="random", seed=0, overwrite=True)
    assert other.complete and other.record["index"] == [35, 38]
    files = sorted(p.name for p in (part / "shards").glob("*.npz"))
    assert files == sorted(Path(s["file"]).name for s in _manifest(part)["shards"])


def test_random_is_the_designs_sampler_seeded_and_deterministic(base, tmp_path):
    base_dir, _ = base
    a, b, c = (_copy(base_dir, tmp_path, n) for n in "abc")
    ra = extend_dataset(a, n_new=6, acquisition="random", seed=3)
    rb = extend_dataset(b, n_new=6, acquisition="random", seed=3)
    rc = extend_dataset(c, n_new=6, acquisition="random", seed=4)
    assert ra.manifest["dataset_sha256"] == rb.manifest["dataset_sha256"]
    assert rc.manifest["dataset_sha256"] != ra.manifest["dataset_sha256"]
    ext = DatasetExtension(base_dir)
    want = ext.design.candidates(ext.system, 6, key=[3, 5, 1])
    got = Dataset.open(a).load()
    np.testing.assert_array_equal(got["p"][-6:], want.p)
    np.testing.assert_array_equal(got["x0"][-6:], want.x0)
    keys = [[3, 6, 1, j] for j in range(6)]
    np.testing.assert_array_equal(
        got["u"][-6:], scenario_inputs(ext.t, ext.specs, want, 0, keys=keys)
    )
    assert ra.record["pool_size"] == 6 and ra.record["picked"] == list(range(6))


def test_twin_generate_extends_and_twin_train_trains_on_the_result(base, tmp_path):
    base_dir, run = base
    ds = _copy(base_dir, tmp_path)
    r = _cli(
        f"out_dir={ds}",
        f"extend_from={run}",
        "n_new=5",
        "acquisition=interval",
        "seed=2",
        "pool_size=32",
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text())
    m = _manifest(ds)
    assert summary["complete"] and summary["dataset_sha256"] == m["dataset_sha256"]
    assert summary["round"]["acquisition"] == "interval" and m["counts"]["train"] == 17 + 5
    flat, out = train_here(
        "experiment=pendulum_hybrid",
        f"data_dir={ds}",
        f"out_dir={tmp_path / 'run'}",
        "ensemble.size=2",
        "trainer.max_epochs=1",
        "data.batch_size=8",
        "model.net.hidden=8",
        "speed_scenarios=2",
        "logger=none",
    )
    assert out["dataset_sha256"] == m["dataset_sha256"]
    assert np.isfinite(flat["test/rel_l2_median"])


def test_bad_input_names_the_field(base, tmp_path):
    base_dir, run = base
    ds = _copy(base_dir, tmp_path)
    tanks = tmp_path / "tanks"
    generate_dataset(
        make_system("cascaded_tanks"),
        ScenarioDesign(t_end=80.0),
        n_scenarios=6,
        seed=0,
        out_dir=tanks,
        progress=False,
    )
    short = tmp_path / "short"
    generate_dataset(
        make_system("pendulum"),
        ScenarioDesign(t_end=1.0, dt=0.1),
        n_scenarios=6,
        seed=0,
        out_dir=short,
        progress=False,
    )
    cases = [
        (tanks, dict(extend_from=run), "was trained on system pendulum .* is cascaded_tanks"),
        (short, dict(extend_from=run), "extend_from=.* predicts 21 steps .* has 11 steps"),
        (ds, dict(extend_from=run, n_new=0), "n_new must be an integer >= 1, got 0"),
        (ds, dict(extend_from=run, acquisition="best"), "acquisition must be one of"),
        (ds, dict(), "acquisition=disagreement needs extend_from"),
        (ds, dict(extend_from=tmp_path), "extend_from=.*holds no model.json"),
        (ds, dict(extend_from=run, pool_size=3), "pool_size must be an integer >= n_new"),
        (tmp_path / "nothing", dict(acquisition="random"), "holds no complete dataset"),
    ]
    for out, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            extend_dataset(out, **{"n_new": 4, **kw})
    assert _manifest(ds) == _manifest(base_dir)  # nothing written
    # the command: one line, exit 2; overrides an extension would ignore are refused
    for args, msg in [
        (("n_new=4", "acquisition=best"), "acquisition must be one of"),
        (("n_new=4", "system=cascaded_tanks", "acquisition=random"), "drop system=..."),
        ((f"extend_from={run}",), "extend_from=... extend a dataset: give n_new"),
    ]:
        r = _cli(f"out_dir={ds}", *args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and lines[-1].startswith("error: ") and msg in lines[-1]
        assert "Traceback" not in r.stderr
