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

A field system (`twin_ml.physics.FieldSystem`: the state is every cell of every field) keeps its
fields at a snapshot stride K (`snapshot_stride`; default the system's own), its probes at every
step::

    x [n, Ts, state_size]  float32: the whole state at t[::K], Ts = (T - 1) / K + 1
    x0 [n, nx]             the declared initial conditions (float64, as sampled)
    u [n, T, nu], y [n, T, ny]   float64, every step, as above

K divides the number of grid intervals T - 1, so t[0] and t[-1] are snapshots. The fields are the
bulk of the bytes, hence float32 (7 significant digits, well inside the solver's tolerance);
everything else stays float64. The manifest records `snapshot_stride` and `shapes.n_snapshots`
and `shapes.state_size`; an ordinary system's dataset (x at every step, float64) has none of these
keys, and its bytes are as they were before field systems existed.

Field systems are solved per shard in chunks of `FIELD_CHUNK` scenarios, each chunk subsampled to
its snapshots at once, so a worker never holds a shard's full-resolution fields (64 scenarios x
201 steps x 1024 cells x 8 B = 105 MB). They are solved looped, like every system: one BDF solve
per scenario with the system's Jacobian sparsity (sparse LU). Stacking a chunk (block-sparse, one
solve) was measured on heat_plate (32 x 32 cells, 201 steps, two cores): 0.41-0.48 s per scenario
stacked (chunks of 8 to 64) against 0.42-0.54 s looped, i.e. 1.0-1.2x (benchmarks/solver.py:
421 ms looped, 407 stacked, 565 pooled per scenario); stacked and looped agree to 1e-3 degC and
are equally far from a tight reference (2e-5 of a cell's range), so the stacked gain does not pay
for giving up each scenario's own step control and failure record (a stacked failure fails the
whole chunk). `twin-generate system=heat_plate n_scenarios=1024 workers=0` (1127 scenarios with
the extrapolation split) took 6 min 48 s on two cores shared with other jobs, at most 250 MB
resident per process, 109 MB on disk.

Every shard depends only on the settings and its scenario indices (per-scenario seeds), so a run
that was interrupted and run again writes only the missing shards and ends with exactly the same
bytes, hence the same `dataset_sha256`, as an uninterrupted run.

Shards are solved in this process (`workers=1`), by a local process pool (`workers=N`, 0 = one per
core), or as Ray tasks (`executor="ray"`): one task per shard, on a Ray runtime started for the run
(`ray_address=None`; stopped after it) or on a running cluster (`ray_address="auto"` on one of its
nodes, "host:port" of its head, or "ray://host:port" through Ray Client). Either way a shard is the
same function of the settings, written by the worker itself (temp file, rename) into
out_dir/shards, so the bytes, the `dataset_sha256` and resumption do not depend on the executor
(a run stopped on one resumes on the other). On a cluster every node must see out_dir at the same
path (shared storage: NFS, a cluster file system) and import the same twin-ml code (and the
system's own module): a task checks that its node runs the driver's code version (the manifest's
`code_version`: version and git commit) and sees the shards folder before it solves, the driver
that each shard a task wrote is in out_dir here too; a shard whose task fails stops the run (the
other tasks are cancelled) with the shard's name and its error. A cluster without a CPU is
refused before a task is submitted (a task takes one CPU); while no task finishes for
`RAY_STALL_S` seconds and the cluster has lost its CPUs, the run says so in a warning (it keeps
waiting: a node may join, and a long shard is no error).

A complete dataset can grow by rounds of train scenarios (`twin_ml.data.extend`, active
learning): their shards follow the existing ones, and the manifest lists them, the train split's
new indices and each round under `rounds`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import socket
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
from twin_ml.physics.field import FieldSystem
from twin_ml.physics.signals import SignalSpec, generate
from twin_ml.physics.solver import STATUS_NAMES, SolveResult, SolverSettings, solve_looped
from twin_ml.physics.system import PhysicsSystem

FORMAT = DATASET_FORMAT
MANIFEST, PROGRESS, SHARDS = "manifest.json", ".generating.json", "shards"
SHARD_KEYS = ("t", "index", "split", "p", "x0", "u", "x", "y", "status", "reason", "signal")
EXTENDING = ".extending.json"  # while a round of added scenarios is under way (twin_ml.data.extend)
_OWN = {MANIFEST, PROGRESS, EXTENDING, SHARDS, "summary.json", "config.yaml", "overview.png"}
FIELD_CHUNK = 8  # scenarios of a field system solved (and subsampled) at a time
EXECUTORS = ("local", "ray")  # who solves the shards: this machine's processes, or Ray tasks
RAY_POLL_S = 10.0  # how long one wait for a finished Ray task lasts
RAY_STALL_S = 300.0  # no task finished for this long: check (and warn) that the cluster has a CPU

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard's task failed on Ray: names the shard (its file) and carries the task's error."""


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
    snapshot_stride: int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> GenerationResult:
    """Generate (or resume, or find complete) the dataset in `out_dir`.

    workers: processes solving shards in parallel (0 = one per core; 1 = in this process).
    executor: "local" (this machine, `workers` processes) or "ray" (one Ray task per shard on
    every CPU of the Ray cluster; `workers` stays 1 or 0). The dataset is the same byte for byte.
    ray_address: with executor="ray", the cluster: None starts a Ray runtime on this machine for
    the run (every core) and stops it after; "auto" a running one of this machine's (`ray start
    --head`, or RAY_ADDRESS); "host:port" a head's GCS address; "ray://host:port" Ray Client.
    A runtime already initialized in this process (`ray.init(...)`) is used and left running.
    snapshot_stride: a field system's fields are kept at every K-th grid time (None: the system's
    `snapshot_stride`); K must divide the horizon's grid intervals. Ordinary systems keep their
    states at every step (None or 1).
    max_new_shards: stop after writing this many shards (a later call resumes); None = all.
    overwrite: replace an existing dataset in `out_dir` made with other settings.
    """
    t0 = time.perf_counter()
    _check_int("seed", seed, 0)
    _check_int("shard_size", shard_size, 1)
    _check_int("workers", workers, 0, " (0 = one per core)")
    if max_new_shards is not None:
        _check_int("max_new_shards", max_new_shards, 0, " (or null for all)")
    # before anything is written: the settings, and that something answers at ray_address (the
    # one connection of the check per run: the command leaves it to this call)
    check_executor(executor, ray_address, workers, reach=True)
    scen = design.sample(system, n_scenarios, seed)  # validates n_scenarios and the design
    t = design.time_grid(system)
    stride = _snapshot_stride(system, snapshot_stride, t.size - 1)
    specs = design.signal_specs(system)
    solver = solver.resolved(system)
    settings, settings_sha = dataset_settings(
        system,
        design,
        solver,
        n_scenarios=n_scenarios,
        seed=seed,
        shard_size=shard_size,
        stride=stride,
    )
    out = _prepare_dir(Path(out_dir), settings, settings_sha, overwrite)

    if (out / MANIFEST).exists():  # complete with the same settings: nothing to do
        manifest = read_json(out / MANIFEST)
        return GenerationResult(
            out,
            manifest,
            0,
            len(manifest.get("shards", [])),
            True,
            time.perf_counter() - t0,
            manifest.get("failures", []),
        )

    run = solve_shards(
        out,
        system,
        t,
        specs,
        scen,
        solver,
        seed=int(seed),
        shard_size=shard_size,
        stride=stride,
        workers=workers,
        progress=progress,
        max_new_shards=max_new_shards,
        executor=executor,
        ray_address=ray_address,
    )
    if not run.complete:
        partial = {**settings, "settings_sha256": settings_sha, "shards_missing": run.missing}
        return GenerationResult(
            out, partial, run.written, run.reused, False, time.perf_counter() - t0
        )
    manifest, failures = _finalize(
        out, system, solver, settings, settings_sha, scen, t, run.names, run.bounds, stride
    )
    return GenerationResult(
        out, manifest, run.written, run.reused, True, time.perf_counter() - t0, failures
    )


def dataset_settings(
    system: PhysicsSystem,
    design: ScenarioDesign,
    solver: SolverSettings,
    *,
    n_scenarios: int,
    seed: int,
    shard_size: int,
    stride: int | None,
) -> tuple[dict[str, Any], str]:
    """(settings, their sha256): everything a dataset's bytes depend on (a change to any of it is
    a different dataset). `solver` resolved for the system; `stride` a field system's snapshot
    stride (None: an ordinary system)."""
    t = design.time_grid(system)
    specs = design.signal_specs(system)
    box = design.box(system)
    settings = {
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
    if stride is not None:  # a field system (an ordinary system's settings are as they were)
        settings["snapshot_stride"] = stride
    return settings, sha256_bytes(canonical_json(settings).encode())


@dataclass
class ShardRun:
    """What `solve_shards` did: the shards' files (relative to the dataset) and [start, stop)
    scenario indices, how many it wrote and found already there, and how many are missing."""

    names: list[str]
    bounds: list[tuple[int, int]]
    written: int
    reused: int
    missing: int

    @property
    def complete(self) -> bool:
        return self.missing == 0


def solve_shards(
    out: Path,
    system: PhysicsSystem,
    t: np.ndarray,
    specs: list[SignalSpec],
    scen: Scenarios,
    solver: SolverSettings,
    *,
    seed: int,
    shard_size: int,
    stride: int | None = None,
    start: int = 0,
    first_shard: int = 0,
    signal_keys: list[list[int]] | None = None,
    workers: int = 1,
    progress: bool = True,
    max_new_shards: int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> ShardRun:
    """Solve `scen` (global indices start, start + 1, ...) into shards `first_shard`, ... of
    `shard_size` scenarios under out/shards/, keeping a shard already there when it holds exactly
    these scenarios (a resumed run). Input signals from `scenario_inputs` (per-scenario
    generators: `seed` and the global index, or `signal_keys`). `max_new_shards`: stop after
    writing this many. `executor`, `ray_address`, `workers`: as `generate_dataset`'s."""
    check_executor(executor, ray_address, workers)
    n = len(scen)
    bounds = [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]
    names = [f"{SHARDS}/{first_shard + k:05d}.npz" for k in range(len(bounds))]
    x_shape = _x_shape(system, t.size, stride)
    todo = [
        k
        for k, (a, b) in enumerate(bounds)
        if not _shard_ok(out / names[k], scen.rows(a, b), start + a, t.size, x_shape)
    ]
    reused = len(bounds) - len(todo)
    if max_new_shards is not None:
        todo = todo[: max(0, int(max_new_shards))]
    common = (system, t, specs, seed, solver, stride)  # what every shard's job shares
    jobs = [
        (
            scen.rows(a, b),
            start + a,
            str(out / names[k]),
            None if signal_keys is None else signal_keys[a:b],
        )
        for k, (a, b) in ((k, bounds[k]) for k in todo)
    ]
    _run_jobs(
        common,
        jobs,
        workers,
        progress,
        total=len(bounds),
        done=reused,
        desc=f"{system.name} shards",
        executor=executor,
        ray_address=ray_address,
    )
    missing = sum(not (out / name).exists() for name in names)
    glob_bounds = [(start + a, start + b) for a, b in bounds]
    return ShardRun(names, glob_bounds, len(todo), reused, missing)


def _check_int(name: str, v: Any, lo: int, hint: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}{hint}, got {v!r}")


def _snapshot_stride(system: PhysicsSystem, stride: Any, intervals: int) -> int | None:
    """The snapshot stride of a field system's fields (checked), None for an ordinary system."""
    if not isinstance(system, FieldSystem):
        if stride is None or (not isinstance(stride, bool) and stride == 1):
            return None
        name = system.name or type(system).__name__
        raise ValueError(
            f"snapshot_stride applies to field systems only; {name} "
            f"keeps its states at every step: leave snapshot_stride null (or 1), got {stride!r}"
        )
    own = stride is None
    k = system.snapshot_stride if own else stride
    ok = not isinstance(k, bool) and isinstance(k, (int, np.integer)) and k >= 1
    if ok and intervals % int(k) == 0:
        return int(k)
    divisors = [d for d in range(1, intervals + 1) if intervals % d == 0]
    shown = ", ".join(map(str, divisors[:24])) + (", ..." if len(divisors) > 24 else "")
    whose = f" (the system's default, {type(system).__name__}.snapshot_stride)" if own else ""
    raise ValueError(
        f"snapshot_stride must be an integer >= 1 that divides the horizon's {intervals} grid "
        f"intervals (t_end / dt), got {k!r}{whose}; valid: {shown}"
    )


def _x_shape(system: PhysicsSystem, n_t: int, stride: int | None) -> tuple[int, int]:
    """(time points, width) of a shard's x: every step and the declared states, or a field
    system's snapshots of its whole state."""
    if stride is None:
        return n_t, len(system.states)
    return (n_t - 1) // stride + 1, system.state_size


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
            found = read_json(marker)
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


def _shard_ok(path: Path, scen: Scenarios, start: int, n_t: int, x_shape: tuple[int, int]) -> bool:
    """A shard from an earlier run is kept when it opens and holds exactly its scenarios (their
    indices, parameters and initial states), with x of the expected shape (time points, width)."""
    if not path.exists():
        return False
    n = len(scen)
    try:
        with np.load(path, allow_pickle=False) as z:
            return (
                set(z.files) == set(SHARD_KEYS)
                and np.array_equal(z["index"], np.arange(start, start + n))
                and np.array_equal(z["p"], scen.p)
                and np.array_equal(z["x0"], scen.x0)
                and z["t"].shape == (n_t,)
                and z["x"].shape == (n, *x_shape)
            )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False


def _job_args(common: tuple, job: tuple) -> tuple:
    """`_make_shard`'s arguments from the shared part (system, t, specs, seed, solver, stride)
    and a shard's own (scenarios, start, path, signal keys)."""
    system, t, specs, seed, solver, stride = common
    scen, start, path, keys = job
    return system, t, specs, scen, start, seed, solver, path, stride, keys


def _run_jobs(
    common: tuple,
    jobs: list[tuple],
    workers: int,
    progress: bool,
    *,
    total: int,
    done: int,
    desc: str,
    executor: str = "local",
    ray_address: str | None = None,
) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, initial=done, desc=desc, unit="shard", disable=not progress, dynamic_ncols=True
    )
    n_proc = (os.cpu_count() or 1) if workers == 0 else workers
    try:
        if executor == "ray":
            if jobs:  # all shards there already: no runtime to start
                _run_ray(common, jobs, ray_address, bar)
            return
        if n_proc <= 1 or len(jobs) <= 1:
            for job in jobs:
                _make_shard(*_job_args(common, job))
                bar.update(1)
            return
        ctx = multiprocessing.get_context(
            "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        )
        with ProcessPoolExecutor(max_workers=min(n_proc, len(jobs)), mp_context=ctx) as pool:
            pending = {pool.submit(_make_shard, *_job_args(common, job)) for job in jobs}
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


def check_executor(
    executor: Any, ray_address: Any, workers: Any = 1, *, reach: bool = False
) -> None:
    """ValueError naming the field unless `executor`, `ray_address` and `workers` go together.
    `reach`: also that something answers at a "host:port" address (a refused or unknown address
    fails here at once; Ray's own connect would wait two minutes and exit the process)."""
    if executor not in EXECUTORS:
        raise ValueError(
            f"executor must be one of {', '.join(EXECUTORS)} (local: processes of this machine, "
            f"`workers` of them; ray: one Ray task per shard), got {executor!r}"
        )
    if executor == "local":
        if ray_address is not None:
            raise ValueError(
                f"ray_address={ray_address!r} applies to executor=ray only: pass executor=ray "
                "too, or leave ray_address null"
            )
        return
    if isinstance(workers, bool) or workers not in (0, 1):
        raise ValueError(
            f"workers={workers!r} sizes executor=local's process pool; with executor=ray every "
            "CPU of the Ray cluster solves shards (one task each): leave workers at 1 (size a "
            "runtime of this machine with `ray start --head --num-cpus N` and ray_address=auto)"
        )
    if ray_address is None:
        return
    target = _ray_target(ray_address)
    if reach and target is not None:
        host, port = target
        try:
            socket.create_connection((host, port), timeout=5.0).close()
        except OSError as e:
            raise ValueError(
                f"ray_address={ray_address!r}: nothing answers at {host}:{port} "
                f"({e.strerror or e}); start the cluster's head there (`ray start --head`), or "
                "give its address as `ray start` printed it (or auto on one of its nodes)"
            ) from None


def _ray_target(address: Any) -> tuple[str, int] | None:
    """(host, port) of a Ray address to check, None for "auto"; ValueError for a malformed one."""
    if address == "auto":
        return None
    usage = (
        "ray_address must be auto (a cluster running on this machine, or RAY_ADDRESS), "
        "host:port (the head's GCS address, as `ray start --head` prints it; port 6379 by "
        "default) or ray://host:port (Ray Client; port 10001 by default)"
    )
    if not isinstance(address, str):
        raise ValueError(f"{usage}; got {address!r}")
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in rest:
        raise ValueError(f"{usage}; got {address!r}")
    if address.startswith("ray://"):
        import importlib.util

        if importlib.util.find_spec("grpc") is None:
            raise ValueError(
                f"ray_address={address!r} connects through Ray Client, which needs "
                "`pip install 'ray[client]'` (the same Ray version); or run twin-generate on "
                "a node of the cluster with ray_address=auto"
            )
    return host, int(port)


def _connect_ray(address: str | None):
    """(ray, whether this call initialized it). A runtime this process already initialized is
    used as it is; None starts a fresh runtime on this machine ("local": never someone else's)."""
    import ray

    if ray.is_initialized():
        return ray, False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a run sends nothing anywhere
    try:
        if address is None:
            ray.init(address="local", include_dashboard=False)
        else:
            _ray_target(address)
            ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError, SystemExit) as e:
        # SystemExit: Ray exits the process when a GCS never answers
        ray.shutdown()
        where = "a Ray runtime on this machine" if address is None else f"ray_address={address!r}"
        raise ValueError(f"{where}: cannot connect ({type(e).__name__}: {e})") from None
    return ray, True


def _ray_shard(common: tuple, job: tuple, version: str) -> str:
    """A Ray task: one shard, written by the worker itself; returns the node's name. Checks first
    that this node runs the driver's code version (`code_version()`, as the manifest records it:
    the version and the git commit) and sees the dataset's shards folder (shared storage)."""
    node = socket.gethostname()
    here = code_version()
    if here != version:
        raise RuntimeError(
            f"twin-ml code version {here} on Ray node {node}, the driver runs {version}: every "
            "node must run the same twin-ml (the same release, or a checkout of the same commit)"
        )
    folder = Path(job[2]).parent
    if not folder.is_dir():
        raise RuntimeError(
            f"{folder} is not there on Ray node {node}: out_dir must be on storage every node "
            "mounts at the same path"
        )
    _make_shard(*_job_args(common, job))
    return node


def _ray_where(address: str | None, own: bool) -> str:
    """The Ray runtime a run uses, as the user set it (for messages)."""
    if not own:
        return "executor=ray (the Ray runtime initialized in this process)"
    if address is None:
        return "executor=ray (a Ray runtime started on this machine)"
    return f"executor=ray ray_address={address!r}"


def _ray_cpus(ray) -> float:
    """The CPUs the Ray cluster has (0 when its nodes have none, or are gone)."""
    return float(ray.cluster_resources().get("CPU", 0))


def _run_ray(common: tuple, jobs: list[tuple], address: str | None, bar) -> None:
    """One Ray task per shard (1 CPU each); progress as they finish. A cluster without a CPU is
    refused before a task is submitted; while no task finishes for RAY_STALL_S seconds and the
    cluster has no CPU, a warning says so (the run keeps waiting). A failed task stops the run
    (the others are cancelled) with a ShardError naming its shard; a runtime this call
    initialized is shut down at the end (a user's is left running)."""
    ray, own = _connect_ray(address)
    try:
        import ray.exceptions as rex

        where = _ray_where(address, own)
        if _ray_cpus(ray) < 1:
            raise ValueError(
                f"{where}: the Ray cluster has no CPU (its resources: "
                f"{_resources_text(ray.cluster_resources())}), and every shard is a task of one "
                "CPU that would wait forever: start its nodes with CPUs (`ray start "
                "--num-cpus N`), or use executor=local"
            )
        shared = ray.put(common)  # once in the object store, not once per task
        task = ray.remote(num_cpus=1)(_ray_shard)
        version = code_version()
        pending = {
            task.options(name=f"twin-ml shard {Path(job[2]).name}").remote(
                shared, job, version
            ): job[2]
            for job in jobs
        }
        written: dict[str, str] = {}  # shard file: the node that wrote it
        try:
            last = warned = time.monotonic()  # the last finished task, the last warning
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=RAY_POLL_S)
                now = time.monotonic()
                if ready:
                    last = now
                elif now - last >= RAY_STALL_S and now - warned >= RAY_STALL_S:
                    warned = now
                    _warn_stalled(ray, where, now - last, len(pending))
                for ref in ready:
                    path = pending.pop(ref)
                    try:
                        written[path] = ray.get(ref)
                    except rex.RayError as e:
                        raise _shard_error(path, e) from e
                    bar.update(1)
        except BaseException:
            for ref in pending:  # queued ones never start; running ones are interrupted
                ray.cancel(ref)
            raise
    finally:
        if own:
            ray.shutdown()
    _check_seen(written)


def _warn_stalled(ray, where: str, idle: float, n_pending: int) -> None:
    """No task finished for `idle` seconds: a warning when the cluster has no CPU left to run
    the pending ones (nodes gone); long shards on a cluster with CPUs are no news."""
    try:
        cpus, free = _ray_cpus(ray), float(ray.available_resources().get("CPU", 0))
    except Exception as e:  # the cluster does not answer: say that instead
        log.warning(
            f"{where}: no shard finished for {idle:.0f} s and the Ray cluster does not answer "
            f"({type(e).__name__}: {e}); {n_pending} shards pending"
        )
        return
    if cpus < 1:
        log.warning(
            f"{where}: no shard finished for {idle:.0f} s and the Ray cluster has no CPU now "
            f"(CPUs: {cpus:g} in all, {free:g} free): the {n_pending} pending shards wait until "
            "a node with CPUs joins; stop the run to give up (a rerun resumes from the shards "
            "written)"
        )


def _resources_text(resources: dict) -> str:
    """A Ray resources dict in a few words: the named resources, not the per-node ones."""
    shown = {k: v for k, v in resources.items() if not k.startswith("node:")}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items())) or "none"


def _check_seen(written: dict[str, str], patience: float = 10.0) -> None:
    """Every shard a task wrote must be in out_dir here too (a node whose out_dir is a disk of
    its own writes there and succeeds); a shared file system may show a file a few seconds late,
    hence the patience."""
    deadline = time.monotonic() + patience
    unseen = [p for p in written if not Path(p).exists()]
    while unseen and time.monotonic() < deadline:
        time.sleep(0.5)
        unseen = [p for p in unseen if not Path(p).exists()]
    if unseen:
        p = Path(unseen[0])
        raise ShardError(
            f"shard {p.parent.name}/{p.name} was written on Ray node {written[unseen[0]]} but is "
            f"not in {p.parent.parent} here ({len(unseen)} shards so): out_dir must be on "
            "storage every node mounts at the same path"
        )


def _shard_error(path: str, err: BaseException) -> ShardError:
    """A failed Ray task as a ShardError: the shard, the error's type and its message (a task's
    own exception, not Ray's wrapping with the remote traceback), and a hint when a worker
    could not import something."""
    cause = getattr(err, "cause", None) or err
    msg = " ".join(line.strip() for line in str(cause).strip().splitlines())
    text = f"{type(cause).__name__}: {msg}" if msg else type(cause).__name__
    hint = ""
    if isinstance(cause, ImportError) or "ModuleNotFoundError" in str(err):
        hint = "; every Ray node must import twin_ml (the same version) and the system's module"
    return ShardError(
        f"shard {Path(path).parent.name}/{Path(path).name} failed on Ray: {text}{hint}"
    )


def scenario_inputs(
    t: np.ndarray,
    specs: list[SignalSpec],
    scen: Scenarios,
    seed: int,
    start: int = 0,
    *,
    keys: list[list[int]] | None = None,
) -> np.ndarray:
    """The input signals u [n, T, nu] of scenarios start .. start + n (their global indices).
    `keys`: each scenario's own SeedSequence entropy instead (an added scenario's signal is
    fixed before it has an index: `twin_ml.data.extend`)."""
    n, nu = len(scen), len(specs)
    if keys is not None and len(keys) != n:
        raise ValueError(f"keys: one per scenario ({n}), got {len(keys)}")
    u = np.zeros((n, t.size, nu))
    for i in range(n):
        # one generator per scenario, keyed by its global index: shards are independent of each
        # other
        key = [seed, 3, start + i] if keys is None else [int(k) for k in keys[i]]
        rng = np.random.default_rng(np.random.SeedSequence(key))
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
    stride: int | None = None,
    signal_keys: list[list[int]] | None = None,
) -> None:
    n = len(scen)
    u = scenario_inputs(t, specs, scen, seed, start, keys=signal_keys)
    if stride is None:
        res = solve_looped(system, t, u, scen.p, scen.x0, solver)
    else:
        res = _solve_fields(system, t, u, scen, solver, stride)
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


def _solve_fields(
    system: PhysicsSystem,
    t: np.ndarray,
    u: np.ndarray,
    scen: Scenarios,
    solver: SolverSettings,
    stride: int,
) -> SolveResult:
    """A field system's shard: solved FIELD_CHUNK scenarios at a time, each chunk's fields cut
    to the snapshots t[::stride] (float32) at once; probes (y) at every step."""
    n, snaps = len(scen), slice(None, None, stride)
    x = np.empty((n, (t.size - 1) // stride + 1, system.state_size), dtype=np.float32)
    y = np.empty((n, t.size, len(system.outputs)))
    status, reasons, nfev = np.zeros(n, dtype=np.int8), [""] * n, np.zeros(n, dtype=np.int64)
    for a in range(0, n, FIELD_CHUNK):
        c = slice(a, min(a + FIELD_CHUNK, n))
        r = solve_looped(system, t, u[c], scen.p[c], scen.x0[c], solver)
        x[c], y[c] = r.x[:, snaps], r.y
        status[c], reasons[c], nfev[c] = r.status, r.reasons, r.nfev
        del r  # the chunk's full-resolution fields
    return SolveResult(x=x, y=y, status=status, reasons=reasons, nfev=nfev)


def shard_records(
    out: Path, names: list[str], bounds: list[tuple[int, int]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The manifest's entries of written shards (file, start, stop, sha256) and their failed
    scenarios (index, status, kind, reason)."""
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
    return shards, failures


def _finalize(out, system, solver, settings, settings_sha, scen, t, names, bounds, stride):
    shards, failures = shard_records(out, names, bounds)
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
            "0 design, 1 splits, 2 extrapolation, 3 per-scenario signals, 4 calibration",
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
    if stride is not None:  # a field system: its fields at t[::stride] (ordinary: as they were)
        manifest["snapshot_stride"] = stride
        n_snap, width = _x_shape(system, t.size, stride)
        manifest["shapes"].update(n_snapshots=n_snap, state_size=width)
    atomic_write_json(out / MANIFEST, manifest)  # the dataset is complete from here on
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest, failures


def dataset_sha256(settings_sha256: str, shard_sha256s: list[str]) -> str:
    """The dataset's identity: the settings hash and the shard hashes, in order."""
    return sha256_bytes(
        canonical_json({"settings_sha256": settings_sha256, "shards": shard_sha256s}).encode()
    )


def read_json(path: Path) -> dict:
    """A JSON file as a dict; ValueError naming the file when it cannot be read."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from None
