"""twin-stream: a live twin on a broker. Subscribes to telemetry, assimilates every sample into a
twin of a stored model (ensemble Kalman filter on its ONNX file), persists the twin, publishes
estimates and alarms, archives the aligned telemetry.

    twin-stream model=NAME:VERSION|NAME:<stage> url=nats://HOST:PORT|mqtt://[USER@]HOST:PORT
                subject=SUBJECT twin=ID|TEMPLATE [create=JSON|FILE] [contract=NAME|FILE]
                [estimates=SUBJECT] [alarms=SUBJECT] [archive=DIR] [twins_store=URL|FILE]
                [batch=64] [max_messages=] [idle=] [stream=TELEMETRY] [ack_wait=30] [snap=0.25]
                [consumer=NAME] [progress=true] [out_dir=runs/stream]

- A fleet: a `subject` with single-level wildcards (`plant.*.telemetry`, MQTT `plant/+/telemetry`)
  and a `twin` template of their tokens (`tanks-{1}`; a plain id: one twin fed by them all, as
  before): each message goes to the twin its subject
  names (plant.a7.telemetry: twin tanks-a7), each twin made, saved, archived and estimated as
  alone, and a batch's samples of all of them assimilated together (one forecast call and one
  vectorized analysis per round: cheaper per message than a consumer per twin). `consumer`
  names the durable consumer (default: the twin id, or the template with {i} as wi).
- `twin`: the twin's id in the store (`twins_store`, by default the SQLite file twin-serve uses:
  <BENTOML_HOME>/twin-ml/twins.sqlite, so `GET /twins/ID` on a server of the same store shows
  it). A twin the store does not hold is created on the first message from `create`: a twin
  create request as `POST /twins` takes it (noise, filter, estimate, initial_state, ...), as
  inline JSON or a .json/.yaml file; its inputs and start time come from that message.
- `contract`: the data contract that maps the publisher's names and units onto the model's
  (configs/contract/NAME.yaml, or a file); default: messages in the model's own names and units.
- `estimates` / `alarms`: subjects (NATS) or topics (MQTT) to publish to: one JSON estimate per
  sample (its one-step prediction, filtered outputs, NIS; the last of a batch with the states and
  parameters), one JSON object per alarm.
- `max_messages` / `idle`: stop after that many deliveries / when none came for `idle` seconds
  (default: run until interrupted, Ctrl-C).
- JetStream: a durable pull consumer named after the twin (`stream` holds the subject;
  `ack_wait`: seconds before an unacked delivery is redelivered); each message is acked only once
  its sample is assimilated and the twin saved, so a killed consumer loses nothing and
  assimilates nothing twice. MQTT: QoS 1 and a persistent session under the twin's id (see the
  README for what that can and cannot guarantee).

Writes out_dir/summary.json (counts: delivered, assimilated, duplicates, refused, resets, alarms,
published; wall time) and prints its path last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from training._common import CONFIG_DIR, Setting, defaults, fail, key_values, write_summary

SETTINGS = {
    "model": Setting(None, "the stored model: NAME:VERSION, NAME:latest or NAME:<stage>", True),
    "url": Setting(None, "the broker: nats://HOST:PORT or mqtt://[USER@]HOST:PORT", True),
    "subject": Setting(None, "the NATS subject or MQTT topic the telemetry comes on", True),
    "twin": Setting(None, "the twin's id in the store (created on the first message)", True),
    "create": Setting(None, "the twin's create settings: inline JSON or a .json/.yaml file"),
    "contract": Setting(None, "the data contract: configs/contract/NAME.yaml or a file"),
    "estimates": Setting(None, "publish estimates to this subject/topic"),
    "alarms": Setting(None, "publish alarms to this subject/topic"),
    "archive": Setting(
        None, "archive the aligned telemetry here (Parquet; default out_dir/archive)"
    ),
    "twins_store": Setting(None, "the twins' store: a SQLAlchemy URL or a SQLite file"),
    "batch": Setting("64", "deliveries assimilated, saved and acked together at most"),
    "max_messages": Setting(None, "stop after this many deliveries"),
    "idle": Setting(None, "stop when no message came for this many seconds"),
    "stream": Setting("TELEMETRY", "NATS only: the JetStream stream"),
    "ack_wait": Setting("30", "NATS only: seconds before an unacked delivery comes again"),
    "snap": Setting("0.25", "a time within snap x dt of a grid point is that point"),
    "consumer": Setting(None, "the durable consumer / MQTT session (default: from the twin id)"),
    "progress": Setting("true", "a progress bar on stderr (true/false)"),
    "out_dir": Setting("runs/stream", "where summary.json goes"),
}
DEFAULTS = defaults(SETTINGS)


def _number(cfg: dict, key: str, kind=float, low: float | None = None):
    if cfg[key] in (None, ""):
        return None
    try:
        v = kind(cfg[key])
    except ValueError:
        raise ValueError(f"{key} must be a {kind.__name__}, got {cfg[key]!r}") from None
    if low is not None and v < low:
        raise ValueError(f"{key} must be >= {low}, got {cfg[key]!r}")
    return v


def _create(spec: str | None) -> dict[str, Any]:
    if not spec:
        return {}
    text = spec
    if not spec.lstrip().startswith("{"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"create: {spec!r} is neither inline JSON nor a file")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
            if not isinstance(data, dict):
                raise ValueError(f"create: {spec} must hold a mapping")
            return data
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"create: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("create: must be a JSON object")
    return data


def _contract(spec: str | None, card):
    from twin_ml.data.telemetry import Contract
    from twin_ml.stream.live import model_contract

    if not spec:
        return model_contract(card)
    path = Path(spec)
    if not path.is_file():
        named = Path(CONFIG_DIR) / "contract" / f"{spec}.yaml"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", spec) or not named.is_file():
            raise ValueError(
                f"contract: {spec!r} is neither a file nor a contract in configs/contract"
            )
        path = named
    return Contract.load(path)


def run(cfg: dict[str, Any]) -> Path:
    from twin_ml import registry
    from twin_ml.assimilate.filter import OnnxForecast
    from twin_ml.stream.brokers import parse_url, redact
    from twin_ml.stream.live import LiveFleet, LiveTwin, consume, fleet_ids
    from twin_ml.stream.store import TwinStore, check_id, sqlite_url

    missing = [k for k in ("model", "url", "subject", "twin") if not cfg[k]]
    if missing:
        raise ValueError(
            f"give {', '.join(f'{k}=...' for k in missing)} (model=NAME:VERSION "
            "url=nats://HOST:PORT subject=SUBJECT twin=ID)"
        )
    parse_url(cfg["url"])
    subject = str(cfg["subject"])
    wildcard = "*" in subject.split(".") or "+" in subject.split("/")
    fleet = wildcard and "{" in str(cfg["twin"])  # else one twin fed by every matching subject
    if fleet:
        fleet_ids(cfg["subject"], cfg["twin"])  # a template of the subject's wildcards
    else:
        check_id(cfg["twin"], "twin")
    consumer = cfg["consumer"] or re.sub(r"\{(\d+)\}", r"w\1", cfg["twin"]).replace(".", "_")
    check_id(consumer, "consumer")
    batch = _number(cfg, "batch", int, 1)
    max_messages = _number(cfg, "max_messages", int, 1)
    idle = _number(cfg, "idle", float, 0)
    ack_wait = _number(cfg, "ack_wait", float, 0.1)
    snap = _number(cfg, "snap", float, 0)
    progress = str(cfg["progress"]).lower() in ("true", "1", "yes")
    create = _create(cfg["create"])
    blob, card = registry.onnx_bytes(cfg["model"])
    contract = _contract(cfg["contract"], card)
    store_spec = cfg["twins_store"] or registry._home() / "twin-ml" / "twins.sqlite"
    if "://" not in str(store_spec):  # a SQLite file: its folder made
        Path(store_spec).expanduser().parent.mkdir(parents=True, exist_ok=True)
        store_spec = sqlite_url(store_spec)
    store = TwinStore(str(store_spec))
    out = Path(cfg["out_dir"])
    forecast = OnnxForecast(blob, card)
    options = {"create": create, "snap": snap, "archive": cfg["archive"] or out / "archive"}
    if fleet:
        live = LiveFleet(store, card, forecast, contract, cfg["subject"], cfg["twin"], **options)
    else:
        live = LiveTwin(store, card, forecast, contract, cfg["twin"], **options)
    try:
        result = asyncio.run(
            consume(
                cfg["url"],
                cfg["subject"],
                live,
                name=consumer,
                estimates=cfg["estimates"],
                alarms=cfg["alarms"],
                batch=batch,
                max_messages=max_messages,
                idle_s=idle,
                stream=cfg["stream"],
                ack_wait=ack_wait,
                progress=progress,
            )
        )
    finally:
        store.close()
    out.mkdir(parents=True, exist_ok=True)
    write_summary(
        out,
        {
            "command": "twin-stream",
            "model": card.ref,
            "url": redact(cfg["url"]),
            "subject": cfg["subject"],
            "twin": cfg["twin"],
            **dataclasses.asdict(result),
        },
    )
    print(
        f"twin {cfg['twin']}: {result.assimilated} samples assimilated of {result.delivered} "
        f"delivered ({result.duplicates} duplicates skipped, {result.refused} refused, "
        f"{result.alarms} alarms) in {result.wall_s:.3g} s",
        file=sys.stderr,
    )
    return out / "summary.json"


def main(argv: list[str] | None = None) -> None:
    from twin_ml import registry
    from twin_ml.contract import RequestError
    from twin_ml.data.telemetry import TelemetryError
    from twin_ml.stream.brokers import BrokerError

    try:
        cfg = key_values(sys.argv[1:] if argv is None else argv, SETTINGS, __doc__)
        path = run(cfg)
    except KeyboardInterrupt:
        fail(ValueError("interrupted: what was acked is saved; the rest comes again"), 130)
    except (
        ValueError,
        RequestError,
        TelemetryError,
        BrokerError,
        OSError,
        registry.RegistryError,
    ) as e:
        fail(e)
    print(path)


if __name__ == "__main__":
    main()
