"""twin-monitor: replay a telemetry stream against a model trained on telemetry and report drift.

    twin-monitor model=RUN_DIR|MODEL_DIR source=FILE|DATASET:RECORD [reference=FILE|DATASET:RECORD]
                 [reference_windows=25] [window=32] [horizon=32] [slack=1] [threshold=6]
                 [inject=KIND:SIGNAL:SIZE@ONSET_S[,...]] [steps=] [out_dir=runs/monitor]

The stream (`source`) is a telemetry file (.parquet/.csv, as twin-ingest reads them), replayed in
order under the model's data contract, or DATASET:RECORD for a real dataset's record (e.g.
silverbox:test_multisine). Without `reference` the detector is standardized by the stream's own
first `reference_windows` windows, which are then assumed healthy. Injected faults (what-if
checks): bias adds SIZE, gain multiplies by SIZE, skew delays by SIZE samples, e.g.
inject=bias:y:0.005@20.

Writes out_dir/drift.json (alarms, per-window statistics, the reference, settings) and drift.png,
and prints summary.json's path last. Exit status 0 whether or not drift is found; the report's
"drift" field says which. A record may leave out some of the model's outputs (or have them masked
throughout): those are not monitored, which the report's "notes" say; at least one output must be
measured. Nothing is written unless the whole report is (no empty out_dir after an error).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from training._common import (
    REAL_DATA_DIR,
    Setting,
    defaults,
    fail,
    key_values,
    staged_dir,
    write_json,
    write_summary,
)
from twin_ml.drift import REFERENCE_WINDOWS, DriftSettings

SETTINGS = {
    "model": Setting(
        None, "a twin-train run on telemetry (its model/ is used) or a model directory", True
    ),
    "source": Setting(None, "the stream: a telemetry file or DATASET:RECORD", True),
    "reference": Setting(
        None, "a clean record to standardize the detector by (default: the stream's start)"
    ),
    "reference_windows": Setting(
        str(REFERENCE_WINDOWS), "windows of the stream's start taken as the reference"
    ),
    "window": Setting(str(DriftSettings.window), "steps per monitoring window"),
    "horizon": Setting(
        "32", "the prediction restarts from the measured states every N steps (none: one run)"
    ),
    "slack": Setting(str(DriftSettings.slack), "the CUSUM's allowance, in reference std"),
    "threshold": Setting(str(DriftSettings.threshold), "the CUSUM's alarm level, in reference std"),
    "inject": Setting(None, "sensor faults to inject first: KIND:SIGNAL:SIZE@ONSET_S[,...]"),
    "steps": Setting(None, "replay only the stream's first N samples"),
    "out_dir": Setting("runs/monitor", "where drift.json, drift.png and summary.json go"),
}
DEFAULTS = defaults(SETTINGS)


def _int(cfg: dict, key: str, allow_none: bool = False) -> int | None:
    v = cfg[key]
    if allow_none and (v is None or str(v).lower() in ("none", "null")):
        return None
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ValueError(
            f"{key} must be a whole number{' or none' if allow_none else ''}, got {v!r}"
        ) from None
    if n < 1:
        raise ValueError(f"{key} must be >= 1, got {n}")
    return n


def _float(cfg: dict, key: str) -> float:
    try:
        return float(cfg[key])
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {cfg[key]!r}") from None


def _outputs_optional(contract):
    """The contract with its outputs not required: a record that lacks one is monitored on the
    others (its inputs stay required: the model needs them to predict)."""
    signals = [
        s.model_copy(update={"required": False}) if s.role == "output" else s
        for s in contract.signals
    ]
    return contract.model_copy(update={"signals": signals})


def load_stream(spec: str, contract, system, key: str = "source") -> dict[str, np.ndarray]:
    """{"t", "u", "y", "mask"} of a telemetry file or a real dataset's record, under the
    contract (outputs may be missing from it, not all of them)."""
    from twin_ml.data import real
    from twin_ml.data.records import record_arrays
    from twin_ml.data.telemetry import ingest, read_telemetry

    path = Path(spec)
    if path.suffix.lower() in (".parquet", ".csv"):
        if not path.is_file():
            raise ValueError(f"source: no such telemetry file {spec!r}")
        frame = read_telemetry(path, contract=contract)  # its columns, units, timestamp
    else:
        name, sep, record = spec.partition(":")
        if not sep or name not in real.SOURCES:
            raise ValueError(
                f"source {spec!r} must be a .parquet/.csv file or DATASET:RECORD with a dataset "
                f"among {', '.join(real.SOURCES)}"
            )
        frames = real.records(name, REAL_DATA_DIR / name / real.SOURCES[name]["file"])
        if record not in frames:
            raise ValueError(
                f"source {spec!r}: record {record!r} is unknown; records: {', '.join(frames)}"
            )
        frame = frames[record]
    contract = _outputs_optional(contract)
    rec = record_arrays(system, contract, ingest(frame, contract))
    if not rec["mask"].any():
        raise ValueError(
            f"{key} {spec!r} measures none of the model's outputs "
            f"({', '.join(system.output_names)}): there is nothing to monitor"
        )
    return rec


def run(cfg: dict[str, Any]) -> Path:
    from twin_ml.data.telemetry import Contract
    from twin_ml.drift import Fault, inject, plot_report
    from twin_ml.evaluate.telemetry import monitor
    from twin_ml.models import load_trained

    if not cfg["model"] or not cfg["source"]:
        raise ValueError("give model=RUN_DIR and source=FILE|DATASET:RECORD")
    model_dir = Path(cfg["model"])
    if (model_dir / "model").is_dir():
        model_dir = model_dir / "model"
    model, meta = load_trained(model_dir)
    tmeta = meta.get("telemetry")
    if not tmeta or "state_ranges" not in tmeta:
        raise ValueError(
            f"model={cfg['model']!r} was not trained on telemetry by this version "
            "(model.json has no telemetry.state_ranges); train it with an experiment like "
            "cascaded_tanks_real"
        )
    system = model.system
    contract = Contract.model_validate(tmeta["contract"])
    settings = DriftSettings(
        window=_int(cfg, "window"), slack=_float(cfg, "slack"), threshold=_float(cfg, "threshold")
    ).check()
    horizon, ref_windows = _int(cfg, "horizon", allow_none=True), _int(cfg, "reference_windows")
    faults = [Fault.parse(f) for f in cfg["inject"].split(",")] if cfg["inject"] else []
    stream = load_stream(cfg["source"], contract, system)
    steps = _int(cfg, "steps", allow_none=True)
    if steps is not None:
        stream = {k: v[:steps] for k, v in stream.items()}
    ref = load_stream(cfg["reference"], contract, system, "reference") if cfg["reference"] else None
    for key, rec in (("source", stream), ("reference", ref)):
        if rec is not None and len(rec["t"]) < 3 * settings.window:
            raise ValueError(
                f"{key}: {len(rec['t'])} samples; the monitor needs >= 3 windows of "
                f"{settings.window}"
            )
    names = system.output_names
    dt = float(stream["t"][1] - stream["t"][0])
    y, mask = inject(stream["y"], stream["mask"], stream["t"], names, faults)
    if ref is None:
        for f in faults:
            if f.onset_s < ref_windows * settings.window * dt:
                raise ValueError(
                    f"inject: onset {f.onset_s} s falls in the reference (the first "
                    f"{ref_windows} windows, {ref_windows * settings.window * dt:.6g} s); "
                    "move it later or give reference="
                )
    p = np.array([tmeta["parameters"][n] for n in system.parameter_names])
    result = monitor(
        model,
        stream["u"],
        p,
        y,
        mask,
        stream["t"],
        settings=settings,
        horizon=horizon,
        init_samples=int(tmeta.get("init_samples", 25)),
        ranges=np.array(tmeta["state_ranges"]),
        input_range=np.array(tmeta["input_range"]) if tmeta.get("input_range") else None,
        reference_record=ref,
        reference_windows=ref_windows,
    )
    report = result["report"]
    report.update(
        source=cfg["source"],
        model=str(model_dir),
        faults=[f.__dict__ for f in faults],
        steps=len(stream["t"]),
        period_s=dt,
    )
    out = Path(cfg["out_dir"])
    title = f"{system.name}: {cfg['source']}" + (f" with {cfg['inject']}" if faults else "")
    with staged_dir(out) as stage:  # published as out_dir only once everything is written
        write_json(stage / "drift.json", report)
        plot_report(
            report,
            stream["t"],
            y,
            mask,
            result["mean"],
            result["std"],
            names,
            stage / "drift.png",
            title=title,
            onsets=[f.onset_s for f in faults],
        )
        summary = {
            "command": "twin-monitor",
            "model": str(model_dir),
            "source": cfg["source"],
            "drift": report["drift"],
            "alarms": report["alarms"],
            "report": str(out / "drift.json"),
            "plot": str(out / "drift.png"),
        }
        if report.get("notes"):
            summary["notes"] = report["notes"]
        write_summary(stage, summary)
    for note in report.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    for a in report["alarms"]:
        print(
            f"alarm: {a['signal']} {a['kind']} in window {a['window']} (by t = {a['time_s']:.6g} s)"
        )
    if not report["alarms"]:
        print(f"no drift over {report['windows']} windows of {settings.window} steps")
    return out / "summary.json"


def main(argv: list[str] | None = None) -> None:
    from twin_ml.data.telemetry import TelemetryError

    try:
        cfg = key_values(sys.argv[1:] if argv is None else argv, SETTINGS, __doc__)
    except ValueError as e:
        fail(e)
    import torch

    torch.set_num_threads(1)  # a replay is many small sequential steps: a second thread only costs
    torch.set_flush_denormal(True)
    try:
        path = run(cfg)
    except (ValueError, TelemetryError, OSError) as e:
        fail(e)
    print(path)


if __name__ == "__main__":
    main()
