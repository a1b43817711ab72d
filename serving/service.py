"""The BentoML scenario-inference service (issue #5, first cut): POST /simulate, GET /model.

    TWIN_ML_MODEL=pendulum_node:production bentoml serve serving.service:TwinService --host 127.0.0.1
    twin-serve model=pendulum_node:production [port=3000]

The model comes from the store (BENTOML_HOME) as NAME:VERSION, NAME:latest or NAME:<stage>; it is
hash-verified before onnxruntime opens it. The request and answer schemas are built from its
manifest at import, so /docs.json documents this model's own names, units and ranges, with an
example request it answers. Never imports torch or lightning.
"""

from __future__ import annotations

import hmac
import json
import math
import os
from typing import Any, Union

import bentoml
from bentoml.exceptions import InvalidArgument
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.runtime import RequestError, Runtime
from serving.schemas import build_models
from twin_ml import registry

MODEL_ENV = "TWIN_ML_MODEL"
TOKEN_ENV = "TWIN_ML_TOKEN"  # when set: bearer token for /simulate, /calibrate and /model
MAX_BODY_ENV = "TWIN_ML_MAX_BODY_BYTES"
PROTECTED = ("/simulate", "/calibrate", "/model")


class Guard:
    """ASGI middleware in front of the APIs: optional bearer-token auth (constant-time compare,
    never logged), a request-body size limit (413), and no pickle bodies (415). Health, readiness
    and metrics stay open."""

    def __init__(self, app, token: str | None = None, max_body: int = 8 << 20):
        self.app, self.token, self.max_body = app, (token or "").encode(), max_body

    async def _reply(self, send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.token and path.startswith(PROTECTED):
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, b"Bearer " + self.token):
                return await self._reply(send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        if b"pickle" in headers.get(b"content-type", b""):
            return await self._reply(send, 415, "pickle bodies are not accepted; send application/json")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._reply(send, 413, f"request body over the limit of {self.max_body} bytes")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reply(send, 413, f"request body over the limit of {self.max_body} bytes")


class _TooLarge(Exception):
    pass


def _load() -> tuple[Any, dict[str, Any]]:
    ref = os.environ.get(MODEL_ENV)
    if not ref:
        return None, {}
    return registry.onnx_path(ref)  # verified before any InferenceSession exists


ONNX_PATH, MANIFEST = _load()
if MANIFEST:
    Scenario, Answer = build_models(MANIFEST)
else:  # imported without a model (tools, tests): untyped placeholders
    Scenario, Answer = dict[str, Any], dict[str, Any]


async def _model_route(request: Request) -> JSONResponse:
    return JSONResponse(MANIFEST)


manifest_app = Starlette(routes=[Route("/", _model_route, methods=["GET"])])


def _finite(obj: Any) -> Any:
    """JSON has no NaN / inf: None in their place (the answer's warnings say why)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj


@bentoml.asgi_app(manifest_app, path="/model")
@bentoml.service(name="twin_ml", traffic={"timeout": 30, "max_concurrency": 64}, http={"host": "127.0.0.1"})
class TwinService:
    def __init__(self) -> None:
        if not MANIFEST:
            raise RuntimeError(f"set {MODEL_ENV} to the model to serve (NAME:VERSION, NAME:latest or NAME:production)")
        self.runtime = Runtime(ONNX_PATH, MANIFEST, threads=int(os.environ.get("TWIN_ML_THREADS", "1")))

    @bentoml.api(route="/simulate")
    def simulate(self, scenarios: Union[list[Scenario], Scenario]) -> list[Answer]:  # type: ignore[valid-type]
        """Trajectories with calibrated uncertainty: per output and step the ensemble mean, std and
        the requested quantiles, plus an in-domain flag with reasons (see serving/runtime.py)."""
        items = scenarios if isinstance(scenarios, list) else [scenarios]
        plain = [s.model_dump(exclude_none=True) if hasattr(s, "model_dump") else s for s in items]
        try:
            return _finite(self.runtime.simulate(plain))
        except RequestError as e:
            raise InvalidArgument(str(e)) from None


TwinService.add_asgi_middleware(Guard, token=os.environ.get(TOKEN_ENV),
                                max_body=int(os.environ.get(MAX_BODY_ENV, str(8 << 20))))
