import sys
from pathlib import Path

import numpy as np
import pytest

ASSETS = Path(__file__).parent / "assets"
sys.path.insert(0, str(ASSETS))  # the user-defined example system (tests/assets/mass_spring.py)

# Tolerances follow from the dtype and the computation (they must hold on any x86-64 CPU, with or
# without AVX-512, and in `make test-portable`): a float32 result can differ in its last bits
# between batch sizes, kernels and CPUs, and those differences grow along a rollout.
EPS32 = float(np.finfo(np.float32).eps)


def rollout_tol(n_steps: int, scale: float, *, evals_per_step: int = 4) -> float:
    """How far two float32 runs of one rollout may drift apart (other kernel, batch size or graph):
    every step evaluates the vector field `evals_per_step` times (RK4: 4), each result a few ulps
    (4) off the other run's; along a flow that does not expand, the differences add up at most
    linearly over `n_steps`. `scale`: the size of the values compared (their max |.|, or 1 in
    normalized units)."""
    return 4.0 * evals_per_step * max(int(n_steps), 1) * EPS32 * max(float(scale), 1e-30)


SHIPPED = [
    "pendulum",
    "cascaded_tanks",
    "thermal_rc",
    "cstr",
    "robertson",
    "duffing",
    "heat_plate",
    "tubular_reactor",
]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def pendulum_data(tmp_path_factory):
    """24 pendulum scenarios of 2 s at dt 0.1 (a tiny dataset for the training tests)."""
    from twin_ml.data import ScenarioDesign, generate_dataset
    from twin_ml.physics import make_system

    out = tmp_path_factory.mktemp("data") / "pendulum"
    generate_dataset(
        make_system("pendulum"),
        ScenarioDesign(t_end=2.0, dt=0.1),
        n_scenarios=24,
        seed=0,
        out_dir=out,
        progress=False,
    )
    return out


def train_here(*overrides):
    """twin-train's config and run in this process (the checks and the run are the command's own;
    what only the command adds, the one-line error and exit status, is tested by subprocess
    above)."""
    from hydra import compose, initialize_config_dir

    from training._common import CONFIG_DIR
    from training.train import train

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return train(cfg)
