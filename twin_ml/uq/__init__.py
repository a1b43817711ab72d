"""Uncertainty: interval metrics, split-conformal calibration, and its widening with the distance
to the training box (the conformal shift). Numpy only, no torch."""

from twin_ml.uq.metrics import conformal_scale as conformal_scale
from twin_ml.uq.metrics import coverage as coverage
from twin_ml.uq.metrics import crps_gaussian as crps_gaussian
from twin_ml.uq.metrics import interval_report as interval_report
from twin_ml.uq.metrics import nll_gaussian as nll_gaussian
from twin_ml.uq.shift import ShiftFit as ShiftFit
from twin_ml.uq.shift import cross_fit_shift as cross_fit_shift
from twin_ml.uq.shift import shift_beta as shift_beta
