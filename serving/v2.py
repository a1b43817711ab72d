"""The Open Inference Protocol (KServe / Triton "v2", HTTP/REST) beside the service's own API, on
the same runtime: the same request checks, limits and domain flag as POST /simulate, and the
same adaptive batcher (a v2 request's scenarios may share a model call with /simulate's).

    GET  /v2                                      server metadata
    GET  /v2/health/live, /v2/health/ready        200 when the server answers
    GET  /v2/models/NAME[/versions/V]             model metadata: tensors, datatypes, shapes
    GET  /v2/models/NAME[/versions/V]/ready       200 for the served model, 404 otherwise
    POST /v2/models/NAME[/versions/V]/infer       tensors in, tensors out

The tensors are the exported graph's (twin_ml/export/onnx_export.py), B scenarios at once:

    in:  x0 FP32 [B, nx] (optional: the training box's middle, as /simulate without
         initial_state)   u FP32 [B, T, nu]   p FP32 [B, np]
    out: mean FP32 [B, T, ny]   std FP32 [B, T, ny] (calibrated, widened outside the box as in
         /simulate)   members FP32 [M, B, T, ny] (the members' own trajectories, uncalibrated)
         in_domain BOOL [B]

The time grid is u's T: T points dt apart from 0, i.e. T - 1 steps (t_end = (T - 1) dt), the
graph's own rule; a model without inputs takes u of shape [B, T, 0] (no values, its shape the
grid). State, input and parameter order is the manifest's (GET /v2/models/NAME lists the names in
its `parameters`). Tensor data comes as JSON (flat or nested, row-major) or in the binary tensor
extension (`binary_data_size`, `Inference-Header-Content-Length`); outputs are JSON unless a
requested output says `binary_data: true` or the request's parameters say
`binary_data_output: true` (tritonclient's defaults). Errors are the protocol's `{"error": ...}`
(the service's one error shape, with its `detail`), 400 for a request the model cannot answer,
404 for a model or version not served here. Torch-free; BentoML-free (the service mounts `app`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving import errors
from serving.runtime import Rollout, Runtime
from twin_ml.contract import ModelCard, RequestError, RequestTooLarge
from twin_ml.contract import Scenario as ParsedScenario

HEADER_LENGTH = "inference-header-content-length"
INPUTS = ("x0", "u", "p")
OUTPUTS = ("mean", "std", "members", "in_domain")
F32_MAX = float(np.finfo(np.float32).max)


class Backend(Protocol):
    """What the routes need of the service: its runtime (the checks and limits) and its batched
    model calls."""

    runtime: Runtime

    def rollouts(self, parsed: list[ParsedScenario]) -> Awaitable[list[Rollout]]: ...


class NotFound(RequestError):
    """A model name or version this server does not serve (404)."""


# ---- metadata ------------------------------------------------------------------------------------
def tensors(card: ModelCard) -> dict[str, list[dict[str, Any]]]:
    """The inputs and outputs with datatype and shape (-1: a dynamic dimension)."""
    s = card.system
    nx, nu, n_p, ny = len(s.states), len(s.inputs), len(s.parameters), len(s.outputs)
    t = card.time.max_steps + 1 if card.time.fixed_steps else -1  # an emulator: its one grid
    inputs = {"x0": [-1, nx], "u": [-1, t, nu], "p": [-1, n_p]}
    outputs = {
        "mean": [-1, t, ny],
        "std": [-1, t, ny],
        "members": [card.members, -1, t, ny],
        "in_domain": [-1],
    }
    return {
        "inputs": [{"name": k, "datatype": "FP32", "shape": v} for k, v in inputs.items()],
        "outputs": [
            {"name": k, "datatype": "BOOL" if k == "in_domain" else "FP32", "shape": v}
            for k, v in outputs.items()
        ],
    }


def metadata(card: ModelCard) -> dict[str, Any]:
    """GET /v2/models/NAME: the protocol's model metadata, and in `parameters` what each
    tensor's last axis holds (names in the manifest's order), the grid and the limits a client
    needs to build a request."""
    s = card.system
    return {
        "name": card.name,
        "versions": [card.version],
        "platform": "onnxruntime_onnx",
        **tensors(card),
        "parameters": {
            "states": ",".join(s.state_names),
            "inputs": ",".join(s.input_names),
            "parameters": ",".join(s.parameter_names),
            "outputs": ",".join(s.output_names),
            "dt": card.time.dt,
            "time_unit": card.time.unit,
            "max_steps": card.time.max_steps,
        },
    }


# ---- requests ------------------------------------------------------------------------------------
def _split(raw: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The JSON header and the binary part after it."""
    if header_length is None:
        head, rest = raw, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(raw):
            raise RequestError(
                "Inference-Header-Content-Length",
                f"must be the JSON header's length in bytes, at most the body's {len(raw)}; "
                f"got {header_length!r}",
            )
        n = int(header_length)
        head, rest = raw[:n], raw[n:]
    try:
        return json.loads(head), rest
    except ValueError as e:
        raise RequestError("body", f"is not JSON: {e}") from None


def _named(t: Any, i: int, kind: str, names: tuple[str, ...]) -> str:
    """The `name` of the i-th entry of the request's `inputs` or `outputs` (kind: input or
    output), one of `names`."""
    name = t.get("name") if isinstance(t, dict) else None
    if name not in names:
        raise RequestError(
            f"{kind}s[{i}].name",
            f"{name!r} is not an {kind} of this model; its {kind}s: {', '.join(names)}",
        )
    return name


def _shape(t: dict[str, Any], where: str) -> tuple[int, ...]:
    shape = t.get("shape")
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise RequestError(f"{where}.shape", "must be a list of non-negative integers")
    return tuple(shape)


def _values(t: dict[str, Any], shape: tuple[int, ...], binary: memoryview, at: int, where: str):
    """A tensor's FP32 values from its JSON `data` or the binary part -> (array, bytes used)."""
    n = math.prod(shape)
    size = (t.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if "data" in t:
            raise RequestError(where, "give `data` or `parameters.binary_data_size`, not both")
        if not isinstance(size, int) or isinstance(size, bool) or size != 4 * n:
            raise RequestError(
                f"{where}.parameters.binary_data_size",
                f"must be {4 * n} (shape {list(shape)} of FP32, 4 bytes each), got {size!r}",
            )
        if at + size > len(binary):
            raise RequestError(
                f"{where}.parameters.binary_data_size",
                f"{size} bytes from offset {at}, but the binary part has {len(binary)}",
            )
        return np.frombuffer(binary[at : at + size], dtype="<f4").reshape(shape), size
    data = t.get("data")
    if not isinstance(data, list):
        raise RequestError(
            f"{where}.data",
            "must be a list of numbers (row-major, flat or nested), or send the tensor in the "
            "binary extension (parameters.binary_data_size)",
        )
    try:
        a = np.asarray(data)
    except ValueError:  # ragged nesting
        raise RequestError(f"{where}.data", "nested lists must be regular (one shape)") from None
    if a.size and a.dtype.kind not in "iuf":
        raise RequestError(f"{where}.data", "must hold numbers only (FP32)")
    if a.size != n:
        raise RequestError(
            f"{where}.data", f"has {a.size} values, but shape {list(shape)} needs {n}"
        )
    a = a.astype(np.float64).reshape(shape)
    if not np.isfinite(a).all() or (a.size and np.abs(a).max() > F32_MAX):
        raise RequestError(
            f"{where}.data", f"values must be finite FP32 (|value| <= {F32_MAX:.4g})"
        )
    return a.astype(np.float32), 0


def decode(
    raw: bytes, header_length: str | None, runtime: Runtime
) -> tuple[dict[str, np.ndarray], list[tuple[str, bool]], Any]:
    """An infer request's body -> (tensors by name, the outputs to answer with whether each is
    binary, the request's id or None). Checks names, datatypes, shapes and the batch limit;
    the values are checked as /simulate's (`scenarios`)."""
    req, binary = _split(raw, header_length)
    if not isinstance(req, dict):
        raise RequestError("body", "must be a JSON object with `inputs`")
    given = req.get("inputs")
    if not isinstance(given, list) or not given:
        raise RequestError("inputs", f"must be a non-empty list of tensors ({', '.join(INPUTS)})")
    card, view, at = runtime.card, memoryview(binary), 0
    shapes = {t["name"]: t["shape"] for t in tensors(card)["inputs"]}
    got: dict[str, np.ndarray] = {}
    for i, t in enumerate(given):
        name = _named(t, i, "input", INPUTS)
        where = f"inputs.{name}"
        if name in got:
            raise RequestError(where, "given twice")
        if t.get("datatype") != "FP32":
            raise RequestError(
                f"{where}.datatype",
                f"must be FP32 (this model computes in float32), got {t.get('datatype')!r}",
            )
        shape, want = _shape(t, where), shapes[name]
        if len(shape) != len(want) or any(w != -1 and d != w for d, w in zip(shape, want)):
            shown = ", ".join(
                "B" if k == 0 else ("T" if w == -1 else str(w)) for k, w in enumerate(want)
            )
            raise RequestError(where, f"shape {list(shape)} does not match [{shown}]")
        got[name], used = _values(t, shape, view, at, where)
        at += used
    if at != len(binary):
        raise RequestError(
            "body",
            f"the binary part has {len(binary)} bytes, the inputs' binary_data_size add up to {at}",
        )
    missing = [n for n in ("u", "p") if n not in got]
    if missing:
        raise RequestError("inputs", f"missing {', '.join(missing)}; required: u, p (x0 optional)")
    sizes = {n: a.shape[0] for n, a in got.items()}
    if len(set(sizes.values())) > 1:
        raise RequestError("inputs", f"the batch dimension B differs between the tensors: {sizes}")
    b, steps = sizes["p"], got["u"].shape[1] - 1
    if b < 1:
        raise RequestError("inputs.p", "B must be at least 1 scenario")
    if b > runtime.max_scenarios:
        raise RequestError(
            "inputs.p",
            f"B = {b} scenarios exceed the limit of {runtime.max_scenarios} per request",
        )
    if steps < 1:
        raise RequestError("inputs.u", "T must be at least 2 time points (one step)")
    if steps > runtime.max_steps or (card.time.fixed_steps and steps != card.time.max_steps):
        limit = (
            f"this emulator answers on its training grid only: T = {card.time.max_steps + 1}"
            if card.time.fixed_steps
            else f"T <= {runtime.max_steps + 1} points ({runtime.max_steps} steps of dt = "
            f"{card.time.dt:g})"
        )
        raise RequestError("inputs.u", f"T = {steps + 1} time points; {limit}")
    return got, _outputs(req), req.get("id")


def _outputs(req: dict[str, Any]) -> list[tuple[str, bool]]:
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("parameters", "must be an object")
    default = params.get("binary_data_output", False) is True
    asked = req.get("outputs")
    if asked is None:
        return [(name, default) for name in OUTPUTS]
    if not isinstance(asked, list):
        raise RequestError("outputs", f"must be a list of outputs ({', '.join(OUTPUTS)})")
    out = []
    for i, o in enumerate(asked):
        name = _named(o, i, "output", OUTPUTS)
        binary = (o.get("parameters") or {}).get("binary_data", default)
        out.append((name, binary is True))
    return out


def scenarios(card: ModelCard, got: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The tensors as /simulate's scenarios, for its checks: one per batch row."""
    s = card.system
    n = got["u"].shape[1]
    t_end = (n - 1) * card.time.dt
    x0, u, p = got.get("x0"), got["u"], got["p"]
    out = []
    for b in range(p.shape[0]):
        sc: dict[str, Any] = {
            "parameters": dict(zip(s.parameter_names, p[b].tolist())),
            "t_end": t_end,
            "inputs": {name: u[b, :, j].tolist() for j, name in enumerate(s.input_names)},
        }
        if x0 is not None:
            sc["initial_state"] = dict(zip(s.state_names, x0[b].tolist()))
        out.append(sc)
    return out


_WHERE = re.compile(
    r"^scenarios\[(\d+)\](?:\.(parameters|initial_state|inputs)\.([^.\[\]]+)(?:\[(\d+)\])?)?$"
)


def translated(e: RequestError, card: ModelCard) -> RequestError:
    """A check's error on the scenarios built from the tensors, spoken of the tensors: the
    tensor, its batch row and the element (with its name)."""
    message = str(e)[len(e.field) + 2 :] if str(e).startswith(f"{e.field}: ") else str(e)
    m = _WHERE.match(e.field or "")
    if m is None:
        return type(e)("inputs", message)
    b, part, name, k = m.groups()
    s = card.system
    if part is None:  # the scenario as a whole (strict mode: outside the training domain)
        return type(e)("inputs", f"batch row {b}: {message}")
    tensor, what, names = {
        "parameters": ("p", "parameter", s.parameter_names),
        "initial_state": ("x0", "state", s.state_names),
        "inputs": ("u", "input", s.input_names),
    }[part]
    j = names.index(name) if name in names else "?"
    element = f"u[{b}, {':' if k is None else k}, {j}]" if tensor == "u" else f"{tensor}[{b}, {j}]"
    field = f"inputs.{tensor}[{b}]"
    return type(e)(field, f"{what} {name} ({element}): {message}")


# ---- answers -------------------------------------------------------------------------------------
def encode(
    card: ModelCard,
    parsed: list[ParsedScenario],
    rolled: list[Rollout],
    outputs: list[tuple[str, bool]],
    request_id: Any,
) -> Response:
    """The infer answer: JSON, or JSON + the binary tensors when any output is asked binary."""
    arrays = {
        "mean": lambda: np.stack([r.mean for r in rolled]).astype(np.float32),
        "std": lambda: np.stack([r.std for r in rolled]).astype(np.float32),
        "members": lambda: np.stack([r.members for r in rolled], axis=1).astype(np.float32),
        "in_domain": lambda: np.array([s.in_domain for s in parsed], dtype=bool),
    }
    head: dict[str, Any] = {"model_name": card.name, "model_version": card.version}
    if isinstance(request_id, str):
        head["id"] = request_id
    head["outputs"], blobs = [], []
    for name, binary in outputs:
        a = arrays[name]()
        t: dict[str, Any] = {
            "name": name,
            "datatype": "BOOL" if a.dtype == bool else "FP32",
            "shape": list(a.shape),
        }
        if binary:
            blob = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:  # JSON has no NaN or inf: a model far outside its domain writes them as Python does
            t["data"] = a.reshape(-1).tolist()
        head["outputs"].append(t)
    body = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return Response(body, media_type="application/json")
    return Response(
        b"".join([body, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(body))},
    )


# ---- the app -------------------------------------------------------------------------------------
def app(card: ModelCard | None, backend: Callable[[], Backend]) -> Starlette:
    """The v2 routes for `card`'s model (mounted at /v2); `backend()` gives the running
    service."""

    def served(request: Request) -> None:
        name, version = request.path_params["name"], request.path_params.get("version")
        if card is None or name != card.name:
            here = f"; this server serves {card.name!r}" if card is not None else ""
            raise NotFound("model_name", f"no model {name!r} here{here}")
        if version is not None and version != card.version:
            raise NotFound(
                "model_version",
                f"model {name!r} has no version {version!r} here; served: {card.version!r}",
            )

    def refused(e: RequestError) -> Response:
        status = 404 if isinstance(e, NotFound) else 413 if isinstance(e, RequestTooLarge) else 400
        return errors.response(status, str(e), e.field)

    async def server(request: Request) -> Response:
        return JSONResponse(
            {"name": "twin_ml", "version": "2", "extensions": ["binary_tensor_data"]}
        )

    async def health(request: Request) -> Response:
        return JSONResponse({request.url.path.rsplit("/", 1)[-1]: True})

    async def model(request: Request) -> Response:
        try:
            served(request)
        except RequestError as e:
            return refused(e)
        return JSONResponse(metadata(card))

    async def ready(request: Request) -> Response:
        try:
            served(request)
        except RequestError as e:
            return refused(e)
        return JSONResponse({"name": card.name, "ready": True})

    async def infer(request: Request) -> Response:
        svc = backend()
        try:
            served(request)
            raw = await request.body()
            got, outputs, request_id = decode(raw, request.headers.get(HEADER_LENGTH), svc.runtime)
            try:
                parsed = svc.runtime.parse_request(scenarios(card, got))
            except RequestError as e:
                raise translated(e, card) from None
        except RequestError as e:
            return refused(e)
        rolled = await svc.rollouts(parsed)
        return encode(card, parsed, rolled, outputs, request_id)

    base = "/models/{name}"
    routes = [
        Route("/", server, methods=["GET"]),
        Route("/health/live", health, methods=["GET"]),
        Route("/health/ready", health, methods=["GET"]),
    ]
    for prefix in (base, base + "/versions/{version}"):
        routes += [
            Route(prefix, model, methods=["GET"]),
            Route(prefix + "/ready", ready, methods=["GET"]),
            Route(prefix + "/infer", infer, methods=["POST"]),
        ]
    return Starlette(routes=routes)
