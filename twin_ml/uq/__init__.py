"""Uncertainty: interval metrics and split-conformal calibration (numpy only, no torch)."""

from twin_ml.uq.metrics import conformal_scale as conformal_scale
from twin_ml.uq.metrics import coverage as coverage
from twin_ml.uq.metrics import crps_gaussian as crps_gaussian
from twin_ml.uq.metrics import interval_report as interval_report
from twin_ml.uq.metrics import nll_gaussian as nll_gaussian
