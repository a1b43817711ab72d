"""Typed request / answer models built from the served model's card (pydantic), so the
OpenAPI schema at /docs.json names the model's own parameters, states, inputs and outputs, with
units and training ranges, and carries an example request that the model answers."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from twin_ml.contract import ModelCard, Variable, decodes_fields
from twin_ml.contract.requests import MAX_QUANTILES

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


def _limits(v: Variable) -> dict[str, float]:
    """The physical limits of a variable as JSON Schema bounds (the finite ones)."""
    lo, hi = v.physical
    return {
        **({"minimum": float(lo)} if math.isfinite(lo) else {}),
        **({"maximum": float(hi)} if math.isfinite(hi) else {}),
    }


def _one_or_many(value: Any) -> Any:
    """One scenario (an object) is a list of one."""
    return [value] if isinstance(value, dict) else value


class _OneOrList:
    """The JSON Schema of `scenarios`: a list of scenarios, or one scenario. `oneOf`, not
    `anyOf`: BentoML's schema export keeps only the first member of an `anyOf`, and its client
    then walks a single scenario as if it were a list."""

    def __init__(self, max_scenarios: int):
        self.max_scenarios = max_scenarios

    def __get_pydantic_json_schema__(self, core_schema, handler):
        many = handler(core_schema)
        one = many["items"]
        return {
            "oneOf": [{**many, "minItems": 1, "maxItems": self.max_scenarios}, one],
            "description": f"one scenario, or a list of 1 to {self.max_scenarios}",
        }


def build_models(
    card: ModelCard, *, max_scenarios: int = 256, max_steps: int | None = None
) -> tuple[Any, type[BaseModel], type[BaseModel]]:
    """(Scenarios, Scenario, Answer): the type of POST /simulate's `scenarios` (one scenario or
    a list of 1 to `max_scenarios`, validated as a list), and the pydantic models of one scenario
    and one answer of the served model. The constraints the request checks enforce
    (twin_ml/contract/requests.py, with their own messages) are declared in the JSON Schema:
    physical limits, the horizon (`max_steps`: the server's, at most the model's), dt, list
    lengths, quantile levels. What JSON Schema cannot say (an input's length equals the grid's,
    `times` uniform with dt) is said in the descriptions."""
    box, sysd, grid = card.domain, card.system, card.time
    steps = min(max_steps or grid.max_steps, grid.max_steps)
    lo_steps = steps if grid.fixed_steps else 1

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
            p.name: (
                float,
                Field(
                    description=desc(box.parameters.get(p.name), p), json_schema_extra=_limits(p)
                ),
            )
            for p in sysd.parameters
        },
    )
    states = create_model(
        "InitialState",
        __config__=STRICT,
        **{
            s.name: (
                float | None,
                Field(
                    None,
                    description=desc(box.states.get(s.name), s) + "; null: as if missing",
                    json_schema_extra={
                        "anyOf": [{"type": "number", **_limits(s)}, {"type": "null"}]
                    },
                ),
            )
            for s in sysd.states
        },
    )
    inputs = create_model(
        "Inputs",
        __config__=STRICT,
        **{
            i.name: (
                list[float],
                Field(
                    description=desc(box.input_range(i.name), i)
                    + "; one value per time point of the scenario's grid (as many as the grid "
                    "has points: t_end / dt + 1, or the length of `times`)",
                    json_schema_extra={
                        "minItems": lo_steps + 1,
                        "maxItems": steps + 1,
                        "items": {"type": "number", **_limits(i)},
                    },
                ),
            )
            for i in sysd.inputs
        },
    )
    scenario = create_model(
        "Scenario",
        __config__=ConfigDict(
            extra="forbid",
            allow_inf_nan=False,
            json_schema_extra={
                "example": example_scenario(card),
                # the time grid: t_end, or times (which wins when both are given)
                "anyOf": [
                    {"required": ["t_end"], "properties": {"t_end": {"type": "number"}}},
                    {"required": ["times"], "properties": {"times": {"type": "array"}}},
                ],
            },
        ),
        parameters=(params, Field(description="every parameter, by name")),
        initial_state=(
            states | None,
            Field(None, description="missing states: the middle of the training range"),
        ),
        t_end=(
            float | None,
            Field(
                None,
                description=f"horizon [{sysd.time_unit}], a multiple of dt, at most "
                f"{steps} steps"
                + (" (this emulator: its training horizon only)" if grid.fixed_steps else ""),
                json_schema_extra={
                    "anyOf": [
                        {
                            "type": "number",
                            "multipleOf": grid.dt,
                            "minimum": lo_steps * grid.dt,
                            "maximum": steps * grid.dt,
                        },
                        {"type": "null"},
                    ]
                },
            ),
        ),
        dt=(
            float | None,
            Field(
                None,
                description=f"must equal the model's dt = {grid.dt}",
                json_schema_extra={
                    "anyOf": [{"type": "number", "enum": [grid.dt]}, {"type": "null"}]
                },
            ),
        ),
        times=(
            list[float] | None,
            Field(
                None,
                description=f"explicit grid: sorted, uniform with the model's dt = {grid.dt}",
                json_schema_extra={
                    "anyOf": [
                        {
                            "type": "array",
                            "items": {"type": "number"},
                            "minItems": lo_steps + 1,
                            "maxItems": steps + 1,
                        },
                        {"type": "null"},
                    ]
                },
            ),
        ),
        inputs=(inputs, Field(description="every input, sampled on the time grid")),
        quantiles=(
            list[float],
            Field(
                default_factory=list,
                description="levels in (0, 1), distinct",
                json_schema_extra={
                    "maxItems": MAX_QUANTILES,
                    "uniqueItems": True,
                    "items": {  # OpenAPI 3.0 (JSON Schema draft 4): exclusive bounds as flags
                        "type": "number",
                        "minimum": 0,
                        "maximum": 1,
                        "exclusiveMinimum": True,
                        "exclusiveMaximum": True,
                    },
                },
            ),
        ),
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
    scenarios = Annotated[list[scenario], BeforeValidator(_one_or_many), _OneOrList(max_scenarios)]
    return scenarios, scenario, answer


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
