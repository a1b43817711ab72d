"""The BentoML scenario-inference service (issue #5, first cut): POST /simulate, GET /model.

    TWIN_ML_MODEL=pendulum_node:production bentoml serve serving.service:TwinService --host 127.0.0.1

The model comes from the store (BENTOML_HOME) as NAME:VERSION, NAME:latest or NAME:<stage>; it is
hash-verified before onnxruntime opens it. Never imports torch or lightning.
"""

from __future__ import annotations

import math
import os
from typing import Any

import bentoml
from bentoml.exceptions import InvalidArgument
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.runtime import RequestError, Runtime
from twin_ml import registry

MODEL_ENV = "TWIN_ML_MODEL"

_manifest: dict[str, Any] = {}


async def _model_route(request: Request) -> JSONResponse:
    return JSONResponse(_manifest)


manifest_app = Starlette(routes=[Route("/", _model_route, methods=["GET"])])


def _finite(obj: Any) -> Any:
    """JSON has no NaN / inf: None in their place (a warning says why)."""
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
        ref = os.environ.get(MODEL_ENV)
        if not ref:
            raise RuntimeError(f"set {MODEL_ENV} to the model to serve (NAME:VERSION, NAME:latest or NAME:production)")
        path, manifest = registry.onnx_path(ref)  # verified before any InferenceSession exists
        _manifest.clear()
        _manifest.update(manifest)
        self.runtime = Runtime(path, manifest, threads=int(os.environ.get("TWIN_ML_THREADS", "1")))

    @bentoml.api(route="/simulate")
    def simulate(self, scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Trajectories with calibrated uncertainty for each scenario (see serving/runtime.py)."""
        try:
            return _finite(self.runtime.simulate(scenarios))
        except RequestError as e:
            raise InvalidArgument(str(e)) from None
