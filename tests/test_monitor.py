"""twin-monitor on held-back real data: the Silverbox's multisine test record (never seen in
training), replayed against the hybrid model experiment=silverbox_real trained (committed under
tests/assets/silverbox_model, sha256-checked at load). The clean record raises no alarm; an injected
sensor bias, gain change and time skew are each detected in the window where they start or the
next one. Plus the command's bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from training.monitor import DEFAULTS, run
from twin_ml.drift import Fault

MODEL = Path(__file__).parent / "assets" / "silverbox_model"
# the faults' replays: 2.7 s of the record, 52 windows of 32 samples. The detector is causal (a
# CUSUM over windows, standardized by windows 0-24), so windows after the onset's (48) and the
# next (49) cannot change whether the first alarm falls in one of those two; two more windows
# keep neither of them the record's last
STEPS = 52 * 32
WINDOW = 32
ONSET_S = 2.5165824  # the start of window 48 (48 x 32 x 1.6384 ms); the reference is windows 0-24


def _run(tmp_path, name, **kw):
    cfg = {
        **DEFAULTS,
        "model": str(MODEL),
        "source": "silverbox:test_multisine",
        "steps": str(STEPS),
        "window": str(WINDOW),
        "out_dir": str(tmp_path / name),
        **kw,
    }
    summary = json.loads(run(cfg).read_text())
    return json.loads(Path(summary["report"]).read_text()), summary


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as twin-monitor runs (small sequential steps)
    yield tmp_path_factory.mktemp("monitor")
    torch.set_num_threads(threads)


def test_the_whole_clean_held_back_record_raises_no_alarm(out):
    report, summary = _run(out, "clean", steps="none")
    assert report["windows"] == 21688 // WINDOW and report["steps"] == 21688
    assert report["alarms"] == [] and summary["drift"] is False
    # the detector did look: its statistics move, within the threshold
    cus = np.array(report["outputs"]["y"]["cusum_level"])
    assert 0.0 < cus.max() < report["settings"]["threshold"]
    assert Path(summary["plot"]).stat().st_size > 10_000


@pytest.mark.parametrize("fault", ["bias:y:0.005", "gain:y:1.05", "skew:y:1"])
def test_injected_sensor_faults_are_detected_within_one_window(out, fault):
    """A 5 mV bias (about 2.5% of the output's range), a 5% gain change and one sample (1.6 ms) of
    skew: the first alarm is on y, in the onset's window or the next."""
    report, summary = _run(out, fault.split(":")[0], inject=f"{fault}@{ONSET_S}")
    onset_window = round(ONSET_S / (WINDOW * report["period_s"]))
    assert onset_window == 48
    assert summary["drift"] is True
    first = report["alarms"][0]
    assert first["signal"] == "y"
    assert onset_window <= first["window"] <= onset_window + 1, report["alarms"]
    assert report["faults"] == [Fault.parse(f"{fault}@{ONSET_S}").__dict__]


def test_bad_monitor_input_names_the_setting(out, tmp_path):
    with pytest.raises(
        ValueError, match="record 'nope' is unknown; records: train, test_multisine"
    ):
        _run(out, "bad", source="silverbox:nope")
    with pytest.raises(ValueError, match="must be a .parquet/.csv file or DATASET:RECORD"):
        _run(out, "bad", source="somewhere")
    with pytest.raises(ValueError, match="falls in the reference"):
        _run(out, "bad", inject="bias:y:0.01@0.1")
    with pytest.raises(
        ValueError, match="source: 40 samples; the monitor needs >= 3 windows of 32"
    ):
        _run(out, "bad", steps="40")
    with pytest.raises(ValueError, match="horizon must be a whole number or none"):
        _run(out, "bad", horizon="soon")
    with pytest.raises(ValueError, match="holds no model.json"):
        _run(out, "bad", model=str(tmp_path))
