"""Accuracy metrics of trajectory predictions (numpy only). Arrays are [N, T, ny]."""

from __future__ import annotations

import numpy as np

from twin_ml.physics.system import PhysicsSystem


def accuracy(
    y: np.ndarray, mean: np.ndarray, y_scale: np.ndarray, names: list[str]
) -> dict[str, float]:
    """Relative L2 error per scenario (||y_hat - y|| / ||y|| over steps and outputs): median, p95;
    per output: NRMSE (RMSE / y_scale, the training data's std), MAE, max error."""
    err = mean - y
    rel = np.linalg.norm(err.reshape(len(y), -1), axis=1) / np.maximum(
        np.linalg.norm(y.reshape(len(y), -1), axis=1), 1e-12
    )
    out = {
        "rel_l2_median": float(np.median(rel)),
        "rel_l2_p95": float(np.percentile(rel, 95)),
        "n_scenarios": int(len(y)),
    }
    for j, name in enumerate(names):
        e = err[..., j]
        out[f"nrmse_{name}"] = float(np.sqrt(np.mean(e**2)) / y_scale[j])
        out[f"mae_{name}"] = float(np.mean(np.abs(e)))
        out[f"max_err_{name}"] = float(np.max(np.abs(e)))
    return out


def error_vs_horizon(y: np.ndarray, mean: np.ndarray, y_scale: np.ndarray) -> list[float]:
    """Normalized RMSE at each step, over scenarios and outputs: how error grows along the
    rollout."""
    return np.sqrt(np.mean(((mean - y) / y_scale) ** 2, axis=(0, 2))).tolist()


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
