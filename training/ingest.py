"""twin-ingest: check telemetry against a data contract, align it onto the model's grid, report
its quality; or convert one of the real benchmark datasets into the telemetry format.

    twin-ingest source=FILE contract=NAME|FILE.yaml [config_dir=DIR] [out_dir=runs/ingest]
                [layout=auto] [timestamp=] [timezone=] [start=] [end=]
    twin-ingest convert=cascaded_tanks|silverbox [source=data/real/<name>/<file>]
                [out_dir=data/telemetry/<name>]

The telemetry file (.parquet or .csv) is long (timestamp, signal, value[, unit, quality]) or wide
(timestamp + a column per signal, "name [unit]" headers allowed). The contract says which column
feeds each signal (column:), the unit a column is in when its header says none (source_unit:),
and the timestamp column with its unit, epoch and timezone (timestamp:). timestamp= and timezone=
given here win over the contract's timestamp section; without either: column "timestamp", numbers
are seconds after 1970-01-01Z, naive datetimes are refused.

Ingest writes out_dir/telemetry.parquet (aligned, wide: "<signal> [<unit>]" and a boolean
"<signal>.valid" per signal, True = a valid sample), quality.json and quality.png. Convert writes
one long Parquet file per record and, beside each, its quality report (<record>.quality.json).
Prints summary.json's path last.
"""

from __future__ import annotations

import sys
from pathlib import Path

from training._common import (
    CONFIG_DIR,
    REAL_DATA_DIR,
    ROOT,
    Setting,
    defaults,
    fail,
    key_values,
    write_summary,
)

SETTINGS = {
    "source": Setting(
        None, "the telemetry file (.parquet/.csv); with convert: the benchmark's source file"
    ),
    "contract": Setting(None, "a contract: a name (config_dir's, then configs/) or a YAML"),
    "config_dir": Setting(None, "your config directory: its contract/<name>.yaml comes first"),
    "convert": Setting(None, "a real benchmark dataset to convert: cascaded_tanks or silverbox"),
    "out_dir": Setting(None, "where outputs go (runs/ingest; convert: data/telemetry/<name>)"),
    "layout": Setting("auto", "the file's layout: long, wide or auto"),
    "timestamp": Setting(
        None, "the timestamp column's name (wins over the contract's; default: timestamp)"
    ),
    "timezone": Setting(
        None, "the timezone of naive timestamps (e.g. UTC, Europe/Berlin; wins over the contract's)"
    ),
    "start": Setting(None, "the grid's first time (ISO 8601 with offset; default: the data's)"),
    "end": Setting(None, "the grid's last time (ISO 8601 with offset; default: the data's)"),
}
DEFAULTS = defaults(SETTINGS)


def contract_path(name: str, config_dir: str | None = None) -> Path:
    """The contract file `name` means, by the rule every command follows (`config_file`): a .yaml
    file or an existing path as given (relative to the current directory), else a name under
    `config_dir`/contract/ (the Hydra commands' --config-dir), then the project's
    configs/contract/."""
    from training._common import config_file

    dirs = [Path(CONFIG_DIR)]
    if config_dir:
        user = Path(config_dir).expanduser()
        if not user.is_dir():
            raise ValueError(f"config_dir={config_dir!r}: no such directory")
        dirs.insert(0, user)
    return config_file("contract", name, setting="contract", dirs=dirs)


def run(cfg: dict) -> Path:
    from twin_ml._io import atomic_write_json
    from twin_ml.data import real
    from twin_ml.data.telemetry import Contract, ingest, read_telemetry, save

    if cfg["convert"]:
        name = cfg["convert"]
        if name not in real.SOURCES:
            raise ValueError(
                f"convert={name!r} is unknown; known datasets: {', '.join(real.SOURCES)}"
            )
        source = Path(cfg["source"] or REAL_DATA_DIR / name / real.SOURCES[name]["file"])
        out = Path(cfg["out_dir"] or ROOT / "data" / "telemetry" / name)
        contract = Contract.load(contract_path(real.SOURCES[name]["contract"]))
        written = real.convert(name, source, out)
        reports = {}
        for rec, path in written.items():
            tel = ingest(read_telemetry(path), contract)
            reports[rec] = str(out / f"{rec}.quality.json")
            atomic_write_json(reports[rec], tel.report)
            print(
                f"{rec:>28}: {len(tel.t)} steps, masked {int((~tel.mask).sum())}, "
                f"stuck runs {sum(len(s['stuck_runs']) for s in tel.report['signals'].values())}"
            )
        return write_summary(
            out,
            {
                "command": "twin-ingest",
                "dataset": name,
                "source": str(source),
                "records": {k: str(v) for k, v in written.items()},
                "quality": reports,
            },
        )
    if not cfg["source"] or not cfg["contract"]:
        raise ValueError("give source=FILE and contract=NAME (or convert=DATASET)")
    contract = Contract.load(contract_path(cfg["contract"], cfg["config_dir"]))
    frame = read_telemetry(
        cfg["source"],
        layout=cfg["layout"],
        timestamp=cfg["timestamp"] or None,
        timezone=cfg["timezone"] or None,
        contract=contract,
    )
    tel = ingest(frame, contract, start=cfg["start"], end=cfg["end"])
    out = Path(cfg["out_dir"] or "runs/ingest")
    paths = save(tel, out)
    for name, info in tel.report["signals"].items():
        print(
            f"{name:>12}: {info['samples']} samples -> {info['sampled']} sampled, "
            f"{info['interpolated']} interpolated, {info['masked']} masked; "
            f"{info.get('out_of_range', 0)} out of range, "
            f"{len(info['stuck_runs'])} stuck runs, {len(info['gaps'])} gaps"
            + (f" ({info['role']})" if info["role"] == "extra" else "")
        )
    for w in tel.report["warnings"]:
        print(f"warning: {w}")
    return write_summary(
        out,
        {
            "command": "twin-ingest",
            "source": str(cfg["source"]),
            "contract": contract.system,
            "steps": len(tel.t),
            **{k: str(v) for k, v in paths.items()},
        },
    )


def main(argv: list[str] | None = None) -> None:
    import pandera.errors
    import yaml

    from twin_ml.data.telemetry import TelemetryError

    try:
        cfg = key_values(sys.argv[1:] if argv is None else argv, SETTINGS, __doc__)
        path = run(cfg)
    except (ValueError, TelemetryError, OSError, yaml.YAMLError) as e:
        fail(e)
    except pandera.errors.SchemaError as e:  # the frame's structure (e.g. an empty signal name)
        fail(ValueError(f"telemetry structure: {str(e).splitlines()[0]}"))
    print(path)


if __name__ == "__main__":
    main()
