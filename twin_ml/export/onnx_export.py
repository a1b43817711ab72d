"""One ONNX file per trained ensemble: members, integrator, normalization and provenance.

Graph interface (float32; B is dynamic, T is the requested horizon, up to `max_steps` + 1)::

    x0 [B, nx]   u [B, T, nu]   p [B, np]
      ->  members [M, B, T, ny]   mean [B, T, ny]   std [B, T, ny]   (std: calibrated)

State-space kinds (node, hybrid, flowmap, flowmap_hybrid) also take the optional `x_members`
[M, B, nx] (each member's own start state, in place of x0 for all: an ensemble filter's analysis
states; default none) and give `x_end` [M, B, nx] (each member's state after the T intervals: the
filter's forecast; the Loop's final state, no node per step).

Neural ODE and hybrid models: one grid interval of the rollout (n fixed RK4 / midpoint / Euler
substeps, the same stages as torchdiffeq's, the input interpolated inside the interval exactly as
in `VectorFieldODE.forward`; the hybrid's physics right-hand side included) is exported from torch
as a graph, and becomes the body of an ONNX `Loop` whose trip count is T, read from `u`'s shape at
run time. Flow maps: the same loop, whose body is their one network evaluation per interval (plus
the flowmap_hybrid's physics step). What does not depend on the state is computed for every
interval at once before the loop (`_StepPrelude`: the first layer's input and parameter terms,
the interpolated inputs of the physics, its learned parameters), and the body gathers its
interval's: the body steps the state alone (`IntervalStep`), which at batch 1 is what a step
costs (onnxruntime's dispatch, per node). Emulators are one forward pass on their fixed grid. The
mean / calibrated std of the ensemble are graph nodes after the members.

`metadata_props` carry the manifest (JSON under the key "twin_ml.manifest", plus a few flat keys),
so onnxruntime alone can tell what the file is.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from twin_ml.contract import ModelCard
from twin_ml.models.ensemble import ACTIVATIONS
from twin_ml.models.surrogates import (
    FIXED_STEP,
    Emulator,
    FlowMap,
    LatentODE,
    Surrogate,
    VectorFieldODE,
    batched_matvec,
    fixed_steps,
)

OPSET = 17
INPUTS = ("x0", "u", "p")
OUTPUTS = ("members", "mean", "std")


class ExportError(RuntimeError):
    """The model cannot be exported, or the export failed its parity check."""


def _stage_times(solver: str, n: int) -> list[float]:
    """The interval fractions s at which `fixed_steps` evaluates its vector field (n steps of
    `solver`), each once, in the order of first use."""
    times: list[float] = []

    def f(x, s):
        if s not in times:
            times.append(s)
        return x

    fixed_steps(f, torch.zeros(()), 1.0, n, solver)
    return times


def _state_selection(model: VectorFieldODE) -> list[int] | None:
    """The state indices the outputs select, when the observation is the default one (outputs
    that share a state's name select that state); None for any other observation."""
    from twin_ml.physics.system import PhysicsSystem

    if type(model).observe is not Surrogate.observe:
        return None
    if type(model.system).observe is not PhysicsSystem.observe:
        return None
    names = [s.name for s in model.system.states]
    if not all(o.name in names for o in model.system.outputs):
        return None
    return [names.index(o.name) for o in model.system.outputs]


class IntervalStep(nn.Module):
    """One grid interval of a VectorFieldODE rollout, the state's part: (x [M,B,nx], u0 [B,nu],
    p [B,np], *terms) -> (x at the interval's end, y = h(x, u0, p) [M,B,ny] at its start).

    The network is folded for inference, the same function in fewer graph nodes: the input
    normalization goes into the first layer's weights, the output scale into the last layer's,
    and the first layer is split by input (x, u, p). Its (u, p) terms do not depend on the state:
    `_StepPrelude` computes them for every interval at once, before the loop, and the body takes
    this interval's (`terms`, named in `term_names`; `term_per_interval` tells which are indexed
    by interval). With at most two distinct stage times (a flow map: the interval's middle; Euler,
    midpoint) they are the first layer's (u, p) terms at each; with more (RK4), its terms at the
    interval's start c0 and their change over the interval cdu, and the body forms c0 + s cdu
    once per distinct stage time s (a [T, M, B, H] tensor per stage time would cost memory
    that grows with the substeps). The hybrid's physics gets its inputs at each stage time, and
    its learned parameters, from the prelude too. A neural ODE's network returns the substep's
    increment, h / n folded into its last layer (`fixed_steps(increments=True)`).

    A flow map (`FlowMap.interval_step`) evaluates the network once, at the interval's middle
    input, with the step h folded into the output scale too; its hybrid adds the physics
    right-hand side stepped by the fixed-step solver.

    Outputs that are plain state selections (the default observation) are one Gather; any other
    observation is the system's own function of (x, u0, p).
    """

    def __init__(self, model: VectorFieldODE, dt: float):
        super().__init__()
        if model.solver not in FIXED_STEP:
            raise ExportError(
                f"export integrates with a fixed-step method; the model uses {model.solver!r}. "
                f"Train with model.net.solver in {FIXED_STEP}, or export with solver='rk4'"
            )
        self.model, self.dt, self.n_sub = model, float(dt), model.substeps
        self.flow_map = isinstance(model, FlowMap)
        self.register_buffer("held", torch.as_tensor(model.zoh, dtype=torch.bool))
        self.all_held = bool(np.all(model.zoh))
        # the inputs do not change inside an interval: every stage time sees the start's
        self.constant_u = model.nu == 0 or self.all_held
        self.increments = not (self.flow_map or model.physics)
        out_scale = model.dx_std.detach()
        # a second-order neural ODE: the positions' rates are the velocities (`kinematics`),
        # x @ kin, the step folded in like the network's
        self.kinematics = model.has_kinematics
        if self.kinematics:
            out_scale = out_scale * model.free_rate
            kin = model.kin.detach() * (self.dt / self.n_sub if self.increments else 1.0)
            self.register_buffer("kin", kin)
        if self.flow_map:
            out_scale = out_scale * self.dt
        elif self.increments:
            out_scale = out_scale * (self.dt / self.n_sub)
        _fold_net(
            self,
            model.net,
            [(model.x_mean, model.x_std), (model.u_mean, model.u_std), (model.p_mean, model.p_std)],
            out_scale,
        )
        sel = _state_selection(model)
        self.selection = sel is not None
        if self.selection:
            self.register_buffer("obs_index", torch.tensor(sel, dtype=torch.long))
        times = _stage_times(model.solver, self.n_sub)
        net_times = [0.5] if self.flow_map else times
        if self.constant_u:
            net_times = [0.0]
        self.split = len(net_times) > 2  # c0 and cdu, formed in the body
        # (name, indexed by interval, batch axis in the body)
        terms: list[tuple[str, bool, int]] = []
        if model.physics:
            terms.append(("pm", False, 1))
        self.pre_names: dict[float, str] = {}
        if model.nu == 0:
            if model.n_p:  # b_0 + p @ w_p: the same for every interval
                terms.append(("pre", False, 1))
                self.pre_names[0.0] = "pre"
        elif self.split:
            terms += [("c0", True, 1), ("cdu", True, 1)]
        else:
            for i, s in enumerate(net_times):
                self.pre_names[s] = f"pre{i}"
                terms.append((f"pre{i}", True, 1))
        # the physics' inputs at its stage times (at s = 0: u0, gathered from u in the body)
        self.u_names: dict[float, str] = {}
        if model.physics and not self.constant_u:
            for s in times:
                if s != 0:
                    self.u_names[s] = f"u{len(self.u_names) + 1}"
                    terms.append((self.u_names[s], True, 0))
        self.terms = terms
        self.term_names = [name for name, _, _ in terms]
        self.term_per_interval = [per for _, per, _ in terms]

    def _net(self, x, pre):
        """The folded network at states x [M,B,nx], its first layer's other terms `pre`."""
        z = self.act(torch.matmul(x, self.w_x) + pre)
        for w, b in zip(self.hidden_w, self.hidden_b):
            z = self.act(torch.matmul(z, w) + b)
        return torch.matmul(z, self.w_last) + self.b_last

    def observe(self, x, u0, p):
        if self.selection:
            return x.index_select(2, self.obs_index)
        return self.model.observe(x.unsqueeze(2), u0.unsqueeze(1), p).squeeze(2)

    def forward(self, x, u0, p, *terms):
        m, t = self.model, dict(zip(self.term_names, terms))
        y = self.observe(x, u0, p)
        pm = t.get("pm")
        formed: dict[float, torch.Tensor] = {}

        def pre_at(s):
            if self.split:  # c0 + s cdu, once per distinct s
                if s not in formed:
                    c0, cdu = t["c0"], t["cdu"]
                    formed[s] = c0 if s == 0 else (c0 + cdu if s == 1 else c0 + cdu * s)
                return formed[s]
            name = self.pre_names.get(0.0 if self.constant_u else s)
            return self.b_0 if name is None else t[name]

        def u_at(s):
            return t[self.u_names[s]] if s in self.u_names else u0

        if self.flow_map:  # x (or the physics step) + h g(x, u_mid, p): h is in w_last, b_last
            base = x
            if m.physics:
                base = fixed_steps(
                    lambda xx, s: m.physics_system.rhs(None, xx, u_at(s), pm),
                    x,
                    self.dt,
                    self.n_sub,
                    m.solver,
                )
            return base + self._net(x, pre_at(0.5)), y

        def f(xx, s):
            dx = self._net(xx, pre_at(s))
            if self.kinematics:
                dx = dx + torch.matmul(xx, self.kin)
            if m.physics:
                dx = dx + m.physics_system.rhs(None, xx, u_at(s), pm)
            return dx

        return fixed_steps(f, x, self.dt, self.n_sub, m.solver, increments=self.increments), y


class _StepPrelude(nn.Module):
    """What `IntervalStep` needs that does not depend on the state, for every interval at once,
    before the loop: (u [B, T, nu], p [B, np]) -> the step's `terms`, in their order: the
    hybrid's physical parameters pm [M, B, np]; the network's first-layer (u, p) terms, bias
    included, [T, M, B, H] each (at each stage time, or c0 and cdu; with no inputs one [M, B, H]
    for all intervals); the physics' inputs at its stage times [T, B, nu]. The input on interval
    k at fraction s is u_k + s du_k, du_k = u_k+1 - u_k (0 for held inputs and on the last
    interval), as in `VectorFieldODE.forward`."""

    def __init__(self, step: IntervalStep):
        super().__init__()
        self.s = step
        m = step.model
        if m.physics:  # `physical_parameters` as one product: p [B, np] * factors [M, 1, np]
            with torch.no_grad():
                factors = torch.ones(m.members, m.n_p)
                factors[:, m.learn_idx] = torch.exp(m.log_factors.detach())
            self.register_buffer("factors", factors.unsqueeze(1))

    def forward(self, u, p):
        st, m = self.s, self.s.model
        out: dict[str, torch.Tensor] = {}
        if m.physics:
            out["pm"] = p * self.factors  # [M, B, np]
        cp = st.b_0 + torch.matmul(p - st.p_shift, st.w_p) if m.n_p else st.b_0  # [M, B, H]
        if m.nu == 0:
            if m.n_p:
                out["pre"] = cp
            return tuple(out[name] for name in st.term_names)
        ut = u.transpose(0, 1)  # [T, B, nu]
        du = torch.cat([ut[1:] - ut[:-1], torch.zeros_like(ut[:1])], dim=0)
        du = torch.where(st.held, torch.zeros_like(du), du)

        def u_at(s):
            return ut if (s == 0 or st.constant_u) else ut + s * du

        def first_layer(v):  # [T, B, nu] -> [T, M, B, H]
            return torch.matmul(v.unsqueeze(1), st.w_u)

        if st.split:
            out["c0"] = cp + first_layer(ut - st.u_shift)
            out["cdu"] = first_layer(du)
        else:
            for s, name in st.pre_names.items():
                out[name] = cp + first_layer(u_at(s) - st.u_shift)
        for s, name in st.u_names.items():
            out[name] = u_at(s)
        return tuple(out[name] for name in st.term_names)


def _fold_net(module: nn.Module, net, norms: list, out_scale: torch.Tensor) -> None:
    """Register on `module` the StackedMLP `net` folded for inference: its input is (x, u, p), each
    normalized as (v - mean) / std (`norms`), and its output scaled by `out_scale`. The
    normalization goes into the first layer, split by input (w_x, w_u, w_p and the bias b_0), so
    that the u and p terms can be computed apart; the state's mean is folded into b_0 (x @ w_x +
    b_0 in the loop), the inputs' and parameters' are subtracted before their product, outside
    the loop ((p - p_shift) @ w_p, (u - u_shift) @ w_u): folded, a large mean over a small std
    (a parameter held fixed in training has std 1 around its value, e.g. a Duffing stiffness of
    5.7e5) would leave b_0 and p @ w_p as two large float32 numbers that cancel, their rounding
    far above the network's output. The scale goes into the last layer (w_last, b_last); the
    layers between are `hidden_w`, `hidden_b`; `act` is the activation."""
    with torch.no_grad():
        w0, b0 = net.weights[0].detach().double(), net.biases[0].detach().double()
        folded_b0, start = b0.clone(), 0
        for name, (mean, std) in zip(("w_x", "w_u", "w_p"), norms):
            w = w0[:, start : start + len(mean)] / std.double()[None, :, None]  # [M, d, H]
            start += len(mean)
            if name == "w_x" and w.shape[1]:  # (x - mean) / std @ W = x @ w - mean @ w
                folded_b0 = folded_b0 - torch.matmul(mean.double()[None, None, :], w)
            elif name != "w_x":  # (v - mean) @ w, outside the loop
                module.register_buffer(name[2] + "_shift", mean.detach().float())
            module.register_buffer(name, w.float())
        module.register_buffer("b_0", folded_b0.float())
        module.hidden_w = nn.ParameterList(
            [nn.Parameter(w.detach().clone(), requires_grad=False) for w in net.weights[1:-1]]
        )
        module.hidden_b = nn.ParameterList(
            [nn.Parameter(b.detach().clone(), requires_grad=False) for b in net.biases[1:-1]]
        )
        module.register_buffer("w_last", (net.weights[-1].detach() * out_scale).float())
        module.register_buffer("b_last", (net.biases[-1].detach() * out_scale).float())
    module.act = ACTIVATIONS[net.activation]


class _ExactPrelude(nn.Module):
    """What an affine rom's exact rollout (`LatentODE.exact_step`) computes apart from the latent
    state, for every interval at once, before the loop: (u [B, T, nu], p [B, np]) ->
    (Phi^T [B, r, r]; forcing [T, M, B, r]: the inputs' exact contribution plus the closure's
    folded output bias; pre [T, M, B, H]: the closure's first layer on (u_k, p), bias included).
    The loop body is then the state's part alone (`_ExactStep`): a handful of nodes per interval.
    With every member's closure at zero (`prune_closures` dropped them all), there is no closure
    in the graph: (Phi^T, forcing [T, 1, B, r])."""

    def __init__(self, model: LatentODE, dt: float):
        super().__init__()
        self.model, self.dt = model, float(dt)
        self.register_buffer("held", torch.as_tensor(model.zoh, dtype=torch.bool))
        _fold_net(
            self,
            model.net,
            [(model.z_mean, model.z_std), (model.u_mean, model.u_std), (model.p_mean, model.p_std)],
            model.dz_std.detach() * self.dt,
        )
        last = (model.net.weights[-1], model.net.biases[-1])
        self.closure = bool(any(w.detach().abs().max() > 0 for w in last))

    def forward(self, u, p):
        phi, g0, g1 = self.model.discrete_operators(p, self.dt)
        phi_t = phi.transpose(1, 2)  # z @ Phi^T: a batched matmul over the scenarios
        ut = u.transpose(0, 1)  # [T, B, nu]
        du = torch.cat([ut[1:] - ut[:-1], torch.zeros_like(ut[:1])], dim=0)
        du = torch.where(self.held, torch.zeros_like(du), du)
        one = torch.ones_like(ut[..., :1])
        forcing = batched_matvec(g0, torch.cat([ut, one], -1))
        forcing = forcing + batched_matvec(g1, torch.cat([du, 0 * one], -1))
        if not self.closure:
            return phi_t, forcing.unsqueeze(1)  # [T, 1, B, r]
        forcing = forcing.unsqueeze(1) + self.b_last.unsqueeze(0)  # [T, M, B, r]
        pre = self.b_0 + torch.matmul(p - self.p_shift, self.w_p)  # [M, B, H]
        if self.model.nu:
            pre = pre + torch.matmul((ut - self.u_shift).unsqueeze(1), self.w_u)  # [T, M, B, H]
        else:
            pre = pre.unsqueeze(0).expand(ut.shape[0], -1, -1, -1)
        return phi_t, forcing, pre


class _ExactStep(nn.Module):
    """One interval of an affine rom's exact rollout, the state's part: (z [M, B, r], Phi^T,
    forcing_k [M, B, r], pre_k [M, B, H]) -> (z at the interval's end (`LatentODE.exact_step`),
    the derived outputs at its start [M, B, nd] (`LatentODE.derived`): decoded here, step by
    step, where they are small (after the loop, all steps' support cells at once are a tensor of
    T x M x B x cells that costs more to write than to compute))."""

    def __init__(self, prelude: _ExactPrelude):
        super().__init__()
        self.p = prelude

    def forward(self, z, phi_t, forcing, pre=None):
        # Phi z per scenario: [B, M, r] @ [B, r, r], a batched matmul (~2x the product-and-sum)
        z_next = torch.matmul(z.transpose(0, 1), phi_t).transpose(0, 1) + forcing
        if pre is not None:  # the closure
            h = self.p.act(torch.matmul(z, self.p.w_x) + pre)
            for w, b in zip(self.p.hidden_w, self.p.hidden_b):
                h = self.p.act(torch.baddbmm(b, h, w))
            z_next = z_next + torch.matmul(h, self.p.w_last)
        return z_next, self.p.model.derived(z)


class _Probes(nn.Module):
    """The outputs of an exact rom's latent scan z [T, M, B, r] and its derived outputs
    [T, M, B, nd]: the probes (`LatentODE.probes`), then the derived."""

    def __init__(self, model: LatentODE):
        super().__init__()
        self.model = model

    def forward(self, z, derived):
        return torch.cat([self.model.probes(z), derived], -1)


class LatentIntervalStep(nn.Module):
    """One grid interval of a LatentODE rollout: (z [M,B,r], u0, u1 [B,nu], p [B,np]) ->
    (z at the interval's end, y [M,B,ny] at its start): the model's own vector field and
    observation, unfolded (the latent state is small; the Galerkin term decodes the field)."""

    def __init__(self, model: LatentODE, dt: float):
        super().__init__()
        if model.solver not in (*FIXED_STEP, "exact"):
            raise ExportError(
                f"export integrates with a fixed-step method; the model uses {model.solver!r}. "
                f"Train with model.net.solver in {FIXED_STEP}"
            )
        self.model, self.dt = model, float(dt)
        self.register_buffer("held", torch.as_tensor(model.zoh, dtype=torch.bool))

    def forward(self, z, u0, u1, p, *ops):
        """`ops`: an affine rom's Galerkin operators (A, B, c), computed once before the loop."""
        m = self.model
        y = m.observe(z, u0, p)
        if m.solver == "exact":
            return m.exact_step(z, u0, u1, p, ops, self.dt), y
        du = torch.where(self.held, torch.zeros_like(u0), u1 - u0)
        ctx = tuple(ops) if ops else None
        return (
            fixed_steps(
                lambda zz, s: m.vector_field(zz, u0 + s * du, p, ctx),
                z,
                self.dt,
                m.substeps,
                m.solver,
            ),
            y,
        )


class _Operators(nn.Module):
    """An affine rom's operators of each scenario: the Galerkin (A, B, c), or with the exact
    solver its step operators over dt (Phi, G0, G1)."""

    def __init__(self, model: LatentODE, dt: float):
        super().__init__()
        self.model, self.dt = model, float(dt)

    def forward(self, p):
        if self.model.solver == "exact":
            return self.model.discrete_operators(p, self.dt)
        return self.model.galerkin_operators(p)


class _Encoder(nn.Module):
    def __init__(self, model: LatentODE):
        super().__init__()
        self.model = model

    def forward(self, x0):
        return self.model.encode(x0)


class _EmulatorMembers(nn.Module):
    def __init__(self, model: Emulator):
        super().__init__()
        self.model = model

    def forward(self, x0, u, p):
        return self.model(x0, u, p, torch.zeros(self.model.n_times))[1]


def _torch_to_onnx(
    module: nn.Module,
    args: tuple,
    names_in: list[str],
    names_out: list[str],
    dynamic: dict[str, dict[int, str]],
) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _prefixed(graph: onnx.GraphProto, prefix: str, keep: set[str]) -> None:
    """Rename every value of `graph` (except `keep`) with `prefix`, in place."""

    def ren(name: str) -> str:
        return name if (not name or name in keep) else prefix + name

    for node in graph.node:
        node.input[:] = [ren(n) for n in node.input]
        node.output[:] = [ren(n) for n in node.output]
        node.name = ren(node.name) if node.name else ""
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            v.name = ren(v.name)
    for init in graph.initializer:
        init.name = ren(init.name)


def _live(nodes: list, outputs: list[str]) -> list:
    """`nodes` (in order) less those whose outputs nothing in `outputs` depends on."""
    need, keep = set(outputs), []
    for node in reversed(nodes):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(i for i in node.input if i)
    return keep[::-1]


def _hoist(nodes: list, per_iteration: set[str], outputs: list) -> tuple[list, list]:
    """`nodes` of a loop body (in order) split into those that read nothing the iteration
    changes (`per_iteration`: the body's inputs, and what is computed from them), which can run
    once before the loop, and the rest; a body output stays in the body."""
    changing, out_names = set(per_iteration), {v.name for v in outputs}
    before, inside = [], []
    for node in nodes:
        if out_names.intersection(node.output) or changing.intersection(node.input):
            inside.append(node)
            changing.update(node.output)
        else:
            before.append(node)
    return before, inside


def _vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _ensemble_nodes(model: Surrogate, members: str) -> tuple[list, list]:
    """mean / calibrated std of `members` [M, B, T, ny]: nodes and their constants."""
    ale = (torch.exp(model.logvar.detach()) * model.y_std**2).mean(dim=0).numpy().astype(np.float32)
    scale = model.conformal_scale.detach().numpy().astype(np.float32)
    inits = [_const("ens/aleatoric_var", ale), _const("ens/conformal_scale", scale)]
    nodes = [
        helper.make_node("ReduceMean", [members], ["mean"], axes=[0], keepdims=0),
        helper.make_node("Sub", [members, "mean"], ["ens/dev"]),
        helper.make_node("Mul", ["ens/dev", "ens/dev"], ["ens/dev2"]),
        helper.make_node("ReduceMean", ["ens/dev2"], ["ens/epistemic_var"], axes=[0], keepdims=0),
        helper.make_node("Add", ["ens/epistemic_var", "ens/aleatoric_var"], ["ens/var"]),
        helper.make_node("Sqrt", ["ens/var"], ["ens/sd"]),
        helper.make_node("Mul", ["ens/sd", "ens/conformal_scale"], ["std"]),
    ]
    return nodes, inits


def build_onnx(model: Surrogate, dt: float) -> onnx.ModelProto:
    """The rollout graph of `model` (eval mode, float32) on a grid of step `dt`; any horizon (the
    declared maximum lives in the manifest and is enforced by the server)."""
    model = model.float().eval()
    nx, nu, n_p, ny, m = model.nx, model.nu, model.n_p, model.ny, model.members
    ins = [_vi("x0", ["batch", nx]), _vi("u", ["batch", "time", nu]), _vi("p", ["batch", n_p])]
    outs = [
        _vi("members", [m, "batch", "time", ny]),
        _vi("mean", ["batch", "time", ny]),
        _vi("std", ["batch", "time", ny]),
    ]
    if isinstance(model, Emulator):
        b = 2
        g = _torch_to_onnx(
            _EmulatorMembers(model),
            (torch.zeros(b, nx), torch.zeros(b, model.n_times, nu), torch.ones(b, n_p)),
            ["x0", "u", "p"],
            ["members"],
            {"x0": {0: "batch"}, "u": {0: "batch"}, "p": {0: "batch"}, "members": {1: "batch"}},
        ).graph
        nodes, inits = _ensemble_nodes(model, "members")
        graph = helper.make_graph(
            list(g.node) + nodes,
            "twin_ml_emulator",
            ins,
            outs,
            initializer=list(g.initializer) + inits,
        )
        return _model(graph)
    if not isinstance(model, VectorFieldODE):
        raise ExportError(f"cannot export a model of kind {model.kind!r}")
    latent = isinstance(model, LatentODE)
    nz = model.rank if latent else nx

    # the interval step, from torch
    b = 2
    x0_ex = model.z_mean.detach().expand(m, b, -1).clone() if latent else torch.zeros(m, b, nx)
    p_ex = (
        torch.tensor(model.system.nominal_parameters, dtype=torch.float32).expand(b, -1).clone()
        if latent
        else torch.ones(b, n_p)
    )
    affine = latent and model.affine
    # an affine rom's exact rollout: all but the state's part before the loop (`_ExactPrelude`),
    # the outputs after it, from the latent scan; the body is the state's few nodes (`_ExactStep`)
    exact = affine and model.solver == "exact"
    pre: list[onnx.GraphProto] = []  # graphs computed once, before the loop
    ops_names = ["ops/A", "ops/B", "ops/c"] if affine and not exact else []
    if exact:
        prelude = _ExactPrelude(model, dt).eval()
        with torch.no_grad():
            pre_ex = prelude(torch.zeros(b, 3, nu), p_ex)
        pre_names = ["phi", "forcing", "pre"][: len(pre_ex)]
        step_in = ["x", "pre/phi", "f", "hk"][: 1 + len(pre_ex)]
        sg = _torch_to_onnx(
            _ExactStep(prelude).eval(),
            (x0_ex, pre_ex[0], *(a[0] for a in pre_ex[1:])),
            step_in,
            ["x_next", "y"],
            {
                "x": {1: "batch"},
                "pre/phi": {0: "batch"},
                "f": {1: "batch"},
                "hk": {1: "batch"},
                "x_next": {1: "batch"},
                "y": {1: "batch"},
            },
        ).graph
        _prefixed(sg, "step/", keep={"pre/phi"})  # Phi: the outer graph's, visible in the body
        body_nodes = [
            helper.make_node("Gather", [f"pre/{name}", "iter"], [f"step/{k}"], axis=0)
            for name, k in zip(pre_names[1:], ("f", "hk"))
        ]
        body_outs = [_vi("step/y", [m, "batch", len(model.system.derived)])]
    elif not latent:
        # the (u, p) terms of every interval before the loop (`_StepPrelude`); the body gathers
        # its interval's and steps the state (`IntervalStep`)
        step = IntervalStep(model, dt).eval()
        prelude = _StepPrelude(step).eval()
        with torch.no_grad():
            terms_ex = prelude(torch.zeros(b, 3, nu), p_ex)
        # a term that is the same for every interval: the outer graph's, used in the body as is
        term_in = [
            name if per else f"pre/{name}"
            for name, per in zip(step.term_names, step.term_per_interval)
        ]
        sg = _torch_to_onnx(
            step,
            (
                x0_ex,
                torch.zeros(b, nu),
                p_ex,
                *(a[0] if per else a for a, per in zip(terms_ex, step.term_per_interval)),
            ),
            ["x", "u0", "p", *term_in],
            ["x_next", "y"],
            {
                "x": {1: "batch"},
                "u0": {0: "batch"},
                "p": {0: "batch"},
                "x_next": {1: "batch"},
                "y": {1: "batch"},
                **{name: {axis: "batch"} for name, (_, _, axis) in zip(term_in, step.terms)},
            },
        ).graph
        _prefixed(sg, "step/", keep={"p", *(n for n in term_in if n.startswith("pre/"))})
        if step.terms:
            pre.append(
                _torch_to_onnx(
                    prelude,
                    (torch.zeros(b, 3, nu), p_ex),
                    ["u", "p"],
                    step.term_names,
                    {
                        "u": {0: "batch", 1: "time"},
                        "p": {0: "batch"},
                        **{
                            name: {0: "time", axis + 1: "batch"} if per else {axis: "batch"}
                            for name, per, axis in step.terms
                        },
                    },
                ).graph
            )
            _prefixed(pre[-1], "pre/", keep={"u", "p"})
        body_nodes = [
            helper.make_node("Gather", [f"pre/{name}", "iter"], [f"step/{name}"], axis=0)
            for name, per in zip(step.term_names, step.term_per_interval)
            if per
        ]
        body_nodes.append(helper.make_node("Gather", ["u", "iter"], ["step/u0"], axis=1))
        body_outs = [_vi("step/y", [m, "batch", ny])]
    else:
        step = LatentIntervalStep(model, dt).eval()
        ops_ex = tuple(t.detach() for t in _Operators(model, dt)(p_ex)) if ops_names else ()
        sg = _torch_to_onnx(
            step,
            (x0_ex, torch.zeros(b, nu), torch.zeros(b, nu), p_ex, *ops_ex),
            ["x", "u0", "u1", "p", *ops_names],
            ["x_next", "y"],
            {
                "x": {1: "batch"},
                "u0": {0: "batch"},
                "u1": {0: "batch"},
                "p": {0: "batch"},
                "x_next": {1: "batch"},
                "y": {1: "batch"},
                **{name: {0: "batch"} for name in ops_names},
            },
        ).graph
        # p and the operators: the outer graph's values, visible inside the loop body
        _prefixed(sg, "step/", keep={"p", *ops_names})
        body_nodes = [
            helper.make_node("Add", ["iter", "one_i64"], ["body/next"]),
            helper.make_node("Min", ["body/next", "last_index"], ["body/next_c"]),
            helper.make_node("Gather", ["u", "iter"], ["step/u0"], axis=1),
            helper.make_node("Gather", ["u", "body/next_c"], ["step/u1"], axis=1),
        ]
        body_outs = [_vi("step/y", [m, "batch", ny])]
    # the state and the outputs leave the body as the step's own values, no copies
    body_nodes += [*sg.node, helper.make_node("Identity", ["cond_in"], ["cond_out"])]
    body_outs = [
        helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
        _vi("step/x_next", [m, "batch", nz]),
        *body_outs,
    ]
    if latent:  # the latent state at each interval's start: the fields are decoded from it
        body_nodes.append(helper.make_node("Identity", ["step/x"], ["body/z_out"]))
        body_outs.append(_vi("body/z_out", [m, "batch", nz]))
    body_nodes = _live(body_nodes, [v.name for v in body_outs])
    hoisted = []  # what the step computes from the parameters alone: once, before the loop
    if not latent:
        hoisted, body_nodes = _hoist(body_nodes, {"iter", "cond_in", "step/x"}, body_outs)
    body = helper.make_graph(
        body_nodes,
        "interval",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _vi("step/x", [m, "batch", nz]),
        ],
        body_outs,
    )
    inits = [
        _const("one_i64", np.array(1, dtype=np.int64)),
        _const("zero_axis", np.array([0], dtype=np.int64)),
        _const("member_shape", np.array([m, 1, 1], dtype=np.int64)),
    ]
    nodes = [
        helper.make_node("Shape", ["u"], ["shape_u"]),
        helper.make_node(
            "Gather", ["shape_u", "one_i64"], ["n_times"], axis=0
        ),  # scalar: the trip count
    ]
    if latent and not exact:  # the body's index of the interval's end
        nodes.append(helper.make_node("Sub", ["n_times", "one_i64"], ["last_index"]))
    start = "x0"
    if latent:  # the encoder: the system's lift of the initial conditions, then the projection
        eg = _torch_to_onnx(
            _Encoder(model).eval(),
            (torch.zeros(b, nx),),
            ["x0"],
            ["z0"],
            {"x0": {0: "batch"}, "z0": {0: "batch"}},
        ).graph
        _prefixed(eg, "enc/", keep={"x0"})
        nodes += list(eg.node)
        inits += list(eg.initializer)
        start = "enc/z0"
    if exact:  # Phi, the forcing and the closure's input terms of every interval
        pre.append(
            _torch_to_onnx(
                prelude,
                (torch.zeros(b, 3, nu), p_ex),
                ["u", "p"],
                pre_names,
                {
                    "u": {0: "batch", 1: "time"},
                    "p": {0: "batch"},
                    "phi": {0: "batch"},
                    **{name: {0: "time", 2: "batch"} for name in pre_names[1:]},
                },
            ).graph
        )
        _prefixed(pre[-1], "pre/", keep={"u", "p"})
    elif affine:  # the Galerkin operators of each scenario, once per rollout
        pre.append(
            _torch_to_onnx(
                _Operators(model, dt).eval(),
                (p_ex,),
                ["p"],
                ["A", "B", "c"],
                {"p": {0: "batch"}, "A": {0: "batch"}, "B": {0: "batch"}, "c": {0: "batch"}},
            ).graph
        )
        _prefixed(pre[-1], "ops/", keep={"p"})
    for g in pre:
        nodes += list(g.node)
        inits += list(g.initializer)
    nodes += hoisted
    nodes += [
        helper.make_node("Unsqueeze", [start, "zero_axis"], ["x0_1"]),
        helper.make_node(
            "Expand", ["x0_1", "member_shape"], ["x_expanded" if not latent else "x_init"]
        ),
    ]
    if not latent:  # the members' own start states, when given (filtering: `x_members`)
        nodes += _member_states(inits, ins, outs, m, nz)
    nodes += [
        helper.make_node(
            "Loop",
            ["n_times", "", "x_init"],
            ["x_end", "d_scan" if exact else "y_scan"] + (["z_scan"] if latent else []),
            body=body,
        ),
    ]
    if exact:  # the probes of every step at once, from the latent scan [T, M, B, r]
        nd = len(model.system.derived)
        og = _torch_to_onnx(
            _Probes(model).eval(),
            (x0_ex.unsqueeze(0).expand(3, -1, -1, -1).clone(), torch.zeros(3, m, b, nd)),
            ["z_scan", "d_scan"],
            ["y_scan"],
            {name: {0: "time", 2: "batch"} for name in ("z_scan", "d_scan", "y_scan")},
        ).graph
        _prefixed(og, "obs/", keep={"z_scan", "d_scan", "y_scan"})
        nodes += list(og.node)
        inits += list(og.initializer)
    nodes.append(helper.make_node("Transpose", ["y_scan"], ["members"], perm=[1, 2, 0, 3]))
    ens_nodes, ens_inits = _ensemble_nodes(model, "members")
    inits += [*sg.initializer, *ens_inits]
    if latent:
        f_nodes, f_inits = _field_nodes(model)
        nodes += f_nodes
        inits += f_inits
        ins.append(helper.make_tensor_value_info("field_steps", TensorProto.INT64, ["fields"]))
        inits.append(_const("field_steps", np.zeros(0, dtype=np.int64)))  # default: none
        n = model.system.state_size
        outs += [
            _vi("field_mean", ["batch", "fields", n]),
            _vi("field_std", ["batch", "fields", n]),
        ]
    graph = helper.make_graph(
        nodes + ens_nodes, f"twin_ml_{model.kind}", ins, outs, initializer=inits
    )
    return _model(graph)


def _member_states(inits: list, ins: list, outs: list, m: int, nz: int) -> list:
    """The optional input `x_members` [M, B, nx] (every member's own start state; default: none,
    shape [M, 0, nx], and the rollout starts every member at x0) and the output `x_end`
    [M, B, nx] (each member's state after the T intervals): what an ensemble filter's forecast
    needs (twin_ml.assimilate: a member's analysis state in, its forecast state out). x_end is the
    Loop's final state: no node per step."""
    inits.append(_const("x_members", np.zeros((m, 0, nz), dtype=np.float32)))
    inits.append(_const("zero_i64", np.array(0, dtype=np.int64)))
    ins.append(_vi("x_members", [m, "batch", nz]))
    outs.append(_vi("x_end", [m, "batch", nz]))
    branch = {
        name: helper.make_graph(
            [helper.make_node("Identity", [src], [f"x_init/{name}"])],
            f"x_init_{name}",
            [],
            [_vi(f"x_init/{name}", [m, "batch", nz])],
        )
        for name, src in (("given", "x_members"), ("expanded", "x_expanded"))
    }
    return [
        helper.make_node("Size", ["x_members"], ["x_members/size"]),
        helper.make_node("Greater", ["x_members/size", "zero_i64"], ["x_members/given"]),
        helper.make_node(
            "If",
            ["x_members/given"],
            ["x_init"],
            then_branch=branch["given"],
            else_branch=branch["expanded"],
        ),
    ]


def _field_nodes(model: LatentODE) -> tuple[list, list]:
    """The fields at the requested steps `field_steps` [K] from the latent scan [T, M, B, r]:
    each member's decoded field, then the members' mean and spread, [B, K, n] each."""
    basis_t = model.basis.detach().T.numpy().astype(np.float32)  # [r, n]
    inits = [
        _const("field/basis_t", basis_t),
        _const("field/scale", model.field_scale.detach().numpy().astype(np.float32)),
        _const("field/mean0", model.field_mean.detach().numpy().astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Gather", ["z_scan", "field_steps"], ["field/zk"], axis=0),  # [K,M,B,r]
        helper.make_node("MatMul", ["field/zk", "field/basis_t"], ["field/dev"]),
        helper.make_node("Mul", ["field/dev", "field/scale"], ["field/scaled"]),
        helper.make_node("Add", ["field/scaled", "field/mean0"], ["field/members"]),  # [K,M,B,n]
        helper.make_node("ReduceMean", ["field/members"], ["field/m"], axes=[1], keepdims=0),
        helper.make_node("Sub", ["field/members", "field/m_1"], ["field/d"]),
        helper.make_node("Mul", ["field/d", "field/d"], ["field/d2"]),
        helper.make_node("ReduceMean", ["field/d2"], ["field/v"], axes=[1], keepdims=0),
        helper.make_node("Sqrt", ["field/v"], ["field/s"]),
        helper.make_node("Transpose", ["field/m"], ["field_mean"], perm=[1, 0, 2]),
        helper.make_node("Transpose", ["field/s"], ["field_std"], perm=[1, 0, 2]),
    ]
    nodes.insert(5, helper.make_node("Unsqueeze", ["field/m", "one_axis"], ["field/m_1"]))
    inits.append(_const("one_axis", np.array([1], dtype=np.int64)))
    return nodes, inits


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    mp = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="twin-ml"
    )
    mp.ir_version = 8  # onnxruntime reads IR 8 with opset 17 everywhere
    onnx.checker.check_model(mp, full_check=True)
    return mp


def set_metadata(mp: onnx.ModelProto, card: ModelCard) -> None:
    """The model card as JSON under "twin_ml.manifest", and a few flat keys for quick reading."""
    del mp.metadata_props[:]
    flat = {
        "twin_ml.manifest": card.dumps(),
        "twin_ml.format": card.format,
        "twin_ml.name": card.name,
        "twin_ml.version": card.version,
        "twin_ml.kind": card.kind,
        "twin_ml.members": str(card.members),
        "twin_ml.system": card.system.name,
        "twin_ml.code_version": str(card.provenance.code_version),
        "twin_ml.dataset_sha256": str(card.provenance.dataset_sha256),
        "twin_ml.created_at": str(card.provenance.created_at),
    }
    onnx.helper.set_model_props(mp, flat)
    mp.doc_string = f"twin-ml {card.kind} ensemble of {card.system.name}"


def read_metadata(path_or_session) -> ModelCard:
    """The model card of an exported file, read with onnxruntime alone (no twin-ml model code;
    the JSON under "twin_ml.manifest" is plain, see twin_ml/contract/card.py for its layout)."""
    import onnxruntime as ort

    sess = path_or_session
    if not isinstance(sess, ort.InferenceSession):
        from twin_ml._ort import session

        sess = session(path_or_session)
    meta = sess.get_modelmeta().custom_metadata_map
    if "twin_ml.manifest" not in meta:
        raise ExportError("not a twin-ml model: no 'twin_ml.manifest' in its metadata")
    return ModelCard.from_json(meta["twin_ml.manifest"])
