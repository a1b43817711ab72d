"""Excitation signals on a time grid, and their interpolation in between.

Every signal is drawn on the grid `t [T]` from a small set of design variables (`offset`,
`amplitude`; these are what a scenario design samples) plus a per-scenario random generator for
what is random inside a signal (step levels, PRBS sequence, multisine phases, noise). Values are
clipped to the input's allowed range.

Kinds (all seeded, all `make_signal(kind=..., **options)`):

- ``constant``: ``offset``.
- ``step``: a step sequence; a new level every ``hold`` time units, levels uniform in
  offset +- amplitude.
- ``ramp``: a linear ramp from offset - amplitude to offset + amplitude over the horizon
  (``direction: down`` reverses it).
- ``prbs``: a maximum-length pseudo-random binary sequence between offset +- amplitude, clocked
  every ``hold`` time units.
- ``multisine``: ``n_tones`` sines with frequencies log-spaced in [f_min, f_max] and random
  phases, scaled so the peak is ``amplitude``.
- ``bandlimited``: white noise through a 4th-order Butterworth low-pass at ``f_cut``, scaled so
  the peak is ``amplitude``.

Frequencies are in cycles per time unit of the system.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from array_api_compat import array_namespace

SIGNAL_KINDS = ("constant", "step", "ramp", "prbs", "multisine", "bandlimited")


@dataclass(frozen=True)
class SignalSpec:
    """How one input is excited. Unset frequency/hold options default from the horizon."""

    kind: str = "multisine"
    hold: float | None = None  # step / prbs: time between level changes
    f_min: float | None = None  # multisine: lowest frequency
    f_max: float | None = None  # multisine: highest frequency
    n_tones: int = 8  # multisine
    f_cut: float | None = None  # bandlimited: cut-off frequency
    direction: Literal["up", "down"] = "up"  # ramp

    def __post_init__(self):
        if self.kind not in SIGNAL_KINDS:
            raise ValueError(f"signal kind {self.kind!r} is unknown; must be one of {SIGNAL_KINDS}")
        for k in ("hold", "f_min", "f_max", "f_cut"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                raise ValueError(f"signal {self.kind}: {k} must be > 0, got {v}")
        if self.f_min is not None and self.f_max is not None and self.f_min > self.f_max:
            raise ValueError(f"signal multisine: f_min ({self.f_min}) > f_max ({self.f_max})")
        if self.n_tones < 1:
            raise ValueError(f"signal multisine: n_tones must be >= 1, got {self.n_tones}")
        if self.direction not in ("up", "down"):
            raise ValueError(
                f"signal ramp: direction must be 'up' or 'down', got {self.direction!r}"
            )

    def check_grid(self, t: np.ndarray) -> None:
        """Frequencies must be resolvable on the grid: below Nyquist, 1 / (2 dt)."""
        nyquist = 0.5 / float(t[1] - t[0])
        for k in ("f_min", "f_max", "f_cut"):
            v = getattr(self, k)
            if v is not None and v >= nyquist:
                raise ValueError(
                    f"{k} ({v}) must be below the grid's Nyquist frequency {nyquist:.6g}"
                )


def make_signal(kind: str = "multisine", **options: Any) -> SignalSpec:
    return SignalSpec(kind=kind, **options)


def generate(
    spec: SignalSpec,
    t: np.ndarray,
    offset: float,
    amplitude: float,
    rng: np.random.Generator,
    *,
    clip: tuple[float, float] = (-np.inf, np.inf),
) -> np.ndarray:
    """The signal [T] on grid t [T] for one scenario."""
    t = np.asarray(t, dtype=np.float64)
    span = float(t[-1] - t[0]) if t.size > 1 else 1.0
    dt = float(t[1] - t[0]) if t.size > 1 else 1.0
    tau = t - t[0]
    hold = spec.hold or span / 10.0
    if spec.kind == "constant":
        s = np.zeros_like(t)
    elif spec.kind == "step":
        n = int(np.floor(span / hold)) + 1
        s = rng.uniform(-1.0, 1.0, size=n)[np.minimum((tau // hold).astype(int), n - 1)]
    elif spec.kind == "ramp":
        s = 2.0 * tau / span - 1.0
        s = -s if spec.direction == "down" else s
    elif spec.kind == "prbs":
        n_clocks = int(np.floor(span / hold)) + 1
        nbits = max(3, int(np.ceil(np.log2(n_clocks + 1))))
        state = rng.integers(0, 2, size=nbits)
        state[rng.integers(0, nbits)] = 1  # an all-zero register never leaves zero
        from scipy import signal as sps  # here: ~1 s to import, and most signals need none

        seq = sps.max_len_seq(nbits, state=state, length=n_clocks)[0]
        s = (2.0 * seq - 1.0)[np.minimum((tau // hold).astype(int), n_clocks - 1)]
    elif spec.kind == "multisine":
        f_lo = spec.f_min or 1.0 / span
        f_hi = spec.f_max or min(10.0 / span, 0.25 / dt)
        freqs = np.geomspace(f_lo, max(f_hi, f_lo), spec.n_tones)
        phases = rng.uniform(0.0, 2 * np.pi, size=spec.n_tones)
        s = np.sin(2 * np.pi * freqs[:, None] * tau[None, :] + phases[:, None]).sum(axis=0)
        s = s / max(np.abs(s).max(), 1e-12)
    else:  # bandlimited
        f_cut = spec.f_cut or min(5.0 / span, 0.2 / dt)
        wn = min(f_cut * 2.0 * dt, 0.99)  # normalized to Nyquist
        from scipy import signal as sps

        sos = sps.butter(4, wn, output="sos")
        pad = min(4 * int(np.ceil(1.0 / wn)), 10 * t.size)  # let the filter settle before t0
        noise = rng.standard_normal(t.size + pad)
        s = sps.sosfilt(sos, noise)[pad:]
        s = s / max(np.abs(s).max(), 1e-12)
    return np.clip(offset + amplitude * s, clip[0], clip[1])


def interpolator(t_grid, u_grid, zoh_mask):
    """A function u(t) -> [..., nu] of the values u_grid [..., T, nu] given on t_grid [T] (numpy).

    Inputs with `zoh_mask[i]` True hold their last grid value (zero-order hold); the others are
    linear in between. Outside the grid the end values hold. `u_grid` may be a numpy array or a
    torch tensor (the result is then differentiable with respect to it).
    """
    xp = array_namespace(u_grid)
    t_grid = np.asarray(t_grid, dtype=np.float64)
    dt = xp.asarray(np.diff(t_grid)[:, None], dtype=u_grid.dtype)
    if hasattr(u_grid, "device") and not isinstance(u_grid, np.ndarray):
        dt = xp.asarray(dt, device=u_grid.device)
    slope = (u_grid[..., 1:, :] - u_grid[..., :-1, :]) / dt  # [..., T-1, nu]
    slope = xp.where(xp.asarray(np.asarray(zoh_mask, dtype=bool)), xp.zeros_like(slope), slope)
    last = t_grid.size - 1

    def at(t: float, k_max: int | None = None):
        # k_max caps the grid interval: an integration segment that ends where a held input
        # jumps keeps the held value up to and including its end point
        k = int(np.searchsorted(t_grid, t, side="right")) - 1
        if k_max is not None and k > k_max:
            k = k_max
        if k >= last:
            return u_grid[..., last, :]
        if k < 0:
            return u_grid[..., 0, :]
        return u_grid[..., k, :] + (float(t) - t_grid[k]) * slope[..., k, :]

    return at
