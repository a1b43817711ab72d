"""Physics systems, their registry, excitation signals and the scipy reference solver; systems
from FMUs (`FMUSystem`: FMPy loads the FMU when it is first evaluated; a source FMU is built with
`python -m twin_ml.physics.fmu_build SOURCE_DIR OUT.fmu`).

Pure numpy/scipy: importing this package never imports torch.
"""

from twin_ml.physics.catalog import list_systems as list_systems
from twin_ml.physics.catalog import make_system as make_system
from twin_ml.physics.catalog import register_system as register_system
from twin_ml.physics.catalog import system_class as system_class
from twin_ml.physics.catalog import system_from_description as system_from_description
from twin_ml.physics.field import Derived as Derived
from twin_ml.physics.field import Field as Field
from twin_ml.physics.field import FieldSystem as FieldSystem
from twin_ml.physics.field import Probe as Probe
from twin_ml.physics.fmu import FMUSystem as FMUSystem
from twin_ml.physics.grid import Grid as Grid
from twin_ml.physics.signals import SIGNAL_KINDS as SIGNAL_KINDS
from twin_ml.physics.signals import SignalSpec as SignalSpec
from twin_ml.physics.solver import SolveResult as SolveResult
from twin_ml.physics.solver import SolverSettings as SolverSettings
from twin_ml.physics.solver import solve_looped as solve_looped
from twin_ml.physics.solver import solve_pooled as solve_pooled
from twin_ml.physics.solver import solve_stacked as solve_stacked
from twin_ml.physics.system import Input as Input
from twin_ml.physics.system import Output as Output
from twin_ml.physics.system import Parameter as Parameter
from twin_ml.physics.system import PhysicsSystem as PhysicsSystem
from twin_ml.physics.system import Regime as Regime
from twin_ml.physics.system import State as State

__all__ = [
    "Derived",
    "Field",
    "FieldSystem",
    "FMUSystem",
    "Grid",
    "Probe",
    "Input",
    "Output",
    "Parameter",
    "PhysicsSystem",
    "Regime",
    "SIGNAL_KINDS",
    "SignalSpec",
    "SolveResult",
    "SolverSettings",
    "State",
    "list_systems",
    "make_system",
    "register_system",
    "solve_looped",
    "solve_pooled",
    "solve_stacked",
    "system_class",
    "system_from_description",
]
