"""Discrete-time flow maps (kinds flowmap, flowmap_hybrid): one network evaluation per interval.

Oracles: an RK4 (3/8 rule, as torchdiffeq's) of the physics right-hand side written here in
numpy; the matrix exponential of the linear thermal network, with the RK4 error bound of every
step propagated along the rollout; the map computed by hand from the network's weights; a forward
hook that counts the network's evaluations; onnxruntime against torch; a real twin-train run,
exported and served.
"""

import numpy as np
import pytest
import torch
from conftest import rollout_tol, train_here
from scipy.linalg import expm

from twin_ml.data import ScenarioDesign
from twin_ml.data.generate import scenario_inputs
from twin_ml.models import build_model, compute_stats, load_trained, model_from_config, save_model
from twin_ml.physics import SolverSettings, make_system, solve_looped

EPS64 = float(np.finfo(np.float64).eps)
FLOW_MAPS = ["flowmap", "flowmap_hybrid"]


def _scenarios(name, n=4, steps=20, seed=0):
    """n in-design scenarios of `name` on `steps` grid intervals, statistics from the solver."""
    sys_ = make_system(name)
    d = ScenarioDesign(extrapolation_fraction=0, t_end=steps * sys_.default_horizon[1])
    sc = d.sample(sys_, n, seed)
    t = d.time_grid(sys_)
    u = scenario_inputs(t, d.signal_specs(sys_), sc, seed)
    ref = solve_looped(sys_, t, u, sc.p, sc.x0, SolverSettings(rtol=1e-8, atol=1e-10))
    return sys_, t, u, sc.p, sc.x0, compute_stats(ref.x, u, sc.p, ref.y, t)


def _randomize(net, seed=0, scale=0.3):
    """Nonzero weights everywhere (a trained-looking network; the hybrid's last layer starts at
    zero), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w, b in zip(net.weights, net.biases):
            w.copy_(scale * torch.randn(w.shape, generator=g, dtype=w.dtype))
            b.copy_(scale * torch.randn(b.shape, generator=g, dtype=b.dtype))


def _zoh(sys_):
    return np.array([i.interpolation == "zoh" for i in sys_.inputs], dtype=bool)


def _rk4_numpy(f, x, h, n):
    """n steps of the 3/8-rule RK4 over an interval of length h; f(x, s), s the interval's
    fraction. Written from the Butcher tableau (Kutta 1901), independently of the model code."""
    dh = h / n
    for j in range(n):
        s0 = j / n
        k1 = f(x, s0)
        k2 = f(x + dh * k1 / 3.0, s0 + 1.0 / (3 * n))
        k3 = f(x + dh * (k2 - k1 / 3.0), s0 + 2.0 / (3 * n))
        k4 = f(x + dh * (k1 - k2 + k3), s0 + 1.0 / n)
        x = x + dh * (k1 + 3.0 * k2 + 3.0 * k3 + k4) / 8.0
    return x


# ---- 1. the hybrid map with its correction at zero is the physics stepped by RK4 ----------------


@pytest.mark.numeric
@pytest.mark.parametrize(
    "name, options, learn",
    [
        ("pendulum", {"damped": False}, ["length"]),
        ("cascaded_tanks", {"overflow": False}, []),
        ("thermal_rc", {}, ["C_air"]),
    ],
)
def test_hybrid_map_without_correction_is_rk4_of_the_physics(name, options, learn):
    sys_, t, u, p, x0, stats = _scenarios(name)
    model = build_model(
        "flowmap_hybrid",
        sys_,
        stats,
        members=2,
        step_fraction=0.5,
        physics_options=options,
        learn_parameters=learn,
    ).double()
    factors = np.array([[0.1], [-0.2]]) if learn else np.zeros((2, 0))
    with torch.no_grad():
        model.net.weights[-1].zero_()
        model.net.biases[-1].zero_()
        model.log_factors.copy_(torch.tensor(factors))
    x = model(*(torch.tensor(a) for a in (x0, u, p, t)))[0].detach().numpy()

    physics, zoh = make_system(name, **options), _zoh(sys_)
    idx = [sys_.parameter_names.index(k) for k in learn]
    for m in range(2):
        pm = p.copy()
        pm[:, idx] *= np.exp(factors[m])
        want = [x0]
        for k in range(len(t) - 1):
            du = np.where(zoh, 0.0, u[:, k + 1] - u[:, k])

            def f(xx, s, k=k, du=du, pm=pm):
                return physics.rhs(None, xx, u[:, k] + s * du, pm)

            want.append(_rk4_numpy(f, want[-1], t[k + 1] - t[k], 2))
        want = np.stack(want, axis=1)
        # float64, the same stages in another order of operations: round-off growing along the
        # rollout (4 stages x 2 substeps an interval)
        tol = 64 * 8 * len(t) * EPS64 * max(np.abs(want).max(), 1.0)
        np.testing.assert_allclose(x[m], want, rtol=0, atol=tol)
    if learn:  # the factors reach the physics: the members differ
        assert np.abs(x[0] - x[1]).max() > 1e-6


def _thermal_exact(p, x0, u, t, zoh, n_sub):
    """The thermal network's exact rollout (matrix exponential) and a rigorous bound on the RK4
    rollout's distance to it, both float64.

    On an interval of length h the input is u0 + (tau / h) du, so z = [x, tau, 1] follows the
    linear autonomous dz/dtau = M z, M = [[A, B du / h, B u0], [0, 0, 1], [0, 0, 0]], and RK4's
    stages (the input at their times) are RK4 on z: one substep of length d is T4(d M) z, T4 the
    degree-4 Taylor polynomial of the exponential. The local error is (expm(d M) - T4(d M)) z at
    the exact z; the error carried in goes through T4(d A) (x's block): elementwise,
    |e_k+1| <= |T4(d A)| |e_k| + |local error|.
    """
    Ca, Cw, Raw, Rwo, Rwin, fs = p  # the equations of the module doc of thermal.py
    A = np.array(
        [[-(1 / Raw + 1 / Rwin) / Ca, 1 / (Raw * Ca)], [1 / (Raw * Cw), -(1 / Raw + 1 / Rwo) / Cw]]
    )
    B = np.array([[1 / (Rwin * Ca), fs / Ca, 1 / Ca], [1 / (Rwo * Cw), (1 - fs) / Cw, 0.0]])

    def t4(a):
        out, term = np.eye(len(a)), np.eye(len(a))
        for k in range(1, 5):
            term = term @ a / k
            out = out + term
        return out

    x, err, xs, bounds = x0.copy(), np.zeros(2), [x0], [np.zeros(2)]
    for k in range(len(t) - 1):
        h = t[k + 1] - t[k]
        du = np.where(zoh, 0.0, u[k + 1] - u[k])
        M = np.zeros((4, 4))
        M[:2, :2], M[:2, 2], M[:2, 3], M[2, 3] = A, B @ du / h, B @ u[k], 1.0
        d = h / n_sub
        exact_sub, poly_sub, carry = expm(d * M), t4(d * M), np.abs(t4(d * A))
        z = np.array([*x, 0.0, 1.0])
        for _ in range(n_sub):
            err = carry @ err + np.abs((exact_sub - poly_sub) @ z)[:2]
            z = exact_sub @ z
        x = z[:2]
        xs.append(x)
        bounds.append(err)
    return np.array(xs), np.array(bounds)


@pytest.mark.numeric
def test_hybrid_map_of_a_linear_system_meets_the_rk4_bound_on_the_exact_solution():
    sys_, t, u, p, x0, stats = _scenarios("thermal_rc", n=3)
    zoh = _zoh(sys_)
    errs = {}
    for n_sub in (1, 2):
        model = build_model(
            "flowmap_hybrid", sys_, stats, members=1, step_fraction=1 / n_sub
        ).double()
        x = model(*(torch.tensor(a) for a in (x0, u, p, t)))[0].detach().numpy()[0]
        errs[n_sub] = []
        for i in range(len(p)):
            exact, bound = _thermal_exact(p[i], x0[i], u[i], t, zoh, n_sub)
            err = np.abs(x[i] - exact)
            roundoff = 64 * 4 * n_sub * len(t) * EPS64 * np.abs(exact).max()
            assert (err <= bound + roundoff).all(), (n_sub, i, (err - bound).max())
            errs[n_sub].append(err.max())
    # not a vacuous bound: RK4's error is there, and fourth order (halving the step: ~1/16)
    assert min(errs[1]) > 1e-9
    assert max(e2 / e1 for e1, e2 in zip(errs[1], errs[2])) < 1 / 8, errs


# ---- 2. the map by hand ------------------------------------------------------------------------


@pytest.mark.numeric
def test_flowmap_steps_by_the_network_at_the_interval_middle():
    # thermal_rc: two linear inputs (outdoor temperature, sun) and a held one (heating)
    sys_, t, u, p, x0, stats = _scenarios("thermal_rc", n=3, steps=3)
    model = build_model("flowmap", sys_, stats, members=2, seed=3).double()
    _randomize(model.net)
    zoh = _zoh(sys_)
    assert zoh.any() and not zoh.all()

    def by_hand(x0, u, p):
        # the model's statistics (stored float32, widened by .double())
        st = {k: getattr(model, k).detach().numpy() for k in stats}
        w = [a.detach().numpy() for a in model.net.weights]
        b = [a.detach().numpy() for a in model.net.biases]
        out = []
        for m in range(2):
            x, xs = x0.copy(), [x0]
            for k in range(u.shape[1] - 1):
                u_mid = np.where(zoh, u[:, k], 0.5 * (u[:, k] + u[:, k + 1]))
                z = np.concatenate(
                    [
                        (x - st["x_mean"]) / st["x_std"],
                        (u_mid - st["u_mean"]) / st["u_std"],
                        (p - st["p_mean"]) / st["p_std"],
                    ],
                    axis=-1,
                )
                for j in range(len(w)):
                    z = z @ w[j][m] + b[j][m]
                    z = np.tanh(z) if j < len(w) - 1 else z
                x = x + (t[k + 1] - t[k]) * z * st["dx_std"]
                xs.append(x)
            out.append(np.stack(xs, axis=1))
        return np.stack(out)

    def rollout(u):
        return model(*(torch.tensor(a) for a in (x0, u, p, t)))[0].detach().numpy()

    got, want = rollout(u), by_hand(x0, u, p)
    tol = 64 * len(t) * EPS64 * max(np.abs(want).max(), 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    # the semantics, not only the numbers: the held input's next sample does not reach the
    # interval, a linear input's does (through the middle)
    held, linear = int(np.flatnonzero(zoh)[0]), int(np.flatnonzero(~zoh)[0])
    u2 = u.copy()
    u2[:, 1, held] += 1.0
    assert np.abs(rollout(u2)[:, :, 1] - got[:, :, 1]).max() <= tol
    u2 = u.copy()
    u2[:, 1, linear] += 1.0
    assert np.abs(rollout(u2)[:, :, 1] - got[:, :, 1]).max() > 1e3 * tol


# ---- 3. one network evaluation per interval ----------------------------------------------------


@pytest.mark.parametrize(
    "kind, fraction, per_interval",
    [("flowmap", 1.0, 1), ("flowmap_hybrid", 0.25, 1), ("hybrid", 0.25, 16)],
)
def test_the_network_is_evaluated_once_per_interval(kind, fraction, per_interval):
    sys_, t, u, p, x0, stats = _scenarios("pendulum", n=2, steps=7)
    model = build_model(kind, sys_, stats, members=2, step_fraction=fraction)
    calls = []
    model.net.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(*(torch.tensor(a, dtype=torch.float32) for a in (x0, u, p, t)))
    assert len(calls) == per_interval * (len(t) - 1)


# ---- 4. export ---------------------------------------------------------------------------------


@pytest.mark.numeric
@pytest.mark.parametrize(
    "kind, name",
    [("flowmap", "thermal_rc"), ("flowmap_hybrid", "pendulum"), ("flowmap_hybrid", "thermal_rc")],
)
def test_onnx_reproduces_the_flow_map(kind, name):
    import onnx

    from twin_ml._ort import session
    from twin_ml.export.onnx_export import build_onnx

    sys_, t, u, p, x0, stats = _scenarios(name, n=3, steps=30)
    model = build_model(kind, sys_, stats, members=3, seed=1, step_fraction=0.5).eval()
    _randomize(model.net, scale=0.1)
    dt = float(t[1] - t[0])
    mp = build_onnx(model, dt)
    # the interface of every ODE model's file: the same graph inputs and outputs as a hybrid's
    ref_mp = build_onnx(build_model("hybrid", sys_, stats, members=3).eval(), dt)

    def io(g):
        return [
            (v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in (*g.input, *g.output)
        ]

    assert io(mp.graph) == io(ref_mp.graph)
    # the loop body evaluates the network once: one activation per hidden layer (an RK4 body, 4)
    loop = next(n for n in mp.graph.node if n.op_type == "Loop")
    body = onnx.helper.get_attribute_value(loop.attribute[0])
    assert sum(n.op_type == "Tanh" for n in body.node) == len(model.net.weights) - 1

    sess = session(mp.SerializeToString())
    evals = 1 + (4 * model.substeps if model.physics else 0)
    for n_t in (2, 7, len(t)):
        for b in (1, 3):
            feeds = {
                "x0": x0[:b].astype(np.float32),
                "u": u[:b, :n_t].astype(np.float32),
                "p": p[:b].astype(np.float32),
            }
            members, mean, std = sess.run(["members", "mean", "std"], feeds)
            tt = torch.tensor(t[:n_t], dtype=torch.float32)
            ref = model.predict(*(torch.tensor(feeds[k]) for k in ("x0", "u", "p")), tt)
            y_std = model.y_std.numpy()
            # two float32 programs of one rollout (folded weights, h folded in), normalized units
            scale = np.abs(ref["members"].numpy() / y_std).max()
            tol = rollout_tol(n_t, max(scale, 1.0), evals_per_step=evals)
            assert members.shape == (3, b, n_t, model.ny)
            assert np.abs(members - ref["members"].numpy()).max() / y_std.min() < tol, (n_t, b)
            assert np.allclose(mean, ref["mean"].numpy(), rtol=0, atol=tol * y_std.min())


def _loop_body(mp):
    import onnx

    loop = next(n for n in mp.graph.node if n.op_type == "Loop")
    return onnx.helper.get_attribute_value(loop.attribute[0])


def test_the_loop_body_steps_the_state_alone():
    """What does not depend on the state (the first layer's input and parameter terms, the
    input's interpolation, the loop's index bookkeeping) is computed before the loop; what is left
    in the body is counted from the graph: the network's layers per evaluation, the solver's
    combination of the stages, a Gather per term taken from before the loop, one for the outputs
    (plain state selections), and the loop condition's Identity."""
    from collections import Counter

    from onnx import numpy_helper

    from twin_ml.export.onnx_export import build_onnx

    sys_, t, u, p, x0, stats = _scenarios("pendulum", n=2, steps=4)
    dt = float(t[1] - t[0])
    for kind in ("flowmap", "node"):  # the node: RK4 in one step per interval
        model = build_model(kind, sys_, stats, members=3, solver="rk4").eval()
        mp = build_onnx(model, dt)
        body, n_layers = _loop_body(mp), len(model.net.weights)
        ops = Counter(n.op_type for n in body.node if n.op_type != "Constant")
        if kind == "flowmap":  # one evaluation, x + its increment: no Mul at all
            want = {"MatMul": n_layers, "Tanh": n_layers - 1, "Add": n_layers + 1, "Gather": 2}
        else:
            # 4 evaluations; c0 + s cdu at s = 1/3, 2/3 (Mul, Add) and 1 (Add); the 3/8 rule on
            # increments: k1 / 3, x + k1 / 3, x + (k2 - k1 / 3), x + (k1 - k2 + k3) and
            # x + (k1 + 3 (k2 + k3) + k4) / 8
            want = {
                "MatMul": 4 * n_layers,
                "Tanh": 4 * (n_layers - 1),
                "Add": 4 * n_layers + 3 + 8,
                "Mul": 2 + 3,
                "Sub": 2,
                "Gather": 3,  # c0, cdu and the outputs
            }
        assert ops == Counter({**want, "Identity": 1}), (kind, ops)
        # nothing in the body reads the inputs or the parameters themselves
        assert not [n.op_type for n in body.node if {"u", "p"} & set(n.input)], kind
        # and no multiplication by one is left (torch's baddbmm exports one per layer)
        consts = {i.name: numpy_helper.to_array(i) for i in mp.graph.initializer}
        for n in body.node:
            if n.op_type == "Constant":
                consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        for n in body.node:
            if n.op_type == "Mul":
                for name in n.input:
                    assert not (name in consts and np.all(consts[name] == 1)), (kind, n.input)


@pytest.mark.numeric
@pytest.mark.parametrize("kind", ["hybrid", "flowmap_hybrid"])
def test_onnx_reproduces_a_hybrid_with_learned_parameter_factors(kind):
    sys_, t, u, p, x0, stats = _scenarios("pendulum", n=3, steps=12)
    model = build_model(kind, sys_, stats, members=3, seed=1, learn_parameters=["length"]).eval()
    _randomize(model.net, scale=0.1)
    with torch.no_grad():
        model.log_factors.copy_(torch.tensor([[0.1], [-0.2], [0.05]]))
    assert_onnx_reproduces(model, t, u, p, x0, evals_per_step=4 if kind == "hybrid" else 5)


def assert_onnx_reproduces(model, t, u, p, x0, *, evals_per_step: int) -> None:
    """The exported graph's members against torch's, for 1, 2 and all steps and batches of 1 and
    3, within the float32 rollout bound (in output stds)."""
    from twin_ml._ort import session
    from twin_ml.export.onnx_export import build_onnx

    sess = session(build_onnx(model, float(t[1] - t[0])).SerializeToString())
    for n_t in (1, 2, len(t)):
        for b in (1, 3):
            feeds = {
                "x0": x0[:b].astype(np.float32),
                "u": u[:b, :n_t].astype(np.float32),
                "p": p[:b].astype(np.float32),
            }
            members = sess.run(["members"], feeds)[0]
            tt = torch.tensor(t[:n_t], dtype=torch.float32)
            ref = model.predict(*(torch.tensor(feeds[k]) for k in ("x0", "u", "p")), tt)
            y_std = model.y_std.numpy()
            scale = np.abs(ref["members"].numpy() / y_std).max()
            tol = rollout_tol(n_t, max(scale, 1.0), evals_per_step=evals_per_step)
            assert np.abs(members - ref["members"].numpy()).max() / y_std.min() < tol, (n_t, b)


# ---- 5. save and load --------------------------------------------------------------------------


@pytest.mark.numeric
@pytest.mark.parametrize("kind", FLOW_MAPS)
def test_save_and_load_keep_the_kind_and_the_outputs(kind, tmp_path):
    sys_, t, u, p, x0, stats = _scenarios("cascaded_tanks", n=3, steps=10)
    opts = {"physics_options": {"overflow": False}} if kind == "flowmap_hybrid" else {}
    model = build_model(kind, sys_, stats, members=2, seed=2, step_fraction=0.5, **opts)
    _randomize(model.net, scale=0.1)
    model.conformal_scale.fill_(1.3)
    assert model_from_config(model.config).kind == kind
    save_model(tmp_path, model, model.conformal_scale.numpy(), t, "config: text")
    again, meta = load_trained(tmp_path / "model")
    assert again.kind == kind and meta["config"]["kind"] == kind
    assert again.substeps == 2 and again.physics == (kind == "flowmap_hybrid")
    args = [torch.tensor(a, dtype=torch.float32) for a in (x0, u, p, t)]
    a, b = model.eval().predict(*args), again.predict(*args)
    torch.testing.assert_close(a["mean"], b["mean"])
    torch.testing.assert_close(a["std"], b["std"])


# ---- 6. settings a flow map cannot have --------------------------------------------------------


@pytest.mark.parametrize("kind", FLOW_MAPS)
def test_an_adaptive_solver_is_refused_naming_the_setting(kind):
    sys_, t, u, p, x0, stats = _scenarios("pendulum", n=1, steps=3)
    with pytest.raises(ValueError, match=r"model\.net\.solver='dopri5'.*fixed-step"):
        build_model(kind, sys_, stats, solver="dopri5")
    model = build_model(kind, sys_, stats, members=1)
    model.solver = "bosh3"  # set behind the constructor's back
    with pytest.raises(ValueError, match=r"model\.net\.solver='bosh3'"):
        model(*(torch.tensor(a, dtype=torch.float32) for a in (x0, u, p, t)))


def test_flow_map_configs_compose():
    from hydra import compose, initialize_config_dir

    from training._common import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for exp, system, options in (
            ("pendulum_flowmap", "pendulum", {"damped": False}),
            ("cascaded_tanks_flowmap", "cascaded_tanks", {"overflow": False}),
        ):
            cfg = compose(config_name="train", overrides=[f"experiment={exp}"])
            assert cfg.model.net.kind == "flowmap_hybrid" and cfg.system.name == system
            assert dict(cfg.model.net.physics_options) == options
            assert cfg.model.net.solver == "rk4"
        cfg = compose(config_name="train", overrides=["model=flowmap"])
        assert cfg.model.net.kind == "flowmap"


# ---- 7. trained, exported, served --------------------------------------------------------------


@pytest.mark.numeric
def test_trained_flow_map_exports_and_serves(pendulum_data, tmp_path):
    from serving.runtime import Runtime
    from twin_ml.export.export import export_run

    run = tmp_path / "run"
    train_here(
        "experiment=pendulum_flowmap",
        f"data_dir={pendulum_data}",
        f"out_dir={run}",
        "ensemble.size=2",
        "trainer.max_epochs=2",
        "data.batch_size=8",
        "model.net.hidden=16",
        "speed_scenarios=2",
        "logger=none",
    )
    model, meta = load_trained(run / "model")
    assert model.kind == "flowmap_hybrid" and meta["config"]["physics_options"] == {"damped": False}
    blob, card = export_run(
        run, name="pendulum_flowmap", version="v1", parity_scenarios=8, parity_steps=20
    )
    assert card.kind == "flowmap_hybrid" and card.parity["passed"]
    assert card.integrator_error is None  # a discrete map: no vector field to integrate tighter
    path = tmp_path / "model.onnx"
    path.write_bytes(blob)
    rt = Runtime(path, card, max_scenarios=4)
    n = 20
    tq = 0.3 * np.sin(np.arange(n + 1) * 0.1)
    ans = rt.simulate(
        {
            "parameters": {"length": 1.0, "damping": 0.2, "mass": 1.2},
            "initial_state": {"theta": 0.4, "omega": 0.0},
            "t_end": round(n * 0.1, 10),
            "inputs": {"torque": tq.tolist()},
        }
    )[0]
    ref = model.predict(
        torch.tensor([[0.4, 0.0]]),
        torch.tensor(tq, dtype=torch.float32)[None, :, None],
        torch.tensor([[1.0, 0.2, 1.2]]),
        torch.tensor(ans["times"], dtype=torch.float32),
    )
    tol = rollout_tol(n, np.abs(ref["members"].numpy()).max(), evals_per_step=1 + 4)
    assert np.allclose(
        ans["outputs"]["theta"]["mean"], ref["mean"][0, :, 0].numpy(), rtol=0, atol=tol
    )
