"""Export benchmark: onnxruntime vs torch eager, and the exported surrogate vs the physics solver.

For each experiment (default: the pendulum neural ODE, the Robertson emulator (the stiff system)
and the pendulum and tanks hybrid flow maps), in one run on the same machine:
  1. onnxruntime vs torch eager, the same intra-op threads, M=5, a 100-step rollout (emulators:
     their training grid), batch 1 and batch --batch; and onnxruntime with one intra-op thread
     at batch 1;
  2. the exported model at batch --batch against the solver on the same in-domain scenarios
     (looped solve_ivp and the stacked solve), as ratios, with the median relative L2 error of
     the ensemble mean against the solver.

    python benchmarks/export.py [--batch 1024] [--repeats 5] [--quick]

Trains what it needs with twin-train (datasets via twin-generate) under runs/bench-export/ when
the runs are missing; writes benchmarks/results/export.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OUT = ROOT / "benchmarks" / "results" / "export.json"
EXPERIMENTS = {
    "pendulum_node": "pendulum",
    "robertson_emulator": "robertson",
    # flow maps: one network evaluation per step, beside the RK4 hybrids they compare with (four)
    "pendulum_hybrid": "pendulum",
    "pendulum_flowmap": "pendulum",
    "cascaded_tanks_hybrid": "cascaded_tanks",
    "cascaded_tanks_flowmap": "cascaded_tanks",
}


def sh(*args) -> None:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")


def ensure_run(experiment: str, system: str, n: int, epochs: int | None) -> Path:
    data = ROOT / "data" / f"{system}-n{n}-s0"
    run = ROOT / "runs" / "bench-export" / experiment
    if (run / "model" / "model.json").exists() and "design" in json.loads(
        (run / "model" / "model.json").read_text()
    ):
        return run
    sh(
        BIN / "twin-generate",
        f"system={system}",
        f"n_scenarios={n}",
        "seed=0",
        f"out_dir={data}",
        "workers=0",
        "progress=false",
    )
    extra = [f"trainer.max_epochs={epochs}"] if epochs else []
    sh(
        BIN / "twin-train",
        f"experiment={experiment}",
        f"data_dir={data}",
        f"out_dir={run}",
        "logger=none",
        *extra,
    )
    return run


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def bench(experiment: str, run: Path, batch: int, repeats: int, seed: int) -> dict:
    import torch

    from twin_ml._ort import session
    from twin_ml.export.export import export_run, in_domain_scenarios
    from twin_ml.models import load_trained
    from twin_ml.models.surrogates import Emulator
    from twin_ml.physics import SolverSettings, solve_looped, solve_stacked

    threads = torch.get_num_threads()
    model, meta = load_trained(run / "model")
    t0 = time.perf_counter()
    data, card = export_run(run, name=experiment.replace("_", "-"), version="bench")
    export_s = time.perf_counter() - t0
    dt, n_train = meta["time"]["dt"], meta["time"]["n"]
    emulator = isinstance(model, Emulator)

    sess, sess1 = session(data, threads=threads), session(data, threads=1)
    # 1. onnxruntime vs torch eager on a 100-step rollout
    n_times = n_train if emulator else 101
    s = in_domain_scenarios(model, meta["design"], batch, n_times, dt, seed=seed)
    rows = {}
    for b in (1, batch):
        feeds = {k: s[k][:b].astype(np.float32) for k in ("x0", "u", "p")}
        args = [torch.tensor(feeds[k]) for k in ("x0", "u", "p")]
        tt = torch.tensor(s["t"], dtype=torch.float32)
        t_torch = median_time(
            lambda args=args, tt=tt: model.predict(*args, tt),
            repeats if b == 1 else max(2, repeats // 2),
        )
        t_ort = median_time(lambda feeds=feeds: sess.run(None, feeds), repeats)
        rows[f"batch_{b}"] = {"torch_s": t_torch, "ort_s": t_ort, "speedup": t_torch / t_ort}
        if b == 1:
            t1 = median_time(lambda feeds=feeds: sess1.run(None, feeds), repeats)
            rows["batch_1"].update(ort_1thread_s=t1, speedup_1thread=t_torch / t1)
    # 2. onnxruntime at batch `batch` vs the solver on the same scenarios, the training horizon
    s = in_domain_scenarios(model, meta["design"], batch, n_train, dt, seed=seed + 1)
    feeds = {k: s[k].astype(np.float32) for k in ("x0", "u", "p")}
    system, settings = model.system, SolverSettings().resolved(model.system)
    t_ort = median_time(lambda: sess.run(None, feeds), repeats)
    t0 = time.perf_counter()
    ref = solve_looped(system, s["t"], s["u"], s["p"], s["x0"], settings)
    t_loop = time.perf_counter() - t0
    t_stack = median_time(
        lambda: solve_stacked(system, s["t"], s["u"], s["p"], s["x0"], settings), 2
    )
    y = np.asarray(ref.y if hasattr(ref, "y") else ref["y"], dtype=np.float64)
    ok = np.all(np.isfinite(y), axis=(1, 2))
    mean = sess.run(["mean"], feeds)[0].astype(np.float64)
    rel = np.linalg.norm((mean - y)[ok].reshape(ok.sum(), -1), axis=1) / np.linalg.norm(
        y[ok].reshape(ok.sum(), -1), axis=1
    )
    return {
        "experiment": experiment,
        "kind": model.kind,
        "members": model.members,
        "threads": threads,
        "export_s": export_s,
        "parity": card.parity,
        "integrator_error": card.integrator_error,
        "rollout_steps": n_times - 1,
        **rows,
        "vs_solver": {
            "n_scenarios": batch,
            "n_times": n_train,
            "ort_s": t_ort,
            "looped_s": t_loop,
            "stacked_s": t_stack,
            "x_looped": t_loop / t_ort,
            "x_stacked": t_stack / t_ort,
            "rel_l2_median": float(np.median(rel)),
            "rel_l2_p95": float(np.percentile(rel, 95)),
            "n_solver_ok": int(ok.sum()),
        },
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="64-scenario datasets, 5 epochs, batch 64 (a smoke run)",
    )
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated subset")
    args = ap.parse_args(argv)
    n, epochs, batch = (64, 5, 64) if args.quick else (256, None, args.batch)
    results = []
    for experiment in args.experiments.split(","):
        system = EXPERIMENTS[experiment]
        run = ensure_run(experiment, system, n, epochs)
        results.append(bench(experiment, run, batch, args.repeats, seed=11))
    print(
        f"| experiment | ort x torch b1 | ort(1 thread) x torch b1 | ort x torch b{batch} | "
        "ort x looped | "
        "ort x stacked | rel L2 median vs solver | p95 | parity max diff b1 / b64 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        v = r["vs_solver"]
        print(
            f"| {r['experiment']} | {r['batch_1']['speedup']:.1f} | "
            f"{r['batch_1']['speedup_1thread']:.1f} | "
            f"{r[f'batch_{batch}']['speedup']:.2f} | {v['x_looped']:.0f} | {v['x_stacked']:.1f} | "
            f"{v['rel_l2_median']:.4f} | {v['rel_l2_p95']:.4f} | "
            f"{r['parity']['batch_1']['max_diff']:.1e} / "
            f"{r['parity']['batch_64']['max_diff']:.1e} |"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    out = (
        OUT.with_name(f"export-{'-'.join(r['experiment'] for r in results)}.json")
        if len(results) < len(EXPERIMENTS)
        else OUT
    )
    out.write_text(json.dumps({"batch": batch, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
