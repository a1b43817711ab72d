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

from twin_ml.data import real
from twin_ml.data.telemetry import (
    Contract,
    TelemetryError,
    ingest,
    read_metadata,
    read_telemetry,
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
        (lambda c: c["signals"][1].update(unit="blorbs"), "contract.signals.1"),
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
    assert list(aligned.columns) == ["timestamp", "pump [V]", "h2 [V]", "pump.mask", "h2.mask"]
    np.testing.assert_array_equal(aligned["h2 [V]"], _csv_columns(TANKS)["yVal"])
    assert (run / "quality.png").stat().st_size > 10_000
    from training.ingest import contract_path

    with pytest.raises(
        ValueError, match="contract='tanks' is unknown; known contracts: cascaded_tanks, silverbox"
    ):
        contract_path("tanks")
