"""Telemetry: read sensor data, check it against a data contract, align it onto the model's grid,
and report its quality. Torch-free.

The project's telemetry format is Parquet (CSV also reads), in one of two layouts:

    long:  timestamp | signal | value | unit | quality     (unit and quality optional)
    wide:  timestamp | <signal> | <signal> ...             (a header may carry its unit: "pump [V]")

Timestamps are timezone-aware and UTC inside. Naive timestamps need a timezone; numbers are counted
in a unit (seconds unless told) after an epoch (default 1970-01-01T00:00:00Z). `quality`, when
present, is good / uncertain / bad (bad samples are masked).

A `Contract` (per system, YAML under configs/contract/) declares the expected signals with their
role (input, output, or extra: kept but not used by the model), unit, physical range,
interpolation and known clock offset, the nominal sampling period, and how to read a foreign file:
which source column feeds each signal (`column`), the unit that column is in when its header says
none (`source_unit`, any pint expression: "mm", "0.125 m", "degF"), spellings of its own
(`unit_aliases`), and the timestamp column with its unit, epoch and timezone (`timestamp`).
`ingest` then:

1. checks the frame's structure (pandera) and every signal's unit: known spellings are converted
   to the contract's unit (pint, with exact rational factors and offsets), unknown or
   incompatible units are refused, naming the signal;
2. shifts each sensor's timestamps by its clock offset, sorts, and removes duplicated timestamps
   (the last sample wins; conflicting values are counted);
3. masks values outside the physical range, flags stuck runs (a value repeated for
   `stuck_samples` samples or more; masked only when the contract says so);
4. brings every signal onto the grid (start, start + period, ...) with its declared interpolation
   (zoh holds the last value, linear interpolates between the samples around a grid point; at a
   record's end or a gap's edge, the nearest sample within `tolerance_s`), but never across a gap
   longer than `max_gap_s`: such grid points are masked. A grid point with a sample within
   `tolerance_s` counts as sampled, the others as interpolated. A sample within the timestamps'
   resolution of a grid point (a thousandth of the period plus the float resolution of the
   timestamps, e.g. float32 seconds) is on that point: its value is taken as it is, and the last
   sample of a record ends the grid even when float32 rounding put it a hair early;
5. estimates each signal's time skew against the first input (the lag of the largest
   cross-correlation of first differences).

Nothing is dropped silently: the report lists per signal what was masked, interpolated, refused
or ignored, and the validity travels with the values (invalid points are excluded from losses).

The ingested file (`save`: telemetry.parquet) is wide: `timestamp` (UTC), a column
"<signal> [<unit>]" per contract signal in contract order, then a boolean "<signal>.valid" per
signal: True where the sample is valid, False where it is masked (its value is NaN there). This is
the opposite of numpy.ma's mask convention, hence the name. Files written before this name carry
"<signal>.mask" with the same meaning (True = valid); `read_telemetry` reads both, as validity.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from twin_ml._io import writing

QUALITY = ("good", "uncertain", "bad")
LONG_COLUMNS = ("timestamp", "signal", "value", "unit", "quality")
EPOCH = pd.Timestamp("1970-01-01T00:00:00Z")


class TelemetryError(ValueError):
    """Bad telemetry or contract; the message names the field or signal and what is allowed."""

    def __init__(self, where: str, message: str):
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}")


# ---- the data contract ---------------------------------------------------------------------------

TIME_UNITS = ("s", "ms", "us", "ns", "min", "h")
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "min": 60.0, "h": 3600.0}


def _check_timezone(name: str, where: str) -> None:
    try:
        pd.Timestamp("2000-01-01").tz_localize(name)
    except Exception:  # pytz/zoneinfo raise several types for an unknown name
        raise TelemetryError(
            where, f"{name!r} is not a timezone (an IANA name, e.g. UTC or Europe/Berlin)"
        ) from None


def _epoch(value: str | pd.Timestamp, timezone: str | None, where: str) -> pd.Timestamp:
    """The epoch as a UTC instant; a naive one is read in `timezone`."""
    try:
        ts = pd.Timestamp(value) if isinstance(value, pd.Timestamp) else None
        if ts is None:
            ts = pd.to_datetime(str(value), format="ISO8601")
    except (ValueError, TypeError):
        ts = None
    if ts is None or pd.isna(ts):
        raise TelemetryError(
            where, f"{str(value)!r} is not an ISO 8601 time, e.g. 1970-01-01T00:00:00Z"
        )
    if ts.tzinfo is None:
        if timezone is None:
            raise TelemetryError(
                where,
                f"{value} has no timezone; write it with an offset, e.g. 1970-01-01T00:00:00Z, "
                "or give the timezone",
            )
        _check_timezone(timezone, "timezone")
        ts = ts.tz_localize(timezone)
    return ts.tz_convert("UTC")


class TimestampContract(BaseModel):
    """Where a file keeps its time, and how to read it (the contract's `timestamp:` section).

    column: the timestamp column (default "timestamp").
    unit: what a numeric timestamp counts after `epoch`: s, ms, us, ns, min or h; or datetime for
        ISO 8601 text or a datetime column. Default: numbers are seconds, anything else datetimes.
    epoch: the instant numbers count from, ISO 8601 (default 1970-01-01T00:00:00Z); a naive
        epoch is read in `timezone`.
    timezone: the zone of naive datetimes (an IANA name: UTC, Europe/Berlin); datetimes written
        with an offset need none.

    Settings given to `read_telemetry` (twin-ingest's timestamp= and timezone=) win over these.
    """

    model_config = ConfigDict(extra="forbid")

    column: str = Field(default="timestamp", min_length=1)
    unit: Literal["s", "ms", "us", "ns", "min", "h", "datetime"] | None = None
    epoch: str = "1970-01-01T00:00:00Z"
    timezone: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _check(self):
        if self.timezone is not None:
            _check_timezone(self.timezone, "timezone")
        _epoch(self.epoch, self.timezone, "epoch")
        return self


class SignalContract(BaseModel):
    """One signal of a contract.

    name: the signal's name for the model and in the ingested file.
    role: input (the model takes it), output (the model predicts it) or extra: a signal the file
        carries that the model neither takes nor predicts (a spare sensor, a set-point, an ambient
        temperature kept for diagnosis). Extra signals are checked, converted, aligned, reported
        and written like the others; records and training use only inputs and outputs. Named
        "extra" rather than "measured" because outputs are measured too: what sets these apart
        is that the model does not use them.
    unit: the unit the model uses (pint spelling); the ingested column is in it.
    column: where the signal comes from: a wide file's column (its "[unit]" may be left out) or a
        long file's signal name. Default: the signal's own name.
    source_unit: the unit that column is in when the file does not say (no "[unit]" in its
        header, an empty unit in a long file): any pint expression, "mm", "0.125 m" (one count
        is 0.125 m), "degF", or a name from the contract's unit_aliases. A unit the file states
        wins. Default: the values are already in `unit`.
    range: the physical range, in `unit` (after conversion); values outside are masked.
    interpolation: zoh (hold the last sample) or linear, onto the grid.
    clock_offset_s: added to this sensor's timestamps.
    required: refuse a file without this signal (else its grid points are all invalid).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    role: Literal["input", "output", "extra"]
    unit: str = Field(min_length=1)  # the unit the model uses (pint spelling)
    column: str | None = Field(default=None, min_length=1)  # default: name
    source_unit: str | None = Field(default=None, min_length=1)  # default: unit
    range: tuple[float, float] | None = None  # physical range, in `unit`; outside is masked
    interpolation: Literal["zoh", "linear"] = "linear"
    clock_offset_s: float = 0.0  # added to this sensor's timestamps
    required: bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range must be (low, high) with low < high, got {self.range}")
        if not math.isfinite(self.clock_offset_s):
            raise ValueError("clock_offset_s must be finite")
        return self

    @property
    def source(self) -> str:
        """The name the signal has in the file: `column` without a "[unit]", else `name`."""
        return _split_header(self.column)[0] if self.column else self.name


class Contract(BaseModel):
    """What a system's telemetry must look like, and how to read a file that carries it.

    system: the system's name. period_s: the nominal sampling period = the model's grid step.
    signals: a SignalContract each (name, role, unit, column, source_unit, range, interpolation,
        clock_offset_s, required).
    tolerance_s: a sample this close to a grid point counts as sampled there (default period / 2).
    max_gap_s: never interpolate or hold across a longer gap (default 3 periods).
    stuck_samples, stuck_action: a value repeated this often is a stuck run: flag or mask it.
    unit_aliases: the files' own unit spellings, each a pint expression: {"Volt": "V"}, or with a
        factor, {"qsc": "0.125 m"} (a count of 0.125 m).
    timestamp: the TimestampContract (column, unit, epoch, timezone).

    A foreign CSV, read with no script (`twin-ingest source=rig.csv contract=rig.yaml`):

        system: rig
        period_s: 0.1
        timestamp: {column: t_rel, unit: s, epoch: "2024-05-02T08:00:00+02:00"}
        unit_aliases: {qsc: "0.125 m"}
        signals:
          - {name: pump, role: input, unit: V, column: U_pump, source_unit: mV}
          - {name: h2, role: output, unit: m, column: level_raw, source_unit: qsc}
          - {name: t_water, role: extra, unit: degC, column: T_w, source_unit: degF}
    """

    model_config = ConfigDict(extra="forbid")

    system: str = Field(min_length=1)
    period_s: float = Field(gt=0)  # nominal sampling period = the model's grid step
    signals: list[SignalContract] = Field(min_length=1)
    tolerance_s: float | None = Field(default=None, ge=0)  # default: period / 2
    max_gap_s: float | None = Field(default=None, gt=0)  # default: 3 periods
    stuck_samples: int = Field(default=20, ge=2)
    stuck_action: Literal["flag", "mask"] = "flag"
    unit_aliases: dict[str, str] = Field(default_factory=dict)  # {"qsc": "0.125 m"}
    timestamp: TimestampContract = Field(default_factory=TimestampContract)

    @model_validator(mode="after")
    def _check(self):
        names = [s.name for s in self.signals]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"signal names must be unique, repeated: {dup}")
        sources = [s.source for s in self.signals]
        dup = sorted({n for n in sources if sources.count(n) > 1})
        if dup:
            raise ValueError(f"two signals read the same column {dup}; give each its own column")
        for key in self.unit_aliases:
            _quantity(key, f"unit_aliases.{key}", self.unit_aliases)
        for i, s in enumerate(self.signals):
            try:
                _quantity(s.unit, f"signals.{i}.unit")
                if s.source_unit is not None:
                    _affine(s.source_unit, s.unit, f"signals.{i}.source_unit", self.unit_aliases)
            except TelemetryError as e:
                raise TelemetryError(e.where, f"signal {s.name!r}: {e.message}") from None
        return self

    @property
    def tolerance(self) -> float:
        return self.period_s / 2 if self.tolerance_s is None else self.tolerance_s

    @property
    def max_gap(self) -> float:
        return 3 * self.period_s if self.max_gap_s is None else self.max_gap_s

    def names(self, role: str | None = None) -> list[str]:
        return [s.name for s in self.signals if role is None or s.role == role]

    @classmethod
    def parse(cls, data: dict[str, Any], where: str = "contract") -> Contract:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, TelemetryError):  # a check that names its own field
                loc, msg = (f"{loc}.{cause.where}" if loc else cause.where), cause.message
            else:
                msg = err["msg"]
            raise TelemetryError(f"{where}.{loc}" if loc else where, msg) from None

    @classmethod
    def load(cls, path: str | Path) -> Contract:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise TelemetryError("contract", f"no such file {str(path)!r}")
        return cls.parse(yaml.safe_load(path.read_text()) or {}, where=path.stem)


# ---- units ---------------------------------------------------------------------------------------

UNITS_ALLOWED = (
    "a unit pint knows, or a positive factor times one: 'V', 'mV', 'l/min', 'degF', "
    "'0.125 m' (no factor on an offset unit such as degC)"
)


@lru_cache(maxsize=1)
def _registry():
    import pint

    # rational numbers: "0.125 m" is exactly 1/8 m, and degF -> degC exactly (x - 32) * 5/9.
    # (Python 3.11's Fraction has no __format__: never print a unit of this registry.)
    return pint.UnitRegistry(non_int_type=Fraction, autoconvert_offset_to_baseunit=True)


@lru_cache(maxsize=512)
def _parse_unit(text: str) -> tuple[Fraction, Any] | str:
    """(factor, pint units) of a unit expression, or why it is not one."""
    if not text.strip():
        return "is empty"
    ureg = _registry()
    try:
        q = ureg.parse_expression(text)
        factor = Fraction(q.magnitude)
    except Exception:  # pint and Fraction raise several types for text that is no unit
        return "is not a unit pint knows"
    if factor <= 0:
        return "has a factor that is not positive"
    if factor != 1 and not getattr(q, "_is_multiplicative", True):
        return "puts a factor on an offset unit (degC, degF), which is ambiguous"
    return factor, q.units


def _named(spelling: str, aliases: dict[str, str] | None) -> tuple[str, str]:
    """(the expression a spelling stands for, how an error names it)."""
    text = (aliases or {}).get(spelling, spelling)
    said = repr(spelling) if text == spelling else f"{spelling!r} (= {text!r} in unit_aliases)"
    return text, said


def _quantity(spelling: str, where: str, aliases: dict[str, str] | None = None):
    text, said = _named(spelling, aliases)
    parsed = _parse_unit(text)
    if isinstance(parsed, str):
        raise TelemetryError(
            where,
            f"unknown unit {said}: it {parsed}; give {UNITS_ALLOWED}, or define it in the "
            "contract's unit_aliases",
        )
    return parsed


@lru_cache(maxsize=512)
def _affine_text(source: str, target: str) -> tuple[Fraction, Fraction] | None:
    (fs, us), (ft, ut) = _parse_unit(source), _parse_unit(target)
    ureg = _registry()
    try:
        zero = Fraction(ureg.Quantity(Fraction(0), us).to(ut).magnitude) / ft
        one = Fraction(ureg.Quantity(fs, us).to(ut).magnitude) / ft
    except Exception:  # another dimension (pint's error text cannot be printed here)
        return None
    return one - zero, zero


def _affine(
    source: str, target: str, where: str, aliases: dict[str, str] | None = None
) -> tuple[Fraction, Fraction]:
    """Exact (scale, offset) with value_in_target = scale * value_in_source + offset."""
    _quantity(source, where, aliases)
    _quantity(target, where)
    text, said = _named(source, aliases)
    out = _affine_text(text, target)
    if out is None:
        raise TelemetryError(
            where, f"unit {said} cannot be converted to the contract's {target!r} (its dimension)"
        )
    return out


def conversion(source: str, target: str, where: str, aliases: dict[str, str] | None = None):
    """(scale, offset) with value_in_target = scale * value_in_source + offset. `source` may be
    any pint expression ("mm", "0.125 m", "degF") or a key of `aliases`."""
    scale, offset = _affine(source, target, where, aliases)
    return float(scale), float(offset)


def convert_units(
    values, source: str, target: str, where: str = "unit", aliases: dict[str, str] | None = None
) -> np.ndarray:
    """`values` in unit `source` (a pint expression or a key of `aliases`), in unit `target`."""
    scale, offset = _affine(source, target, where, aliases)
    return _apply(values, scale, offset)


def _apply(values, scale: Fraction, offset: Fraction) -> np.ndarray:
    """scale * values + offset with scale = p / q, in the form whose constant is exact: values *
    p / q + offset when the offset is a float (degC -> degF: + 32), else (values - zero) * p / q
    with zero the source value that maps to 0 (degF -> degC: 32). Exact wherever the result is a
    float (212 degF -> 100 degC, 8 counts of 0.125 m -> 1 m), else within a rounding or two."""
    values = np.asarray(values, dtype=float)
    if scale == 1 and offset == 0:
        return values.copy()
    p, q = scale.numerator, scale.denominator
    exact = max(abs(p), q) <= 2**53  # p and q are floats exactly: one rounding each

    def times(x):
        return x * float(p) / float(q) if exact else x * float(scale)

    if Fraction(float(offset)) == offset:
        return times(values) + float(offset) if offset else times(values)
    return times(values - float(-offset / scale))


# ---- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rows:
    """Where a frame's rows came from, so that an error names a place a user can open: the line a
    CSV record starts on (blank lines and quoted line breaks make it differ from row + 2), else
    the row number in a Parquet file or a DataFrame."""

    name: str | None  # the file's name; None for a DataFrame
    count: int  # data rows
    lines: np.ndarray | None = None  # [count] CSV: the file line each data row starts on

    @property
    def label(self) -> str:
        return self.name or "the frame"

    def __call__(self, i: int) -> str:
        if self.lines is not None:
            return f"{self.name} line {int(self.lines[i])}"
        return f"{self.name + ' ' if self.name else ''}row {i + 1} of {self.count}"


# a UTC offset after a time of day: Z, +01, +0100, +01:00 (a date alone ends in "-dd": no offset)
_OFFSET = re.compile(
    r"[T ]\d{2}(?::?\d{2}(?::?\d{2}(?:[.,]\d+)?)?)?"  # a time of day
    r"\s*(?:Z|[+-]\d{2}(?::?\d{2})?)\s*$"
)


def _has_offset(col: pd.Series) -> np.ndarray:
    """[n] bool: which timestamps carry a UTC offset (strings: their text; datetimes: tzinfo)."""
    if pd.api.types.is_string_dtype(col):
        # the pattern's text, not the compiled object: pyarrow strings then match it in C++
        return col.str.contains(_OFFSET.pattern).fillna(False).to_numpy(dtype=bool)
    return np.array(
        [
            bool(_OFFSET.search(v))
            if isinstance(v, str)
            else getattr(v, "tzinfo", None) is not None
            for v in col
        ],
        dtype=bool,
    )


def _first(flags) -> int:
    return int(np.flatnonzero(np.asarray(flags, dtype=bool))[0])


def _float_resolution(raw: np.ndarray) -> float:
    """The relative resolution of float timestamps: their dtype's eps, or float32's for float64
    values that are float32 numbers (a float32 column written out as float64, or as the shortest
    text of each float32), unless they are multiples of 1/1024 (exact in either: 0.5 s steps)."""
    if raw.dtype != np.float64:
        return float(np.finfo(raw.dtype).eps)
    sample = raw[np.linspace(0, len(raw) - 1, min(len(raw), 1000)).astype(int)]
    if np.all(sample * 1024 == np.round(sample * 1024)):
        return float(np.finfo(np.float64).eps)
    as32 = sample.astype(np.float32)
    if np.all(as32.astype(np.float64) == sample) or all(
        float(str(x)) == y for x, y in zip(as32, sample)
    ):
        return float(np.finfo(np.float32).eps)
    return float(np.finfo(np.float64).eps)


def _timestamps(
    col: pd.Series,
    where: str,
    timezone: str | None,
    epoch: pd.Timestamp,
    at: _Rows,
    unit: str | None = None,
) -> tuple[pd.Series, float]:
    """(UTC timestamps, their resolution in seconds): 1 ns for datetimes and integers, the float
    resolution at the timestamps' largest magnitude for float numbers (float32: eps32 * |t|)."""
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        if unit == "datetime":
            raise TelemetryError(
                where,
                f"timestamps are numbers, but the contract's timestamp.unit is datetime; give "
                f"the unit they count in ({', '.join(TIME_UNITS)})",
            )
        unit = unit or "s"
        raw = col.to_numpy()
        if pd.api.types.is_integer_dtype(col) and not col.isna().any():
            return epoch + pd.to_timedelta(raw.astype(np.int64), unit=unit), 1e-9
        numbers = col.to_numpy(dtype=float, na_value=np.nan)
        if not np.all(np.isfinite(numbers)):
            i = _first(~np.isfinite(numbers))
            raise TelemetryError(
                where,
                f"{at(i)}: timestamp {col.iloc[i]!r}; numeric timestamps "
                f"must be finite ({unit} after the epoch)",
            )
        eps = _float_resolution(raw if raw.dtype.kind == "f" else numbers)
        resolution = eps * float(np.max(np.abs(numbers))) * _SECONDS[unit] + 1e-9
        return epoch + pd.to_timedelta(numbers, unit=unit), resolution
    if unit is not None and unit != "datetime":
        i = _first(col.notna().to_numpy()) if col.notna().any() else 0
        raise TelemetryError(
            where,
            f"{at(i)}: timestamp {str(col.iloc[i])!r} is not a number, but the contract's "
            f"timestamp.unit is {unit!r}; numbers are read in a unit, dates need unit: datetime",
        )
    return _datetimes(col, where, timezone, at), 1e-9


def _datetimes(col: pd.Series, where: str, timezone: str | None, at: _Rows) -> pd.Series:
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        return col.dt.tz_convert("UTC")
    mixed = False
    try:
        parsed = pd.to_datetime(col, format="ISO8601")
    except (ValueError, TypeError):
        try:  # mixed offsets: pandas puts them on one axis only with utc=True
            parsed = pd.to_datetime(col, format="ISO8601", utc=True)
            mixed = True
        except (ValueError, TypeError) as e:
            i = _first([pd.notna(v) and _unparseable(v) for v in col])
            raise TelemetryError(
                where,
                f"{at(i)}: cannot parse timestamp {str(col.iloc[i])!r} "
                "(ISO 8601 expected, e.g. 2024-01-01T00:00:00Z)",
            ) from e
    if parsed.isna().any():
        raise TelemetryError(
            where,
            f"{at(_first(parsed.isna()))}: empty timestamp "
            f"({int(parsed.isna().sum())} in all); every row needs one",
        )
    if mixed:
        # utc=True also reads naive timestamps as UTC: among offset-aware ones they would be hours
        # off, silently. Different offsets (a DST change) are unambiguous; a naive one is not.
        aware = _has_offset(col)
        if not (aware == aware[0]).all():
            i = _first(aware != aware[0])
            has = ("has no UTC offset", "has one") if aware[0] else ("has a UTC offset", "has none")
            raise TelemetryError(
                where,
                f"{at(i)}: timestamp {str(col.iloc[i])!r} {has[0]}, but "
                f"{at(0)} ({str(col.iloc[0])!r}) {has[1]}; write every "
                "timestamp with its offset (e.g. +01:00 or Z), or none "
                "and give timezone=",
            )
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        return parsed.dt.tz_convert("UTC")
    if timezone is None:
        raise TelemetryError(
            where,
            "timestamps have no timezone; give timezone= (e.g. 'UTC' or 'Europe/Berlin'; or "
            "the contract's timestamp.timezone) or write them with an offset "
            "(2024-01-01T00:00:00+01:00)",
        )
    try:
        return parsed.dt.tz_localize(
            timezone, ambiguous="raise", nonexistent="raise"
        ).dt.tz_convert("UTC")
    except Exception as e:
        raise TelemetryError("timezone", f"{timezone!r}: {e}") from None


def _unparseable(v) -> bool:
    try:
        return pd.isna(pd.to_datetime(v, format="ISO8601", utc=True))
    except (ValueError, TypeError):
        return True


def _split_header(column: str) -> tuple[str, str | None]:
    """'pump [V]' -> ('pump', 'V'); 'pump' -> ('pump', None)."""
    name = column.strip()
    if name.endswith("]") and "[" in name:
        base, _, unit = name[:-1].rpartition("[")
        return base.strip(), unit.strip() or None
    return name, None


def _line_of(raw: bytes, pos: int) -> int:
    """The 1-based line of byte `pos`, counting line ends as the csv module does: LF, CRLF, CR."""
    head = raw[:pos]
    return head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n") + 1


def _utf8(raw: bytes, name: str) -> str:
    """The file's text; UTF-8 only (with or without a BOM), anything else refused at its line."""
    save = "save the file as UTF-8 (with or without a BOM); other encodings are not read"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # UTF-32's BOMs start so too
        raise TelemetryError(
            "source", f"{name} line 1: starts with a UTF-16 byte-order mark; {save}"
        )
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text, stop = raw.decode("utf-8"), len(raw)
    except UnicodeDecodeError as e:
        text, stop = None, e.start
    # NUL decodes as UTF-8, but no text file holds one: UTF-16 without a BOM, or not text at all
    nul = raw.find(b"\0", 0, stop)
    if nul >= 0:
        raise TelemetryError(
            "source",
            f"{name} line {_line_of(raw, nul)}: a NUL byte (UTF-16 "
            f"text, or not a text file); {save}",
        )
    if text is None:
        raise TelemetryError(
            "source",
            f"{name} line {_line_of(raw, stop)}: byte "
            f"0x{raw[stop]:02x} is not UTF-8 (Latin-1 or Windows-1252 "
            f"text?); {save}",
        )
    return text


def _csv_lines(text: str, name: str) -> np.ndarray:
    """[rows] the line each data record starts on, after checking that every record has as many
    fields as the header: pandas pads a short row with NaN (a file cut off mid-row would pass)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    starts: list[int] = []
    bad: tuple[int, int] | None = None  # (line, fields) of the first record of the wrong width
    followed = False  # a record comes after it: a short row, not a cut-off file
    end = 0
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line; pandas skips it too
            if bad is not None:
                followed = True
                break
            if header is None:
                header = row
            elif len(row) != len(header):
                bad = (start, len(row))
            else:
                starts.append(start)
    except csv.Error as e:
        raise TelemetryError(
            "source", f"{name} line {reader.line_num}: not well-formed CSV ({e})"
        ) from None
    if header is None:
        raise TelemetryError(
            "source",
            f"{name}: empty (no header line, no rows); a CSV file "
            "starts with a header, e.g. timestamp,signal,value",
        )
    if bad is not None:
        line, n = bad
        if n > len(header):
            hint = "a value holding a comma must be quoted"
        elif followed:
            hint = "leave a missing value empty, e.g. 1,,3, but keep its comma"
        else:
            hint = "the file looks truncated; write it again completely"
        raise TelemetryError(
            "source",
            f"{name} line {line}: {n} field{'s' * (n != 1)} where the "
            f"header has {len(header)} ({hint})",
        )
    return np.asarray(starts, dtype=np.int64)


def _read_file(path: Path) -> tuple[pd.DataFrame, _Rows]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa

        try:
            df = pd.read_parquet(path)
        except (pa.ArrowException, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TelemetryError(
                "source",
                f"{path.name}: not a readable Parquet file ({reason}); "
                "it may be truncated: write it again",
            ) from None
        return df, _Rows(path.name, len(df))
    if suffix in (".csv", ".txt"):
        text = _utf8(path.read_bytes(), path.name)
        lines = _csv_lines(text, path.name)
        try:
            df = pd.read_csv(io.StringIO(text, newline=""))
        except pd.errors.ParserError as e:  # the csv module above took it; pandas may still not
            reason = str(e).strip().splitlines()[-1]
            raise TelemetryError("source", f"{path.name}: not well-formed CSV ({reason})") from None
        # should the two parsers ever count records differently, say row numbers, not wrong lines
        return df, _Rows(path.name, len(df), lines if len(lines) == len(df) else None)
    raise TelemetryError("source", f"{path.name}: unknown format {suffix!r}; .parquet or .csv")


def read_telemetry(
    source: str | Path | pd.DataFrame,
    *,
    layout: str = "auto",
    timestamp: str | None = None,
    timezone: str | None = None,
    epoch: str | pd.Timestamp | None = None,
    units: dict[str, str] | None = None,
    contract: Contract | None = None,
    timestamp_unit: str | None = None,
) -> pd.DataFrame:
    """Telemetry as one long frame: timestamp (UTC), signal, value (float), unit ('' = the
    contract's), quality. `source`: a .parquet or .csv file (CSV in UTF-8), or a DataFrame.

    The timestamp column, its unit (s, ms, us, ns, min, h or datetime), epoch and timezone: the
    arguments given here win, then the contract's `timestamp` section, then the defaults
    ("timestamp"; numbers are seconds, text is ISO 8601; 1970-01-01T00:00:00Z; no timezone). A
    file this module wrote (`save`: Parquet marked aligned) is read in its own format, whatever the
    contract's section says, and marked aligned: `ingest` applies no clock offset to it again.
    Another column than the section's, given here, is read in `timestamp_unit` (default: numbers
    are seconds, text is datetimes), from the section's epoch and in its timezone unless given.

    A wide column "<signal>.valid" (or the older "<signal>.mask", which meant the same) beside
    "<signal>" is that signal's validity: its False rows read as bad quality.

    The frame's `attrs` carry "timestamp_resolution_s" (how finely the timestamps resolve time:
    float32 seconds at 500 s resolve ~3e-5 s; `ingest` places samples on the grid within it) and
    "columns" (the file's columns, for errors that list them).

    A broken file is refused with its name and the line (CSV) or row (Parquet) at fault: a row
    with more or fewer fields than the header (a truncated file), text that is not UTF-8, naive
    timestamps among offset-aware ones, a header without rows, an unreadable Parquet file."""
    own = False
    if isinstance(source, pd.DataFrame):
        df = source.copy()
        at = _Rows(None, len(df))
        own = bool(source.attrs.get("aligned"))  # Telemetry.to_frame's
    else:
        path = Path(source)
        if not path.is_file():
            raise TelemetryError("source", f"no such file {str(path)!r}")
        df, at = _read_file(path)
        if path.suffix.lower() == ".parquet":
            try:
                own = bool(read_metadata(path).get("aligned"))
            except (ValueError, OSError):  # metadata that is not ours
                own = False
    if len(df) == 0:
        raise TelemetryError("source", f"{at.label}: a header but no rows")
    if layout not in ("auto", "wide", "long"):
        raise TelemetryError("layout", f"{layout!r} is not one of auto, wide, long")
    section = TimestampContract() if contract is None or own else contract.timestamp
    # another column than the section's: its unit is not the section's (auto unless given)
    unit = timestamp_unit or (section.unit if timestamp in (None, section.column) else None)
    timestamp = timestamp or section.column
    timezone = timezone or section.timezone
    if unit is not None and unit not in (*TIME_UNITS, "datetime"):
        raise TelemetryError(
            "timestamp_unit", f"{unit!r} is not one of {', '.join(TIME_UNITS)}, datetime"
        )
    df.columns = [str(c) for c in df.columns]
    if timestamp not in df.columns:
        raise TelemetryError(
            "timestamp", f"no column {timestamp!r}; columns: {', '.join(df.columns)}"
        )
    if layout == "auto":
        layout = "long" if {"signal", "value"} <= set(df.columns) else "wide"
    epoch = _epoch(section.epoch if epoch is None else epoch, timezone, "epoch")
    ts, resolution = _timestamps(df[timestamp], "timestamp", timezone, epoch, at, unit)
    units = dict(units or {})
    skipped: list[str] = []
    if layout == "long":
        missing = [c for c in ("signal", "value") if c not in df.columns]
        if missing:
            raise TelemetryError(
                "layout",
                f"long telemetry needs columns {missing}; columns: {', '.join(df.columns)}",
            )
        out = pd.DataFrame(
            {
                "timestamp": ts,
                "signal": df["signal"].astype(str),
                "value": _numbers(df["value"], "value", at),
                "unit": df["unit"].fillna("").astype(str) if "unit" in df.columns else "",
                "quality": (_quality(df["quality"], at) if "quality" in df.columns else "good"),
            }
        )
        if units:
            for name, u in units.items():
                blank = (out["signal"] == name) & (out["unit"] == "")
                out.loc[blank, "unit"] = u
    else:
        columns = [c for c in df.columns if c != timestamp]
        valid = _validity(df, columns)
        # under a contract, columns no signal reads are not parsed (a foreign file's notes, ids)
        wanted = None
        if contract is not None:
            wanted = {s.source for s in contract.signals} | set(contract.names())
        frames = []
        for column in columns:
            if column in valid.values():
                continue
            name, u = _split_header(column)
            if wanted is not None and name not in wanted:
                skipped.append(name)
                continue
            quality = "good"
            if name in valid:
                quality = np.where(df[valid[name]].to_numpy(dtype=bool), "good", "bad")
            frames.append(
                pd.DataFrame(
                    {
                        "timestamp": ts,
                        "signal": name,
                        "value": _numbers(df[column], column, at),
                        "unit": units.get(name, u or ""),
                        "quality": quality,
                    }
                )
            )
        if not frames and not skipped:
            raise TelemetryError(
                "layout", "wide telemetry has no signal columns besides the timestamp"
            )
        out = pd.concat(frames, ignore_index=True) if frames else _empty()
    out = _schema().validate(out.reset_index(drop=True), lazy=False)
    out.attrs.update(
        {
            "timestamp_resolution_s": resolution,
            "columns": list(df.columns),
            "layout": layout,
            "unread_columns": skipped,
            "aligned": own,
        }
    )
    return out


def _empty() -> pd.DataFrame:
    """A long frame without rows (a wide file none of whose columns a contract reads)."""
    return pd.DataFrame(
        {
            "timestamp": pd.Series([], dtype="datetime64[ns, UTC]"),
            **{c: pd.Series([], dtype=str) for c in ("signal", "unit", "quality")},
            "value": pd.Series([], dtype=float),
        }
    )[list(LONG_COLUMNS)]


VALIDITY = ("valid", "mask")  # "<signal>.valid"; "<signal>.mask" in files written before


def _validity(df: pd.DataFrame, columns: list[str]) -> dict[str, str]:
    """{signal: its validity column}: a boolean "<signal>.valid" (or the older "<signal>.mask",
    True = valid as well) beside a column of that signal."""
    signals = {_split_header(c)[0] for c in columns}
    out = {}
    for c in columns:
        base, dot, suffix = c.rpartition(".")
        if dot and suffix in VALIDITY and base in signals and pd.api.types.is_bool_dtype(df[c]):
            if base not in out or suffix == "valid":
                out[base] = c
    return out


def _numbers(col: pd.Series, where: str, at: _Rows) -> pd.Series:
    values = pd.to_numeric(col, errors="coerce")
    bad = col.notna() & values.isna()
    if bad.any():
        i, more = _first(bad), int(bad.sum()) - 1
        also = f" (nor are {more} more in this column)" if more else ""
        raise TelemetryError(
            where, f"{at(i)}: {col.iloc[i]!r} is not a number{also}; leave a missing value empty"
        )
    return values.astype(float)


def _quality(col: pd.Series, at: _Rows) -> pd.Series:
    q = col.fillna("good").astype(str).str.strip().str.lower()
    bad = ~q.isin(QUALITY)
    if bad.any():
        i = _first(bad)
        raise TelemetryError(
            "quality", f"{at(i)}: {q.iloc[i]!r} is not one of {', '.join(QUALITY)}"
        )
    return q


@lru_cache(maxsize=1)
def _schema():
    import pandera.pandas as pa

    return pa.DataFrameSchema(
        {
            "timestamp": pa.Column("datetime64[ns, UTC]", coerce=True),
            "signal": pa.Column(str, pa.Check.str_length(min_value=1)),
            "value": pa.Column(float, nullable=True),
            "unit": pa.Column(str),
            "quality": pa.Column(str, pa.Check.isin(list(QUALITY))),
        },
        strict=True,
        ordered=True,
    )


# ---- ingestion -----------------------------------------------------------------------------------


@dataclass
class Telemetry:
    """Signals on a uniform grid: values [T, n] in contract order (all roles: inputs, outputs,
    extras), mask [T, n] with True = a valid sample (numpy.ma's convention is the opposite; the
    ingested file names this column "<signal>.valid")."""

    contract: Contract
    start: pd.Timestamp
    t: np.ndarray  # [T] seconds after start
    values: np.ndarray  # [T, n]; NaN where not valid
    mask: np.ndarray  # [T, n] bool, True = valid
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> np.ndarray:
        """[T, n] bool, True = a valid sample (the same array as `mask`)."""
        return self.mask

    @property
    def names(self) -> list[str]:
        return self.contract.names()

    def signal(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(values [T], valid [T]) of one signal."""
        if name not in self.names:
            raise TelemetryError("signal", f"unknown {name!r}; signals: {', '.join(self.names)}")
        j = self.names.index(name)
        return self.values[:, j], self.mask[:, j]

    def role(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        """(values [T, k], valid [T, k]) of the inputs, outputs or extras, in contract order."""
        idx = [self.names.index(n) for n in self.contract.names(role)]
        return self.values[:, idx], self.mask[:, idx]

    def to_frame(self) -> pd.DataFrame:
        """Wide: timestamp, one column per signal ("name [unit]"), then "<name>.valid" per signal
        (True = a valid sample; its value is NaN where False)."""
        cols: dict[str, Any] = {"timestamp": self.start + pd.to_timedelta(self.t, unit="s")}
        for j, s in enumerate(self.contract.signals):
            cols[f"{s.name} [{s.unit}]"] = self.values[:, j]
        for j, s in enumerate(self.contract.signals):
            cols[f"{s.name}.valid"] = self.mask[:, j]
        frame = pd.DataFrame(cols)
        frame.attrs["aligned"] = True  # read back, its clock offsets are not applied again
        return frame


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges where flags is True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _iso(ts: pd.Timestamp) -> str:
    return ts.isoformat().replace("+00:00", "Z")


def ingest(
    frame: pd.DataFrame,
    contract: Contract,
    *,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    max_lag_steps: int = 10,
) -> Telemetry:
    """Check `frame` (from `read_telemetry`) against `contract` and align it onto the grid
    start + k * period (default: from the first to the last sample of any contract signal).

    Each signal is read from its source (`column`, default its name). A signal whose source the
    frame lacks is read from a source of its own name when there is one and no other signal reads
    that column (a file ingested before, read back: it names its signals), with a warning. Clock
    offsets are not applied to a file `save` wrote (they were, when it was ingested)."""
    resolution = float(frame.attrs.get("timestamp_resolution_s", 1e-9))
    columns = list(frame.attrs.get("columns", []))
    layout = frame.attrs.get("layout")
    unread = list(frame.attrs.get("unread_columns", []))
    aligned = bool(frame.attrs.get("aligned", False))  # a file `save` wrote: offsets applied
    frame = _schema().validate(frame)
    report: dict[str, Any] = {
        "system": contract.system,
        "period_s": contract.period_s,
        "signals": {},
        "warnings": [],
    }
    present = set(frame["signal"].unique())
    sources = {s.source for s in contract.signals}
    read_from: dict[str, str] = {}
    by_name = []
    for s in contract.signals:
        if s.source in present:
            read_from[s.name] = s.source
        elif s.name in present and s.name not in sources:
            read_from[s.name] = s.name
            by_name.append(f"{s.name} (not {s.source!r})")
    if by_name:
        report["warnings"].append(
            "read by their own names, their contract columns being absent: " + ", ".join(by_name)
        )
    ignored = sorted((present - set(read_from.values())) | set(unread))
    if ignored:
        report["ignored_signals"] = ignored
        report["warnings"].append(f"signals not in the contract were ignored: {', '.join(ignored)}")
    missing = [s for s in contract.signals if s.required and s.name not in read_from]
    if missing:
        where = ", ".join(
            f"{s.name} from {'column' if layout != 'long' else 'signal'} {s.source!r}"
            for s in missing
        )
        found = columns if columns and layout != "long" else sorted(present)
        what = "columns" if columns and layout != "long" else "signals"
        raise TelemetryError(
            "signals",
            f"missing {[s.name for s in missing]} ({where}); the {contract.system} contract "
            f"expects {', '.join(contract.names())}; the file's {what}: "
            f"{', '.join(found) or 'none'}",
        )
    snap = 1e-3 * contract.period_s + resolution  # a sample this close to a grid point is on it
    if resolution > 0.1 * contract.period_s:
        report["warnings"].append(
            f"timestamps resolve only {resolution:.3g} s (float precision at their magnitude), "
            f"more than a tenth of the period {contract.period_s:g} s: store them as float64, "
            "integers or datetimes"
        )
    report["timestamp_resolution_s"] = resolution

    cleaned: dict[str, pd.DataFrame] = {}
    for s in contract.signals:
        rows = frame[frame["signal"] == read_from.get(s.name)]
        info: dict[str, Any] = {"unit": s.unit, "role": s.role, "samples": int(len(rows))}
        if read_from.get(s.name, s.name) != s.name:
            info["source"] = read_from[s.name]
        values = rows["value"].to_numpy(dtype=float).copy()
        units = rows["unit"].replace("", s.source_unit or s.unit).to_numpy()
        converted = {}
        for u in pd.unique(units):
            if u == s.unit:
                continue
            scale, offset = _affine(u, s.unit, f"{s.name}.unit", contract.unit_aliases)
            sel = units == u
            values[sel] = _apply(values[sel], scale, offset)
            converted[u] = int(sel.sum())
        if converted:
            info["converted_from"] = converted
        offset_s = 0.0 if aligned else s.clock_offset_s
        ts = rows["timestamp"] + pd.Timedelta(seconds=offset_s)
        if offset_s:
            info["clock_offset_s"] = offset_s
        df = pd.DataFrame(
            {
                "timestamp": ts.reset_index(drop=True),
                "value": values,
                "bad_quality": (rows["quality"] == "bad").to_numpy(),
            }
        )
        df = df.sort_values("timestamp", kind="stable")
        dup = df["timestamp"].duplicated(keep="last")
        if dup.any():
            groups = (
                df[df["timestamp"].duplicated(keep=False)].groupby("timestamp")["value"].nunique()
            )
            info["duplicates_removed"] = int(dup.sum())
            info["duplicates_conflicting"] = int((groups > 1).sum())
        df = df[~dup].reset_index(drop=True)
        v = df["value"].to_numpy(dtype=float)
        info["missing_raw"] = int(np.isnan(v).sum())
        info["bad_quality"] = int(df["bad_quality"].sum())
        usable = ~np.isnan(v) & ~df["bad_quality"].to_numpy()
        if s.range is not None:
            out = usable & ((v < s.range[0]) | (v > s.range[1]))
            info["out_of_range"] = int(out.sum())
            info["range"] = list(s.range)
            usable &= ~out
        stuck = np.zeros(len(v), dtype=bool)
        same = np.concatenate([[False], v[1:] == v[:-1]])
        runs = []
        for a, b in _runs(same):
            if b - a + 1 >= contract.stuck_samples:  # a run of b - a + 1 equal values
                stuck[a - 1 : b] = True
                runs.append(
                    {
                        "start": _iso(df["timestamp"].iloc[a - 1]),
                        "samples": b - a + 1,
                        "value": float(v[a - 1]),
                    }
                )
        info["stuck_runs"] = runs
        if contract.stuck_action == "mask":
            usable &= ~stuck
        info["stuck_masked"] = int(stuck.sum()) if contract.stuck_action == "mask" else 0
        df["value"] = np.where(usable, v, np.nan)
        cleaned[s.name] = df[usable].reset_index(drop=True)
        report["signals"][s.name] = info

    starts = [d["timestamp"].iloc[0] for d in cleaned.values() if len(d)]
    if not starts:
        raise TelemetryError("signals", "no usable sample in any contract signal")
    t0 = pd.Timestamp(start) if start is not None else min(starts)
    t1 = (
        pd.Timestamp(end)
        if end is not None
        else max(d["timestamp"].iloc[-1] for d in cleaned.values() if len(d))
    )
    for where, ts in (("start", t0), ("end", t1)):
        if ts.tzinfo is None:
            raise TelemetryError(where, f"{ts} has no timezone (e.g. 2024-01-01T00:00:00Z)")
    t0, t1 = t0.tz_convert("UTC"), t1.tz_convert("UTC")
    if t1 <= t0:
        raise TelemetryError("end", f"{_iso(t1)} is not after start {_iso(t0)}")
    # the last grid point within `snap` of the end: float32 timestamps may put the last sample
    # a hair before its grid point, and it must still have one
    n = int(math.floor(((t1 - t0).total_seconds() + snap) / contract.period_s)) + 1
    grid = np.arange(n) * contract.period_s
    values = np.full((n, len(contract.signals)), np.nan)
    for j, s in enumerate(contract.signals):
        d = cleaned[s.name]
        info = report["signals"][s.name]
        ts = (d["timestamp"] - t0).dt.total_seconds().to_numpy()
        v = d["value"].to_numpy()
        filled, how = _align(
            grid, ts, v, s.interpolation, contract.tolerance, contract.max_gap, snap
        )
        values[:, j] = filled
        info["grid_points"] = n
        info["sampled"] = int((how == 1).sum())
        info["interpolated"] = int((how == 2).sum())
        info["masked"] = int((how == 0).sum())
        info["missing_fraction"] = float((how == 0).mean())
        gaps = np.flatnonzero(np.diff(ts) > contract.max_gap)
        info["gaps"] = [
            {
                "start": _iso(t0 + pd.Timedelta(seconds=float(ts[g]))),
                "seconds": float(ts[g + 1] - ts[g]),
            }
            for g in gaps
        ]
        info["interpolation"] = s.interpolation
    mask = ~np.isnan(values)
    _skews(report, contract, values, mask, max_lag_steps)
    report["grid"] = {
        "start": _iso(t0),
        "steps": n,
        "period_s": contract.period_s,
        "on_grid_within_s": snap,
    }
    return Telemetry(contract, t0, grid, values, mask, report)


def _align(
    grid: np.ndarray,
    ts: np.ndarray,
    v: np.ndarray,
    interpolation: str,
    tol: float,
    max_gap: float,
    snap: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Values on `grid` and how each was obtained: 1 sampled (a sample lies within tol of the grid
    point), 2 interpolated, 0 masked. A sample within `snap` of a grid point (the timestamps'
    resolution) is on it: its value is taken as it is. Otherwise zoh: the last sample at or before
    the grid point (+tol, for jitter), at most max_gap old; linear: between the samples around
    the grid point when they are at most max_gap apart, else the nearest sample within tol."""
    out = np.full(len(grid), np.nan)
    how = np.zeros(len(grid), dtype=np.int8)
    if len(ts) == 0:
        return out, how
    nearest = np.clip(np.searchsorted(ts, grid), 0, len(ts) - 1)
    before = np.clip(nearest - 1, 0, len(ts) - 1)
    nearest = np.where(np.abs(ts[before] - grid) < np.abs(ts[nearest] - grid), before, nearest)
    close = np.abs(ts[nearest] - grid) <= max(tol, snap)
    if interpolation == "zoh":
        prev = np.searchsorted(ts, grid + tol, side="right") - 1
        ok = prev >= 0
        ok[ok] &= (grid[ok] - ts[prev[ok]]) <= max_gap
        out[ok] = v[prev[ok]]
    else:
        prev = np.searchsorted(ts, grid, side="right") - 1
        nxt = prev + 1
        ok = (prev >= 0) & (nxt < len(ts))
        ok[ok] &= (ts[nxt[ok]] - ts[prev[ok]]) <= max_gap
        w = (grid[ok] - ts[prev[ok]]) / (ts[nxt[ok]] - ts[prev[ok]])
        out[ok] = (1 - w) * v[prev[ok]] + w * v[nxt[ok]]
        edge = (
            ~ok & close
        )  # no bracketing pair (an end of the record, a gap's edge): the nearest sample
        out[edge] = v[nearest[edge]]
        ok |= edge
    on = np.abs(ts[nearest] - grid) <= snap
    out[on] = v[nearest[on]]
    ok |= on
    how[ok] = np.where(close[ok], 1, 2)
    return out, how


def _skews(
    report: dict, contract: Contract, values: np.ndarray, mask: np.ndarray, max_lag: int
) -> None:
    """Per signal: the lag (s) of the largest cross-correlation of first differences with the
    reference (the first input), over +-max_lag steps; positive: the signal lags the reference.
    Between two sensors of one quantity this is their skew. Between an input and an output it
    includes the system's own response time: compare it with a clean record of the same system."""
    names = contract.names()
    ref_name = (contract.names("input") or names)[0]
    r = names.index(ref_name)
    for j, name in enumerate(names):
        if j == r:
            continue
        both = mask[:, r] & mask[:, j]
        pair = both[1:] & both[:-1]  # differences only between two usable points
        a = np.where(pair, np.diff(np.nan_to_num(values[:, r])), 0.0)
        b = np.where(pair, np.diff(np.nan_to_num(values[:, j])), 0.0)
        if np.std(a) == 0 or np.std(b) == 0:
            report["signals"][name]["skew_s"] = None
            continue
        a, b = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
        lags = range(-max_lag, max_lag + 1)
        cc = [
            np.mean(a[max(0, -k) : len(a) - max(0, k)] * b[max(0, k) : len(b) - max(0, -k)])
            for k in lags
        ]
        best = int(np.argmax(cc))
        report["signals"][name]["skew_s"] = {
            "against": ref_name,
            "lag_s": lags[best] * contract.period_s,
            "correlation": float(cc[best]),
        }


# ---- the format on disk -------------------------------------------------------------------------


def write_telemetry(
    frame: pd.DataFrame, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write a long telemetry frame as Parquet (temp file, then rename), with JSON metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"twin_ml"] = json.dumps(metadata or {}, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path):  # pyarrow names neither the file nor the errno in a way a user reads
            pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata `write_telemetry` put into a Parquet file ({} when there is none)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"twin_ml", b"{}"))


def save(tel: Telemetry, out_dir: str | Path) -> dict[str, Path]:
    """out_dir/telemetry.parquet (aligned, wide: "<signal> [<unit>]" and "<signal>.valid", True =
    a valid sample), quality.json and quality.png."""
    from twin_ml._io import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "telemetry": write_telemetry(
            tel.to_frame(),
            out / "telemetry.parquet",
            {
                "contract": tel.contract.model_dump(),
                "aligned": True,
                "valid": "<signal>.valid is True where the sample is valid, False where it is "
                "masked (its value is NaN)",
            },
        ),
        "report": out / "quality.json",
        "plot": out / "quality.png",
    }
    atomic_write_json(paths["report"], tel.report)
    plot_quality(tel, paths["plot"])
    return paths


def plot_quality(tel: Telemetry, path: str | Path) -> Path:
    """One panel per signal: the aligned values, masked grid points marked under the curve,
    stuck runs shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tel.names)
    fig, axes = plt.subplots(n, 1, figsize=(10, 2.4 * n), sharex=True, squeeze=False)
    for j, s in enumerate(tel.contract.signals):
        ax, info = axes[j, 0], tel.report["signals"][s.name]
        ax.plot(tel.t, tel.values[:, j], lw=0.8, color="C0", label=f"{s.name} [{s.unit}]")
        bad = ~tel.mask[:, j]
        if bad.any():
            low = np.nanmin(tel.values[:, j]) if tel.mask[:, j].any() else 0.0
            ax.plot(
                tel.t[bad],
                np.full(int(bad.sum()), low),
                "|",
                color="C3",
                ms=8,
                label=f"masked ({info['masked']})",
            )
        for run in info.get("stuck_runs", []):
            a = (pd.Timestamp(run["start"]) - tel.start).total_seconds()
            ax.axvspan(a, a + run["samples"] * tel.contract.period_s, color="C1", alpha=0.2, lw=0)
        if s.range is not None:
            for v in s.range:
                ax.axhline(v, color="0.6", lw=0.6, ls=":")
        ax.set_ylabel(s.role)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel(f"time since {_iso(tel.start)} [s]")
    fig.suptitle(
        f"{tel.contract.system} telemetry: {len(tel.t)} steps of {tel.contract.period_s:g} s "
        "(stuck runs shaded)",
        fontsize=10,
    )
    fig.tight_layout()
    from twin_ml._io import save_figure

    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)
