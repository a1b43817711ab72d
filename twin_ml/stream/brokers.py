"""Broker adapters for live telemetry, asyncio: NATS JetStream and MQTT (amqtt) behind one small
shape. Torch-free; the clients (nats-py, amqtt) are imported when a broker is connected.

    broker = await connect("nats://127.0.0.1:4222", name="tanks-twin")  # or mqtt://user@host:1883
    sub = await broker.subscribe("plant.tanks.telemetry")  # MQTT: plant/tanks/telemetry, plant/+/x
    async for d in sub:
        msg = d.message()            # the decoded TelemetryMessage (MessageError if it is broken)
        ...                          # assimilate, persist
        await d.ack()                # only then
    await broker.close()

What each broker guarantees (tested in tests/test_stream.py against real servers):

- NATS JetStream. Messages are stored in a stream (file storage; `connect` creates it, or adds
  the subject to an existing one). A subscription is a durable pull consumer with explicit ack,
  named by `name`: nothing is acked here; the caller acks once it has assimilated and persisted
  a message, and `ack()` returns only when the server has confirmed the ack. A consumer that dies
  (killed, connection dropped) and comes back under the same name gets every message it had not
  acked — those it had been handed are redelivered once `ack_wait` has passed since their
  delivery — and none of those it acked. At least once: a message handled but not acked before a
  crash comes again (`Delivery.delivered` > 1 says so), so handling must tolerate a repeat.
  A message published with `msg_id` (replay sends "<publisher>:<seq>") carries a Nats-Msg-Id
  header: the stream drops a second copy within its duplicate window (default 2 min), so a
  publisher may retry a publish whose answer it missed.
- MQTT (amqtt 0.12 client, MQTT 3.1.1), QoS 1 both ways. With a `name` the client connects with
  that fixed client id and clean_session=False (a persistent session), else with a random id and
  a clean session. QoS 1 is acknowledged by the client library when a message arrives, before
  the caller sees it: `Delivery.ack()` is a no-op, and a consumer that dies after receipt loses
  what it had not handled (at most once, from the caller's side; tested: a consumer killed while
  it holds a message does not get it again). What amqtt's broker keeps for a persistent session
  while the subscriber is offline: the QoS 1/2 messages published meanwhile, delivered in order on
  reconnect, only if the client authenticated as a named user on a broker that does not allow
  anonymous clients (`AnonymousAuthPlugin` with allow_anonymous: false, and a user name in the
  URL). With amqtt's default configuration (allow_anonymous: true) every session counts as
  anonymous: those messages are dropped (tested), and by amqtt's code the session itself is
  discarded within a second of the disconnect. Sessions live in the broker's memory: a broker
  restart loses them and what they held (tested). (amqtt's SessionDBPlugin, tried once with
  0.12.1 and a file database, restored the session but not the messages it held at the first
  restart, and after a second restart delivered again a message it had delivered before: not
  relied on here.) By
  amqtt's code, not tested: a QoS 1 message the broker had sent to a connection that dies before
  its PUBACK is dropped, not kept for the session, so a message published between a subscriber's
  crash and the broker noticing it (at once for a closed socket, after 1.5 keep-alives for a
  silent peer) can be lost. For telemetry that must not be lost, use JetStream.
"""

from __future__ import annotations

import asyncio
import logging
import re
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from twin_ml.stream.messages import TelemetryMessage

log = logging.getLogger(__name__)

SCHEMES = ("nats", "mqtt")
URL_ALLOWED = "nats://HOST[:PORT] (NATS JetStream) or mqtt://[USER@]HOST[:PORT] (MQTT)"
DEFAULT_STREAM = "TELEMETRY"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # JetStream stream and consumer names


class BrokerError(ConnectionError):
    """The broker cannot be reached, refused a request, or dropped the connection."""


# ---- the common shape ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """A publish the broker confirmed: `sequence` is the JetStream stream sequence (None on
    MQTT); `duplicate` is True when JetStream dropped it as a repeat of an earlier msg_id."""

    sequence: int | None
    duplicate: bool = False


async def _no_ack() -> None:
    """MQTT QoS 1 is acknowledged by the client library on receipt: nothing left to do."""


class Delivery:
    """One message as a subscription hands it over: `payload` (bytes), `subject` (the NATS
    subject or MQTT topic it was published on), `sequence` (the JetStream stream sequence; None
    on MQTT), `delivered` (how many times it has been delivered, this one included: > 1 is a
    redelivery; MQTT: 2 when the broker set the DUP flag). `await ack()` once it is handled."""

    __slots__ = ("_ack", "_acked", "_send_ack", "delivered", "payload", "sequence", "subject")

    def __init__(
        self,
        payload: bytes,
        subject: str,
        sequence: int | None,
        delivered: int,
        ack: Callable[[], Awaitable[None]] = _no_ack,
        send_ack: Callable[[], Awaitable[None]] | None = None,
    ):
        self.payload = payload
        self.subject = subject
        self.sequence = sequence
        self.delivered = delivered
        self._ack = ack
        self._send_ack = send_ack or ack  # the ack sent without waiting for its confirmation
        self._acked = False

    async def ack(self) -> None:
        """JetStream: acknowledge, and wait until the server confirms (a second call does
        nothing). MQTT: nothing (the client acknowledged QoS 1 on receipt)."""
        if not self._acked:
            await self._ack()
            self._acked = True

    def message(self) -> TelemetryMessage:
        """The payload decoded (`twin_ml.stream.messages.decode`; MessageError if broken)."""
        from twin_ml.stream.messages import decode

        return decode(self.payload)

    def __repr__(self) -> str:
        return (
            f"Delivery(subject={self.subject!r}, sequence={self.sequence}, "
            f"delivered={self.delivered}, {len(self.payload)} bytes)"
        )


async def ack_all(deliveries: list[Delivery]) -> None:
    """Acknowledge deliveries of one subscription in one round trip: every ack is sent, and the
    last one's confirmation awaited. The server handles one connection's acks in their order, so
    when the last is confirmed the earlier ones were handled; an ack lost anyway (a connection
    dropped in between) means only that the message comes again, which a handler must tolerate
    in any case (at least once)."""
    todo = [d for d in deliveries if not d._acked]
    for d in todo[:-1]:
        await d._send_ack()
        d._acked = True
    if todo:
        await todo[-1].ack()


class Subscription(ABC):
    """Deliveries in arrival order: `async for d in sub`, or `await sub.next(timeout)`."""

    subject: str

    @abstractmethod
    async def next(self, timeout: float | None = None) -> Delivery:
        """The next delivery; TimeoutError when none came within `timeout` seconds (None: wait)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop receiving. The durable state stays on the broker (the JetStream consumer, the
        MQTT session and its subscription): a new subscription under the same name resumes."""

    def buffered(self) -> int:
        """Deliveries received and not handed out yet (`next` returns them without waiting)."""
        return 0

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Delivery:
        return await self.next(None)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Broker(ABC):
    """A connection to a broker: publish, subscribe, close (also as `async with`)."""

    url: str
    kind: str  # "nats" or "mqtt"

    @abstractmethod
    async def publish(
        self, subject: str, payload: bytes, *, msg_id: str | None = None
    ) -> Published:
        """Publish and wait until the broker has it (JetStream: stored; MQTT: PUBACK).
        `msg_id`: JetStream's Nats-Msg-Id for deduplication (MQTT has none: ignored)."""

    async def publish_all(self, subject: str, payloads: list[bytes]) -> list[Published]:
        """Publish several messages in this order and wait until the broker has them all. Here:
        one at a time; JetStream overrides it with pipelined publishes."""
        return [await self.publish(subject, p) for p in payloads]

    @abstractmethod
    async def subscribe(self, subject: str) -> Subscription:
        """A durable subscription under the connection's `name` (see the module's notes)."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect (durable state stays on the broker)."""

    async def __aenter__(self) -> Broker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def parse_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a broker URL; ValueError naming `url` and what is allowed."""
    try:
        parts = urlsplit(str(url))
        port = parts.port
    except ValueError as e:
        raise ValueError(
            f"url: {redact(url)!r} is not a broker URL ({e}); give {URL_ALLOWED}"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ValueError(f"url: {redact(url)!r} has {shown}; give {URL_ALLOWED}")
    if not parts.hostname:
        raise ValueError(f"url: {redact(url)!r} names no host; give {URL_ALLOWED}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"url: {redact(url)!r} has a path or query; give {URL_ALLOWED}")
    return scheme, parts.hostname, port or (4222 if scheme == "nats" else 1883)


def redact(url: str) -> str:
    """The URL without its password, for messages and summaries (mqtt://twin@host:1883)."""
    try:
        parts = urlsplit(str(url))
        if parts.password is None:
            return str(url)
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{parts.username}@{parts.hostname}{port}"))
    except ValueError:
        return "(an unreadable URL)"


def load_client(url: str) -> None:
    """Import the client library of url's scheme (nats-py, amqtt) now: a process's start-up
    (nats-py takes ~0.2 s, its HTTP and TLS modules), which should not count as the first
    connection's time."""
    scheme, _, _ = parse_url(url)
    if scheme == "nats":
        import nats.js  # noqa: F401
    else:
        import amqtt.client  # noqa: F401


async def connect(
    url: str,
    *,
    name: str | None = None,
    stream: str = DEFAULT_STREAM,
    ack_wait: float = 30.0,
    batch: int = 16,
    timeout: float = 5.0,
) -> Broker:
    """A broker connection by URL: nats://HOST[:PORT] or mqtt://[USER@]HOST[:PORT].

    name: who this client is, for subscriptions that outlive it: the JetStream durable
        consumer's name, or the MQTT client id (persistent session). Needed to subscribe; a
        publisher may leave it out.
    stream, ack_wait, batch: JetStream only (`JetStreamBroker.connect`).
    timeout: seconds to wait for the connection and for each request's answer.
    """
    scheme, _, _ = parse_url(url)
    if scheme == "nats":
        return await JetStreamBroker.connect(
            url, name=name, stream=stream, ack_wait=ack_wait, batch=batch, timeout=timeout
        )
    return await MqttBroker.connect(url, name=name, timeout=timeout)


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{what}: {value!r} is not a JetStream name; use letters, digits, '-' and '_'"
        )
    return value


def _positive(value: float, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not x > 0:
        raise ValueError(f"{what}: {value!r} is not a positive number of seconds")
    return x


# ---- NATS JetStream ------------------------------------------------------------------------------


def check_nats_subject(subject: str, *, wildcards: bool) -> str:
    """A NATS subject: tokens separated by '.', none empty, no whitespace; with `wildcards`, '*'
    may stand for one token and '>' for the rest (last token only)."""
    tokens = subject.split(".") if isinstance(subject, str) else [""]
    allowed = "tokens separated by '.', e.g. plant.tanks.telemetry" + (
        " ('*' for one token, '>' for the rest)" if wildcards else " (no wildcards)"
    )
    for i, tok in enumerate(tokens):
        bad = (
            not tok
            or any(c.isspace() for c in tok)
            or (("*" in tok or ">" in tok) and not wildcards)
            or ("*" in tok and tok != "*")
            or (">" in tok and (tok != ">" or i != len(tokens) - 1))
        )
        if bad:
            raise ValueError(f"subject: {subject!r} is not a NATS subject; give {allowed}")
    return subject


def nats_covers(pattern: str, subject: str) -> bool:
    """Whether the NATS subject pattern matches every subject `subject` (itself possibly a
    pattern) matches."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or s[i] == ">" or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


class JetStreamBroker(Broker):
    """NATS JetStream: a stream (file storage) that holds the subjects published and subscribed
    here, publishes that the stream confirms, durable pull consumers with explicit ack. Build it
    with `await JetStreamBroker.connect(...)` (or `connect`)."""

    kind = "nats"

    def __init__(
        self,
        nc: Any,
        url: str,
        *,
        stream: str,
        name: str | None,
        ack_wait: float,
        batch: int,
        timeout: float,
        duplicate_window: float,
    ):
        self._nc = nc
        self._js = nc.jetstream(timeout=timeout)
        self.url = url
        self.stream = stream
        self.name = name
        self.ack_wait = ack_wait
        self.batch = batch
        self.timeout = timeout
        self.duplicate_window = duplicate_window
        self._subjects: list[str] | None = None  # the stream's, once looked up

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        name: str | None = None,
        stream: str = DEFAULT_STREAM,
        ack_wait: float = 30.0,
        batch: int = 16,
        timeout: float = 5.0,
        duplicate_window: float = 120.0,
    ) -> JetStreamBroker:
        """Connect to a NATS server with JetStream enabled.

        name: the durable consumer `subscribe` creates or resumes.
        stream: the stream messages are stored in (created on first use, file storage).
        ack_wait: seconds after a delivery before an unacked message is redelivered; longer
            than handling one batch takes, or a slow handler sees repeats.
        batch: messages fetched per request (each of them waits for its ack from then on).
        duplicate_window: seconds the stream remembers a Nats-Msg-Id (for a new stream).
        """
        import nats

        if parse_url(url)[0] != "nats":
            raise ValueError(f"url: {redact(url)!r} is not a nats:// URL")
        _check_name(stream, "stream")
        if name is not None:
            _check_name(name, "name")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch: {batch!r} is not a whole number >= 1")
        ack_wait, timeout = _positive(ack_wait, "ack_wait"), _positive(timeout, "timeout")
        duplicate_window = _positive(duplicate_window, "duplicate_window")

        async def quiet(e: Exception) -> None:  # nats-py logs every reconnect attempt as an error
            log.debug("nats: %s", e)

        try:
            nc = await nats.connect(
                servers=[url],
                connect_timeout=max(1, round(timeout)),
                error_cb=quiet,
                max_reconnect_attempts=1,  # the first connection: fail fast, then reconnect on
                reconnect_time_wait=0.5,
            )
        except (OSError, nats.errors.Error, TimeoutError) as e:
            why = str(e) or type(e).__name__
            raise BrokerError(f"url: cannot reach a NATS server at {redact(url)} ({why})") from None
        nc.options["max_reconnect_attempts"] = 60  # a running consumer rides out a restart
        broker = cls(
            nc,
            url,
            stream=stream,
            name=name,
            ack_wait=ack_wait,
            batch=batch,
            timeout=timeout,
            duplicate_window=duplicate_window,
        )
        try:
            await broker._js.account_info()
        except Exception as e:
            await nc.close()
            raise BrokerError(
                f"url: the NATS server at {redact(url)} has no JetStream ({e})"
            ) from None
        return broker

    async def ensure_stream(self, subject: str) -> None:
        """The stream exists and holds `subject` (a pattern too): created with it, or the
        subject added to the stream's list when none of its subjects covers it (replacing those
        it covers: plant.rt.* takes the place of plant.rt.telemetry)."""
        import nats.js.api as api
        import nats.js.errors as jserr

        if self._subjects is not None and any(nats_covers(p, subject) for p in self._subjects):
            return
        try:
            info = await self._js.stream_info(self.stream)
        except jserr.NotFoundError:
            info = None
        try:
            if info is None:
                info = await self._js.add_stream(
                    api.StreamConfig(
                        name=self.stream,
                        subjects=[subject],
                        storage=api.StorageType.FILE,
                        duplicate_window=self.duplicate_window,
                    )
                )
            elif not any(nats_covers(p, subject) for p in info.config.subjects or []):
                # widen: the new pattern replaces the stream's subjects it covers
                config = info.config
                kept = [p for p in config.subjects or [] if not nats_covers(subject, p)]
                config.subjects = [*kept, subject]
                info = await self._js.update_stream(config)
        except jserr.APIError as e:
            raise BrokerError(
                f"stream {self.stream!r} cannot hold subject {subject!r}: {e.description}"
            ) from None
        self._subjects = list(info.config.subjects or [])

    async def publish(
        self, subject: str, payload: bytes, *, msg_id: str | None = None
    ) -> Published:
        """Store a message; `msg_id` goes out as its Nats-Msg-Id (the stream keeps one copy per
        id within its duplicate window). A publish whose answer does not come in time is sent
        again with the same id, up to 3 times, when it has one (no id: raised at once, because a
        blind resend could store it twice)."""
        import nats.errors

        check_nats_subject(subject, wildcards=False)
        await self.ensure_stream(subject)
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        tries = 3 if msg_id else 1
        for attempt in range(tries):
            try:
                ack = await self._js.publish(
                    subject,
                    bytes(payload),
                    timeout=self.timeout,
                    stream=self.stream,
                    headers=headers,
                )
                return Published(ack.seq, bool(ack.duplicate))
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
                if attempt == tries - 1:
                    raise BrokerError(
                        f"publish to {subject!r}: no answer from the stream {self.stream!r} "
                        f"({type(e).__name__}, {tries} tries)"
                    ) from None
        raise AssertionError("unreachable")

    async def publish_all(self, subject: str, payloads: list[bytes]) -> list[Published]:
        """Publish several messages in this order, pipelined: all are sent on the connection
        (in order: the stream stores them in the order sent), then every confirmation awaited.
        One confirmation missing after `timeout` or an error raises BrokerError; the caller
        publishes the lot again (no msg_id here: a repeat is stored twice, and the consumer of
        these messages tells repeats by the sequence each carries)."""
        import nats.errors

        check_nats_subject(subject, wildcards=False)
        await self.ensure_stream(subject)
        futures = []
        try:
            for payload in payloads:
                futures.append(
                    await self._js.publish_async(subject, bytes(payload), stream=self.stream)
                )
            acks = await asyncio.wait_for(asyncio.gather(*futures), self.timeout)
        except (TimeoutError, nats.errors.Error) as e:
            for f in futures:
                f.cancel()
            raise BrokerError(
                f"publish to {subject!r}: the stream {self.stream!r} did not confirm "
                f"{len(payloads)} messages ({type(e).__name__}: {e})"
            ) from None
        return [Published(a.seq, bool(a.duplicate)) for a in acks]

    async def subscribe(self, subject: str) -> JetStreamSubscription:
        """The durable pull consumer `name` on the stream, filtered to `subject` (wildcards
        allowed), explicit ack: created, or resumed where its acks left it. A consumer of that
        name that follows another subject is refused (give another name)."""
        import nats.js.api as api
        import nats.js.errors as jserr

        if self.name is None:
            raise ValueError(
                "name: a subscription needs a durable consumer name; connect with name=..."
            )
        check_nats_subject(subject, wildcards=True)
        await self.ensure_stream(subject)
        config = api.ConsumerConfig(
            durable_name=self.name,
            name=self.name,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subject=subject,
            # room for two fetches unacked (JetStream's default 1000 would hold back a fetch of
            # more: it then waits out its expiry)
            max_ack_pending=max(1000, 2 * self.batch),
        )
        try:
            info = await self._js.consumer_info(self.stream, self.name)
        except jserr.NotFoundError:
            info = None
        if info is not None:
            old = info.config
            if (old.filter_subject or "") != subject or old.ack_policy != api.AckPolicy.EXPLICIT:
                raise ValueError(
                    f"name: the durable consumer {self.name!r} on stream {self.stream!r} follows "
                    f"{old.filter_subject!r} with ack policy {old.ack_policy}, not {subject!r} "
                    "with explicit ack; give another name"
                )
        room = info.config.max_ack_pending if info is not None else None
        small = room is not None and 0 < room < 2 * self.batch  # -1: unlimited
        if info is None or info.config.ack_wait != self.ack_wait or small:
            try:  # create, or update it (the server keeps its acks and position)
                await self._js.add_consumer(self.stream, config)
            except jserr.APIError as e:
                raise BrokerError(f"consumer {self.name!r}: {e.description}") from None
        psub = await self._js.pull_subscribe_bind(durable=self.name, stream=self.stream)
        return JetStreamSubscription(psub, subject, self.batch, self.timeout)

    async def stored(self) -> int:
        """How many messages the stream holds now."""
        return int((await self._js.stream_info(self.stream)).state.messages)

    async def pending(self, name: str | None = None) -> tuple[int, int]:
        """A durable consumer's backlog (default: this connection's `name`): (messages not yet
        delivered, messages delivered and not acked yet)."""
        import nats.js.errors as jserr

        name = name or self.name
        if name is None:
            raise ValueError("name: which durable consumer? connect with name=... or give one")
        try:
            info = await self._js.consumer_info(self.stream, name)
        except jserr.NotFoundError:
            raise ValueError(
                f"name: no durable consumer {name!r} on stream {self.stream!r}"
            ) from None
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    async def close(self) -> None:
        if not self._nc.is_closed:
            await self._nc.close()


class JetStreamSubscription(Subscription):
    """Deliveries of a durable pull consumer, fetched `batch` at a time."""

    def __init__(self, psub: Any, subject: str, batch: int, timeout: float):
        self._psub = psub
        self.subject = subject
        self.batch = batch
        self.timeout = timeout
        self._buffer: deque[Any] = deque()

    async def _ack(self, msg: Any) -> None:
        import nats.errors

        try:
            await msg.ack_sync(timeout=self.timeout)
        except nats.errors.MsgAlreadyAckdError:
            pass
        except nats.errors.TimeoutError:
            raise BrokerError(
                f"ack of stream sequence {msg.metadata.sequence.stream}: the server did not "
                "confirm it in time; it will be redelivered"
            ) from None

    def buffered(self) -> int:
        return len(self._buffer)

    async def next(self, timeout: float | None = None) -> Delivery:
        import nats.errors

        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._buffer:
            wait = 5.0 if deadline is None else min(5.0, deadline - loop.time())
            if wait <= 0:
                raise TimeoutError(f"no message on {self.subject!r} within {timeout} s")
            try:  # a long poll: the server answers as soon as a message is there
                self._buffer.extend(await self._psub.fetch(self.batch, timeout=max(wait, 0.01)))
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.Error, ValueError) as e:  # closed connection or subscription
                raise BrokerError(
                    f"the subscription to {self.subject!r} ended ({e or type(e).__name__})"
                ) from None
        msg = self._buffer.popleft()
        meta = msg.metadata
        return Delivery(
            msg.data,
            msg.subject,
            meta.sequence.stream,
            meta.num_delivered,
            lambda: self._ack(msg),
            msg.ack,
        )

    async def close(self) -> None:
        """Unsubscribe this client; the durable consumer stays (fetched, unacked messages are
        redelivered after ack_wait)."""
        import nats.errors

        self._buffer.clear()
        try:
            await self._psub.unsubscribe()
        except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
            pass


# ---- MQTT ----------------------------------------------------------------------------------------


def check_mqtt_topic(topic: str, *, wildcards: bool) -> str:
    """An MQTT topic: levels separated by '/', not starting with '$'; with `wildcards`, '+'
    may stand for one level and '#' for the rest (last level only)."""
    allowed = "levels separated by '/', e.g. plant/tanks/telemetry" + (
        " ('+' for one level, '#' for the rest)" if wildcards else " (no wildcards)"
    )
    ok = isinstance(topic, str) and topic != "" and not topic.startswith("$")
    if ok:
        levels = topic.split("/")
        for i, level in enumerate(levels):
            wild = "+" in level or "#" in level
            last = i == len(levels) - 1
            if wild and (not wildcards or level not in ("+", "#") or (level == "#" and not last)):
                ok = False
    if not ok:
        raise ValueError(f"subject: {topic!r} is not an MQTT topic; give {allowed}")
    return topic


CONNACK_CODES = {  # MQTT 3.1.1, 3.2.2.3
    1: "refused: the broker does not speak MQTT 3.1.1",
    2: "refused: the client id was rejected",
    3: "refused: the broker is unavailable",
    4: "refused: bad user name or password",
    5: "refused: not authorized; give a user name in the URL, mqtt://USER@HOST:PORT",
}


class MqttBroker(Broker):
    """MQTT 3.1.1 by the amqtt client, QoS 1. Build it with `await MqttBroker.connect(...)`."""

    kind = "mqtt"

    def __init__(self, client: Any, url: str, name: str | None, timeout: float):
        self._client = client
        self.url = url
        self.name = name
        self.timeout = timeout
        self._subscription: MqttSubscription | None = None

    @classmethod
    async def connect(
        cls, url: str, *, name: str | None = None, keep_alive: int = 10, timeout: float = 5.0
    ) -> MqttBroker:
        """Connect to an MQTT broker. name: the fixed client id of a persistent session
        (clean_session=False: the broker keeps its subscriptions, and — see the module's notes —
        maybe the QoS 1 messages published while it is away). None: a random id, clean session.
        A user name in the URL (mqtt://twin@host:1883) authenticates the client."""
        from amqtt.client import MQTTClient
        from amqtt.errors import AMQTTError, ClientError, MQTTError

        if parse_url(url)[0] != "mqtt":
            raise ValueError(f"url: {redact(url)!r} is not an mqtt:// URL")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"name: {name!r} is not an MQTT client id (a non-empty string)")
        timeout = _positive(timeout, "timeout")
        config = {
            "keep_alive": int(keep_alive),
            "default_qos": 1,
            "auto_reconnect": False,  # the first connection fails fast; reconnects come after
            "reconnect_retries": 10,
            "reconnect_max_interval": 5,
            "connection_timeout": max(1, round(timeout)),
            "plugins": {},  # amqtt's default client plugin logs every packet
        }
        client = MQTTClient(client_id=name, config=config)
        try:
            await asyncio.wait_for(client.connect(url, cleansession=name is None), timeout)
        except (AMQTTError, ClientError, MQTTError, OSError, TimeoutError) as e:
            code = getattr(e, "return_code", None)
            why = CONNACK_CODES.get(code, f"refused, CONNACK code {code}") if code else None
            why = why or str(e) or type(e).__name__
            raise BrokerError(
                f"url: cannot connect to an MQTT broker at {redact(url)} ({why})"
            ) from None
        client.config.auto_reconnect = True  # a lost connection is resumed (same session)
        return cls(client, url, name, timeout)

    async def publish(
        self, subject: str, payload: bytes, *, msg_id: str | None = None
    ) -> Published:
        """Publish at QoS 1 and wait for the broker's PUBACK. (`msg_id` is ignored: MQTT has no
        deduplication; a QoS 1 subscriber may see a message twice.)"""
        from amqtt.errors import ClientError

        check_mqtt_topic(subject, wildcards=False)
        try:
            await self._client.publish(subject, bytes(payload), qos=1)
        except TimeoutError:
            raise BrokerError(
                f"publish to {subject!r}: no PUBACK from {redact(self.url)}"
            ) from None
        except ClientError as e:
            raise BrokerError(f"publish to {subject!r}: the connection is gone ({e})") from None
        return Published(None)

    async def subscribe(self, subject: str) -> MqttSubscription:
        """Subscribe at QoS 1 (wildcards + and # allowed). One subscription per connection: the
        client hands over every message of its session in one queue."""
        from amqtt.mqtt.constants import QOS_1

        if self.name is None:
            raise ValueError("name: a subscription needs a fixed client id; connect with name=...")
        if self._subscription is not None:
            raise ValueError(
                f"subject: this connection already follows {self._subscription.subject!r}; "
                "connect again (another name) for another topic"
            )
        check_mqtt_topic(subject, wildcards=True)
        codes = await self._client.subscribe([(subject, QOS_1)])
        if not codes or codes[0] not in (1, 2):
            raise BrokerError(f"subscribe to {subject!r}: the broker answered {codes}")
        self._subscription = MqttSubscription(self._client, subject)
        return self._subscription

    async def close(self) -> None:
        """Disconnect cleanly (the persistent session and its subscription stay)."""
        session = self._client.session
        if session is not None and session.transitions.is_connected():
            self._client.config.auto_reconnect = False
            await self._client.disconnect()


class MqttSubscription(Subscription):
    """Deliveries of an MQTT session at QoS 1 (`ack` is a no-op, see `Delivery.ack`)."""

    def __init__(self, client: Any, subject: str):
        self._client = client
        self.subject = subject

    async def close(self) -> None:
        """Stop reading; the session keeps its subscription (no UNSUBSCRIBE, which would end
        it): messages keep arriving until the connection closes, then wait in the session."""

    async def next(self, timeout: float | None = None) -> Delivery:
        from amqtt.errors import ClientError

        try:
            msg = await self._client.deliver_message(timeout)
        except TimeoutError:
            raise TimeoutError(f"no message on {self.subject!r} within {timeout} s") from None
        except ClientError as e:
            raise BrokerError(f"the MQTT connection closed ({e})") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our own cancellation
            raise BrokerError("the MQTT connection closed") from None
        if msg is None:
            raise BrokerError("the MQTT connection closed")
        dup = bool(getattr(msg.publish_packet, "dup_flag", False))
        return Delivery(bytes(msg.data), msg.topic, None, 2 if dup else 1)
