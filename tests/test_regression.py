"""Regression suite: each experiment's small CI configuration must stay under its stored thresholds
(tests/regression/thresholds.json), so a change that degrades a surrogate fails CI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "twin-train"),
            f"experiment={name}",
            f"data_dir={data}",
            f"out_dir={out}",
            "logger=none",
            "seed=0",
            "speed_scenarios=2",
            *c["overrides"],
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("name", CASES)
def test_experiment_stays_under_its_thresholds(name, tmp_path):
    thresholds = SPEC[name]["thresholds"]
    assert thresholds, f"{name}: no thresholds stored"
    m = train_small(name, tmp_path)
    worse = {k: (m[k], v) for k, v in thresholds.items() if not m[k] <= v}
    assert not worse, f"{name} regressed (got, allowed): {worse}"
