"""Deep ensembles as one module: M members' weights stacked, evaluated with batched matmuls.

All members train in one process and one backward pass (their parameters are disjoint, so the
summed loss gives each member its own gradient), and the graph has the node count of one member
whatever M is (what the ONNX export relies on).
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {"tanh": torch.tanh, "silu": nn.functional.silu, "gelu": nn.functional.gelu}


def _init_generator(seed: int, member: int, layer: int) -> torch.Generator:
    """The generator of one member's initial weights in one layer, fixed by (seed, member, layer):
    member m of an ensemble starts as the single model of its seed would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + member * 7919 + layer)


class StackedMLP(nn.Module):
    """M independent MLPs d_in -> d_out evaluated together: z [M, B, d_in] -> [M, B, d_out].

    Members differ by initialization seed (`seed + m`). `zero_last` starts every member at output
    0 (a residual that begins as "no correction").
    """

    def __init__(
        self,
        members: int,
        d_in: int,
        d_out: int,
        *,
        hidden: int = 64,
        depth: int = 2,
        activation: str = "tanh",
        seed: int = 0,
        zero_last: bool = False,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if members < 1 or depth < 1 or hidden < 1:
            raise ValueError(
                f"members, depth and hidden must be >= 1, got {members}, {depth}, {hidden}"
            )
        self.members, self.activation = members, activation
        dims = [d_in] + [hidden] * depth + [d_out]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            w = torch.empty(members, a, b)
            for m in range(members):
                g = _init_generator(seed, m, k)
                bound = 1.0 / math.sqrt(a)  # PyTorch's default (Kaiming-uniform with a = sqrt(5))
                w[m].uniform_(-bound, bound, generator=g)
            if zero_last and k == len(dims) - 2:
                w.zero_()
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(members, 1, b)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        n = len(self.weights)
        # the lists' own dicts: iterating a ParameterList indexes it, which costs more than the
        # matmul
        for k, (w, b) in enumerate(
            zip(self.weights._parameters.values(), self.biases._parameters.values())
        ):
            z = torch.baddbmm(b, z, w)  # [M, B, a] @ [M, a, b] + [M, 1, b]
            if k < n - 1:
                z = act(z)
        return z


class StackedTCN(nn.Module):
    """M independent causal temporal convolution networks evaluated together, as grouped
    convolutions: z [B, M * c_in, T] -> [B, M * c_out, T].

    A 1x1 convolution lifts the c_in channels to `channels`; `levels` residual blocks follow, block
    k a causal convolution of `kernel` taps dilated by 2^k (left-padded: the output at step t
    sees the inputs at steps <= t only), h <- h + act(conv(h)); a 1x1 convolution maps to c_out.
    The receptive field is 1 + (kernel - 1)(2^levels - 1) steps. The map is the same at every
    step, so each trajectory is T training examples of it, not one: an input-driven response is
    learned from far fewer trajectories than a map of the whole input sequence would need.
    Members differ by initialization seed, as `StackedMLP`'s; `groups=M` keeps their weights
    apart.
    """

    def __init__(
        self,
        members: int,
        c_in: int,
        c_out: int,
        *,
        channels: int = 64,
        levels: int = 7,
        kernel: int = 3,
        activation: str = "silu",
        seed: int = 0,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if members < 1 or channels < 1 or levels < 1 or kernel < 2:
            raise ValueError(
                "members, channels and levels must be >= 1 and kernel >= 2, got "
                f"{members}, {channels}, {levels}, {kernel}"
            )
        self.members, self.activation, self.kernel = members, activation, kernel
        self.dilations = [2**k for k in range(levels)]

        def conv(a: int, b: int, k: int, dilation: int, index: int) -> nn.Conv1d:
            c = nn.Conv1d(members * a, members * b, k, dilation=dilation, groups=members)
            bound = 1.0 / math.sqrt(a * k)  # PyTorch's default bound, per member
            with torch.no_grad():
                for m in range(members):
                    g = _init_generator(seed, m, index)
                    c.weight[m * b : (m + 1) * b].uniform_(-bound, bound, generator=g)
                c.bias.zero_()
            return c

        self.lift = conv(c_in, channels, 1, 1, 0)
        self.blocks = nn.ModuleList(
            conv(channels, channels, kernel, d, k + 1) for k, d in enumerate(self.dilations)
        )
        self.head = conv(channels, c_out, 1, 1, levels + 1)

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel - 1) * sum(self.dilations)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        h = self.lift(z)
        for d, block in zip(self.dilations, self.blocks):
            h = h + act(block(nn.functional.pad(h, ((self.kernel - 1) * d, 0))))
        return self.head(act(h))
