"""After fitting on a scenario dataset: the conformal scale from the calibration split (the
validation split for a dataset without one), the
conformal shift (how the std widens outside the training box) from the extrapolation split, then
the metrics per split (accuracy, coverage, per regime) and the speed against the solver.

The extrapolation split's interval metrics (coverage, width, NLL, CRPS) are cross-fitted: each of
its scenarios is scored with a beta fitted on the other half of the split (twin_ml.uq.shift), so
they are out-of-sample although the deployed beta is fitted on the whole split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from twin_ml.uq import ShiftFit

log = logging.getLogger("twin_ml")
# the calibration's own scatter (1 sd) of the 90% coverage above which twin-train says so: beyond
# +-0.03 (2 sd). Measured in the training benchmark: 0.009-0.014 on 205 calibration scenarios
# (design.calibration_fraction 0.8 at 256), 0.019 on 103; the 38 of a 0.15 val split at 256 leave
# about 0.02-0.03
CALIBRATION_SD_WARN = 0.015

HEADLINE = (
    "test/rel_l2_median",
    "test/rel_l2_p95",
    "test/coverage_90",
    "extrapolation/rel_l2_median",
    "extrapolation/coverage_90",
)


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # per split, "speed", "conformal_scale", "conformal_shift"
    preds: dict[str, Any]  # per split: the model's predictions (for the report)
    splits: dict[str, dict[str, np.ndarray]]  # val, test, extrapolation (numpy)
    scale: np.ndarray  # the conformal scale, set in the model
    shift: ShiftFit  # the conformal shift: its beta goes into model.json and the model card


def evaluate_trained(
    model, system, datamodule, *, speed_scenarios: int, seed: int = 0
) -> Evaluation:
    """Calibrate the trained `model` (in eval mode after this) on the calibration split (the
    validation split when the dataset has none; the record says which, how many scenarios and
    how precisely they fix the coverage, `twin_ml.uq.metrics.calibration_sd`), fit its
    conformal shift on the extrapolation split (cross-fitted, halves split by `seed`; the box:
    the dataset's design box, as export writes it into the card), and evaluate it on val, test
    and extrapolation (that split's interval metrics cross-fitted); the speed is timed on test
    (val if test is empty) against the solver on `speed_scenarios` scenarios."""
    from twin_ml.evaluate.evaluate import (
        evaluate_splits,
        fit_conformal_scale,
        fit_conformal_shift,
        predict_numpy,
        speed,
    )

    model.eval()
    t = datamodule.t_grid
    splits = {s: datamodule.numpy(s) for s in ("val", "test", "extrapolation")}
    cal_split = datamodule.calibration_split
    cal = datamodule.numpy(cal_split)
    n = len(cal["p"])
    scale, sd = fit_conformal_scale(model, cal, t)
    metrics_calibration = {"split": cal_split, "n_scenarios": n, "coverage_90_sd": sd}
    if not sd <= CALIBRATION_SD_WARN:  # NaN too: fewer than 2 scenarios tell nothing
        if np.isfinite(sd):
            needed = int(np.ceil(n * (sd / 0.01) ** 2))  # the scatter shrinks as 1 / sqrt(n)
            what = f"only to about +-{2 * sd:.3f} (2 sd)"
            more = f"about {needed} calibration scenarios would fix it to +-0.02"
        else:
            what, more = "not at all", "a few hundred calibration scenarios are needed"
        log.warning(
            f"the 90% intervals are calibrated on {n} {cal_split} scenarios: their coverage on "
            f"new data is fixed {what} by that sample; {more} (generate with a larger "
            "design.calibration_fraction: the shipped 0.8 draws 205 at n_scenarios=256)"
        )
    box = datamodule.dataset.card.domain
    ex = splits["extrapolation"]
    pred = {"extrapolation": predict_numpy(model, ex, t)} if len(ex["p"]) else {}
    shift = fit_conformal_shift(
        model, system, box, ex, t, seed=seed, prediction=pred.get("extrapolation")
    )
    metrics, preds = evaluate_splits(
        model, system, splits, t, box=box, shift=shift, predictions=pred
    )
    metrics["speed"] = speed(
        model,
        system,
        splits["test"] if len(splits["test"]["p"]) else splits["val"],
        t,
        n=speed_scenarios,
    )
    metrics["conformal_scale"] = scale.tolist()
    metrics["calibration"] = metrics_calibration
    metrics["conformal_shift"] = shift.summary()
    return Evaluation(metrics, preds, splits, scale, shift)
