"""Live twin sessions over HTTP, persisted: a Starlette app the service mounts at /twins
(`bentoml.asgi_app`), on the served model (torch-free; BentoML-free: the service hands over its
`Sessions`).

    POST   /twins                    create: Twin's create request + optional `id` -> 201
                                     {id, model, version, t, states, outputs, parameters, alarm,
                                     alarms_raised}
    GET    /twins                    {"twins": [{id, model, created, updated, version, last_seq}]}
    GET    /twins/{id}               the estimate (+ id, model, version, created, updated,
                                     last_seq); `?steps=N&input.<name>=v&quantiles=0.05,0.95`:
                                     also `forecast`, N steps ahead with the inputs held at v
    POST   /twins/{id}/observe       Twin's observe request -> its answer (samples, alarms and
                                     the estimate)
    POST   /twins/{id}/forecast      Twin's forecast request (times or steps, input series,
                                     quantiles) -> {times, outputs: {name: {mean, std, quantiles}}}
    DELETE /twins/{id}               204

Requests and answers are `twin_ml.assimilate.twin.Twin`'s (its module doc); the twin's state
lives in a `TwinStore` (twin_ml/stream/store.py) between requests, read and written whole. Each
load -> assimilate -> save runs under the twin's lock (one per id, in this process: two observes
of one twin run one after the other) and is saved with the store's version check (another
process that saved in between: read again and redo, up to RETRIES times), so an update is never
lost and a crash leaves the old state or the new one. The model work and the store's I/O run on
a thread pool, off the event loop; a request that times out leaves its twin's lock held until
its work is done (whose save may still land: observe again, and a duplicated time is a 409).

Errors, in the service's one shape (serving/errors.py): 400 naming the field (a `RequestError`),
404 for an unknown twin (naming it), 409 for a duplicated or out-of-order time (`Conflict`), an
id in use, a twin of another model than the served one (naming both) and the store's twin limit,
501 on a model that cannot filter (not a state-space kind), 503 when the store cannot be reached
(or the model's own system cannot be built here). The body limit (413), media types (415) and
token are the service's `Guard`'s, which sits in front of this app as of every other route.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from serving import errors
from twin_ml.contract import ModelCard, RequestError

log = logging.getLogger("twin_ml.twins")
RETRIES = 5  # load -> assimilate -> save attempts when another process saves in between
THREADS = 4  # the twins' worker threads (model calls and store I/O) per server process


class TwinError(Exception):
    """An answer other than 400 (`status`), with the field it concerns."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.field = status, field


def encode(obj: Any) -> bytes:
    """An answer's JSON (orjson: each float's shortest repr, NaN and inf as null)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def metrics_path(path: str) -> str | None:
    """/twins/<id>[/...] as /twins/{id}[/...] (the endpoint label of BentoML's request metrics:
    one per route, not one per twin); None for any other path."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] == "twins" and parts[2]:
        return "/".join(["", "twins", "{id}", *parts[3:]])
    return None


class _Locks:
    """One asyncio lock per twin id, dropped when nobody holds or waits for it (event loop only)."""

    def __init__(self) -> None:
        self._held: dict[str, list] = {}  # id -> [lock, holders + waiters]

    async def acquire(self, key: str) -> None:
        entry = self._held.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._drop(key)
            raise

    def release(self, key: str) -> None:
        self._held[key][0].release()
        self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[key]

    def __len__(self) -> int:
        return len(self._held)


class Sessions:
    """The live twins of one server process, on the served model (`onnx`: its verified bytes,
    `card`): the forecast (`OnnxForecast` on those bytes) and the store are opened at first use,
    once. `store`: a SQLAlchemy URL, or a SQLite file's path."""

    def __init__(
        self,
        onnx: bytes,
        card: ModelCard,
        store: str | Path,
        *,
        max_twins: int = 1000,
        threads: int = 1,
    ):
        self.onnx, self.card, self.max_twins, self.threads = onnx, card, max_twins, threads
        store = str(store)
        self.store_url = store if "://" in store else f"sqlite:///{Path(store).expanduser()}"
        self.model = f"{card.name}:{card.version}"
        self._forecast = None
        self._store = None
        self._open = threading.Lock()
        self.locks = _Locks()
        self.pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="twin-ml-twins")

    # ---- what the twins run on, opened once ---------------------------------------------------
    def forecast(self):
        with self._open:
            if self._forecast is None:
                from twin_ml.assimilate.filter import OnnxForecast

                try:  # a user's own system must be importable here (its observation function)
                    self.card.system.build()
                except Exception as e:
                    why = e.args[0] if e.args else str(e)
                    raise TwinError(
                        503,
                        f"live twins need the model's system, which this server cannot "
                        f"build: {why}",
                    ) from None
                try:
                    self._forecast = OnnxForecast(self.onnx, self.card, threads=self.threads)
                except ValueError as e:  # not a state-space kind: no twins on this model
                    why = f"live twins are not available on this model: {e}"
                    raise TwinError(501, why) from None
            return self._forecast

    def store(self):
        with self._open:
            if self._store is None:
                from sqlalchemy.exc import SQLAlchemyError

                from twin_ml.stream.store import TwinStore

                try:
                    self._store = TwinStore(self.store_url)
                except (SQLAlchemyError, OSError, ValueError) as e:
                    log.error(f"the twin store {self.store_url} cannot be opened: {e}")
                    why = f"the twin store cannot be opened: {_short(e)}"
                    raise TwinError(503, why) from None
            return self._store

    # ---- each request's work (on the pool) ----------------------------------------------------
    def _twin(self, rec):
        from twin_ml.assimilate.twin import Twin

        if rec.model != self.model:
            raise TwinError(
                409,
                f"twin {rec.id!r} runs on model {rec.model}, but this server serves {self.model}: "
                f"serve {rec.model} to continue it, or create a new twin on {self.model}",
                "id",
            )
        return Twin.restore(self.card, self.forecast(), rec.state)

    def create(self, body: Any) -> dict[str, Any]:
        from twin_ml.assimilate.twin import Twin
        from twin_ml.stream.store import check_id

        if not isinstance(body, dict):
            raise RequestError("body", "must be a JSON object")
        body = dict(body)
        twin_id = body.pop("id", None)
        if twin_id is None:
            twin_id = uuid.uuid4().hex
        try:
            check_id(twin_id)
        except ValueError as e:
            raise RequestError("id", str(e).removeprefix("id: ")) from None
        twin = Twin.create(self.card, self.forecast(), body)
        rec = self.store().create(twin_id, self.model, twin.state(), limit=self.max_twins)
        return {"id": twin_id, "model": self.model, "version": rec.version, **twin.estimate()}

    def observe(self, twin_id: str, body: Any) -> dict[str, Any]:
        from twin_ml.stream.store import StaleVersion

        store = self.store()
        for _ in range(RETRIES):
            rec = store.get(twin_id)
            twin = self._twin(rec)
            answer = twin.observe(body)
            try:
                store.save(twin_id, twin.state(), rec.version)
            except StaleVersion:  # another process saved it since: again, on its state
                continue
            return answer
        raise TwinError(
            409, f"twin {twin_id!r} was saved by others {RETRIES} times meanwhile: try again", "id"
        )

    def read(self, twin_id: str, forecast: dict[str, Any] | None) -> dict[str, Any]:
        rec = self.store().get(twin_id)
        twin = self._twin(rec)
        summary = rec.summary()
        answer = {**summary, **twin.estimate()}
        if forecast is not None:
            answer["forecast"] = self._ahead(twin, forecast, query=True)
        return answer

    def ahead(self, twin_id: str, body: Any) -> dict[str, Any]:
        twin = self._twin(self.store().get(twin_id))
        return self._ahead(twin, body, query=False)

    @staticmethod
    def _ahead(twin, body: Any, query: bool) -> dict[str, Any]:
        try:
            return twin.forecast(body)
        except RequestError as e:  # Twin names its fields forecast.*: name them as sent
            raise _renamed(e, query) from None

    def delete(self, twin_id: str) -> None:
        self.store().delete(twin_id)

    def listing(self) -> dict[str, Any]:
        return {"twins": [r.summary() for r in self.store().list()]}

    # ---- on the event loop ------------------------------------------------------------------
    async def call(self, key: str | None, fn: Callable, *args) -> Any:
        """`fn(*args)` on the pool; `key`: under that twin's lock, held until `fn` is done even
        when this request is cancelled (its timeout) first."""
        loop = asyncio.get_running_loop()
        if key is None:
            return await loop.run_in_executor(self.pool, fn, *args)
        await self.locks.acquire(key)
        try:
            fut = loop.run_in_executor(self.pool, fn, *args)
        except BaseException:
            self.locks.release(key)
            raise
        fut.add_done_callback(lambda _: self.locks.release(key))
        return await asyncio.shield(fut)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._store is not None:
            self._store.close()


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:300]


def _renamed(e: RequestError, query: bool) -> RequestError:
    """A forecast error named as the request spells the field: `forecast.steps` -> `steps`, and
    in a GET's query `forecast.inputs.<name>[i]` -> `input.<name>` (one value held)."""
    message = str(e)[len(e.field) + 2 :] if str(e).startswith(f"{e.field}: ") else str(e)
    field = e.field.removeprefix("forecast.") if e.field != "forecast" else "body"
    if query:
        if field.startswith("inputs"):
            name = field.removeprefix("inputs").lstrip(".").split("[")[0]
            field = f"input.{name}" if name else "input"
        field = field.split("[")[0]
        if field == "body":
            field = "steps"
    return type(e)(field, message)


def forecast_query(card: ModelCard, params) -> dict[str, Any] | None:
    """A GET's query as a forecast request: `steps=N`, `input.<name>=value` (held over the N
    steps; every input), `quantiles=q1,q2`. None: no forecast asked."""
    if not params:
        return None
    names = card.system.input_names
    allowed = {"steps", "quantiles", *(f"input.{n}" for n in names)}
    for key in params.keys():
        if key not in allowed:
            raise RequestError(key, f"unknown query parameter; allowed: {sorted(allowed)}")
        if len(params.getlist(key)) > 1:
            raise RequestError(key, "given more than once")
    if "steps" not in params:
        raise RequestError("steps", "required for a forecast (with input.<name> and quantiles)")
    raw, top = params["steps"], card.time.max_steps
    if not raw.isdigit() or not 1 <= int(raw) <= top:
        raise RequestError("steps", f"must be an integer in [1, {top}], got {raw!r}")
    steps = int(raw)
    inputs = {}
    for name in names:
        key = f"input.{name}"
        if key not in params:
            raise RequestError(key, "required: the input's value, held over the forecast")
        inputs[name] = [_query_number(params[key], key)] * steps
    body: dict[str, Any] = {"steps": steps, "inputs": inputs}
    if "quantiles" in params:
        body["quantiles"] = [
            _query_number(q, "quantiles") for q in params["quantiles"].split(",") if q.strip()
        ]
    return body


def _query_number(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise RequestError(where, f"must be a number, got {text[:40]!r}") from None
    if not math.isfinite(v):
        raise RequestError(where, f"must be finite, got {text[:40]!r}")
    return v


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise RequestError("body", "required: a JSON object")
    try:
        return json.loads(raw)  # NaN / Infinity literals are read: the checks name them
    except RecursionError:
        raise RequestError("body", "is nested too deeply") from None
    except ValueError as e:
        raise RequestError("body", f"is not valid JSON ({_short(e)})") from None


def _answer(status: int, obj: Any = None, headers: dict[str, str] | None = None) -> Response:
    if obj is None:
        return Response(status_code=status, headers=headers)
    return Response(encode(obj), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, field: str | None = None) -> Response:
    return Response(
        errors.encoded(status, message, field), status_code=status, media_type="application/json"
    )


def refusal(e: Exception, twin_id: str | None) -> tuple[int, str, str | None] | None:
    """An error's status, message and field (None: not a refusal: a bug, logged, a 500). The
    twin and store modules are imported here, at the first error, not when the service starts."""
    from sqlalchemy.exc import OperationalError

    from twin_ml.assimilate.twin import Conflict
    from twin_ml.stream.store import StoreError, StoreFull, TwinNotFound

    if isinstance(e, RequestError):
        return (409 if isinstance(e, Conflict) else 400), str(e), e.field
    if isinstance(e, TwinError):
        return e.status, str(e), e.field
    if isinstance(e, TwinNotFound):
        return 404, f"id: no twin {twin_id!r} here (create it: POST /twins)", "id"
    if isinstance(e, StoreError):  # an id in use, the store's limit, a stale version
        return 409, str(e), None if isinstance(e, StoreFull) else "id"
    if isinstance(e, OperationalError):  # the store: locked too long, gone, its disk full
        log.error(f"the twin store failed: {e}")
        return 503, f"the twin store is unavailable: {_short(e.orig or e)}", None
    return None


def app(sessions: Callable[[], Sessions]) -> Starlette:
    """The /twins routes; `sessions()` gives the running service's `Sessions`."""

    def handled(fn):
        async def route(request: Request) -> Response:
            twin_id = request.path_params.get("twin_id")
            try:
                return await fn(request, sessions(), twin_id)
            except ClientDisconnect:  # gone, or its body refused (413) by the Guard: no answer
                return Response(status_code=499)
            except Exception as e:
                refused = refusal(e, twin_id)
                if refused is None:
                    log.exception(f"{request.method} {request.url.path} failed")
                    refused = (
                        500,
                        "An unexpected error has occurred, please check the server log.",
                        None,
                    )
                return _error(*refused)

        return route

    @handled
    async def index(request: Request, s: Sessions, _: None) -> Response:
        if request.method == "GET":
            return _answer(200, await s.call(None, s.listing))
        body = await _body(request)
        twin_id = body.get("id") if isinstance(body, dict) else None
        key = twin_id if isinstance(twin_id, str) else None
        created = await s.call(key, s.create, body)
        return _answer(201, created, {"location": f"/twins/{created['id']}"})

    @handled
    async def one(request: Request, s: Sessions, twin_id: str) -> Response:
        if request.method == "DELETE":
            await s.call(twin_id, s.delete, twin_id)
            return _answer(204)
        forecast = forecast_query(s.card, request.query_params)
        return _answer(200, await s.call(None, s.read, twin_id, forecast))

    @handled
    async def observe(request: Request, s: Sessions, twin_id: str) -> Response:
        body = await _body(request)
        return _answer(200, await s.call(twin_id, s.observe, twin_id, body))

    @handled
    async def ahead(request: Request, s: Sessions, twin_id: str) -> Response:
        body = await _body(request)
        return _answer(200, await s.call(None, s.ahead, twin_id, body))

    return Starlette(
        routes=[
            Route("/", index, methods=["GET", "POST"]),
            Route("/{twin_id}", one, methods=["GET", "DELETE"]),
            Route("/{twin_id}/observe", observe, methods=["POST"]),
            Route("/{twin_id}/forecast", ahead, methods=["POST"]),
        ]
    )
