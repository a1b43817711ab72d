"""Surrogate models (torch). Import `twin_ml.models` only where torch is wanted.

`SurrogateModule` (the LightningModule that trains a surrogate) loads on first use, so loading a
trained model (twin-export, twin-evaluate, twin-monitor) never imports lightning (~3 s)."""

from typing import Any

from twin_ml.models.surrogates import MODEL_KINDS as MODEL_KINDS
from twin_ml.models.surrogates import Surrogate as Surrogate
from twin_ml.models.surrogates import build_model as build_model
from twin_ml.models.surrogates import compute_stats as compute_stats
from twin_ml.models.surrogates import field_stats as field_stats
from twin_ml.models.surrogates import load_trained as load_trained
from twin_ml.models.surrogates import model_from_config as model_from_config
from twin_ml.models.surrogates import save_model as save_model

__all__ = [
    "MODEL_KINDS",
    "Surrogate",
    "SurrogateModule",
    "build_model",
    "compute_stats",
    "field_stats",
    "load_trained",
    "model_from_config",
    "save_model",
]


def __getattr__(name: str) -> Any:
    if name == "SurrogateModule":
        from twin_ml.models.module import SurrogateModule

        return SurrogateModule
    raise AttributeError(f"module 'twin_ml.models' has no attribute {name!r}")
