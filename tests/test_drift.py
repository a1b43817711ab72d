"""Drift detection (twin_ml/drift.py) on residual streams with known faults: window statistics
against their definitions, the CUSUM against a hand-computed sequence, and detection of an
injected bias, gain change and noise increase (none on the clean stream)."""

import numpy as np
import pytest

from twin_ml.drift import DriftSettings, cusum, detect, reference, window_statistics


def test_cusum_matches_the_recursion_by_hand():
    x = np.array([0.0, 1.0, 2.0, -1.0, 3.0, np.nan, 2.0])
    stat, first = cusum(x, slack=0.5, threshold=4.0)
    # S+ : 0, 0.5, 2.0, 0.5, 3.0, 3.0 (NaN: unchanged), 4.5 -> alarm at index 6
    np.testing.assert_allclose(stat, [0.0, 0.5, 2.0, 0.5, 3.0, 3.0, 4.5])
    assert first == 6
    assert cusum(-x, 0.5, 4.0)[1] == 6  # two-sided: a downward shift alarms the same way
    assert cusum(-x, 0.5, 4.0, two_sided=False)[1] is None


def test_window_statistics_follow_their_definition():
    rng = np.random.default_rng(0)
    y, mean, std = rng.normal(size=(100, 2)), np.zeros((100, 2)), np.full((100, 2), 2.0)
    mask = np.ones_like(y, dtype=bool)
    mask[5, 0] = False
    s = window_statistics(y, mask, mean, std, window=20)
    assert s["level"].shape == (5, 2) and s["n"][0, 0] == 19
    z = y[:20, 0] / 2.0
    keep = np.arange(20) != 5
    assert s["level"][0, 0] == pytest.approx(z[keep].mean())
    assert s["spread"][0, 0] == pytest.approx(np.sqrt((z[keep] ** 2).mean()))


def _stream(seed, n=2048, rho=0.95):
    """Residual-like data: an AR(1) process (correlated in time, like a model's errors) of unit
    marginal std, with predicted mean 0 and std 1."""
    rng = np.random.default_rng(seed)
    e = np.zeros(n)
    for i in range(1, n):
        e[i] = rho * e[i - 1] + np.sqrt(1 - rho ** 2) * rng.standard_normal()
    return e[:, None]


@pytest.fixture(scope="module")
def ref():
    y = _stream(1, n=4096)
    return reference(window_statistics(y, np.ones_like(y, dtype=bool), np.zeros_like(y), np.ones_like(y), 64))


@pytest.mark.parametrize("fault", ["none", "bias", "gain", "noise"])
def test_injected_faults_are_detected_within_one_window_and_clean_data_is_quiet(ref, fault):
    """A shift of d reference stds alarms after about h / (d - k) windows: faults of 6 stds (the
    window level's std, about 0.8 predicted stds here: the residuals are correlated) alarm in the
    first faulty window; the clean stream raises none over its 32 windows."""
    offset = 20.0  # the signal's level: a gain change shows as a shift of (gain - 1) x level
    y = offset + _stream(2)
    mean = np.full_like(y, offset)
    t_fault = 1024  # window 16 of 64 steps
    shift = 6.0 * ref["level_std"][0]
    if fault == "bias":
        y[t_fault:] += shift
    elif fault == "gain":
        y[t_fault:] *= 1.0 + shift / offset
    elif fault == "noise":
        y[t_fault:] += 3.0 * np.random.default_rng(3).standard_normal(y[t_fault:].shape)
    rep = detect(y, np.ones_like(y, dtype=bool), mean, np.ones_like(y), ref, ["y"],
                 DriftSettings(window=64, threshold=5.0))
    if fault == "none":
        assert not rep["drift"] and rep["alarms"] == []
    else:
        first = rep["outputs"]["y"]["first_alarm_window"]
        assert first == t_fault // 64


def test_inputs_outside_the_training_range_raise_an_input_alarm(ref):
    y = _stream(2)
    u = np.full((len(y), 1), 5.0)
    u[640:] = 12.0  # beyond the range [1, 9]
    rep = detect(y, np.ones_like(y, dtype=bool), np.zeros_like(y), np.ones_like(y), ref, ["y"],
                 DriftSettings(window=64), u=u, input_range=np.array([[1.0, 9.0]]), input_names=["pump"], period=4.0)
    assert rep["inputs"]["pump"]["first_alarm_window"] == 10
    assert rep["alarms"] == [{"signal": "pump", "kind": "input_domain", "window": 10, "time_s": 11 * 64 * 4.0}]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="drift.window must be >= 2"):
        DriftSettings(window=1).check()
    with pytest.raises(ValueError, match="drift.max_outside"):
        DriftSettings(max_outside=2).check()
