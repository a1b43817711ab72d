"""Data assimilation: ensemble Kalman filtering of a twin's state (and parameters) from
telemetry, on the exported ensemble (torch-free). `analysis`: the update step."""

from twin_ml.assimilate.analysis import Diverged, Innovation, enkf, etkf, gaspari_cohn, letkf

__all__ = ["Diverged", "Innovation", "enkf", "etkf", "gaspari_cohn", "letkf"]
