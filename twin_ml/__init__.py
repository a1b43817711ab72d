"""twin-ml: hybrid physics-ML surrogates for digital twins.

What a user imports, from one place::

    from twin_ml import PhysicsSystem, State, Input, Output, Parameter, Regime, register_system
    from twin_ml import ScenarioDesign, generate_dataset, Dataset, load_trained, export_run
    from twin_ml import extend_dataset

The names load on first use (module `__getattr__`), so `import twin_ml` stays light: it never
imports torch (the serving side depends on that). The physics, data and calibration names are
torch-free; `load_trained`, `build_model` and `export_run` import torch when first touched.

Calibration's entry point lives in its package: `from twin_ml.calibrate import calibrate`
(`twin_ml.calibrate` is the package; its types are here too).
"""

from __future__ import annotations

from twin_ml._lazy import lazy_names
from twin_ml._version import __version__ as __version__
from twin_ml._version import code_version as code_version

# public name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    # physics declarations and the catalog (numpy/scipy)
    "PhysicsSystem": "twin_ml.physics",
    "State": "twin_ml.physics",
    "Input": "twin_ml.physics",
    "Output": "twin_ml.physics",
    "Parameter": "twin_ml.physics",
    "Regime": "twin_ml.physics",
    "register_system": "twin_ml.physics",
    "make_system": "twin_ml.physics",
    "list_systems": "twin_ml.physics",
    "system_from_description": "twin_ml.physics",
    # the reference solver (scipy)
    "SolverSettings": "twin_ml.physics",
    "solve_looped": "twin_ml.physics",
    "solve_stacked": "twin_ml.physics",
    # scenario designs, generation, datasets (numpy/scipy)
    "ScenarioDesign": "twin_ml.data",
    "generate_dataset": "twin_ml.data",
    "Dataset": "twin_ml.data",
    "DatasetError": "twin_ml.data",
    # active learning: a dataset extended where a trained ensemble is least sure
    "extend_dataset": "twin_ml.active",
    # surrogate models and their export (torch, imported on first access)
    "build_model": "twin_ml.models",
    "load_trained": "twin_ml.models",
    "export_run": "twin_ml.export.export",
    # calibration (torch-free: the exported model runs in onnxruntime)
    "Problem": "twin_ml.calibrate",
    "CalibrationResult": "twin_ml.calibrate",
    "SurrogateBackend": "twin_ml.calibrate",
    "SolverBackend": "twin_ml.calibrate",
    "CalibrationError": "twin_ml.calibrate",
    # the model card and the requests' errors (twin_ml.contract; pydantic, torch-free)
    "ModelCard": "twin_ml.contract",
    "RequestError": "twin_ml.contract",
}

__all__ = sorted([*_LAZY, "__version__", "code_version"])


__getattr__ = lazy_names("twin_ml", _LAZY, globals())


def __dir__() -> list[str]:
    submodules = {k for k, v in globals().items() if getattr(v, "__name__", "") == f"twin_ml.{k}"}
    return sorted({*__all__, *(k for k in submodules if not k.startswith("_"))})
