"""Scenario designs, dataset generation and reading. Pure numpy/scipy: never imports torch."""

from twin_ml.data.dataset import Dataset as Dataset
from twin_ml.data.dataset import DatasetError as DatasetError
from twin_ml.data.design import SAMPLERS as SAMPLERS
from twin_ml.data.design import SPLITS as SPLITS
from twin_ml.data.design import ScenarioDesign as ScenarioDesign
from twin_ml.data.generate import GenerationResult as GenerationResult
from twin_ml.data.generate import generate_dataset as generate_dataset

__all__ = [
    "SAMPLERS",
    "SPLITS",
    "Dataset",
    "DatasetError",
    "GenerationResult",
    "ScenarioDesign",
    "generate_dataset",
]
