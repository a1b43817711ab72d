"""Accuracy metrics of trajectory predictions (numpy only). Arrays are [N, T, ny]."""

from __future__ import annotations

import numpy as np

from twin_ml.physics.system import PhysicsSystem


def accuracy(
    y: np.ndarray, mean: np.ndarray, y_scale: np.ndarray, names: list[str]
) -> dict[str, float | None]:
    """Relative L2 error per scenario (||y_hat - y|| / ||y|| over steps and outputs): median, p95;
    per output: NRMSE (RMSE / y_scale, the training data's std), MAE, max error. Over the measured
    points only (a NaN in y is a point not measured); a value with no measured point is None."""
    ok, err = _errors(y, mean)
    rel = rel_l2(y, mean)
    rel = rel[np.isfinite(rel)]
    out: dict[str, float | None] = {
        "rel_l2_median": float(np.median(rel)) if len(rel) else None,
        "rel_l2_p95": float(np.percentile(rel, 95)) if len(rel) else None,
        "n_scenarios": int(len(y)),
    }
    for j, name in enumerate(names):
        e = err[..., j][ok[..., j]]
        out[f"nrmse_{name}"] = float(np.sqrt(np.mean(e**2)) / y_scale[j]) if e.size else None
        out[f"mae_{name}"] = float(np.mean(np.abs(e))) if e.size else None
        out[f"max_err_{name}"] = float(np.max(np.abs(e))) if e.size else None
    return out


def _errors(y: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The measured points (finite y) and the error there (0 elsewhere)."""
    ok = np.isfinite(y)
    return ok, np.where(ok, mean - np.where(ok, y, 0.0), 0.0)


def rel_l2(y: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Each scenario's relative L2 error ||y_hat - y|| / ||y|| over its measured points [N]
    (NaN for a scenario with none): the per-scenario values `accuracy` summarizes."""
    ok, err = _errors(y, mean)
    n_ok = ok.reshape(len(y), -1).sum(axis=1)
    rel = np.linalg.norm(err.reshape(len(y), -1), axis=1) / np.maximum(
        np.linalg.norm(np.where(ok, y, 0.0).reshape(len(y), -1), axis=1), 1e-12
    )
    return np.where(n_ok > 0, rel, np.nan)


def error_vs_horizon(y: np.ndarray, mean: np.ndarray, y_scale: np.ndarray) -> list[float | None]:
    """Normalized RMSE at each step, over scenarios and outputs (their measured points): how error
    grows along the rollout; None at a step with no measured point."""
    ok = np.isfinite(y)
    e2 = np.where(ok, ((mean - np.where(ok, y, 0.0)) / y_scale) ** 2, 0.0)
    n = ok.sum(axis=(0, 2))
    return [float(np.sqrt(s / k)) if k else None for s, k in zip(e2.sum(axis=(0, 2)), n)]


def regime_masks(
    system: PhysicsSystem, p: np.ndarray, x0: np.ndarray, u: np.ndarray
) -> dict[str, np.ndarray]:
    """Which scenarios lie inside each declared regime (parameters, initial states, input range)."""
    out = {}
    for name, regime in system.regimes.items():
        ok = np.ones(len(p), dtype=bool)
        for group, arr, names in (
            ("parameters", p, system.parameter_names),
            ("states", x0, system.state_names),
        ):
            for var, (lo, hi) in getattr(regime, group).items():
                v = arr[:, names.index(var)]
                ok &= (v >= lo) & (v <= hi)
        for var, (lo, hi) in regime.inputs.items():
            v = u[:, :, system.input_names.index(var)]
            ok &= (v.min(axis=1) >= lo) & (v.max(axis=1) <= hi)
        out[name] = ok
    return out
