"""Calibration of physics parameters against observations with the surrogate in the loop, checked
by the real solver (issue #6). Torch-free: the exported ONNX surrogate runs in onnxruntime."""

from twin_ml.calibrate.backends import SolverBackend as SolverBackend
from twin_ml.calibrate.backends import SurrogateBackend as SurrogateBackend
from twin_ml.calibrate.fit import MCMC_DEFAULTS as MCMC_DEFAULTS
from twin_ml.calibrate.fit import CalibrationResult as CalibrationResult
from twin_ml.calibrate.fit import Estimate as Estimate
from twin_ml.calibrate.fit import Evaluations as Evaluations
from twin_ml.calibrate.fit import MCMCDiagnostics as MCMCDiagnostics
from twin_ml.calibrate.fit import MCMCRun as MCMCRun
from twin_ml.calibrate.fit import Posterior as Posterior
from twin_ml.calibrate.fit import StartRun as StartRun
from twin_ml.calibrate.fit import Timings as Timings
from twin_ml.calibrate.fit import Verification as Verification
from twin_ml.calibrate.fit import calibrate as calibrate
from twin_ml.calibrate.fit import posterior as posterior
from twin_ml.calibrate.problem import CalibrationError as CalibrationError
from twin_ml.calibrate.problem import Problem as Problem

__all__ = [
    "CalibrationError",
    "CalibrationResult",
    "Estimate",
    "Evaluations",
    "MCMCDiagnostics",
    "MCMCRun",
    "MCMC_DEFAULTS",
    "Posterior",
    "Problem",
    "SolverBackend",
    "StartRun",
    "SurrogateBackend",
    "Timings",
    "Verification",
    "calibrate",
    "posterior",
]
