"""Typed request / answer models built from the served model's card (pydantic), so the
OpenAPI schema at /docs.json names the model's own parameters, states, inputs and outputs, with
units and training ranges, and carries an example request that the model answers."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from twin_ml.contract import ModelCard, Variable, decodes_fields

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _mid(rng: tuple[float, float] | None, default: float = 0.0) -> float:
    lo, hi = rng or (default, default)
    return round((float(lo) + float(hi)) / 2, 6)


def example_scenario(card: ModelCard, n_steps: int = 10) -> dict[str, Any]:
    """A valid in-domain scenario of the model: the middle of its training box, n_steps long."""
    box, system = card.domain, card.system
    if card.time.fixed_steps:
        n_steps = card.time.max_steps
    return {
        "parameters": {
            p.name: _mid(box.parameters.get(p.name), p.nominal or 0.0) for p in system.parameters
        },
        "initial_state": {s.name: _mid(box.states.get(s.name)) for s in system.states},
        "t_end": round(n_steps * card.time.dt, 9),
        "inputs": {i.name: [_mid(box.input_range(i.name))] * (n_steps + 1) for i in system.inputs},
        "quantiles": [0.05, 0.95],
    }


def build_models(card: ModelCard) -> tuple[type[BaseModel], type[BaseModel]]:
    """(Scenario, Answer) pydantic models of the served model."""
    box, sysd = card.domain, card.system

    def desc(rng: tuple[float, float] | None, v: Variable) -> str:
        text = f"[{v.unit}]" + (f", training range [{rng[0]:g}, {rng[1]:g}]" if rng else "")
        lo, hi = v.physical
        if math.isfinite(lo) or math.isfinite(hi):
            text += f", physical limits [{lo:g}, {hi:g}] (outside: refused)"
        return text

    params = create_model(
        "Parameters",
        __config__=STRICT,
        **{
            p.name: (float, Field(description=desc(box.parameters.get(p.name), p)))
            for p in sysd.parameters
        },
    )
    states = create_model(
        "InitialState",
        __config__=STRICT,
        **{
            s.name: (float | None, Field(None, description=desc(box.states.get(s.name), s)))
            for s in sysd.states
        },
    )
    inputs = create_model(
        "Inputs",
        __config__=STRICT,
        **{
            i.name: (
                list[float],
                Field(description=desc(box.input_range(i.name), i) + "; one value per time point"),
            )
            for i in sysd.inputs
        },
    )
    scenario = create_model(
        "Scenario",
        __config__=ConfigDict(
            extra="forbid",
            allow_inf_nan=False,
            json_schema_extra={"example": example_scenario(card)},
        ),
        parameters=(params, Field(description="every parameter, by name")),
        initial_state=(
            states | None,
            Field(None, description="missing states: the middle of the training range"),
        ),
        t_end=(
            float | None,
            Field(None, description=f"horizon [{sysd.time_unit}], a multiple of dt"),
        ),
        dt=(
            float | None,
            Field(None, description=f"must equal the model's dt = {card.time.dt}"),
        ),
        times=(
            list[float] | None,
            Field(None, description="explicit uniform grid with the model's dt"),
        ),
        inputs=(inputs, Field(description="every input, sampled on the time grid")),
        quantiles=(list[float], Field(default_factory=list, description="levels in (0, 1)")),
        **_fields_request(card),
    )

    class Series(BaseModel):
        mean: list[float | None]
        std: list[float | None]
        quantiles: dict[str, list[float | None]]

    class ModelRef(BaseModel):
        name: str
        version: str

    outputs = create_model("Outputs", **{o.name: (Series, ...) for o in sysd.outputs})
    answer = create_model(
        "Answer",
        times=(list[float], ...),
        outputs=(outputs, ...),
        in_domain=(bool, ...),
        domain_reasons=(list[str], ...),
        domain_distance=(
            float | None,
            Field(
                0.0,
                ge=0,
                description="how far the scenario lies outside the training box: the largest "
                "amount by which a parameter, initial state or input leaves its training range, "
                "in range widths (0 inside; null beyond float range). Outside, the std (and the "
                "quantiles) widen by 1 + beta * domain_distance per output, beta fitted on "
                "scenarios outside the box (the model card's conformal_shift)",
            ),
        ),
        model=(ModelRef, ...),
        warnings=(list[str], ...),
        **_fields_answer(card),
    )
    return scenario, answer


def _fields_request(card: ModelCard) -> dict[str, Any]:
    """The `fields` option of a model that decodes its system's fields."""
    if not decodes_fields(card):
        return {}
    grid = card.system.grid
    return {
        "fields": (
            list[float] | None,
            Field(
                None,
                description=(
                    f"times of the grid at which to return the fields "
                    f"({', '.join(card.system.field_names)}) on the {grid.shape} grid; "
                    "the server limits the numbers per request (413 beyond)"
                ),
            ),
        )
    }


def _fields_answer(card: ModelCard) -> dict[str, Any]:
    if not decodes_fields(card):
        return {}
    return {
        "fields": (
            dict[str, Any] | None,
            Field(
                None,
                description="times, shape, extent, and per field its unit, mean and std as "
                "[time][row][column] (rows along y); std: the members' spread",
            ),
        )
    }


class TelemetryObservations(BaseModel):
    """POST /calibrate's `telemetry`: twin-ingest's output inline, in place of times, outputs and
    inputs (twin_ml.calibrate.problem.observations_from_telemetry converts it, as twin-calibrate
    does the file)."""

    model_config = STRICT
    times: list[float] = Field(
        description="the grid's times (seconds from its start: the file's timestamps minus the "
        "first), uniform with the model's dt"
    )
    signals: dict[str, list[float | None]] = Field(
        description="per signal (by name) its values on the grid, in the system's units; null "
        "where the sample is invalid (its validity column false). The system's inputs are "
        "required (invalid samples hold the last valid value), its outputs are the "
        "observations (invalid: missing), any other signal is ignored with a warning"
    )
    outputs: list[str] | None = Field(
        None,
        description="the measured outputs that enter the fit (default: every output among the "
        "signals with a valid sample); the others are ignored",
    )
