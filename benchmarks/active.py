"""Active learning benchmark: test error against the solver runs in the train split, for rounds
of ensemble-picked scenarios and for Latin-hypercube designs of the same sizes, in one run.

    python benchmarks/active.py [--only cascaded_tanks,robertson] [--rounds 4] [--k 16] [--n0 32]

Per system (its shipped experiment, epochs as the experiment says unless --epochs):

1. base: twin-generate n0 + val + test in-box scenarios (splits n0 / val / test), seed 0.
2. active: train on the base; then `rounds` times: twin-generate n_new=k extend_from=<last run>
   acquisition=disagreement (a pool of --pool candidates) and train again on the extended data.
3. LHS: at every size n0 + r k, a copy of the base extended once by n - n0 scenarios with
   acquisition=random (the design's own Latin hypercube of n - n0, no model), then trained.

Both curves therefore share the val split (early stopping, conformal scale), the test split the
error is measured on, the first n0 train scenarios, the recipe and the training seed: only the
added scenarios differ, and their count (solver runs) is the x axis. The LHS curve at n is the
base's LHS of n0 joined by a fresh LHS of n - n0, not one LHS of n (a single design of n would
need its own val/test split and so another test set); both halves are stratified over the box.

Reported per system: the LHS's final accuracy (test median relative L2 at the largest size), the
train runs each method needs to reach it (the first size at or below it; none if never), their
ratio (the goal: active <= 50% of LHS's), and the whole curves. Writes benchmarks/results/
active.json and active.png (error vs solver runs), prints a table. Everything but the base
dataset is made anew in --work on every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _runs import BIN, generate, sh  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "active.json"
SYSTEMS = {  # system -> its shipped experiment (each trains in about a minute at these sizes)
    "cascaded_tanks": "cascaded_tanks_node",
    "robertson": "robertson_emulator",
    # errors concentrate where it ignites (the physics amplifies a state error up to ~70x there,
    # ~3x elsewhere): the case where asking the ensemble should pay, if anywhere
    "cstr": "cstr_flowmap",
}
GOAL_RATIO = 0.5


def generate_base(system: str, data: Path, n0: int, val: int, test: int) -> None:
    n = n0 + val + test
    splits = f"{{train: {n0 / n!r}, val: {val / n!r}, test: {test / n!r}}}"
    # val calibrates here (no calibration split): both curves share it, and only the train
    # scenarios' count is the x axis
    generate(system, n, data, extra=(f"design.splits={splits}", "design.calibration_fraction=0"))


def extend(data: Path, n_new: int, acquisition: str, seed: int, run: Path | None, pool: int):
    args = [f"out_dir={data}", f"n_new={n_new}", f"acquisition={acquisition}", f"seed={seed}"]
    if run is not None:
        args += [f"extend_from={run}", f"pool_size={pool}"]
    return sh(BIN / "twin-generate", *args, "workers=0", "progress=false")


def train(experiment: str, data: Path, run: Path, epochs: int | None) -> float:
    """twin-train on data into run/ (new); the wall time in seconds."""
    shutil.rmtree(run, ignore_errors=True)
    extra = [f"trainer.max_epochs={epochs}"] if epochs else []
    return sh(
        BIN / "twin-train",
        f"experiment={experiment}",
        f"data_dir={data}",
        f"out_dir={run}",
        "logger=none",
        "speed_scenarios=2",
        "threads=1",
        *extra,
    )


def point(data: Path, run: Path, wall: float, extend_s: float | None) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    counts = json.loads((data / "manifest.json").read_text())["counts"]
    return {
        "n_train": counts["train"],
        "rel_l2_median": m["test/rel_l2_median"],
        "rel_l2_p95": m["test/rel_l2_p95"],
        "coverage_90": m["test/coverage_90"],
        "epochs": m["detail"]["train"]["epochs"],
        "train_s": wall,
        "extend_s": extend_s,
    }


def runs_to_reach(curve: list[dict], target: float) -> int | None:
    """The fewest train runs at which the curve's error is at or below target (None: never)."""
    for p in curve:
        if p["rel_l2_median"] <= target:
            return p["n_train"]
    return None


def bench_system(system: str, args) -> dict:
    experiment = SYSTEMS[system]
    work = Path(args.work) / system
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base = work / "base"  # kept between runs (twin-generate finds it complete); the rest is new
    for old in work.iterdir():
        if old.name != "base":
            shutil.rmtree(old)
    generate_base(system, base, args.n0, args.val, args.test)
    sizes = [args.n0 + r * args.k for r in range(args.rounds + 1)]

    # active: train, extend by k where the ensemble disagrees most, train again
    data = work / "active"
    shutil.copytree(base, data)
    active, run, ext_s = [], None, None
    for r in range(args.rounds + 1):
        if r:
            ext_s = extend(data, args.k, args.acquisition, r, run, args.pool)
        run = work / f"active-run{r}"
        wall = train(experiment, data, run, args.epochs)
        active.append(point(data, run, wall, ext_s))
        print(f"  {system} active n={active[-1]['n_train']}: {active[-1]['rel_l2_median']:.4f}")

    # LHS: the base joined by a fresh Latin hypercube of n - n0 (the design's sampler, no model)
    lhs = [{**active[0], "extend_s": None}]
    for n in sizes[1:]:
        d = work / f"lhs{n}"
        shutil.copytree(base, d)
        ext_s = extend(d, n - args.n0, "random", 1, None, args.pool)
        run = work / f"lhs-run{n}"
        wall = train(experiment, d, run, args.epochs)
        lhs.append(point(d, run, wall, ext_s))
        print(f"  {system} lhs    n={lhs[-1]['n_train']}: {lhs[-1]['rel_l2_median']:.4f}")

    target = lhs[-1]["rel_l2_median"]
    need_lhs, need_active = runs_to_reach(lhs, target), runs_to_reach(active, target)
    ratio = None if need_active is None else need_active / need_lhs
    rounds = json.loads((data / "manifest.json").read_text()).get("rounds", [])
    return {
        "system": system,
        "experiment": experiment,
        "epochs": args.epochs or active[0]["epochs"],
        "n0": args.n0,
        "k": args.k,
        "rounds": args.rounds,
        "val": args.val,
        "test": args.test,
        "pool_size": args.pool,
        "acquisition": args.acquisition,
        "active": active,
        "lhs": lhs,
        "lhs_final_rel_l2_median": target,
        "runs_to_lhs_final": {"lhs": need_lhs, "active": need_active},
        "ratio": ratio,
        "goal_met": None if ratio is None else ratio <= GOAL_RATIO,
        "active_final_vs_lhs_final": active[-1]["rel_l2_median"] / target,
        "picked_scores": [rd["scores"]["picked"]["median"] for rd in rounds if rd.get("scores")],
        "pool_scores": [rd["scores"]["pool"]["median"] for rd in rounds if rd.get("scores")],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from twin_ml._io import save_figure

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        for key, label, style in (
            ("lhs", "LHS (random extension)", "s--"),
            ("active", "active", "o-"),
        ):
            c = r[key]
            name = label if key == "lhs" else f"active ({r['acquisition']})"
            ax.plot([p["n_train"] for p in c], [p["rel_l2_median"] for p in c], style, label=name)
        ax.axhline(r["lhs_final_rel_l2_median"], color="grey", lw=0.8, ls=":", label="LHS final")
        ax.set_yscale("log")
        ax.set_xlabel("solver runs in the train split")
        ax.set_ylabel("test median relative L2")
        ratio = "not reached" if r["ratio"] is None else f"{r['ratio']:.2f}"
        name = f"{r['experiment']} ({r['acquisition']})"
        ax.set_title(f"{name}: runs ratio to LHS final {ratio}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def table(results: list[dict]) -> str:
    lines = [
        "| experiment | train runs | rel L2 median: active | LHS | p95: active | LHS |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for a, b in zip(r["active"], r["lhs"]):
            lines.append(
                f"| {r['experiment']} ({r['acquisition']}) | {a['n_train']} | "
                f"{a['rel_l2_median']:.4f} | "
                f"{b['rel_l2_median']:.4f} | {a['rel_l2_p95']:.4f} | {b['rel_l2_p95']:.4f} |"
            )
    lines += [
        "",
        "| experiment | LHS final (runs) | runs to reach it: LHS | active | ratio | goal <= 0.5 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        need = r["runs_to_lhs_final"]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['experiment']} ({r['acquisition']}) | "
            f"{r['lhs_final_rel_l2_median']:.4f} ({r['lhs'][-1]['n_train']}) "
            f"| {need['lhs']} | {need['active'] if need['active'] is not None else 'not reached'} "
            f"| {ratio} | {'met' if r['goal_met'] else 'missed'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default=",".join(SYSTEMS), help="systems, comma-separated")
    ap.add_argument("--n0", type=int, default=32, help="train scenarios of the base design")
    ap.add_argument("--k", type=int, default=16, help="scenarios added per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--val", type=int, default=32)
    ap.add_argument("--test", type=int, default=96)
    ap.add_argument("--pool", type=int, default=256, help="candidates scored per round")
    ap.add_argument(
        "--acquisition", default="disagreement", choices=("disagreement", "relative", "interval")
    )
    ap.add_argument("--epochs", type=int, default=None, help="default: the experiment's")
    ap.add_argument("--work", default=str(ROOT / "data" / "bench-active"))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    systems = [s for s in args.only.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; systems: {', '.join(SYSTEMS)}")
    out = Path(args.out)
    results = []
    for system in systems:
        print(f"{system} ({SYSTEMS[system]}) ...", flush=True)
        results.append(bench_system(system, args))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"systems": results}, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(table(results))
    print(out)


if __name__ == "__main__":
    main()
