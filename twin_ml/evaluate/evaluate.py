"""Evaluate a trained surrogate on dataset splits: metrics, speed against the solver, report."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from twin_ml.contract.card import ConformalShift, DomainBox
from twin_ml.evaluate.metrics import accuracy, error_vs_horizon, regime_masks
from twin_ml.physics.solver import SolverSettings, solve_looped, solve_stacked
from twin_ml.uq import ShiftFit, conformal_scale, cross_fit_shift, interval_report
from twin_ml.uq.metrics import calibration_sd


def predict_numpy(
    model, d: dict[str, np.ndarray], t: np.ndarray, *, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble mean and calibrated std [N, T, ny] for the scenarios of one split."""
    means, stds = [], []
    tt = torch.tensor(t, dtype=torch.float32)
    for s in range(0, len(d["p"]), chunk):
        sl = slice(s, s + chunk)
        args = (torch.tensor(d[k][sl], dtype=torch.float32) for k in ("x0", "u", "p"))
        pred = model.predict(*args, tt)
        means.append(pred["mean"].numpy())
        stds.append(pred["std"].numpy())
    return np.concatenate(means).astype(np.float64), np.concatenate(stds).astype(np.float64)


def fit_conformal_scale(
    model, cal: dict[str, np.ndarray], t: np.ndarray, level: float = 0.9
) -> tuple[np.ndarray, float]:
    """Split-conformal: set model.conformal_scale from the calibration scenarios `cal`; returns
    it [ny] and how precisely those scenarios fix the coverage
    (`twin_ml.uq.metrics.calibration_sd`: the coverage's scatter from this sample alone)."""
    model.conformal_scale.fill_(1.0)
    mean, std = predict_numpy(model, cal, t)
    scale = conformal_scale(cal["y"], mean, std, level)
    model.conformal_scale.copy_(torch.tensor(scale, dtype=torch.float32))
    return scale, calibration_sd(cal["y"], mean, std, level)


def fit_conformal_shift(
    model,
    system,
    box: DomainBox,
    extrapolation: dict[str, np.ndarray],
    t: np.ndarray,
    *,
    level: float = 0.9,
    seed: int = 0,
    prediction: tuple[np.ndarray, np.ndarray] | None = None,
) -> ShiftFit:
    """The conformal shift (twin_ml.uq.shift) of the calibrated `model` on the extrapolation
    split, cross-fitted in two halves split by `seed`: beta per output for std * (1 + beta d), d
    the distance of each scenario to the training `box` (`DomainBox.distances`, the function
    serving uses on the card's box). `prediction`: the split's (mean, std), when already made.
    With no extrapolation scenario beta is 0 and the fit's note says so."""
    n = len(extrapolation["p"])
    if n == 0:
        return ShiftFit.none(len(system.output_names), level=level)
    mean, std = prediction or predict_numpy(model, extrapolation, t)
    d = box.distances(system, extrapolation["p"], extrapolation["x0"], extrapolation["u"])
    return cross_fit_shift(extrapolation["y"], mean, std, d, level=level, seed=seed)


def evaluate_splits(
    model,
    system,
    splits: dict[str, dict[str, np.ndarray]],
    t: np.ndarray,
    *,
    box: DomainBox | None = None,
    shift: ShiftFit | ConformalShift | None = None,
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[dict, dict]:
    """Metrics per split (and per regime), and the predictions for the report.

    Outside the training `box` the std widens as served, by 1 + beta d (d: `DomainBox.distances`;
    val and test lie inside, d = 0, and are unchanged). `shift`: a `ShiftFit` fitted on
    splits["extrapolation"] scores that split cross-fitted (each scenario by the beta of the half
    it did not help fit: out-of-sample coverage, width, NLL, CRPS) and every other split by the
    deployed beta; a `ConformalShift` (a saved run's) scores every split by its beta; None or no
    `box`: no widening. `predictions`: (mean, std) per split already made (reused). Each split's
    distances are summarized as distance_median and distance_max."""
    y_scale = model.y_std.numpy().astype(np.float64)
    names = system.output_names
    deployed = shift.card() if isinstance(shift, ShiftFit) else shift
    metrics: dict[str, Any] = {}
    preds = {}
    for split, d in splits.items():
        if len(d["p"]) == 0:
            continue
        mean, std = (predictions or {}).get(split) or predict_numpy(model, d, t)
        dist = None if box is None else box.distances(system, d["p"], d["x0"], d["u"])
        if dist is not None and isinstance(shift, ShiftFit) and split == "extrapolation":
            if shift.factor.shape[0] != len(dist):
                raise ValueError(
                    f"shift: fitted on {shift.factor.shape[0]} extrapolation scenarios, the split "
                    f"has {len(dist)}"
                )
            std = std * shift.factor[:, None, :]  # cross-fitted
        elif dist is not None and deployed is not None and np.any(dist > 0):
            std = std * deployed.factor(dist, len(names))[:, None, :]
        preds[split] = (mean, std)
        m = {**accuracy(d["y"], mean, y_scale, names), **interval_report(d["y"], mean, std)}
        if dist is not None:
            m.update(distance_median=float(np.median(dist)), distance_max=float(dist.max()))
        m["error_vs_horizon"] = error_vs_horizon(d["y"], mean, y_scale)
        regimes = {}
        for rname, mask in regime_masks(system, d["p"], d["x0"], d["u"]).items():
            if mask.sum() >= 1:
                acc = accuracy(d["y"][mask], mean[mask], y_scale, names)
                regimes[rname] = {
                    k: v for k, v in acc.items() if k.startswith(("nrmse", "rel_l2", "n_"))
                }
        m["regimes"] = regimes
        metrics[split] = m
    return metrics, preds


def speed(
    model, system, d: dict[str, np.ndarray], t: np.ndarray, *, n: int = 64, repeats: int = 3
) -> dict[str, float]:
    """Surrogate rollout (torch, this process) vs the solver on the same n scenarios, as ratios."""
    n = min(n, len(d["p"]))
    sub = {k: v[:n] for k, v in d.items()}
    settings = SolverSettings().resolved(system)

    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    s_sur = best(lambda: predict_numpy(model, sub, t))
    s_loop = best(lambda: solve_looped(system, t, sub["u"], sub["p"], sub["x0"], settings))
    s_stack = best(lambda: solve_stacked(system, t, sub["u"], sub["p"], sub["x0"], settings))
    return {
        "n_scenarios": n,
        "surrogate_s": s_sur,
        "solver_looped_s": s_loop,
        "solver_stacked_s": s_stack,
        "speedup_vs_looped": s_loop / s_sur,
        "speedup_vs_stacked": s_stack / s_sur,
    }


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """'test/coverage_90'-style keys of the scalar metrics (for loggers, sweeps and thresholds)."""
    out = {}
    for split, m in metrics.items():
        if not isinstance(m, dict):
            continue
        for k, v in m.items():
            if isinstance(v, (int, float)):
                out[f"{split}/{k}"] = float(v)
            elif k == "regimes":
                for r, rm in v.items():
                    for kk, vv in rm.items():
                        out[f"{split}/regime/{r}/{kk}"] = float(vv)
    return out
