"""Calibration of physics parameters against observations with the surrogate in the loop, checked
by the real solver (issue #6). Torch-free: the exported ONNX surrogate runs in onnxruntime."""

from twin_ml.calibrate.backends import SolverBackend as SolverBackend
from twin_ml.calibrate.backends import SurrogateBackend as SurrogateBackend
from twin_ml.calibrate.fit import calibrate as calibrate
from twin_ml.calibrate.problem import CalibrationError as CalibrationError
from twin_ml.calibrate.problem import Problem as Problem

__all__ = ["CalibrationError", "Problem", "SolverBackend", "SurrogateBackend", "calibrate"]
