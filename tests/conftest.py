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


def train_here(*overrides):
    """twin-train's config and run in this process (the checks and the run are the command's own;
    what only the command adds, the one-line error and exit status, is tested by subprocess above)."""
    from hydra import compose, initialize_config_dir

    from training._common import CONFIG_DIR
    from training.train import train

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return train(cfg)
