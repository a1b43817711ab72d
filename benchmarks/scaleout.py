"""Data generation on Ray against the local workers, side by side in one run on the same cores.

The same dataset (heat_plate by default: the costly field system, ~0.45 s per scenario) is generated
by `generate_dataset` three ways, and every way must give the same dataset_sha256:
  - local_1:  executor=local, workers=1 (the shards one after another in this process)
  - local_2:  executor=local, workers=2 (a process pool of 2, started per call as the command does)
  - ray_2:    executor=ray on a Ray runtime of 2 CPUs (`ray.init(num_cpus=2)`, started once
              before the timed runs; its start-up and the first, cold run, whose tasks start the
              worker processes, are reported apart)
Each mode runs once untimed (warm-up: imports, the Ray workers), then --repeats timed runs,
the modes interleaved; reported: median and p95 wall time, scenarios per second, and the speedup
over local_1.

Overhead per task: --tiny one-scenario shards of a pendulum over one time step (the solve costs
~1 ms), in each mode: the wall time times the CPUs used, per task, less local_1's time per task
(the work itself) = what running a shard as a task costs beyond its work (process pool: pickling,
the pool's queues; Ray: scheduling, the object store, the result's round trip).

    python benchmarks/scaleout.py                       # heat_plate, 32 scenarios, 3 repeats
    python benchmarks/scaleout.py --quick               # a check that it runs (not numbers)
    python benchmarks/scaleout.py --system pendulum --n 256 --shard-size 16
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing sent anywhere

import numpy as np

from twin_ml import code_version
from twin_ml._io import atomic_write_json
from twin_ml.data import ScenarioDesign, generate_dataset
from twin_ml.physics import make_system

OUT = Path(__file__).parent / "results" / "scaleout.json"
MODES = {  # name: generate_dataset's executor settings
    "local_1": {"executor": "local", "workers": 1},
    "local_2": {"executor": "local", "workers": 2},
    "ray_2": {"executor": "ray"},
}
CPUS = {"local_1": 1, "local_2": 2, "ray_2": 2}


def _p95(xs: list[float]) -> float:
    return float(np.percentile(xs, 95))


def run_modes(system, design, n: int, shard_size: int, repeats: int, root: Path) -> dict:
    """{mode: {"times": [...], "sha": ..., "scenarios": ..., "shards": ...}} of `repeats` timed
    runs each (after one untimed), the modes interleaved."""
    out: dict[str, dict] = {m: {"times": []} for m in MODES}
    for k in range(repeats + 1):
        for mode, kw in MODES.items():
            d = root / f"{mode}-{k}"
            t0 = time.perf_counter()
            res = generate_dataset(
                system,
                design,
                n_scenarios=n,
                seed=0,
                out_dir=d,
                shard_size=shard_size,
                progress=False,
                **kw,
            )
            dt = time.perf_counter() - t0
            assert res.complete and res.shards_written == len(res.manifest["shards"])
            o = out[mode]
            if k == 0:
                o.update(
                    sha=res.manifest["dataset_sha256"],
                    scenarios=res.manifest["counts"]["total"],
                    shards=len(res.manifest["shards"]),
                    first_s=dt,
                )
            else:
                o["times"].append(dt)
                if res.manifest["dataset_sha256"] != o["sha"]:
                    raise SystemExit(f"{mode}: another dataset on repeat {k}")
            shutil.rmtree(d)
    shas = {o["sha"] for o in out.values()}
    if len(shas) != 1:
        made = {m: o["sha"][:16] for m, o in out.items()}
        raise SystemExit(f"the modes made different datasets: {made}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--system", default="heat_plate")
    ap.add_argument("--n", type=int, default=32, help="in-domain scenarios (plus extrapolation)")
    ap.add_argument("--shard-size", type=int, default=4, help="scenarios per shard (= per task)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", type=int, default=64, help="one-scenario tasks for the overhead")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.shard_size, args.repeats, args.tiny = 4, 2, 1, 8
        if args.out == OUT:
            args.out = Path(tempfile.mkdtemp()) / "scaleout-quick.json"

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    root = Path(tempfile.mkdtemp(prefix="scaleout-"))
    try:
        system = make_system(args.system)
        print(
            f"... {args.system}: {args.n} scenarios, shards of {args.shard_size}", file=sys.stderr
        )
        main_runs = run_modes(system, ScenarioDesign(), args.n, args.shard_size, args.repeats, root)
        print(f"... overhead: {args.tiny} one-scenario pendulum tasks", file=sys.stderr)
        pend = make_system("pendulum")
        tiny_design = ScenarioDesign(t_end=0.1, dt=0.1, extrapolation_fraction=0.0)
        tiny_runs = run_modes(pend, tiny_design, args.tiny, 1, args.repeats, root)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    work = statistics.median(tiny_runs["local_1"]["times"]) / args.tiny  # per task, in-process
    rows = []
    base = statistics.median(main_runs["local_1"]["times"])
    for mode in MODES:
        o, t = main_runs[mode], tiny_runs[mode]
        med = statistics.median(o["times"])
        per_task = statistics.median(t["times"]) * CPUS[mode] / args.tiny
        rows.append(
            {
                "mode": mode,
                "cpus": CPUS[mode],
                "wall_s_median": med,
                "wall_s_p95": _p95(o["times"]),
                "wall_s_runs": o["times"],
                "first_run_s": o["first_s"],
                "scenarios_per_s": o["scenarios"] / med,
                "speedup_over_local_1": base / med,
                "overhead_per_task_ms": 1e3 * (per_task - work),
                "tiny_wall_s_median": statistics.median(t["times"]),
            }
        )
    m = main_runs["local_1"]
    result = {
        "benchmark": "scaleout",
        "code_version": code_version(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "ray_version": ray.__version__,
        "quick": bool(args.quick),
        "system": args.system,
        "n_scenarios": args.n,
        "scenarios_total": m["scenarios"],
        "shard_size": args.shard_size,
        "shards": m["shards"],
        "repeats": args.repeats,
        "dataset_sha256": m["sha"],
        "same_dataset_every_mode": True,  # run_modes stops otherwise
        "ray_start_s": ray_start,
        "ray_cold_first_run_s": main_runs["ray_2"]["first_s"],
        "tiny_tasks": args.tiny,
        "tiny_work_per_task_ms": 1e3 * work,
        "overhead_definition": "median wall of N one-scenario tasks x CPUs / N, less local_1's "
        "time per task (the work)",
        "rows": rows,
    }
    atomic_write_json(args.out, result)

    print(
        f"\n{args.system}: {m['scenarios']} scenarios in {m['shards']} shards of "
        f"{args.shard_size}, median of {args.repeats} (same dataset_sha256 in every mode)\n"
    )
    print(
        "| mode | CPUs | wall s (median) | p95 | scenarios/s | speedup vs local_1 "
        "| overhead per task ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['cpus']} | {r['wall_s_median']:.2f} | {r['wall_s_p95']:.2f} "
            f"| {r['scenarios_per_s']:.2f} | {r['speedup_over_local_1']:.2f}x "
            f"| {r['overhead_per_task_ms']:.1f} |"
        )
    print(
        f"\nRay runtime start-up {ray_start:.1f} s; its first (cold) run "
        f"{result['ray_cold_first_run_s']:.1f} s; overhead from {args.tiny} one-scenario tasks "
        f"(work {1e3 * work:.1f} ms each in-process)"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
