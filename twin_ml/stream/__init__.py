"""The broker side of a live twin (torch-free): telemetry messages and their mapping through a
data contract (`messages`), NATS JetStream and MQTT adapters with one shape (`brokers`), and the
replay of recorded telemetry onto a broker (`replay`).

The names load on first use, so a process that only consumes (brokers) does not import pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "TelemetryMessage": "twin_ml.stream.messages",
    "MessageError": "twin_ml.stream.messages",
    "Samples": "twin_ml.stream.messages",
    "encode": "twin_ml.stream.messages",
    "decode": "twin_ml.stream.messages",
    "messages_from_frame": "twin_ml.stream.messages",
    "to_frame": "twin_ml.stream.messages",
    "to_samples": "twin_ml.stream.messages",
    "Broker": "twin_ml.stream.brokers",
    "BrokerError": "twin_ml.stream.brokers",
    "Delivery": "twin_ml.stream.brokers",
    "Published": "twin_ml.stream.brokers",
    "Subscription": "twin_ml.stream.brokers",
    "JetStreamBroker": "twin_ml.stream.brokers",
    "MqttBroker": "twin_ml.stream.brokers",
    "connect": "twin_ml.stream.brokers",
    "ReplayResult": "twin_ml.stream.replay",
    "load_messages": "twin_ml.stream.replay",
    "replay": "twin_ml.stream.replay",
    "replay_to": "twin_ml.stream.replay",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'twin_ml.stream' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
