"""Scenario designs, dataset generation and reading. Pure numpy/scipy: never imports torch.

The names load on first use (module `__getattr__`), so a submodule alone (the telemetry reader,
twin-ingest's) does not import the design's and the generator's scipy."""

from twin_ml._lazy import lazy_names

_LAZY = {
    "Dataset": "twin_ml.data.dataset",
    "DatasetError": "twin_ml.data.dataset",
    "SAMPLERS": "twin_ml.data.design",
    "SPLITS": "twin_ml.data.design",
    "ScenarioDesign": "twin_ml.data.design",
    "GenerationResult": "twin_ml.data.generate",
    "generate_dataset": "twin_ml.data.generate",
}

__all__ = [
    "SAMPLERS",
    "SPLITS",
    "Dataset",
    "DatasetError",
    "GenerationResult",
    "ScenarioDesign",
    "generate_dataset",
]


__getattr__ = lazy_names("twin_ml.data", _LAZY, globals())
