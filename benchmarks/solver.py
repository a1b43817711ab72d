"""Physics baselines: looped vs stacked solve_ivp, per shipped system, side by side in one run.

For each system, the same N scenarios (the dataset generator's design and signals) are solved
  - looped:  one solve_ivp call per scenario (what dataset generation does), and
  - stacked: all N in one solve_ivp call on the stacked state, vectorized right-hand side
             (block-diagonal Jacobian sparsity / band for the implicit methods), and
  - pooled:  the N split over a process pool on every core, each part solved stacked (the
             parallel alternative a user with several cores could run),
with the system's preferred method at the default tolerances. Reports median and p95 wall time
over --repeats runs, the looped/stacked ratio, and each one's error against a tight-tolerance
reference (rtol 1e-10; Radau for stiff/moderate systems, DOP853 otherwise) on the first --n-ref
scenarios, as max |error| / range of each state. These are
the baselines surrogate speedups are measured against; the faster of stacked and pooled is the
strongest solver here ("best").

    python benchmarks/solver.py [--n 256] [--repeats 3] [--systems pendulum,cstr]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from twin_ml import code_version
from twin_ml._io import atomic_write_json
from twin_ml.data import ScenarioDesign
from twin_ml.data.generate import scenario_inputs
from twin_ml.physics import (
    SolverSettings,
    list_systems,
    make_system,
    solve_looped,
    solve_pooled,
    solve_stacked,
)

OUT = Path(__file__).parent / "results" / "solver.json"


def bench_system(name: str, n: int, repeats: int, seed: int, n_ref: int) -> dict:
    system = make_system(name)
    design = ScenarioDesign(extrapolation_fraction=0.0)
    scen = design.sample(system, n, seed)
    t = design.time_grid(system)
    u = scenario_inputs(t, design.signal_specs(system), scen, seed)
    settings = SolverSettings().resolved(system)
    times = {"looped": [], "stacked": [], "pooled": []}
    results = {}
    for _ in range(repeats):
        for mode, fn in (
            ("looped", solve_looped),
            ("stacked", solve_stacked),
            ("pooled", solve_pooled),
        ):
            t0 = time.perf_counter()
            results[mode] = fn(system, t, u, scen.p, scen.x0, settings)
            times[mode].append(time.perf_counter() - t0)
    a, b, c = results["looped"], results["stacked"], results["pooled"]
    ref_method = "DOP853" if system.stiffness == "nonstiff" else "Radau"
    k = min(n_ref, n)
    ref = solve_looped(
        system,
        t,
        u[:k],
        scen.p[:k],
        scen.x0[:k],
        SolverSettings(method=ref_method, rtol=1e-10, atol=1e-12),
    )
    span = np.ptp(ref.x, axis=(0, 1)) + 1e-300

    def err(r):
        return float(np.max(np.abs(r.x[:k] - ref.x) / span))

    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "system": name,
        "method": settings.method,
        "n_scenarios": n,
        "n_times": int(t.size),
        "looped_s_median": med["looped"],
        "looped_s_p95": float(np.percentile(times["looped"], 95)),
        "stacked_s_median": med["stacked"],
        "stacked_s_p95": float(np.percentile(times["stacked"], 95)),
        "pooled_s_median": med["pooled"],
        "pooled_s_p95": float(np.percentile(times["pooled"], 95)),
        "pooled_workers": os.cpu_count() or 1,
        "looped_per_scenario_ms": 1e3 * med["looped"] / n,
        "looped_over_stacked": med["looped"] / med["stacked"],
        "stacked_over_pooled": med["stacked"] / med["pooled"],
        "best": "stacked" if med["stacked"] <= med["pooled"] else "pooled",
        "best_s_median": min(med["stacked"], med["pooled"]),
        "pooled_failed": c.n_failed,
        "pooled_err_vs_ref": err(c),
        "looped_failed": a.n_failed,
        "stacked_failed": b.n_failed,
        "reference": f"{ref_method} rtol=1e-10 atol=1e-12 on {k} scenarios",
        "looped_err_vs_ref": err(a),
        "stacked_err_vs_ref": err(b),
        "rhs_evals_looped_mean": float(a.nfev.mean()),
        "rhs_evals_stacked": int(b.nfev[0]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--n-ref", type=int, default=16, help="scenarios checked against the tight reference"
    )
    ap.add_argument("--systems", default=",".join(list_systems()))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rows = []
    for name in args.systems.split(","):
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.append(bench_system(name, args.n, args.repeats, args.seed, args.n_ref))
    print(
        "| system | method | T | looped s | stacked s | pooled s | looped/stacked | "
        "stacked/pooled | looped ms/scenario | looped err | stacked err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['system']} | {r['method']} | {r['n_times']} | {r['looped_s_median']:.3f} | "
            f"{r['stacked_s_median']:.3f} | {r['pooled_s_median']:.3f} | "
            f"{r['looped_over_stacked']:.1f} | {r['stacked_over_pooled']:.2f} | "
            f"{r['looped_per_scenario_ms']:.2f} | "
            f"{r['looped_err_vs_ref']:.1e} | {r['stacked_err_vs_ref']:.1e} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        args.out,
        {
            "benchmark": "solver",
            "code_version": code_version(),
            "machine": platform.platform(),
            "python": platform.python_version(),
            "n_scenarios": args.n,
            "repeats": args.repeats,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
