"""Conformal scaling by distance to the training design: intervals that widen outside the box.

The in-domain conformal scale (`conformal_scale`, fitted on the calibration split) makes the
intervals cover in-domain scenarios; outside the design's box the model errs more and they do
not. Per output j the served std becomes

    std * (1 + beta_j * d),   d = `DomainBox.distance` (0 inside the box, in box widths outside)

so in-domain answers are unchanged, and beta is fitted on the dataset's extrapolation split
(sampled outside the box): the smallest beta_j >= 0 with which the `level` intervals cover the
split's measured points of output j at the split-conformal finite-sample level ceil((n+1) level)
/ n (`conformal_quantile`, the convention `conformal_scale` uses). Coverage only grows with beta,
so that beta is a quantile of the per-point ratios each point needs, (r - 1) / d with r =
|y - mean| / (z std) (0 for a point already covered; none for an uncovered point at d = 0).

Per output, like the conformal scale: outputs leave their accuracy at different rates (a state
the physics pins down, a learned residual); one pooled beta would over-widen the one and leave
the other under-covered while the pooled coverage looks right. Every output's beta is fitted on
the same scenarios, so it rests on as many of them as a scalar would.

The extrapolation metrics are cross-fitted (`cross_fit_shift`): the split's scenarios go into two
seeded halves A and B; beta fitted on A scores B and beta fitted on B scores A, so no scenario's
interval used its own error, and the pooled coverage, width, NLL and CRPS are out-of-sample. The
beta deployed (model.json, the model card) is fitted on all of them. Time points of one scenario
are not independent: the effective sample behind beta is the number of scenarios, and its
coverage on fresh shifted scenarios scatters accordingly.

Numpy only (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twin_ml.contract.card import DISTANCE, ConformalShift, widening
from twin_ml.uq.metrics import central_z, conformal_quantile

NO_SPLIT = "no extrapolation split: beta = 0 (intervals outside the training box are not widened)"


def required_beta(y, mean, std, distance, level: float = 0.9) -> np.ndarray:
    """[N, T, ny] the smallest beta >= 0 with which each point's `level` interval covers it:
    0 for a point already covered, (r - 1) / d with r = |y - mean| / (z std) otherwise, inf for an
    uncovered point at d = 0 (or a non-finite prediction), NaN where y is not measured.
    y, mean, std: [N, T, ny]; distance: [N]."""
    y = np.asarray(y, dtype=np.float64)
    r = np.abs(y - mean) / (central_z(level) * np.maximum(std, 1e-300))
    d = np.broadcast_to(np.asarray(distance, dtype=np.float64)[:, None, None], r.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(r <= 1.0, 0.0, (r - 1.0) / d)
    need = np.where(np.isnan(need) | (need < 0), np.inf, need)  # r NaN, or d = 0 (-> inf, NaN)
    return np.where(np.isfinite(y), need, np.nan)


def shift_beta(y, mean, std, distance, level: float = 0.9) -> tuple[np.ndarray, list[str]]:
    """(beta [ny], notes): per output the smallest beta >= 0 with which std * (1 + beta d) makes
    the central `level` intervals cover the measured points (finite y) of that output at the
    split-conformal level ceil((n+1) level) / n. An output with no measured point gets 0. When
    more points than that level allows cannot be covered by any beta (missed at d = 0), beta
    covers every point that can be, and a note says so.

    y, mean, std: [N, T, ny] (scenarios, steps, outputs); distance: [N] (`DomainBox.distances`).

    >>> y = np.array([[[3.0]], [[0.0]]]); mean = np.zeros_like(y); std = np.ones_like(y)
    >>> shift_beta(y, mean, std, np.array([1.0, 1.0]), 0.9)[0].round(3)  # 3 = 1.645 (1 + b)
    array([0.824])
    """
    y = np.asarray(y, dtype=np.float64)
    mean = np.broadcast_to(np.asarray(mean, dtype=np.float64), y.shape)
    std = np.broadcast_to(np.asarray(std, dtype=np.float64), y.shape)
    distance = np.asarray(distance, dtype=np.float64)
    need = required_beta(y, mean, std, distance, level)
    z = central_z(level)
    ny = y.shape[-1]
    beta, notes = np.zeros(ny), []
    for j in range(ny):
        ok = np.isfinite(y[..., j])
        nj = need[..., j][ok]
        if not len(nj):
            continue
        b = conformal_quantile(nj, level)
        if not np.isfinite(b):
            coverable = nj[np.isfinite(nj)]
            b = float(coverable.max()) if len(coverable) else 0.0
            notes.append(
                f"output {j}: {int(np.sum(~np.isfinite(nj)))} of {len(nj)} points are missed at "
                "distance 0 (or predicted non-finite), more than the level allows; beta covers "
                "every other point"
            )
        # round-off: the point whose ratio is b must come out covered as the metrics compute it
        # (|y - mean| <= z * std * (1 + b d)); nudge b up by a few relative ulps until it does
        target = min(int(np.ceil((len(nj) + 1) * level)), int(np.isfinite(nj).sum()))
        yj, mj, sj = y[..., j], mean[..., j], std[..., j]
        for k in range(64):
            inside = np.abs(yj - mj) <= z * (sj * widening([b], distance))
            if b == 0.0 or int(np.sum(inside & ok)) >= target:
                break
            b *= 1.0 + 2.0 ** (k - 52)
        beta[j] = b
    return beta, notes


@dataclass(frozen=True)
class ShiftFit:
    """The conformal shift fitted on an extrapolation split, and its cross-fitted scoring.

    `beta` is the deployed one (fitted on every scenario). `factor` [N, ny] scores the split
    out-of-sample: scenario i's std is widened by 1 + beta_h d_i with beta_h fitted on the other
    half h than i's (`half` [N], 0 or 1; `beta_halves` [2, ny]). Metrics of std * factor are the
    cross-fitted extrapolation metrics."""

    beta: np.ndarray  # [ny] fitted on all scenarios: what the model card carries
    beta_halves: np.ndarray  # [2, ny] fitted on half 0, on half 1
    half: np.ndarray  # [N] each scenario's half
    distance: np.ndarray  # [N]
    factor: np.ndarray  # [N, ny] cross-fitted: 1 + beta_halves[1 - half] * distance
    level: float = 0.9
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def n_fit(self) -> int:
        return len(self.distance)

    @classmethod
    def none(cls, n_outputs: int, note: str = NO_SPLIT, *, level: float = 0.9) -> ShiftFit:
        """No fit (no extrapolation scenario): beta 0 for every output, and why."""
        return cross_fit_shift(
            np.zeros((0, 1, n_outputs)),
            np.zeros((0, 1, n_outputs)),
            np.ones((0, 1, n_outputs)),
            np.zeros(0),
            level=level,
            note=note,
        )

    def card(self) -> ConformalShift:
        """What model.json and the model card carry."""
        return ConformalShift(
            beta=self.beta.tolist(),
            distance=DISTANCE,
            level=self.level,
            n_fit=self.n_fit,
            notes=list(self.notes),
        )

    def summary(self) -> dict[str, Any]:
        """metrics.json's `conformal_shift`: the card's fields plus the cross-fit's halves."""
        return {
            **self.card().model_dump(mode="json"),
            "cross_fit": {
                "seed": self.seed,
                "n_halves": [int(np.sum(self.half == h)) for h in (0, 1)],
                "beta_halves": self.beta_halves.tolist(),
                "scored": "each extrapolation scenario by the beta of the half it is not in",
            },
        }


def cross_fit_shift(
    y,
    mean,
    std,
    distance,
    *,
    level: float = 0.9,
    seed: int = 0,
    note: str | None = None,
) -> ShiftFit:
    """`shift_beta` on an extrapolation split (y, mean, std [N, T, ny], distance [N]), fitted on
    all N scenarios (the deployed beta) and cross-fitted: the scenarios in two halves by a seeded
    permutation, each half scored by the beta fitted on the other (see `ShiftFit`). With no
    scenario beta is 0 and a note says so (`note` overrides the default note)."""
    y = np.asarray(y, dtype=np.float64)
    mean = np.broadcast_to(np.asarray(mean, dtype=np.float64), y.shape)
    std = np.broadcast_to(np.asarray(std, dtype=np.float64), y.shape)
    distance = np.asarray(distance, dtype=np.float64)
    n, ny = y.shape[0], y.shape[-1]
    if len(distance) != n:
        raise ValueError(f"distance: expected one per scenario ({n}), got {len(distance)}")
    notes: list[str] = []
    if n == 0:
        notes.append(note or NO_SPLIT)
        empty = np.zeros((0, ny))
        return ShiftFit(
            np.zeros(ny), np.zeros((2, ny)), np.zeros(0, np.int8), distance, empty, level, seed,
            notes,
        )  # fmt: skip
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    half = np.zeros(n, dtype=np.int8)
    half[rng.permutation(n)[n // 2 :]] = 1  # half 0: n // 2 scenarios, half 1: the rest
    beta_halves = np.zeros((2, ny))
    for h in (0, 1):
        rows = half == h
        if rows.any():
            beta_halves[h], hn = shift_beta(y[rows], mean[rows], std[rows], distance[rows], level)
            notes += [f"half {h}: {m}" for m in hn]
        else:
            notes.append(
                f"one extrapolation scenario: cross-fitting scores it with beta 0 (half {h} is "
                "empty)"
            )
    factor = np.ones((n, ny))
    for h in (0, 1):
        rows = half == h
        factor[rows] = widening(beta_halves[1 - h], distance[rows])
    beta, an = shift_beta(y, mean, std, distance, level)
    if note:
        notes.append(note)
    return ShiftFit(beta, beta_halves, half, distance, factor, level, seed, notes + an)
