"""Excitation signals, interpolation, and scenario designs."""

import numpy as np
import pytest

from twin_ml.data import ScenarioDesign
from twin_ml.data.design import SPLITS
from twin_ml.physics import SIGNAL_KINDS, SignalSpec, make_system
from twin_ml.physics.signals import generate, interpolator

T = np.linspace(0.0, 100.0, 1001)


@pytest.mark.parametrize("kind", SIGNAL_KINDS)
def test_signals_are_seeded_and_stay_in_range(kind):
    spec = SignalSpec(kind=kind, hold=5.0)
    a = generate(spec, T, 2.0, 1.0, np.random.default_rng(7), clip=(1.2, 2.8))
    b = generate(spec, T, 2.0, 1.0, np.random.default_rng(7), clip=(1.2, 2.8))
    c = generate(spec, T, 2.0, 1.0, np.random.default_rng(8), clip=(1.2, 2.8))
    np.testing.assert_array_equal(a, b)
    assert a.shape == T.shape and a.min() >= 1.2 and a.max() <= 2.8
    if kind not in ("constant", "ramp"):
        assert not np.array_equal(a, c)  # the seed matters where something is random
        assert np.ptp(a) > 0.5  # and it really excites


def test_step_and_prbs_hold_their_level():
    for kind in ("step", "prbs"):
        s = generate(SignalSpec(kind=kind, hold=10.0), T, 0.0, 1.0, np.random.default_rng(1))
        changes = np.flatnonzero(np.diff(s)) + 1
        assert np.all(np.isin(T[changes] % 10.0, [0.0])), kind  # changes only on the clock
    prbs = generate(SignalSpec(kind="prbs", hold=2.0), T, 0.0, 1.0, np.random.default_rng(1))
    assert set(np.unique(prbs)) == {-1.0, 1.0}


def test_multisine_band_and_bandlimited_cutoff():
    t = np.arange(0, 4096) * 0.01
    ms = generate(
        SignalSpec(kind="multisine", f_min=1.0, f_max=5.0, n_tones=5),
        t,
        0.0,
        1.0,
        np.random.default_rng(2),
    )
    spec = np.abs(np.fft.rfft(ms)) ** 2
    f = np.fft.rfftfreq(t.size, 0.01)
    assert spec[(f > 0.8) & (f < 5.2)].sum() / spec.sum() > 0.99
    assert np.isclose(np.abs(ms).max(), 1.0)
    bl = generate(SignalSpec(kind="bandlimited", f_cut=2.0), t, 0.0, 1.0, np.random.default_rng(2))
    sb = np.abs(np.fft.rfft(bl)) ** 2
    assert (
        sb[f > 8.0].sum() / sb.sum() < 1e-3
    )  # 4th-order Butterworth: > 2 octaves above cut-off is gone


def test_bad_signal_options_name_the_field():
    with pytest.raises(ValueError, match="must be one of"):
        SignalSpec(kind="chirp")
    with pytest.raises(ValueError, match="hold must be > 0"):
        SignalSpec(kind="step", hold=-1.0)


def test_interpolate_zoh_and_linear_in_numpy_and_torch():
    torch = pytest.importorskip("torch")
    tg = np.array([0.0, 1.0, 2.0])
    ug = np.array([[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]])  # inputs: held, linear
    zoh = np.array([True, False])
    at = interpolator(tg, ug, zoh)
    np.testing.assert_allclose(at(0.25), [0.0, 0.5])
    np.testing.assert_allclose(at(1.5), [2.0, 3.0])
    np.testing.assert_allclose(at(1.0), [2.0, 2.0])  # on a grid point both agree
    np.testing.assert_allclose(at(7.0), [4.0, 4.0])  # past the grid: hold the end
    np.testing.assert_allclose(at(-1.0), [0.0, 0.0])  # before it: the first value holds
    ugt = torch.from_numpy(ug).requires_grad_(True)
    val = interpolator(tg, ugt, zoh)(1.5)
    np.testing.assert_allclose(val.detach().numpy(), [2.0, 3.0])
    val.sum().backward()  # differentiable with respect to the samples
    np.testing.assert_allclose(ugt.grad.numpy(), [[0, 0], [1, 0.5], [0, 0.5]])


def test_lhs_is_stratified_in_every_dimension():
    sys_ = make_system("pendulum")
    design = ScenarioDesign(sampler="lhs", extrapolation_fraction=0.0)
    n = 50
    sc = design.sample(sys_, n, seed=0)
    box = design.box(sys_)
    z = np.concatenate(
        [sc.p, sc.x0, np.stack([sc.offset, sc.amplitude], -1).reshape(n, -1)], axis=1
    )
    u = (z - box.low) / (box.high - box.low)
    for j in range(z.shape[1]):
        assert sorted(np.floor(u[:, j] * n).astype(int)) == list(range(n))  # one point per stratum


def test_sobol_and_regime_boxes():
    sys_ = make_system("cascaded_tanks")
    sc = ScenarioDesign(sampler="sobol", regime="near_overflow").sample(sys_, 64, seed=1)
    inside = SPLITS.index("extrapolation") != sc.split
    assert np.all((sc.offset[inside, 0] >= 6.0) & (sc.offset[inside, 0] <= 9.0))
    assert np.all((sc.x0[inside] >= 5.0) & (sc.x0[inside] <= 8.0))
    np.testing.assert_allclose(sc.clip[inside, 0], [[6.0, 9.0]] * int(inside.sum()))
    with pytest.raises(KeyError, match="unknown regime 'flood'.*near_overflow"):
        ScenarioDesign(regime="flood").sample(sys_, 4, seed=0)


def test_extrapolation_split_lies_outside_the_box_and_inside_the_limits():
    sys_ = make_system("cascaded_tanks")
    design = ScenarioDesign(regime="nominal", extrapolation_fraction=0.5)
    sc = design.sample(sys_, 100, seed=2)
    ex = sc.split == SPLITS.index("extrapolation")
    assert ex.sum() == 50 and np.all(sc.split[:100] != SPLITS.index("extrapolation"))
    box = design.box(sys_)
    z = np.concatenate(
        [sc.p, sc.x0, np.stack([sc.offset, sc.amplitude], -1).reshape(len(sc), -1)], axis=1
    )
    outside = np.any((z < box.low) | (z > box.high), axis=1)
    assert outside[ex].all() and not outside[~ex].any()
    assert np.all(sc.p[ex, 4] <= 1.0) and np.all(
        sc.clip[ex, 0, 0] >= 0.0
    )  # k5 and the pump stay physical


def test_splits_follow_the_fractions_and_the_seed():
    sys_ = make_system("pendulum")
    a = ScenarioDesign(extrapolation_fraction=0).sample(sys_, 200, seed=5).split
    b = ScenarioDesign(extrapolation_fraction=0).sample(sys_, 200, seed=5).split
    np.testing.assert_array_equal(a, b)
    assert np.bincount(a, minlength=3).tolist() == [140, 30, 30]


def test_calibration_scenarios_come_on_top_and_leave_the_others_as_they_were():
    sys_ = make_system("cascaded_tanks")
    plain = ScenarioDesign().sample(sys_, 50, seed=3)
    design = ScenarioDesign(calibration_fraction=0.8)
    more = design.sample(sys_, 50, seed=3)
    k = len(plain)
    assert len(more) == k + 40  # ceil(0.8 x 50) more
    for f in ("p", "x0", "offset", "amplitude", "clip", "split"):
        np.testing.assert_array_equal(getattr(more, f)[:k], getattr(plain, f))
    cal = more.rows(k, len(more))
    assert (cal.split == SPLITS.index("calibration")).all()
    box = design.box(sys_)
    z = box.points(cal)
    assert np.all((z >= box.low) & (z <= box.high))  # in the training box, as test is
    train_clip = more.clip[np.flatnonzero(more.split == 0)[0]]  # the box's input ranges
    np.testing.assert_array_equal(cal.clip, np.broadcast_to(train_clip, cal.clip.shape))
    # a design without them records nothing new: its datasets keep their settings hash
    assert "calibration_fraction" not in ScenarioDesign().to_dict()
    assert design.to_dict()["calibration_fraction"] == 0.8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(calibration_fraction=-0.5), r"design.calibration_fraction must be in \[0, 10\]"),
        (
            dict(parameters={"length": (2.0, 1.0)}),
            r"design.parameters.length: low \(2.0\) > high \(1.0\)",
        ),
        (dict(parameters={"lenght": (1.0, 2.0)}), r"unknown names \['lenght'\].*'length'"),
        (dict(sampler="grid"), "design.sampler must be one of"),
        (dict(splits={"train": 0.9, "val": 0.2, "test": 0.0}), "sum to 1"),
        (dict(dt=-0.1), "design.dt must be a number > 0"),
        (dict(signals={"pump": {"kind": "step"}}), r"design.signals: unknown inputs \['pump'\]"),
    ],
)
def test_bad_designs_say_what_is_allowed(kwargs, match):
    sys_ = make_system("pendulum")
    with pytest.raises(ValueError, match=match):
        ScenarioDesign(**kwargs).sample(sys_, 4, seed=0)


@pytest.mark.parametrize("n", [0, -3])
def test_n_scenarios_must_be_positive(n):
    with pytest.raises(ValueError, match="n_scenarios must be an integer > 0"):
        ScenarioDesign().sample(make_system("pendulum"), n, seed=0)


def test_bounds_outside_physical_limits_are_refused():
    with pytest.raises(
        ValueError, match=r"design.parameters.k5: \(0.5, 1.5\) leaves the physical limits"
    ):
        ScenarioDesign(parameters={"k5": (0.5, 1.5)}).sample(
            make_system("cascaded_tanks"), 4, seed=0
        )
