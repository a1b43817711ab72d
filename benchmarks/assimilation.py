"""Data assimilation on the real records: how much better a twin predicts once it filters the
telemetry, against its own open loop, and whether its bands hold.

    python benchmarks/assimilation.py [--out benchmarks/results/assimilation.json]
        [--only tanks,silverbox,drift] [--tanks-run runs/tanks-real]
        [--silverbox-run runs/silverbox-real] [--silverbox-samples 4000]

Records (data/real/): the Cascaded Tanks test record (1024 samples at 4 s) and the Silverbox
multisine test record (its first `--silverbox-samples` samples at 1.6384 ms). Per record two
forecasts:
- `physics`: the shipped system alone, stepped by its reference solver, at the parameters the
  experiment starts from (configs/experiment/*_real.yaml), with additive process noise;
- `hybrid`: the trained telemetry experiment (`experiment=cascaded_tanks_real` /
  `silverbox_real`, trained here when its run directory is missing: ~10 min each on 2 cores),
  exported to ONNX and stepped by onnxruntime (`OnnxForecast`, torch-free), its members widened
  to the conformal scale.
The filter's settings are chosen on the record the model was trained on (the tanks'
estimation record; the Silverbox training record's last samples): the process noise of the best
one-step prediction there (lowest RMSE over a small grid; of settings within 2% of it, the one
whose band needs the smallest factor), and the factor on its one-step std
that makes the 90% band cover that record (`band_scale`, split-conformal: the process noise sets
the filter's gain, the factor the band it reports); then the test record is scored with both,
unseen. The k-step bands (k > 1) get factors of their own (`horizon_scale`, split-conformal
per horizon on the tuning record scored with that process noise and band); the table gives
their coverage with them and without (the members' own spread).
Scores (`twin_ml.assimilate.filter.score_record`): the k-step-ahead RMSE after
assimilating every sample up to the origin, k = 1, 10, 50, over the open loop's RMSE (the same
filter given only the first `init` samples: the benchmark's free run from an estimated initial
state), and the 90% band's coverage.

Drift: a synthetic tanks record whose outflow coefficient k3 drops by 20% halfway; the joint
state-parameter ETKF (physics forecast) estimates k3: samples after the drop until the estimate
stays within 5% of the new value.

Goals (issue): one-step RMSE <= 0.5x the open loop; 90% coverage in [0.85, 0.95]; drift tracked
within 50 samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import BIN, ROOT, sh  # noqa: E402

from twin_ml._io import atomic_write_bytes  # noqa: E402
from twin_ml.assimilate.filter import (  # noqa: E402
    Z90,
    FilterSettings,
    OnnxForecast,
    SolverForecast,
    band_scale,
    error_model,
    horizon_scale,
    open_loop_residuals,
    score_record,
)
from twin_ml.data.real import records  # noqa: E402
from twin_ml.physics import make_system  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "assimilation.json"
REAL = ROOT / "data" / "real"
GOALS = {"ratio_1": 0.5, "cov_lo": 0.85, "cov_hi": 0.95, "drift_samples": 50}
HORIZONS = (1, 10, 50)
TIE = 0.02  # one-step RMSEs this close on the tuning record count as equal (see tune_and_score)
# with an error model, the filter's measurement noise on this grid (factors on the sensor's):
# the model's error is then fitted on residuals that hold the sensor noise too
NOISE_FACTORS = (1.0, 1 / 3, 1 / 10)
MEMBERS = 30  # a multiple of the ensembles' 5 networks: every filter member keeps its network

TANKS = {
    "experiment": "cascaded_tanks_real",
    "system": {"h1_max": 14.21, "sensor_max": 10.0, "linear_inflow": 0.00457},
    "parameters": [0.04327, 0.02071, 0.04678, 0.04812, 0.9996],
    "x0": ([9.07, None], [1.0, 0.1]),  # h2(0) from the first measurement
    "noise": 0.02,  # V: a level sensor's noise and quantization; the model error is process noise
    "process": [0.01, 0.02, 0.04, 0.08],  # grid, per state and 4 s step
    "init": 25,  # the benchmark's initial-state samples
    "signals": ("pump", "h2"),
}
SILVERBOX = {
    "experiment": "silverbox_real",
    "system": {},
    "parameters": [419.67, 0.044274, 5.6865e5, 1.49990e5],
    "x0": ([None, 0.0], [0.001, 1.0]),
    "noise": 2e-4,  # V
    "process": [0.0005, 0.002, 0.008, 0.032, 0.128, 0.5],  # grid, relative to the scale below
    "scale": [0.05, 20.0],  # typical |y| [V] and |dy/dt| [V/s] on the multisine
    "init": 50,
    "signals": ("u", "y"),
}


def arrays(frame, signals: tuple[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t [T] s, u [T, 1], y [T, 1]) of a real record's long frame; `signals`: (input, output)."""
    wide = frame.pivot(index="timestamp", columns="signal", values="value")
    t = (wide.index - wide.index[0]).total_seconds().to_numpy()
    return t, wide[[signals[0]]].to_numpy(), wide[[signals[1]]].to_numpy()


def exported(run: Path) -> tuple[bytes, object]:
    from twin_ml.export.export import export_run

    blob, card = export_run(run, name="bench", version="v1", parity_scenarios=8, parity_steps=50)
    return blob, card


def trained(experiment: str, run: Path) -> Path:
    if not (run / "model" / "model.json").exists():
        print(f"training {experiment} into {run} (~10 min)", flush=True)
        sh(BIN / "twin-train", f"experiment={experiment}", f"out_dir={run}", "logger=none")
    return run


def _prior(spec, y0: float):
    mean = np.array([y0 if v is None else v for v in spec["x0"][0]], dtype=float)
    return mean, np.array(spec["x0"][1], dtype=float)


def residuals(spec: dict, system, forecast, record) -> np.ndarray:
    """The record's open-loop residuals from its first `init` samples (`open_loop_residuals`)."""
    t, u, y = record
    p = np.array(spec["parameters"])
    return open_loop_residuals(
        system, forecast, t, u, y, np.array([spec["noise"]]), _prior(spec, y[0, 0]),
        (p, np.zeros(len(p))), FilterSettings(members=MEMBERS, seed=0), init=spec["init"],
    )  # fmt: skip


def tune_and_score(
    name: str, spec: dict, system, forecast, tune, test, *, every: int, error: bool = False
) -> dict:
    """On `tune`: the process noise of the best one-step prediction (lowest RMSE), then the
    split-conformal factor on its one-step std that makes the 90% band cover `tune`
    (`band_scale`); `test` scored with both, unseen. `error`: with the model's output error as
    an autoregressive process in the filter (`FilterSettings.error_ar`), fitted on `tune`'s
    open-loop residuals; the measurement noise is then tuned too (`NOISE_FACTORS`)."""
    p = np.array(spec["parameters"])
    scale = np.array(spec.get("scale", [1.0] * len(system.state_names)))
    ar, ar_std = error_model(residuals(spec, system, forecast, tune)) if error else ((), ())

    def score(record, q: float, r: float, band: tuple[float, ...] = (), horizon=(), **kw):
        t, u, y = record
        return score_record(
            system,
            forecast,
            t,
            u,
            y,
            np.array([r]),
            _prior(spec, y[0, 0]),
            (p, np.zeros(len(p))),
            FilterSettings(
                members=MEMBERS,
                process=tuple(q * scale),
                seed=0,
                band_scale=band,
                horizon_scale=horizon,
                error_ar=ar,
                error_std=ar_std,
            ),
            init=spec["init"],
            **kw,
        )

    tried = []
    grid = [
        (q, spec["noise"] * f) for q in spec["process"] for f in (NOISE_FACTORS if error else (1,))
    ]
    for q, r in grid:
        t0 = time.perf_counter()
        sc = score(tune, q, r, horizons=(1,))
        band = band_scale(sc.result, tune[2], init=spec["init"])
        tried.append(
            {
                "process": q,
                "noise": r,
                "rmse_1": sc.rmse[1],
                "ratio_1": sc.ratio(1),
                "coverage_90": sc.coverage_90[1],
                "band_scale": band.tolist(),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"  {name} tune process={q:g} noise={r:g}: ratio {sc.ratio(1):.3f} "
            f"cov {sc.coverage_90[1]:.3f} band scale {band[0]:.3g}"
        )
    # the best one-step RMSE (the open loop is the same for every q); among the settings within
    # TIE of it (apart by less than the RMSE's own sampling error on the tuning record, ~1.6% at
    # 2000 samples), the one whose band needs the least correction: its own spread most
    # consistent, the k-step bands too, which the factor does not reach
    top = min(r["rmse_1"] for r in tried)
    near = [r for r in tried if r["rmse_1"] <= (1 + TIE) * top]
    best = min(near, key=lambda r: max(abs(np.log(b)) for b in r["band_scale"]))
    band = tuple(best["band_scale"])
    # the k-step bands' factors, on the tuning record with that process noise and band
    q, r = best["process"], best["noise"]
    tuned = score(tune, q, r, band, horizons=HORIZONS, every=every)
    horizon = horizon_scale(tuned)
    t, u, y = test
    t0 = time.perf_counter()
    sc = score(test, q, r, band, horizon, horizons=HORIZONS, every=every)
    seconds = time.perf_counter() - t0
    factors = FilterSettings(band_scale=band, horizon_scale=horizon)
    unscaled = {}  # the same k-step bands without their factors: the members' own spread
    for h in HORIZONS[1:]:
        z = sc.z[h] * factors.band_at(h, sc.z[h].shape[1])
        unscaled[h] = float(np.mean(z[np.isfinite(z)] <= Z90))
    return {
        "forecast": name,
        "process": q,
        "noise": r,
        "error_ar": [list(a) for a in ar],
        "error_std": list(ar_std),
        "band_scale": list(band),
        "horizon_scale": [[h, list(f)] for h, f in horizon],
        "coverage_90_without_horizon_scale": unscaled,
        "tuning": tried,
        "open_loop_rmse": sc.open_loop_rmse,
        "open_loop_coverage_90": sc.open_loop_coverage_90,
        "scores": sc.table(),
        "seconds": seconds,
        "samples": len(t),
        "init": spec["init"],
        "every": every,
        "nis_mean": float(np.mean(sc.result.nis[spec["init"] :])),
        "series": {
            "t": t.tolist(),
            "y": y[:, 0].tolist(),
            "mean": sc.result.predicted_mean[:, 0].tolist(),
            "std": sc.result.predicted_std[:, 0].tolist(),
        },
    }


def _both(name: str, spec: dict, system, forecast, tune, test, *, every: int) -> list[dict]:
    """The forecast's filter without and with an error model (`tune_and_score`)."""
    return [
        tune_and_score(name, spec, system, forecast, tune, test, every=every),
        tune_and_score(
            f"{name} + error model", spec, system, forecast, tune, test, every=every, error=True
        ),
    ]


def tanks(run: Path) -> list[dict]:
    frames = records("cascaded_tanks", REAL / "cascaded_tanks" / "dataBenchmark.csv")
    tune, test = (arrays(frames[r], TANKS["signals"]) for r in ("estimation", "test"))
    system = make_system("cascaded_tanks", **TANKS["system"])
    out = _both("physics", TANKS, system, SolverForecast(system), tune, test, every=1)
    blob, card = exported(trained(TANKS["experiment"], run))
    forecast = OnnxForecast(blob, card)
    return out + _both("hybrid", TANKS, card.system.build(), forecast, tune, test, every=1)


def silverbox(run: Path, samples: int) -> list[dict]:
    frames = records("silverbox", REAL / "silverbox" / "SNLS80mV.csv")
    t, u, y = arrays(frames["train"], SILVERBOX["signals"])
    tune = (t[-2000:] - t[-2000], u[-2000:], y[-2000:])
    t, u, y = arrays(frames["test_multisine"], SILVERBOX["signals"])
    test = (t[:samples], u[:samples], y[:samples])
    system = make_system("duffing")
    out = _both("physics", SILVERBOX, system, SolverForecast(system), tune, test, every=10)
    blob, card = exported(trained(SILVERBOX["experiment"], run))
    forecast = OnnxForecast(blob, card)
    return out + _both("hybrid", SILVERBOX, card.system.build(), forecast, tune, test, every=10)


def drift() -> dict:
    """The tanks with k3 dropping 20% at sample 150 of 300 (solver truth, h2 noise 0.05)."""
    from twin_ml.assimilate.filter import run_filter
    from twin_ml.physics.solver import solve_stacked

    system = make_system("cascaded_tanks")
    rng = np.random.default_rng(0)
    steps, drop_at = 300, 150
    t = np.arange(steps + 1) * 4.0
    u = np.repeat(rng.uniform(2.0, 6.0, steps // 20 + 1), 20)[: steps + 1, None]
    p = system.nominal_parameters.copy()
    x = np.empty((steps + 1, 2))
    x[0] = [4.0, 3.0]
    for k in range(steps):
        pk = p.copy()
        if k >= drop_at:
            pk[2] *= 0.8
        x[k + 1] = solve_stacked(system, t[k : k + 2], u[None, k : k + 2], pk[None], x[k][None]).x[
            0, -1
        ]
    y = x[:, [1]] + rng.normal(size=(steps + 1, 1)) * 0.05
    prior = p.copy()
    prior[2] *= 1.1
    res = run_filter(
        system,
        SolverForecast(system),
        t,
        u,
        y,
        np.array([0.05]),
        (np.array([4.0, 3.0]), np.array([0.3, 0.3])),
        (prior, np.full(5, 0.1)),
        FilterSettings(members=24, parameters=("k3",), walk=0.01, inflation=1.02),
    )
    k3 = res.parameter_mean[:, 0]
    ok = np.abs(k3 / (0.8 * p[2]) - 1) < 0.05
    bad = np.nonzero(~ok[drop_at:])[0]
    settled = int(bad[-1] + 1) if len(bad) else 0
    return {
        "samples_to_within_5pct": settled,
        "k3_true_after": 0.8 * p[2],
        "k3_estimate_end": float(k3[-1]),
        "k3_std_end": float(res.parameter_std[-1, 0]),
        "series": {"t": t.tolist(), "k3": k3.tolist()},
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(rec, r) for rec in ("tanks", "silverbox") for r in results.get(rec, [])]
    n = len(panels) + ("drift" in results)
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.6 * n), squeeze=False)
    for ax, (rec, r) in zip(axes[:, 0], panels):
        s = {k: np.asarray(v) for k, v in r["series"].items()}
        # the one-step error and the 90% band around zero: what the filter leaves unexplained,
        # over the scored samples (from `init` on), 600 of them
        at = slice(r["init"], r["init"] + 600)
        err, half = (s["y"] - s["mean"])[at], Z90 * s["std"][at]
        ax.fill_between(s["t"][at], -half, half, alpha=0.3, label="90% band")
        ax.plot(s["t"][at], err, "k.", ms=2, label="measured - one-step prediction")
        ax.axhline(0.0, color="k", lw=0.5)
        one = r["scores"][0]
        ax.set_title(
            f"{rec} test record, {r['forecast']}: 1-step RMSE {one['ratio']:.2f}x open loop, "
            f"coverage {one['coverage_90']:.2f}",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="upper right")
    if "drift" in results:
        ax = axes[-1, 0]
        d = results["drift"]
        ax.plot(d["series"]["t"], d["series"]["k3"], label="k3 estimate")
        ax.axhline(d["k3_true_after"], color="k", ls="--", lw=0.8, label="k3 after the drop")
        ax.set_title(f"drift: within 5% {d['samples_to_within_5pct']} samples after the drop")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    lines = [
        "| record | forecast | k | RMSE | open-loop RMSE | ratio | 90% coverage | band factor "
        "| coverage without the k-step factor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in ("tanks", "silverbox"):
        for r in results.get(rec, []):
            factors = {1: r["band_scale"], **{h: f for h, f in r.get("horizon_scale", [])}}
            bare = r.get("coverage_90_without_horizon_scale", {})
            for s in r["scores"]:
                h = s["horizon"]
                f = ", ".join(f"{v:.3g}" for v in factors.get(h, [])) or "-"
                b = bare.get(h, bare.get(str(h)))
                lines.append(
                    f"| {rec} | {r['forecast']} | {h} | {s['rmse']:.4g} | "
                    f"{s['open_loop_rmse']:.4g} | {s['ratio']:.3f} | {s['coverage_90']:.3f} | "
                    f"{f} | {'-' if b is None else f'{b:.3f}'} |"
                )
    if "drift" in results:
        d = results["drift"]
        lines.append(
            f"\ndrift (k3 -20% halfway): within 5% after {d['samples_to_within_5pct']} samples"
        )
    return "\n".join(lines)


def _without_series(obj):
    """The results without the per-sample series (they are in the plot)."""
    if isinstance(obj, dict):
        return {k: _without_series(v) for k, v in obj.items() if k != "series"}
    if isinstance(obj, list):
        return [_without_series(v) for v in obj]
    return obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--only", default="tanks,silverbox,drift")
    ap.add_argument("--tanks-run", default=str(ROOT / "runs" / "tanks-real"))
    ap.add_argument("--silverbox-run", default=str(ROOT / "runs" / "silverbox-real"))
    ap.add_argument("--silverbox-samples", type=int, default=4000)
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    results: dict = {"goals": GOALS, "members": MEMBERS, "horizons": list(HORIZONS)}
    if "drift" in only:
        results["drift"] = drift()
    if "tanks" in only:
        results["tanks"] = tanks(Path(args.tanks_run))
    if "silverbox" in only:
        results["silverbox"] = silverbox(Path(args.silverbox_run), args.silverbox_samples)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, out.with_suffix(".png"))
    atomic_write_bytes(out, json.dumps(_without_series(results), indent=1).encode())
    print(table(results))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
