"""After fitting on a scenario dataset: the conformal scale from the validation split, then the
metrics per split (accuracy, coverage, per regime) and the speed against the solver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

HEADLINE = (
    "test/rel_l2_median",
    "test/rel_l2_p95",
    "test/coverage_90",
    "extrapolation/rel_l2_median",
    "extrapolation/coverage_90",
)


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # per split, "speed", "conformal_scale"
    preds: dict[str, Any]  # per split: the model's predictions (for the report)
    splits: dict[str, dict[str, np.ndarray]]  # val, test, extrapolation (numpy)
    scale: np.ndarray  # the conformal scale, set in the model


def evaluate_trained(model, system, datamodule, *, speed_scenarios: int) -> Evaluation:
    """Calibrate the trained `model` (in eval mode after this) on the validation split and
    evaluate it on val, test and extrapolation; the speed is timed on test (val if test is
    empty) against the solver on `speed_scenarios` scenarios."""
    from twin_ml.evaluate.evaluate import evaluate_splits, fit_conformal_scale, speed

    model.eval()
    t = datamodule.t_grid
    splits = {s: datamodule.numpy(s) for s in ("val", "test", "extrapolation")}
    scale = fit_conformal_scale(model, splits["val"], t)
    metrics, preds = evaluate_splits(model, system, splits, t)
    metrics["speed"] = speed(
        model,
        system,
        splits["test"] if len(splits["test"]["p"]) else splits["val"],
        t,
        n=speed_scenarios,
    )
    metrics["conformal_scale"] = scale.tolist()
    return Evaluation(metrics, preds, splits, scale)
