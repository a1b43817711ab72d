"""The BentoML scenario-inference service: POST /simulate, POST /calibrate, GET /model.

    TWIN_ML_MODEL=pendulum_node:production \
        bentoml serve serving.service:TwinService --host 127.0.0.1
    twin-serve model=pendulum_node:production [port=3000]
    twin-models bento pendulum_node:production && bentoml serve pendulum_node:latest

The model comes from the store (BENTOML_HOME) as NAME:VERSION, NAME:latest or NAME:<stage>; its
bytes are read once at import and hash-verified, and every onnxruntime session (the runtime's,
each calibration's) opens those bytes, never the file: a model file replaced or truncated while
the server runs changes nothing it answers (a restart refuses it). The request and answer
schemas are built from its manifest at import, so /docs.json documents this model's own names,
units and ranges, with an example request it answers. Never imports torch or lightning.

A Bento (bentofile.yaml) carries its model: built with BentoML's argument `model=NAME:VERSION`
(`bentoml build --arg model=...`, or `twin-models bento NAME:REF`), the service declares that
model (`bentoml.models.BentoModel`), so the build packs it, and BentoML hands the argument back
when it serves the Bento: `bentoml serve <bento>` needs no TWIN_ML_MODEL, and reads and verifies
the model the Bento carries (a container: the Bento's own model store) as above.

Requests are validated on the event loop (a bad one gets its own 400), then join the adaptive
batcher (serving/batching.py): one worker thread runs onnxruntime on everything queued, scenarios
of different horizons padded and masked (serving/runtime.py `plan`). Settings come from the
environment (twin-serve sets them): TWIN_ML_MODEL, TWIN_ML_THREADS, TWIN_ML_STRICT,
TWIN_ML_BATCHING, TWIN_ML_MAX_BATCH, TWIN_ML_MAX_SCENARIOS, TWIN_ML_MAX_STEPS,
TWIN_ML_MAX_CONCURRENCY, TWIN_ML_TIMEOUT, TWIN_ML_WORKERS, TWIN_ML_ACCESS_LOG, TWIN_ML_METRICS,
TWIN_ML_TRACING, TWIN_ML_HOT_PATH, TWIN_ML_TOKEN, TWIN_ML_MAX_BODY_BYTES, TWIN_ML_MAX_FIELD_VALUES
(a reduced model's decoded fields per request), TWIN_ML_TWINS_STORE (the live twins' store: a
SQLAlchemy URL or a SQLite file; default <BENTOML_HOME>/twin-ml/twins.sqlite) and
TWIN_ML_MAX_TWINS (twins in that store).

Live twin sessions (/twins, serving/twins.py) are a Starlette app mounted on the service like the
v2 protocol's: inside BentoML's middlewares (timeout, concurrency limit, metrics, access log) and
the `Guard`, so those hold for them as for /simulate. BentoML's request metrics label a request
by its path: /twins/<id>/... is counted as /twins/{id}/... (`_MetricsMiddleware`), one series
per route instead of one per twin.

Custom Prometheus metrics at /metrics, beside BentoML's own: twin_ml_requests_total and
twin_ml_scenarios_total by in-domain status, twin_ml_predicted_std (histogram of each answered
scenario's mean predicted std, per output), twin_ml_batch_scenarios (scenarios per model call) and
twin_ml_calibrations_total by outcome (ok, invalid, error; cancelled: a /calibrate that timed out
(or whose wait failed otherwise), disconnected: one whose client went away; either stops at its
next model call, or never starts if it was still queued).
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import bentoml
import numpy as np
import orjson
from bentoml._internal.server.http import instruments as _instruments  # BentoML's internals
from bentoml._internal.server.http import traffic as _traffic  # (pinned)
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving import errors, twins, v2
from serving.batching import Batcher
from serving.runtime import Rollout, Runtime
from serving.schemas import (
    F32_MAX,
    TelemetryObservations,
    build_models,
    calibration_schemas,
    example_scenario,
)
from twin_ml import registry
from twin_ml.calibrate import (
    CalibrationResult,
    Problem,
    SolverBackend,
    SurrogateBackend,
    calibrate,
)
from twin_ml.calibrate.fit import MCMC_DEFAULTS, NOISE_MODELS
from twin_ml.calibrate.problem import observations_from_telemetry
from twin_ml.contract import ModelCard, RequestError, RequestTooLarge
from twin_ml.contract import Scenario as ParsedScenario

log = logging.getLogger("twin_ml.service")
MODEL_ENV = "TWIN_ML_MODEL"
BENTO_ARG = "model"  # the Bento build argument naming the model it carries (`_bento_model`)
TOKEN_ENV = (
    "TWIN_ML_TOKEN"  # when set: bearer token for every path but health, readiness and metrics
)
MAX_BODY_ENV = "TWIN_ML_MAX_BODY_BYTES"
# never behind the token: health, readiness (BentoML's and the v2 protocol's) and metrics
OPEN = frozenset(
    {"/healthz", "/livez", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
)
V2_MEDIA = (b"application/octet-stream",)  # the v2 binary tensor extension's bodies
DISCONNECT_POLL_S = 0.5  # how often a waiting /calibrate checks that its client is still connected


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _env_flag(name: str, default: bool) -> bool:
    return (os.environ.get(name) or ("1" if default else "0")).lower() in ("1", "true", "yes", "on")


async def _send_json(send, status: int, body: bytes) -> None:
    """A whole JSON answer on an ASGI `send`."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware in front of the APIs: optional bearer-token auth (constant-time compare,
    never logged), a request-body size limit (413), JSON bodies only (415: pickle, multipart and
    every other media type; a body without a Content-Type is read as JSON; /v2 also takes
    application/octet-stream, the binary tensor extension's bodies), every error answer in
    one shape (serving/errors.py: BentoML's own 400s rewritten), and /docs.json made exact
    (`docs`: a callable giving the document). Health, readiness and metrics stay open.

    `hot`: an ASGI app that answers POST /simulate itself (the lean route, `_hot_simulate`),
    after every check above; None: BentoML's API machinery answers it. BentoML's own middlewares
    (request timeout, concurrency limit, metrics, access log, tracing) sit outside this one, so
    they hold for the lean route as for every other."""

    def __init__(self, app, token: str | None = None, max_body: int = 8 << 20, docs=None, hot=None):
        self.app, self.token, self.max_body = app, (token or "").encode(), max_body
        self.docs, self._docs_body, self.hot = docs, None, hot

    async def _reply(self, send, status: int, message: str, field: str | None = None) -> None:
        await _send_json(send, status, json.dumps(errors.body(message, field)).encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in ("/model", "/v2", "/twins"):  # apps mounted at /model/ ...: no redirect
            scope = {**scope, "path": path + "/", "raw_path": path.encode() + b"/"}
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if (
            self.token and path not in OPEN
        ):  # the APIs, /model, and /docs.json with the model's names
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, b"Bearer " + self.token):
                return await self._reply(
                    send, 401, "missing or wrong bearer token (Authorization: Bearer <token>)"
                )
        if path == "/docs.json" and self.docs is not None and scope.get("method") == "GET":
            if self._docs_body is None:
                self._docs_body = json.dumps(self.docs()).encode()
            return await _send_json(send, 200, self._docs_body)
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if b"pickle" in media:
            return await self._reply(
                send, 415, "pickle bodies are not accepted; send application/json", "content-type"
            )
        allowed = (b"", b"application/json", *(V2_MEDIA if path.startswith("/v2/") else ()))
        if media not in allowed and scope.get("method") not in ("GET", "HEAD"):
            shown = media.decode("latin-1")[:80]
            also = " (or application/octet-stream)" if path.startswith("/v2/") else ""
            return await self._reply(
                send,
                415,
                f"{shown} bodies are not accepted; send application/json{also}",
                "content-type",
            )
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._reply(
                send, 413, f"request body over the limit of {self.max_body} bytes"
            )
        seen, refused = 0, False

        async def limited():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # a chunked body with no Content-Length: answer here, once
                    refused = True
                    await self._reply(
                        send, 413, f"request body over the limit of {self.max_body} bytes"
                    )
                    return {"type": "http.disconnect"}
            return message

        held: dict[str, Any] = {}  # an error answer's start, held until its body is rewritten

        async def guarded_send(message):
            if refused:  # after a 413, whatever the app still says is dropped
                return
            if message["type"] == "http.response.start" and message["status"] >= 400:
                kind = dict(message.get("headers", [])).get(b"content-type", b"")
                if kind.startswith(b"application/json"):
                    held.update(start=message, body=b"")
                    return
            if message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start, body = held.pop("start"), held.pop("body")
                body = errors.normalized(start["status"], body) or body
                headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                await send(
                    {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
                )
                return await send({"type": "http.response.body", "body": body})
            await send(message)

        if self.hot is not None and path == "/simulate" and scope.get("method") == "POST":
            return await self.hot(scope, limited, guarded_send)
        await self.app(scope, limited, guarded_send)


class _TimeoutMiddleware(_traffic.TimeoutMiddleware):
    """BentoML's request timeout (504 when no answer has started after `timeout` seconds), with
    its timer cancelled once the request is done. BentoML 1.4's own schedules one timer per
    request and never cancels it: the timer held the request's context (its tracing span and
    more, ~5 KB) on the event loop for the whole timeout after the answer, so a busy server's
    memory grew with rate x timeout (+23% in a 2-minute soak at ~150 requests/s,
    benchmarks/soak.py). BentoML builds its middleware stack from `traffic.TimeoutMiddleware` in
    each worker, after this module is imported: replacing that name there is enough."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        # an empty context: the timer needs none, and must not keep the request's alive
        timer = loop.call_later(
            self.timeout, self._set_timer_out, waiter, context=contextvars.Context()
        )

        async def _send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send))
        try:
            await waiter
        except TimeoutError:
            if fut.cancel():
                message = f"Not able to process the request in {self.timeout} seconds"
                await JSONResponse(errors.body(message), status_code=504)(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()


_traffic.TimeoutMiddleware = _TimeoutMiddleware


class _RealPath:
    """Gives the app behind `_MetricsMiddleware` the request's own path back."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if "twin_ml.path" in scope:
            scope = {**scope, "path": scope["twin_ml.path"]}
        await self.app(scope, receive, send)


class _MetricsMiddleware(_instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's request metrics, labelled by route for the twins: BentoML labels a request by its
    path, so every twin id would add its own series to /metrics (and keep them after the twin is
    deleted). The metrics see /twins/{id}/...; everything behind them, the access log included,
    the real path. BentoML builds its middleware stack from `instruments.RunnerTrafficMetrics
    Middleware` in each worker, after this module is imported: replacing that name is enough."""

    def __init__(self, app, *args, **kwargs):
        super().__init__(_RealPath(app), *args, **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            label = twins.metrics_path(scope.get("path", ""))
            if label is not None:
                scope = {**scope, "path": label, "twin_ml.path": scope["path"]}
        await super().__call__(scope, receive, send)


_instruments.RunnerTrafficMetricsMiddleware = _MetricsMiddleware


def _default_twins_store() -> str:
    """<BENTOML_HOME>/twin-ml/twins.sqlite: beside the model store the server reads."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return str(Path(BentoMLContainer.bentoml_home.get()) / "twin-ml" / "twins.sqlite")


def _bento_model() -> str | None:
    """The model a Bento carries: BentoML's build argument `model` (`bentoml build --arg
    model=NAME:VERSION`, or `twin-models bento`), kept in the Bento and set again by BentoML when
    it serves the Bento. One stored version, never NAME:latest or NAME:<stage>: those move, and
    the Bento's own model store (a container's) holds the one version it was built with."""
    ref = vars(bentoml.use_arguments()).get(BENTO_ARG)
    if ref is None:
        return None
    name, _, version = str(ref).partition(":")
    if not name or not version or version == "latest" or version in registry.STAGES:
        raise RuntimeError(
            f"--arg {BENTO_ARG}={ref!r}: a Bento carries one stored version, NAME:VERSION "
            f"(not NAME:latest or NAME:<stage>; `twin-models bento {name or 'NAME'}:<stage>` "
            "resolves a stage and builds)"
        )
    env = os.environ.get(MODEL_ENV)
    if env and env != ref:
        raise RuntimeError(
            f"{MODEL_ENV}={env!r} names another model than this Bento's {BENTO_ARG}={ref!r}: "
            f"a Bento serves the model it carries; unset {MODEL_ENV}"
        )
    return str(ref)


BENTO_MODEL = _bento_model()


def _load() -> tuple[bytes, ModelCard | None]:
    ref = BENTO_MODEL or os.environ.get(MODEL_ENV)
    if not ref:
        return b"", None
    # the very bytes whose sha256 was checked: reopening the file later would use whatever is
    # on disk by then (a replaced model answering under the verified one's name, or a truncated one)
    return registry.onnx_bytes(ref)


ONNX_BYTES, CARD = _load()
MAX_SCENARIOS = _env_int("TWIN_ML_MAX_SCENARIOS", 256)
MAX_STEPS = _env_int("TWIN_ML_MAX_STEPS", 0) or None
if CARD is not None:
    Scenarios, Scenario, Answer = build_models(
        CARD, max_scenarios=MAX_SCENARIOS, max_steps=MAX_STEPS
    )
else:  # imported without a model (tools, tests): untyped placeholders
    Scenarios, Scenario, Answer = list[dict[str, Any]], dict[str, Any], dict[str, Any]


async def _model_route(request: Request) -> JSONResponse:
    return JSONResponse(CARD.to_json(store=True) if CARD is not None else {})


manifest_app = Starlette(routes=[Route("/", _model_route, methods=["GET"])])
# the Open Inference Protocol (serving/v2.py) on the running service's runtime and batcher
v2_app = v2.app(CARD, bentoml.get_current_service)
# live twin sessions on the running service's model (serving/twins.py)
twins_app = twins.app(lambda: bentoml.get_current_service().twins)


FIT_SCHEMA: dict[str, Any] = {  # what Problem.build checks of `fit`, declared
    "minItems": 1,
    "uniqueItems": True,
    "items": {
        "type": "string",
        **(
            {"enum": CARD.system.parameter_names + [f"state:{s}" for s in CARD.system.state_names]}
            if CARD is not None
            else {}
        ),
    },
    "description": "the names to fit: parameters, or initial states as state:<name>",
}
# what Problem.build checks of the other fields, declared (serving/schemas.py), and the model of
# `telemetry` with this model's names
CALIBRATION: dict[str, Any] = calibration_schemas(CARD) if CARD is not None else {}
Telemetry = CALIBRATION.get("telemetry", TelemetryObservations)


# a JSON number, and a JSON integer: pydantic's lax mode also takes true/false and "1.5" for them,
# which the schema's `type: number` / `type: integer` refuses
Num = Annotated[float, Strict()]
Int = Annotated[int, Strict()]


def _refused(ctx: bentoml.Context | None, status: int, message: str, field: str | None = None):
    """An error answer of an API with a context: BentoML sets the answer's status from the
    context's, so both are set."""
    if ctx is not None:
        ctx.response.status_code = status
    return errors.response(status, message, field)


class MCMC(BaseModel):
    """Posterior sampling with emcee on the surrogate (opt-in: no `mcmc`, no MCMC). The defaults
    are twin-calibrate's (twin_ml.calibrate.fit.MCMC_DEFAULTS)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
    steps: int = Field(
        MCMC_DEFAULTS["steps"], ge=20, le=5000, description="steps per walker, at most"
    )
    burn: int = Field(
        MCMC_DEFAULTS["burn"],
        ge=0,
        le=4980,
        description="steps discarded first; they leave at least 20 (steps - burn >= 20)",
    )
    walkers: int = Field(MCMC_DEFAULTS["walkers"], ge=4, le=128)
    noise_model: Literal[NOISE_MODELS] = Field(  # type: ignore[valid-type]
        MCMC_DEFAULTS["noise_model"],
        description="the likelihood: ar1 (AR(1) correlated residuals per output) or white "
        "(independent points)",
    )
    max_seconds: float | None = Field(
        MCMC_DEFAULTS["max_seconds"],
        gt=0,
        description="wall-time budget of the sampling in seconds (null: none; the server's "
        "timeout still ends the request)",
    )

    @model_validator(mode="after")
    def _enough_kept(self) -> MCMC:
        if self.steps - self.burn < 20:
            raise ValueError(
                f"mcmc.burn must leave at least 20 steps (steps={self.steps}, burn={self.burn})"
            )
        return self


_METRICS: dict[str, Any] = {}


def _metrics() -> dict[str, Any]:
    """Created on first use, in the worker (prometheus_client must see BentoML's multiprocess
    directory, which is set after this module is imported)."""
    if not _METRICS:
        import prometheus_client as prom

        _METRICS.update(
            requests=prom.Counter(
                "twin_ml_requests",
                "Answered /simulate requests; in_domain=false when any "
                "scenario left the training domain",
                ["in_domain"],
            ),
            scenarios=prom.Counter(
                "twin_ml_scenarios", "Answered scenarios by in-domain status", ["in_domain"]
            ),
            std=prom.Histogram(
                "twin_ml_predicted_std",
                "Mean predicted std of each answered scenario, per output (output units)",
                ["output"],
                buckets=[10.0 ** (k / 2) for k in range(-10, 7)],
            ),
            batch=prom.Histogram(
                "twin_ml_batch_scenarios",
                "Scenarios per onnxruntime call (adaptive batching)",
                buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512],
            ),
            calibrations=prom.Counter(
                "twin_ml_calibrations",
                "/calibrate fits by outcome: ok, invalid, error, "
                "cancelled (the request timed out first) or disconnected (its "
                "client went away)",
                ["outcome"],
            ),
        )
    return _METRICS


@bentoml.asgi_app(twins_app, path="/twins")
@bentoml.asgi_app(manifest_app, path="/model")
@bentoml.asgi_app(v2_app, path="/v2")
@bentoml.service(
    name="twin_ml",
    workers=_env_int("TWIN_ML_WORKERS", 1),
    http={"host": "127.0.0.1"},
    logging={"access": {"enabled": _env_flag("TWIN_ML_ACCESS_LOG", True)}},
    # BentoML's request metrics (counts and durations by endpoint and status); off, BentoML
    # serves no /metrics route at all, so twin-ml's own metrics go with them
    metrics={"enabled": _env_flag("TWIN_ML_METRICS", True)},
    # tracing off (the default): OpenTelemetry's ASGI middleware passes every URL by (no span per
    # request); on: BentoML's default, a span per request, for an exporter set in BentoML's config
    **({} if _env_flag("TWIN_ML_TRACING", False) else {"tracing": {"excluded_urls": ["/"]}}),
    traffic={
        "timeout": _env_int("TWIN_ML_TIMEOUT", 120),
        "max_concurrency": _env_int("TWIN_ML_MAX_CONCURRENCY", 64),
    },
)
class TwinService:
    if BENTO_MODEL is not None:
        # declared, so `bentoml build` packs the model into the Bento (and a container's
        # `bentoml serve` finds it in the Bento's own store); loaded and verified by `_load`
        bento_model = bentoml.models.BentoModel(BENTO_MODEL)

    def __init__(self) -> None:
        if CARD is None:
            raise RuntimeError(
                f"set {MODEL_ENV} to the model to serve "
                "(NAME:VERSION, NAME:latest or NAME:production), or build a Bento with "
                f"--arg {BENTO_ARG}=NAME:VERSION"
            )
        self.runtime = Runtime(
            ONNX_BYTES,
            CARD,
            threads=_env_int("TWIN_ML_THREADS", 1),
            strict=_env_flag("TWIN_ML_STRICT", False),
            max_scenarios=MAX_SCENARIOS,
            max_steps=MAX_STEPS,
            max_field_values=_env_int("TWIN_ML_MAX_FIELD_VALUES", 1 << 20),
        )
        self.metrics = _metrics()
        # /calibrate verifies with the physics solver: the system must be importable here (a
        # user's own module: run twin-serve from its folder, or with it on PYTHONPATH)
        self.no_solver: str | None = None
        try:
            CARD.system.build()
        except Exception as e:  # whatever the user's module does on import: /simulate stays up
            self.no_solver = e.args[0] if e.args else str(e)
            log.warning(f"/calibrate is unavailable: {self.no_solver}")
        self._calibrations = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="twin-ml-calibrate"
        )
        self.twins = twins.Sessions(
            ONNX_BYTES,
            CARD,
            os.environ.get("TWIN_ML_TWINS_STORE") or _default_twins_store(),
            max_twins=_env_int("TWIN_ML_MAX_TWINS", 1000),
            threads=_env_int("TWIN_ML_THREADS", 1),
        )
        self.batcher = Batcher(
            self._run,
            max_batch=_env_int("TWIN_ML_MAX_BATCH", 256),
            merge=_env_flag("TWIN_ML_BATCHING", True),
            observe=self.metrics["batch"].observe,
        )

    def _run(self, items: list[ParsedScenario | _Arrays]) -> list[tuple[bytes, bool] | Rollout]:
        """The batcher's worker thread: per /simulate scenario its answer as JSON and its
        in-domain flag; per v2 scenario (`_Arrays`) its rollout, members included."""
        parsed = [s.scenario if isinstance(s, _Arrays) else s for s in items]
        members = any(isinstance(s, _Arrays) for s in items)
        out: list[tuple[bytes, bool] | Rollout] = []
        for item, s, r in zip(items, parsed, self.runtime.rollouts(parsed, members=members)):
            self.metrics["scenarios"].labels(in_domain=str(s.in_domain).lower()).inc()
            for j, name in enumerate(self.runtime.outputs):
                std = r.std[:, j][np.isfinite(r.std[:, j])]
                if std.size:
                    self.metrics["std"].labels(output=name).observe(float(std.mean()))
            if isinstance(item, _Arrays):
                out.append(r)
                continue
            a = self.runtime.answer(s, r)  # non-finite numbers are None already (runtime._list)
            out.append((orjson.dumps(a), a["in_domain"]))
        return out

    async def rollouts(self, parsed: list[ParsedScenario]) -> list[Rollout]:
        """Checked scenarios' arrays (mean, std, members) through the batcher: the v2 routes."""
        return await self.batcher.submit([_Arrays(s) for s in parsed])

    @bentoml.api(route="/simulate")
    async def simulate(self, scenarios: Scenarios) -> list[Answer]:  # type: ignore[valid-type]
        """Trajectories with calibrated uncertainty: per output and step the ensemble mean, std and
        the requested quantiles, plus an in-domain flag with reasons (see serving/runtime.py).
        `scenarios`: one scenario, or a list of them."""
        status, body = await self._simulate(scenarios)
        return Response(body, status_code=status, media_type="application/json")

    async def simulate_json(self, raw: bytes) -> tuple[int, bytes]:
        """POST /simulate's status and body from its raw JSON body: the lean route (`Guard`'s
        `hot`). The body is validated by the very model BentoML validates /simulate's with
        (`model_validate_json` of the API's input model, an empty body read as {}), and a
        schema error is answered in the shape `Guard` gives BentoML's."""
        try:
            data = SIMULATE_INPUT.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            return 400, errors.from_validation(exc)
        return await self._simulate(data.scenarios)

    async def _simulate(self, scenarios: Any) -> tuple[int, bytes]:
        items = scenarios if isinstance(scenarios, list) else [scenarios]
        plain = [s.model_dump(exclude_none=True) if hasattr(s, "model_dump") else s for s in items]
        try:
            parsed = self.runtime.parse_request(plain)
        except RequestTooLarge as e:
            return 413, errors.encoded(413, str(e), e.field)
        except RequestError as e:
            return 400, errors.encoded(400, str(e), e.field)
        done = await self.batcher.submit(parsed)
        self.metrics["requests"].labels(in_domain=str(all(ok for _, ok in done)).lower()).inc()
        return 200, b"[" + b",".join(body for body, _ in done) + b"]"

    @bentoml.api(route="/calibrate")
    async def calibrate(
        self,
        fit: Annotated[list[str], Field(json_schema_extra=FIT_SCHEMA)],
        times: Annotated[
            list[Num] | None, Field(json_schema_extra=CALIBRATION.get("times"))
        ] = None,
        outputs: Annotated[
            dict[str, list[Num | None]] | None,
            Field(json_schema_extra=CALIBRATION.get("outputs")),
        ] = None,
        telemetry: Telemetry | None = None,
        # BentoML reads this signature as the request schema; the {} defaults are never mutated
        inputs: Annotated[
            dict[str, list[Num]], Field(json_schema_extra=CALIBRATION.get("inputs"))
        ] = {},  # noqa: B006
        parameters: Annotated[
            dict[str, Num], Field(json_schema_extra=CALIBRATION.get("parameters"))
        ] = {},  # noqa: B006
        initial_state: Annotated[
            dict[str, Num], Field(json_schema_extra=CALIBRATION.get("initial_state"))
        ] = {},  # noqa: B006
        bounds: Annotated[
            dict[str, list[Num]], Field(json_schema_extra=CALIBRATION.get("bounds"))
        ] = {},  # noqa: B006
        priors: Annotated[
            dict[str, dict[str, list[Num]]],
            Field(json_schema_extra=CALIBRATION.get("priors")),
        ] = {},  # noqa: B006
        noise: Annotated[
            dict[str, Num],
            Field(json_schema_extra=CALIBRATION.get("noise")),
        ] = {},  # noqa: B006
        mcmc: MCMC | None = None,
        starts: Annotated[Int, Field(ge=1, le=32)] = 4,
        corrections: Annotated[Int, Field(ge=0, le=10)] = 2,
        correction_tol: Annotated[Num, Field(ge=0, le=1e3)] = 0.1,
        refine: Annotated[Int, Field(ge=0, le=200)] = 0,
        ctx: bentoml.Context = None,
    ) -> dict:
        """Fit parameters (and "state:<name>" initial states) to observations with the surrogate in
        the loop: multi-start weighted least squares, optional MCMC posterior, and the solver's
        check of the estimate (see twin_ml/calibrate). Observations: times, outputs and inputs,
        or `telemetry` (twin-ingest's output inline). Bounds default to the training domain;
        missing noise is estimated. One calibration runs at a time; others wait their turn."""
        request = {
            "inputs": inputs,
            "fit": fit,
            "parameters": parameters,
            "initial_state": initial_state,
            "bounds": bounds,
            "priors": priors,
            "noise": noise,
        }
        request.update({k: v for k, v in (("times", times), ("outputs", outputs)) if v is not None})
        if self.no_solver:  # BentoML's own 5xx bodies hide the message: this one must say it
            why = "calibration needs the model's physics solver, which this server cannot build: "
            return _refused(ctx, 503, why + self.no_solver)
        try:
            notes: list[str] = []
            if telemetry is not None:
                if times is not None or outputs is not None or inputs:
                    raise RequestError(
                        "telemetry",
                        "give either times, outputs and inputs, or telemetry, not both",
                    )
                _check_magnitudes({"telemetry": telemetry.model_dump()})
                observed, notes = observations_from_telemetry(
                    CARD.system,
                    telemetry.times,
                    telemetry.signals,
                    outputs=telemetry.outputs,
                    where="telemetry",
                )
                request.update(observed)
            elif times is None:
                raise RequestError(
                    "times",
                    "required: the observation timestamps (with outputs and inputs), or "
                    "telemetry (twin-ingest's output inline)",
                )
            _check_magnitudes(request)
            problem = Problem.build(request, CARD, notes)
        except RequestError as e:
            return _refused(ctx, 400, str(e), e.field)
        options = {
            "n_starts": starts,
            "refine_nfev": refine,
            "corrections": corrections,
            "correction_tol": correction_tol,
            # no progress bar on a server
            "mcmc": {**mcmc.model_dump(), "progress": False} if mcmc is not None else None,
        }
        stop = _Stop()
        job = self._calibrations.submit(self._calibrate, problem, options, stop)
        waiter = asyncio.wrap_future(job)
        try:
            # wait for the fit, and look every DISCONNECT_POLL_S whether the client is still there
            while not (await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S))[0]:
                if ctx is not None and await ctx.request.is_disconnected():
                    self._stop_calibration(job, stop, "disconnected")
                    # nobody reads the fit's outcome now (no "exception never retrieved")
                    waiter.cancel()
                    ctx.response.status_code = (
                        499  # nginx's "client closed request", for the access log
                    )
                    return Response(status_code=499)
            result = waiter.result()
        except RequestError as e:  # found during the fit (e.g. noise that cannot be estimated)
            return _refused(ctx, 400, str(e), e.field)
        except BaseException:
            # the request timed out (BentoML's timeout cancels this handler), or waiting failed: the
            # fit stops at its next model call instead of holding the one calibration thread (a fit
            # that failed by itself is done, and stopping it changes nothing)
            self._stop_calibration(job, stop, "cancelled")
            waiter.cancel()
            raise
        body = {
            **result.as_dict(),
            "model": {"name": CARD.name, "version": CARD.version},
        }
        # a fit that overflowed (bounds of +-1e308, observations of 1e300) has NaN or inf in its
        # cost or errors: JSON has neither, and failing to write them was a 500 for a finished fit
        where: list[str] = []
        body = _nulled(body, "", where)
        if where:
            body["warnings"] = [*body.get("warnings", []), _nulled_warning(where)]
        return Response(json.dumps(body, allow_nan=False).encode(), media_type="application/json")

    def _stop_calibration(self, job, stop: _Stop, reason: str) -> None:
        stop.stop(reason)
        if job.cancel():  # it was still queued: it never runs, so it is counted here
            self.metrics["calibrations"].labels(outcome=reason).inc()

    def _calibrate(
        self, problem: Problem, options: dict[str, Any], stop: _Stop
    ) -> CalibrationResult:
        outcome = "error"
        try:
            # counters per calibration
            surrogate = _Stoppable(SurrogateBackend(ONNX_BYTES, CARD), stop)
            result = calibrate(problem, surrogate, _Stoppable(SolverBackend(CARD), stop), **options)
            outcome = "ok"
            return result
        except _Cancelled:
            outcome = stop.reason
            raise
        except RequestError:
            outcome = "invalid"
            raise
        finally:
            self.metrics["calibrations"].labels(outcome=outcome).inc()


def _check_magnitudes(obj: Any, path: str = "") -> None:
    """Refuse a number the model cannot represent (float32): observations of 1e300 made the
    fit's squared residuals overflow inside scipy, a 500 instead of an answer."""
    if isinstance(obj, float) and abs(obj) > F32_MAX:
        raise RequestError(
            path,
            f"{obj:g} is outside the range the model computes in "
            f"(float32: |value| <= {F32_MAX:.4g})",
        )
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_magnitudes(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_magnitudes(v, f"{path}[{i}]")


def _nulled(obj: Any, path: str, where: list[str]) -> Any:
    """`obj` with every NaN or inf replaced by None (null); `where` collects their paths."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        obj = obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        where.append(path)
        return None
    if isinstance(obj, dict):
        return {k: _nulled(v, f"{path}.{k}" if path else str(k), where) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nulled(v, f"{path}[{i}]", where) for i, v in enumerate(obj)]
    return obj


def _nulled_warning(where: list[str]) -> str:
    shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
    return (
        f"the fit produced non-finite values (NaN or inf), sent as null: {shown}; are the "
        "bounds, inputs or observations far outside the model's training range?"
    )


@dataclass(frozen=True)
class _Arrays:
    """A batcher item asking for a scenario's arrays (the v2 protocol) instead of its JSON."""

    scenario: ParsedScenario


class _Cancelled(Exception):
    """The /calibrate request that started this fit is gone."""


class _Stop(threading.Event):
    """Set when a fit's request is gone; `reason` says why (cancelled: timed out; disconnected)."""

    reason = "cancelled"

    def stop(self, reason: str) -> None:
        self.reason = reason
        self.set()


class _Stoppable:
    """A calibration backend that raises _Cancelled at its next model call once `stop` is set."""

    def __init__(self, backend, stop: _Stop):
        self.backend, self.stop = backend, stop

    def predict(self, problem: Problem, theta, **options):
        if self.stop.is_set():
            raise _Cancelled("the /calibrate request was cancelled")
        return self.backend.predict(problem, theta, **options)

    def __getattr__(self, name: str):
        if name == "backend":  # not set yet (a copy): no endless recursion
            raise AttributeError(name)
        return getattr(self.backend, name)


def _docs() -> dict[str, Any]:
    """/docs.json: BentoML's document of the service, made exact (serving/errors.py)."""
    examples: dict[str, Any] = {"/simulate": None, "/calibrate": None}
    if CARD is not None:
        examples["/simulate"] = {"scenarios": [example_scenario(CARD)]}
    return errors.openapi(
        TwinService.openapi_spec.asdict(),
        token=bool(os.environ.get(TOKEN_ENV)),
        examples=examples,
        bodies={"/calibrate": CALIBRATION.get("body")},
    )


# the input model BentoML validates /simulate's body with (the lean route uses the same one)
SIMULATE_INPUT = TwinService.apis["simulate"].input_spec


async def _hot_simulate(scope, receive, send) -> None:
    """The lean route of POST /simulate (twin-serve hot_path=true, the default): the body read,
    validated and answered by `TwinService.simulate_json`, without BentoML's per-request API
    machinery (its context, signature binding, dependency injection and response headers: about
    half of a small model's served latency, benchmarks/serving.py). The answer is the same bytes."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # the client went away, or the body was refused
            return
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    try:
        status, body = await bentoml.get_current_service().simulate_json(b"".join(chunks))
    except Exception:  # as BentoML answers an API's unexpected error: logged, a 500, no details
        log.exception("POST /simulate failed")
        status = 500
        body = errors.encoded(500, "An unexpected error has occurred, please check the server log.")
    await _send_json(send, status, body)


TwinService.add_asgi_middleware(
    Guard,
    token=os.environ.get(TOKEN_ENV),
    max_body=int(os.environ.get(MAX_BODY_ENV, str(8 << 20))),
    docs=_docs,
    hot=_hot_simulate if _env_flag("TWIN_ML_HOT_PATH", True) else None,
)
