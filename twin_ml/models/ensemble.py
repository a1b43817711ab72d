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
                g = torch.Generator().manual_seed(seed * 1_000_003 + m * 7919 + k)
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
