"""Surrogate models: neural ODE, hybrid (physics + learned residual), discrete-time flow maps
(one network evaluation per grid interval), one-shot emulator, reduced-order models.

Every model is a deep ensemble of M members (`StackedMLP`) and carries what it needs to be used
alone: normalization statistics, the system's declaration, a homoscedastic log-variance per
member and output (the aleatoric part), and the conformal scale of its intervals. Shapes::

    x0 [B, nx]   u [B, T, nu]   p [B, np]   t [T]   ->   x [M, B, T, nx],  y [M, B, T, ny]

`predict` combines the members: mean, and std = conformal_scale * sqrt(epistemic + aleatoric).
A model rebuilds from `model.config` (plain JSON) plus its state_dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twin_ml._io import sha256_file
from twin_ml.models.ensemble import StackedMLP, StackedTCN
from twin_ml.physics import system_from_description
from twin_ml.physics.system import PhysicsSystem

FIXED_STEP = ("rk4", "euler", "midpoint")
ODE_SOLVERS = (*FIXED_STEP, "dopri5", "bosh3")
MODE_FLOOR = 1e-4  # a kept POD mode's singular value, at least this fraction of the leading one's
STAT_KEYS = ("x_mean", "x_std", "u_mean", "u_std", "p_mean", "p_std", "y_mean", "y_std", "dx_std")


def compute_stats(
    x: np.ndarray, u: np.ndarray, p: np.ndarray, y: np.ndarray, t: np.ndarray
) -> dict[str, list]:
    """Normalization statistics from training arrays x [N,T,nx], u [N,T,nu], p [N,np], y [N,T,ny].

    Robust: center = median, scale = IQR / 1.349 (the std of a normal), falling back to the std
    where the IQR is 0 (a signal that is mostly constant), and to 1 for a constant column (a
    parameter fixed by the design), which must not blow up float32 round-off. A few extreme
    trajectories (a pendulum that goes over the top and winds up 100 rad) must not set the scale
    of the typical ones.
    """

    def ms(a, axes):
        a = (
            np.moveaxis(a, axes, tuple(range(len(axes))))
            .reshape(-1, a.shape[-1])
            .astype(np.float64)
        )
        q25, m, q75 = np.percentile(a, [25, 50, 75], axis=0)
        s = (q75 - q25) / 1.349
        s = np.where(s > 0, s, a.std(axis=0))
        s = np.where(
            s > 1e-12 * np.maximum(np.abs(m), 1.0), s, 1.0
        )  # a constant column: leave it unscaled
        return m.tolist(), s.tolist()

    dx = np.diff(x, axis=1) / np.diff(t)[None, :, None]
    st = {}
    st["x_mean"], st["x_std"] = ms(x, (0, 1))
    st["u_mean"], st["u_std"] = ms(u, (0, 1)) if u.shape[-1] else ([], [])
    st["p_mean"], st["p_std"] = ms(p, (0,))
    st["y_mean"], st["y_std"] = ms(y, (0, 1))
    st["dx_std"] = ms(dx, (0, 1))[1]
    return st


class Surrogate(nn.Module):
    """Shared parts: statistics as buffers, aleatoric log-variance, conformal scale, predict()."""

    kind = ""

    def __init__(self, system: dict[str, Any], stats: dict[str, list], members: int, seed: int):
        super().__init__()
        self.system = system_from_description(system)
        self.members, self.seed = members, seed
        self.nx, self.nu = len(self.system.states), len(self.system.inputs)
        self.n_p, self.ny = len(self.system.parameters), len(self.system.outputs)
        missing = [k for k in STAT_KEYS if k not in stats]
        if missing:
            raise ValueError(f"stats: missing {missing}")
        for k in STAT_KEYS:
            self.register_buffer(k, torch.tensor(stats[k], dtype=torch.float32))
        self.logvar = nn.Parameter(
            torch.full((members, self.ny), -4.0)
        )  # per member and output, normalized y
        self.register_buffer("conformal_scale", torch.ones(self.ny))
        self._config: dict[str, Any] = {
            "system": self.system.reference(),
            "stats": {k: list(stats[k]) for k in STAT_KEYS},
            "members": members,
            "seed": seed,
        }

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, **self._config}

    def forward(self, x0, u, p, t) -> tuple[torch.Tensor | None, torch.Tensor]:
        raise NotImplementedError

    def observe(self, x: torch.Tensor, u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """y [M, B, T, ny] from states x [M, B, T, nx] (the system's observation function)."""
        return self.system.observe(x, u, p[:, None, :])

    @torch.no_grad()
    def predict(self, x0, u, p, t) -> dict[str, torch.Tensor]:
        """Ensemble mean and calibrated std of the outputs, [B, T, ny] each, plus the members'
        outputs and (ODE models) their states [M, B, T, nx]."""
        x, y = self(x0, u, p, t)
        mean = y.mean(dim=0)
        epi = y.var(dim=0, unbiased=False) if self.members > 1 else torch.zeros_like(mean)
        ale = (torch.exp(self.logvar) * self.y_std**2).mean(dim=0)  # [ny], physical units
        std = self.conformal_scale * torch.sqrt(epi + ale)
        out = {"mean": mean, "std": std, "members": y}
        if x is not None:
            out["states"] = x
        return out


class VectorFieldODE(Surrogate):
    """dx/dt = f_phys(x, u, p) + g_theta(x, u, p) (hybrid) or g_theta alone (neural ODE).

    g_theta sees normalized states, inputs (interpolated inside the vector field, per trajectory)
    and parameters; its output is scaled by the data's typical rate of change. In the hybrid,
    g_theta starts at zero, and `learn_parameters` names physical parameters that get a learnable
    per-member factor exp(theta) (starting at 1).

    `kinematics` (neural ODE only) maps a state to the state that is its rate, {position:
    velocity}: that state's rate is the velocity itself, exactly, and the network learns the
    others only (a second-order neural ODE: a mechanical system's positions integrate its
    velocities, which the data's system card says and a black box would have to learn).
    """

    def __init__(
        self,
        system: dict[str, Any],
        stats: dict[str, list],
        *,
        members: int = 5,
        seed: int = 0,
        hidden: int = 64,
        depth: int = 2,
        activation: str = "tanh",
        solver: str = "rk4",
        step_fraction: float = 1.0,
        rtol: float = 1e-4,
        atol: float = 1e-6,
        physics: bool = False,
        physics_options: dict[str, Any] | None = None,
        learn_parameters: list[str] | tuple[str, ...] = (),
        kinematics: dict[str, str] | None = None,
    ):
        super().__init__(system, stats, members, seed)
        # the physics term may be a deliberately incomplete variant of the data's system
        # (e.g. the pendulum without damping): the residual learns what it lacks
        self.physics_system = type(self.system)(
            **{**self.system.options, **(physics_options or {})}
        )
        if solver not in ODE_SOLVERS:
            raise ValueError(f"model.solver must be one of {ODE_SOLVERS}, got {solver!r}")
        if (
            not 0 < step_fraction <= 1
            or abs(1.0 / step_fraction - round(1.0 / step_fraction)) > 1e-9
        ):
            raise ValueError(
                f"model.step_fraction must be 1/n for an integer n >= 1 (1, 0.5, 0.25, ...), "
                f"got {step_fraction}"
            )
        unknown = set(learn_parameters) - set(self.system.parameter_names)
        if unknown:
            raise ValueError(
                f"model.learn_parameters: unknown {sorted(unknown)}; "
                f"parameters: {self.system.parameter_names}"
            )
        if learn_parameters and not physics:
            raise ValueError("model.learn_parameters needs the physics term (a hybrid model)")
        self.solver, self.step_fraction, self.rtol, self.atol = solver, step_fraction, rtol, atol
        self.physics = physics
        kinematics = dict(kinematics or {})
        if kinematics and self.kind != "node":
            raise ValueError(
                f"model.net.kinematics applies to a neural ODE (kind node), not {self.kind!r}: a "
                "hybrid's physics gives the kinematics already, and a flow map has no rate to set"
            )
        self.has_kinematics = bool(kinematics)
        free, kin = _kinematics(self.system, kinematics)
        # from the config, not the weights (a model saved before kinematics existed loads)
        self.register_buffer("free_rate", free, persistent=False)  # [nx]: 0 for a position
        self.register_buffer("kin", kin, persistent=False)  # [nx, nx]: kin[v, x] = 1: dx/dt = v
        self.net = StackedMLP(
            members,
            self.nx + self.nu + self.n_p,
            self.nx,
            hidden=hidden,
            depth=depth,
            activation=activation,
            seed=seed,
            zero_last=physics,
        )
        idx = [self.system.parameter_names.index(n) for n in learn_parameters]
        self.register_buffer("learn_idx", torch.tensor(idx, dtype=torch.long))
        self.log_factors = nn.Parameter(torch.zeros(members, len(idx)))
        self.zoh = np.array([i.interpolation == "zoh" for i in self.system.inputs], dtype=bool)
        self._config.update(
            hidden=hidden,
            depth=depth,
            activation=activation,
            solver=solver,
            step_fraction=step_fraction,
            rtol=rtol,
            atol=atol,
            physics=physics,
            physics_options=dict(physics_options or {}),
            learn_parameters=list(learn_parameters),
        )
        if kinematics:  # absent from the config otherwise: a run without it reads as before
            self._config["kinematics"] = kinematics

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "hybrid" if self.physics else "node"

    def physical_parameters(self, p: torch.Tensor) -> torch.Tensor:
        """p [B, np] -> [M, B, np] with the learned factors applied."""
        pm = p.unsqueeze(0).expand(self.members, -1, -1)
        if self.learn_idx.numel():
            pm = pm.clone()
            pm[..., self.learn_idx] = (
                pm[..., self.learn_idx] * torch.exp(self.log_factors)[:, None, :]
            )
        return pm

    def step_context(self, p: torch.Tensor):
        """What every evaluation of the vector field along one rollout shares, computed once per
        rollout (the hybrid: its physical parameters); passed to `vector_field` as `pm`."""
        return self.physical_parameters(p) if self.physics else None

    def vector_field(
        self, x: torch.Tensor, u_t: torch.Tensor, p: torch.Tensor, pm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """dx/dt for x [M, B, nx], u_t [B, nu], p [B, np] (pm: `physical_parameters(p)`, when the
        caller has it already)."""
        dx = self.learned_rate(x, u_t, p)
        if self.physics:
            dx = dx + self.physics_system.rhs(
                None, x, u_t, self.physical_parameters(p) if pm is None else pm
            )
        return dx

    def learned_rate(self, x: torch.Tensor, u_t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """g_theta(x, u_t, p) [M, B, nx], a rate: the network on normalized (x [M, B, nx],
        u_t [B, nu], p [B, np]), its output scaled by the data's typical rate of change (with
        `kinematics`, a position's rate is its velocity instead)."""
        m, b = x.shape[0], x.shape[1]
        z = torch.cat(
            [
                (x - self.x_mean) / self.x_std,
                ((u_t - self.u_mean) / self.u_std).expand(m, b, -1),
                ((p - self.p_mean) / self.p_std).expand(m, b, -1),
            ],
            dim=-1,
        )
        if self.has_kinematics:
            return self.net(z) * (self.dx_std * self.free_rate) + torch.matmul(x, self.kin)
        return self.net(z) * self.dx_std

    @property
    def substeps(self) -> int:
        """Fixed-step solvers: integration steps per grid interval (1 / step_fraction)."""
        return int(round(1.0 / self.step_fraction))

    def interval_step(self, x, u0, du, p, pm, h: float) -> torch.Tensor:
        """x [M, B, nx] at a grid interval's end from x at its start, with a fixed-step solver:
        the input at the interval's fraction s is u0 + s du [B, nu] (du = 0 for held inputs),
        pm is `step_context(p)`, h the interval's length. `forward` calls it for every interval;
        the ONNX export's loop body computes the same."""
        return fixed_steps(
            lambda xx, s: self.vector_field(xx, u0 + s * du, p, pm),
            x,
            h,
            self.substeps,
            self.solver,
        )

    def forward(self, x0, u, p, t):
        """Integrate grid interval by grid interval.

        On [t_k, t_k+1] the input is u_k + s (u_k+1 - u_k), s in [0, 1] (linear inputs), or u_k
        (held inputs, up to and including the interval's end): the same semantics as the reference
        solver, which restarts at every jump of a held input, and as the exported ONNX graph.
        Fixed-step solvers take one `interval_step` per interval (its n = 1 / step_fraction
        steps by `fixed_steps`: torchdiffeq's formulas, without its per-call overhead, which
        dominates on long records; a flow map: its one map evaluation); adaptive ones call
        torchdiffeq's odeint per interval. x0 [B, nx] starts every member at the same state;
        x0 [M, B, nx] gives each member its own.
        """
        from torchdiffeq import odeint

        t_np = t.detach().cpu().double().numpy()
        zoh = torch.as_tensor(self.zoh, device=u.device)
        fixed = self.solver in FIXED_STEP
        x = x0 if x0.dim() == 3 else x0.unsqueeze(0).expand(self.members, -1, -1)
        pm = self.step_context(p)
        xs = [x]
        for k in range(len(t_np) - 1):
            u0 = u[:, k]
            du = torch.where(zoh, torch.zeros_like(u0), u[:, k + 1] - u0)
            t0, h = float(t_np[k]), float(t_np[k + 1] - t_np[k])
            if fixed:
                x = self.interval_step(x, u0, du, p, pm, h)
            else:

                def f(tt, xx, u0=u0, du=du, t0=t0, h=h):
                    s = min(max((float(tt.detach()) - t0) / h, 0.0), 1.0)
                    return self.vector_field(xx, u0 + s * du, p, pm)

                x = odeint(f, x, t[k : k + 2], method=self.solver, rtol=self.rtol, atol=self.atol)[
                    -1
                ]
            xs.append(x)
        x = torch.stack(xs, dim=2)  # [M, B, T, nx]
        return x, self.observe(x, u, p)


def _kinematics(system, kinematics: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.net.kinematics` checked against the system's states: the rate mask [nx] (0 for a
    position) and the matrix [nx, nx] that maps the states to the positions' rates."""
    names = [s.name for s in system.states]
    nx = len(names)
    free, kin = torch.ones(nx), torch.zeros(nx, nx)
    for pos, vel in kinematics.items():
        for role, name in (("position", pos), ("velocity", vel)):
            if name not in names:
                raise ValueError(
                    f"model.net.kinematics: unknown {role} state {name!r}; states: {names}"
                )
        if pos == vel:
            raise ValueError(f"model.net.kinematics: state {pos!r} cannot be its own rate")
        if vel in kinematics:
            raise ValueError(
                f"model.net.kinematics: {vel!r}, the rate of {pos!r}, is a position itself; "
                "its own rate must be learned"
            )
        free[names.index(pos)] = 0.0
        kin[names.index(vel), names.index(pos)] = 1.0
    return free, kin


def fixed_steps(f, x, h: float, n: int, solver: str, *, increments: bool = False):
    """One grid interval of length h in n equal steps of a fixed-step solver; f(x, s) is the vector
    field at the interval's fraction s. The formulas are torchdiffeq's ("rk4" is its 3/8 rule); the
    ONNX export builds its loop body from this function too. `increments`: f returns the step's
    increment h / n * dx/dt instead (the export folds h / n into the network's last layer): the
    same formulas, without their multiplications by h."""
    if solver not in FIXED_STEP:
        raise ValueError(f"fixed_steps: solver must be one of {FIXED_STEP}, got {solver!r}")
    h = h / n
    for j in range(n):
        s0 = j / n
        k1 = f(x, s0)
        if increments:
            if solver == "euler":
                x = x + k1
            elif solver == "midpoint":
                x = x + f(x + k1 * 0.5, s0 + 0.5 / n)
            else:  # rk4
                k1_3 = k1 * (1.0 / 3.0)
                k2 = f(x + k1_3, s0 + 1.0 / (3 * n))
                k3 = f(x + (k2 - k1_3), s0 + 2.0 / (3 * n))
                k4 = f(x + (k1 - k2 + k3), s0 + 1.0 / n)
                x = x + (k1 + 3.0 * (k2 + k3) + k4) * 0.125
        elif solver == "euler":
            x = x + h * k1
        elif solver == "midpoint":
            x = x + h * f(x + k1 * (0.5 * h), s0 + 0.5 / n)
        else:  # rk4
            k2 = f(x + h * k1 * (1.0 / 3.0), s0 + 1.0 / (3 * n))
            k3 = f(x + h * (k2 - k1 * (1.0 / 3.0)), s0 + 2.0 / (3 * n))
            k4 = f(x + h * (k1 - k2 + k3), s0 + 1.0 / n)
            x = x + (k1 + 3.0 * (k2 + k3) + k4) * h * 0.125
    return x


class FlowMap(VectorFieldODE):
    """A discrete-time flow map: one network evaluation per grid interval of length h.

    kind "flowmap":        x_k+1 = x_k + h g_theta(x_k, u_mid, p)
    kind "flowmap_hybrid": x_k+1 = Phi_phys(x_k) + h g_theta(x_k, u_mid, p)

    u_mid is the input at the interval's middle (u_k + (u_k+1 - u_k) / 2 for linear inputs, u_k
    for held ones) and g_theta the neural ODE's network on normalized (x, u, p), scaled by the
    data's typical rate of change. Phi_phys steps the physics right-hand side (with the learnable
    parameter factors, as the hybrid's) over the interval with the fixed-step `solver` in
    1 / step_fraction steps: physics is cheap, the network is what costs, and an RK4 neural ODE
    evaluates it four times per interval. The correction starts at zero in the hybrid, so an
    untrained flowmap_hybrid is the physics stepped by RK4.

    A flow map is tied to its grid step: trained on windows of the dataset's dt, it steps that
    dt (a rollout on another grid asks the map for a step it never learned). Adaptive solvers
    do not apply: there is no vector field to integrate.
    """

    def __init__(self, system: dict[str, Any], stats: dict[str, list], **kwargs: Any):
        solver = kwargs.get("solver", "rk4")
        if solver not in FIXED_STEP:
            raise ValueError(
                f"model.net.solver={solver!r}: a flow map steps its physics with a fixed-step "
                f"method, one of {FIXED_STEP} (adaptive solvers integrate a vector field, and "
                "a flow map has none); use kind node or hybrid for an adaptive solver"
            )
        super().__init__(system, stats, **kwargs)

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "flowmap_hybrid" if self.physics else "flowmap"

    def interval_step(self, x, u0, du, p, pm, h: float) -> torch.Tensor:
        """One map evaluation (see the class doc), same arguments as the ODE's."""
        step = h * self.learned_rate(x, u0 + 0.5 * du, p)
        if not self.physics:
            return x + step
        phys = fixed_steps(
            lambda xx, s: self.physics_system.rhs(None, xx, u0 + s * du, pm),
            x,
            h,
            self.substeps,
            self.solver,
        )
        return phys + step

    def forward(self, x0, u, p, t):
        if self.solver not in FIXED_STEP:  # set after construction (the constructor refuses it)
            raise ValueError(
                f"model.net.solver={self.solver!r}: a flow map steps with a fixed-step method, "
                f"one of {FIXED_STEP}"
            )
        return super().forward(x0, u, p, t)


class Emulator(Surrogate):
    """One forward pass: (p, x0, the input signal on the grid) -> the whole output trajectory.

    The input signal is given by its samples (step levels, PRBS bits and multisine phases are
    random, so a handful of design variables would not determine it). Fixed to the training grid.

    `arch="mlp"`: one MLP maps (p, x0, all T input samples) to all T outputs; a trajectory is one
    training example, which suits smooth responses without inputs (Robertson). `arch="tcn"`: a
    causal temporal convolution network (`StackedTCN`) over per-step channels (the inputs at the
    step, p, x0 and the step's place on the grid, t / t_end): the output at step k sees the inputs
    up to k only, through the same map at every step, so each trajectory is T examples of it. That
    is what an input-driven system needs (the pendulum under a PRBS torque); the receptive field
    (`levels`, `kernel`) should span the system's memory.
    """

    kind = "emulator"

    def __init__(
        self,
        system: dict[str, Any],
        stats: dict[str, list],
        *,
        n_times: int,
        members: int = 5,
        seed: int = 0,
        arch: str = "mlp",
        hidden: int = 256,
        depth: int = 3,
        activation: str = "silu",
        channels: int = 64,
        levels: int = 7,
        kernel: int = 3,
    ):
        super().__init__(system, stats, members, seed)
        if n_times < 2:
            raise ValueError(f"emulator n_times must be >= 2, got {n_times}")
        if arch not in ("mlp", "tcn"):
            raise ValueError(f"model.net.arch must be 'mlp' or 'tcn', got {arch!r}")
        self.n_times, self.arch = n_times, arch
        self._config.update(n_times=n_times, arch=arch, activation=activation)
        if arch == "mlp":
            self.net = StackedMLP(
                members,
                self.n_p + self.nx + n_times * self.nu,
                n_times * self.ny,
                hidden=hidden,
                depth=depth,
                activation=activation,
                seed=seed,
            )
            self._config.update(hidden=hidden, depth=depth)
        else:
            self.net = StackedTCN(
                members,
                self.nu + self.n_p + self.nx + 1,
                self.ny,
                channels=channels,
                levels=levels,
                kernel=kernel,
                activation=activation,
                seed=seed,
            )
            self.register_buffer("grid_place", torch.linspace(0.0, 1.0, n_times), persistent=False)
            self._config.update(channels=channels, levels=levels, kernel=kernel)

    def forward(self, x0, u, p, t):
        if u.shape[1] != self.n_times or t.shape[0] != self.n_times:
            raise ValueError(
                f"the emulator is fixed to {self.n_times} time steps, got {u.shape[1]}"
            )
        b, m = x0.shape[0], self.members
        pn, xn = (p - self.p_mean) / self.p_std, (x0 - self.x_mean) / self.x_std
        un = (u - self.u_mean) / self.u_std
        if self.arch == "tcn":
            steps = self.n_times
            z = torch.cat(
                [
                    un.transpose(1, 2),  # [B, nu, T]
                    torch.cat([pn, xn], dim=-1)[:, :, None].expand(-1, -1, steps),
                    self.grid_place.expand(b, 1, steps),
                ],
                dim=1,
            )  # [B, C, T]
            out = self.net(z.repeat(1, m, 1))  # [B, M ny, T]
            yn = out.reshape(b, m, self.ny, steps).permute(1, 0, 3, 2)  # [M, B, T, ny]
            return None, yn * self.y_std + self.y_mean
        z = torch.cat([pn, xn, un.reshape(b, -1)], dim=-1)
        yn = self.net(z.unsqueeze(0).expand(m, -1, -1)).reshape(m, b, self.n_times, self.ny)
        return None, yn * self.y_std + self.y_mean


class LatentODE(VectorFieldODE):
    """A reduced-order model of a field system: the field lives in a POD basis of r modes fitted
    on the training snapshots (fields scaled per field, centred on their mean), and the ensemble
    integrates those r latent coordinates z.

    kind "latent": dz/dt = g_theta(z, u, p), a neural ODE in the latent space.
    kind "rom": dz/dt = Phi^T f(m + s Phi z, u, p) / s + g_theta(z, u, p), the Galerkin projection
    of the physics right-hand side onto the basis plus a learned closure that starts at zero.

    The declared initial conditions x0 [B, nx] are lifted by the system and projected (the
    encoder); probes are linear in the field, so they read z through a precomputed [ny_probe, r]
    map (the cost does not grow with the grid); a derived reduction (a maximum) decodes only its
    *support*: the cells where the training snapshots ever attained that extreme, and their
    neighbours, a set fixed at fitting time (an extreme that moves elsewhere on new data shows up
    as test error, not silently). `decode(z)` gives the whole field on request.
    """

    def __init__(
        self,
        system: dict[str, Any],
        stats: dict[str, list],
        *,
        rank: int = 12,
        snapshot_stride: int = 1,
        snapshots: np.ndarray | None = None,
        support_sizes: list[int] | None = None,
        pod_energy: float | None = None,
        galerkin: bool = False,
        mode_floor: float = MODE_FLOOR,
        requested_rank: int | None = None,
        members: int = 5,
        seed: int = 0,
        hidden: int = 64,
        depth: int = 2,
        activation: str = "tanh",
        solver: str = "rk4",
        step_fraction: float = 1.0,
        rtol: float = 1e-4,
        atol: float = 1e-6,
    ):
        super().__init__(
            system,
            stats,
            members=members,
            seed=seed,
            hidden=hidden,
            depth=depth,
            activation=activation,
            solver="rk4" if solver == "exact" else solver,
            step_fraction=step_fraction,
            rtol=rtol,
            atol=atol,
        )
        sysm = self.system
        if not hasattr(sysm, "grid"):
            raise ValueError(
                f"model kinds 'latent' and 'rom' reduce a field system (twin_ml.physics."
                f"FieldSystem); {sysm.name!r} has no grid: use node, hybrid or emulator"
            )
        n = sysm.state_size
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n:
            raise ValueError(f"model.rank must be an integer in [1, {n}], got {rank!r}")
        if isinstance(snapshot_stride, bool) or not isinstance(snapshot_stride, int):
            raise ValueError(f"snapshot_stride must be an integer >= 1, got {snapshot_stride!r}")
        pod = None
        if snapshots is not None:
            snapshots = np.asarray(snapshots, dtype=np.float64)
            pod = _pod(snapshots, sysm, rank, seed)
            requested_rank = rank
            # modes far below the leading one are float32 noise once encoded (the graph runs in
            # float32): keep those at least `mode_floor` of its amplitude
            sv = pod["sv"]
            rank = max(1, min(rank, int((sv >= mode_floor * sv[0]).sum()) if sv[0] > 0 else 1))
        self.rank, self.galerkin, self.snapshot_stride = rank, bool(galerkin), snapshot_stride
        # an affine system's Galerkin term is A(p) z + B(p) u + c(p): r x r operators computed once
        # per rollout instead of the whole field's right-hand side at every stage
        self.affine = self.galerkin and bool(getattr(sysm, "affine", False))
        if solver == "exact" and not self.affine:
            raise ValueError(
                "model.solver 'exact' (the matrix exponential of the Galerkin operators) needs "
                "kind rom on a system that declares affine = True; "
                f"use one of {ODE_SOLVERS} here"
            )
        self.solver = solver
        self._config["solver"] = solver
        self.n_probe = len(sysm.probes)
        self.net = StackedMLP(
            members,
            rank + self.nu + self.n_p,
            rank,
            hidden=hidden,
            depth=depth,
            activation=activation,
            seed=seed,
            zero_last=self.galerkin,
        )
        for name, shape in (
            ("field_mean", (n,)),
            ("field_scale", (n,)),
            ("basis", (n, rank)),
            ("z_mean", (rank,)),
            ("z_std", (rank,)),
            ("dz_std", (rank,)),
            ("probe_map", (self.n_probe, rank)),
            ("probe_offset", (self.n_probe,)),
        ):
            self.register_buffer(name, torch.zeros(shape))
        if snapshots is not None:
            support = self._fit_basis(snapshots, stats, pod)
        else:
            if support_sizes is None or len(support_sizes) != len(sysm.derived):
                raise ValueError(
                    "a LatentODE is built from training snapshots, or from a saved config "
                    f"(support_sizes: one per derived output, {len(sysm.derived)})"
                )
            support = [torch.zeros(k, dtype=torch.long) for k in support_sizes]
        for k, idx in enumerate(support):
            self.register_buffer(f"support_{k}", idx)
        if self.affine and snapshots is not None:
            check_affine(sysm, np.asarray(snapshots, dtype=np.float64), seed)
        self._config.update(
            rank=rank,
            snapshot_stride=snapshot_stride,
            support_sizes=[len(i) for i in support],
            pod_energy=self._config.get("pod_energy", pod_energy),
            mode_floor=mode_floor,
            requested_rank=requested_rank,
            galerkin=self.galerkin,
        )
        for k in ("physics", "physics_options", "learn_parameters"):
            self._config.pop(k, None)

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "rom" if self.galerkin else "latent"

    def _fit_basis(self, snaps: np.ndarray, stats: dict[str, list], pod: dict) -> list:
        """From the POD of the snapshots [N, Ts, n]: the basis, the latent statistics, the probe
        map, each derived output's support."""
        sysm, r = self.system, self.rank
        flat, mean, scale, xc = pod["flat"], pod["mean"], pod["scale"], pod["xc"]
        sv, basis = pod["sv"], pod["v"][:, :r]
        total = float((xc**2).sum())
        self._config["pod_energy"] = float((sv[:r] ** 2).sum() / total) if total > 0 else 1.0
        z = (xc @ basis).reshape(snaps.shape[0], snaps.shape[1], r)
        dt = float(stats["dt"][0]) if "dt" in stats else 1.0
        dz = (z[:, 1:] - z[:, :-1]) / (self.snapshot_stride * dt) if z.shape[1] > 1 else z
        with torch.no_grad():
            self.field_mean.copy_(torch.tensor(mean))
            self.field_scale.copy_(torch.tensor(scale))
            self.basis.copy_(basis)
            self.z_mean.copy_(z.mean(dim=(0, 1)))
            self.z_std.copy_(z.std(dim=(0, 1)).clamp_min(1e-6))
            self.dz_std.copy_(dz.std(dim=(0, 1)).clamp_min(1e-6))
            pm = torch.zeros(self.n_probe, r, dtype=torch.float64)
            po = torch.zeros(self.n_probe, dtype=torch.float64)
            for j, terms in enumerate(sysm._probe_terms):
                for i, w in terms:
                    pm[j] += w * scale[i] * basis[i]
                    po[j] += w * mean[i]
            self.probe_map.copy_(pm)
            self.probe_offset.copy_(po)
        support = []
        for o in sysm.derived:
            k = sysm.field_names.index(o.field)
            cells = flat[:, k * sysm.grid.cells : (k + 1) * sysm.grid.cells]
            if o.reduce == "mean":
                hit = np.arange(sysm.grid.cells)
            else:
                arg = cells.argmax(axis=1) if o.reduce == "max" else cells.argmin(axis=1)
                pattern = sysm.grid.laplacian_pattern()  # a cell and its stencil neighbours
                hit = np.unique(pattern[np.unique(arg)].nonzero()[1])
            support.append(torch.tensor(k * sysm.grid.cells + hit, dtype=torch.long))
        return support

    def encode_field(self, x: torch.Tensor) -> torch.Tensor:
        """Latent coordinates [..., r] of states [..., n]."""
        return ((x - self.field_mean) / self.field_scale) @ self.basis

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The field [..., n] of latent coordinates [..., r]."""
        return self.field_mean + self.field_scale * (z @ self.basis.T)

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """z0 [B, r] from the declared initial conditions [B, nx] (the system's lift, then the
        projection)."""
        return self.encode_field(self.system.initial_state(x0))

    def galerkin_operators(self, p: torch.Tensor):
        """The projected physics of an affine system, g(z, u, p) = A z + B u + c, per scenario:
        A [B, r, r], B [B, r, nu], c [B, r]. With f(x, u) = L x + M u + f0 (fixed p), A and B
        come from r + nu + 1 evaluations of the right-hand side at the scaled modes, the unit
        inputs and zero, without the mean field (their differences cancel nothing large), and
        c = Phi^T f(mean, 0) / s from one evaluation at the mean field in float64: there the
        differences of a smooth field of ~10-100 units cancel, and in float32 they biased the
        plate's probes by ~1e-3 degC, the same sign everywhere (a calibration on 1400 points read
        it as a third of a standard error)."""
        r, nu, b = self.rank, self.nu, p.shape[0]
        eye_z = torch.eye(r + nu, dtype=p.dtype, device=p.device)
        zs = torch.cat([torch.zeros(1, r, dtype=p.dtype), eye_z[:, :r]])  # [1 + r + nu, r]
        us = torch.cat([torch.zeros(1, nu, dtype=p.dtype), eye_z[:, r:]])
        k = zs.shape[0]
        x = (self.field_scale * (zs @ self.basis.T)).unsqueeze(0).expand(b, k, -1)
        f = self.system.rhs(
            None, x, us.unsqueeze(0).expand(b, k, -1), p.unsqueeze(1).expand(b, k, -1)
        )
        g = (f / self.field_scale) @ self.basis  # [B, k, r]
        f_mean = self.system.rhs(
            None,
            self.field_mean.double().expand(b, -1),
            torch.zeros(b, nu, dtype=torch.float64, device=p.device),
            p.double(),
        )
        c = ((f_mean / self.field_scale.double()) @ self.basis.double()).to(p.dtype)
        return (
            (g[:, 1 : 1 + r] - g[:, :1]).transpose(1, 2),
            (g[:, 1 + r :] - g[:, :1]).transpose(1, 2),
            c,
        )

    def step_context(self, p):
        return self.galerkin_operators(p) if self.affine else None

    def discrete_operators(self, p: torch.Tensor, h: float):
        """The affine rom's exact step over an interval h with linearly interpolated inputs (held
        inputs: constant), per scenario: z(h) = Phi z + G0 [u0, 1] + G1 [u1 - u0, 0], from the
        matrix exponential of the augmented system [[A h, [B c] h, 0], [0, 0, I], [0, 0, 0]]
        (float64; scaling and squaring with a Taylor series: matmuls only, so it exports)."""
        a, bu, c = self.galerkin_operators(p)
        b, r, q = a.shape[0], self.rank, self.nu + 1
        big = torch.zeros(b, r + 2 * q, r + 2 * q, dtype=torch.float64, device=p.device)
        big[:, :r, :r] = a.double() * h
        big[:, :r, r : r + q] = torch.cat([bu, c.unsqueeze(-1)], dim=-1).double() * h
        big[:, r : r + q, r + q :] = torch.eye(q, dtype=torch.float64)
        e = _expm(big)
        return tuple(
            blk.to(p.dtype) for blk in (e[:, :r, :r], e[:, :r, r : r + q], e[:, :r, r + q :])
        )

    def exact_step(self, z, u0, u1, p, ops, h: float):
        """One interval of the affine rom: the Galerkin physics exactly (`discrete_operators`),
        plus h times the learned closure at the interval's start (a correction of the step)."""
        phi, g0, g1 = ops
        one = torch.ones_like(u0[..., :1])
        du = torch.where(self.held_inputs, torch.zeros_like(u0), u1 - u0)
        forcing = batched_matvec(g0, torch.cat([u0, one], -1))
        forcing = forcing + batched_matvec(g1, torch.cat([du, 0 * one], -1))
        return batched_matvec(phi, z) + forcing + h * self.closure(z, u0, p)

    @property
    def held_inputs(self) -> torch.Tensor:
        return torch.as_tensor(self.zoh, dtype=torch.bool)

    def closure(self, z, u_t, p):
        """The learned part g_theta(z, u, p) [M, B, r] (scaled by the data's latent rate)."""
        m, b = z.shape[0], z.shape[1]
        inp = torch.cat(
            [
                (z - self.z_mean) / self.z_std,
                ((u_t - self.u_mean) / self.u_std).expand(m, b, -1),
                ((p - self.p_mean) / self.p_std).expand(m, b, -1),
            ],
            dim=-1,
        )
        return self.net(inp) * self.dz_std

    def vector_field(self, z, u_t, p, pm=None):
        dz = self.closure(z, u_t, p)
        if self.affine:
            a, bu, c = self.galerkin_operators(p) if pm is None else pm
            lin = batched_matvec(a, z)  # [M, B, r]
            if self.nu:
                lin = lin + batched_matvec(bu, u_t)
            dz = dz + lin + c
        elif self.galerkin:
            f = self.system.rhs(None, self.decode(z), u_t, p)
            dz = dz + (f / self.field_scale) @ self.basis
        return dz

    def observe(self, z, u, p):
        """Probes through the probe map, then each derived reduction over its support."""
        return torch.cat([self.probes(z), self.derived(z)], dim=-1)

    def probes(self, z: torch.Tensor) -> torch.Tensor:
        """The probe outputs [..., n_probe] of latent states z [..., r]."""
        return z @ self.probe_map.T + self.probe_offset

    def derived(self, z: torch.Tensor) -> torch.Tensor:
        """The derived outputs [..., nd] of latent states z [..., r]: each reduction over its
        support cells, decoded with the field's scale folded into the basis (constants, so an
        exported graph holds one product per output). With one output there is no
        concatenation (no node for it inside an exported loop)."""
        red = {"max": torch.amax, "min": torch.amin, "mean": torch.mean}
        cols = []
        for k, o in enumerate(self.system.derived):
            idx = getattr(self, f"support_{k}")
            decode = (self.basis[idx] * self.field_scale[idx, None]).T  # [r, cells]
            cols.append(red[o.reduce](z @ decode + self.field_mean[idx], dim=-1, keepdim=True))
        if len(cols) == 1:
            return cols[0]
        return torch.cat(cols, dim=-1) if cols else z[..., :0]

    def prune_closures(self, x0, u, p, t, y) -> dict[str, list]:
        """A Galerkin rom keeps each member's learned closure only where it brings the member's
        whole rollouts of the scenarios (x0, u, p on t; y [B, T, ny] observed) closer to y than
        the projected physics alone, the closure's starting point: trained on windows, a closure
        can drift over whole records, while the physics alone, stepped exactly, has only the
        basis's truncation error. A dropped closure is zeroed (its last layer). Returns per
        member: "kept", and the RMSE (in units of each output's std) with and without it."""
        if not self.galerkin:
            raise ValueError("prune_closures is for kind rom (a Galerkin closure)")
        w, b = self.net.weights[-1], self.net.biases[-1]
        ref = torch.as_tensor(y, dtype=w.dtype)

        def rmse():
            with torch.no_grad():
                _, got = self(*(torch.as_tensor(a, dtype=w.dtype) for a in (x0, u, p, t)))
            return (((got - ref) / self.y_std) ** 2).mean(dim=(1, 2, 3)).sqrt()

        with torch.no_grad():
            trained = rmse()
            saved = (w.detach().clone(), b.detach().clone())
            w.zero_()
            b.zero_()
            without = rmse()
            keep = trained < without
            w.copy_(torch.where(keep[:, None, None], saved[0], w))
            b.copy_(torch.where(keep[:, None, None], saved[1], b))
        return {
            "kept": keep.tolist(),
            "rmse_with_closure": trained.tolist(),
            "rmse_without_closure": without.tolist(),
        }

    def forward(self, x0, u, p, t):
        """x0: the declared initial conditions [B, nx] (or latent states [M, B, r] to start
        from); returns (z [M, B, T, r], y [M, B, T, ny])."""
        z0 = x0 if x0.dim() == 3 else self.encode(x0)
        if self.solver != "exact":
            return super().forward(z0, u, p, t)
        h = float(t[1] - t[0])
        ops = self.discrete_operators(p, h)
        z = z0 if z0.dim() == 3 else z0.unsqueeze(0).expand(self.members, -1, -1)
        zs = [z]
        for k in range(u.shape[1] - 1):
            z = self.exact_step(z, u[:, k], u[:, k + 1], p, ops, h)
            zs.append(z)
        z = torch.stack(zs, dim=2)
        return z, self.observe(z, u, p)


def _pod(snaps: np.ndarray, system, rank: int, seed: int) -> dict[str, Any]:
    """POD of snapshots [N, Ts, n] (float64): the mean field, a scale per field (its std), and the
    leading singular values and right vectors of the centred, scaled snapshots (randomized SVD,
    seeded)."""
    n = system.state_size
    if snaps.ndim != 3 or snaps.shape[-1] != n:
        raise ValueError(f"snapshots must be [N, Ts, {n}], got {snaps.shape}")
    flat = snaps.reshape(-1, n)
    mean = flat.mean(axis=0)
    scale = np.ones(n)
    for k in range(len(system.fields)):
        sl = slice(k * system.grid.cells, (k + 1) * system.grid.cells)
        s = float((flat[:, sl] - mean[sl]).std())
        scale[sl] = s if s > 0 else 1.0
    xc = torch.tensor((flat - mean) / scale)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        _, sv, v = torch.svd_lowrank(xc, q=min(rank + 10, min(xc.shape)), niter=6)
    finally:
        torch.random.set_rng_state(state)
    return {"flat": flat, "mean": mean, "scale": scale, "xc": xc, "sv": sv.numpy(), "v": v}


def batched_matvec(mats: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each scenario's matrix times its vector: mats [B, r, q], v [..., B, q] -> [..., B, r], as
    a product and a sum over q (one vectorized op each, whatever v's leading dimensions; where
    they can be moved behind B, a batched matmul is ~2x faster in onnxruntime: the exported exact
    rom step does that)."""
    return (mats * v.unsqueeze(-2)).sum(-1)


def _expm(a: torch.Tensor, squarings: int = 12, order: int = 10) -> torch.Tensor:
    """exp(a) for a batch of square matrices [..., n, n] by scaling and squaring with a Taylor
    series: matmuls only (an ONNX graph has no matrix exponential). 2^-12 scales norms up to ~40
    below 0.01, where 10 terms leave ~1e-23; the step operators of a stable system stay bounded
    under the squarings."""
    a = a / float(2**squarings)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    out, term = eye, eye
    for k in range(1, order + 1):
        term = torch.matmul(term, a) / float(k)
        out = out + term
    for _ in range(squarings):
        out = torch.matmul(out, out)
    return out


def check_affine(system, snapshots: np.ndarray, seed: int, tol: float = 1e-9) -> None:
    """A system that declares `affine = True` must have a right-hand side affine in (x, u) for
    fixed parameters: checked on random pairs of states (around the snapshots) and inputs (in
    their bounds), at random parameters in their bounds; f at a mix of two points must equal the
    mix of f (to round-off, float64)."""
    rng = np.random.default_rng(seed)
    flat = snapshots.reshape(-1, snapshots.shape[-1])
    n = 8
    x1, x2 = (
        flat[rng.integers(0, len(flat), n)] + rng.normal(0, 1, (n, flat.shape[1])) for _ in "ab"
    )
    ub = np.array([v.bounds for v in system.inputs]).reshape(-1, 2)
    pb = np.array([v.bounds for v in system.parameters]).reshape(-1, 2)
    u1, u2 = (rng.uniform(ub[:, 0], ub[:, 1], (n, len(ub))) for _ in "ab")
    p = rng.uniform(pb[:, 0], pb[:, 1], (n, len(pb)))
    a = rng.uniform(0.2, 0.8, (n, 1))
    mix = system.rhs(0.0, a * x1 + (1 - a) * x2, a * u1 + (1 - a) * u2, p)
    want = a * system.rhs(0.0, x1, u1, p) + (1 - a) * system.rhs(0.0, x2, u2, p)
    dev = float(np.abs(mix - want).max() / max(np.abs(want).max(), 1e-300))
    if not dev <= tol:
        raise ValueError(
            f"system {system.name!r} declares affine = True, but its right-hand side is not affine "
            f"in (x, u): a mix of two points is off the mix of their derivatives by {dev:.2e} "
            "(relative); remove the declaration (the rom then evaluates the whole right-hand side)"
        )


def field_stats(
    x0: np.ndarray, u: np.ndarray, p: np.ndarray, y: np.ndarray, t: np.ndarray
) -> dict[str, list]:
    """`compute_stats` for a field system's dataset, whose states are stored as snapshots: the
    state statistics are those of the declared initial conditions x0 [N, nx]."""
    x = np.repeat(x0[:, None, :], 2, axis=1)
    st = compute_stats(x, u, p, y, t[:2])
    st["dx_std"] = [1.0] * x0.shape[1]
    st["dt"] = [float(t[1] - t[0])]
    return st


MODEL_KINDS = {
    "node": VectorFieldODE,
    "hybrid": VectorFieldODE,
    "flowmap": FlowMap,
    "flowmap_hybrid": FlowMap,
    "emulator": Emulator,
    "latent": LatentODE,
    "rom": LatentODE,
}


def build_model(
    kind: str, system: PhysicsSystem | dict, stats: dict[str, list], **kwargs
) -> Surrogate:
    """A surrogate of `kind` (one of `MODEL_KINDS`) for `system` with normalization `stats`."""
    if kind not in MODEL_KINDS:
        raise KeyError(f"unknown model kind {kind!r}; kinds: {sorted(MODEL_KINDS)}")
    if isinstance(system, PhysicsSystem):
        system = system.reference()
    if kind in ("hybrid", "flowmap_hybrid"):
        kwargs["physics"] = True
    elif kind in ("node", "flowmap"):
        kwargs["physics"] = False
    elif kind in ("latent", "rom"):
        kwargs["galerkin"] = kind == "rom"
    return MODEL_KINDS[kind](system, stats, **kwargs)


def model_from_config(config: dict[str, Any]) -> Surrogate:
    """Rebuild an (untrained) model from `model.config`; load its state_dict next."""
    cfg = dict(config)
    kind = cfg.pop("kind")
    return build_model(kind, cfg.pop("system"), cfg.pop("stats"), **cfg)


def load_trained(model_dir: str | Path) -> tuple[Surrogate, dict[str, Any]]:
    """A trained model from `model_dir` (model.json + model.pt, as twin-train writes them).

    The weights' sha256 must match model.json; they load with weights_only=True (no pickle).
    """
    model_dir = Path(model_dir)
    meta_path, weights = model_dir / "model.json", model_dir / "model.pt"
    if not meta_path.exists() or not weights.exists():
        raise ValueError(
            f"{str(model_dir)!r} holds no model.json + model.pt; train one with twin-train"
        )
    meta = json.loads(meta_path.read_text())
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise ValueError(f"{weights}: sha256 does not match model.json; refusing a modified model")
    model = model_from_config(meta["config"])
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), meta


def save_model(
    out_dir: str | Path,
    model: Surrogate,
    scale: np.ndarray,
    t: np.ndarray,
    config_text: str,
    **extra: Any,
) -> Path:
    """Write out_dir/model/, what `load_trained` reads: model.pt (temp file, then rename) and
    model.json (the config to rebuild the model, the conformal scale, sha256 of the weights and of
    `config_text` (the run's resolved config), the time grid `t` in the system's unit, plus
    `extra`). Returns the model directory."""
    from twin_ml._io import atomic_write_json, sha256_bytes
    from twin_ml.models.checkpoint import atomic_torch_save

    model_dir = Path(out_dir) / "model"
    model_dir.mkdir(exist_ok=True)
    atomic_torch_save(model.state_dict(), model_dir / "model.pt")
    atomic_write_json(
        model_dir / "model.json",
        {
            "config": model.config,
            "conformal_scale": np.asarray(scale).tolist(),
            "weights_sha256": sha256_file(model_dir / "model.pt"),
            "config_sha256": sha256_bytes(config_text.encode()),
            "time": {
                "t0": float(t[0]),
                "dt": float(t[1] - t[0]),
                "n": len(t),
                "unit": model.system.time_unit,
            },
            **extra,
        },
    )
    return model_dir
