"""Scenario data generation: a system + a design -> a sharded, hashed, resumable dataset.

Layout of a dataset directory (format ``twin-ml/dataset/v1``; readable with numpy alone)::

    manifest.json        written last: its presence means the dataset is complete
    shards/00000.npz     one standard .npz per `shard_size` scenarios
                         (np.load(..., allow_pickle=False))
    .generating.json     while generation is under way (the settings being generated)

Each shard holds, for its scenarios i in [start, stop)::

    t [T]            time grid (the system's time unit)
    index [n]        global scenario index          split [n]  int8: 0 train 1 val 2 test
                                                               3 extrapolation
    p [n, np]        parameters                     x0 [n, nx] initial states
    u [n, T, nu]     inputs on the grid             x [n, T, nx] states     y [n, T, ny] outputs
    status [n] int8  0 ok, else a failure code      reason [n] str: why it failed ("" if ok)
    signal [n, nu, 2]  the signal design variables (offset, amplitude) per input

Failed scenarios (status != 0) have NaN in x and y; ok scenarios never hold a NaN.

Every shard depends only on the settings and its scenario indices (per-scenario seeds), so a run
that was interrupted and run again writes only the missing shards and ends with exactly the same
bytes, hence the same `dataset_sha256`, as an uninterrupted run.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
import zipfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twin_ml._io import (
    atomic_write_bytes,
    atomic_write_json,
    canonical_json,
    npz_bytes,
    remove_stale_temps,
    sha256_bytes,
    sha256_file,
)
from twin_ml._version import code_version
from twin_ml.contract.dataset import DATASET_FORMAT
from twin_ml.data.design import SPLITS, ScenarioDesign, Scenarios
from twin_ml.physics.signals import SignalSpec, generate
from twin_ml.physics.solver import STATUS_NAMES, SolverSettings, solve_looped
from twin_ml.physics.system import PhysicsSystem

FORMAT = DATASET_FORMAT
MANIFEST, PROGRESS, SHARDS = "manifest.json", ".generating.json", "shards"
SHARD_KEYS = ("t", "index", "split", "p", "x0", "u", "x", "y", "status", "reason", "signal")
_OWN = {MANIFEST, PROGRESS, SHARDS, "summary.json", "config.yaml", "overview.png"}


@dataclass
class GenerationResult:
    path: Path
    manifest: dict[str, Any]
    shards_written: int
    shards_reused: int
    complete: bool
    seconds: float
    failures: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "dataset": str(self.path),
            "complete": self.complete,
            "dataset_sha256": m.get("dataset_sha256"),
            "system": m["system"]["name"],
            "counts": m.get("counts"),
            "shape": m.get("shapes"),
            "failures": self.failures[:50],
            "n_failures": len(self.failures),
            "shards_written": self.shards_written,
            "shards_reused": self.shards_reused,
            "seconds": round(self.seconds, 3),
        }


def generate_dataset(
    system: PhysicsSystem,
    design: ScenarioDesign,
    *,
    n_scenarios: int,
    seed: int,
    out_dir: str | os.PathLike,
    solver: SolverSettings = SolverSettings(),
    shard_size: int = 64,
    workers: int = 1,
    overwrite: bool = False,
    max_new_shards: int | None = None,
    progress: bool = True,
) -> GenerationResult:
    """Generate (or resume, or find complete) the dataset in `out_dir`.

    workers: processes solving shards in parallel (0 = one per core; 1 = in this process).
    max_new_shards: stop after writing this many shards (a later call resumes); None = all.
    overwrite: replace an existing dataset in `out_dir` made with other settings.
    """
    t0 = time.perf_counter()
    _check_int("seed", seed, 0)
    _check_int("shard_size", shard_size, 1)
    _check_int("workers", workers, 0, " (0 = one per core)")
    if max_new_shards is not None:
        _check_int("max_new_shards", max_new_shards, 0, " (or null for all)")
    scen = design.sample(system, n_scenarios, seed)  # validates n_scenarios and the design
    t = design.time_grid(system)
    specs = design.signal_specs(system)
    solver = solver.resolved(system)
    box = design.box(system)
    settings = {  # everything the bytes depend on; a change to any of it is a different dataset
        "format": FORMAT,
        "system": system.describe(),
        "design": design.to_dict(),
        "box": {n: [float(lo), float(hi)] for n, lo, hi in zip(box.names, box.low, box.high)},
        "signals": {inp.name: vars(spec) for inp, spec in zip(system.inputs, specs)},
        "time": [float(t[0]), float(t[-1]), int(t.size)],
        "solver": solver.to_dict(),
        "n_scenarios": int(n_scenarios),
        "seed": int(seed),
        "shard_size": int(shard_size),
    }
    settings_sha = sha256_bytes(canonical_json(settings).encode())
    out = _prepare_dir(Path(out_dir), settings, settings_sha, overwrite)
    n_total = len(scen)
    bounds = [(s, min(s + shard_size, n_total)) for s in range(0, n_total, shard_size)]
    names = [f"{SHARDS}/{k:05d}.npz" for k in range(len(bounds))]

    if (out / MANIFEST).exists():  # complete with the same settings: nothing to do
        manifest = _read_json(out / MANIFEST)
        return GenerationResult(
            out,
            manifest,
            0,
            len(bounds),
            True,
            time.perf_counter() - t0,
            manifest.get("failures", []),
        )

    todo = [k for k, (a, b) in enumerate(bounds) if not _shard_ok(out / names[k], a, b, t.size)]
    reused = len(bounds) - len(todo)
    if max_new_shards is not None:
        todo = todo[: max(0, int(max_new_shards))]
    jobs = [
        (system, t, specs, scen.rows(a, b), a, int(seed), solver, str(out / names[k]))
        for k, (a, b) in ((k, bounds[k]) for k in todo)
    ]
    _run_jobs(jobs, workers, progress, total=len(bounds), done=reused, desc=f"{system.name} shards")

    missing = [k for k, (a, b) in enumerate(bounds) if not (out / names[k]).exists()]
    if missing:
        partial = {**settings, "settings_sha256": settings_sha, "shards_missing": len(missing)}
        return GenerationResult(out, partial, len(todo), reused, False, time.perf_counter() - t0)
    manifest, failures = _finalize(
        out, system, solver, settings, settings_sha, scen, t, names, bounds
    )
    return GenerationResult(
        out, manifest, len(todo), reused, True, time.perf_counter() - t0, failures
    )


def _check_int(name: str, v: Any, lo: int, hint: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}{hint}, got {v!r}")


def _prepare_dir(out: Path, settings: dict, settings_sha: str, overwrite: bool) -> Path:
    """Create `out`, or check that what is in it is this dataset (complete or partial)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir {str(out)!r} cannot be created: {e.strerror or e}") from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir {str(out)!r} is not a writable directory")
    remove_stale_temps(out)  # temp files of a killed run (the marker being written)
    existing = {p.name for p in out.iterdir()}
    marker = (
        out / MANIFEST if MANIFEST in existing else out / PROGRESS if PROGRESS in existing else None
    )
    if marker is not None:
        try:
            found = _read_json(marker)
        except ValueError as e:
            raise ValueError(
                f"{e}; pass overwrite=true to regenerate, or choose another out_dir"
            ) from None
        if found.get("settings_sha256") != settings_sha:
            if not overwrite:
                raise ValueError(
                    f"out_dir {str(out)!r} holds a dataset made with different settings; "
                    "pass overwrite=true to replace it, or choose another out_dir"
                )
            for name in _OWN & existing:
                shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
            marker = None
        elif marker.name == PROGRESS and found.get("code_version") != code_version():
            # shards of two code versions could differ from an uninterrupted run of either
            if not overwrite:
                raise ValueError(
                    f"out_dir {str(out)!r} holds a generation started by code version "
                    f"{found.get('code_version')}, this is {code_version()}; "
                    "pass overwrite=true to restart it"
                )
            shutil.rmtree(out / SHARDS, ignore_errors=True)
            marker = None
    elif existing:
        raise ValueError(
            f"out_dir {str(out)!r} is not empty and holds no twin-ml dataset "
            f"(found {sorted(existing)[:5]}); choose an empty or new directory"
        )
    if marker is None:  # the marker first: a directory holding anything of ours always has one
        atomic_write_json(
            out / PROGRESS,
            {**settings, "settings_sha256": settings_sha, "code_version": code_version()},
        )
    (out / SHARDS).mkdir(exist_ok=True)
    remove_stale_temps(out / SHARDS)  # temp files of a killed run
    return out


def _shard_ok(path: Path, start: int, stop: int, n_t: int) -> bool:
    """A shard from an earlier run is kept when it opens and holds exactly its scenarios."""
    if not path.exists():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return (
                set(z.files) == set(SHARD_KEYS)
                and np.array_equal(z["index"], np.arange(start, stop))
                and z["t"].shape == (n_t,)
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False


def _run_jobs(
    jobs: list, workers: int, progress: bool, *, total: int, done: int, desc: str
) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, initial=done, desc=desc, unit="shard", disable=not progress, dynamic_ncols=True
    )
    n_proc = (os.cpu_count() or 1) if workers == 0 else workers
    try:
        if n_proc <= 1 or len(jobs) <= 1:
            for job in jobs:
                _make_shard(*job)
                bar.update(1)
            return
        ctx = multiprocessing.get_context(
            "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        )
        with ProcessPoolExecutor(max_workers=min(n_proc, len(jobs)), mp_context=ctx) as pool:
            pending = {pool.submit(_make_shard, *job) for job in jobs}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        f.result()  # re-raise a worker's error here
                        bar.update(1)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    finally:
        bar.close()


def scenario_inputs(
    t: np.ndarray, specs: list[SignalSpec], scen: Scenarios, seed: int, start: int = 0
) -> np.ndarray:
    """The input signals u [n, T, nu] of scenarios start .. start + n (their global indices)."""
    n, nu = len(scen), len(specs)
    u = np.zeros((n, t.size, nu))
    for i in range(n):
        # one generator per scenario, keyed by its global index: shards are independent of each
        # other
        rng = np.random.default_rng(np.random.SeedSequence([seed, 3, start + i]))
        for j, spec in enumerate(specs):
            u[i, :, j] = generate(
                spec, t, scen.offset[i, j], scen.amplitude[i, j], rng, clip=tuple(scen.clip[i, j])
            )
    return u


def _make_shard(
    system: PhysicsSystem,
    t: np.ndarray,
    specs: list[SignalSpec],
    scen: Scenarios,
    start: int,
    seed: int,
    solver: SolverSettings,
    path: str,
) -> None:
    n = len(scen)
    u = scenario_inputs(t, specs, scen, seed, start)
    res = solve_looped(system, t, u, scen.p, scen.x0, solver)
    arrays = {
        "t": t,
        "index": np.arange(start, start + n, dtype=np.int64),
        "split": scen.split,
        "p": scen.p,
        "x0": scen.x0,
        "u": u,
        "x": res.x,
        "y": res.y,
        "status": res.status,
        "reason": np.array(res.reasons, dtype=f"<U{max(1, max(map(len, res.reasons)))}"),
        "signal": np.stack([scen.offset, scen.amplitude], axis=-1),
    }
    atomic_write_bytes(path, npz_bytes(arrays))


def _finalize(out, system, solver, settings, settings_sha, scen, t, names, bounds):
    shards, failures = [], []
    for name, (a, b) in zip(names, bounds):
        with np.load(out / name, allow_pickle=False) as z:
            status, reason = z["status"], z["reason"]
            for i in np.flatnonzero(status):
                failures.append(
                    {
                        "index": int(a + i),
                        "status": int(status[i]),
                        "kind": STATUS_NAMES.get(int(status[i]), "?"),
                        "reason": str(reason[i]),
                    }
                )
        shards.append({"file": name, "start": a, "stop": b, "sha256": sha256_file(out / name)})
    splits = {s: np.flatnonzero(scen.split == k).tolist() for k, s in enumerate(SPLITS)}
    counts = {s: len(v) for s, v in splits.items()}
    counts.update(total=len(scen), ok=len(scen) - len(failures), failed=len(failures))
    dataset_sha = dataset_sha256(settings_sha, [s["sha256"] for s in shards])
    desc = settings["system"]
    manifest = {
        "format": FORMAT,
        "dataset_sha256": dataset_sha,
        "settings_sha256": settings_sha,
        "system": desc,
        "design": {**settings["design"], "box": settings["box"]},
        "signals": settings["signals"],
        "regimes": desc["regimes"],
        "solver": solver.to_dict(),
        "seeds": {
            "seed": settings["seed"],
            "scheme": "SeedSequence([seed, stream, index]); streams: "
            "0 design, 1 splits, 2 extrapolation, 3 per-scenario signals",
        },
        "time": {
            "t0": float(t[0]),
            "t_end": float(t[-1]),
            "dt": float(t[1] - t[0]),
            "n": int(t.size),
            "unit": system.time_unit,
        },
        "shapes": {
            "n_scenarios": len(scen),
            "n_times": int(t.size),
            "nx": len(system.states),
            "nu": len(system.inputs),
            "ny": len(system.outputs),
            "np": len(system.parameters),
        },
        "splits": splits,
        "counts": counts,
        "failures": failures,
        "shard_size": settings["shard_size"],
        "shards": shards,
        "code_version": code_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(out / MANIFEST, manifest)  # the dataset is complete from here on
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest, failures


def dataset_sha256(settings_sha256: str, shard_sha256s: list[str]) -> str:
    """The dataset's identity: the settings hash and the shard hashes, in order."""
    return sha256_bytes(
        canonical_json({"settings_sha256": settings_sha256, "shards": shard_sha256s}).encode()
    )


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None
