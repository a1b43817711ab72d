"""twin-replay: publish a recorded telemetry record to a broker, paced like the recording.

    twin-replay source=FILE|DATASET:RECORD url=nats://HOST:PORT|mqtt://[USER@]HOST:PORT
                subject=SUBJECT [speed=1] [stream=TELEMETRY] [publisher=] [steps=]
                [progress=true] [timeout=5] [out_dir=runs/replay]

The record (`source`) is a telemetry file (.parquet/.csv, long or wide, as twin-ingest reads it)
or DATASET:RECORD of a real dataset (e.g. cascaded_tanks:test). Each timestamp becomes one JSON
message {"timestamp", "seq", "values", "units"} with the file's own signal names and units, and
seq 0, 1, ... in time order; a twin maps them through its data contract. `subject` is a NATS
subject (plant.tanks.telemetry) or an MQTT topic (plant/tanks/telemetry). `speed` is a factor of
real time (100: a 4 s sample period becomes 40 ms); 0 or max publishes as fast as the broker
confirms. Each publish is confirmed before the next (JetStream: stored; MQTT QoS 1: PUBACK).

On NATS the messages are stored in JetStream's stream `stream` (created, or the subject added to
it) with the Nats-Msg-Id "<publisher>:<seq>": repeat a replay with the same `publisher` within the
stream's duplicate window (2 min) and the stream keeps one copy of each message (the summary
counts the duplicates). Default: a new publisher per replay.

Writes out_dir/summary.json (messages, seq and time range, stream sequences, wall time) and
prints its path last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path
from typing import Any

from training._common import (
    REAL_DATA_DIR,
    Setting,
    defaults,
    fail,
    key_values,
    staged_dir,
    write_summary,
)

SETTINGS = {
    "source": Setting(None, "the record: a telemetry file or DATASET:RECORD", True),
    "url": Setting(None, "the broker: nats://HOST:PORT or mqtt://[USER@]HOST:PORT", True),
    "subject": Setting(None, "the NATS subject or MQTT topic to publish on", True),
    "speed": Setting("1", "a factor of real time (100: 100x faster), or 0 / max: no pauses"),
    "stream": Setting("TELEMETRY", "NATS only: the JetStream stream that stores the messages"),
    "publisher": Setting(None, "NATS only: the Nats-Msg-Id prefix (default: new per replay)"),
    "steps": Setting(None, "publish only the record's first N samples"),
    "progress": Setting("true", "a progress bar on stderr (true/false)"),
    "timeout": Setting("5", "seconds to wait for the broker's answers"),
    "out_dir": Setting("runs/replay", "where summary.json goes"),
}
DEFAULTS = defaults(SETTINGS)


def _bool(cfg: dict, key: str) -> bool:
    v = str(cfg[key]).strip().lower()
    if v not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{key} must be true or false, got {cfg[key]!r}")
    return v in ("true", "1", "yes")


def run(cfg: dict[str, Any]) -> Path:
    from twin_ml.stream.brokers import parse_url, redact
    from twin_ml.stream.replay import load_messages, parse_speed, replay_to

    missing = [k for k in ("source", "url", "subject") if not cfg[k]]
    if missing:
        raise ValueError(
            f"give {', '.join(f'{k}=...' for k in missing)} "
            "(source=FILE|DATASET:RECORD url=nats://HOST:PORT subject=SUBJECT)"
        )
    scheme, _, _ = parse_url(cfg["url"])
    speed = parse_speed(cfg["speed"])
    progress = _bool(cfg, "progress")
    try:
        timeout = float(cfg["timeout"])
    except ValueError:
        raise ValueError(f"timeout must be a number of seconds, got {cfg['timeout']!r}") from None
    messages = load_messages(cfg["source"], data_dir=REAL_DATA_DIR)
    if cfg["steps"]:
        try:
            steps = int(cfg["steps"])
        except ValueError:
            steps = 0
        if steps < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {cfg['steps']!r}")
        messages = messages[:steps]
    result = asyncio.run(
        replay_to(
            cfg["url"],
            cfg["subject"],
            messages,
            speed=speed,
            publisher=cfg["publisher"] or None,
            stream=cfg["stream"],
            timeout=timeout,
            progress=progress,
        )
    )
    out = Path(cfg["out_dir"])
    with staged_dir(out) as stage:
        write_summary(
            stage,
            {
                "command": "twin-replay",
                "source": cfg["source"],
                "url": redact(cfg["url"]),
                "subject": cfg["subject"],
                "stream": cfg["stream"] if scheme == "nats" else None,
                **dataclasses.asdict(result),
                "publisher": result.publisher if scheme == "nats" else None,
            },
        )
    print(
        f"published {result.messages} messages (seq {result.first_seq}..{result.last_seq}) to "
        f"{cfg['subject']} in {result.wall_s:.3g} s"
        + (f"; {result.duplicates} dropped as duplicates" if result.duplicates else ""),
        file=sys.stderr,
    )
    return out / "summary.json"


def main(argv: list[str] | None = None) -> None:
    from twin_ml.data.telemetry import TelemetryError
    from twin_ml.stream.brokers import BrokerError

    try:
        cfg = key_values(sys.argv[1:] if argv is None else argv, SETTINGS, __doc__)
        path = run(cfg)
    except (ValueError, TelemetryError, BrokerError, OSError) as e:
        fail(e)
    print(path)


if __name__ == "__main__":
    main()
