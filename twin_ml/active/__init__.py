"""Active learning: rounds of solver runs where a trained ensemble is least sure.

The model side lives here (scoring needs torch, imported when a model scores); the dataset side,
torch-free, in `twin_ml.data.extend`.
"""

from twin_ml.active.acquisition import default_pool_size as default_pool_size
from twin_ml.active.acquisition import extend_dataset as extend_dataset
from twin_ml.active.acquisition import score_candidates as score_candidates
from twin_ml.active.acquisition import select_diverse as select_diverse
from twin_ml.data.extend import ACQUISITIONS as ACQUISITIONS
from twin_ml.data.extend import DatasetExtension as DatasetExtension
from twin_ml.data.extend import ExtensionResult as ExtensionResult

__all__ = [
    "ACQUISITIONS",
    "DatasetExtension",
    "ExtensionResult",
    "default_pool_size",
    "extend_dataset",
    "score_candidates",
    "select_diverse",
]
