"""The BentoML scenario-inference service (issue #5, first cut): POST /simulate, GET /model.

    TWIN_ML_MODEL=pendulum_node:production bentoml serve serving.service:TwinService --host 127.0.0.1
    twin-serve model=pendulum_node:production [port=3000]

The model comes from the store (BENTOML_HOME) as NAME:VERSION, NAME:latest or NAME:<stage>; it is
hash-verified before onnxruntime opens it. The request and answer schemas are built from its
manifest at import, so /docs.json documents this model's own names, units and ranges, with an
example request it answers. Never imports torch or lightning.
"""

from __future__ import annotations

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
