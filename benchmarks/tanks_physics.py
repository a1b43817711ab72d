"""The Cascaded Tanks physics alone on the real rig: where `experiment=cascaded_tanks_real` starts.

    python benchmarks/tanks_physics.py [--out benchmarks/results/tanks_physics.json] \\
        [--fit-fraction 0.8]

For each physics structure, a least-squares fit to the estimation record's first 80% (the
benchmark's training data, less the fifth the experiment holds out for its conformal scale,
`calibration_tail: 0.2`; free run from h1(0), which is fitted too), integrated as the hybrid
integrates it (the fixed-step RK4 at the 4 s sample step, `fixed_steps`, so the start is stable in
training), then scored as the benchmark asks: a free run over the whole test record, its initial
upper level estimated from the first 25 samples only. The fitted estimate is re-simulated with the
solver (LSODA) as a check that the fixed step does not flatter it.

Structures:
  torricelli     k1..k5, h1(0), h1_max (k_overflow 0.5: larger rates are unstable at a 4 s step)
  linear_inflow  the same plus linear_inflow (k_lin * h1 added to the lower tank's inflow)
The hidden upper level's scale is free (only h2 is measured), so h1_max and h1(0) are in the
model's units, not volts on a sensor. ~2 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares, minimize_scalar

from twin_ml._io import atomic_write_bytes
from twin_ml.data.real import records
from twin_ml.models.surrogates import fixed_steps
from twin_ml.physics import SolverSettings, make_system, solve_looped

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "data" / "real" / "cascaded_tanks" / "dataBenchmark.csv"
OUT = ROOT / "benchmarks" / "results" / "tanks_physics.json"
DT, INIT_SAMPLES, SENSOR_MAX = 4.0, 25, 10.0
PARAMS = ["k1", "k2", "k3", "k4", "k5"]
#            k1..k4 [V^0.5/s, 1/s]   k5    h1(0)  h1_max  linear_inflow
START = np.array([0.065, 0.034, 0.033, 0.053, 0.9, 4.7, 10.0, 0.0])
LOWER = np.array([1e-3] * 4 + [0.0, 0.0, 2.0, 0.0])
UPPER = np.array([1.0] * 4 + [1.0, 40.0, 40.0, 1.0])
STRUCTURES = {"torricelli": 7, "linear_inflow": 8}  # how many of the values above each one fits


def system(theta: np.ndarray):
    lin = float(theta[7]) if len(theta) > 7 else None
    return make_system(
        "cascaded_tanks", h1_max=float(theta[6]), sensor_max=SENSOR_MAX, linear_inflow=lin
    )


def simulate(
    theta: np.ndarray, u: np.ndarray, y0: float, h1_0: np.ndarray | None = None
) -> np.ndarray:
    """Measured h2 of a free run with the fixed-step RK4; h1_0 (B,) runs a batch of initial
    levels."""
    sys_ = system(theta)
    h1 = np.atleast_1d(theta[5] if h1_0 is None else h1_0).astype(float)
    x = np.stack([h1, np.full_like(h1, y0)], axis=-1)
    p = np.broadcast_to(theta[:5], (len(h1), 5))
    out = np.empty((len(h1), len(u)))
    for k in range(len(u)):
        out[:, k] = sys_.observe(x, None, p)[:, 0]
        uk = np.full((len(h1), 1), u[k])
        x = fixed_steps(lambda z, s, uk=uk: sys_.rhs(0.0, z, uk, p), x, DT, 1, "rk4")
    return out


def initial_level(theta: np.ndarray, u: np.ndarray, y: np.ndarray) -> float:
    """h1(0) from the record's first samples only: a grid, then a bounded refinement."""
    n = INIT_SAMPLES
    grid = np.linspace(LOWER[5], UPPER[5], 161)
    best = grid[np.argmin(((simulate(theta, u[:n], y[0], grid) - y[:n]) ** 2).sum(1))]
    step = grid[1] - grid[0]
    r = minimize_scalar(
        lambda h: float(((simulate(theta, u[:n], y[0], np.array([h]))[0] - y[:n]) ** 2).sum()),
        bounds=(max(best - step, LOWER[5]), min(best + step, UPPER[5])),
        method="bounded",
    )
    return float(r.x)


def fit(n: int, u: np.ndarray, y: np.ndarray) -> np.ndarray:
    def residual(th):
        return simulate(th, u, y[0])[0] - y

    r = least_squares(
        residual,
        START[:n],
        bounds=(LOWER[:n], UPPER[:n]),
        x_scale=np.abs(START[:n]) + 1e-2,
        diff_step=1e-6,
        max_nfev=300,
    )
    return r.x


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--fit-fraction",
        type=float,
        default=0.8,
        help="the estimation record's leading fraction fitted "
        "(the experiment's 1 - calibration_tail)",
    )
    args = ap.parse_args(argv)
    if not 0.1 <= args.fit_fraction <= 1.0:
        ap.error(f"--fit-fraction must be in [0.1, 1], got {args.fit_fraction}")
    data = {
        rec: frame.pivot(index="timestamp", columns="signal", values="value")
        for rec, frame in records("cascaded_tanks", SOURCE).items()
    }
    (ue, ye), (ut, yt) = (
        (data[r]["pump"].to_numpy(), data[r]["h2"].to_numpy()) for r in ("estimation", "test")
    )
    t = np.arange(len(ue)) * DT
    rows = []
    for name, n in STRUCTURES.items():
        t0 = time.perf_counter()
        n_fit = len(ue) - int(
            round((1.0 - args.fit_fraction) * len(ue))
        )  # as the experiment cuts it
        theta = fit(n, ue[:n_fit], ye[:n_fit])
        seconds = time.perf_counter() - t0
        h1_test = initial_level(theta, ut, yt)
        test_theta = theta.copy()
        test_theta[5] = h1_test
        row = {
            "structure": name,
            **dict(zip(PARAMS, theta[:5].round(5).tolist())),
            "h1_0": round(theta[5], 3),
            "h1_max": round(theta[6], 3),
            "linear_inflow": round(theta[7], 5) if n > 7 else None,
            "test_h1_0": round(h1_test, 3),
            "fit_samples": n_fit,
            "rmse_estimation": rmse(est := simulate(theta, ue, ye[0])[0], ye),
            "rmse_estimation_fitted": rmse(est[:n_fit], ye[:n_fit]),
            "rmse_estimation_held_out": rmse(est[n_fit:], ye[n_fit:]) if n_fit < len(ye) else None,
            "rmse_test": rmse(simulate(test_theta, ut, yt[0])[0], yt),
            "fit_s": round(seconds, 1),
        }
        # the solver's check of the same estimate (LSODA, tight tolerances)
        for rec, th, u, y in (("estimation", theta, ue, ye), ("test", test_theta, ut, yt)):
            res = solve_looped(
                system(th),
                t,
                u[None, :, None],
                th[None, :5],
                np.array([[th[5], y[0]]]),
                SolverSettings(rtol=1e-6, atol=1e-8),
            )
            row[f"solver_rmse_{rec}"] = rmse(res.y[0, :, 0], y)
        rows.append(row)
        print(
            f"{name}: estimation {row['rmse_estimation']:.3f} V "
            f"(solver {row['solver_rmse_estimation']:.3f}), "
            f"test {row['rmse_test']:.3f} V (solver {row['solver_rmse_test']:.3f}), "
            f"fit {seconds:.0f} s",
            flush=True,
        )
    held = "-" if n_fit == len(ye) else f"last {len(ye) - n_fit}"
    print(
        f"\nfitted on the estimation record's first {n_fit} samples\n"
        f"| structure | k1 | k2 | k3 | k4 | k5 | h1(0) | h1_max | linear_inflow "
        "| estimation RMSE, fitted part [V] "
        f"| estimation RMSE, {held} held out [V] | test RMSE [V] | test RMSE, solver [V] |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        out = r["rmse_estimation_held_out"]
        print(
            f"| {r['structure']} | {r['k1']} | {r['k2']} | {r['k3']} | {r['k4']} | {r['k5']} "
            f"| {r['h1_0']} | {r['h1_max']} "
            f"| {r['linear_inflow'] if r['linear_inflow'] is not None else '-'} "
            f"| {r['rmse_estimation_fitted']:.3f} | {'-' if out is None else f'{out:.3f}'} "
            f"| {r['rmse_test']:.3f} "
            f"| {r['solver_rmse_test']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(rows, indent=2) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
