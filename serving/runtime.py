"""Scenario inference on an exported model with onnxruntime: requests checked by the model's
contract (twin_ml/contract/requests.py: names, time grid, physical limits, domain flags), answers
with quantiles.

Torch-free and BentoML-free: the service wraps a `Runtime`; tests drive it directly. An answer
holds, per output name, the ensemble mean, the calibrated std and the requested Gaussian
quantiles at every time point, an in-domain flag with reasons (which parameter, initial state or
input left the training box, and by how much), the scenario's distance to the box
(`domain_distance`: the largest of those amounts, in box widths; 0 inside), the model's name and
version, and warnings. Bad input raises `RequestError` naming the field and what is allowed.

Outside the box the std the graph computes (in-domain conformal scale included) is widened by the
card's conformal shift, std * (1 + beta * d) per output (twin_ml.uq.shift; beta 0 for cards
without one), and the quantiles follow from the widened std. Inside (d = 0) the graph's std is
answered as it is. A reduced model's decoded fields keep the members' spread (beta is fitted on
the outputs only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from twin_ml.contract import (
    ModelCard,
    RequestError,
    Scenario,
    decodes_fields,
    parse_scenario,
    parse_scenarios,
)

__all__ = ["PAD_RATIO", "RequestError", "Rollout", "Runtime", "plan"]


@dataclass
class Rollout:
    """One scenario's arrays on its grid: mean and std [T, ny] (float64; std calibrated, widened
    outside the training box), the members' trajectories [M, T, ny] (float32, as the graph gives
    them: no calibration), and the decoded fields asked for (a reduced model's)."""

    mean: np.ndarray
    std: np.ndarray
    members: np.ndarray | None = None
    field_mean: np.ndarray | None = None
    field_std: np.ndarray | None = None


class Runtime:
    """An exported model (file or its bytes + card, already verified by the registry) ready to
    answer. The service passes the verified bytes, so the file on disk is never reopened."""

    def __init__(
        self,
        onnx: str | Path | bytes,
        card: ModelCard | dict[str, Any],
        *,
        max_scenarios: int = 256,
        max_steps: int | None = None,
        strict: bool = False,
        threads: int = 1,
        max_field_values: int = 1 << 20,
    ):
        from twin_ml._ort import session

        self.card = ModelCard.of(card)
        self.outputs = self.card.system.output_names
        self.max_steps = min(max_steps or self.card.time.max_steps, self.card.time.max_steps)
        if self.card.time.fixed_steps and self.max_steps < self.card.time.max_steps:
            raise ValueError(
                f"max_steps={max_steps} is below this emulator's one horizon of "
                f"{self.card.time.max_steps} steps: it could answer nothing"
            )
        self.max_scenarios, self.strict = max_scenarios, strict
        self.max_field_values = max_field_values
        self.fields = decodes_fields(self.card)
        self.session = session(onnx, threads=threads)

    # ---- request -> arrays ---------------------------------------------------------------------
    def parse(self, sc: Any, where: str = "scenario") -> Scenario:
        """One scenario -> arrays (x0 [nx], u [T, nu], p [np], t [T]), quantiles, domain report."""
        return parse_scenario(self.card, sc, where, max_steps=self.max_steps, strict=self.strict)

    def parse_request(self, scenarios: Any) -> list[Scenario]:
        """One scenario (a dict) or a list of them -> parsed scenarios; every check of `parse`,
        plus the per-request count limit."""
        return parse_scenarios(
            self.card,
            scenarios,
            max_scenarios=self.max_scenarios,
            max_steps=self.max_steps,
            strict=self.strict,
            max_field_values=self.max_field_values,
        )

    # ---- run -----------------------------------------------------------------------------------
    def simulate(self, scenarios: Any) -> list[dict[str, Any]]:
        """Answers for one scenario (a dict) or a list of them, in order."""
        return self.run(self.parse_request(scenarios))

    def run(self, parsed: list[Scenario]) -> list[dict[str, Any]]:
        """Answers for parsed scenarios, in order, in as few onnxruntime calls as `plan` allows."""
        return [self.answer(s, r) for s, r in zip(parsed, self.rollouts(parsed))]

    def rollouts(self, parsed: list[Scenario], members: bool = False) -> list[Rollout]:
        """Each parsed scenario's arrays on its own grid, in order, in as few onnxruntime calls as
        `plan` allows: mean, std (widened outside the box), the members' trajectories when
        `members`, and the decoded fields asked for. `answer` turns one into /simulate's JSON."""
        out: list[Rollout | None] = [None] * len(parsed)
        for idx in plan([len(s.t) for s in parsed]):
            n = len(parsed[idx[0]].t)  # the group's longest grid; shorter ones are padded
            feeds = {
                "x0": np.stack([parsed[i].x0 for i in idx]).astype(np.float32),
                "u": np.stack([_pad(parsed[i].u, n) for i in idx]).astype(np.float32),
                "p": np.stack([parsed[i].p for i in idx]).astype(np.float32),
            }
            names = ["mean", "std"] + (["members"] if members else [])
            steps = sorted({k for i in idx for k in parsed[i].field_steps})
            if steps:  # the group's fields at the union of its steps; each takes its own
                feeds["field_steps"] = np.array(steps, dtype=np.int64)
                names += ["field_mean", "field_std"]
            got = dict(zip(names, self.session.run(names, feeds)))
            for k, i in enumerate(idx):
                s, m = parsed[i], len(parsed[i].t)  # the mask: a scenario's own steps only
                std = got["std"][k, :m].astype(np.float64)
                if s.distance > 0:  # outside the training box: the conformal shift's widening
                    std = std * self.card.conformal_shift.factor(s.distance, len(self.outputs))
                r = Rollout(got["mean"][k, :m].astype(np.float64), std)
                if members:
                    r.members = got["members"][:, k, :m]
                if s.field_steps:
                    at = [steps.index(j) for j in s.field_steps]
                    r.field_mean, r.field_std = got["field_mean"][k, at], got["field_std"][k, at]
                out[i] = r
        return out  # type: ignore[return-value]

    def answer(self, s: Scenario, r: Rollout) -> dict[str, Any]:
        """/simulate's answer to one scenario from its rollout."""
        mean, std = r.mean, r.std
        warnings = []
        if s.defaulted_states:
            warnings.append(
                f"initial state {', '.join(s.defaulted_states)} not given: the middle of the "
                "training range was used"
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            warnings.append(
                "the model produced non-finite values (far outside its training domain?)"
            )
        outputs = {}
        for j, name in enumerate(self.outputs):
            q = {
                f"{lv:g}": _list(mean[:, j] + NormalDist().inv_cdf(lv) * std[:, j])
                for lv in s.quantiles
            }
            outputs[name] = {"mean": _list(mean[:, j]), "std": _list(std[:, j]), "quantiles": q}
        answer = {
            "times": s.t.tolist(),
            "outputs": outputs,
            "in_domain": not s.reasons,
            "domain_reasons": s.reasons,
            # JSON has no infinity (a value beyond float range): None, as in the series
            "domain_distance": s.distance if math.isfinite(s.distance) else None,
            "model": {"name": self.card.name, "version": self.card.version},
            "warnings": warnings,
        }
        if s.field_steps:
            answer["fields"] = self._fields(s, r.field_mean, r.field_std)
        return answer

    def _fields(self, s: Scenario, mean: np.ndarray, std: np.ndarray) -> dict[str, Any]:
        """{"times", "shape", "extent", "length_unit", name: {"mean", "std"}}: each field as
        nested lists [time][row][column] (2D: rows along y) of the grid's cell centres; std is the
        members' spread (epistemic: the reduced model's own disagreement)."""
        sysd = self.card.system
        grid = sysd.grid
        shape = (len(s.field_steps), *grid.shape)
        out: dict[str, Any] = {
            "times": [float(s.t[k]) for k in s.field_steps],
            "shape": list(grid.shape),
            "extent": list(grid.extent),
            "length_unit": grid.length_unit,
        }
        n = grid.cells
        for j, name in enumerate(sysd.field_names):
            sl = slice(j * n, (j + 1) * n)
            out[name] = {
                "unit": sysd.fields[j].unit,
                "mean": np.round(mean[:, sl].astype(np.float64), 6).reshape(shape).tolist(),
                "std": np.round(std[:, sl].astype(np.float64), 6).reshape(shape).tolist(),
            }
        return out


# a scenario joins a padded group when the group's longest grid is at most this much longer
PAD_RATIO = 1.5


def plan(lengths: list[int]) -> list[list[int]]:
    """Groups of scenario indices run as one batch each, longest first in every group. Scenarios
    of different horizons share a batch (padded to its longest, masked back) while the padding
    costs at most PAD_RATIO x their own steps; the rollout is causal, so a scenario's answer does
    not depend on the padding after its end."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] <= PAD_RATIO * lengths[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _list(a: np.ndarray) -> list[float | None]:
    """JSON has no NaN or inf: None in their place (the answer's warnings say why)."""
    return (
        a.tolist() if np.isfinite(a).all() else [float(v) if math.isfinite(v) else None for v in a]
    )


def _pad(u: np.ndarray, n: int) -> np.ndarray:
    """Inputs [T, nu] -> [n, nu], holding the last value after the end."""
    return u if len(u) == n else np.concatenate([u, np.repeat(u[-1:], n - len(u), axis=0)])
