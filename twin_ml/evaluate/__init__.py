"""Evaluation: accuracy, intervals, per-regime tables, speed against the solver, and report.html."""

from twin_ml.evaluate.metrics import accuracy as accuracy
from twin_ml.evaluate.metrics import regime_masks as regime_masks
