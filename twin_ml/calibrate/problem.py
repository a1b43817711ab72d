"""A calibration problem: observations, the inputs that drove the system, what to fit, within
which bounds, and the noise model. The request is checked by the model's contract
(`twin_ml.contract.parse_calibration`, which documents the request's fields); every error is a
`RequestError` naming its field. Torch-free (the server's /calibrate uses it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from twin_ml.contract import CalibrationRequest, ModelCard, RequestError, parse_calibration

# a calibration request the model cannot run: the contract's one request error
CalibrationError = RequestError


class Problem(CalibrationRequest):
    """A checked calibration problem; build it with `Problem.build`."""

    @property
    def n_fit(self) -> int:
        return len(self.fit)

    @classmethod
    def build(cls, request: Any, card: ModelCard | dict[str, Any]) -> Problem:
        """Check `request` against the model's card (names, dt, training domain, limits)."""
        return parse_calibration(ModelCard.of(card), request, cls)

    # ---- theta (physical units, [K, n_fit]) <-> model arguments --------------------------------
    def arguments(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p [K, np], x0 [K, nx]) for candidate values theta [K, n_fit]."""
        theta = np.atleast_2d(theta)
        p = np.repeat(self.base_p[None], len(theta), axis=0)
        x0 = np.repeat(self.base_x0[None], len(theta), axis=0)
        for k, name in enumerate(self.fit):
            if name.startswith("state:"):
                x0[:, self.states.index(name[6:])] = theta[:, k]
            else:
                p[:, self.parameters.index(name)] = theta[:, k]
        return p, x0

    def to_unit(self, theta: np.ndarray) -> np.ndarray:
        return (theta - self.lower) / (self.upper - self.lower)

    def from_unit(self, z: np.ndarray) -> np.ndarray:
        return self.lower + z * (self.upper - self.lower)
