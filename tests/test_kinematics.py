"""Second-order neural ODEs (`model.net.kinematics`): a position's rate is its velocity, exactly.

Oracles: the states themselves (a position's rate); the same network without kinematics (the
velocity's rate); the closed form of uniform motion (the network's output at zero: RK4 is exact
on it); onnxruntime against torch; a save / load round trip.
"""

import numpy as np
import pytest
import torch
from conftest import rollout_tol
from test_flowmap import _randomize, _scenarios, assert_onnx_reproduces

from twin_ml.models import build_model, load_trained, model_from_config, save_model

KIN = {"theta": "omega"}
EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.numeric
def test_a_positions_rate_is_its_velocity_and_the_velocitys_is_the_network():
    sys_, t, u, p, x0, stats = _scenarios("pendulum", n=3, steps=4)
    second = build_model("node", sys_, stats, members=3, seed=1, kinematics=KIN)
    plain = build_model("node", sys_, stats, members=3, seed=1)
    _randomize(second.net, scale=0.3)
    plain.net.load_state_dict(second.net.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 2, generator=g) * second.x_std + second.x_mean
    ut = torch.randn(5, 1, generator=g)
    pt = torch.tensor(p[:1], dtype=torch.float32).expand(5, -1)
    a, b = second.learned_rate(x, ut, pt), plain.learned_rate(x, ut, pt)
    assert torch.equal(a[..., 0], x[..., 1])  # d theta / dt = omega, not approximately
    torch.testing.assert_close(a[..., 1], b[..., 1], rtol=8 * EPS32, atol=0.0)
    assert not torch.allclose(b[..., 0], x[..., 1])  # the plain network does not know it


@pytest.mark.numeric
def test_with_the_network_at_zero_the_rollout_is_uniform_motion():
    sys_, t, u, p, x0, stats = _scenarios("pendulum", n=3, steps=12)
    model = build_model("node", sys_, stats, members=2, kinematics=KIN).eval()
    with torch.no_grad():
        for w, b in zip(model.net.weights, model.net.biases):
            w.zero_()
            b.zero_()
        x, _ = model(*(torch.tensor(a, dtype=torch.float32) for a in (x0, u, p, t)))
    tt = t - t[0]
    omega = np.broadcast_to(x0[:, 1:2], (3, len(t)))
    want = np.stack([x0[:, None, 0] + x0[:, None, 1] * tt, omega], -1)
    scale = np.abs(want).max()
    tol = rollout_tol(len(t), scale)
    assert np.abs(x.numpy() - want[None]).max() <= tol


@pytest.mark.numeric
def test_onnx_reproduces_a_second_order_neural_ode():
    sys_, t, u, p, x0, stats = _scenarios("pendulum", n=3, steps=12)
    model = build_model("node", sys_, stats, members=3, seed=1, kinematics=KIN).eval()
    _randomize(model.net, scale=0.1)
    assert_onnx_reproduces(model, t, u, p, x0, evals_per_step=4)


@pytest.mark.numeric
def test_save_and_load_keep_the_kinematics(tmp_path):
    sys_, t, u, p, x0, stats = _scenarios("pendulum", n=2, steps=6)
    model = build_model("node", sys_, stats, members=2, seed=2, kinematics=KIN)
    _randomize(model.net, scale=0.1)
    assert model_from_config(model.config).has_kinematics
    save_model(tmp_path, model, model.conformal_scale.numpy(), t, "config: text")
    again, meta = load_trained(tmp_path / "model")
    assert meta["config"]["kinematics"] == KIN
    args = [torch.tensor(a, dtype=torch.float32) for a in (x0, u, p, t)]
    torch.testing.assert_close(model.eval().predict(*args)["mean"], again.predict(*args)["mean"])
    plain = build_model("node", sys_, stats, members=2)
    assert "kinematics" not in plain.config  # a run without it reads as before


@pytest.mark.parametrize(
    "kind, kinematics, match",
    [
        ("node", {"theta": "speed"}, r"kinematics: unknown velocity state 'speed'.*theta"),
        ("node", {"angle": "omega"}, r"kinematics: unknown position state 'angle'"),
        ("node", {"theta": "theta"}, r"'theta' cannot be its own rate"),
        ("node", {"theta": "omega", "omega": "theta"}, r"'omega'.*is a position itself"),
        ("hybrid", KIN, r"kinematics applies to a neural ODE.*'hybrid'"),
        ("flowmap", KIN, r"kinematics applies to a neural ODE.*'flowmap'"),
    ],
)
def test_bad_kinematics_are_refused_naming_the_field(kind, kinematics, match):
    sys_, t, u, p, x0, stats = _scenarios("pendulum", n=1, steps=3)
    with pytest.raises(ValueError, match=match):
        build_model(kind, sys_, stats, members=1, kinematics=kinematics)


def test_the_setting_composes_and_builds_a_second_order_model():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from training._common import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        plain = compose(config_name="train", overrides=["experiment=pendulum_node"])
        second = compose(
            config_name="train",
            overrides=["experiment=pendulum_node", "model.net.kinematics={theta: omega}"],
        )
    assert plain.model.net.kinematics is None  # off by default
    net = OmegaConf.to_container(second.model.net, resolve=True)
    net.pop("_target_")
    sys_, t, u, p, x0, stats = _scenarios("pendulum", n=1, steps=3)
    model = build_model(system=sys_, stats=stats, **net)
    assert model.kind == "node" and model.has_kinematics and model.config["kinematics"] == KIN
