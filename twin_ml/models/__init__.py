"""Surrogate models (torch). Import `twin_ml.models` only where torch is wanted."""

from twin_ml.models.module import SurrogateModule as SurrogateModule
from twin_ml.models.surrogates import MODEL_KINDS as MODEL_KINDS
from twin_ml.models.surrogates import Surrogate as Surrogate
from twin_ml.models.surrogates import build_model as build_model
from twin_ml.models.surrogates import compute_stats as compute_stats
from twin_ml.models.surrogates import field_stats as field_stats
from twin_ml.models.surrogates import load_trained as load_trained
from twin_ml.models.surrogates import model_from_config as model_from_config
from twin_ml.models.surrogates import save_model as save_model
