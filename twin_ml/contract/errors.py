"""The one error of a request a model cannot answer (a scenario, a calibration)."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the model cannot answer; `field` names the offending part (e.g.
    ``scenarios[0].inputs.torque``, ``bounds.k1``) and the message says what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class RequestTooLarge(RequestError):
    """A request whose answer would exceed a server's size limit (HTTP 413): the message says
    the limit and how to stay under it."""
