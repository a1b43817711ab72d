"""Telemetry messages on a broker: one message is one sample time of one asset. Torch-free.

The wire format is a JSON object (UTF-8)::

    {"timestamp": "2024-05-02T08:00:04Z",        # ISO 8601 with an offset, or epoch seconds
     "seq": 17,                                   # optional: the publisher's counter
     "values": {"pump": 3.0, "h2": null},         # signal -> number, or null (no valid sample)
     "units": {"pump": "V", "h2": "V"}}           # optional: signal -> unit (pint spelling)

A message carries its publisher's names and units. `to_samples` maps a batch of them through a
data contract (`twin_ml.data.telemetry.Contract`) onto the model's names and units, with the
contract's own rules and converter (`convert_units`): a signal is fed by the message key its
contract entry reads (`column`, default its name), a unit the message states wins over the
contract's `source_unit`, values outside the physical `range` are invalid. `messages_from_frame`
turns a recorded long telemetry frame (`read_telemetry`, `twin_ml.data.real.records`) into
messages, one per timestamp in time order, the inverse of `to_frame`.

A message that breaks the format raises `MessageError` (a ValueError) naming the field, e.g.
``values.h2: 'high' is not a number; give a JSON number or null``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from twin_ml.data.telemetry import Contract

FIELDS = ("timestamp", "seq", "values", "units")
TIMESTAMP_ALLOWED = (
    "an ISO 8601 time with an offset (2024-05-02T08:00:04Z) or epoch seconds (a JSON number)"
)


class MessageError(ValueError):
    """A telemetry message that breaks the format; `field` names where ("values.h2")."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class TelemetryMessage:
    """One sample time of an asset: `values` by the publisher's signal names (None: no valid
    sample), `units` by signal (optional; a signal without one is in its contract's source unit),
    `seq` the publisher's counter (optional). `timestamp` is read from an ISO 8601 string with an
    offset, epoch seconds, a datetime or a pandas Timestamp, and kept as a UTC Timestamp (ns).

    >>> m = TelemetryMessage("1970-01-01T00:00:04Z", {"pump": 3.0}, seq=1)
    >>> decode(encode(m)) == m
    True
    """

    timestamp: pd.Timestamp
    values: Mapping[str, float | None]
    units: Mapping[str, str] = field(default_factory=dict)
    seq: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "timestamp", _timestamp(self.timestamp))
        object.__setattr__(self, "values", _values(self.values))
        object.__setattr__(self, "units", _units(self.units, self.values))
        object.__setattr__(self, "seq", _seq(self.seq))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (units and seq only when given)."""
        out: dict[str, Any] = {"timestamp": iso(self.timestamp)}
        if self.seq is not None:
            out["seq"] = self.seq
        out["values"] = dict(self.values)
        if self.units:
            out["units"] = dict(self.units)
        return out


def iso(ts: pd.Timestamp) -> str:
    """A UTC Timestamp as ISO 8601 with "Z", to the nanosecond where it has them."""
    return ts.tz_convert("UTC").isoformat().replace("+00:00", "Z")


def encode(message: TelemetryMessage) -> bytes:
    """The message as compact UTF-8 JSON."""
    return json.dumps(message.to_dict(), separators=(",", ":"), allow_nan=False).encode()


class _NonFinite:
    """NaN / Infinity / -Infinity in a payload (Python's json reads them; JSON has no such
    numbers): kept as a marker so that the error names the field it sits in."""

    def __init__(self, text: str):
        self.text = text


class _Object(dict):
    """A decoded JSON object that remembers the keys it was given more than once (Python's json
    keeps the last silently), so that the error names the field: values.h2."""

    repeated: tuple[str, ...] = ()


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = _Object(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        out.repeated = tuple(k for k, _ in pairs if k in seen or seen.add(k))
    return out


def _once(obj: Mapping[str, Any], where: str) -> None:
    repeated = getattr(obj, "repeated", ())
    if repeated:
        at = f"{where}.{repeated[0]}" if where else repeated[0]
        raise MessageError(at, "appears twice in one JSON object; give it once")


def decode(payload: bytes | bytearray | memoryview | str) -> TelemetryMessage:
    """A message from its JSON payload; MessageError names the field at fault."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MessageError(
                "payload", f"is not UTF-8 (byte {e.start}); a message is UTF-8 JSON"
            ) from None
    else:
        text = payload
    try:
        obj = json.loads(text, object_pairs_hook=_pairs, parse_constant=_NonFinite)
    except json.JSONDecodeError as e:
        raise MessageError(
            "payload", f"is not JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    return from_dict(obj)


def from_dict(obj: Any) -> TelemetryMessage:
    """A message from its decoded JSON object (the field checks of `decode`)."""
    if not isinstance(obj, dict):
        fields = ", ".join(FIELDS)
        raise MessageError(
            "payload", f"is a JSON {_json_type(obj)}; a message is an object {{{fields}}}"
        )
    _once(obj, "")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise MessageError(unknown[0], f"is not a message field; fields: {', '.join(FIELDS)}")
    for key in ("timestamp", "values"):
        if key not in obj:
            raise MessageError(key, "is required")
    return TelemetryMessage(
        timestamp=obj["timestamp"],
        values=obj["values"],
        units=obj.get("units") if obj.get("units") is not None else {},
        seq=obj.get("seq"),
    )


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float, _NonFinite)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "array"
    return "object" if isinstance(v, dict) else type(v).__name__


# ---- field checks --------------------------------------------------------------------------------


# date, time to the second or below (up to 9 digits), and an offset: a shape that pd.Timestamp
# reads exactly as pd.to_datetime(format="ISO8601") does (tests/test_stream.py compares them)
_ISO_FAST = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})\Z")


def _timestamp(value: Any) -> pd.Timestamp:
    where = "timestamp"
    if isinstance(value, bool) or value is None or isinstance(value, _NonFinite):
        shown = value.text if isinstance(value, _NonFinite) else _json_type(value)
        raise MessageError(where, f"{shown} is not a time; give {TIMESTAMP_ALLOWED}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        if not math.isfinite(float(value)):
            raise MessageError(where, f"{value} is not a time; give {TIMESTAMP_ALLOWED}")
        try:  # the decimal digits as written: 1714636804.0016384 is that many ns, not a float's
            ns = int((Decimal(repr(float(value))) * 10**9).to_integral_value())
            return pd.Timestamp(ns, unit="ns", tz="UTC")
        except (InvalidOperation, OverflowError, ValueError, pd.errors.OutOfBoundsDatetime):
            raise MessageError(
                where, f"{value} epoch seconds is outside 1677-2262 (pandas' time range)"
            ) from None
    if isinstance(value, str):
        try:  # the usual shape parsed directly (pd.to_datetime's ISO8601 path costs ~20x more)
            if _ISO_FAST.match(value):
                ts = pd.Timestamp(value)
            else:
                ts = pd.to_datetime(value, format="ISO8601")
        except (ValueError, TypeError, OverflowError):
            ts = None
        if ts is None or pd.isna(ts):
            raise MessageError(where, f"{value!r} is not a time; give {TIMESTAMP_ALLOWED}")
    elif isinstance(value, (pd.Timestamp, np.datetime64)) or hasattr(value, "isoformat"):
        ts = pd.Timestamp(value)
    else:
        raise MessageError(
            where, f"a JSON {_json_type(value)} is not a time; give {TIMESTAMP_ALLOWED}"
        )
    if ts.tzinfo is None:
        raise MessageError(
            where,
            f"{value!s} has no timezone; write it with an offset (2024-05-02T08:00:04Z or "
            "+02:00) or as epoch seconds",
        )
    try:
        return ts.tz_convert("UTC").as_unit("ns")
    except (OverflowError, pd.errors.OutOfBoundsDatetime):  # read at another unit, say seconds
        raise MessageError(
            where, f"{value!s} is outside 1677-2262 (pandas' time range at nanoseconds)"
        ) from None


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, _NonFinite):
        raise MessageError(
            where, f"{value.text} is not a JSON number; give a finite number, or null"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        shown = repr(value) if isinstance(value, str) else f"a JSON {_json_type(value)}"
        raise MessageError(where, f"{shown} is not a number; give a JSON number or null")
    x = float(value)
    if math.isnan(x):  # built in Python from a float column: NaN means no valid sample
        return None
    if not math.isfinite(x):
        raise MessageError(where, f"{value} is not finite; give a finite number, or null")
    return x


def _values(values: Any) -> dict[str, float | None]:
    if not isinstance(values, Mapping):
        raise MessageError(
            "values", f"is a JSON {_json_type(values)}; give an object {{signal: number|null}}"
        )
    if not values:
        raise MessageError("values", "is empty; give at least one signal: {signal: number|null}")
    _once(values, "values")
    out = {}
    for name, v in values.items():
        if not isinstance(name, str) or not name.strip():
            raise MessageError("values", f"{name!r} is not a signal name (a non-empty string)")
        out[name] = _number(v, f"values.{name}")
    return out


def _units(units: Any, values: Mapping[str, Any]) -> dict[str, str]:
    if units is None:
        return {}
    if not isinstance(units, Mapping):
        raise MessageError(
            "units", f"is a JSON {_json_type(units)}; give an object {{signal: unit}}"
        )
    _once(units, "units")
    out = {}
    for name, u in units.items():
        where = f"units.{name}"
        if name not in values:
            raise MessageError(
                where, f"the message has no value for {name!r}; values: {', '.join(values)}"
            )
        if not isinstance(u, str) or not u.strip():
            raise MessageError(where, f"{u!r} is not a unit; give a pint spelling, e.g. 'V', 'mm'")
        out[name] = u
    return out


def _seq(seq: Any) -> int | None:
    if seq is None:
        return None
    if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)):
        shown = repr(seq) if isinstance(seq, (str, float)) else f"a JSON {_json_type(seq)}"
        raise MessageError("seq", f"{shown} is not a whole number; give a JSON integer >= 0")
    if seq < 0:
        raise MessageError("seq", f"{seq} is negative; give a JSON integer >= 0")
    return int(seq)


# ---- recorded telemetry <-> messages ------------------------------------------------------------


def messages_from_frame(frame: pd.DataFrame, *, first_seq: int = 0) -> list[TelemetryMessage]:
    """A long telemetry frame (timestamp UTC, signal, value[, unit, quality]; what
    `read_telemetry` and `twin_ml.data.real.records` give) as one message per timestamp, in time
    order, `seq` counting from `first_seq`. A bad-quality or NaN sample is null; a signal's unit
    goes into `units` when the frame states one. A (timestamp, signal) given twice: the last row
    wins, as in `ingest`."""
    missing = [c for c in ("timestamp", "signal", "value") if c not in frame.columns]
    if missing:
        raise MessageError(
            "frame",
            f"a long telemetry frame needs columns {missing}; it has {', '.join(map(str, frame))}",
        )
    ts = pd.DatetimeIndex(frame["timestamp"])
    if ts.tz is None:
        raise MessageError("frame.timestamp", "timestamps are naive; read the file with a timezone")
    if len(frame) == 0:
        return []
    ns = ts.tz_convert("UTC").as_unit("ns").asi8
    try:
        values = pd.to_numeric(frame["value"], errors="raise").to_numpy(dtype=float)
    except (ValueError, TypeError) as e:
        raise MessageError("frame.value", f"holds a value that is not a number ({e})") from None
    if "quality" in frame.columns:
        values = np.where(frame["quality"].astype(str).to_numpy() == "bad", np.nan, values)
    signals = frame["signal"].astype(str).to_numpy()
    units = (
        frame["unit"].fillna("").astype(str).to_numpy()
        if "unit" in frame.columns
        else np.full(len(frame), "")
    )
    order = np.argsort(ns, kind="stable")
    starts = np.flatnonzero(np.diff(ns[order], prepend=ns[order][0] - 1))
    bounds = [*starts.tolist(), len(order)]
    out = []
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        vals: dict[str, float | None] = {}
        unit: dict[str, str] = {}
        for i in order[a:b]:
            name, v = signals[i], values[i]
            vals[name] = None if math.isnan(v) else float(v)
            if units[i]:
                unit[name] = units[i]
            else:
                unit.pop(name, None)
        out.append(
            TelemetryMessage(
                pd.Timestamp(int(ns[order[a]]), unit="ns", tz="UTC"), vals, unit, first_seq + k
            )
        )
    return out


def to_frame(messages: Iterable[TelemetryMessage]) -> pd.DataFrame:
    """Messages as a long telemetry frame (timestamp, signal, value, unit, quality): a null value
    is a bad-quality row. `read_telemetry` and `ingest` take it as they take a file."""
    rows = [
        (m.timestamp, name, np.nan if v is None else v, m.units.get(name, ""))
        for m in messages
        for name, v in m.values.items()
    ]
    frame = pd.DataFrame(rows, columns=["timestamp", "signal", "value", "unit"])
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    frame["value"] = frame["value"].astype(float)
    frame["quality"] = np.where(frame["value"].isna(), "bad", "good")
    return frame


# ---- messages -> the model's names and units -----------------------------------------------------


@dataclass(frozen=True)
class Samples:
    """A batch of messages on the model's names and units, at the messages' own times (no grid).

    start: the instant `t` counts from. timestamps: [T] the rows' instants (UTC). t: [T] seconds
    after start, increasing (one row per distinct time; a contract's clock_offset_s shifts its
    signal's times). values: per contract signal (contract order) [T] in the contract's unit, NaN
    where not valid. valid: per signal [T]
    bool, True = a valid sample (a null value, a row the signal is absent from, or a value outside
    the contract's range is not). seq: [T] the largest seq of the messages that fed each row (-1:
    none carried one).
    ignored: message keys no contract signal reads. out_of_range: per signal, values masked for
    being outside `range`.
    """

    start: pd.Timestamp
    timestamps: pd.DatetimeIndex  # [T] UTC, the rows' instants
    t: np.ndarray  # [T] float64 seconds after start
    values: dict[str, np.ndarray]  # name -> [T] float64, model units, NaN where invalid
    valid: dict[str, np.ndarray]  # name -> [T] bool, True = valid
    seq: np.ndarray  # [T] int64
    ignored: tuple[str, ...] = ()
    out_of_range: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.t)


def _readers(contract: Contract) -> dict[str, str]:
    """{message key: contract signal}: a signal's source (`column`, else its name) feeds it; a
    key equal to a signal's name feeds that signal too when no signal reads a source of that
    name (a publisher that already speaks the model's names)."""
    sources = {s.source: s.name for s in contract.signals}
    keys = {s.name: s.name for s in contract.signals if s.name not in sources}
    keys.update(sources)
    return keys


def to_samples(
    messages: Sequence[TelemetryMessage],
    contract: Contract,
    *,
    start: pd.Timestamp | str | None = None,
) -> Samples:
    """A batch of messages on the model's names and units (the contract's), at their own times.

    Units: a unit the message states wins, else the contract's `source_unit`, else the values are
    in the contract's unit; converted by `twin_ml.data.telemetry.convert_units` with the
    contract's unit_aliases (an unknown or incompatible unit raises TelemetryError naming
    `units.<key>` and the message). Times: each signal's timestamps shifted by its
    clock_offset_s; rows sorted by time, messages at the same time merged (per signal, the last
    message that carries it wins). `start` (default: the first row's time) is where `t` counts
    from: give a live session's start to keep its batches on one clock."""
    from twin_ml.data.telemetry import TelemetryError, convert_units

    readers = _readers(contract)
    by_name = {s.name: s for s in contract.signals}
    ignored: dict[str, None] = {}
    # per signal: (time ns, message index, raw value, unit, the message's key for it)
    rows: dict[str, list[tuple[int, int, float, str, str]]] = {s.name: [] for s in contract.signals}
    for k, m in enumerate(messages):
        if not isinstance(m, TelemetryMessage):
            raise MessageError(f"messages[{k}]", f"is a {type(m).__name__}, not a TelemetryMessage")
        for key, v in m.values.items():
            name = readers.get(key)
            if name is None:
                ignored[key] = None
                continue
            s = by_name[name]
            unit = m.units.get(key) or s.source_unit or s.unit
            rows[name].append((m.timestamp.value, k, np.nan if v is None else v, unit, key))
    offsets = {s.name: int(round(s.clock_offset_s * 1e9)) for s in contract.signals}
    grid = np.unique(
        np.array([t + offsets[n] for n, r in rows.items() for t, *_ in r], dtype=np.int64)
    )
    if start is not None:
        start_ts = _timestamp(start)
    elif len(grid):
        start_ts = pd.Timestamp(int(grid[0]), unit="ns", tz="UTC")
    else:
        raise MessageError("messages", "none carries a signal of the contract; nothing to map")
    seq = np.full(len(grid), -1, dtype=np.int64)
    msg_seq = np.array([-1 if m.seq is None else m.seq for m in messages], dtype=np.int64)
    values, valid, out_of_range = {}, {}, {}
    for s in contract.signals:
        col = np.full(len(grid), np.nan)
        r = rows[s.name]
        if r:
            t_ns = np.array([x[0] for x in r], dtype=np.int64) + offsets[s.name]
            idx = np.array([x[1] for x in r], dtype=np.int64)
            raw = np.array([x[2] for x in r], dtype=float)
            unit = np.array([x[3] for x in r], dtype=object)
            conv = np.empty(len(r))
            for u in dict.fromkeys(unit.tolist()):
                sel = np.flatnonzero(unit == u)
                try:
                    conv[sel] = convert_units(
                        raw[sel], u, s.unit, f"units.{r[sel[0]][4]}", contract.unit_aliases
                    )
                except TelemetryError as e:
                    first = messages[idx[sel[0]]]
                    which = f"seq {first.seq}" if first.seq is not None else f"#{idx[sel[0]]}"
                    raise TelemetryError(
                        e.where, f"message {which} at {iso(first.timestamp)}: {e.message}"
                    ) from None
            # one sample per row: of the messages that carry this signal at a time, the last
            by_order = np.argsort(idx, kind="stable")[::-1]
            rank = np.searchsorted(grid, t_ns[by_order])
            rank, first = np.unique(rank, return_index=True)
            last = by_order[first]
            col[rank] = conv[last]
            seq[rank] = np.maximum(seq[rank], msg_seq[idx[last]])
        ok = ~np.isnan(col)
        if s.range is not None:
            inside = (col >= s.range[0]) & (col <= s.range[1])
            out_of_range[s.name] = int((ok & ~inside).sum())
            ok &= inside
            col = np.where(ok, col, np.nan)
        values[s.name], valid[s.name] = col, ok
    t = (grid - start_ts.value) / 1e9  # integer ns first: differences exact before the division
    return Samples(
        start=start_ts,
        timestamps=pd.DatetimeIndex(grid.astype("datetime64[ns]")).tz_localize("UTC"),
        t=t.astype(float),
        values=values,
        valid=valid,
        seq=seq,
        ignored=tuple(ignored),
        out_of_range=out_of_range,
    )
