"""One shape for every error answer, and the OpenAPI document that declares it.

Every 4xx/5xx body the service writes is `{"error": "<field>: <what is wrong>", "detail": [{"loc":
[...], "msg": ..., "type": ...}]}`: `error` names the first problem, `detail` lists each problem
with its location in the request (`loc`, as pydantic gives it: names and list indices). The 400s
come from two places: the request checks (twin_ml/contract/requests.py, a `RequestError` naming
its field) and BentoML's own pydantic validation of the body, whose answer (`"N validation error
for Input"`, or a one-element list for a BentoML exception) the `Guard` middleware rewrites to
this shape. `openapi` makes /docs.json say so, with the statuses the service really answers.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from starlette.responses import Response

_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def loc(field: str | None) -> list[str | int]:
    """'scenarios[0].inputs.pump' -> ['scenarios', 0, 'inputs', 'pump']."""
    if not field:
        return []
    return [name if name else int(index) for name, index in _PART.findall(field)]


def dotted(parts: list[Any]) -> str:
    """['scenarios', 0, 'inputs', 'pump'] -> 'scenarios[0].inputs.pump' (the checks' spelling)."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def body(message: str, field: str | None = None, kind: str = "value_error") -> dict[str, Any]:
    msg = message
    if field and message.startswith(f"{field}: "):
        msg = message[len(field) + 2 :]
    return {"error": message, "detail": [{"loc": loc(field), "msg": msg, "type": kind}]}


def encoded(status: int, message: str, field: str | None = None) -> bytes:
    """An error answer's body as JSON bytes."""
    kind = {413: "too_large", 503: "unavailable"}.get(status, "value_error")
    return json.dumps(body(message, field, kind)).encode()


def response(status: int, message: str, field: str | None = None) -> Response:
    return Response(
        encoded(status, message, field), status_code=status, media_type="application/json"
    )


def from_validation(exc: Any) -> bytes:
    """A pydantic ValidationError of a request body as the 400 body: what BentoML answers for it
    (`"N validation error for Input"` and pydantic's errors, without inputs or context), in the
    one shape, as `normalized` gives it."""
    raw = json.dumps(
        {
            "error": f"{exc.error_count()} validation error for {exc.title}",
            "detail": exc.errors(include_context=False, include_input=False),
        },
        default=str,
    ).encode()
    return normalized(400, raw) or raw


def normalized(status: int, raw: bytes) -> bytes | None:
    """BentoML's own error bodies in the one shape (None: already in it, or not JSON)."""
    try:
        got = json.loads(raw)
    except ValueError:
        return None
    if isinstance(got, list) and len(got) == 1 and isinstance(got[0], dict):
        got = got[0]  # BentoML 1.4 writes a 4xx BentoMLException as a one-element list
    if not isinstance(got, dict) or not isinstance(got.get("error"), str):
        return None
    detail = got.get("detail")
    if isinstance(detail, list) and all(isinstance(d, dict) and "msg" in d for d in detail):
        if not detail:
            return None
        items = [
            {"loc": list(d.get("loc") or []), "msg": str(d["msg"]), "type": str(d.get("type", ""))}
            for d in detail
        ]
        first = items[0]
        message = f"{dotted(first['loc'])}: {first['msg']}"
        if len(items) > 1:
            message += f" (and {len(items) - 1} more: see detail)"
        if items == detail and got["error"] == message:
            return None
        return json.dumps({"error": message, "detail": items}).encode()
    if detail is None or isinstance(detail, str):
        return json.dumps(body(got["error"] + (f": {detail}" if detail else ""))).encode()
    return None


# ---- the OpenAPI document ------------------------------------------------------------------------
DETAIL = {
    "type": "array",
    "description": "every problem found, with where it is in the request",
    "items": {
        "type": "object",
        "required": ["loc", "msg", "type"],
        "properties": {
            "loc": {
                "type": "array",
                "description": "the path in the request body: names and list indices",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            },
            "msg": {"type": "string"},
            "type": {"type": "string"},
        },
    },
}
INVALID = {
    "type": "object",
    "title": "InvalidArgument",
    "description": "a request the model cannot answer: `error` names the first offending field "
    "and says what is allowed; `detail` lists every problem",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "detail": DETAIL},
}
ERROR = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "detail": DETAIL},
}
_STATUSES = {
    "400": ("Bad Request: the body breaks the schema or a check", "InvalidArgument"),
    "413": ("Payload Too Large: over the body limit, or an answer over a size limit", "Error"),
    "415": ("Unsupported Media Type: only application/json bodies", "Error"),
    "429": ("Too Many Requests: over the server's max_concurrency", "Error"),
    "500": ("Internal Server Error", "Error"),
    "504": ("Gateway Timeout: not answered within the server's timeout", "Error"),
}


def _draft4(node: Any) -> Any:
    """pydantic writes exclusive bounds as numbers (JSON Schema 2020-12); the document is
    OpenAPI 3.0, where they are flags beside minimum / maximum (draft 4)."""
    if isinstance(node, dict):
        for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            value = node.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                node[bound], node[key] = value, True
        for value in node.values():
            _draft4(value)
    elif isinstance(node, list):
        for value in node:
            _draft4(value)
    return node


def openapi(
    doc: dict[str, Any],
    *,
    token: bool,
    examples: dict[str, Any],
    bodies: dict[str, dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """BentoML's /docs.json, made exact: the error answers as they are written (one shape), every
    status the service answers, the request body required, an example request body per API
    (`examples`: route -> body), the rules of a request body as a whole (`bodies`: route ->
    keywords such as an anyOf of required fields, which BentoML's document of a signature cannot
    hold), and exclusive bounds as OpenAPI 3.0 spells them. BentoML's 404 is dropped (its APIs
    have no path parameters)."""
    doc = _draft4(copy.deepcopy(doc))
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(name, None)
    schemas["InvalidArgument"], schemas["Error"] = INVALID, ERROR
    for route, ops in doc.get("paths", {}).items():
        for op in ops.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            # BentoML keys some statuses by number: one key per status, as JSON writes it
            responses = op["responses"] = {str(int(k)): v for k, v in op["responses"].items()}
            responses.pop("404", None)
            if route in examples:  # the APIs
                statuses = dict(_STATUSES)
                if route == "/calibrate":
                    statuses["503"] = ("Service Unavailable: no physics solver here", "Error")
                if token:
                    statuses["401"] = ("Unauthorized: missing or wrong bearer token", "Error")
                for code, (text, schema) in statuses.items():
                    responses[code] = {
                        "description": text,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": f"#/components/schemas/{schema}"}
                            }
                        },
                    }
                if "requestBody" in op:  # every API reads a JSON body: none is a 400
                    op["requestBody"]["required"] = True
                media = op.get("requestBody", {}).get("content", {}).get("application/json")
                if media is not None and examples[route] is not None:
                    media["example"] = examples[route]
                if media is not None and (bodies or {}).get(route):
                    media["schema"].update(copy.deepcopy(bodies[route]))
            elif "500" in responses:
                responses["500"]["content"] = {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                }
    return doc
