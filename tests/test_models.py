"""Surrogate models against independent references: the scipy solver, per-member computation."""

import numpy as np
import pytest
import torch

from twin_ml.data import ScenarioDesign
from twin_ml.data.generate import scenario_inputs
from twin_ml.models import build_model, compute_stats, model_from_config
from twin_ml.models.ensemble import StackedMLP, StackedTCN
from twin_ml.physics import SolverSettings, make_system, solve_looped

# numeric: also run in `make test-portable`; not the float64 dopri5 test (its 1e-5 is far from
# round-off)


def _scenarios(name, n=6, seed=0):
    sys_ = make_system(name)
    d = ScenarioDesign(
        extrapolation_fraction=0, t_end=40 * sys_.default_horizon[1]
    )  # 40 steps: quick
    sc = d.sample(sys_, n, seed)
    t = d.time_grid(sys_)
    u = scenario_inputs(t, d.signal_specs(sys_), sc, seed)
    ref = solve_looped(sys_, t, u, sc.p, sc.x0, SolverSettings(rtol=1e-10, atol=1e-12))
    return sys_, t, u, sc.p, sc.x0, ref


@pytest.mark.numeric
def test_stacked_members_equal_separate_mlps_and_train_independently():
    net = StackedMLP(3, 4, 2, hidden=8, depth=2, seed=5)
    z = torch.randn(3, 7, 4)
    out = net(z)
    for m in range(3):
        h = z[m]
        for k, (w, b) in enumerate(zip(net.weights, net.biases)):
            h = h @ w[m] + b[m]
            h = torch.tanh(h) if k < len(net.weights) - 1 else h
        torch.testing.assert_close(out[m], h)
    out[0].sum().backward()
    assert net.weights[0].grad[1:].abs().max() == 0 and net.weights[0].grad[0].abs().max() > 0
    assert not torch.equal(net.weights[0][0], net.weights[0][1])  # different seeds per member


@pytest.mark.numeric
@pytest.mark.parametrize("name", ["pendulum", "cascaded_tanks", "thermal_rc"])
def test_hybrid_with_zero_residual_reproduces_the_solver(name):
    # untrained hybrid: g_theta starts at exactly 0, so the torch RK4 rollout of the physics,
    # with inputs interpolated inside the vector field, must match scipy at a tight tolerance
    sys_, t, u, p, x0, ref = _scenarios(name)
    stats = compute_stats(ref.x, u, p, ref.y, t)
    model = build_model("hybrid", sys_, stats, members=2, step_fraction=0.25).double()
    x, y = model(*(torch.tensor(a) for a in (x0, u, p, t)))
    assert x.shape == (2, 6, t.size, len(sys_.states))
    span = np.ptp(ref.x, axis=(0, 1))
    err = np.abs(x.detach().numpy() - ref.x[None]) / span
    assert err.max() < 2e-3, err.max()
    np.testing.assert_allclose(y.detach().numpy()[0], ref.y, atol=2e-3 * np.ptp(ref.y))


@pytest.mark.numeric
@pytest.mark.parametrize(
    "solver, fraction", [("rk4", 1.0), ("rk4", 0.5), ("midpoint", 0.5), ("euler", 0.25)]
)
def test_fixed_steps_equal_torchdiffeq(solver, fraction):
    """The fixed-step rollout steps directly; torchdiffeq's odeint with the same method on the
    same sub-grid, interval by interval, is the reference (float64: equal to round-off)."""
    from torchdiffeq import odeint

    sys_, t, u, p, x0, ref = _scenarios("cascaded_tanks", n=3)
    model = build_model(
        "node",
        sys_,
        compute_stats(ref.x, u, p, ref.y, t),
        members=2,
        solver=solver,
        step_fraction=fraction,
        seed=3,
    ).double()
    x0t, ut, pt, tt = (torch.tensor(a) for a in (x0, u, p, t))
    fast = model(x0t, ut, pt, tt)[0]
    n = round(1 / fraction)
    zoh = torch.as_tensor(model.zoh)
    x = x0t.unsqueeze(0).expand(2, -1, -1)
    for k in range(len(t) - 1):
        u0 = ut[:, k]
        du = torch.where(zoh, torch.zeros_like(u0), ut[:, k + 1] - u0)
        t0, h = float(t[k]), float(t[k + 1] - t[k])

        def f(tau, xx, u0=u0, du=du, t0=t0, h=h):
            return model.vector_field(xx, u0 + min(max((float(tau) - t0) / h, 0.0), 1.0) * du, pt)

        grid = torch.linspace(float(t[k]), float(t[k + 1]), n + 1, dtype=torch.float64)
        x = odeint(f, x, grid, method=solver, options={"grid_constructor": lambda *_a, g=grid: g})[
            -1
        ]
        torch.testing.assert_close(fast[:, :, k + 1], x, rtol=1e-12, atol=1e-12)


@pytest.mark.numeric
@pytest.mark.parametrize("solver, n", [("rk4", 1), ("rk4", 3), ("midpoint", 2), ("euler", 4)])
def test_fixed_steps_on_increments_equal_the_rates(solver, n):
    """The export's form (the vector field returns h / n times the rate, folded into the network)
    is the same step: float64, a nonlinear field that depends on the interval's fraction."""
    from twin_ml.models.surrogates import fixed_steps

    x = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64)
    h = 0.37

    def rate(xx, s):
        return torch.stack([xx[:, 1] * (1 + s), -torch.sin(xx[:, 0]) - 0.3 * xx[:, 1] + s], -1)

    ref = fixed_steps(rate, x, h, n, solver)
    inc = fixed_steps(lambda xx, s: (h / n) * rate(xx, s), x, h, n, solver, increments=True)
    # a few roundings apart per stage (where h multiplies), on values of order 1
    tol = 16 * 4 * n * torch.finfo(torch.float64).eps
    torch.testing.assert_close(inc, ref, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="solver must be one of"):
        fixed_steps(rate, x, h, n, "dopri5")


def test_adaptive_dopri5_matches_the_solver():
    sys_, t, u, p, x0, ref = _scenarios("pendulum", n=3)
    stats = compute_stats(ref.x, u, p, ref.y, t)
    args = [torch.tensor(a) for a in (x0, u, p, t)]
    # the input's kinks at every sample cost adaptive error control accuracy: a tight rtol is needed
    a = build_model(
        "hybrid", sys_, stats, members=1, solver="dopri5", rtol=1e-9, atol=1e-11
    ).double()(*args)[0]
    np.testing.assert_allclose(a.detach().numpy()[0], ref.x, atol=1e-5 * np.ptp(ref.x))


@pytest.mark.numeric
def test_incomplete_physics_differs_and_learnable_parameters_start_at_nominal():
    sys_, t, u, p, x0, ref = _scenarios("pendulum", n=2)
    stats = compute_stats(ref.x, u, p, ref.y, t)
    args = [torch.tensor(a) for a in (x0, u, p, t)]
    full = build_model("hybrid", sys_, stats, members=1).double()(*args)[0]
    undamped = build_model(
        "hybrid", sys_, stats, members=1, physics_options={"damped": False}
    ).double()(*args)[0]
    assert (full - undamped).abs().max() > 1e-2  # the residual has something to learn
    m = build_model("hybrid", sys_, stats, members=2, learn_parameters=["damping"])
    assert torch.equal(
        m.physical_parameters(torch.tensor(p, dtype=torch.float32)),
        torch.tensor(p, dtype=torch.float32).expand(2, -1, -1),
    )
    with pytest.raises(ValueError, match=r"unknown \['dampng'\]"):
        build_model("hybrid", sys_, stats, learn_parameters=["dampng"])
    with pytest.raises(
        KeyError,
        match="unknown model kind 'gp'; kinds: \\['emulator', 'flowmap', 'flowmap_hybrid', "
        "'hybrid', 'latent', 'node', 'rom'\\]",
    ):
        build_model("gp", sys_, stats)


@pytest.mark.numeric
@pytest.mark.parametrize("kind", ["node", "hybrid", "emulator", "emulator-tcn"])
def test_model_rebuilds_from_its_config(kind):
    sys_, t, u, p, x0, ref = _scenarios("cascaded_tanks", n=3)
    stats = compute_stats(ref.x, u, p, ref.y, t)
    kw = {"n_times": t.size} if kind.startswith("emulator") else {}
    if kind == "emulator-tcn":
        kind, kw["arch"] = "emulator", "tcn"
    m = build_model(kind, sys_, stats, members=3, seed=4, **kw)
    m.conformal_scale.fill_(1.7)
    again = model_from_config(m.config)
    again.load_state_dict(m.state_dict())
    args = [torch.tensor(a, dtype=torch.float32) for a in (x0, u, p, t)]
    a, b = m.predict(*args), again.predict(*args)
    torch.testing.assert_close(a["mean"], b["mean"])
    torch.testing.assert_close(a["std"], b["std"])
    assert a["members"].shape == (3, 3, t.size, 1)


@pytest.mark.numeric
def test_stacked_tcn_members_are_separate_causal_dilated_convolutions():
    """Oracle: each member's network written out tap by tap (out[t] = sum_j W_j h[t - (k-1-j) d]
    + b, zero before the first step) from its slice of the grouped weights."""
    torch.manual_seed(0)
    members, c_in, c_out, ch, k = 3, 4, 2, 5, 3
    net = StackedTCN(members, c_in, c_out, channels=ch, levels=3, kernel=k, seed=2).double()
    assert net.receptive_field == 1 + (k - 1) * (1 + 2 + 4)
    n_t = 20
    z = torch.randn(2, c_in, n_t, dtype=torch.float64)
    out = net(z.repeat(1, members, 1)).reshape(2, members, c_out, n_t)

    def taps(conv, h, m, a, b, d):  # member m's causal convolution, one tap at a time
        w, bias = conv.weight[m * b : (m + 1) * b], conv.bias[m * b : (m + 1) * b]
        y = bias[None, :, None].expand(h.shape[0], b, n_t).clone()
        for j in range(w.shape[-1]):
            lag = (w.shape[-1] - 1 - j) * d
            y[..., lag:] += torch.einsum("oc,bct->bot", w[..., j], h[..., : n_t - lag])
        return y

    for m in range(members):
        h = taps(net.lift, z, m, c_in, ch, 1)
        for d, block in zip(net.dilations, net.blocks):
            h = h + torch.nn.functional.silu(taps(block, h, m, ch, ch, d))
        ref = taps(net.head, torch.nn.functional.silu(h), m, ch, c_out, 1)
        torch.testing.assert_close(out[:, m], ref)
    # members start apart (seeds), and a loss on one member moves only its own weights
    w = net.blocks[0].weight
    assert not torch.equal(w[:ch], w[ch : 2 * ch])
    out[:, 0].sum().backward()
    assert w.grad[ch:].abs().max() == 0 and w.grad[:ch].abs().max() > 0


@pytest.mark.numeric
def test_tcn_emulator_is_causal_and_its_members_are_the_single_models():
    sys_, t, u, p, x0, ref = _scenarios("pendulum", n=3)
    stats = compute_stats(ref.x, u, p, ref.y, t)
    args = [torch.tensor(a, dtype=torch.float32) for a in (x0, u, p, t)]
    m = build_model("emulator", sys_, stats, n_times=t.size, arch="tcn", members=3, seed=1)
    _, y = m(*args)
    bumped = args[1].clone()
    bumped[:, 25] += 0.5  # the torque from step 25 on: nothing before it may move
    _, y2 = m(args[0], bumped, *args[2:])
    assert torch.equal(y2[:, :, :25], y[:, :, :25]) and (y2[:, :, 25:] != y[:, :, 25:]).any()
    one = build_model("emulator", sys_, stats, n_times=t.size, arch="tcn", members=1, seed=1)
    torch.testing.assert_close(one(*args)[1][0], y[0])  # member 0 is the seed's own network
    with pytest.raises(ValueError, match="model.net.arch must be 'mlp' or 'tcn', got 'rnn'"):
        build_model("emulator", sys_, stats, n_times=t.size, arch="rnn")


@pytest.mark.numeric
def test_robust_normalization_ignores_a_wound_up_trajectory():
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 0.5, size=(50, 40, 2))
    t = np.arange(40.0)
    base = compute_stats(x, x[..., :1], x[:, 0], x[..., :1], t)
    x[0, :, 0] = np.linspace(0, 120, 40)  # one pendulum over the top: theta winds up to 120 rad
    st = compute_stats(x, x[..., :1], x[:, 0], x[..., :1], t)
    assert st["x_std"][0] == pytest.approx(base["x_std"][0], rel=0.05)  # a plain std would be ~10x
    assert st["x_std"][0] == pytest.approx(0.5, rel=0.1)
    assert np.std(x[..., 0]) > 5 * st["x_std"][0]


@pytest.mark.numeric
def test_shooting_segments_tile_the_trajectory_from_the_data_states():
    from twin_ml.models import SurrogateModule

    b, n_t, steps, offset = 3, 21, 4, 2
    x = torch.arange(b * n_t * 2, dtype=torch.float32).reshape(b, n_t, 2)
    u, y = x[..., :1] * 10, x[..., 1:] * 100
    p = torch.arange(b * 3, dtype=torch.float32).reshape(b, 3)
    batch = (torch.arange(b), x[:, 0], u, p, x, y)
    index, x0, uw, pw, xw, yw = SurrogateModule.segments(batch, offset, steps)
    k = (n_t - 1 - offset) // steps  # 4 windows: starts 2, 6, 10, 14 (the last ends at 18 <= 20)
    assert (
        xw.shape == (b * k, steps + 1, 2)
        and uw.shape == (b * k, steps + 1, 1)
        and yw.shape == (b * k, steps + 1, 1)
    )
    assert torch.equal(index, torch.arange(b).repeat_interleave(k)) and torch.equal(
        pw, p.repeat_interleave(k, 0)
    )
    for i in range(b):
        for j in range(k):
            s = offset + j * steps
            assert torch.equal(
                xw[i * k + j], x[i, s : s + steps + 1]
            )  # consecutive, sharing end points
            assert torch.equal(x0[i * k + j], x[i, s])
            assert torch.equal(uw[i * k + j], u[i, s : s + steps + 1])


@pytest.mark.numeric
def test_a_constant_column_is_left_unscaled():
    x = np.random.default_rng(0).normal(size=(8, 5, 2))
    p = np.column_stack([np.full(8, 9.81), np.linspace(1, 2, 8)])  # a parameter the design fixed
    st = compute_stats(x, x[..., :1], p, x[..., :1], np.arange(5.0))
    assert st["p_std"][0] == 1.0 and st["p_mean"][0] == pytest.approx(9.81)
    assert 0.2 < st["p_std"][1] < 1.0
