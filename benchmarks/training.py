"""Training benchmark: accuracy and coverage of the default experiments, and the cost of M=5
vectorized members against M=1 at the same epochs (whole-process wall time), in one run.

    python benchmarks/training.py [--epochs 40] [--quick]

Generates the datasets it needs under data/ (the twin-generate defaults), runs twin-train as a
subprocess per configuration, and writes benchmarks/results/training.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OUT = ROOT / "benchmarks" / "results" / "training.json"


def sh(*args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--epochs", type=int, default=None, help="override every experiment's max_epochs"
    )
    ap.add_argument(
        "--cost-epochs", type=int, default=30, help="epochs of the M=5 vs M=1 cost comparison"
    )
    ap.add_argument(
        "--quick", action="store_true", help="64-scenario datasets, 5 epochs (a smoke run)"
    )
    args = ap.parse_args(argv)
    n = 64 if args.quick else 256
    epochs = 5 if args.quick else args.epochs
    runs = ROOT / "runs" / "bench"
    rows = []
    for system, experiment in (
        ("pendulum", "pendulum_node"),
        ("pendulum", "pendulum_hybrid"),
        ("cascaded_tanks", "cascaded_tanks_hybrid"),
        ("cascaded_tanks", "cascaded_tanks_node"),
    ):
        data = ROOT / "data" / f"{system}-n{n}-s0"
        sh(
            BIN / "twin-generate",
            f"system={system}",
            f"n_scenarios={n}",
            "seed=0",
            f"out_dir={data}",
            "workers=0",
            "progress=false",
        )
        out = runs / experiment
        extra = [f"trainer.max_epochs={epochs}"] if epochs else []
        secs = sh(
            BIN / "twin-train",
            f"experiment={experiment}",
            f"data_dir={data}",
            f"out_dir={out}",
            "logger=none",
            "resume=false",
            *extra,
        )
        m = json.loads((out / "metrics.json").read_text())
        rows.append(
            {
                "experiment": experiment,
                "wall_s": secs,
                "fit_s": m["detail"]["train"]["fit_seconds"],
                "epochs": m["detail"]["train"]["epochs"],
                **{
                    k: m[k]
                    for k in (
                        "test/rel_l2_median",
                        "test/rel_l2_p95",
                        "test/coverage_90",
                        "extrapolation/rel_l2_median",
                        "extrapolation/coverage_90",
                    )
                },
                "speedup_vs_looped": m["detail"]["speed"]["speedup_vs_looped"],
                "speedup_vs_stacked": m["detail"]["speed"]["speedup_vs_stacked"],
            }
        )
    cost = {}
    data = ROOT / "data" / f"pendulum-n{n}-s0"
    for size in (1, 5):
        cost[size] = sh(
            BIN / "twin-train",
            "experiment=pendulum_node",
            f"data_dir={data}",
            f"out_dir={runs / f'cost-m{size}'}",
            "logger=none",
            f"ensemble.size={size}",
            f"trainer.max_epochs={args.cost_epochs}",
            "callbacks.early_stopping.patience=1000",
        )
    print(
        "| experiment | epochs | fit s | test rel L2 median | p95 | test cov90 | "
        "extrap rel L2 median | extrap cov90 | x looped | x stacked |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['experiment']} | {r['epochs']} | {r['fit_s']:.0f} | "
            f"{r['test/rel_l2_median']:.4f} | "
            f"{r['test/rel_l2_p95']:.4f} | {r['test/coverage_90']:.3f} | "
            f"{r['extrapolation/rel_l2_median']:.4f} | "
            f"{r['extrapolation/coverage_90']:.3f} | {r['speedup_vs_looped']:.1f} | "
            f"{r['speedup_vs_stacked']:.2f} |"
        )
    print(
        f"M=5 vs M=1 whole-process wall time at {args.cost_epochs} epochs: "
        f"{cost[5]:.1f} s / {cost[1]:.1f} s = "
        f"{cost[5] / cost[1]:.2f}x"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "rows": rows,
                "cost_m5_s": cost[5],
                "cost_m1_s": cost[1],
                "cost_ratio": cost[5] / cost[1],
                "n_scenarios": n,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
