"""Regression suite: each experiment's small CI configuration must stay under its stored thresholds
(tests/regression/thresholds.json), so a change that degrades a surrogate fails CI."""

import json
from pathlib import Path

import pytest
from conftest import train_here

from twin_ml.data import ScenarioDesign, generate_dataset
from twin_ml.physics import make_system

SPEC = json.loads((Path(__file__).parent / "regression" / "thresholds.json").read_text())
CASES = sorted(k for k in SPEC if not k.startswith("_"))


def train_small(name: str, tmp_path: Path) -> dict:
    c = SPEC[name]
    data = tmp_path / "data"
    generate_dataset(
        make_system(c["system"]),
        ScenarioDesign(t_end=c["t_end"], dt=c["dt"]),
        n_scenarios=c["n_scenarios"],
        seed=0,
        out_dir=data,
        progress=False,
    )
    out = tmp_path / "run"
    # twin-train's config and run in this process (`train_here`, seeded and single-threaded as the
    # command runs): a command of its own would add only its start-up, which test_train.py tests
    train_here(
        f"experiment={name}",
        f"data_dir={data}",
        f"out_dir={out}",
        "logger=none",
        "seed=0",
        "speed_scenarios=2",
        *c["overrides"],
    )
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("name", CASES)
def test_experiment_stays_under_its_thresholds(name, tmp_path):
    thresholds = SPEC[name]["thresholds"]
    assert thresholds, f"{name}: no thresholds stored"
    m = train_small(name, tmp_path)
    worse = {k: (m[k], v) for k, v in thresholds.items() if not m[k] <= v}
    assert not worse, f"{name} regressed (got, allowed): {worse}"
