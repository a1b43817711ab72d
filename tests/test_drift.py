"""Drift detection (twin_ml/drift.py) on residual streams with known faults: window statistics
against their definitions, the CUSUM against a hand-computed sequence, and detection of an
injected bias, gain change and noise increase (none on the clean stream)."""

import numpy as np
import pytest

from twin_ml.drift import DriftSettings, Fault, cusum, detect, inject, reference, window_statistics


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
    assert s["spread"][0, 0] == pytest.approx(np.log(np.sqrt((z[keep] ** 2).mean())))


def _stream(seed, n=2048, rho=0.95):
    """Residual-like data: an AR(1) process (correlated in time, like a model's errors) of unit
    marginal std, with predicted mean 0 and std 1."""
    rng = np.random.default_rng(seed)
    e = np.zeros(n)
    for i in range(1, n):
        e[i] = rho * e[i - 1] + np.sqrt(1 - rho**2) * rng.standard_normal()
    return e[:, None]


@pytest.fixture(scope="module")
def ref():
    y = _stream(1, n=4096)
    return reference(
        window_statistics(y, np.ones_like(y, dtype=bool), np.zeros_like(y), np.ones_like(y), 64)
    )


@pytest.mark.parametrize("fault", ["none", "bias", "gain", "noise"])
def test_injected_faults_are_detected_within_one_window_and_clean_data_is_quiet(ref, fault):
    """A shift of d reference stds alarms after about h / (d - k) windows (h = 5, k = 1): faults of
    7 stds (the window level's std, about 0.7 predicted stds here: the residuals are correlated),
    and noise 3x the residuals', alarm in the first faulty window or the next (the stream's own
    level in that window can offset part of the shift); the clean stream raises none over its 32
    windows."""
    offset = 20.0  # the signal's level: a gain change shows as a shift of (gain - 1) x level
    y = offset + _stream(2)
    mean = np.full_like(y, offset)
    t_fault = 1024  # window 16 of 64 steps
    shift = 7.0 * ref["level_std"][0]
    if fault == "bias":
        y[t_fault:] += shift
    elif fault == "gain":
        y[t_fault:] *= 1.0 + shift / offset
    elif fault == "noise":
        y[t_fault:] += 3.0 * np.random.default_rng(3).standard_normal(y[t_fault:].shape)
    rep = detect(
        y,
        np.ones_like(y, dtype=bool),
        mean,
        np.ones_like(y),
        ref,
        ["y"],
        DriftSettings(window=64, threshold=5.0),
    )
    if fault == "none":
        assert not rep["drift"] and rep["alarms"] == []
    else:
        first = rep["outputs"]["y"]["first_alarm_window"]
        assert t_fault // 64 <= first <= t_fault // 64 + 1


def test_inputs_outside_the_training_range_raise_an_input_alarm(ref):
    y = _stream(2)
    u = np.full((len(y), 1), 5.0)
    u[640:] = 12.0  # beyond the range [1, 9]
    rep = detect(
        y,
        np.ones_like(y, dtype=bool),
        np.zeros_like(y),
        np.ones_like(y),
        ref,
        ["y"],
        DriftSettings(window=64),
        u=u,
        input_range=np.array([[1.0, 9.0]]),
        input_names=["pump"],
        period=4.0,
    )
    assert rep["inputs"]["pump"]["first_alarm_window"] == 10
    assert rep["alarms"] == [
        {"signal": "pump", "kind": "input_domain", "window": 10, "time_s": 11 * 64 * 4.0}
    ]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="drift.window must be >= 2"):
        DriftSettings(window=1).check()
    with pytest.raises(ValueError, match="drift.max_outside"):
        DriftSettings(max_outside=2).check()


def test_injected_sensor_faults_follow_their_definitions():
    t = np.arange(10) * 0.5
    y = np.stack([np.arange(10.0), 100.0 + np.arange(10.0)], axis=1)
    mask = np.ones_like(y, dtype=bool)
    mask[3, 1] = False
    names = ["a", "b"]
    yb, mb = inject(y, mask, t, names, [Fault.parse("bias:a:0.25@2.0")])
    np.testing.assert_array_equal(
        yb[:, 0], np.r_[np.arange(4.0), np.arange(4.0, 10.0) + 0.25]
    )  # from t = 2.0 (k = 4)
    np.testing.assert_array_equal(yb[:, 1], y[:, 1])
    yg, _ = inject(y, mask, t, names, [Fault.parse("gain:b:1.1@1.0")])
    np.testing.assert_allclose(yg[:, 1], np.r_[y[:2, 1], 1.1 * y[2:, 1]])
    ys, ms = inject(y, mask, t, names, [Fault.parse("skew:b:2@2.5")])
    # from k = 5 on, sample k shows sample k - 2 (its value and its mask)
    np.testing.assert_array_equal(ys[:, 1], np.r_[y[:5, 1], y[3:8, 1]])
    np.testing.assert_array_equal(ms[:, 1], np.r_[mask[:5, 1], mask[3:8, 1]])
    assert not ms[5, 1] and ys is not y
    np.testing.assert_array_equal(y[:, 0], np.arange(10.0))  # the input arrays are untouched


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bias:y:0.1", "KIND:SIGNAL:SIZE@ONSET_S"),
        ("drop:y:0.1@3", "kind 'drop' is unknown; kinds: bias, gain, skew"),
        ("bias:y:abc@3", "SIZE and ONSET_S must be numbers"),
        ("skew:y:1.5@3", "whole number of samples"),
        ("bias:y:0.1@-1", "ONSET_S must be >= 0"),
    ],
)
def test_bad_fault_specs_name_what_is_allowed(spec, message):
    with pytest.raises(ValueError, match=message):
        Fault.parse(spec)


def test_faults_on_unknown_signals_or_after_the_end_are_refused():
    t, y = np.arange(4.0), np.zeros((4, 1))
    with pytest.raises(ValueError, match="signal 'z' is not a monitored output; outputs: y"):
        inject(y, np.ones_like(y, dtype=bool), t, ["y"], [Fault.parse("bias:z:1@0")])
    with pytest.raises(ValueError, match="after the record's end"):
        inject(y, np.ones_like(y, dtype=bool), t, ["y"], [Fault.parse("bias:y:1@9")])


def _strict(obj):
    """obj through strict JSON: NaN or Infinity raise."""
    import json

    def refuse(c):
        raise ValueError(f"{c} in JSON")

    return json.loads(json.dumps(obj), parse_constant=refuse)


def test_an_output_without_measured_points_is_not_monitored_and_the_report_has_no_nan(ref):
    """Output b is never measured (masked, or NaN): the report says it is not monitored, with a
    note and null statistics, while a is monitored as if alone; windows of a where nothing was
    measured have null statistics and leave its CUSUM as it was. The report is strict JSON."""
    a = _stream(2)[:, 0]
    y = np.stack([a, np.full_like(a, np.nan)], axis=1)
    mask = np.stack([np.ones_like(a, dtype=bool), np.zeros_like(a, dtype=bool)], axis=1)
    mask[128:192, 0] = False  # window 2 of a: nothing measured
    mean, std = np.zeros_like(y), np.ones_like(y)
    stats = window_statistics(y, mask, mean, std, 64)
    assert np.isnan(stats["level"][:, 1]).all() and stats["n"][2, 0] == 0
    ref2 = reference({k: v[:8] for k, v in stats.items()})
    assert ref2["level_mean"][1] is None and ref2["level_mean"][0] is not None
    rep = detect(y, mask, mean, std, ref2, ["a", "b"], DriftSettings(window=64))
    out_b = rep["outputs"]["b"]
    assert out_b["monitored"] is False and "b: not monitored" in out_b["note"]
    assert rep["notes"] == [out_b["note"]] and set(out_b["level"]) == {None}
    out_a = rep["outputs"]["a"]
    assert out_a["monitored"] is True and out_a["level"][2] is None
    assert out_a["cusum_level"][2] == out_a["cusum_level"][1]
    # a alone (the same reference for it) gives the same statistics
    alone = detect(
        y[:, :1],
        mask[:, :1],
        mean[:, :1],
        std[:, :1],
        {k: v[:1] if isinstance(v, list) else v for k, v in ref2.items()},
        ["a"],
        DriftSettings(window=64),
    )
    # (the same float64 sums, reduced in another order over one column or two: 64 terms per window)
    tol = 64 * np.finfo(np.float64).eps
    np.testing.assert_allclose(
        alone["outputs"]["a"]["cusum_level"], out_a["cusum_level"], rtol=tol, atol=10 * tol
    )
    assert _strict(rep) == rep
    # measured in the stream but not in the reference: not monitored either
    rep = detect(np.nan_to_num(y), np.ones_like(mask), mean, std, ref2, ["a", "b"])
    assert rep["outputs"]["b"]["monitored"] is False and "the reference" in rep["notes"][0]
    assert _strict(rep) == rep
