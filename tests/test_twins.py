"""Live twin sessions: the store (SQLite, real files) and the /twins endpoints of a real twin-serve
on 127.0.0.1, on the session's tiny pendulum hybrid, exported and stored here. Every HTTP answer
is checked against an in-process `Twin` on the same ONNX bytes fed the same requests: the same
computation (same graph, same batch of members, one intra-op thread), so the same floats."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from brokers import free_port
from conftest import stored_pendulum

from serving.twins import encode
from twin_ml.stream.store import (
    StaleVersion,
    StoreFull,
    TwinExists,
    TwinNotFound,
    TwinStore,
    sqlite_url,
)

BIN = Path(sys.executable).parent
MAX_BODY = 64 * 1024  # the server's body limit here: a 413 needs no large upload
MAX_TWINS = 12


# ---- the store -----------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    s = TwinStore(sqlite_url(tmp_path / "db" / "twins.sqlite"))
    yield s
    s.close()


def test_a_save_from_a_stale_read_is_refused_and_writes_nothing(store):
    rec = store.create("pump-1", "m:v1", {"x": [0.1, 1 / 3, 1e-300]}, last_seq=None)
    assert rec.version == 1 and rec.state == {"x": [0.1, 1 / 3, 1e-300]}  # floats bit for bit
    first = store.save("pump-1", {"x": [1.0]}, rec.version, last_seq=7)
    assert (first.version, first.last_seq) == (2, 7)
    with pytest.raises(StaleVersion, match="at version 2, not 1"):
        store.save("pump-1", {"x": [2.0]}, rec.version)  # read before the save above
    got = store.get("pump-1")
    assert (got.version, got.state, got.last_seq) == (2, {"x": [1.0]}, 7)
    assert store.save("pump-1", {"x": [3.0]}, 2).last_seq == 7  # None keeps the stored one
    with pytest.raises(TwinExists, match="pump-1"):
        store.create("pump-1", "m:v1", {})


def test_delete_list_limit_and_a_second_connection(store, tmp_path):
    for i in range(3):
        store.create(f"t{i}", "m:v1" if i < 2 else "other:v2", {"i": i})
    assert [r.id for r in store.list()] == ["t0", "t1", "t2"]
    assert [r.id for r in store.list(model="m:v1")] == ["t0", "t1"]
    assert all(r.state is None for r in store.list())
    with pytest.raises(StoreFull, match="limit of 3"):
        store.create("t3", "m:v1", {}, limit=3)
    store.delete("t1")
    with pytest.raises(TwinNotFound, match="'t1'"):
        store.get("t1")
    with pytest.raises(TwinNotFound):
        store.delete("t1")
    with pytest.raises(StaleVersion):
        store.delete("t0", version=5)
    other = TwinStore(sqlite_url(tmp_path / "db" / "twins.sqlite"))  # another writer, same file
    try:
        assert other.get("t2").state == {"i": 2} and other.count() == 2
        other.save("t0", {"i": 9}, 1)
        with pytest.raises(StaleVersion):
            store.save("t0", {"i": 8}, 1)
        with other.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        other.close()
    with pytest.raises(ValueError, match="not a twin id"):
        store.create("../x", "m:v1", {})


def test_the_table_is_portable_to_postgresql():
    """The table's DDL and the version-checked UPDATE compile for PostgreSQL (no server here:
    the types are the point; JSON is text, timestamps carry their zone)."""
    from sqlalchemy import update
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateTable

    from twin_ml.stream.store import twins

    ddl = str(CreateTable(twins).compile(dialect=postgresql.dialect()))
    for part in ("VARCHAR(128)", "TIMESTAMP WITH TIME ZONE", "TEXT", "BIGINT", "INTEGER"):
        assert part in ddl
    sql = str(
        update(twins)
        .where(twins.c.id == "a", twins.c.version == 1)
        .values(version=2)
        .compile(dialect=postgresql.dialect())
    )
    where = sql.split(" WHERE ")[1]
    assert where.startswith("twin_ml_twins.id = ") and " AND twin_ml_twins.version = " in where


# ---- a model and a server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(pendulum_hybrid_run, tmp_path_factory):
    """The session's tiny pendulum hybrid exported (as tests/test_assimilate.py does) and stored
    in a store of this module's: (env, onnx bytes, card)."""
    root = tmp_path_factory.mktemp("twins")
    run, _ = pendulum_hybrid_run
    return (*stored_pendulum(run, root, TWIN_ML_MAX_BODY_BYTES=str(MAX_BODY)), root)


class Server:
    """twin-serve of the stored model on a store file that outlives it (restart: the same
    store, another process)."""

    def __init__(self, env, root: Path):
        self.env, self.root, self.db = env, root, root / "twins.sqlite"
        self.proc, self.url, self.starts = None, None, 0

    def start(self) -> None:
        port = free_port()
        self.starts += 1
        self.log = self.root / f"server-{self.starts}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "twin-serve"),
                    "model=pend:v1",
                    f"port={port}",
                    f"twins_store={self.db}",
                    f"max_twins={MAX_TWINS}",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.url = f"127.0.0.1:{port}"
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"http://{self.url}/readyz", timeout=1).status == 200:
                    return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.25)
        self.stop()
        pytest.fail("server did not become ready:\n" + self.log.read_text()[-3000:])

    def kill(self) -> None:
        """SIGKILL to the server and its workers: no shutdown code runs. The workers are found
        first: BentoML starts each in a session of its own, which a kill of the server's process
        group misses (each such worker outlived the test suite, ~0.5 GB apiece)."""
        import psutil

        server = psutil.Process(self.proc.pid)
        workers = server.children(recursive=True)
        os.killpg(self.proc.pid, signal.SIGKILL)
        for w in workers:
            try:
                w.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, alive

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)

    def call(self, method: str, path: str, body=None, raw: bytes | None = None):
        """(status, parsed JSON body or None)."""
        conn = http.client.HTTPConnection(self.url, timeout=120)
        try:
            data = raw if raw is not None else None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            text = r.read()
            return r.status, json.loads(text) if text else None
        finally:
            conn.close()


def test_a_store_twin_serve_cannot_open_is_one_error_line(model):
    env, _, _, root = model
    (root / "a-file").write_text("")
    r = subprocess.run(
        [str(BIN / "twin-serve"), "model=pend:v1", f"twins_store={root / 'a-file' / 't.sqlite'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("error: twins_store=") and "a-file" in r.stderr


@pytest.fixture(scope="module")
def server(model):
    env, _, _, root = model
    srv = Server(env, root)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(model):
    """In-process twins on the same bytes: `local(create_body)` -> a Twin."""
    from twin_ml.assimilate.filter import OnnxForecast
    from twin_ml.assimilate.twin import Twin

    _, blob, card, _ = model
    forecast = OnnxForecast(blob, card)
    return lambda body: Twin.create(card, forecast, body)


def as_sent(answer):
    """An in-process answer as the server writes it (JSON)."""
    return json.loads(encode(answer))


def create_body(seed=3, **extra):
    return {
        "inputs": {"torque": 0.0},
        "noise": {"theta": 0.02},
        "initial_state": {"theta": 0.3, "omega": 0.0},
        "initial_std": {"theta": 0.05, "omega": 0.1},
        "estimate": {"damping": 0.2},
        "filter": {"members": 16, "seed": seed, "inflation": 1.02},
        **extra,
    }


def batch(k0: int, n: int, dt: float, seed: int = 0, every: int = 1):
    """Samples k0 .. k0 + n - 1 (times k * dt, every `every`-th) of a damped swing, measured with
    noise 0.02; the torque a slow sine."""
    rng = np.random.default_rng(seed + k0)
    k = np.arange(k0, k0 + n * every, every)
    t = k * dt
    theta = 0.3 * np.exp(-0.1 * t) * np.cos(3.0 * t) + rng.normal(size=n) * 0.02
    return {
        "times": t.tolist(),
        "outputs": {"theta": theta.tolist()},
        "inputs": {"torque": (0.05 * np.sin(0.5 * t)).tolist()},
    }


# ---- the endpoints -------------------------------------------------------------------------------
def test_a_twin_lives_over_http_as_it_does_in_process(server, model, local):
    """create -> observe (twice) -> GET the estimate (and a forecast by query) -> POST a forecast
    -> delete -> 404, each answer the in-process twin's."""
    card = model[2]
    dt = card.time.dt
    status, created = server.call("POST", "/twins", {"id": "life", **create_body()})
    twin = local(create_body())
    assert status == 201, created
    assert created == {"id": "life", "model": "pend:v1", "version": 1, **as_sent(twin.estimate())}
    for k0 in (1, 6):
        status, got = server.call("POST", "/twins/life/observe", batch(k0, 5, dt))
        assert status == 200, got
        assert got == as_sent(twin.observe(batch(k0, 5, dt)))
    assert got["t"] == pytest.approx(10 * dt) and len(got["samples"]) == 5
    status, read = server.call("GET", "/twins/life")
    assert status == 200 and read["version"] == 3 and read["model"] == "pend:v1"
    assert {k: v for k, v in read.items() if k in got and k != "samples"} == as_sent(
        twin.estimate()
    )
    status, read = server.call("GET", "/twins/life?steps=12&input.torque=0.1&quantiles=0.05,0.95")
    want = twin.forecast({"steps": 12, "inputs": {"torque": [0.1] * 12}, "quantiles": [0.05, 0.95]})
    assert status == 200 and read["forecast"] == as_sent(want), read
    assert set(read["forecast"]["outputs"]["theta"]["quantiles"]) == {"0.05", "0.95"}
    ahead = {"times": [(11 + i) * dt for i in range(6)], "inputs": {"torque": [0.0, 0.1] * 3}}
    status, got = server.call("POST", "/twins/life/forecast", ahead)
    assert status == 200 and got == as_sent(twin.forecast(ahead))
    status, listed = server.call("GET", "/twins")
    assert status == 200 and "life" in [t["id"] for t in listed["twins"]]
    assert server.call("DELETE", "/twins/life") == (204, None)
    for method, path in [("GET", "/twins/life"), ("POST", "/twins/life/observe")]:
        status, err = server.call(method, path, batch(11, 2, dt))
        assert status == 404 and "'life'" in err["error"] and err["detail"][0]["loc"] == ["id"]


def test_a_killed_server_restarted_on_its_store_continues_the_twin(server, model, local):
    dt = model[2].time.dt
    body = create_body(seed=11)
    assert server.call("POST", "/twins", {"id": "kill", **body})[0] == 201
    twin = local(body)
    status, got = server.call("POST", "/twins/kill/observe", batch(1, 4, dt, seed=1))
    assert status == 200 and got == as_sent(twin.observe(batch(1, 4, dt, seed=1)))
    server.kill()  # SIGKILL: nothing flushed, nothing closed
    server.start()  # another process on the same store file
    status, got = server.call("POST", "/twins/kill/observe", batch(5, 4, dt, seed=1))
    assert status == 200, got
    assert got == as_sent(twin.observe(batch(5, 4, dt, seed=1)))
    assert server.call("GET", "/twins/kill")[1]["version"] == 3
    assert server.call("DELETE", "/twins/kill")[0] == 204


def test_refused_requests_name_their_field(server, model):
    dt = model[2].time.dt
    assert server.call("POST", "/twins", {"id": "bad", **create_body()})[0] == 201
    assert server.call("POST", "/twins/bad/observe", batch(1, 3, dt))[0] == 200
    cases = [
        # duplicated and out-of-order times: 409
        (batch(3, 2, dt), 409, ["times", 0]),
        ({**batch(4, 3, dt), "times": [4 * dt, 6 * dt, 5 * dt]}, 409, ["times", 2]),
        # unknown output, a string for a number, NaN as an input, a time off the grid: 400
        ({**batch(4, 2, dt), "outputs": {"omega": [0.0, 0.0]}}, 400, ["outputs"]),
        ({**batch(4, 2, dt), "outputs": {"theta": [0.1, "NaN"]}}, 400, ["outputs", "theta", 1]),
        (None, 400, ["inputs", "torque", 0]),
        ({**batch(4, 2, dt), "times": [4 * dt, 5.5 * dt]}, 400, ["times", 1]),
        ({**batch(4, 2, dt), "speed": 1}, 400, ["speed"]),
    ]
    for body, status, where in cases:
        raw = None
        if body is None:  # a JSON NaN literal (Python's json writes one)
            raw = json.dumps({**batch(4, 2, dt), "inputs": {"torque": [float("nan"), 0.0]}})
            raw = raw.encode()
        got_status, err = server.call("POST", "/twins/bad/observe", body, raw=raw)
        assert (got_status, err["detail"][0]["loc"]) == (status, where), err
        assert err["error"].startswith(errors_field(where)), err
    for raw, where in [(b"{", ["body"]), (b"[" * 50_000, ["body"]), (b"", ["body"])]:
        status, err = server.call("POST", "/twins/bad/observe", raw=raw)
        assert (status, err["detail"][0]["loc"]) == (400, where), err
    status, err = server.call("POST", "/twins/bad/observe", raw=b" " * (MAX_BODY + 1))
    assert status == 413 and str(MAX_BODY) in err["error"]
    for query, where in [  # query parameters are named as sent
        ("steps=0&input.torque=0", "steps"),
        ("steps=3", "input.torque"),
        ("steps=3&input.torque=nan", "input.torque"),
        ("steps=3&input.torque=abc", "input.torque"),
        ("steps=3&input.torque=0&input.torque=1", "input.torque"),
        ("steps=3&input.torque=0&quantiles=1.5", "quantiles"),
        ("steps=3&input.torque=0&speed=2", "speed"),
    ]:
        status, err = server.call("GET", f"/twins/bad?{query}")
        assert status == 400 and err["error"].startswith(f"{where}: "), (query, err)
    status, err = server.call("POST", "/twins/bad/forecast", {"steps": 2, "inputs": {}})
    assert (status, err["detail"][0]["loc"]) == (400, ["inputs"]), err
    status, err = server.call("POST", "/twins", {"id": "bad", **create_body()})
    assert status == 409 and "'bad'" in err["error"]
    status, err = server.call("POST", "/twins", {"id": "a/b", **create_body()})
    assert (status, err["detail"][0]["loc"]) == (400, ["id"])
    status, err = server.call("POST", "/twins", {**create_body(), "noise": {"theta": -1}})
    assert (status, err["detail"][0]["loc"]) == (400, ["noise", "theta"])
    # a twin of another model in the same store: 409 naming both
    store = TwinStore(sqlite_url(server.db))
    try:
        store.create("alien", "other:v7", store.get("bad").state)
    finally:
        store.close()
    status, err = server.call("POST", "/twins/alien/observe", batch(4, 2, dt))
    assert status == 409 and "other:v7" in err["error"] and "pend:v1" in err["error"]
    # the server is still there, and the twin as it was
    status, read = server.call("GET", "/twins/bad")
    assert status == 200 and read["version"] == 2 and read["t"] == pytest.approx(3 * dt)
    for twin_id in ("bad", "alien"):
        assert server.call("DELETE", f"/twins/{twin_id}")[0] == 204


def errors_field(loc) -> str:
    from serving.errors import dotted

    return dotted(loc) + ": "


def test_a_gap_is_forecast_across_and_the_band_grows(server, model):
    """Two twins alike: one's next sample one step on, the other's five steps on; the predicted
    std of the sample after the gap is the larger."""
    dt = model[2].time.dt
    stds = {}
    for twin_id, every in (("near", 1), ("far", 5)):
        assert server.call("POST", "/twins", {"id": twin_id, **create_body(seed=5)})[0] == 201
        assert server.call("POST", f"/twins/{twin_id}/observe", batch(1, 4, dt))[0] == 200
        nxt = batch(4 + every, 1, dt)
        status, got = server.call("POST", f"/twins/{twin_id}/observe", nxt)
        assert status == 200 and got["t"] == pytest.approx((4 + every) * dt)
        stds[twin_id] = got["samples"][0]["predicted"]["theta"]["std"]
        assert server.call("DELETE", f"/twins/{twin_id}")[0] == 204
    assert stds["far"] > stds["near"], stds


def test_concurrent_observes_of_one_twin_serialize(server, model, local):
    """Two threads send consecutive batches at once, rounds over: whichever runs first, nothing
    is lost. Both taken: the answers are the in-process twin's fed A then B. B first: A's times
    are in the twin's past (409), and the twin is the one fed B alone. Either way it ends at B's
    last time."""
    dt = model[2].time.dt
    for r in range(3):
        twin_id = f"race{r}"
        body = create_body(seed=20 + r)
        assert server.call("POST", "/twins", {"id": twin_id, **body})[0] == 201
        a, b = batch(1, 4, dt, seed=r), batch(5, 4, dt, seed=r)
        got: dict[str, tuple] = {}
        go = threading.Barrier(2)

        def send(name, obs, twin_id=twin_id, got=got, go=go):
            go.wait()
            got[name] = server.call("POST", f"/twins/{twin_id}/observe", obs)

        threads = [threading.Thread(target=send, args=x) for x in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        twin = local(body)
        assert got["b"][0] == 200, got["b"]
        if got["a"][0] == 200:
            assert got["a"][1] == as_sent(twin.observe(a))
            versions = 3
        else:
            assert got["a"][0] == 409 and got["a"][1]["detail"][0]["loc"] == ["times", 0]
            versions = 2
        assert got["b"][1] == as_sent(twin.observe(b))
        status, read = server.call("GET", f"/twins/{twin_id}")
        assert read["t"] == pytest.approx(8 * dt) and read["version"] == versions
        assert server.call("DELETE", f"/twins/{twin_id}")[0] == 204


def test_the_twin_limit_and_the_metrics_per_route(server):
    status, listed = server.call("GET", "/twins")
    made = []
    for _ in range(MAX_TWINS - len(listed["twins"])):
        status, got = server.call("POST", "/twins", create_body())
        assert status == 201, got
        made.append(got["id"])
    status, err = server.call("POST", "/twins", create_body())
    assert status == 409 and f"limit of {MAX_TWINS}" in err["error"]
    assert server.call("DELETE", f"/twins/{made.pop()}")[0] == 204
    status, got = server.call("POST", "/twins", create_body())
    assert status == 201
    made.append(got["id"])
    with urllib.request.urlopen(f"http://{server.url}/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert 'endpoint="/twins/{id}"' in metrics
    assert not any(twin_id in metrics for twin_id in made)
    for twin_id in made:
        assert server.call("DELETE", f"/twins/{twin_id}")[0] == 204
