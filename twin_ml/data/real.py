"""Converters from the two real benchmark datasets (data/real/, with SOURCE.txt) into the project's
telemetry format: one long Parquet file per record (timestamp UTC, signal, value, unit, quality),
with the source file's sha256 and the record's place in it in the Parquet metadata.

The benchmarks give no wall-clock time: sample k of a file is stamped 1970-01-01T00:00:00Z +
k * period, so records cut from one file keep their position in it.

- Cascaded Tanks (Schoukens et al. 2016): `dataBenchmark.csv` holds an estimation record (uEst,
  yEst) and a test record (uVal, yVal), 1024 samples each at 4 s. Signals: pump [V], h2 [V].
- Silverbox (Wigren & Schoukens 2013): `SNLS80mV.csv`, V1 (input) and V2 (output) at
  10^7 / 2^14 Hz. Records follow the standard split of the nonlinear_benchmarks package: the
  multisine part [40650:127400] split 75/25 into train and test_multisine, and the "arrow" part
  [100:40575] as test_arrow_full (its first 32000 samples: test_arrow_no_extrapolation, the
  amplitudes the multisine covered). Signals: u [V], y [V].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from twin_ml._io import sha256_file
from twin_ml.data.telemetry import EPOCH, TelemetryError, write_telemetry

SOURCES: dict[str, dict[str, Any]] = {
    "cascaded_tanks": {
        "file": "dataBenchmark.csv",
        "period_s": 4.0,
        "contract": "cascaded_tanks",
        "sha256": "ef2388ed822f3aef4aa80d6b0f2b466dd80b361786b3eafc7a2957c31ea323a7",
    },
    "silverbox": {
        "file": "SNLS80mV.csv",
        "period_s": 2**14 / 1e7,
        "contract": "silverbox",
        "sha256": "ae62d5a91230c10f76e6dd02c8a4fac3c9d4d8a95fbf50e87cb0c4885003e0f1",
    },
}
SILVERBOX_MULTISINE = (40650, 127400)
SILVERBOX_ARROW = (100, 40575)
SILVERBOX_ARROW_NO_EXTRAPOLATION = 32000


def _long(
    index: np.ndarray, period: float, signals: dict[str, np.ndarray], unit: str = "V"
) -> pd.DataFrame:
    # exact integer nanoseconds (the Silverbox period 1.6384 ms is a whole number of them)
    ts = EPOCH + pd.to_timedelta(np.round(index * period * 1e9).astype(np.int64), unit="ns")
    frames = [
        pd.DataFrame(
            {
                "timestamp": ts,
                "signal": name,
                "value": np.asarray(v, dtype=float),
                "unit": unit,
                "quality": "good",
            }
        )
        for name, v in signals.items()
    ]
    return pd.concat(frames, ignore_index=True)


def records(name: str, source: str | Path) -> dict[str, pd.DataFrame]:
    """The records of a real dataset as long telemetry frames (the source's sha256 is checked)."""
    if name not in SOURCES:
        raise TelemetryError("dataset", f"unknown {name!r}; known: {', '.join(SOURCES)}")
    spec, path = SOURCES[name], Path(source)
    if not path.is_file():
        raise TelemetryError(
            "source", f"no such file {str(path)!r} (the {name} benchmark's {spec['file']})"
        )
    digest = sha256_file(path)
    if digest != spec["sha256"]:
        raise TelemetryError(
            "source",
            f"{path.name} has sha256 {digest[:12]}..., not the {name} benchmark's "
            f"{spec['sha256'][:12]}... (see data/real/{name}/SOURCE.txt)",
        )
    raw = pd.read_csv(path)
    period = spec["period_s"]
    if name == "cascaded_tanks":
        k = np.arange(len(raw))
        return {
            "estimation": _long(k, period, {"pump": raw["uEst"], "h2": raw["yEst"]}),
            "test": _long(k, period, {"pump": raw["uVal"], "h2": raw["yVal"]}),
        }
    u, y = raw["V1"].to_numpy(), raw["V2"].to_numpy()
    a, b = SILVERBOX_MULTISINE
    cut = a + int(0.75 * (b - a))
    c, d = SILVERBOX_ARROW
    parts = {
        "train": (a, cut),
        "test_multisine": (cut, b),
        "test_arrow_full": (c, d),
        "test_arrow_no_extrapolation": (c, c + SILVERBOX_ARROW_NO_EXTRAPOLATION),
    }
    return {
        rec: _long(np.arange(lo, hi), period, {"u": u[lo:hi], "y": y[lo:hi]})
        for rec, (lo, hi) in parts.items()
    }


def convert(name: str, source: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write each record of a real dataset to out_dir/<record>.parquet; returns the paths."""
    out, spec = Path(out_dir), SOURCES.get(name, {})
    written = {}
    for rec, frame in records(name, source).items():
        written[rec] = write_telemetry(
            frame,
            out / f"{rec}.parquet",
            {
                "dataset": name,
                "record": rec,
                "source": spec["file"],
                "source_sha256": spec["sha256"],
                "period_s": spec["period_s"],
                "contract": spec["contract"],
            },
        )
    return written
