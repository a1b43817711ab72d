"""Typed request / answer models built from the served model's manifest (pydantic), so the
OpenAPI schema at /docs.json names the model's own parameters, states, inputs and outputs, with
units and training ranges, and carries an example request that the model answers."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _mid(box: dict[str, list[float]], key: str, default: float = 0.0) -> float:
    lo, hi = box.get(key, (default, default))
    return round((float(lo) + float(hi)) / 2, 6)


def example_scenario(manifest: dict[str, Any], n_steps: int = 10) -> dict[str, Any]:
    """A valid in-domain scenario of the model: the middle of its training box, n_steps long."""
    box, sysd, dt = manifest["domain"]["box"], manifest["system"], float(manifest["time"]["dt"])
    if manifest["time"].get("fixed_steps"):
        n_steps = int(manifest["time"]["max_steps"])
    return {
        "parameters": {
            p["name"]: _mid(box, f"parameter:{p['name']}", p.get("nominal") or 0.0)
            for p in sysd["parameters"]
        },
        "initial_state": {s["name"]: _mid(box, f"state:{s['name']}") for s in sysd["states"]},
        "t_end": round(n_steps * dt, 9),
        "inputs": {
            i["name"]: [_mid(box, f"input:{i['name']}:offset")] * (n_steps + 1)
            for i in sysd["inputs"]
        },
        "quantiles": [0.05, 0.95],
    }


def build_models(manifest: dict[str, Any]) -> tuple[type[BaseModel], type[BaseModel]]:
    """(Scenario, Answer) pydantic models of the served model."""
    box, sysd = manifest["domain"]["box"], manifest["system"]

    def desc(kind: str, d: dict) -> str:
        rng = box.get(f"{kind}:{d['name']}") or box.get(f"{kind}:{d['name']}:offset")
        text = f"[{d.get('unit', '')}]"
        return text + (f", training range [{rng[0]:g}, {rng[1]:g}]" if rng else "")

    params = create_model(
        "Parameters",
        __config__=STRICT,
        **{p["name"]: (float, Field(description=desc("parameter", p))) for p in sysd["parameters"]},
    )
    states = create_model(
        "InitialState",
        __config__=STRICT,
        **{
            s["name"]: (Optional[float], Field(None, description=desc("state", s)))
            for s in sysd["states"]
        },
    )
    inputs = create_model(
        "Inputs",
        __config__=STRICT,
        **{
            i["name"]: (
                list[float],
                Field(description=desc("input", i) + "; one value per time point"),
            )
            for i in sysd["inputs"]
        },
    )
    scenario = create_model(
        "Scenario",
        __config__=ConfigDict(
            extra="forbid",
            allow_inf_nan=False,
            json_schema_extra={"example": example_scenario(manifest)},
        ),
        parameters=(params, Field(description="every parameter, by name")),
        initial_state=(
            Optional[states],
            Field(None, description="missing states: the middle of the training range"),
        ),
        t_end=(
            Optional[float],
            Field(None, description=f"horizon [{sysd['time_unit']}], a multiple of dt"),
        ),
        dt=(
            Optional[float],
            Field(None, description=f"must equal the model's dt = {manifest['time']['dt']}"),
        ),
        times=(
            Optional[list[float]],
            Field(None, description="explicit uniform grid with the model's dt"),
        ),
        inputs=(inputs, Field(description="every input, sampled on the time grid")),
        quantiles=(list[float], Field(default_factory=list, description="levels in (0, 1)")),
    )

    class Series(BaseModel):
        mean: list[float | None]
        std: list[float | None]
        quantiles: dict[str, list[float | None]]

    class ModelRef(BaseModel):
        name: str
        version: str

    outputs = create_model("Outputs", **{o["name"]: (Series, ...) for o in sysd["outputs"]})
    answer = create_model(
        "Answer",
        times=(list[float], ...),
        outputs=(outputs, ...),
        in_domain=(bool, ...),
        domain_reasons=(list[str], ...),
        model=(ModelRef, ...),
        warnings=(list[str], ...),
    )
    return scenario, answer
