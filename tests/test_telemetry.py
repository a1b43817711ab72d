"""Telemetry ingestion (twin_ml/data/telemetry.py, twin_ml/data/real.py, twin-ingest): the real
datasets' converters against the raw CSV, alignment of messy synthetic telemetry against the
analytic signals it was sampled from, the quality report's counts against what was injected,
and clear errors for bad input and bad contracts."""

import codecs
import csv
import json
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from twin_ml.data import real
from twin_ml.data.telemetry import (
    Contract,
    TelemetryError,
    conversion,
    convert_units,
    ingest,
    read_metadata,
    read_telemetry,
    write_telemetry,
)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TANKS = ROOT / "data" / "real" / "cascaded_tanks" / "dataBenchmark.csv"
SILVERBOX = ROOT / "data" / "real" / "silverbox" / "SNLS80mV.csv"
T0 = pd.Timestamp("2024-03-01T12:00:00Z")


def _csv_columns(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in ("uEst", "uVal", "yEst", "yVal")}


def test_cascaded_tanks_converter_matches_the_csv(tmp_path):
    raw = _csv_columns(TANKS)
    written = real.convert("cascaded_tanks", TANKS, tmp_path)
    assert set(written) == {"estimation", "test"}
    contract = Contract.load(ROOT / "configs" / "contract" / "cascaded_tanks.yaml")
    for rec, (u, y) in {"estimation": ("uEst", "yEst"), "test": ("uVal", "yVal")}.items():
        tel = ingest(read_telemetry(written[rec]), contract)
        assert tel.values.shape == (1024, 2) and tel.mask.all()
        np.testing.assert_array_equal(tel.signal("pump")[0], raw[u])
        np.testing.assert_array_equal(tel.signal("h2")[0], raw[y])
        np.testing.assert_allclose(tel.t, 4.0 * np.arange(1024))
        # the level sensor clips at 10 V: those runs are flagged, and kept
        runs = tel.report["signals"]["h2"]["stuck_runs"]
        assert runs and all(r["value"] == 10.0 for r in runs)
        clipped = np.asarray(raw[y]) == 10.0
        assert sum(r["samples"] for r in runs) <= clipped.sum()
        meta = read_metadata(written[rec])
        assert (
            meta["record"] == rec
            and meta["source_sha256"] == real.SOURCES["cascaded_tanks"]["sha256"]
        )


def test_silverbox_converter_follows_the_standard_split(tmp_path):
    frames = real.records("silverbox", SILVERBOX)
    v2 = pd.read_csv(SILVERBOX)["V2"].to_numpy()
    sizes = {k: int((f["signal"] == "y").sum()) for k, f in frames.items()}
    assert sizes == {
        "train": 65062,
        "test_multisine": 21688,
        "test_arrow_full": 40475,
        "test_arrow_no_extrapolation": 32000,
    }
    train_y = frames["train"].query("signal == 'y'")["value"].to_numpy()
    np.testing.assert_array_equal(train_y, v2[40650 : 40650 + 65062])
    # timestamps keep the sample index: 1.6384 ms steps in whole nanoseconds
    ts = frames["test_arrow_full"].query("signal == 'y'")["timestamp"]
    assert (ts.iloc[0] - real.EPOCH) == pd.Timedelta(nanoseconds=100 * 1638400)
    assert (ts.diff().dropna() == pd.Timedelta(nanoseconds=1638400)).all()


def test_converter_refuses_a_file_that_is_not_the_benchmark(tmp_path):
    fake = tmp_path / "dataBenchmark.csv"
    shutil.copy(TANKS, fake)
    with open(fake, "a") as f:
        f.write("1,1,1,1,,\n")
    with pytest.raises(
        TelemetryError, match="source: dataBenchmark.csv has sha256 .* not the cascaded_tanks"
    ):
        real.convert("cascaded_tanks", fake, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


CONTRACT = {
    "system": "demo",
    "period_s": 1.0,
    "max_gap_s": 3.0,
    "stuck_samples": 5,
    "signals": [
        {
            "name": "flow",
            "role": "input",
            "unit": "m^3/s",
            "range": [0.0, 10.0],
            "interpolation": "zoh",
        },
        {
            "name": "temp",
            "role": "output",
            "unit": "K",
            "range": [250.0, 400.0],
            "interpolation": "linear",
            "clock_offset_s": -2.0,
        },
    ],
}


def _temp(t):  # the true temperature [K] at time t [s] after T0
    return 300.0 + 20.0 * np.sin(2 * np.pi * t / 40.0)


def _messy_long() -> tuple[pd.DataFrame, dict]:
    """flow: 1 Hz, timestamps with a +01:00 offset, a duplicate, a bad-quality and an out-of-range
    sample, a stuck run; temp: every 0.5 s at 0.25 s offsets, in degC, 2 s late (the sensor's
    clock; the contract's offset corrects it), a 6 s gap."""
    rows, injected = [], {}
    local = T0.tz_convert("Europe/Berlin")
    flow = lambda k: 1.0 + 0.1 * k  # noqa: E731
    for k in range(60):
        value, quality = flow(k), "good"
        if 20 <= k < 27:
            value = 7.5  # stuck for 7 samples
        if k == 10:
            quality = "bad"
        if k == 33:
            value = 42.0  # out of range
        rows.append(
            {
                "timestamp": (local + pd.Timedelta(seconds=k)).isoformat(),
                "signal": "flow",
                "value": value,
                "unit": "m^3/s",
                "quality": quality,
            }
        )
    rows.append(
        {
            "timestamp": (local + pd.Timedelta(seconds=5)).isoformat(),
            "signal": "flow",
            "value": 99.0,
            "unit": "m^3/s",
            "quality": "good",
        }
    )  # a duplicate, sent later: it wins (out of range)
    for k in range(120):
        t = 0.25 + 0.5 * k
        if 30.0 < t < 36.0:
            continue  # a gap
        rows.append(
            {
                "timestamp": (T0 + pd.Timedelta(seconds=t + 2.0)).isoformat(),
                "signal": "temp",
                "value": _temp(t) - 273.15,
                "unit": "degC",
                "quality": "good",
            }
        )
    rows.append(
        {
            "timestamp": T0.isoformat(),
            "signal": "humidity",
            "value": 0.3,
            "unit": "",
            "quality": "good",
        }
    )
    injected["flow"] = flow
    return pd.DataFrame(rows), injected


def test_ingest_aligns_messy_telemetry_and_reports_what_it_did():
    frame, truth = _messy_long()
    contract = Contract.parse(CONTRACT)
    tel = ingest(
        read_telemetry(frame), contract, start="2024-03-01T12:00:00Z", end="2024-03-01T12:00:59Z"
    )
    assert tel.values.shape == (60, 2)
    rep = tel.report["signals"]
    flow, flow_ok = tel.signal("flow")
    temp, temp_ok = tel.signal("temp")

    # flow: exact samples, except the bad-quality point (held from the previous sample by zoh), the
    # duplicate's out-of-range winner at k=5 and the out-of-range k=33 (held likewise)
    k = np.arange(60)
    expected = np.array([truth["flow"](i) for i in k])
    expected[20:27] = 7.5
    expected[5], expected[10], expected[33] = expected[4], expected[9], expected[32]
    np.testing.assert_allclose(flow, expected, rtol=1e-12)
    assert flow_ok.all()
    assert rep["flow"]["duplicates_removed"] == 1 and rep["flow"]["duplicates_conflicting"] == 1
    assert rep["flow"]["bad_quality"] == 1 and rep["flow"]["out_of_range"] == 2
    assert rep["flow"]["sampled"] == 57 and rep["flow"]["interpolated"] == 3
    assert [r["samples"] for r in rep["flow"]["stuck_runs"]] == [7]

    # temp: degC -> K, the 2 s clock offset removed, linear interpolation between the 0.25 s
    # offsets (error <= h^2/8 max|f''| with h = 0.5 s), masked across the gap; at the record's
    # start and the gap's edges (no sample on one side) the nearest sample within 0.5 s is taken
    assert rep["temp"]["converted_from"] == {"degC": 120 - 12}
    err_bound = 0.5**2 / 8 * 20 * (2 * np.pi / 40) ** 2 + 1e-9
    edges = np.isin(tel.t, [0.0, 30.0, 36.0])
    inner = temp_ok & ~edges
    assert np.max(np.abs(temp[inner] - _temp(tel.t[inner]))) <= err_bound
    np.testing.assert_allclose(temp[edges], _temp(np.array([0.25, 29.75, 36.25])), rtol=1e-12)
    assert not temp_ok[31:36].any() and temp_ok[:30].all() and temp_ok[37:].all()
    assert rep["temp"]["masked"] == int((~temp_ok).sum()) and len(rep["temp"]["gaps"]) == 1
    assert rep["temp"]["gaps"][0]["seconds"] == pytest.approx(6.5)
    assert tel.report["ignored_signals"] == ["humidity"]


def test_skew_between_two_sensors_is_estimated():
    """Two sensors of one quantity, the second 3 samples late: the report's lag is 3 periods."""
    rng = np.random.default_rng(0)
    x = np.cumsum(rng.standard_normal(400))
    ts = T0 + pd.to_timedelta(np.arange(400), unit="s")
    frame = pd.DataFrame({"timestamp": ts, "a": x, "b": np.concatenate([[x[0]] * 3, x[:-3]])})
    contract = Contract.parse(
        {
            "system": "s",
            "period_s": 1.0,
            "signals": [
                {"name": "a", "role": "input", "unit": "V"},
                {"name": "b", "role": "output", "unit": "V"},
            ],
        }
    )
    tel = ingest(read_telemetry(frame), contract)
    assert tel.report["signals"]["b"]["skew_s"]["lag_s"] == 3.0
    shifted = contract.model_copy(
        update={
            "signals": [
                contract.signals[0],
                contract.signals[1].model_copy(update={"clock_offset_s": -3.0}),
            ]
        }
    )
    assert ingest(read_telemetry(frame), shifted).report["signals"]["b"]["skew_s"]["lag_s"] == 0.0


def test_wide_csv_with_units_in_the_header(tmp_path):
    t = np.arange(10.0)
    path = tmp_path / "wide.csv"
    pd.DataFrame({"time": t, "flow [l/s]": 1000.0 * np.ones(10), "temp [K]": 300 + t}).to_csv(
        path, index=False
    )
    tel = ingest(read_telemetry(path, timestamp="time"), Contract.parse(CONTRACT))
    flow, ok = tel.signal("flow")
    assert tel.start == real.EPOCH - pd.Timedelta(
        seconds=2
    )  # temp's clock offset moves its first sample
    assert not ok[:2].any()  # no flow sample before 0 s: masked, not invented
    np.testing.assert_allclose(flow[2:], 1.0)  # 1000 l/s = 1 m^3/s
    assert tel.report["signals"]["flow"]["converted_from"] == {"l/s": 10}


@pytest.mark.parametrize(
    "mutate, where, text",
    [
        (
            lambda f: f.assign(unit=f["unit"].where(f["signal"] != "temp", "blorbs")),
            "temp.unit",
            "unknown unit 'blorbs'",
        ),
        (
            lambda f: f.assign(unit=f["unit"].where(f["signal"] != "temp", "s")),
            "temp.unit",
            "'s' cannot be converted to the contract's 'K'",
        ),
        (lambda f: f[f["signal"] != "temp"], "signals", "missing ['temp']"),
        (
            lambda f: f.assign(timestamp=f["timestamp"].str.slice(0, 19)),
            "timestamp",
            "no timezone; give timezone=",
        ),
        (
            lambda f: f.assign(timestamp=f["timestamp"].where(f.index != 3, "yesterday")),
            "timestamp",
            "cannot parse timestamp 'yesterday'",
        ),
        (
            lambda f: f.assign(value=f["value"].astype(object).where(f.index != 4, "n/a")),
            "value",
            "row 5 of 170: 'n/a' is not a number",
        ),
        (
            lambda f: f.assign(quality=f["quality"].where(f.index != 2, "meh")),
            "quality",
            "'meh' is not one of",
        ),
        (lambda f: f.drop(columns="timestamp"), "timestamp", "no column 'timestamp'"),
    ],
)
def test_bad_telemetry_is_refused_with_the_field_named(mutate, where, text):
    frame, _ = _messy_long()
    with pytest.raises(TelemetryError) as e:
        ingest(read_telemetry(mutate(frame)), Contract.parse(CONTRACT))
    assert e.value.where == where and text in str(e.value)


# ---- broken files: refused with the file and line named, nothing written -------------------------


def _wide_lines(rows: int = 8, seed: int = 0) -> list[str]:
    """A wide CSV's lines: the header is line 1, data row k is line k + 2."""
    rng = np.random.default_rng(seed)
    lines = ["timestamp,flow [m^3/s],temp [K]"]
    for k in range(rows):
        stamp = (T0 + pd.Timedelta(seconds=k)).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines.append(f"{stamp},{rng.uniform(0, 10):.4f},{rng.uniform(250, 400):.3f}")
    return lines


def _text(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def _cut_csv(path):  # cut off inside the last row's flow value: 2 of 3 fields on line 9
    text = _text(_wide_lines())
    path.write_text(text[: text.rindex("\n", 0, -1) + 26])


def _extra_field_csv(path):
    lines = _wide_lines()
    lines[3] += ",7"  # line 4
    path.write_text(_text(lines))


def _latin1_csv(path):  # long layout; one row, line 7, spells its unit in Latin-1
    rng = np.random.default_rng(1)
    lines = ["timestamp,signal,value,unit"]
    for k in range(8):
        stamp = (T0 + pd.Timedelta(seconds=k)).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines.append(f"{stamp},temp,{rng.uniform(0, 50):.3f},{'°C' if k == 5 else 'degC'}")
    path.write_bytes(_text(lines).encode("latin-1"))


def _naive_among_aware_csv(path):
    lines = _wide_lines(seed=2)
    lines[5] = lines[5].replace("Z,", ",", 1)  # line 6 lost its offset
    path.write_text(_text(lines))


def _word_after_blank_line_csv(path):  # a blank line moves row 5 from line 7 to line 8
    lines = _wide_lines(seed=3)
    stamp, _, temp = lines[6].split(",")
    lines[6] = f"{stamp},high,{temp}"
    path.write_text(_text(lines[:3] + [""] + lines[3:]))


def _cut_parquet(path):
    rng = np.random.default_rng(4)
    frame = pd.DataFrame(
        {
            "timestamp": T0 + pd.to_timedelta(np.arange(200), unit="s"),
            "flow": rng.uniform(0, 10, 200),
        }
    )
    frame.to_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _word_parquet(path):  # long layout, the value column as text: row 4 of 8 says "high"
    rng = np.random.default_rng(5)
    values = [f"{v:.3f}" for v in rng.uniform(0, 10, 8)]
    values[3] = "high"
    pd.DataFrame(
        {
            "timestamp": [(T0 + pd.Timedelta(seconds=k)).isoformat() for k in range(8)],
            "signal": "flow",
            "value": values,
        }
    ).to_parquet(path)


BROKEN = {  # file name: (writer, TelemetryError.where, what the message must say)
    "cut.csv": (
        _cut_csv,
        "source",
        "cut.csv line 9: 2 fields where the header has 3 (the file looks truncated",
    ),
    "extra.csv": (_extra_field_csv, "source", "extra.csv line 4: 4 fields where the header has 3"),
    "utf16.csv": (
        lambda p: p.write_bytes(_text(_wide_lines()).encode("utf-16")),
        "source",
        "utf16.csv line 1: starts with a UTF-16 byte-order mark; save the file as UTF-8",
    ),
    "utf16le.csv": (
        lambda p: p.write_bytes(_text(_wide_lines()).encode("utf-16-le")),
        "source",
        "utf16le.csv line 1: a NUL byte",
    ),
    "latin1.csv": (
        _latin1_csv,
        "source",
        "latin1.csv line 7: byte 0xb0 is not UTF-8 (Latin-1 or Windows-1252 text?); "
        "save the file as UTF-8",
    ),
    "mixed.csv": (
        _naive_among_aware_csv,
        "timestamp",
        "mixed.csv line 6: timestamp '2024-03-01T12:00:04' has no UTC offset, but "
        "mixed.csv line 2 ('2024-03-01T12:00:00Z') has one",
    ),
    "header.csv": (
        lambda p: p.write_text("timestamp,flow [m^3/s],temp [K]\n"),
        "source",
        "header.csv: a header but no rows",
    ),
    "cut.parquet": (_cut_parquet, "source", "cut.parquet: not a readable Parquet file"),
    "word.csv": (
        _word_after_blank_line_csv,
        "flow [m^3/s]",
        "word.csv line 8: 'high' is not a number",
    ),
    "word.parquet": (_word_parquet, "value", "word.parquet row 4 of 8: 'high' is not a number"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_files_are_refused_naming_the_file_and_line(tmp_path, name):
    write, where, text = BROKEN[name]
    write(tmp_path / name)
    with pytest.raises(TelemetryError) as e:
        read_telemetry(tmp_path / name)
    assert e.value.where == where
    assert text in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("name", ["cut.csv", "mixed.csv", "cut.parquet"])
def test_twin_ingest_refuses_a_broken_file_and_writes_nothing(tmp_path, name):
    write, where, text = BROKEN[name]
    write(tmp_path / name)
    (tmp_path / "demo.yaml").write_text(json.dumps(CONTRACT))  # JSON is YAML
    out = tmp_path / "run"
    r = subprocess.run(
        [
            str(BIN / "twin-ingest"),
            f"source={tmp_path / name}",
            f"contract={tmp_path / 'demo.yaml'}",
            f"out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {where}: "), r.stderr
    assert text in lines[0] and r.stdout == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["demo.yaml", name])


@pytest.mark.parametrize("bom", [b"", codecs.BOM_UTF8], ids=["utf8", "utf8-bom"])
def test_offsets_across_a_dst_change_are_read_as_the_instants_they_name(tmp_path, bom):
    """Berlin leaves summer time at 2024-10-27T01:00Z: local clocks show 02:00-02:59 twice, first
    at +02:00, then at +01:00. Written with their offsets (the last row in Z) every timestamp is one
    instant; the expected instants come from datetime arithmetic, not from a timezone database."""
    first, switch = datetime(2024, 10, 26, 23, 0), datetime(2024, 10, 27, 1, 0)
    expected, lines = [], ["timestamp,signal,value"]
    for k in range(16):  # every 15 min for 4 h
        utc = first + timedelta(minutes=15 * k)
        hours = 2 if utc < switch else 1
        stamp = (
            f"{utc + timedelta(hours=hours):%Y-%m-%dT%H:%M:%S}+0{hours}:00"
            if k < 15
            else f"{utc:%Y-%m-%dT%H:%M:%S}Z"
        )
        lines.append(f"{stamp},level,{k}")
        expected.append(pd.Timestamp(utc, tz="UTC"))
    assert len({line.split("T")[1][:8] for line in lines[1:]}) < 16  # local clock times repeat
    path = tmp_path / "dst.csv"
    path.write_bytes(bom + "\r\n".join(lines).encode() + b"\r\n")
    frame = read_telemetry(path)
    assert list(frame["timestamp"]) == expected
    contract = Contract.parse(
        {
            "system": "s",
            "period_s": 900.0,
            "signals": [{"name": "level", "role": "output", "unit": "m"}],
        }
    )
    tel = ingest(frame, contract)
    assert tel.start == expected[0] and tel.mask.all()
    np.testing.assert_array_equal(tel.signal("level")[0], np.arange(16.0))


def test_naive_timestamps_with_a_timezone_are_converted_to_utc():
    frame = pd.DataFrame(
        {
            "timestamp": ["2024-07-01 14:00:00", "2024-07-01 14:00:01"],
            "flow": [1.0, 2.0],
            "temp": [300.0, 301.0],
        }
    )
    tel = ingest(read_telemetry(frame, timezone="Europe/Berlin"), Contract.parse(CONTRACT))
    assert tel.start == pd.Timestamp("2024-07-01T11:59:58Z")  # CEST is UTC+2; temp's offset -2 s


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda c: c.update(period_s=0), "contract.period_s"),
        (lambda c: c["signals"][0].update(range=[5, 1]), "contract.signals.0"),
        (lambda c: c["signals"][0].update(role="sensor"), "contract.signals.0.role"),
        (lambda c: c["signals"][1].update(unit="blorbs"), "contract.signals.1.unit"),
        (lambda c: c.update(colour="red"), "contract.colour"),
        (lambda c: c["signals"].append(dict(c["signals"][0])), "contract"),
    ],
)
def test_bad_contracts_name_the_field(mutate, where):
    c = json.loads(json.dumps(CONTRACT))
    mutate(c)
    with pytest.raises(TelemetryError) as e:
        Contract.parse(c)
    assert e.value.where == where


def test_twin_ingest_converts_and_ingests(tmp_path):
    out = tmp_path / "tanks"
    r = subprocess.run(
        [str(BIN / "twin-ingest"), "convert=cascaded_tanks", f"out_dir={out}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text())
    assert set(summary["records"]) == {"estimation", "test"}
    run = tmp_path / "ingested"
    r = subprocess.run(
        [
            str(BIN / "twin-ingest"),
            f"source={out / 'test.parquet'}",
            "contract=cascaded_tanks",
            f"out_dir={run}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    aligned = pd.read_parquet(run / "telemetry.parquet")
    assert list(aligned.columns) == ["timestamp", "pump [V]", "h2 [V]", "pump.valid", "h2.valid"]
    assert aligned["pump.valid"].dtype == bool and aligned["h2.valid"].all()
    np.testing.assert_array_equal(aligned["h2 [V]"], _csv_columns(TANKS)["yVal"])
    assert (run / "quality.png").stat().st_size > 10_000
    from training.ingest import contract_path

    with pytest.raises(
        ValueError, match="contract='tanks' is unknown; known contracts: cascaded_tanks, silverbox"
    ):
        contract_path("tanks")


# ---- foreign files through the contract alone ----------------------------------------------------

RIG_YAML = """\
system: rig
period_s: 0.1
timestamp: {column: t_rel, unit: s, epoch: "2024-05-02T08:00:00+02:00"}
unit_aliases: {qsc: "0.125 m"}
signals:
  - {name: pump, role: input, unit: V, column: U_pump, source_unit: mV}
  - {name: h2, role: output, unit: m, column: level_raw, source_unit: qsc}
  - {name: t_water, role: extra, unit: degC, column: T_w, source_unit: degF}
"""


def _float32_seconds(n: int, start: float) -> np.ndarray:
    return (start + 0.1 * np.arange(n)).astype(np.float32)


def test_a_foreign_csv_is_ingested_through_the_contract_alone(tmp_path):
    """The README's rig: source column names, mV, counts of 0.125 m through an alias, degF, float32
    seconds after a local epoch, an extra signal and a text column no signal reads. Every value is
    chosen so that its conversion is exact."""
    n = 4968
    k = np.arange(n)
    t32 = _float32_seconds(n, 1000.0)
    raw = pd.DataFrame(
        {
            "t_rel": t32.astype(np.float64),  # float32 numbers, written with all their digits
            "U_pump": 125.0 * (k % 80),  # mV -> 0.125 V steps
            "level_raw": (k % 17).astype(float),  # counts of 0.125 m
            "T_w": 32.0 + 9.0 * (k % 21),  # degF -> 5 degC steps, 0 to 100
            "operator": np.where(k % 2, "ok", "valve check"),
        }
    )
    raw.to_csv(tmp_path / "rig.csv", index=False)
    (tmp_path / "rig.yaml").write_text(RIG_YAML)
    r = subprocess.run(
        [
            str(BIN / "twin-ingest"),
            f"source={tmp_path / 'rig.csv'}",
            f"contract={tmp_path / 'rig.yaml'}",
            f"out_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "t_water" in r.stdout and "(extra)" in r.stdout
    out = pd.read_parquet(tmp_path / "run" / "telemetry.parquet")
    assert list(out.columns) == [
        "timestamp",
        "pump [V]",
        "h2 [m]",
        "t_water [degC]",
        "pump.valid",
        "h2.valid",
        "t_water.valid",
    ]
    assert len(out) == n and out[["pump.valid", "h2.valid", "t_water.valid"]].all().all()
    np.testing.assert_array_equal(out["pump [V]"], 0.125 * (k % 80))
    np.testing.assert_array_equal(out["h2 [m]"], 0.125 * (k % 17))
    np.testing.assert_array_equal(out["t_water [degC]"], 5.0 * (k % 21))
    # the epoch is 06:00Z; the first sample 1000 s after it (float32 1000.0 is exact)
    assert out["timestamp"].iloc[0] == pd.Timestamp("2024-05-02T06:16:40Z")
    report = json.loads((tmp_path / "run" / "quality.json").read_text())
    assert report["signals"]["t_water"]["role"] == "extra"
    assert report["signals"]["t_water"]["converted_from"] == {"degF": n}
    assert report["signals"]["h2"]["converted_from"] == {"qsc": n}
    assert report["signals"]["h2"]["source"] == "level_raw"
    assert report["ignored_signals"] == ["operator"]


@pytest.mark.parametrize("interpolation", ["linear", "zoh"])
@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_float32_timestamps_keep_every_sample(tmp_path, suffix, interpolation):
    """4968 samples at 0.1 s from 1000 s with float32 timestamps: rounding puts the last one
    before its grid point, and an exact comparison dropped it (4967 of 4968 grid points). Every
    sample lands on its grid point, with its value as it is."""
    n = 4968
    t32 = _float32_seconds(n, 1000.0)
    eps = float(np.finfo(np.float32).eps) * float(t32.max())  # float32's resolution at ~1500 s
    span = float(t32[-1]) - float(t32[0])
    assert 0 < (n - 1) * 0.1 - span <= eps  # the last sample lies a rounding before its point
    grid = float(t32[0]) + 0.1 * np.arange(n)
    assert np.max(np.abs(t32.astype(np.float64) - grid)) <= eps  # every sample near its point
    level = np.random.default_rng(7).uniform(0.0, 2.0, n)
    path = tmp_path / f"rig.{suffix}"
    if suffix == "parquet":
        pd.DataFrame({"t_s": t32, "level": level}).to_parquet(path)
    else:  # CSV has no float32: the numbers with all their digits
        pd.DataFrame({"t_s": t32.astype(np.float64), "level": level}).to_csv(path, index=False)
    contract = Contract.parse(
        {
            "system": "rig",
            "period_s": 0.1,
            "timestamp": {"column": "t_s", "unit": "s"},
            "signals": [
                {"name": "level", "role": "output", "unit": "m", "interpolation": interpolation}
            ],
        }
    )
    frame = read_telemetry(path, contract=contract)
    assert frame.attrs["timestamp_resolution_s"] >= eps  # read as float32 numbers
    tel = ingest(frame, contract)
    assert len(tel.t) == n and tel.mask.all()
    np.testing.assert_array_equal(tel.signal("level")[0], level)
    info = tel.report["signals"]["level"]
    assert info["sampled"] == n and info["interpolated"] == 0 and info["masked"] == 0
    assert tel.start == real.EPOCH + pd.Timedelta(seconds=1000)


@pytest.mark.parametrize(
    "source, target, x, expected",
    [
        ("mm", "m", [1500.0, -2.0, 0.5], [1.5, -0.002, 0.0005]),
        ("0.125 m", "m", [8.0, 13.0, -1.0], [1.0, 1.625, -0.125]),
        ("0.125 m", "mm", [8.0, 1.0], [1000.0, 125.0]),
        ("qsc", "m", [8.0, 3.0], [1.0, 0.375]),  # an alias with a factor
        ("degF", "degC", [32.0, 212.0, -40.0, 50.0], [0.0, 100.0, -40.0, 10.0]),
        ("degC", "degF", [0.0, 100.0, -40.0, 10.0], [32.0, 212.0, -40.0, 50.0]),
        ("l/min", "m^3/s", [60.0, 120.0], [0.001, 0.002]),
    ],
)
def test_scaled_and_offset_units_convert_exactly(source, target, x, expected):
    out = convert_units(np.array(x), source, target, aliases={"qsc": "0.125 m"})
    np.testing.assert_array_equal(out, expected)


def test_an_offset_unit_off_the_exact_points_is_within_a_rounding():
    out = convert_units(np.array([98.6]), "degF", "degC")
    # (98.6 - 32) * 5 / 9: three roundings of numbers below 100
    assert abs(out[0] - 37.0) <= 3 * np.finfo(np.float64).eps * 100.0
    assert conversion("degF", "degC", "x") == (5 / 9, -160 / 9)


def test_the_files_unit_wins_over_the_contracts_source_unit(tmp_path):
    path = tmp_path / "rig.csv"
    pd.DataFrame({"time": [0.0, 1.0], "Q_in [l/min]": [60.0, 120.0], "T_in": [20.0, 21.0]}).to_csv(
        path, index=False
    )
    contract = Contract.parse(
        {
            "system": "rig",
            "period_s": 1.0,
            "timestamp": {"column": "time"},
            "signals": [
                {"name": "flow", "role": "input", "unit": "m^3/s", "column": "Q_in"},
                {"name": "temp", "role": "output", "unit": "degC", "column": "T_in"},
            ],
        }
    )
    tel = ingest(read_telemetry(path, contract=contract), contract)
    np.testing.assert_array_equal(tel.signal("flow")[0], [0.001, 0.002])
    np.testing.assert_array_equal(tel.signal("temp")[0], [20.0, 21.0])  # no unit: the contract's
    scaled = contract.model_copy(
        update={
            "signals": [
                contract.signals[0].model_copy(update={"source_unit": "l/s"}),  # the header wins
                contract.signals[1].model_copy(update={"source_unit": "degF"}),
            ]
        }
    )
    tel = ingest(read_telemetry(path, contract=scaled), scaled)
    np.testing.assert_array_equal(tel.signal("flow")[0], [0.001, 0.002])
    assert tel.report["signals"]["flow"]["converted_from"] == {"l/min": 2}
    temp = tel.signal("temp")[0]
    np.testing.assert_allclose(temp, [-20 / 3, -55 / 9], rtol=0, atol=4 * np.finfo(float).eps * 10)


def test_a_missing_source_column_names_the_signal_and_lists_the_files_columns(tmp_path):
    path = tmp_path / "rig.csv"
    pd.DataFrame({"time": [0.0, 1.0], "Q_in [l/min]": [60.0, 120.0], "T_in": [1.0, 2.0]}).to_csv(
        path, index=False
    )
    contract = Contract.parse(
        {
            "system": "rig",
            "period_s": 1.0,
            "timestamp": {"column": "time"},
            "signals": [
                {"name": "flow", "role": "input", "unit": "m^3/s", "column": "Q_in [l/min]"},
                {"name": "temp", "role": "output", "unit": "K", "column": "T_out"},
            ],
        }
    )
    with pytest.raises(TelemetryError) as e:
        ingest(read_telemetry(path, contract=contract), contract)
    assert e.value.where == "signals"
    assert "missing ['temp'] (temp from column 'T_out')" in str(e.value)
    assert "the file's columns: time, Q_in [l/min], T_in" in str(e.value)
    none = contract.model_copy(update={"signals": contract.signals[1:]})  # reads no column at all
    with pytest.raises(TelemetryError) as e:
        ingest(read_telemetry(path, contract=none), none)
    assert "missing ['temp'] (temp from column 'T_out')" in str(e.value)


def test_the_contracts_timestamp_section_and_what_wins_over_it(tmp_path):
    path = tmp_path / "clock.csv"
    pd.DataFrame(
        {
            "t_ms": [0, 500, 1000, 1500],
            "local": [f"2024-07-01 14:00:0{s}" for s in ("0", "0.5", "1", "1.5")],
            "a": [1.0, 2.0, 3.0, 4.0],
        }
    ).to_csv(path, index=False)
    base = {"system": "s", "period_s": 0.5}
    base["signals"] = [{"name": "a", "role": "output", "unit": "V"}]
    section = {"column": "t_ms", "unit": "ms", "epoch": "2024-07-01T16:00:00+02:00"}
    ms = Contract.parse({**base, "timestamp": section})
    tel = ingest(read_telemetry(path, contract=ms), ms)
    assert tel.start == pd.Timestamp("2024-07-01T14:00:00Z") and len(tel.t) == 4
    np.testing.assert_array_equal(tel.signal("a")[0], [1.0, 2.0, 3.0, 4.0])
    local = Contract.parse(
        {**base, "timestamp": {"column": "local", "unit": "datetime", "timezone": "Europe/Berlin"}}
    )
    assert ingest(read_telemetry(path, contract=local), local).start == pd.Timestamp(
        "2024-07-01T12:00:00Z"
    )
    # arguments (twin-ingest's timestamp= and timezone=) win over the section; another column is
    # not read in the section's unit
    frame = read_telemetry(path, contract=ms, timestamp="local", timezone="UTC")
    assert ingest(frame, ms).start == pd.Timestamp("2024-07-01T14:00:00Z")
    frame = read_telemetry(path, contract=local, timezone="UTC")
    assert ingest(frame, local).start == pd.Timestamp("2024-07-01T14:00:00Z")
    wrong = Contract.parse({**base, "timestamp": {"column": "local", "unit": "ms"}})
    with pytest.raises(TelemetryError) as e:
        read_telemetry(path, contract=wrong)
    assert e.value.where == "timestamp"
    assert "'2024-07-01 14:00:00' is not a number, but the contract's timestamp.unit is 'ms'" in (
        str(e.value)
    )


def test_an_extra_signal_is_kept_but_never_an_output():
    from types import SimpleNamespace

    from twin_ml.data.records import check_contract, record_arrays

    contract = Contract.parse(
        {
            "system": "s",
            "period_s": 1.0,
            "signals": [
                {"name": "u", "role": "input", "unit": "V"},
                {"name": "y", "role": "output", "unit": "V"},
                {"name": "z", "role": "extra", "unit": "V", "range": [0.0, 10.0]},
            ],
        }
    )
    z = np.array([1.0, 2.0, 42.0, 4.0, 5.0])  # 42 is out of range: masked like any signal's
    frame = pd.DataFrame(
        {
            "timestamp": T0 + pd.to_timedelta(np.arange(5), unit="s"),
            "u": np.arange(5.0),
            "y": np.arange(5.0) ** 2,
            "z": z,
        }
    )
    tel = ingest(read_telemetry(frame), contract)
    assert contract.names("output") == ["y"] and contract.names("extra") == ["z"]
    values, valid = tel.role("extra")
    np.testing.assert_array_equal(values[:, 0], [1.0, 2.0, 3.0, 4.0, 5.0])  # interpolated at 2
    assert tel.report["signals"]["z"]["out_of_range"] == 1
    assert tel.report["signals"]["z"]["role"] == "extra"
    assert "z [V]" in tel.to_frame().columns and "z.valid" in tel.to_frame().columns
    # a system that has z as an output: the contract does not, so records leave it masked
    system = SimpleNamespace(input_names=["u"], output_names=["y", "z"])
    check_contract(contract, system, "s")
    arrays = record_arrays(system, contract, tel)
    assert arrays["mask"][:, 0].all() and not arrays["mask"][:, 1].any()
    np.testing.assert_array_equal(arrays["y"][:, 0], np.arange(5.0) ** 2)


@pytest.mark.parametrize("suffix", ["valid", "mask"])
def test_an_ingested_file_reads_back_with_its_validity(tmp_path, suffix):
    """The ingested file, read back under a contract that reads other columns and another
    timestamp: its own format wins (signals by their names, its timestamp), its clock offsets are
    not applied twice, and "<signal>.valid" (or the older ".mask", True = valid as well) is read
    as validity."""
    frame, _ = _messy_long()
    contract = Contract.parse(CONTRACT)
    tel = ingest(
        read_telemetry(frame), contract, start="2024-03-01T12:00:00Z", end="2024-03-01T12:00:59Z"
    )
    assert not tel.mask[:, 1].all()  # temp's gap
    written = tel.to_frame()
    written.loc[40, "flow.valid"] = False  # a finite value that is not valid
    if suffix == "mask":
        written.columns = [c.replace(".valid", ".mask") for c in written.columns]
    path = write_telemetry(written, tmp_path / "telemetry.parquet", {"aligned": True})
    foreign = json.loads(json.dumps(CONTRACT))
    foreign["timestamp"] = {"column": "t_rel", "unit": "ms"}
    foreign["signals"][0]["column"] = "Q_in"
    foreign["signals"][1]["column"] = "T_out"
    foreign = Contract.parse(foreign)
    back = ingest(read_telemetry(path, contract=foreign), foreign)
    assert back.start == tel.start and len(back.t) == len(tel.t)
    np.testing.assert_array_equal(back.values[:, 1], tel.values[:, 1])
    np.testing.assert_array_equal(back.mask[:, 1], tel.mask[:, 1])
    assert back.report["signals"]["flow"]["bad_quality"] == 1  # the False read as not valid
    flow = back.signal("flow")[0]
    assert flow[40] == tel.signal("flow")[0][39]  # zoh holds the last valid sample
    np.testing.assert_array_equal(np.delete(flow, 40), np.delete(tel.signal("flow")[0], 40))
    assert any("read by their own names" in w for w in back.report["warnings"])


@pytest.mark.parametrize(
    "mutate, where, text",
    [
        (
            lambda c: c["signals"][1].update(source_unit="0.125 blorbs"),
            "contract.signals.1.source_unit",
            "signal 'temp': unknown unit '0.125 blorbs': it is not a unit pint knows; give a "
            "unit pint knows, or a positive factor times one",
        ),
        (
            lambda c: c["signals"][1].update(source_unit="2 degF"),
            "contract.signals.1.source_unit",
            "signal 'temp': unknown unit '2 degF': it puts a factor on an offset unit",
        ),
        (
            lambda c: c["signals"][1].update(source_unit="s"),
            "contract.signals.1.source_unit",
            "signal 'temp': unit 's' cannot be converted to the contract's 'K'",
        ),
        (
            lambda c: c.update(unit_aliases={"qsc": "0.125 blorbs"}),
            "contract.unit_aliases.qsc",
            "unknown unit 'qsc' (= '0.125 blorbs' in unit_aliases)",
        ),
        (
            lambda c: c["signals"][1].update(column="flow"),
            "contract",
            "two signals read the same column ['flow']",
        ),
        (
            lambda c: c.update(timestamp={"unit": "fortnight"}),
            "contract.timestamp.unit",
            "'s', 'ms', 'us', 'ns', 'min', 'h' or 'datetime'",
        ),
        (
            lambda c: c.update(timestamp={"epoch": "yesterday"}),
            "contract.timestamp.epoch",
            "'yesterday' is not an ISO 8601 time",
        ),
        (
            lambda c: c.update(timestamp={"epoch": "2024-01-01T00:00:00"}),
            "contract.timestamp.epoch",
            "has no timezone",
        ),
        (
            lambda c: c.update(timestamp={"timezone": "Mars/Olympus"}),
            "contract.timestamp.timezone",
            "'Mars/Olympus' is not a timezone",
        ),
        (lambda c: c.update(timestamp={"colum": "t"}), "contract.timestamp.colum", "Extra inputs"),
    ],
)
def test_bad_contract_fields_are_refused_naming_them(mutate, where, text):
    c = json.loads(json.dumps(CONTRACT))
    mutate(c)
    with pytest.raises(TelemetryError) as e:
        Contract.parse(c)
    assert e.value.where == where and text in str(e.value), str(e.value)


def test_an_alias_with_a_factor_and_a_column_parse():
    """What the lab rig's contract hit: `column:` was an extra input, and an alias with a factor
    was "unknown unit 'qsc' (... add it to the contract's unit_aliases)" although it was there."""
    contract = Contract.parse(yaml.safe_load(RIG_YAML))
    assert [s.source for s in contract.signals] == ["U_pump", "level_raw", "T_w"]
    readme = (ROOT / "README.md").read_text()
    assert all(f"  {line}" in readme for line in RIG_YAML.splitlines())  # the README's example
    assert conversion("qsc", "m", "h2", contract.unit_aliases) == (0.125, 0.0)
