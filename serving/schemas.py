"""Typed request / answer models built from the served model's card (pydantic), so the
OpenAPI schema at /docs.json names the model's own parameters, states, inputs and outputs, with
units and training ranges, and carries an example request that the model answers."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from twin_ml.contract import ModelCard, Variable, decodes_fields
from twin_ml.contract.requests import MAX_QUANTILES

# strict: a number is a JSON number (pydantic's lax mode also took true/false and "1.5" for one,
# which the schema's `type: number` refuses), an integer a JSON integer
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


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
            strict=True,
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
                            "uniqueItems": True,
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
                description="levels in (0, 1), distinct as the answer names them (its keys "
                "are f'{q:g}': 6 significant digits, so 0.9999999 and 0.99999999 are both '1')",
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


# ---- POST /calibrate ---------------------------------------------------------------------------
F32_MAX = 3.4028234663852886e38  # the largest float32: the surrogate computes in float32


def _number(v: Variable | None = None, **extra: Any) -> dict[str, Any]:
    """A number /calibrate accepts: within float32 (every number of the request is checked,
    serving.service._check_magnitudes) and within `v`'s physical limits."""
    lo, hi = v.physical if v is not None else (-math.inf, math.inf)
    return {"type": "number", "minimum": max(lo, -F32_MAX), "maximum": min(hi, F32_MAX), **extra}


# a list with at least one value that is not null (OpenAPI 3.0 has no `contains`: "not every
# value null")
SOME = {"not": {"items": {"type": "null"}}}


def _nullable(item: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [item, {"type": "null"}]}


def _in_member(extra: dict[str, Any]):
    """json_schema_extra for an optional field (`X | None`): `extra` goes into the member that
    is not null (BentoML's document keeps only that member of a body field's anyOf)."""

    def apply(schema: dict[str, Any]) -> None:
        members = [m for m in schema.get("anyOf", []) if m.get("type") != "null"]
        (members[0] if members else schema).update(extra)

    return apply


def calibration_schemas(card: ModelCard) -> dict[str, Any]:
    """What POST /calibrate's checks enforce (twin_ml/contract/requests.py `parse_calibration`,
    `observations_from_telemetry`, the float32 check), declared for the served model: per field
    of the handler's signature its `json_schema_extra`, `telemetry` the model of that field, and
    `body` the rules of the body as a whole (the two forms of observations), which the document
    adds (BentoML's own keeps no body-level anyOf). What JSON Schema cannot say is in the
    descriptions and answered with a 400: every series as long as `times`, `times` uniform with
    dt, not both forms at once, the telemetry's selected outputs among its signals, the
    parameters not fitted given, bounds and priors only for fitted names, low < high, a prior's
    std > 0 and its mean inside the bounds, and a noise std to estimate only with more observed
    points than fitted values."""
    sysd, grid, box = card.system, card.time, card.domain
    dt = grid.dt
    points = {
        "minItems": grid.max_steps + 1 if grid.fixed_steps else 3,
        "maxItems": grid.max_steps + 1,
    }
    fitted = {p.name: p for p in sysd.parameters} | {f"state:{s.name}": s for s in sysd.states}
    inputs = [v.name for v in sysd.inputs]
    unbounded = [n for n in fitted if box.fitted(n) is None]

    def series(item: dict[str, Any], what: str) -> dict[str, Any]:
        return {
            "type": "array",
            "items": item,
            **points,
            "description": f"{what}: one value per timestamp (as many as `times` has)",
        }

    def by_name(props: dict[str, Any], what: str) -> dict[str, Any]:
        return {
            "properties": props,
            "additionalProperties": False,
            "description": what,
        }

    times = {
        "items": _number(),
        **points,
        "uniqueItems": True,
        "description": f"the observation timestamps: sorted, uniform with the model's dt = {dt}, "
        f"{points['minItems']} to {points['maxItems']}; every series of `outputs` and `inputs` "
        "has one value per timestamp. Give times, outputs and inputs, or `telemetry`, not both",
    }
    observed = {
        o.name: series(_nullable(_number()), f"[{o.unit}], null where missing")
        for o in sysd.outputs
    }
    outputs = {
        **by_name(
            {o: {**v, **SOME} for o, v in observed.items()},
            "the measured outputs by name, each on `times` with at least one value that is not "
            "null",
        ),
        "minProperties": 1,
    }
    signal_in = {
        i.name: {
            **series(_nullable(_number(i)), f"input [{i.unit}], null where invalid"),
            **SOME,
        }
        for i in sysd.inputs
    }
    telemetry = create_model(
        "TelemetryObservations",
        __base__=TelemetryObservations,
        __doc__=TelemetryObservations.__doc__,
        times=(
            list[float],
            Field(
                description=TelemetryObservations.model_fields["times"].description
                + f" = {dt}; every signal has one value per time",
                json_schema_extra={"items": _number(), **points, "uniqueItems": True},
            ),
        ),
        signals=(
            dict[str, list[float | None]],
            Field(
                description=TelemetryObservations.model_fields["signals"].description
                + "; each input needs one valid sample, and the outputs that enter the fit one "
                "each (the selected ones, else at least one output)",
                json_schema_extra={
                    "properties": {**signal_in, **observed},
                    "required": inputs,
                    "minProperties": 1,
                    # an output with a valid sample (the selected ones: each, a rule across fields)
                    "anyOf": [
                        {"required": [o.name], "properties": {o.name: SOME}} for o in sysd.outputs
                    ],
                    "additionalProperties": {
                        "type": "array",
                        "items": _nullable(_number()),
                    },
                },
            ),
        ),
        outputs=(
            list[str] | None,
            Field(
                None,
                description=TelemetryObservations.model_fields["outputs"].description
                + " (each one among the signals)",
                json_schema_extra=_in_member(
                    {
                        "items": {"type": "string", "enum": [o.name for o in sysd.outputs]},
                        "minItems": 1,
                    }
                ),
            ),
        ),
    )
    pair = {"type": "array", "minItems": 2, "maxItems": 2}
    return {
        "times": _in_member(times),
        "outputs": _in_member(outputs),
        "telemetry": telemetry,
        "inputs": by_name(
            {i.name: series(_number(i), f"[{i.unit}]") for i in sysd.inputs},
            "every input that drove the system, by name, on `times` (with `telemetry`: none)",
        ),
        "parameters": by_name(
            {p.name: _number(p, description=f"[{p.unit}]") for p in sysd.parameters},
            "the value of every parameter not fitted (those fitted: ignored)",
        ),
        "initial_state": by_name(
            {s.name: _number(s, description=f"[{s.unit}]") for s in sysd.states},
            "the initial states not fitted (missing: the middle of the training range)",
        ),
        "bounds": by_name(
            {
                n: {
                    **pair,
                    "items": _number(v),
                    **({"default": list(box.fitted(n))} if box.fitted(n) is not None else {}),
                }
                for n, v in fitted.items()
            },
            "[low, high] with low < high, for fitted names only (default: the training range"
            + (f"; required for {', '.join(unbounded)}, which has none" if unbounded else "")
            + ")",
        ),
        "priors": by_name(
            {
                n: {
                    "type": "object",
                    "properties": {"normal": {**pair, "items": _number()}},
                    "required": ["normal"],
                    "additionalProperties": False,
                }
                for n in fitted
            },
            'for fitted names only: {"normal": [mean, std]}, std > 0, the mean inside the '
            "name's bounds",
        ),
        "noise": by_name(
            {
                o.name: {"type": "number", "exclusiveMinimum": 0, "maximum": F32_MAX}
                for o in sysd.outputs
            },
            "the noise std per output; missing: estimated, which needs more observed points "
            "than fitted values",
        ),
        # the two forms of observations, one at a time: times, outputs and every input without
        # telemetry, or telemetry without times, outputs or an input
        "body": {
            "anyOf": [
                {
                    "required": ["times", "outputs", *(["inputs"] if inputs else [])],
                    **({"properties": {"inputs": {"required": inputs}}} if inputs else {}),
                    "not": {"required": ["telemetry"]},
                },
                {
                    "required": ["telemetry"],
                    "not": {
                        "anyOf": [
                            {"required": ["times"]},
                            {"required": ["outputs"]},
                            {
                                "required": ["inputs"],
                                "properties": {"inputs": {"minProperties": 1}},
                            },
                        ]
                    },
                },
            ]
        },
    }
