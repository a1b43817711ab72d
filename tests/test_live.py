"""The live twin on real brokers (twin_ml/stream/live.py, twin-stream): a synthetic pendulum record
streamed through nats-server (JetStream) and amqtt, assimilated by the session's tiny exported
hybrid, gives the very twin an in-process `Twin` fed the same samples once gives, and its
estimates; a twin-stream killed with SIGKILL mid-stream and restarted loses nothing and
assimilates nothing twice, nor does a consumer restarted before ack_wait has passed; a consumer
that dies before it published a batch's estimates publishes them after its restart; bad traffic
is counted and passed over. No timing is asserted: every wait is a hang guard.

The stream's twin and the in-process one are the same computation (the same ONNX bytes stepping
the same member batches from states restored bit for bit from JSON, the same random stream), so
their states are compared exactly, as JSON."""

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from brokers import STARTUP_S
from conftest import assert_close, rollout_tol, stored_pendulum

from twin_ml.stream.brokers import connect
from twin_ml.stream.messages import TelemetryMessage, encode
from twin_ml.stream.replay import replay_to

pytest_plugins = ("brokers",)  # the nats_server and mqtt_broker fixtures

BIN = Path(sys.executable).parent
WAIT = 60.0  # seconds a test waits for a process or a message before it fails (a hang guard)
STEPS = 120  # samples in the record
NOISE = 0.02  # theta's measurement noise (rad)
START = pd.Timestamp("2024-05-02T08:00:00Z")
CREATE = {
    "noise": {"theta": NOISE},
    "initial_state": {"theta": 0.3, "omega": 0.0},
    "initial_std": {"theta": 0.1, "omega": 0.1},
    "estimate": {"damping": 0.2},
    "filter": {"members": 12, "seed": 3, "inflation": 1.02},
}


@pytest.fixture(scope="module")
def model(pendulum_hybrid_run, tmp_path_factory):
    """The session's tiny pendulum hybrid exported once for the module and saved as pend:v1 in
    a model store of its own (BENTOML_HOME in `env`, for twin-stream): (env, bytes, card)."""
    run, _ = pendulum_hybrid_run
    return stored_pendulum(run, tmp_path_factory.mktemp("live-model"))


@pytest.fixture(scope="module")
def forecast(model):
    from twin_ml.assimilate.filter import OnnxForecast

    _, blob, card = model
    return OnnxForecast(blob, card)


@pytest.fixture(scope="module")
def record(model):
    """(t [T] on the model's grid, torque [T, 1], measured theta [T, 1], the messages): the
    pendulum solver's truth (true parameters, a slow sine torque) at the model's dt, theta
    measured with seeded noise; one message per sample in the model's own names, seq 0.."""
    from twin_ml.physics.solver import solve_stacked

    _, _, card = model
    system = card.system.build()
    dt = card.time.dt
    t = np.arange(STEPS) * dt
    u = (0.2 * np.sin(0.7 * t))[:, None]
    x = solve_stacked(system, t, u[None], np.array([[1.0, 0.2, 1.0]]), np.array([[0.4, 0.0]])).x
    y = x[0][:, [0]] + np.random.default_rng(11).normal(size=(STEPS, 1)) * NOISE
    return t, u, y, [message(k, dt, u[k, 0], y[k, 0]) for k in range(STEPS)]


def message(k: int, dt: float, torque: float, theta: float) -> TelemetryMessage:
    """Sample k as a message: its time START + k dt (whole nanoseconds), in the model's names."""
    at = START + pd.Timedelta(int(round(k * dt * 1e9)), "ns")
    return TelemetryMessage(at, {"torque": float(torque), "theta": float(theta)}, seq=k)


@pytest.fixture(scope="module")
def reference(model, forecast, record):
    """The in-process twin of CREATE fed samples [a, b) with `Twin.assimilate`, one batch (of
    the record's measurements, or of `y`): (its state, its per-sample answers), as JSON."""
    from twin_ml.assimilate.twin import Observation, Twin

    _, _, card = model
    t, u, y, _ = record

    def fed(b: int = STEPS, a: int = 0, y=y):
        twin = Twin.create(card, forecast, {**CREATE, "t0": t[a], "inputs": {"torque": u[a, 0]}})
        answer = twin.assimilate(Observation(t[a:b], u[a:b], y[a:b]))
        return as_json(twin.state()), as_json(answer["samples"])

    return fed


def as_json(obj):
    return json.loads(json.dumps(obj))


def live_twin(model, forecast, path: Path, twin_id: str, **kwargs):
    """A LiveTwin of CREATE on a SQLite store (and archive) under `path`: (live, store)."""
    from twin_ml.stream.live import LiveTwin, model_contract
    from twin_ml.stream.store import TwinStore, sqlite_url

    _, _, card = model
    store = TwinStore(sqlite_url(path / "twins.sqlite"))
    archive = path / "archive"
    live = LiveTwin(
        store, card, forecast, model_contract(card), twin_id, create=CREATE, archive=archive
    )
    return live, store


def stored(store, twin_id: str):
    """The twin's state in the store, without the stream's own bookkeeping (its epoch)."""
    state = dict(store.get(twin_id).state)
    assert state.pop("stream")["epoch"] == "2024-05-02T08:00:00Z"
    return state


def archived(folder: Path) -> pd.DataFrame:
    """Every archive part of a twin, rows in time order."""
    parts = sorted(folder.glob("part-*.parquet"))
    assert parts, f"no archive parts in {folder}"
    return pd.concat([pd.read_parquet(p) for p in parts]).sort_values("t", kind="stable")


def check_archive(folder: Path, record, y=None) -> None:
    """The archive holds each sample of the record (measured `y`) exactly once, with its values."""
    t, u, y_record, _ = record
    y = y_record if y is None else y
    frame = archived(folder)
    assert frame["seq"].tolist() == list(range(STEPS))  # none missing, none twice
    assert np.array_equal(frame["torque"].to_numpy(), u[:, 0])
    assert np.array_equal(frame["theta"].to_numpy(), y[:, 0])


async def read_subject(url: str, subject: str, name: str, stream: str, n: int) -> list[dict]:
    """The first n messages on a NATS subject (a durable consumer of its own), as JSON."""
    async with await connect(url, name=name, stream=stream) as b:
        sub = await b.subscribe(subject)
        got = []
        for _ in range(n):
            d = await sub.next(timeout=WAIT)
            got.append(json.loads(d.payload))
            await d.ack()
        assert await b.pending() == (0, 0)  # and no more than n
    return got


# ---- NATS JetStream, in process -----------------------------------------------------------------


def test_a_stream_through_jetstream_gives_the_in_process_twin(
    nats_server, model, forecast, record, reference, tmp_path
):
    """The record published, then drained by `consume` (batches of 16): every sample assimilated
    once; the twin in the store is the in-process twin fed every sample, state for state; one
    estimate per sample went out with the in-process one-step prediction and filtered outputs;
    the archive holds every sample once."""
    from twin_ml.stream.live import consume

    url, subject, stream = nats_server.url, "plant.pend.telemetry", "LIVE"
    live, store = live_twin(model, forecast, tmp_path, "pend-nats")
    *_, messages = record

    async def main():
        sent = await replay_to(url, subject, messages, speed=0, stream=stream, progress=False)
        result = await consume(
            url, subject, live, name="pend-nats", estimates="plant.pend.estimates",
            batch=16, max_messages=STEPS, idle_s=WAIT, stream=stream,
        )  # fmt: skip
        est = await read_subject(url, "plant.pend.estimates", "est-reader", stream, STEPS)
        return sent, result, est

    sent, result, estimates = asyncio.run(main())
    assert (result.delivered, result.assimilated, result.published) == (STEPS, STEPS, STEPS)
    assert (result.duplicates, result.refused, result.resets) == (0, 0, 0)
    state, samples = reference()
    assert stored(store, "pend-nats") == state
    assert store.get("pend-nats").last_seq == sent.last_sequence
    assert [e["seq"] for e in estimates] == list(range(STEPS))
    for e, want in zip(estimates, samples):
        assert e["twin"] == "pend-nats"
        assert e["timestamp"] == messages[e["seq"]].to_dict()["timestamp"]
        assert {k: e[k] for k in want} == want
    check_archive(tmp_path / "archive" / "pend-nats", record)


def test_a_consumer_restarted_before_ack_wait_has_passed_loses_nothing(
    nats_server, model, forecast, record, reference, tmp_path
):
    """A consumer fetches 16 deliveries, assimilates and saves the first 8 (the store's last_seq
    moves past them) and dies without acking any. More messages come, and a new consumer under
    the same name starts before ack_wait has passed: JetStream would hand it those newer
    messages before it redelivers the 16. Every sample is still assimilated once: the 8 saved
    ones come again and are skipped, the 8 fetched but never handled are assimilated, in order."""
    from twin_ml.stream.live import consume

    url, subject, stream, name = nats_server.url, "plant.early.telemetry", "EARLY", "pend-early"
    live, store = live_twin(model, forecast, tmp_path, name)
    *_, messages = record

    async def main():
        await replay_to(url, subject, messages[:40], speed=0, stream=stream, progress=False)
        async with await connect(url, name=name, stream=stream, ack_wait=3, batch=16) as b:
            sub = await b.subscribe(subject)
            got = [await sub.next(timeout=WAIT) for _ in range(16)]
            assert live.handle([(d.message(), d.sequence) for d in got[:8]]).assimilated == 8
        # closed without an ack: the 16 stay pending until ack_wait has passed
        await replay_to(url, subject, messages[40:], speed=0, stream=stream, progress=False)
        result = await consume(
            url, subject, live, name=name, batch=8, max_messages=STEPS, idle_s=WAIT,
            stream=stream, ack_wait=3,
        )  # fmt: skip
        async with await connect(url, name=name, stream=stream) as b:
            return result, await b.pending()

    result, pending = asyncio.run(main())
    assert (result.assimilated, result.duplicates) == (STEPS - 8, 8)
    assert pending == (0, 0)
    assert stored(store, name) == reference()[0]
    check_archive(tmp_path / "archive" / name, record)


class Died(Exception):
    """A consumer's death, at a point a test picks."""


def test_a_consumer_that_dies_before_publishing_a_batch_s_estimates_publishes_them_again(
    nats_server, model, forecast, record, reference, tmp_path, monkeypatch
):
    """A consumer dies at the first estimates it publishes (the broker's publish to the
    estimates subject raises): the batch it had assimilated is not acked. Restarted, it gets
    that batch again: every sample's estimate goes out (at least once, each the in-process
    one), and the twin is the in-process twin fed every sample once."""
    from twin_ml.stream.brokers import JetStreamBroker
    from twin_ml.stream.live import consume

    url, subject, stream, name = nats_server.url, "plant.die.telemetry", "DIE", "pend-die"
    estimates = "plant.die.estimates"
    live, store = live_twin(model, forecast, tmp_path, name)
    *_, messages = record
    publish = JetStreamBroker.publish_all

    async def dying(self, to, payloads, **kwargs):
        if to == estimates:
            raise Died(to)
        return await publish(self, to, payloads, **kwargs)

    async def run():
        return await consume(
            url, subject, live, name=name, estimates=estimates, batch=16,
            max_messages=STEPS, idle_s=WAIT, stream=stream, ack_wait=1,
        )  # fmt: skip

    asyncio.run(replay_to(url, subject, messages, speed=0, stream=stream, progress=False))
    monkeypatch.setattr(JetStreamBroker, "publish_all", dying)
    with pytest.raises(Died):
        asyncio.run(run())
    monkeypatch.setattr(JetStreamBroker, "publish_all", publish)
    result = asyncio.run(run())
    got = asyncio.run(read_subject(url, estimates, "die-reader", stream, result.published))
    assert sorted({e["seq"] for e in got}) == list(range(STEPS))
    state, samples = reference()
    for e in got:
        want = samples[e["seq"]]
        assert {k: e[k] for k in want} == want
    assert stored(store, name) == state


# ---- a fleet: several twins on one consumer ------------------------------------------------------
FLEET = ("a", "b", "c")  # twins pend-a, pend-b, pend-c on fleet.a.telemetry, ...


def fleet_records(record) -> list[tuple[np.ndarray, list]]:
    """Per fleet twin k: the record's theta measured 0.03 k higher, and its messages."""
    t, u, y, _ = record
    dt = t[1] - t[0]
    ys = [y + 0.03 * k for k in range(len(FLEET))]
    return [(yk, [message(i, dt, u[i, 0], yk[i, 0]) for i in range(STEPS)]) for yk in ys]


def live_fleet(model, forecast, path: Path, subject: str):
    from twin_ml.stream.live import LiveFleet, model_contract
    from twin_ml.stream.store import TwinStore, sqlite_url

    _, _, card = model
    store = TwinStore(sqlite_url(path / "twins.sqlite"))
    fleet = LiveFleet(
        store, card, forecast, model_contract(card), subject, "pend-{1}", create=CREATE,
        archive=path / "archive",
    )  # fmt: skip
    return fleet, store


# float32 rounding over the record's steps, relative (a wrong member, input or draw is off by
# ~1e-2)
FLEET_TOL = rollout_tol(STEPS, 1.0)


def test_a_fleet_on_one_consumer_gives_each_twin_its_own_twin(
    nats_server, model, forecast, record, reference, tmp_path
):
    """Three twins' records published interleaved on fleet.<twin>.telemetry and drained by one
    `consume` of a `LiveFleet` (batches of 48, each holding samples of all three, assimilated
    together; full batches although nothing lingers for more: the deliveries fetched already
    have arrived): each twin in the store is the in-process twin fed its own record, one estimate
    per sample went out per twin, in its order, with that twin's predictions, and each twin's
    archive holds its samples once."""
    from twin_ml.stream.live import consume

    url, stream = nats_server.url, "FLEET"
    fleet, store = live_fleet(model, forecast, tmp_path, "fleet.*.telemetry")
    records = fleet_records(record)
    n = len(FLEET) * STEPS

    async def main():
        async with await connect(url, stream=stream) as broker:
            for i in range(STEPS):
                for name, (_, messages) in zip(FLEET, records):
                    await broker.publish(f"fleet.{name}.telemetry", encode(messages[i]))
        result = await consume(
            url, "fleet.*.telemetry", fleet, name="fleet", estimates="fleet.estimates",
            batch=48, max_messages=n, idle_s=WAIT, stream=stream, linger_s=0.0,
        )  # fmt: skip
        return result, await read_subject(url, "fleet.estimates", "fleet-reader", stream, n)

    result, estimates = asyncio.run(main())
    assert (result.delivered, result.assimilated, result.published) == (n, n, n)
    assert (result.duplicates, result.refused, result.resets) == (0, 0, 0)
    assert result.batches == -(-n // 48)  # a backlog fetched fills each batch, linger or not
    for name, (yk, _) in zip(FLEET, records):
        state, samples = reference(y=yk)
        assert_close(stored(store, f"pend-{name}"), state, FLEET_TOL, f"pend-{name}")
        mine = [e for e in estimates if e["twin"] == f"pend-{name}"]
        assert [e["seq"] for e in mine] == list(range(STEPS))
        for e, want in zip(mine, samples):
            assert_close({k: e[k] for k in want}, want, FLEET_TOL, f"pend-{name} {e['seq']}")
        check_archive(tmp_path / "archive" / f"pend-{name}", record, yk)
    store.close()


def test_a_fleet_killed_between_two_twins_saves_assimilates_each_sample_once(
    model, forecast, record, reference, tmp_path
):
    """A fleet consumer saves its batch's twins one by one; one killed after saving the first
    twin of a batch gets the batch again: the saved twin skips its samples (its own stream
    sequence), the others assimilate theirs. Every twin ends as the in-process twin fed its
    record once. A subject that names no valid twin id is refused, and the rest goes on."""
    records = fleet_records(record)
    items = [
        (records[k][1][i], len(FLEET) * i + k + 1, f"fleet.{name}.telemetry")
        for i in range(STEPS)
        for k, name in enumerate(FLEET)
    ]
    cut = len(FLEET) * 60
    fleet, store = live_fleet(model, forecast, tmp_path, "fleet.*.telemetry")
    first = fleet.handle([*items[:cut], (records[0][1][0], None, "fleet.a@b.telemetry")])
    assert (first.assimilated, first.refused) == (cut, 1)
    assert "'pend-a@b' is not a twin id" in first.reasons[0]
    dying = fleet.handle(items[cut:], save=False)
    (live, part), *_ = dying.unsaved
    live.save(part)  # the first twin saved, then the consumer dies
    store.close()
    fleet, store = live_fleet(model, forecast, tmp_path, "fleet.*.telemetry")
    again = fleet.handle(items[cut:])
    per_twin = STEPS - 60
    assert (again.duplicates, again.assimilated) == (per_twin, per_twin * (len(FLEET) - 1))
    for name, (yk, _) in zip(FLEET, records):
        assert_close(stored(store, f"pend-{name}"), reference(y=yk)[0], FLEET_TOL, name)
    store.close()


def test_a_sample_whose_forecast_diverges_is_refused_and_the_stream_goes_on(
    model, forecast, record, reference, tmp_path
):
    """Sample 12 carries a torque float32 cannot hold: the step to it turns the members
    non-finite. The stream does not stop (the batch would come again and stop it again): the
    batch is assimilated again from the saved twin sample by sample, sample 12 refused with a
    `diverged` alarm, the others assimilated. The twin is the in-process twin fed every sample
    but 12 (the gap forecast across). In a fleet, the other twin's samples of that batch are
    assimilated as usual."""
    from twin_ml.assimilate.twin import Observation, Twin

    t, u, y, messages = record
    dt = t[1] - t[0]
    poisoned = [*messages[:12], message(12, dt, 1e39, y[12, 0]), *messages[13:30]]
    live, store = live_twin(model, forecast, tmp_path, "pend-div")
    batches = [[(m, k + 1) for k, m in enumerate(poisoned) if a <= k < a + 10] for a in (0, 10, 20)]
    done = [live.handle(b) for b in batches]
    assert [(d.assimilated, d.refused) for d in done] == [(10, 0), (9, 1), (10, 0)]
    assert [a["kind"] for a in done[1].alarms].count("diverged") == 1
    assert "diverged" in done[1].reasons[0] and len(done[1].estimates) == 9
    _, _, card = model
    keep = np.r_[0:12, 13:30]
    twin = Twin.create(card, forecast, {**CREATE, "t0": t[0], "inputs": {"torque": u[0, 0]}})
    twin.assimilate(Observation(t[keep], u[keep], y[keep]))
    assert stored(store, "pend-div") == as_json(twin.state())
    store.close()

    # a fleet: twin a gets the poisoned samples, twin b the record; b goes on as alone
    fleet, store = live_fleet(model, forecast, tmp_path / "fleet", "fleet.*.telemetry")
    ((yb, clean),) = fleet_records(record)[1:2]
    items = [
        (m, 2 * k + j + 1, f"fleet.{name}.telemetry")
        for k in range(20)
        for j, (name, m) in enumerate((("a", poisoned[k]), ("b", clean[k])))
    ]
    done = [fleet.handle(items[:20]), fleet.handle(items[20:])]
    assert (done[1].assimilated, done[1].refused) == (19, 1)
    assert [a["twin"] for a in done[1].alarms if a["kind"] == "diverged"] == ["pend-a"]
    assert all(a["twin"] in ("pend-a", "pend-b") for d in done for a in d.alarms)
    assert_close(stored(store, "pend-b"), reference(20, y=yb)[0], FLEET_TOL, "pend-b")
    # a twin id the store holds on another model: that twin's messages refused, the rest go on
    store.create("pend-c", "other:v1", {})
    other = [(clean[20], 99, "fleet.c.telemetry"), (clean[20], 100, "fleet.b.telemetry")]
    late = fleet.handle(other)
    assert (late.assimilated, late.refused) == (1, 1) and "other:v1" in late.reasons[0]
    store.close()


@pytest.mark.parametrize(
    "subject, template, concrete, twin",
    [
        ("plant.*.telemetry", "tanks-{1}", "plant.a7.telemetry", "tanks-a7"),
        ("site.*.*.data", "{2}.{1}", "site.north.pump3.data", "pump3.north"),
        ("plant/+/telemetry", "t-{1}", "plant/a7/telemetry", "t-a7"),
    ],
)
def test_a_fleet_names_each_twin_by_its_subject_s_wildcards(subject, template, concrete, twin):
    from twin_ml.stream.live import fleet_ids

    twin_of = fleet_ids(subject, template)
    assert twin_of(concrete) == twin
    with pytest.raises(ValueError, match="does not match"):
        twin_of(concrete + ".extra" if "." in concrete else concrete + "/extra")
    with pytest.raises(ValueError, match="'-x' is not a twin id"):
        fleet_ids(subject, "{1}")(concrete.replace("a7", "-x").replace("north", "-x"))


# ---- twin-stream killed and restarted ------------------------------------------------------------


WARM = """
import sys
import bentoml, nats, pyarrow.parquet  # what twin-stream loads, loaded before the go
import twin_ml.assimilate.filter, twin_ml.stream.live, twin_ml.stream.store
from training.stream import main
sys.stdin.readline()
main(sys.argv[1:])
"""


def twin_stream(env, url: str, subject: str, twin: str, root: Path, *extra: str, warm=False):
    """twin-stream of pend:v1 in a process of its own (store, archive and summary under root),
    batches of 8, ack_wait 1 s; its output in root/stream-N.log. warm: the command's own `main`
    in a process that has loaded its modules and runs it when a line comes on its stdin (`go`):
    a restart that does not wait for its imports."""
    n = len(list(root.glob("stream-*.log")))
    log = root / f"stream-{n}.log"
    args = ["model=pend:v1", f"url={url}", f"subject={subject}", f"twin={twin}"]
    args += [f"create={json.dumps(CREATE)}", "stream=KILL", "batch=8", "ack_wait=1"]
    args += ["progress=false", f"twins_store={root / 'twins.sqlite'}"]
    args += [f"archive={root / 'archive'}", f"out_dir={root / 'out'}", *extra]
    command = [sys.executable, "-c", WARM] if warm else [str(BIN / "twin-stream")]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command + args,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if warm else subprocess.DEVNULL,
        )
    proc.log = log
    return proc


def go(proc) -> None:
    proc.stdin.write(b"go\n")
    proc.stdin.close()


def wait_until(check, proc, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"twin-stream: {what} did not happen:\n{proc.log.read_text()[-3000:]}")
        time.sleep(0.02)


def test_twin_stream_killed_mid_stream_and_restarted_loses_nothing(
    nats_server, model, record, reference, tmp_path
):
    """twin-stream drains a backlog of the record's first 90 samples and is killed with SIGKILL
    as soon as the store's last_seq has moved (a batch saved; the next ones fetched, some
    perhaps assimilated, saved or archived, none of that acked); the last 30 samples are
    published after the kill. Restarted under the same twin id until idle, it assimilates
    exactly the samples the killed one had not saved: the twin in the store is the in-process
    twin fed every sample once (none lost, none twice), and the archive holds every sample
    once."""
    from twin_ml.stream.store import TwinNotFound, TwinStore, sqlite_url

    env, _, _ = model
    url, subject, twin = nats_server.url, "plant.kill.telemetry", "pend-kill"
    *_, messages = record
    store = TwinStore(sqlite_url(tmp_path / "twins.sqlite"))  # the table exists before either

    def publish(part):
        return asyncio.run(replay_to(url, subject, part, speed=0, stream="KILL", progress=False))

    def last_seq():
        try:
            return store.get(twin).last_seq
        except TwinNotFound:
            return None

    backlog = publish(messages[:90])
    proc = twin_stream(env, url, subject, twin, tmp_path)
    again = twin_stream(env, url, subject, twin, tmp_path, "idle=3", warm=True)
    try:
        wait_until(lambda: last_seq() is not None, proc, "a batch saved")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=WAIT) == -signal.SIGKILL
        killed_at = last_seq()
        after = publish(messages[90:])
        go(again)
        assert again.wait(timeout=STARTUP_S + WAIT) == 0, again.log.read_text()[-3000:]
    finally:
        for p in (proc, again):
            p.kill()
            p.wait()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert last_seq() == after.last_sequence
    # the restart assimilated what the killed one had not saved, and skipped what it had
    saved = killed_at - backlog.first_sequence + 1  # one subject on the stream: no gaps
    assert 0 < saved < STEPS
    assert summary["assimilated"] == STEPS - saved
    assert summary["assimilated"] + summary["duplicates"] == summary["delivered"]
    assert (summary["refused"], summary["resets"]) == (0, 0)
    assert stored(store, twin) == reference()[0]
    check_archive(tmp_path / "archive" / twin, record)
    store.close()


def test_twin_stream_serves_a_fleet_from_a_wildcard_subject(
    nats_server, model, record, reference, tmp_path
):
    """The command with subject cmdfleet.*.telemetry and twin pend-{1}: two twins' records
    published interleaved, drained by one process (batches of 8, a durable consumer
    named from the template). Each twin is in the store as the in-process twin fed its record,
    and the summary counts both."""
    from twin_ml.stream.store import TwinStore, sqlite_url

    env, _, _ = model
    url, records = nats_server.url, fleet_records(record)[:2]

    async def publish():
        async with await connect(url, stream="KILL") as broker:
            for i in range(STEPS):
                for name, (_, messages) in zip(FLEET, records):
                    await broker.publish(f"cmdfleet.{name}.telemetry", encode(messages[i]))

    asyncio.run(publish())
    proc = twin_stream(
        env, url, "cmdfleet.*.telemetry", "pend-{1}", tmp_path, f"max_messages={2 * STEPS}"
    )
    assert proc.wait(timeout=STARTUP_S + WAIT) == 0, proc.log.read_text()[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["delivered"], summary["assimilated"]) == (2 * STEPS, 2 * STEPS)
    assert (summary["duplicates"], summary["refused"], summary["twin"]) == (0, 0, "pend-{1}")
    store = TwinStore(sqlite_url(tmp_path / "twins.sqlite"))
    for name, (yk, _) in zip(FLEET, records):
        assert_close(stored(store, f"pend-{name}"), reference(y=yk)[0], FLEET_TOL, name)
    store.close()


# ---- bad traffic ---------------------------------------------------------------------------------


def test_bad_messages_are_counted_and_the_stream_goes_on(
    nats_server, model, forecast, record, reference, tmp_path
):
    """After 10 good samples: a payload that is no message, a repeat of sample 5's time (another
    value), a time half a step off the grid; then 10 good samples. The broken payload and the
    off-grid time are refused, the repeat is a duplicate, all of them acked; the good samples are
    assimilated as the in-process twin does them."""
    from twin_ml.stream.live import consume

    url, subject, stream, name = nats_server.url, "plant.bad.telemetry", "BAD", "pend-bad"
    live, store = live_twin(model, forecast, tmp_path, name)
    t, u, y, messages = record
    dt = t[1] - t[0]
    repeat = message(5, dt, u[5, 0], y[5, 0] + 1.0)
    off = TelemetryMessage(START + pd.Timedelta(seconds=10.5 * dt), {"torque": 0.0, "theta": 0.1})

    async def main():
        async with await connect(url, stream=stream) as pub:
            for m in messages[:10]:
                await pub.publish(subject, encode(m))
            # the first 10 in batches of their own: a repeat within one batch replaces the value
            first = await consume(
                url, subject, live, name=name, max_messages=10, idle_s=WAIT, stream=stream
            )
            await pub.publish(subject, b'{"timestamp": "2024-05-02T08:00:01Z", "values": ')
            await pub.publish(subject, encode(repeat))
            await pub.publish(subject, encode(off))
            for m in messages[10:20]:
                await pub.publish(subject, encode(m))
        then = await consume(
            url, subject, live, name=name, max_messages=13, idle_s=WAIT, stream=stream
        )
        async with await connect(url, name=name, stream=stream) as b:
            return first, then, await b.pending()

    first, then, pending = asyncio.run(main())
    assert (first.assimilated, first.refused, first.duplicates) == (10, 0, 0)
    assert (then.delivered, then.assimilated) == (13, 10)
    assert (then.refused, then.duplicates) == (2, 1)
    assert then.reasons[0].startswith("sequence ") and ": payload: " in then.reasons[0]
    assert "not within 0.25 dt of the model's grid" in then.reasons[1]
    assert pending == (0, 0)  # the bad ones acked too: nothing comes again
    assert stored(store, name) == reference(20)[0]


# ---- MQTT (amqtt) --------------------------------------------------------------------------------


def test_a_stream_through_mqtt_gives_the_in_process_twin(
    mqtt_broker, model, forecast, record, reference, tmp_path
):
    """The record published to amqtt while the twin's persistent session (a named user on a
    broker that refuses anonymous clients) is offline, then consumed: the same twin as in
    process, each sample archived once (MQTT has no stream sequence: dedup by time)."""
    from twin_ml.stream.live import consume

    url, topic, name = mqtt_broker.url, "plant/pend/telemetry", "pend-mqtt"
    live, store = live_twin(model, forecast, tmp_path, name)
    *_, messages = record

    async def main():
        async with await connect(url, name=name) as b:  # the session and its subscription
            await b.subscribe(topic)
        await replay_to(url, topic, messages, speed=0, progress=False)
        return await consume(url, topic, live, name=name, batch=16, max_messages=STEPS, idle_s=WAIT)

    result = asyncio.run(main())
    assert (result.delivered, result.assimilated, result.duplicates) == (STEPS, STEPS, 0)
    assert store.get(name).last_seq is None
    assert stored(store, name) == reference()[0]
    check_archive(tmp_path / "archive" / name, record)


def test_a_fleet_through_mqtt_gives_each_twin_its_own_twin(
    mqtt_broker, model, forecast, record, reference, tmp_path
):
    """Two twins' records published interleaved on fleet/<twin>/telemetry while the fleet's
    persistent session (subscribed to fleet/+/telemetry) is offline, then consumed by one
    `LiveFleet`: each twin is the in-process twin fed its record."""
    from twin_ml.stream.live import consume

    url, topic, name = mqtt_broker.url, "fleet/+/telemetry", "pend-fleet-mqtt"
    fleet, store = live_fleet(model, forecast, tmp_path, topic)
    records = fleet_records(record)[:2]

    async def main():
        async with await connect(url, name=name) as b:  # the session and its subscription
            await b.subscribe(topic)
        async with await connect(url) as broker:
            for i in range(STEPS):
                for twin, (_, messages) in zip(FLEET, records):
                    await broker.publish(f"fleet/{twin}/telemetry", encode(messages[i]))
        return await consume(
            url, topic, fleet, name=name, batch=16, max_messages=2 * STEPS, idle_s=WAIT
        )

    result = asyncio.run(main())
    assert (result.delivered, result.assimilated, result.duplicates) == (2 * STEPS,) * 2 + (0,)
    for twin, (yk, _) in zip(FLEET, records):
        assert_close(stored(store, f"pend-{twin}"), reference(y=yk)[0], FLEET_TOL, twin)
    store.close()


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give model=..., url=..., subject=..., twin=..."),
        (["model=m:v", "url=http://h", "subject=s", "twin=t"], "url: 'http://h' has scheme 'http'"),
        (
            ["model=m:v", "url=nats://127.0.0.1:1", "subject=s", "twin=bad id"],
            "twin: 'bad id' is not",
        ),
        (
            ["model=m:v", "url=nats://127.0.0.1:1", "subject=s", "twin=t", "batch=0"],
            "batch must be >= 1",
        ),
        (["model=m:v", "url=nats://127.0.0.1:1", "subject=s", "twin=t", "create={x"], "create: "),
        (
            ["model=m:v", "url=nats://127.0.0.1:1", "subject=plant.*.telemetry", "twin=t-{2}"],
            "twin: a fleet's twin id is a template of the subject's wildcards {1}...{1}",
        ),
        (
            ["model=m:v", "url=nats://127.0.0.1:1", "subject=plant.*.>", "twin=t-{1}"],
            "subject: a fleet's subject names each twin by single-level wildcards",
        ),
    ],
)
def test_twin_stream_refuses_bad_settings_by_name(argv, message, capsys):
    from training.stream import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_batch_handled_and_not_saved_is_handled_again_by_the_same_consumer(
    model, forecast, record, reference, tmp_path
):
    """The twin a consumer keeps between batches is handed to one batch at a time: a batch
    handled but never saved (its estimates could not go out) comes again to the same LiveTwin
    and is assimilated again from the saved twin, not skipped as already seen."""
    t, u, y, messages = record
    live, store = live_twin(model, forecast, tmp_path, "pend-kept")
    items = [(m, k + 1) for k, m in enumerate(messages)]
    live.handle(items[:20])  # saved
    lost = live.handle(items[20:40], save=False)  # handled, never saved
    again = live.handle(items[20:40])
    assert (lost.assimilated, again.assimilated, again.duplicates) == (20, 20, 0)
    assert stored(store, "pend-kept") == reference(40)[0]
    store.close()
