"""Replay recorded telemetry onto a broker, paced like the recording (or faster). Torch-free.

    messages = load_messages("cascaded_tanks:test", data_dir=Path("data/real"))
    result = await replay_to("nats://127.0.0.1:4222", "plant.tanks.telemetry", messages, speed=100)

A record is a telemetry file (Parquet or CSV, long or wide, as `read_telemetry` reads it) or
DATASET:RECORD of a real benchmark dataset (`twin_ml.data.real`, e.g. cascaded_tanks:test). Each
timestamp becomes one message (`messages_from_frame`) carrying the file's own signal names and
units, and `seq` 0, 1, ... in time order: the consumer maps them through its contract. Message k
goes out (t_k - t_0) / speed seconds after the first; a publish that falls behind is not made up
for by skipping, the next ones go out at once until the schedule is met again. speed 0 (or
"max") publishes as fast as the broker confirms. On NATS each message carries the Nats-Msg-Id
"<publisher>:<seq>": give the same `publisher` to a replay that resumes or repeats one within the
stream's duplicate window, and the stream keeps one copy of each message.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twin_ml.stream.brokers import DEFAULT_STREAM, Broker, connect
from twin_ml.stream.messages import TelemetryMessage, encode, iso, messages_from_frame

SPEED_ALLOWED = "a positive factor of real time (1, 100, 0.5), or 0 / max for as fast as possible"


def parse_speed(value: str | float) -> float:
    """A speed factor: a positive number, or 0 / "max" / "inf" (as fast as possible, given as 0)."""
    text = str(value).strip().lower()
    if text in ("max", "inf"):
        return 0.0
    if text.endswith("x"):  # 100x
        text = text[:-1]
    try:
        speed = float(text)
    except ValueError:
        speed = float("nan")
    if speed == 0:
        return 0.0
    if not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed: {value!r} is not a speed; give {SPEED_ALLOWED}")
    return speed


def load_messages(
    source: str | Path, *, data_dir: str | Path | None = None, first_seq: int = 0
) -> list[TelemetryMessage]:
    """The messages of a recorded telemetry file (.parquet/.csv) or of DATASET:RECORD (a real
    dataset's record, read from `data_dir`/<dataset>/<its file>), one per timestamp in time
    order, seq counting from `first_seq`."""
    from twin_ml.data import real
    from twin_ml.data.telemetry import read_telemetry

    text = str(source)
    path = Path(text)
    if path.suffix.lower() in (".parquet", ".csv"):
        if not path.is_file():
            raise ValueError(f"source: no such telemetry file {text!r}")
        frame = read_telemetry(path)
    else:
        name, sep, record = text.partition(":")
        if not sep or name not in real.SOURCES:
            raise ValueError(
                f"source {text!r} must be a .parquet/.csv file or DATASET:RECORD with a dataset "
                f"among {', '.join(real.SOURCES)}"
            )
        if data_dir is None:
            raise ValueError(f"source {text!r}: give data_dir, the folder of the real datasets")
        frames = real.records(name, Path(data_dir) / name / real.SOURCES[name]["file"])
        if record not in frames:
            raise ValueError(
                f"source {text!r}: record {record!r} is unknown; records: {', '.join(frames)}"
            )
        frame = frames[record]
    return messages_from_frame(frame, first_seq=first_seq)


def schedule(messages: Sequence[TelemetryMessage], speed: float) -> np.ndarray:
    """[N] seconds after the first publish at which each message is due: (t_k - t_0) / speed,
    all 0 for speed 0 (as fast as possible)."""
    if not messages:
        return np.zeros(0)
    ns = np.array([m.timestamp.value for m in messages], dtype=np.int64)
    if speed == 0:
        return np.zeros(len(ns))
    due = (ns - ns[0]) / 1e9 / speed
    if np.any(np.diff(due) < 0):
        k = int(np.flatnonzero(np.diff(due) < 0)[0]) + 1
        raise ValueError(
            f"messages: #{k} ({iso(messages[k].timestamp)}) is earlier than the one before it; "
            "a replay goes in time order"
        )
    return due


@dataclass(frozen=True)
class ReplayResult:
    """What a replay published: `messages` sent, of which `duplicates` the stream dropped as
    repeats of an earlier msg_id; the first and last seq and timestamp; the stream sequences
    (NATS; None on MQTT); the wall time it took and the largest lag behind schedule."""

    messages: int
    duplicates: int
    first_seq: int | None
    last_seq: int | None
    first_timestamp: str | None
    last_timestamp: str | None
    first_sequence: int | None
    last_sequence: int | None
    speed: float
    publisher: str
    wall_s: float
    max_lag_s: float


async def replay(
    messages: Sequence[TelemetryMessage],
    broker: Broker,
    subject: str,
    *,
    speed: float = 1.0,
    publisher: str | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> ReplayResult:
    """Publish `messages` in order on `subject`, message k (t_k - t_0) / speed seconds after
    the first (speed 0: as fast as the broker confirms), each publish confirmed before the next.
    publisher: the prefix of each message's Nats-Msg-Id, "<publisher>:<seq>" (default: new for
    this replay). progress: a tqdm bar on stderr. clock, sleep: the time source (for tests)."""
    from tqdm.auto import tqdm

    speed = parse_speed(speed)
    due = schedule(messages, speed)
    publisher = publisher or f"replay-{uuid.uuid4().hex[:12]}"
    duplicates, sequences, max_lag = 0, [], 0.0
    start = clock()
    with tqdm(total=len(messages), unit="msg", disable=not progress, desc=subject) as bar:
        for m, at in zip(messages, due):
            wait = start + float(at) - clock()
            if wait > 0:
                await sleep(wait)
            else:
                max_lag = max(max_lag, -wait)
            msg_id = f"{publisher}:{m.seq}" if m.seq is not None else None
            ack = await broker.publish(subject, encode(m), msg_id=msg_id)
            duplicates += ack.duplicate
            if ack.sequence is not None:
                sequences.append(ack.sequence)
            bar.update()
    seqs = [m.seq for m in messages if m.seq is not None]
    return ReplayResult(
        messages=len(messages),
        duplicates=duplicates,
        first_seq=seqs[0] if seqs else None,
        last_seq=seqs[-1] if seqs else None,
        first_timestamp=iso(messages[0].timestamp) if messages else None,
        last_timestamp=iso(messages[-1].timestamp) if messages else None,
        first_sequence=sequences[0] if sequences else None,
        last_sequence=sequences[-1] if sequences else None,
        speed=speed,
        publisher=publisher,
        wall_s=clock() - start,
        max_lag_s=max_lag,
    )


async def replay_to(
    url: str,
    subject: str,
    messages: Sequence[TelemetryMessage],
    *,
    speed: float = 1.0,
    publisher: str | None = None,
    stream: str = DEFAULT_STREAM,
    timeout: float = 5.0,
    progress: bool = True,
) -> ReplayResult:
    """`replay` on a broker connection opened for it (nats:// or mqtt:// URL), closed after."""
    speed = parse_speed(speed)
    broker = await connect(url, stream=stream, timeout=timeout)
    try:
        return await replay(
            messages, broker, subject, speed=speed, publisher=publisher, progress=progress
        )
    finally:
        await broker.close()
