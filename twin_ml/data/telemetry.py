"""Telemetry: read sensor data, check it against a data contract, align it onto the model's grid,
and report its quality. Torch-free.

The project's telemetry format is Parquet (CSV also reads), in one of two layouts:

    long:  timestamp | signal | value | unit | quality     (unit and quality optional)
    wide:  timestamp | <signal> | <signal> ...             (a header may carry its unit: "pump [V]")

Timestamps are timezone-aware and UTC inside. Naive timestamps need `timezone=`; numbers are seconds
after `epoch` (default 1970-01-01T00:00:00Z). `quality`, when present, is good / uncertain / bad
(bad samples are masked).

A `Contract` (per system, YAML under configs/contract/) declares the expected signals with their
role (input or output), unit, physical range, interpolation and known clock offset, and the nominal
sampling period. `ingest` then:

1. checks the frame's structure (pandera) and every signal's unit: known spellings are converted
   to the contract's unit (pint), unknown or incompatible units are refused, naming the signal;
2. shifts each sensor's timestamps by its clock offset, sorts, and removes duplicated timestamps
   (the last sample wins; conflicting values are counted);
3. masks values outside the physical range, flags stuck runs (a value repeated for
   `stuck_samples` samples or more; masked only when the contract says so);
4. brings every signal onto the grid (start, start + period, ...) with its declared interpolation
   (zoh holds the last value, linear interpolates between the samples around a grid point; at a
   record's end or a gap's edge, the nearest sample within `tolerance_s`), but never across a gap
   longer than `max_gap_s`: such grid points are masked. A grid point with a sample within
   `tolerance_s` counts as sampled, the others as interpolated;
5. estimates each signal's time skew against the first input (the lag of the largest
   cross-correlation of first differences).

Nothing is dropped silently: the report lists per signal what was masked, interpolated, refused
or ignored, and the mask travels with the values (masked points are excluded from losses).
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
        super().__init__(f"{where}: {message}")


# ---- the data contract ---------------------------------------------------------------------------


class SignalContract(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    role: Literal["input", "output"]
    unit: str = Field(min_length=1)  # the unit the model uses (pint spelling)
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
        _unit(self.unit, f"signals.{self.name}.unit")
        return self


class Contract(BaseModel):
    """What a system's telemetry must look like."""

    model_config = ConfigDict(extra="forbid")

    system: str = Field(min_length=1)
    period_s: float = Field(gt=0)  # nominal sampling period = the model's grid step
    signals: list[SignalContract] = Field(min_length=1)
    tolerance_s: float | None = Field(default=None, ge=0)  # default: period / 2
    max_gap_s: float | None = Field(default=None, gt=0)  # default: 3 periods
    stuck_samples: int = Field(default=20, ge=2)
    stuck_action: Literal["flag", "mask"] = "flag"
    unit_aliases: dict[str, str] = Field(
        default_factory=dict
    )  # extra spellings, e.g. {"Volt": "V"}

    @model_validator(mode="after")
    def _check(self):
        names = [s.name for s in self.signals]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"signal names must be unique, repeated: {dup}")
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
            raise TelemetryError(f"{where}.{loc}" if loc else where, err["msg"]) from None

    @classmethod
    def load(cls, path: str | Path) -> Contract:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise TelemetryError("contract", f"no such file {str(path)!r}")
        return cls.parse(yaml.safe_load(path.read_text()) or {}, where=path.stem)


# ---- units ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _registry():
    import pint

    return pint.UnitRegistry(autoconvert_offset_to_baseunit=True)


def _unit(spelling: str, where: str, aliases: dict[str, str] | None = None):
    ureg = _registry()
    text = (aliases or {}).get(spelling, spelling)
    try:
        return ureg.Unit(text)
    except Exception:  # pint raises several types for unparseable text
        raise TelemetryError(
            where,
            f"unknown unit {spelling!r} (give a unit pint knows, e.g. 'V', 'mV', "
            "'degC', or add it to the contract's unit_aliases)",
        ) from None


def conversion(source: str, target: str, where: str, aliases: dict[str, str] | None = None):
    """(scale, offset) with value_in_target = scale * value_in_source + offset."""
    ureg = _registry()
    a, b = _unit(source, where, aliases), _unit(target, where, aliases)
    try:
        zero = ureg.Quantity(0.0, a).to(b).magnitude
        one = ureg.Quantity(1.0, a).to(b).magnitude
    except Exception:
        raise TelemetryError(
            where, f"unit {source!r} cannot be converted to the contract's {target!r}"
        ) from None
    return float(one - zero), float(zero)


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


def _timestamps(
    col: pd.Series, where: str, timezone: str | None, epoch: pd.Timestamp, at: _Rows
) -> pd.Series:
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        seconds = col.to_numpy(dtype=float)
        if not np.all(np.isfinite(seconds)):
            i = _first(~np.isfinite(seconds))
            raise TelemetryError(
                where,
                f"{at(i)}: timestamp {col.iloc[i]!r}; numeric timestamps "
                "must be finite (seconds after the epoch)",
            )
        return epoch + pd.to_timedelta(seconds, unit="s")
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
            "timestamps have no timezone; give timezone= (e.g. 'UTC' or 'Europe/Berlin') "
            "or write them with an offset (2024-01-01T00:00:00+01:00)",
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
    timestamp: str = "timestamp",
    timezone: str | None = None,
    epoch: str | pd.Timestamp = EPOCH,
    units: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Telemetry as one long frame: timestamp (UTC), signal, value (float), unit ('' = the
    contract's), quality. `source`: a .parquet or .csv file (CSV in UTF-8), or a DataFrame.

    A broken file is refused with its name and the line (CSV) or row (Parquet) at fault: a row
    with more or fewer fields than the header (a truncated file), text that is not UTF-8, naive
    timestamps among offset-aware ones, a header without rows, an unreadable Parquet file."""
    if isinstance(source, pd.DataFrame):
        df = source.copy()
        at = _Rows(None, len(df))
    else:
        path = Path(source)
        if not path.is_file():
            raise TelemetryError("source", f"no such file {str(path)!r}")
        df, at = _read_file(path)
    if len(df) == 0:
        raise TelemetryError("source", f"{at.label}: a header but no rows")
    if layout not in ("auto", "wide", "long"):
        raise TelemetryError("layout", f"{layout!r} is not one of auto, wide, long")
    df.columns = [str(c) for c in df.columns]
    if timestamp not in df.columns:
        raise TelemetryError(
            "timestamp", f"no column {timestamp!r}; columns: {', '.join(df.columns)}"
        )
    if layout == "auto":
        layout = "long" if {"signal", "value"} <= set(df.columns) else "wide"
    epoch = pd.Timestamp(epoch)
    if epoch.tzinfo is None:
        raise TelemetryError(
            "epoch", f"{epoch} has no timezone; give one, e.g. 1970-01-01T00:00:00Z"
        )
    ts = _timestamps(df[timestamp], "timestamp", timezone, epoch, at)
    units = dict(units or {})
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
            for name, unit in units.items():
                blank = (out["signal"] == name) & (out["unit"] == "")
                out.loc[blank, "unit"] = unit
    else:
        frames = []
        for column in df.columns:
            if column == timestamp:
                continue
            name, unit = _split_header(column)
            values = _numbers(df[column], column, at)
            frames.append(
                pd.DataFrame(
                    {
                        "timestamp": ts,
                        "signal": name,
                        "value": values,
                        "unit": units.get(name, unit or ""),
                        "quality": "good",
                    }
                )
            )
        if not frames:
            raise TelemetryError(
                "layout", "wide telemetry has no signal columns besides the timestamp"
            )
        out = pd.concat(frames, ignore_index=True)
    return _schema().validate(out.reset_index(drop=True), lazy=False)


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
    """Signals on a uniform grid: values [T, n] in contract order, mask [T, n] (True = usable)."""

    contract: Contract
    start: pd.Timestamp
    t: np.ndarray  # [T] seconds after start
    values: np.ndarray  # [T, n]; NaN where masked
    mask: np.ndarray  # [T, n] bool
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return self.contract.names()

    def signal(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.names:
            raise TelemetryError("signal", f"unknown {name!r}; signals: {', '.join(self.names)}")
        j = self.names.index(name)
        return self.values[:, j], self.mask[:, j]

    def role(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        """(values [T, k], mask [T, k]) of the inputs or the outputs, in contract order."""
        idx = [self.names.index(n) for n in self.contract.names(role)]
        return self.values[:, idx], self.mask[:, idx]

    def to_frame(self) -> pd.DataFrame:
        """Wide: timestamp, one column per signal ("name [unit]"), and "<name>.mask"."""
        cols: dict[str, Any] = {"timestamp": self.start + pd.to_timedelta(self.t, unit="s")}
        for j, s in enumerate(self.contract.signals):
            cols[f"{s.name} [{s.unit}]"] = self.values[:, j]
        for j, s in enumerate(self.contract.signals):
            cols[f"{s.name}.mask"] = self.mask[:, j]
        return pd.DataFrame(cols)


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
    start + k * period (default: from the first to the last sample of any contract signal)."""
    frame = _schema().validate(frame)
    report: dict[str, Any] = {
        "system": contract.system,
        "period_s": contract.period_s,
        "signals": {},
        "warnings": [],
    }
    known = set(contract.names())
    ignored = sorted(set(frame["signal"].unique()) - known)
    if ignored:
        report["ignored_signals"] = ignored
        report["warnings"].append(f"signals not in the contract were ignored: {', '.join(ignored)}")
    present = set(frame["signal"].unique())
    missing = [s.name for s in contract.signals if s.required and s.name not in present]
    if missing:
        raise TelemetryError(
            "signals",
            f"missing {missing}; the {contract.system} contract expects "
            f"{', '.join(contract.names())} (found: {', '.join(sorted(present)) or 'none'})",
        )

    cleaned: dict[str, pd.DataFrame] = {}
    for s in contract.signals:
        rows = frame[frame["signal"] == s.name]
        info: dict[str, Any] = {"unit": s.unit, "samples": int(len(rows))}
        values = rows["value"].to_numpy(dtype=float).copy()
        units = rows["unit"].replace("", s.unit).to_numpy()
        converted = {}
        for u in pd.unique(units):
            if u == s.unit:
                continue
            scale, offset = conversion(u, s.unit, f"{s.name}.unit", contract.unit_aliases)
            sel = units == u
            values[sel] = scale * values[sel] + offset
            converted[u] = int(sel.sum())
        if converted:
            info["converted_from"] = converted
        ts = rows["timestamp"] + pd.Timedelta(seconds=s.clock_offset_s)
        if s.clock_offset_s:
            info["clock_offset_s"] = s.clock_offset_s
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
    n = int(math.floor((t1 - t0).total_seconds() / contract.period_s + 1e-9)) + 1
    grid = np.arange(n) * contract.period_s
    values = np.full((n, len(contract.signals)), np.nan)
    for j, s in enumerate(contract.signals):
        d = cleaned[s.name]
        info = report["signals"][s.name]
        ts = (d["timestamp"] - t0).dt.total_seconds().to_numpy()
        v = d["value"].to_numpy()
        filled, how = _align(grid, ts, v, s.interpolation, contract.tolerance, contract.max_gap)
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
    report["grid"] = {"start": _iso(t0), "steps": n, "period_s": contract.period_s}
    return Telemetry(contract, t0, grid, values, mask, report)


def _align(
    grid: np.ndarray, ts: np.ndarray, v: np.ndarray, interpolation: str, tol: float, max_gap: float
) -> tuple[np.ndarray, np.ndarray]:
    """Values on `grid` and how each was obtained: 1 sampled (a sample lies within tol of the grid
    point), 2 interpolated, 0 masked. zoh: the last sample at or before the grid point (+tol, for
    jitter), at most max_gap old. linear: between the samples around the grid point when they are
    at most max_gap apart, else the nearest sample within tol."""
    out = np.full(len(grid), np.nan)
    how = np.zeros(len(grid), dtype=np.int8)
    if len(ts) == 0:
        return out, how
    nearest = np.clip(np.searchsorted(ts, grid), 0, len(ts) - 1)
    before = np.clip(nearest - 1, 0, len(ts) - 1)
    nearest = np.where(np.abs(ts[before] - grid) < np.abs(ts[nearest] - grid), before, nearest)
    close = np.abs(ts[nearest] - grid) <= tol
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
    """out_dir/telemetry.parquet (aligned, wide, with masks), quality.json and quality.png."""
    from twin_ml._io import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "telemetry": write_telemetry(
            tel.to_frame(),
            out / "telemetry.parquet",
            {"contract": tel.contract.model_dump(), "aligned": True},
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
