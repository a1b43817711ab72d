"""Reduced-order surrogates of a costly field system against the strongest solver, side by side in
one run (issue 20's numbers).

    python benchmarks/fields.py [--out benchmarks/results/fields.json] [--n 1024] [--batch 1024]
        [--looped 8] [--strong 64] [--grids 16,32,64] [--fresh 256]
        [--experiments heat_plate_rom,...] [--quick]

1. Trains (when not in the store under runs/bench-fields/) each experiment on a --n scenario
   heat_plate dataset at the default 32 x 32 grid and exports it (training time reported apart).
   The experiments' max_epochs are set for 256 scenarios; on --n scenarios each trains
   max_epochs * 256 / n epochs (at least 1), the same number of optimizer steps (--epochs: the
   same for all). 1024 scenarios give a validation split of ~138 for the conformal scale: on 38
   (256 scenarios) the 90% coverage it gives scatters by +-0.022 between draws (measured by
   recalibrating the rom on random 38-scenario subsets of 845 solved scenarios), on 150 by +-0.014.
2. Accuracy on the dataset's test split, from the exported file (onnxruntime): probe relative L2
   per scenario (median, p95) as twin-train reports it, and a stricter one: the relative L2 of
   the probes' *change* from their initial values (temperatures near 25 degC make the plain one
   small); 90% interval coverage of the calibrated std. The same on --fresh new scenarios of the
   training design, solved as the dataset was (looped, default tolerances), and the first
   --tight of them against a tight-tolerance reference, beside the default solver's own error:
   at rtol 1e-6 the reference errs by about as much as the rom.
3. Speed at batch --batch (M = 5 members), per scenario: the surrogate (onnxruntime, every core)
   against the looped reference (one sparse BDF solve_ivp per scenario, timed on --looped
   scenarios), the stacked solve (all scenarios in one block-sparse BDF solve) and the process
   pool (every core, each part stacked), both on --strong scenarios; the strongest is the faster.
4. Cost against the grid (--grids): per scenario, the looped and the strongest solver and each
   reduced model's rollout with the same architecture, its basis fitted on that grid's solver
   snapshots (cost only: a rollout's cost does not depend on its weights; accuracy is measured at
   the default grid in 2.).

Writes one JSON (settings, rows per experiment, the grid table) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from _runs import generate, stored_model

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench-fields"
OUT = ROOT / "benchmarks" / "results" / "fields.json"
SYSTEM = "heat_plate"
EXPERIMENTS = ("heat_plate_rom", "heat_plate_latent", "heat_plate_emulator")


def ensure_data(n: int, env: dict) -> tuple[Path, float | None]:
    data = WORK / "data" / f"{SYSTEM}-n{n}"
    if (data / "manifest.json").exists():
        return data, None
    return data, generate(SYSTEM, n, data, env)


RECIPE_SCENARIOS = 256  # the dataset size the experiments' max_epochs are set for


def scaled_epochs(experiment: str, n: int) -> int:
    """The experiment's max_epochs * RECIPE_SCENARIOS / n (at least 1): its optimizer steps."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "configs" / "experiment" / f"{experiment}.yaml")
    return max(1, round(int(cfg.trainer.max_epochs) * RECIPE_SCENARIOS / n))


def ensure_model(experiment: str, data: Path, env: dict, n: int, epochs: int | None):
    """(the stored ref, the training's seconds, the run directory)."""
    if epochs is None and n != RECIPE_SCENARIOS:
        epochs = scaled_epochs(experiment, n)
        run = WORK / f"runs-n{n}-steps{RECIPE_SCENARIOS}" / experiment
    else:
        run = WORK / f"runs-n{n}-e{epochs or 'default'}" / experiment
    ref, train_s = stored_model(experiment, data, run, env, epochs)
    return ref, train_s, run


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def scenarios(system, design: dict, n: int, seed: int) -> dict[str, np.ndarray]:
    """n in-domain scenarios of the training design (its signals too)."""
    from twin_ml.data import ScenarioDesign
    from twin_ml.data.generate import scenario_inputs

    fields = {k: v for k, v in design.items() if k != "box"}
    d = ScenarioDesign(**{**fields, "extrapolation_fraction": 0.0, "calibration_fraction": 0.0})
    scen = d.sample(system, n, seed)
    t = d.time_grid(system)
    return {
        "t": t,
        "x0": scen.x0,
        "u": scenario_inputs(t, d.signal_specs(system), scen, seed),
        "p": scen.p,
    }


CHUNKS = (4, 8, 16)  # the pool's stack sizes tried besides one part per core


def solver_times(system, s: dict, n_looped: int, n_strong: int, repeats: int) -> dict:
    """Seconds per scenario: looped, stacked, pooled (every core; one part per core, and in
    stacks of each of CHUNKS scenarios), and the strongest of them."""
    from twin_ml.physics import SolverSettings, solve_looped, solve_pooled, solve_stacked

    settings = SolverSettings()

    def part(k):
        return [s[key][:k] for key in ("u", "p", "x0")]

    u, p, x0 = part(n_looped)
    looped = median_time(lambda: solve_looped(system, s["t"], u, p, x0, settings), 1) / n_looped
    u, p, x0 = part(n_strong)
    stacked = median_time(lambda: solve_stacked(system, s["t"], u, p, x0, settings), 1) / n_strong
    pooled = (
        median_time(lambda: solve_pooled(system, s["t"], u, p, x0, settings), max(1, repeats - 2))
        / n_strong
    )
    chunked = {
        c: median_time(lambda c=c: solve_pooled(system, s["t"], u, p, x0, settings, chunk=c), 1)
        / n_strong
        for c in CHUNKS
    }
    strongest = min(
        ("stacked", stacked),
        ("pooled", pooled),
        *((f"pooled in stacks of {c}", v) for c, v in chunked.items()),
        key=lambda kv: kv[1],
    )
    return {
        "looped_s": looped,
        "stacked_s": stacked,
        "pooled_s": pooled,
        "pooled_chunk_s": {str(c): v for c, v in chunked.items()},
        "pool_workers": os.cpu_count(),
        "strongest": strongest[0],
        "strongest_s": strongest[1],
        "n_looped": n_looped,
        "n_strong": n_strong,
    }


def surrogate_time(onnx, s: dict, batch: int, repeats: int) -> float:
    """Seconds per scenario of one onnxruntime call on `batch` scenarios (every core)."""
    from twin_ml._ort import session

    sess = session(onnx)
    reps = -(-batch // len(s["p"]))
    feeds = {k: np.concatenate([s[k]] * reps)[:batch].astype(np.float32) for k in ("x0", "u", "p")}
    return median_time(lambda: sess.run(["mean", "std"], feeds), repeats) / batch


def accuracy(onnx, data: Path) -> dict:
    """Probe accuracy and coverage of the exported model on the dataset's test split."""
    from twin_ml.data import Dataset

    test = Dataset.open(data).load("test")
    return {"n_test": len(test["y"]), **scores(onnx, test)}


def scores(onnx, s: dict) -> dict:
    """Probe accuracy and coverage of the exported model on scenarios s (x0, u, p, y)."""
    from twin_ml._ort import session
    from twin_ml.evaluate.metrics import accuracy as acc
    from twin_ml.uq.metrics import coverage

    sess = session(onnx)
    feeds = {k: s[k].astype(np.float32) for k in ("x0", "u", "p")}
    mean, std = (a.astype(np.float64) for a in sess.run(["mean", "std"], feeds))
    y = s["y"]
    a = acc(y, mean, np.ones(y.shape[-1]), [f"y{j}" for j in range(y.shape[-1])])
    change = np.linalg.norm((mean - y).reshape(len(y), -1), axis=1) / np.maximum(
        np.linalg.norm((y - y[:, :1]).reshape(len(y), -1), axis=1), 1e-12
    )
    return {
        "rel_l2_median": a["rel_l2_median"],
        "rel_l2_p95": a["rel_l2_p95"],
        "change_rel_l2_median": float(np.median(change)),
        "change_rel_l2_p95": float(np.percentile(change, 95)),
        "coverage_90": float(coverage(y, mean, std, 0.90)),
        "rmse_degC": float(np.sqrt(np.mean((mean - y) ** 2))),
    }


TIGHT = {"rtol": 1e-10, "atol": 1e-12}  # the reference the solver's own error is measured against


def fresh_scenarios(system, design: dict, n: int, n_tight: int) -> dict:
    """n new in-domain scenarios of the training design (a seed no split used), solved as
    twin-generate solves the dataset (one sparse BDF solve_ivp per scenario at the default
    tolerances, spread over a process pool): a test set drawn like the splits, for the coverage,
    whose scatter on a split's ~150 scenarios is about +-0.015. The first n_tight are solved again
    at TIGHT tolerances ("y_tight"): at the defaults (rtol 1e-6) the reference's own probe error
    (~2e-4 degC RMS on the plate) is the size of a reduced model's, so a model's error against
    the dataset is partly the solver's."""
    from twin_ml.physics import SolverSettings, solve_pooled

    s = scenarios(system, design, n, seed=777)
    r = solve_pooled(system, s["t"], s["u"], s["p"], s["x0"], SolverSettings(), stacked=False)
    ok = r.status == 0
    out = {"x0": s["x0"][ok], "u": s["u"][ok], "p": s["p"][ok], "y": r.y[ok]}
    k = min(n_tight, len(out["y"]))
    if k:
        tight = solve_pooled(
            system,
            s["t"],
            *(out[key][:k] for key in ("u", "p", "x0")),
            SolverSettings(**TIGHT),
            stacked=False,
        )
        if not np.all(tight.status == 0):
            raise SystemExit(f"the tight reference failed on {int((tight.status != 0).sum())}")
        out["y_tight"] = tight.y
    return out


def tight_scores(onnx, s: dict) -> dict:
    """The model's probe error against the TIGHT reference, beside the default solver's own, on
    the scenarios that have one: relative L2 per scenario (median, p95), RMSE (degC), and the
    coverage of the truth by the 90% intervals (calibrated against default-tolerance data, so
    they hold the solver's error too)."""
    k = len(s["y_tight"])
    sub = {key: s[key][:k] for key in ("x0", "u", "p")}
    model = scores(onnx, {**sub, "y": s["y_tight"]})
    rel = np.linalg.norm((s["y"][:k] - s["y_tight"]).reshape(k, -1), axis=1) / np.linalg.norm(
        s["y_tight"].reshape(k, -1), axis=1
    )
    return {
        "n": k,
        "rel_l2_median": model["rel_l2_median"],
        "rel_l2_p95": model["rel_l2_p95"],
        "rmse_degC": model["rmse_degC"],
        "coverage_90": model["coverage_90"],
        "solver_rel_l2_median": float(np.median(rel)),
        "solver_rmse_degC": float(np.sqrt(np.mean((s["y"][:k] - s["y_tight"]) ** 2))),
    }


def grid_row(shape: int, args, design: dict, archs: dict) -> dict:
    """Cost per scenario at one grid: the solvers, and each reduced model's rollout (its basis
    fitted on this grid's solver snapshots, the trained model's architecture)."""
    import torch

    from twin_ml.export.onnx_export import build_onnx
    from twin_ml.models import build_model, field_stats
    from twin_ml.physics import SolverSettings, make_system, solve_looped

    system = make_system(SYSTEM, shape=[shape, shape])
    s = scenarios(system, design, max(args.grid_looped, 8), seed=4242)
    row = {"grid": f"{shape}x{shape}", "cells": shape * shape}
    row.update(solver_times(system, s, args.grid_looped, args.grid_strong, 3))
    snaps = solve_looped(system, s["t"], s["u"], s["p"], s["x0"], SolverSettings())
    stats = field_stats(s["x0"], s["u"], s["p"], snaps.y, s["t"])
    for kind, cfg in archs.items():
        torch.manual_seed(0)
        m = build_model(
            kind,
            system,
            stats,
            rank=cfg["rank"],
            snapshots=snaps.x[:, :: system.snapshot_stride],
            snapshot_stride=system.snapshot_stride,
            members=cfg["members"],
            hidden=cfg["hidden"],
            depth=cfg["depth"],
            step_fraction=cfg["step_fraction"],
        ).eval()
        onnx = build_onnx(m, float(s["t"][1] - s["t"][0])).SerializeToString()
        row[f"{kind}_s"] = surrogate_time(onnx, s, args.batch, args.repeats)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--n", type=int, default=1024, help="scenarios in the dataset")
    ap.add_argument("--epochs", type=int, default=None, help="override the experiments' max_epochs")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--looped", type=int, default=8, help="scenarios timed looped")
    ap.add_argument("--strong", type=int, default=64, help="scenarios timed stacked and pooled")
    ap.add_argument("--grids", default="16,32,64")
    ap.add_argument("--grid-looped", type=int, default=4)
    ap.add_argument("--grid-strong", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--fresh", type=int, default=256, help="new scenarios scored besides the test split"
    )
    ap.add_argument(
        "--tight", type=int, default=64, help="fresh scenarios also solved at tight tolerances"
    )
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS))
    ap.add_argument("--quick", action="store_true", help="64 scenarios, 3 epochs, small timings")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.epochs, args.batch, args.looped, args.strong = 64, 3, 64, 2, 8
        args.grid_looped, args.grid_strong, args.grids, args.repeats = 2, 4, "16,32", 2
        args.fresh, args.tight = 16, 4
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(WORK / ("store-quick" if args.quick else "store"))
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"
    env = dict(os.environ)

    from omegaconf import OmegaConf

    from twin_ml import registry
    from twin_ml._io import atomic_write_json
    from twin_ml.physics import make_system

    data, gen_s = ensure_data(args.n, env)
    print(f"dataset {data} ({f'generated in {gen_s:.0f} s' if gen_s else 'found'})", flush=True)
    system = make_system(SYSTEM)
    rows, archs, design = [], {}, None
    for exp in args.experiments.split(","):
        print(f"[{exp}] training / export", flush=True)
        ref, train_s, run = ensure_model(exp, data, env, args.n, args.epochs)
        path, card = registry.onnx_path(ref)
        meta = json.loads((run / "model" / "model.json").read_text())
        design = meta["design"]
        if card.kind in ("latent", "rom"):
            archs[card.kind] = meta["config"]
        onnx = Path(path).read_bytes()
        epochs = int(OmegaConf.load(run / "config.yaml").trainer.max_epochs)
        row = {"experiment": exp, "kind": card.kind, "model": ref, "train_s": train_s}
        row["epochs"] = epochs
        row.update(accuracy(onnx, data))
        rows.append(row)
    if args.fresh:
        print(f"{args.fresh} fresh scenarios (solver, looped in a pool)", flush=True)
        fresh = fresh_scenarios(system, design, args.fresh, args.tight)
        for row in rows:
            onnx = Path(registry.onnx_path(row["model"])[0]).read_bytes()
            row["fresh"] = {"n": len(fresh["y"]), **scores(onnx, fresh)}
            if "y_tight" in fresh:
                row["tight"] = tight_scores(onnx, fresh)
    s = scenarios(system, design, max(args.strong, args.looped), seed=4242)
    print(f"timing the solvers ({args.looped} looped, {args.strong} stacked / pooled)", flush=True)
    solver = solver_times(system, s, args.looped, args.strong, args.repeats)
    for row in rows:
        onnx = Path(registry.onnx_path(row["model"])[0]).read_bytes()
        sur = surrogate_time(onnx, s, args.batch, args.repeats)
        row["surrogate_s"] = sur
        row["speedup_vs_looped"] = solver["looped_s"] / sur
        row["speedup_vs_strongest"] = solver["strongest_s"] / sur
    grid = []
    for g in (int(v) for v in args.grids.split(",")):
        print(f"grid {g}x{g}", flush=True)
        grid.append(grid_row(g, args, design, archs))
    result = {
        "system": SYSTEM,
        "grid": "32x32",
        "batch": args.batch,
        "n_dataset": args.n,
        "solver": solver,
        "rows": rows,
        "grid_cost": grid,
        "cpu_count": os.cpu_count(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(
        f"\nsolver per scenario: looped {solver['looped_s']:.3f} s, stacked "
        f"{solver['stacked_s']:.3f} s, pooled ({solver['pool_workers']} cores) "
        f"{solver['pooled_s']:.3f} s, in stacks of "
        + ", ".join(f"{c}: {v:.3f} s" for c, v in solver["pooled_chunk_s"].items())
        + f"; strongest: {solver['strongest']}\n"
    )
    print(
        "| model | probe rel L2 median | p95 | change rel L2 median | p95 | coverage 90 "
        "| surrogate ms/scenario | x looped | x strongest | train s (epochs) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['rel_l2_median']:.2e} | {r['rel_l2_p95']:.2e} | "
            f"{r['change_rel_l2_median']:.3f} | {r['change_rel_l2_p95']:.3f} | "
            f"{r['coverage_90']:.3f} | {r['surrogate_s'] * 1e3:.3f} | "
            f"{r['speedup_vs_looped']:.0f} | {r['speedup_vs_strongest']:.0f} | "
            f"{r['train_s'] if r['train_s'] is None else round(r['train_s'])} ({r['epochs']}) |"
        )
    if args.fresh:
        print(f"\non {rows[0]['fresh']['n']} fresh scenarios:\n")
        print("| model | probe rel L2 median | p95 | coverage 90 |\n|---|---|---|---|")
        for r in rows:
            f = r["fresh"]
            print(
                f"| {r['kind']} | {f['rel_l2_median']:.2e} | {f['rel_l2_p95']:.2e} | "
                f"{f['coverage_90']:.3f} |"
            )
    if any("tight" in r for r in rows):
        k = rows[0]["tight"]
        print(
            f"\nagainst the tight reference (rtol {TIGHT['rtol']:g}) on {k['n']} of them; the "
            f"default solver's own error there: rel L2 median {k['solver_rel_l2_median']:.2e}, "
            f"RMSE {k['solver_rmse_degC']:.2e} degC\n"
        )
        print(
            "| model | probe rel L2 median | p95 | RMSE degC | coverage 90 |\n|---|---|---|---|---|"
        )
        for r in rows:
            g = r["tight"]
            print(
                f"| {r['kind']} | {g['rel_l2_median']:.2e} | {g['rel_l2_p95']:.2e} | "
                f"{g['rmse_degC']:.2e} | {g['coverage_90']:.3f} |"
            )
    kinds = [k for k in ("rom", "latent") if any(f"{k}_s" in g for g in grid)]
    print(
        "\n| grid | cells | looped s | strongest s | " + " | ".join(f"{k} ms" for k in kinds) + " |"
    )
    print("|---|---|---|---|" + "---|" * len(kinds))
    for g in grid:
        print(
            f"| {g['grid']} | {g['cells']} | {g['looped_s']:.3f} | "
            f"{g['strongest_s']:.3f} ({g['strongest']}) | "
            + " | ".join(f"{g[f'{k}_s'] * 1e3:.3f}" for k in kinds)
            + " |"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
