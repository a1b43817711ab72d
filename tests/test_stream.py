"""The broker side of a live twin (twin_ml/stream): the message format and its errors, the mapping
of messages through a data contract, NATS JetStream and MQTT against real servers (nats-server and
amqtt's broker, started by tests/brokers.py), a durable consumer killed with SIGKILL and
restarted, what amqtt's persistent sessions keep, and the replay of the Cascaded Tanks test
record (twin-replay). No timing is asserted: pacing is checked on a virtual clock."""

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from brokers import ConsumerProcess, free_port, running, start_mqtt

from twin_ml.data import real
from twin_ml.data.telemetry import Contract, TelemetryError, convert_units, ingest
from twin_ml.stream.brokers import (
    BrokerError,
    check_mqtt_topic,
    check_nats_subject,
    connect,
    redact,
)
from twin_ml.stream.messages import (
    MessageError,
    TelemetryMessage,
    decode,
    encode,
    messages_from_frame,
    to_frame,
    to_samples,
)
from twin_ml.stream.replay import load_messages, parse_speed, replay, replay_to

pytest_plugins = ("brokers",)  # the nats_server and mqtt_broker fixtures

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "data" / "real"
TANKS_CSV = REAL / "cascaded_tanks" / "dataBenchmark.csv"
TANKS = Contract.load(ROOT / "configs" / "contract" / "cascaded_tanks.yaml")
WAIT = 30.0  # seconds a test waits for a message before it fails (a hang guard, not a measure)


def msg(seq: int, t: float, **values) -> TelemetryMessage:
    return TelemetryMessage(t, values, seq=seq)


# ---- the message format ------------------------------------------------------------------------

BROKEN = [
    (b'{"timestamp": 0, "values": {"h2": "high"}}', "values.h2", "'high' is not a number"),
    (b'{"timestamp": 0, "values": {"h2": true}}', "values.h2", "not a number"),
    (b'{"timestamp": 0, "values": {"h2": NaN}}', "values.h2", "finite number, or null"),
    (b'{"timestamp": 0, "values": {"h2": 1, "h2": 2}}', "values.h2", "appears twice"),
    (b'{"timestamp": 0, "values": {}}', "values", "at least one signal"),
    (b'{"timestamp": 0, "values": [1.0]}', "values", "give an object"),
    (b'{"values": {"h2": 1}}', "timestamp", "is required"),
    (b'{"timestamp": "2024-05-02T08:00:00", "values": {"h2": 1}}', "timestamp", "no timezone"),
    (b'{"timestamp": "noon", "values": {"h2": 1}}', "timestamp", "ISO 8601 time with an offset"),
    (b'{"timestamp": false, "values": {"h2": 1}}', "timestamp", "is not a time"),
    (b'{"timestamp": 1e30, "values": {"h2": 1}}', "timestamp", "outside 1677-2262"),
    (b'{"timestamp": 0, "values": {"h2": 1}, "seq": 2.5}', "seq", "JSON integer >= 0"),
    (b'{"timestamp": 0, "values": {"h2": 1}, "seq": -1}', "seq", "negative"),
    (b'{"timestamp": 0, "values": {"h2": 1}, "units": {"h1": "V"}}', "units.h1", "no value"),
    (b'{"timestamp": 0, "values": {"h2": 1}, "units": {"h2": 5}}', "units.h2", "not a unit"),
    (b'{"timestamp": 0, "values": {"h2": 1}, "unit": {}}', "unit", "fields: timestamp, seq"),
    (b"[0, 1]", "payload", "a message is an object"),
    (b'{"timestamp": 0,', "payload", "is not JSON"),
    (b"\xff\xfe{}", "payload", "is not UTF-8"),
]


@pytest.mark.parametrize(("payload", "field", "says"), BROKEN)
def test_a_broken_message_is_refused_naming_its_field(payload, field, says):
    with pytest.raises(MessageError) as err:
        decode(payload)
    assert isinstance(err.value, ValueError)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ") and says in str(err.value)


ISO_TIMES = [
    "1970-01-01T00:00:00Z",
    "2024-05-02T08:00:04.25Z",
    "2024-05-02T08:00:04.123456789Z",
    "2024-05-02T08:00:04.1234567Z",
    "2024-05-02T08:00:04.1-05:30",
    "2024-02-29T23:59:59.999999999+14:00",
    "2024-05-02T08:00:04-00:00",
    "2262-04-11T23:47:16.854775807Z",  # the last nanosecond pandas holds
    "2262-04-11T23:47:16.854775808Z",
    "0001-01-01T00:00:00Z",
    "0001-01-01 00:00:00Z",  # not the fast path's shape: pd.to_datetime reads it
    "2024-02-30T00:00:00Z",
    "2023-02-29T00:00:00Z",
    "2024-13-01T00:00:00Z",
    "2024-05-02T23:59:60Z",
    "2024-05-02T24:00:00Z",
    "2024-05-02T08:61:04Z",
    "2024-05-02T08:00:04+25:00",
]


@pytest.mark.parametrize("text", ISO_TIMES)
def test_a_timestamp_string_reads_as_pandas_iso8601_parser_reads_it(text):
    """Timestamps of the usual shape are parsed by pd.Timestamp directly (~20x faster than
    pd.to_datetime's ISO 8601 path, and a message's decoding was mostly that): the oracle is
    pd.to_datetime(format="ISO8601") itself, to the nanosecond, or both refuse (a time
    outside pandas' nanosecond range included: such a message once escaped as a pandas error,
    not a refusal naming its field)."""
    payload = json.dumps({"timestamp": text, "values": {"h2": 1.0}}).encode()
    try:
        want = pd.to_datetime(text, format="ISO8601").tz_convert("UTC").as_unit("ns")
    except (ValueError, OverflowError):
        with pytest.raises(MessageError, match="timestamp"):
            decode(payload)
        return
    assert decode(payload).timestamp.value == want.value


def test_a_message_round_trips_to_the_nanosecond():
    m = TelemetryMessage(
        "2024-05-02T10:00:04.0016384+02:00", {"pump": 3.25, "h2": None}, {"pump": "mV"}, seq=7
    )
    assert m.timestamp == pd.Timestamp("2024-05-02T08:00:04.0016384Z")
    assert json.loads(encode(m)) == {
        "timestamp": "2024-05-02T08:00:04.001638400Z",
        "seq": 7,
        "values": {"pump": 3.25, "h2": None},
        "units": {"pump": "mV"},
    }
    assert decode(encode(m)) == m
    # epoch seconds are read by their decimal digits, not as the nearest float's nanoseconds
    epoch = decode(b'{"timestamp": 1714636804.0016384, "values": {"h2": 1}}')
    assert epoch.timestamp == m.timestamp
    assert decode(b'{"timestamp": 4, "values": {"h2": 1}}').timestamp == pd.Timestamp(
        "1970-01-01T00:00:04Z"
    )


# ---- messages <-> recorded telemetry, and through a data contract -------------------------------

RIG = Contract.parse(
    {
        "system": "rig",
        "period_s": 0.1,
        "unit_aliases": {"qsc": "0.125 m"},
        "signals": [
            {"name": "pump", "role": "input", "unit": "V", "column": "U_pump", "source_unit": "mV"},
            {
                "name": "h2",
                "role": "output",
                "unit": "m",
                "column": "level_raw",
                "source_unit": "qsc",
                "range": [0.0, 2.0],
            },
            {
                "name": "t_water",
                "role": "extra",
                "unit": "degC",
                "column": "T_w",
                "source_unit": "degF",
                "clock_offset_s": 0.05,
            },
        ],
    }
)


def test_messages_map_to_the_model_s_names_and_units_by_the_contract():
    t0 = pd.Timestamp("2024-05-02T06:00:00Z")
    messages = [
        TelemetryMessage(t0, {"U_pump": 2500.0, "level_raw": 8.0, "T_w": 212.0, "notes": 1}, seq=0),
        # a unit the message states wins over the contract's source_unit
        TelemetryMessage(t0 + pd.Timedelta("0.1s"), {"U_pump": 2.75}, {"U_pump": "V"}, seq=1),
        # two messages at one time merge; the level 20 counts = 2.5 m is outside [0, 2] m
        TelemetryMessage(t0 + pd.Timedelta("0.1s"), {"level_raw": 20.0, "T_w": None}, seq=2),
        # a publisher that already speaks the model's names; the level as mm
        TelemetryMessage(
            t0 + pd.Timedelta("0.2s"), {"pump": 3.0, "level_raw": 1234.5}, {"level_raw": "mm"}, 3
        ),
        # the same time again: the later message wins for the signal it carries
        TelemetryMessage(t0 + pd.Timedelta("0.2s"), {"U_pump": 3100.0, "T_w": 32.0}, seq=4),
    ]
    s = to_samples(messages, RIG)
    # t_water's clock runs 0.05 s behind: its samples sit between the others'
    ns = np.array([0, 50, 100, 150, 200, 250]) * 1_000_000
    assert np.array_equal(s.t, ns / 1e9)
    assert s.start == t0 and s.timestamps[1] == t0 + pd.Timedelta("50ms")
    nan = np.nan
    pump = np.concatenate(
        [convert_units([2500.0], "mV", "V"), [2.75], convert_units([3100.0], "mV", "V")]
    )
    assert np.array_equal(
        s.values["pump"], [pump[0], nan, pump[1], nan, pump[2], nan], equal_nan=True
    )
    h2 = convert_units([8.0], "qsc", "m", aliases={"qsc": "0.125 m"})[0]
    h2_mm = convert_units([1234.5], "mm", "m")[0]
    assert np.array_equal(s.values["h2"], [h2, nan, nan, nan, h2_mm, nan], equal_nan=True)
    assert s.valid["h2"].tolist() == [True, False, False, False, True, False]
    assert s.out_of_range == {"h2": 1}
    t_w = convert_units([212.0, 32.0], "degF", "degC")
    assert t_w.tolist() == [100.0, 0.0]  # exact: the converter's rational factors
    assert np.array_equal(s.values["t_water"], [nan, 100.0, nan, nan, nan, 0.0], equal_nan=True)
    assert s.valid["t_water"].tolist() == [False, True, False, False, False, True]
    assert s.seq.tolist() == [0, 0, 2, 2, 4, 4]
    assert s.ignored == ("notes",)
    # a session's own start keeps its batches on one clock
    later = to_samples(messages[3:], RIG, start=t0)
    assert np.array_equal(later.t, np.array([200, 250]) * 1_000_000 / 1e9)


@pytest.mark.parametrize(("unit", "says"), [("wibble", "unknown unit"), ("m", "dimension")])
def test_a_unit_the_contract_cannot_convert_names_the_key_and_the_message(unit, says):
    messages = [
        msg(0, 0.0, U_pump=1.0),
        TelemetryMessage(4.0, {"U_pump": 1.0}, {"U_pump": unit}, 9),
    ]
    with pytest.raises(TelemetryError) as err:
        to_samples(messages, RIG)
    assert err.value.where == "units.U_pump"
    assert "message seq 9 at 1970-01-01T00:00:04Z" in str(err.value) and says in str(err.value)


def test_recorded_telemetry_becomes_one_message_per_timestamp_in_time_order():
    ts = pd.to_datetime(["2024-01-01T00:00:08Z", "2024-01-01T00:00:00Z", "2024-01-01T00:00:04Z"])
    frame = pd.DataFrame(
        {
            "timestamp": ts.repeat(2),
            "signal": ["pump", "h2"] * 3,
            "value": [3.0, 5.0, 1.0, np.nan, 2.0, 4.0],
            "unit": ["V", "", "mV", "", "V", ""],
            "quality": ["good", "bad", "good", "good", "good", "good"],
        }
    )
    messages = messages_from_frame(frame, first_seq=10)
    assert [m.seq for m in messages] == [10, 11, 12]
    assert [m.timestamp for m in messages] == sorted(ts)
    assert [dict(m.values) for m in messages] == [
        {"pump": 1.0, "h2": None},  # NaN: no valid sample
        {"pump": 2.0, "h2": 4.0},
        {"pump": 3.0, "h2": None},  # bad quality
    ]
    assert [dict(m.units) for m in messages] == [{"pump": "mV"}, {"pump": "V"}, {"pump": "V"}]
    back = to_frame(messages)
    assert back["quality"].tolist() == ["good", "bad", "good", "good", "good", "bad"]


@pytest.fixture(scope="module")
def tanks_test():
    """The Cascaded Tanks test record: its long frame and the CSV it came from."""
    frame = real.records("cascaded_tanks", TANKS_CSV)["test"]
    return frame, pd.read_csv(TANKS_CSV)


def test_the_tanks_test_record_as_messages_and_back_through_the_contract(tanks_test):
    frame, raw = tanks_test
    messages = messages_from_frame(frame)
    assert [m.seq for m in messages] == list(range(1024))
    assert all(m.units == {"pump": "V", "h2": "V"} for m in messages)
    s = to_samples(messages, TANKS)
    assert np.array_equal(s.t, 4.0 * np.arange(1024))
    assert np.array_equal(s.values["pump"], raw["uVal"].to_numpy())
    assert np.array_equal(s.values["h2"], raw["yVal"].to_numpy())
    assert s.seq.tolist() == list(range(1024)) and all(v.all() for v in s.valid.values())
    # the messages as a frame ingest as the record itself does
    a, b = ingest(to_frame(messages), TANKS), ingest(frame, TANKS)
    assert np.array_equal(a.values, b.values, equal_nan=True) and np.array_equal(a.mask, b.mask)


# ---- NATS JetStream -----------------------------------------------------------------------------


def test_jetstream_round_trip_and_publisher_dedup(nats_server):
    subject = "plant.rt.telemetry"
    messages = [msg(k, 4.0 * k, pump=float(k), h2=0.5 * k) for k in range(3)]

    async def main():
        async with await connect(nats_server.url, stream="RT") as pub:
            acks = [await pub.publish(subject, encode(m), msg_id=f"p:{m.seq}") for m in messages]
            again = await pub.publish(subject, encode(messages[1]), msg_id="p:1")
            stored = await pub.stored()
        async with await connect(nats_server.url, name="rt-twin", stream="RT", batch=2) as b:
            sub = await b.subscribe("plant.rt.*")
            got = [await sub.next(timeout=WAIT) for _ in messages]
            for d in got:
                await d.ack()
            return acks, again, stored, got, await b.pending()

    acks, again, stored, got, pending = asyncio.run(main())
    seqs = [a.sequence for a in acks]
    assert seqs == list(range(seqs[0], seqs[0] + 3)) and not any(a.duplicate for a in acks)
    assert again.duplicate and again.sequence == seqs[1] and stored == 3
    assert [d.message() for d in got] == messages
    assert [d.sequence for d in got] == seqs
    assert all(d.subject == subject and d.delivered == 1 for d in got)
    assert pending == (0, 0)


def test_a_killed_durable_consumer_gets_every_unacked_message_and_no_acked_one(nats_server):
    """The consumer (its own process) acks 7 messages one by one, fetched 5 at a time, and is
    killed with SIGKILL holding the 8th: 8 and 9 were handed to it, not acked. Restarted under
    its name, it gets 8..24 (8 and 9 again, once ack_wait has passed) and none of 1..7."""
    subject, n, k = "plant.kill.telemetry", 24, 7

    async def publish():
        async with await connect(nats_server.url, stream="KILL") as pub:
            for m in range(n):
                await pub.publish(subject, encode(msg(m, 4.0 * m, h2=float(m))), msg_id=f"k:{m}")

    asyncio.run(publish())
    child = ConsumerProcess(
        nats_server.url, subject, "kill-twin", ack=k, stream="KILL", ack_wait=1, batch=5
    )
    try:
        rows = child.read_until_holding()
    finally:
        child.kill()
    assert [(r["seq"], r["acked"]) for r in rows] == [(m, m < k) for m in range(k + 1)]
    acked = {r["seq"] for r in rows if r["acked"]}

    async def restart():
        async with await connect(
            nats_server.url, name="kill-twin", stream="KILL", ack_wait=1, batch=5
        ) as b:
            sub = await b.subscribe(subject)
            seen: list[tuple[int, int]] = []
            while {s for s, _ in seen} != set(range(k, n)):
                d = await sub.next(timeout=WAIT)
                seen.append((d.message().seq, d.delivered))
                await d.ack()
            return seen, await b.pending()

    seen, pending = asyncio.run(restart())
    assert not acked & {s for s, _ in seen}
    again = {s for s, times in seen if times > 1}
    assert k in again and again <= set(range(k, 10))  # only what the killed one had fetched
    assert pending == (0, 0)  # nothing left to deliver or to ack: no acked one comes back


def test_a_durable_name_keeps_its_subject(nats_server):
    async def main():
        async with await connect(nats_server.url, name="one-twin", stream="NAMES") as b:
            await b.subscribe("plant.a.telemetry")
            with pytest.raises(ValueError, match="name: the durable consumer 'one-twin'"):
                await b.subscribe("plant.b.telemetry")
        async with await connect(nats_server.url, stream="NAMES") as b:
            with pytest.raises(ValueError, match="name: a subscription needs"):
                await b.subscribe("plant.a.telemetry")
            with pytest.raises(ValueError, match="subject: 'plant..x' is not a NATS subject"):
                await b.publish("plant..x", b"{}")
            with pytest.raises(ValueError, match=r"no wildcards"):
                await b.publish("plant.*.x", b"{}")

    asyncio.run(main())


@pytest.mark.parametrize("scheme", ["nats", "mqtt"])
def test_an_unreachable_broker_is_one_error_naming_the_url(scheme):
    url = f"{scheme}://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerError, match=f"url: cannot .* at {url}"):
        asyncio.run(connect(url, timeout=2))


@pytest.mark.parametrize(
    ("url", "says"),
    [("http://127.0.0.1:80", "scheme 'http'"), ("nats://", "names no host"), ("x", "no scheme")],
)
def test_a_url_that_is_no_broker_s_says_what_is_allowed(url, says):
    with pytest.raises(ValueError, match=f"url: .*{says}.*nats://HOST.*mqtt://"):
        asyncio.run(connect(url))


@pytest.mark.parametrize(
    ("check", "subject", "wildcards", "ok"),
    [
        (check_nats_subject, "plant.tanks.telemetry", False, True),
        (check_nats_subject, "plant.*.telemetry", True, True),
        (check_nats_subject, "plant.>", True, True),
        (check_nats_subject, "plant.>.x", True, False),
        (check_nats_subject, "plant.t*", True, False),
        (check_nats_subject, "plant tanks", False, False),
        (check_mqtt_topic, "plant/tanks/telemetry", False, True),
        (check_mqtt_topic, "plant/+/telemetry", True, True),
        (check_mqtt_topic, "plant/#", True, True),
        (check_mqtt_topic, "plant/#/x", True, False),
        (check_mqtt_topic, "plant/+/x", False, False),
        (check_mqtt_topic, "$SYS/x", True, False),
    ],
)
def test_subjects_and_topics_are_checked_before_they_reach_a_broker(check, subject, wildcards, ok):
    if ok:
        assert check(subject, wildcards=wildcards) == subject
    else:
        with pytest.raises(ValueError, match=f"subject: '{re.escape(subject)}' is not an? "):
            check(subject, wildcards=wildcards)


def test_a_password_never_reaches_a_message():
    assert redact("mqtt://twin:s3cret@host:1883") == "mqtt://twin@host:1883"
    with pytest.raises(ValueError) as err:
        asyncio.run(connect("amqp://twin:s3cret@host"))
    assert "s3cret" not in str(err.value)


# ---- MQTT (amqtt) -------------------------------------------------------------------------------


def test_mqtt_qos1_round_trip_with_a_wildcard(mqtt_broker):
    messages = [msg(k, 4.0 * k, pump=float(k)) for k in range(3)]

    async def main():
        async with await connect(mqtt_broker.url, name="rt-twin") as b:
            sub = await b.subscribe("plant/+/telemetry")
            async with await connect(mqtt_broker.url) as pub:
                await pub.publish("plant/tanks/telemetry", encode(messages[0]))
                await pub.publish("plant/tanks/status", b"not for the twin")
                for m in messages[1:]:
                    await pub.publish("plant/tanks/telemetry", encode(m))
            got = [await sub.next(timeout=WAIT) for _ in messages]
            for d in got:
                await d.ack()  # a no-op: the client acknowledged QoS 1 on receipt
            return got

    got = asyncio.run(main())
    assert [d.message() for d in got] == messages  # in order; the status topic did not match
    assert all(d.subject == "plant/tanks/telemetry" and d.sequence is None for d in got)


async def away(url: str, name: str, topic: str, restart=None) -> list[int]:
    """A subscriber with a persistent session receives one message, disconnects; five are
    published while it is away (then the broker is restarted, if asked); it reconnects under the
    same client id, and a marker follows. Returns the seqs it got after reconnecting."""
    async with await connect(url, name=name) as b:
        sub = await b.subscribe(topic)
        async with await connect(url) as pub:
            await pub.publish(topic, encode(msg(100, 0.0, h2=1.0)))
            assert (await sub.next(timeout=WAIT)).message().seq == 100
    async with await connect(url) as pub:
        for k in range(5):
            await pub.publish(topic, encode(msg(k, 4.0 * k, h2=float(k))))
    if restart is not None:
        await asyncio.to_thread(restart)
    async with await connect(url, name=name) as b:
        sub = await b.subscribe(topic)
        async with await connect(url) as pub:
            await pub.publish(topic, encode(msg(101, 99.0, h2=1.0)))
        got = []
        while not got or got[-1] != 101:
            got.append((await sub.next(timeout=WAIT)).message().seq)
    return got


def test_mqtt_persistent_session_of_a_named_client_gets_what_came_while_it_was_away(mqtt_broker):
    assert asyncio.run(away(mqtt_broker.url, "away-twin", "plant/away")) == [0, 1, 2, 3, 4, 101]


def test_amqtt_default_anonymous_sessions_drop_what_came_while_away(tmp_path):
    """amqtt's default configuration (allow_anonymous: true) marks every session anonymous, and
    keeps no offline messages for an anonymous one, clean_session=False or not."""
    with running(start_mqtt(tmp_path, allow_anonymous=True)) as broker:
        assert asyncio.run(away(broker.url, "anon-twin", "plant/anon")) == [101]


def test_mqtt_sessions_do_not_survive_a_broker_restart(mqtt_broker):
    got = asyncio.run(away(mqtt_broker.url, "restart-twin", "plant/restart", mqtt_broker.restart))
    assert got == [101]


def test_a_killed_mqtt_consumer_loses_the_message_it_held(mqtt_broker):
    """The contrast with JetStream: QoS 1 is acknowledged by the client library on receipt, so a
    consumer killed (SIGKILL) while it holds message 3, unhandled, does not get it again when it
    comes back under its client id; the next message it gets is the one published after."""
    topic = "plant/held"

    async def publish(seqs):
        async with await connect(mqtt_broker.url) as pub:
            for k in seqs:
                await pub.publish(topic, encode(msg(k, 4.0 * k, h2=float(k))))

    async def subscribed():
        async with await connect(mqtt_broker.url, name="held-twin") as b:
            await b.subscribe(topic)

    asyncio.run(subscribed())  # the session and its subscription exist before anything is sent
    child = ConsumerProcess(mqtt_broker.url, topic, "held-twin", ack=3)
    try:
        asyncio.run(publish(range(4)))
        rows = child.read_until_holding()
    finally:
        child.kill()
    assert [(r["seq"], r["acked"]) for r in rows] == [(0, True), (1, True), (2, True), (3, False)]

    async def restart():
        async with await connect(mqtt_broker.url, name="held-twin") as b:
            sub = await b.subscribe(topic)
            await publish([4])
            return (await sub.next(timeout=WAIT)).message().seq

    assert asyncio.run(restart()) == 4


def test_mqtt_refuses_a_client_without_a_user_name_on_this_broker(mqtt_broker):
    url = mqtt_broker.url.replace("twin@", "")
    with pytest.raises(BrokerError, match="not authorized; give a user name in the URL"):
        asyncio.run(connect(url, name="nobody"))


# ---- replay -------------------------------------------------------------------------------------


def test_replay_paces_by_the_record_s_time_on_a_virtual_clock(nats_server):
    """Message k is due (t_k - t_0) / speed after the first: the sleeps a replay asks for, on a
    clock that only its sleeps move, and the order the stream stored them in."""
    messages = [msg(k, t, h2=float(k)) for k, t in enumerate([0.0, 4.0, 8.0, 20.0])]
    now, sleeps = [0.0], []

    async def sleep(dt):
        sleeps.append(dt)
        now[0] += dt

    async def main(speed):
        async with await connect(nats_server.url, name=f"pace{speed}", stream="PACE") as b:
            result = await replay(
                messages, b, "plant.pace.telemetry", speed=speed, progress=False,
                clock=lambda: now[0], sleep=sleep,
            )  # fmt: skip
            sub = await b.subscribe("plant.pace.telemetry")
            got = [await sub.next(timeout=WAIT) for _ in messages]
            return result, [d.message() for d in got]

    result, got = asyncio.run(main(100))
    assert sleeps == pytest.approx([0.04, 0.04, 0.12], rel=4 * np.finfo(float).eps)
    assert got == messages and result.messages == 4 and result.wall_s == pytest.approx(0.2)
    sleeps.clear()
    assert asyncio.run(main("max"))[0].speed == 0 and sleeps == []


@pytest.mark.parametrize("bad", ["-1", "fast", "nan", "inf1"])
def test_a_speed_that_is_no_speed_says_what_is_allowed(bad):
    with pytest.raises(ValueError, match="speed: .* or 0 / max"):
        parse_speed(bad)
    assert parse_speed("100x") == 100 and parse_speed("max") == parse_speed(0) == 0


def test_load_messages_names_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="no such telemetry file"):
        load_messages(tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="dataset among cascaded_tanks, silverbox"):
        load_messages("tanks:test", data_dir=REAL)
    with pytest.raises(ValueError, match="record 'val' is unknown; records: estimation, test"):
        load_messages("cascaded_tanks:val", data_dir=REAL)


REPLAY = """
import sys
from training.replay import main
main(sys.argv[1:])
print("torch" in sys.modules)
"""


def test_twin_replay_publishes_the_tanks_test_record_in_order(nats_server, tanks_test, tmp_path):
    """twin-replay (in a process of its own, which never imports torch) puts the 1024 samples of
    cascaded_tanks:test on a stream; a durable consumer reads them back in order with the CSV's
    values. A second replay with the same publisher is dropped as duplicates."""
    _, raw = tanks_test
    subject, out = "plant.tanks.telemetry", tmp_path / "replay"
    args = [f"url={nats_server.url}", f"subject={subject}", "stream=TANKS", "speed=max"]
    args += ["source=cascaded_tanks:test", "publisher=tanks-rec", "progress=false"]
    r = subprocess.run(
        [sys.executable, "-c", REPLAY, *args, f"out_dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    *_, path, torch_loaded = r.stdout.strip().splitlines()
    assert torch_loaded == "False"
    summary = json.loads(Path(path).read_text())
    assert summary["messages"] == 1024 and (summary["first_seq"], summary["last_seq"]) == (0, 1023)
    assert summary["last_sequence"] - summary["first_sequence"] == 1023
    assert summary["duplicates"] == 0 and summary["stream"] == "TANKS"

    async def read_back():
        repeat = await replay_to(
            nats_server.url, subject, load_messages("cascaded_tanks:test", data_dir=REAL)[:10],
            speed=0, publisher="tanks-rec", stream="TANKS", progress=False,
        )  # fmt: skip
        async with await connect(nats_server.url, name="tanks-twin", stream="TANKS") as b:
            sub = await b.subscribe(subject)
            got = []
            for _ in range(1024):
                d = await sub.next(timeout=WAIT)
                got.append(d)
                await d.ack()
            return repeat, got, await b.pending(), await b.stored()

    repeat, got, pending, stored = asyncio.run(read_back())
    assert repeat.duplicates == 10 and stored == 1024 and pending == (0, 0)
    assert [d.sequence for d in got] == sorted(d.sequence for d in got)
    s = to_samples([d.message() for d in got], TANKS)
    assert s.seq.tolist() == list(range(1024))
    assert np.array_equal(s.t, 4.0 * np.arange(1024))
    assert np.array_equal(s.values["pump"], raw["uVal"].to_numpy())
    assert np.array_equal(s.values["h2"], raw["yVal"].to_numpy())


def test_twin_replay_refuses_a_bad_setting_in_one_line(capsys):
    from training.replay import main

    with pytest.raises(SystemExit) as e:
        main(["source=cascaded_tanks:test", "url=amqp://localhost", "subject=x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: url: 'amqp://localhost' has scheme")
