import sys
from pathlib import Path

import numpy as np
import pytest

ASSETS = Path(__file__).parent / "assets"
sys.path.insert(0, str(ASSETS))  # the user-defined example system (tests/assets/mass_spring.py)

SHIPPED = ["pendulum", "cascaded_tanks", "thermal_rc", "cstr", "robertson", "duffing"]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
