"""The model contract: the model card as types, and the requests a model answers, checked once.

Export writes a `ModelCard`; the registry verifies it; serving, calibration and monitoring read
it (`ModelCard.from_json` also reads the previous format). Torch-free.
"""

from twin_ml.contract.card import FORMAT as FORMAT
from twin_ml.contract.card import CardError as CardError
from twin_ml.contract.card import ConformalShift as ConformalShift
from twin_ml.contract.card import DomainBox as DomainBox
from twin_ml.contract.card import GridCard as GridCard
from twin_ml.contract.card import ModelCard as ModelCard
from twin_ml.contract.card import Normalization as Normalization
from twin_ml.contract.card import Provenance as Provenance
from twin_ml.contract.card import SystemCard as SystemCard
from twin_ml.contract.card import TimeGrid as TimeGrid
from twin_ml.contract.card import Variable as Variable
from twin_ml.contract.dataset import DatasetCard as DatasetCard
from twin_ml.contract.errors import RequestError as RequestError
from twin_ml.contract.errors import RequestTooLarge as RequestTooLarge
from twin_ml.contract.requests import CalibrationRequest as CalibrationRequest
from twin_ml.contract.requests import Scenario as Scenario
from twin_ml.contract.requests import decodes_fields as decodes_fields
from twin_ml.contract.requests import parse_calibration as parse_calibration
from twin_ml.contract.requests import parse_scenario as parse_scenario
from twin_ml.contract.requests import parse_scenarios as parse_scenarios

__all__ = [
    "FORMAT", "CalibrationRequest", "CardError", "ConformalShift", "DatasetCard", "DomainBox",
    "GridCard", "ModelCard", "Normalization", "Provenance", "RequestError", "RequestTooLarge",
    "Scenario", "SystemCard", "TimeGrid", "Variable", "decodes_fields", "parse_calibration",
    "parse_scenario", "parse_scenarios",
]  # fmt: skip
