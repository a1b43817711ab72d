"""Physics baselines: looped vs stacked solve_ivp, per shipped system, side by side in one run.

For each system, the same N scenarios (the dataset generator's design and signals) are solved
  - looped:  one solve_ivp call per scenario (what dataset generation does), and
  - stacked: all N in one solve_ivp call on the stacked state, vectorized right-hand side
             (block-diagonal Jacobian sparsity / band for the implicit methods), and
  - pooled:  the N split over a process pool on every core, each part solved stacked (the
             parallel alternative a user with several cores could run), and for field systems
             also in stacks of 8 scenarios (`solve_pooled(..., chunk=8)`), faster there,
with the system's preferred method at the default tolerances. Reports median and p95 wall time
over --repeats runs, the looped/stacked ratio, and each one's error against a tight-tolerance
reference (rtol 1e-10; Radau for stiff/moderate systems, DOP853 otherwise) on the first --n-ref
scenarios, as max |error| / range of each state. These are
the baselines surrogate speedups are measured against; the fastest of the three is the strongest
solver here ("best"). For the small ODE systems that is stacked or pooled; for a field system the
per-call overhead that stacking saves is small next to each step's sparse LU, so the three are
close (heat_plate: looped about as fast as stacked) and looped can win.

Field systems (a state per grid cell: heat_plate's 32 x 32 plate has 1024) solve each scenario in
about half a second, so they get --n-field scenarios (default 32) and --n-ref-field reference
scenarios (default 2); compare them by the per-scenario columns. --systems runs a subset; the rows
of the other systems already in --out are kept as they are (listed under "kept_rows" with the code
version they were measured with).

    python benchmarks/solver.py [--n 256] [--repeats 3] [--systems pendulum,cstr]
    python benchmarks/solver.py --systems heat_plate        # adds or refreshes heat_plate's row
"""

from __future__ import annotations

import argparse
import functools
import json
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
    FieldSystem,
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
    return _bench(system, name, n, repeats, seed, n_ref)


def _bench(system, name: str, n: int, repeats: int, seed: int, n_ref: int) -> dict:
    design = ScenarioDesign(extrapolation_fraction=0.0)
    scen = design.sample(system, n, seed)
    t = design.time_grid(system)
    u = scenario_inputs(t, design.signal_specs(system), scen, seed)
    settings = SolverSettings().resolved(system)
    modes = [("looped", solve_looped), ("stacked", solve_stacked), ("pooled", solve_pooled)]
    if isinstance(system, FieldSystem):  # small stacks beat one big one there (see the README)
        modes.append(("pooled_in_8s", functools.partial(solve_pooled, chunk=8)))
    times = {mode: [] for mode, _ in modes}
    results = {}
    for _ in range(repeats):
        for mode, fn in modes:
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
        "state_size": int(system.state_size),
        "code_version": code_version(),
        "looped_s_median": med["looped"],
        "looped_s_p95": float(np.percentile(times["looped"], 95)),
        "stacked_s_median": med["stacked"],
        "stacked_s_p95": float(np.percentile(times["stacked"], 95)),
        "pooled_s_median": med["pooled"],
        "pooled_s_p95": float(np.percentile(times["pooled"], 95)),
        "pooled_workers": os.cpu_count() or 1,
        "looped_per_scenario_ms": 1e3 * med["looped"] / n,
        "stacked_per_scenario_ms": 1e3 * med["stacked"] / n,
        "pooled_per_scenario_ms": 1e3 * med["pooled"] / n,
        "looped_over_stacked": med["looped"] / med["stacked"],
        "stacked_over_pooled": med["stacked"] / med["pooled"],
        "best": min(("stacked", *(m for m in med if m != "stacked")), key=med.__getitem__),
        "best_s_median": min(med.values()),
        "pooled_failed": c.n_failed,
        "pooled_err_vs_ref": err(c),
        "looped_failed": a.n_failed,
        "stacked_failed": b.n_failed,
        "reference": f"{ref_method} rtol=1e-10 atol=1e-12 on {k} scenarios",
        "looped_err_vs_ref": err(a),
        "stacked_err_vs_ref": err(b),
        "rhs_evals_looped_mean": float(a.nfev.mean()),
        "rhs_evals_stacked": int(b.nfev[0]),
        **(
            {
                "pooled_in_8s_s_median": med["pooled_in_8s"],
                "pooled_in_8s_per_scenario_ms": 1e3 * med["pooled_in_8s"] / n,
                "pooled_in_8s_err_vs_ref": err(results["pooled_in_8s"]),
            }
            if "pooled_in_8s" in med
            else {}
        ),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument(
        "--n-field", type=int, default=32, help="scenarios per field system (a state per cell)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--n-ref", type=int, default=16, help="scenarios checked against the tight reference"
    )
    ap.add_argument(
        "--n-ref-field", type=int, default=2, help="the same, for field systems (slow references)"
    )
    ap.add_argument("--systems", default=",".join(list_systems()))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rows = []
    for name in args.systems.split(","):
        print(f"... {name}", file=sys.stderr, flush=True)
        system = make_system(name)
        field = isinstance(system, FieldSystem)
        n, n_ref = (args.n_field, args.n_ref_field) if field else (args.n, args.n_ref)
        rows.append(_bench(system, name, n, args.repeats, args.seed, n_ref))
    kept, kept_version = _earlier_rows(args.out, {r["system"] for r in rows})
    print(
        "| system | method | T | N | looped s | stacked s | pooled s | looped/stacked | "
        "stacked/pooled | looped ms/scenario | stacked ms/scenario | pooled ms/scenario | "
        "looped err | stacked err | pool in stacks of 8: ms/scenario (fields) | best |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted([*rows, *kept], key=lambda r: r["system"]):
        print(
            f"| {r['system']} | {r['method']} | {r['n_times']} | {r['n_scenarios']} | "
            f"{r['looped_s_median']:.3f} | {r['stacked_s_median']:.3f} | "
            f"{r['pooled_s_median']:.3f} | "
            f"{r['looped_over_stacked']:.1f} | {r['stacked_over_pooled']:.2f} | "
            f"{r['looped_per_scenario_ms']:.2f} | "
            f"{_per_scenario(r, 'stacked')} | {_per_scenario(r, 'pooled')} | "
            f"{r['looped_err_vs_ref']:.1e} | {r['stacked_err_vs_ref']:.1e} | "
            f"{_per_scenario(r, 'pooled_in_8s') if 'pooled_in_8s_s_median' in r else '-'} | "
            f"{r['best']} |"
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
            "n_scenarios_field": args.n_field,
            "repeats": args.repeats,
            "rows": sorted([*rows, *kept], key=lambda r: r["system"]),
            # rows of systems this run did not measure, carried over from the earlier file
            "kept_rows": {r["system"]: r.get("code_version", kept_version) for r in kept},
        },
    )
    print(f"wrote {args.out}")
    return 0


def _per_scenario(row: dict, mode: str) -> str:
    ms = row.get(f"{mode}_per_scenario_ms", 1e3 * row[f"{mode}_s_median"] / row["n_scenarios"])
    return f"{ms:.2f}"


def _earlier_rows(path: Path, measured: set[str]) -> tuple[list[dict], str | None]:
    """The rows of systems not measured in this run, as an earlier results file holds them (if
    any), and that file's code version."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return [], None
    rows = [r for r in earlier.get("rows", []) if r.get("system") not in measured]
    return rows, earlier.get("code_version")


if __name__ == "__main__":
    sys.exit(main())
