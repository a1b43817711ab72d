"""The live twin on a real broker: throughput, latency, and whether the stream's estimates are
the in-process filter's.

    python benchmarks/live.py [--out benchmarks/results/live.json] [--quick] [--runs 3]
        [--rate 200] [--tanks-run runs/tanks-real] [--no-profile] [--fleet 4 8 16 32]

The Cascaded Tanks test record (1024 samples at 4 s, data/real, `load_messages`), the trained
`experiment=cascaded_tanks_real` hybrid (M = 5 networks; trained when runs/tanks-real is missing)
exported to ONNX and saved in a model store of the benchmark's own (runs/bench-live/store), the
filter settings of benchmarks/assimilation.py's TANKS (noise 0.02 V, 30 members, its prior and
physics parameters, process noise 0.02 per state) as a twin create request, and a real
nats-server with JetStream started here (tests/brokers.py's start_nats). One consumer, one twin.

- Throughput: the record published first (a backlog in the stream), then `consume` (batch 64)
  drains it in this process: assimilation, the twin saved in a SQLite file store per batch, a
  Parquet archive part per batch, one estimate per sample published to JetStream, acks.
  messages_per_s = deliveries / the consumer's wall time (connect to close). `--runs` times
  (a new twin and durable consumer each), median and each run, each beside Twin.assimilate
  alone on the same record just before it (the ceiling: the filter and nothing else) and their
  ratio; then once the same through the twin-stream command in a process of its own (its
  summary's wall time: the same loop, the process's start-up not counted; that is given beside
  it). Two further runs time the parts of the loop per message with a timed LiveTwin subclass
  (load and restore the twin, map, assimilate, archive, save; the rest: fetch, decode, publish,
  ack): batch 64 over the record, batch 1 over its first 200 samples (a batch's fixed cost).
- Fleets (`--fleet 4 8 16 32`; --quick: 16): that many twins' records (the test record, each
  twin's level reading offset by 0.01 V x its index) published interleaved on
  plant.<run>.t<k>.telemetry, drained by one `consume` of a `LiveFleet` (batch 64 per twin):
  the same work per message as one twin's run, a batch's samples of all twins assimilated
  together. Beside it: `assimilate_many` alone on the same records, and each twin's members
  against that in-process twin; lost / duplicated estimates per twin.
- Latency: twin-stream in a process of its own; a publisher here paced at `--rate` messages/s
  (each publish confirmed by the stream) records when it sends each sample; a core NATS
  subscriber on the estimates subject records when each sample's estimate arrives (both
  time.monotonic, one clock for every process). The first two samples warm the consumer (its
  first batch loads modules, the first forecast opens the ONNX session's caches) and are
  reported apart; p50 / p99 / max over the others, and the mean batch the consumer formed. Then
  (not with --quick) the same at 100 and 50 messages/s.
- Quality through the broker: from the estimates the throughput runs published, the one-step
  RMSE after assimilation over the open loop's (the in-process open loop of score_record: the
  same filter given the first 25 samples only) and the 90% band's coverage, beside
  `score_record` in process with the identical settings and prior; the max |difference| of the
  one-step predicted means, stream against in process.
- Lost / duplicated: samples with no estimate, estimates of one sample published more than
  once, samples assimilated more than once (the twin's state against the in-process twin fed
  every sample once); the same after twin-stream is killed with SIGKILL as soon as the store's
  last_seq has moved, and restarted until idle.
- Profile (not with --quick or --no-profile): py-spy (250 Hz, non-blocking), attached to
  twin-stream draining the backlog once it has saved its first batch, records a flame graph
  (results/live-flame.svg) and, in a second run, the raw stacks: the share of the loop's
  on-CPU samples each part takes (inclusive; waiting on the broker is not on-CPU, the timed
  runs show it).

Goals (issue): >= 2000 messages/s with assimilation on, M = 5, on 2 cores (`messages_per_s`
is one twin's; `fleet_messages_per_s` a fleet's per size); p99 <= 50 ms at
200 messages/s; the stream's RMSE and coverage those of the in-process filter within 1e-6.
Misses are reported as misses.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _runs import BIN, ROOT, graph_version  # noqa: E402

WORK = ROOT / "runs" / "bench-live"
OUT = ROOT / "benchmarks" / "results" / "live.json"
FLAME = ROOT / "benchmarks" / "results" / "live-flame.svg"
REAL = ROOT / "data" / "real"
STREAM = "BENCH"
SUBJECT = "plant.tanks.telemetry"
MODEL = "bench_live_tanks"
PROCESS = 0.02  # per state and 4 s step: benchmarks/assimilation.py's choice for the hybrid
BATCH = 64
GOALS = {"messages_per_s": 2000.0, "latency_p99_ms": 50.0, "agreement": 1e-6}
WAIT = 120.0  # seconds before a stuck step fails the benchmark (a hang guard, not a measure)

# the parts of the per-message work the profile reports: (label, function, its file)
PROFILE_PARTS = [
    ("handle (one batch, all indented below)", "LiveTwin.handle", "twin_ml/stream/live.py"),
    ("  load + restore the twin", "LiveTwin._load", "twin_ml/stream/live.py"),
    ("  map messages (to_samples)", "to_samples", "twin_ml/stream/messages.py"),
    ("  assimilate (Twin.assimilate)", "Twin.assimilate", "twin_ml/assimilate/twin.py"),
    ("    forecast (OnnxForecast)", "OnnxForecast.__call__", "twin_ml/assimilate/filter.py"),
    ("      onnxruntime session.run", "Session.run", "onnxruntime_inference_collection.py"),
    ("    analysis (etkf)", "etkf", "twin_ml/assimilate/analysis.py"),
    ("    observe members", "EnsembleFilter.observe_members", "twin_ml/assimilate/filter.py"),
    ("    alarms (Watch.feed)", "Watch.feed", "twin_ml/assimilate/twin.py"),
    ("  archive (Parquet part)", "LiveTwin._archive", "twin_ml/stream/live.py"),
    ("  twin state to JSON values", "Twin.state", "twin_ml/assimilate/twin.py"),
    ("save the twin (LiveTwin.save)", "LiveTwin.save", "twin_ml/stream/live.py"),
    ("decode messages", "decode", "twin_ml/stream/messages.py"),
    ("publish estimates", "JetStreamBroker.publish_all", "twin_ml/stream/brokers.py"),
    ("ack", "ack_all", "twin_ml/stream/brokers.py"),
    ("fetch", "JetStreamSubscription.next", "twin_ml/stream/brokers.py"),
]


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- the model, the record, the settings ---------------------------------------------------------


def stored_model(run: Path) -> str:
    """MODEL:<graph version>-<weights hash>: the trained run exported (parity-checked) into the
    benchmark's store when that version is not there yet."""
    from assimilation import TANKS, trained

    from twin_ml import registry
    from twin_ml.export.export import export_run

    run = trained(TANKS["experiment"], run)
    weights = hashlib.sha256((run / "model" / "model.pt").read_bytes()).hexdigest()[:8]
    ref = f"{MODEL}:{graph_version()}-{weights}"
    try:
        registry.verify(ref)
    except registry.RegistryError:
        log(f"exporting {run} as {ref}")
        version = ref.split(":")[1]
        blob, card = export_run(
            run, name=MODEL, version=version, parity_scenarios=8, parity_steps=50
        )
        registry.save(MODEL, version, blob, card)
    return ref


def settings(card, y0: float) -> tuple[dict, dict]:
    """(the twin create request, the same as score_record's arguments) from TANKS."""
    from assimilation import MEMBERS, TANKS

    states = card.system.state_names
    mean = [y0 if v is None else v for v in TANKS["x0"][0]]
    std = list(TANKS["x0"][1])
    create = {
        "noise": {card.system.output_names[0]: TANKS["noise"]},
        "initial_state": dict(zip(states, mean)),
        "initial_std": dict(zip(states, std)),
        "parameters": dict(zip(card.system.parameter_names, TANKS["parameters"])),
        "filter": {"members": MEMBERS, "process": dict.fromkeys(states, PROCESS), "seed": 0},
    }
    args = {
        "noise": np.array([TANKS["noise"]]),
        "x0": (np.array(mean), np.array(std)),
        "p": (np.array(TANKS["parameters"]), np.zeros(len(TANKS["parameters"]))),
        "members": MEMBERS,
        "init": TANKS["init"],
    }
    return create, args


def in_process(blob, card, t, u, y, args) -> dict:
    """score_record with the stream's settings: the one-step scores and predictions, the open
    loop's RMSE, and the wall time."""
    from twin_ml.assimilate.filter import FilterSettings, OnnxForecast, score_record

    t0 = time.perf_counter()
    sc = score_record(
        card.system.build(),
        OnnxForecast(blob, card),
        t,
        u,
        y,
        args["noise"],
        args["x0"],
        args["p"],
        FilterSettings(members=args["members"], process=(PROCESS, PROCESS), seed=0),
        horizons=(1,),
        init=args["init"],
    )
    return {
        "rmse_1step": sc.rmse[1],
        "open_loop_rmse": sc.open_loop_rmse,
        "rmse_1step_ratio": sc.ratio(1),
        "coverage_90": sc.coverage_90[1],
        "predicted_mean": sc.result.predicted_mean[:, 0],
        "predicted_std": sc.result.predicted_std[:, 0],
        "seconds": time.perf_counter() - t0,
    }


def reference_state(blob, card, create, t, u, y) -> tuple[dict, float]:
    """The in-process twin fed every sample once (Twin.assimilate, one call), its state as JSON,
    and the seconds that call took (assimilation alone: the ceiling of a stream's rate)."""
    from twin_ml.assimilate.filter import OnnxForecast
    from twin_ml.assimilate.twin import Observation, Twin

    body = {**create, "t0": float(t[0]), "inputs": {"pump": float(u[0, 0])}}
    twin = Twin.create(card, OnnxForecast(blob, card), body)
    t0 = time.perf_counter()
    twin.assimilate(Observation(t, u, y))
    seconds = time.perf_counter() - t0
    return json.loads(json.dumps(twin.state())), seconds


def stream_scores(estimates: list[dict], y: np.ndarray, ref: dict, init: int) -> dict:
    """One-step RMSE and 90% coverage of the estimates received (the first of each seq), over
    the in-process open loop, and their max |difference| from the in-process predictions."""
    from twin_ml.assimilate.filter import Z90

    n = len(y)
    first: dict[int, dict] = {}
    for e in estimates:
        first.setdefault(e["seq"], e)
    have = np.array(sorted(k for k in first if 0 <= k < n), dtype=int)
    mean = np.full(n, np.nan)
    std = np.full(n, np.nan)
    for k in have:
        mean[k] = first[k]["predicted"]["h2"]["mean"]
        std[k] = first[k]["predicted"]["h2"]["std"]
    scored = np.arange(init, n)
    e = y[scored, 0] - mean[scored]
    ok = np.isfinite(e)
    rmse = float(np.sqrt(np.mean(e[ok] ** 2))) if ok.any() else float("nan")
    cover = float(np.mean(np.abs(e[ok]) <= Z90 * std[scored][ok])) if ok.any() else float("nan")
    diff = np.abs(mean[have] - ref["predicted_mean"][have]) if len(have) else np.array([np.nan])
    sdiff = np.abs(std[have] - ref["predicted_std"][have]) if len(have) else np.array([np.nan])
    return {
        "rmse_1step": rmse,
        "rmse_1step_ratio": rmse / ref["open_loop_rmse"],
        "coverage_90": cover,
        "max_abs_diff_predicted_mean": float(diff.max()),
        "max_abs_diff_predicted_std": float(sdiff.max()),
        "scored": int(ok.sum()),
    }


def counts(estimates: list[dict], n: int) -> dict:
    seen = Counter(e["seq"] for e in estimates)
    return {
        "estimates": len(estimates),
        "lost": sum(1 for k in range(n) if seen[k] == 0),
        "duplicated_estimates": sum(c - 1 for c in seen.values() if c > 1),
    }


# ---- the broker side ----------------------------------------------------------------------------


async def read_all(url: str, subject: str, name: str, quiet_s: float = 2.0) -> list[dict]:
    """Every message stored on a JetStream subject (a durable consumer of its own), as JSON,
    until none came for quiet_s."""
    from twin_ml.stream.brokers import connect

    out = []
    async with await connect(url, name=name, stream=STREAM, batch=256) as b:
        sub = await b.subscribe(subject)
        while True:
            try:
                d = await sub.next(quiet_s)
            except TimeoutError:
                return out
            out.append(json.loads(d.payload))
            await d.ack()


def command(ref: str, url: str, subject: str, twin: str, root: Path, create: dict, *extra):
    """twin-stream's argument list (store, archive and summary under root)."""
    return [
        str(BIN / "twin-stream"),
        f"model={ref}",
        f"url={url}",
        f"subject={subject}",
        f"twin={twin}",
        f"create={json.dumps(create)}",
        f"stream={STREAM}",
        f"batch={BATCH}",
        "progress=false",
        f"twins_store={root / 'twins.sqlite'}",
        f"archive={root / 'archive'}",
        f"out_dir={root / 'out'}",
        *extra,
    ]


def spawn(args: list[str], root: Path, env: dict) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    n = len(list(root.glob("stream-*.log")))
    with open(root / f"stream-{n}.log", "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log = root / f"stream-{n}.log"
    return proc


def finish(proc: subprocess.Popen, timeout: float) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise SystemExit(f"twin-stream did not finish:\n{proc.log.read_text()[-3000:]}") from None
    if rc != 0:
        raise SystemExit(f"twin-stream exited with {rc}:\n{proc.log.read_text()[-3000:]}")


def live_twin(blob, card, create, root: Path, twin: str, timed: bool = False):
    from twin_ml.assimilate.filter import OnnxForecast
    from twin_ml.stream.live import LiveTwin, model_contract
    from twin_ml.stream.store import TwinStore, sqlite_url

    store = TwinStore(sqlite_url(root / "twins.sqlite"))
    cls = timed_live_twin() if timed else LiveTwin
    live = cls(
        store,
        card,
        OnnxForecast(blob, card),
        model_contract(card),
        twin,
        create=create,
        archive=root / "archive",
    )
    return live, store


class TimedStore:
    """A TwinStore whose reads and writes add their wall time to `parts`."""

    def __init__(self, store, parts: Counter):
        self._store, self._parts = store, parts

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _timed(self, part, name, *a, **k):
        t0 = time.perf_counter()
        try:
            return getattr(self._store, name)(*a, **k)
        finally:
            self._parts[part] += time.perf_counter() - t0

    def get(self, *a, **k):
        return self._timed("get", "get", *a, **k)

    def save(self, *a, **k):
        return self._timed("save", "save", *a, **k)

    def create(self, *a, **k):
        return self._timed("save", "create", *a, **k)


def timed_live_twin():
    """LiveTwin whose parts of `handle` add their wall time to `parts` (seconds); the library's
    class itself is not changed."""
    from twin_ml.stream.live import LiveTwin

    class Timed(LiveTwin):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.parts = Counter()
            self.store = TimedStore(self.store, self.parts)

        def _timed(self, name, fn, *a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.parts[name] += time.perf_counter() - t0

        def handle(self, items, **kwargs):
            return self._timed("handle", super().handle, items, **kwargs)

        def _load(self):
            return self._timed("load", super()._load)

        def _assimilate(self, batch, out):
            return self._timed("assimilate", super()._assimilate, batch, out)

        def _archive(self, samples, sequences):
            return self._timed("archive", super()._archive, samples, sequences)

    return Timed


def stored_state(store, twin: str) -> dict:
    state = dict(store.get(twin).state)
    state.pop("stream")
    return state


# ---- the measurements ---------------------------------------------------------------------------


def throughput(url, blob, card, create, data, ref, ref_state, run: int) -> dict:
    """`consume` drains the backlog (batch 64) in this process under a new twin and durable
    consumer; its estimates read back from the stream and scored. Side by side, just before:
    Twin.assimilate alone on the same record (the ceiling), and their ratio."""
    from twin_ml.stream.live import consume

    t, u, y, init = data
    n = len(t)
    _, alone_s = reference_state(blob, card, create, t, u, y)
    tag = f"tp{run}"
    root = WORK / tag
    shutil.rmtree(root, ignore_errors=True)
    live, store = live_twin(blob, card, create, root, f"tanks-{tag}")
    subject = f"plant.tanks.estimates.{tag}"
    result = asyncio.run(
        consume(
            url, SUBJECT, live, name=f"tanks-{tag}", estimates=subject, batch=BATCH,
            max_messages=n, idle_s=WAIT, stream=STREAM,
        )
    )  # fmt: skip
    estimates = asyncio.run(read_all(url, subject, f"read-{tag}"))
    same = stored_state(store, f"tanks-{tag}") == ref_state
    store.close()
    return {
        "messages_per_s": result.delivered / result.wall_s,
        "assimilate_alone_messages_per_s": n / alone_s,
        "ratio_to_assimilate_alone": result.delivered / result.wall_s / (n / alone_s),
        "wall_s": result.wall_s,
        "delivered": result.delivered,
        "assimilated": result.assimilated,
        "batches": result.batches,
        "state_equals_in_process": same,
        "assimilated_twice": 0 if same else None,
        **counts(estimates, n),
        **stream_scores(estimates, y, ref, init),
    }


def fleet_messages(messages, k: int) -> list:
    """Fleet twin k's record: the test record with its level sensor reading 0.01 k V higher."""
    import dataclasses

    return [
        dataclasses.replace(m, values={**m.values, "h2": m.values["h2"] + 0.01 * k})
        for m in messages
    ]


async def publish_fleet(url: str, subject: str, records: list[list]) -> float:
    """The fleet's records published interleaved (sample i of every twin, then i + 1), as
    assets publishing at once do; each publish confirmed by the stream. -> seconds."""
    from twin_ml.stream.brokers import connect
    from twin_ml.stream.messages import encode

    t0 = time.perf_counter()
    async with await connect(url, stream=STREAM) as broker:
        for i in range(len(records[0])):
            for k, rec in enumerate(records):
                await broker.publish(subject.replace("*", f"t{k}"), encode(rec[i]))
    return time.perf_counter() - t0


def fleet(url, blob, card, create, data, messages, twins: int, batch: int, run: int) -> dict:
    """`consume` of a `LiveFleet` drains `twins` records published interleaved (batch
    `batch`): every twin assimilated, saved, archived and estimated as alone, a batch's
    samples of all twins assimilated together. Side by side, just before: `assimilate_many`
    alone on the same records (the ceiling), and Twin.assimilate of one twin per record (what a
    consumer per twin can at best do). Each twin's state is checked against the in-process
    twin fed its record."""
    from twin_ml.assimilate.filter import OnnxForecast
    from twin_ml.assimilate.twin import Observation, Twin, assimilate_many
    from twin_ml.stream.live import LiveFleet, consume, model_contract
    from twin_ml.stream.store import TwinStore, sqlite_url

    t, u, y, init = data
    n = len(t)
    records = [fleet_messages(messages, k) for k in range(twins)]
    ys = [y + 0.01 * k for k in range(twins)]
    forecast = OnnxForecast(blob, card)
    body = {**create, "t0": float(t[0]), "inputs": {"pump": float(u[0, 0])}}
    made = [Twin.create(card, forecast, body) for _ in range(twins)]
    t0 = time.perf_counter()
    assimilate_many(made, [Observation(t, u, yk) for yk in ys])
    together_s = time.perf_counter() - t0
    refs = [json.loads(json.dumps(tw.state())) for tw in made]
    _, one_s = reference_state(blob, card, create, t, u, y)
    tag = f"fleet{run}"
    root = WORK / tag
    shutil.rmtree(root, ignore_errors=True)
    telemetry = f"plant.{tag}.*.telemetry"  # a run's own: the stream keeps earlier runs'
    published_s = asyncio.run(publish_fleet(url, telemetry, records))
    store = TwinStore(sqlite_url(root / "twins.sqlite"))
    live = LiveFleet(
        store, card, forecast, model_contract(card), telemetry, f"tanks-{tag}-{{1}}",
        create=create, archive=root / "archive",
    )  # fmt: skip
    subject = f"plant.fleet.estimates.{tag}"
    result = asyncio.run(
        consume(
            url, telemetry, live, name=tag, estimates=subject, batch=batch,
            max_messages=n * twins, idle_s=WAIT, stream=STREAM,
        )
    )  # fmt: skip
    estimates = asyncio.run(read_all(url, subject, f"read-{tag}"))
    worst, per_twin = 0.0, []
    for k in range(twins):
        name = f"tanks-{tag}-t{k}"
        got, want = stored_state(store, name)["filter"], refs[k]["filter"]
        worst = max(worst, float(np.abs(np.subtract(got["X"], want["X"])).max()))
        per_twin.append(counts([e for e in estimates if e["twin"] == name], n))
    store.close()
    return {
        "twins": twins,
        "batch": batch,
        "messages_per_s": result.delivered / result.wall_s,
        "assimilate_many_alone_messages_per_s": n * twins / together_s,
        "one_twin_assimilate_alone_messages_per_s": n / one_s,
        "published_s": published_s,
        "wall_s": result.wall_s,
        "delivered": result.delivered,
        "assimilated": result.assimilated,
        "batches": result.batches,
        "max_abs_state_diff_from_in_process": worst,
        "lost": sum(c["lost"] for c in per_twin),
        "duplicated_estimates": sum(c["duplicated_estimates"] for c in per_twin),
    }


def ten_step(url, blob, card, create, data) -> dict:
    """The 10-step predictions through the broker: a twin created with ahead=[10] reports with
    each sample what it predicted 10 steps (40 s) before; scored against the measurements and
    compared with the same twin fed the record in process (RMSE, coverage, max |difference|)."""
    from twin_ml.assimilate.filter import Z90, OnnxForecast
    from twin_ml.assimilate.twin import Observation, Twin
    from twin_ml.stream.live import consume

    t, u, y, init = data
    n = len(t)
    body = {**create, "ahead": [10]}
    twin = Twin.create(
        card,
        OnnxForecast(blob, card),
        {**body, "t0": float(t[0]), "inputs": {"pump": float(u[0, 0])}},
    )
    want = {
        round(s["t"] / 4.0): s["ahead"]["10"]["h2"]
        for s in twin.assimilate(Observation(t, u, y))["samples"]
        if s.get("ahead")
    }
    root = WORK / "ahead"
    shutil.rmtree(root, ignore_errors=True)
    live, store = live_twin(blob, card, body, root, "tanks-ahead")
    result = asyncio.run(
        consume(
            url, SUBJECT, live, name="tanks-ahead", estimates="plant.tanks.estimates.ahead",
            batch=BATCH, max_messages=n, idle_s=WAIT, stream=STREAM,
        )
    )  # fmt: skip
    store.close()
    got = {}
    for e in asyncio.run(read_all(url, "plant.tanks.estimates.ahead", "read-ahead")):
        if e.get("ahead") and e["seq"] not in got:
            got[e["seq"]] = e["ahead"]["10"]["h2"]

    def scores(pred: dict) -> dict:
        ks = [k for k in sorted(pred) if k >= init + 9]
        e = np.array([y[k, 0] - pred[k]["mean"] for k in ks])
        sd = np.array([pred[k]["std"] for k in ks])
        return {
            "rmse_10step": float(np.sqrt(np.mean(e**2))),
            "coverage_90": float(np.mean(np.abs(e) <= Z90 * sd)),
            "points": len(ks),
        }

    common = sorted(set(got) & set(want))
    return {
        "stream": scores(got),
        "in_process": scores(want),
        "max_abs_diff_mean": max(abs(got[k]["mean"] - want[k]["mean"]) for k in common),
        "max_abs_diff_std": max(abs(got[k]["std"] - want[k]["std"]) for k in common),
        "missing": len(set(want) - set(got)),
        "messages_per_s": result.delivered / result.wall_s,
    }


def parts(url, blob, card, create, batch: int, m: int) -> dict:
    """The wall time of each part of the loop per message, `consume` (batch `batch`) draining
    the backlog's first m messages with a timed LiveTwin."""
    from twin_ml.stream.live import consume

    tag = f"parts-b{batch}"
    root = WORK / tag
    shutil.rmtree(root, ignore_errors=True)
    live, store = live_twin(blob, card, create, root, f"tanks-{tag}", timed=True)
    result = asyncio.run(
        consume(
            url, SUBJECT, live, name=f"tanks-{tag}", estimates=f"plant.tanks.estimates.{tag}",
            batch=batch, max_messages=m, idle_s=WAIT, stream=STREAM,
        )
    )  # fmt: skip
    store.close()
    p = {k: 1e3 * v / m for k, v in live.parts.items()}  # ms per message
    wall = 1e3 * result.wall_s / m
    return {
        "batch": batch,
        "messages": m,
        "batches": result.batches,
        "messages_per_s": m / result.wall_s,
        "ms_per_message": {
            "loop: fetch, decode, publish estimates, ack": wall - p["handle"] - p["save"],
            "load: store.get": p["get"],
            "load: restore the twin from JSON": p["load"] - p["get"],
            "map (to_samples), state to JSON, other": p["handle"]
            - p["load"]
            - p["assimilate"]
            - p["archive"],
            "assimilate (Twin.assimilate)": p["assimilate"],
            "archive (Parquet part)": p["archive"],
            "save (store.save)": p["save"],
            "total": wall,
        },
    }


def throughput_command(url, ref, create, n, env) -> dict:
    """The same drain by the twin-stream command in its own process (its summary's wall time:
    connect to close; the process's own start-up beside it)."""
    root = WORK / "tp-command"
    shutil.rmtree(root, ignore_errors=True)
    args = command(ref, url, SUBJECT, "tanks-tp-command", root, create, f"max_messages={n}")
    args.append("estimates=plant.tanks.estimates.tp-command")
    t0 = time.perf_counter()
    proc = spawn(args, root, env)
    finish(proc, 600)
    process_s = time.perf_counter() - t0
    summary = json.loads((root / "out" / "summary.json").read_text())
    return {
        "messages_per_s": summary["delivered"] / summary["wall_s"],
        "wall_s": summary["wall_s"],
        "process_s": process_s,
        "delivered": summary["delivered"],
        "assimilated": summary["assimilated"],
    }


async def paced(url, ref, create, messages, rate: float, env) -> tuple[dict, list[dict]]:
    """twin-stream in its own process; samples published here at `rate`/s; the estimates'
    arrival on a core NATS subscription. Latency per sample: arrival - publish."""
    import nats

    from twin_ml.stream.brokers import connect
    from twin_ml.stream.messages import encode

    tag = f"latency-{rate:g}-b{BATCH}"
    root = WORK / tag
    shutil.rmtree(root, ignore_errors=True)
    subject, est_subject = f"plant.tanks.{tag}", f"plant.tanks.estimates.{tag}"
    nc = await nats.connect(url)
    arrived: dict[int, list[float]] = {}
    estimates: list[dict] = []

    async def on(msg):
        now = time.monotonic()
        e = json.loads(msg.data)
        arrived.setdefault(e["seq"], []).append(now)
        estimates.append(e)

    await nc.subscribe(est_subject, cb=on)
    args = command(ref, url, subject, f"tanks-{tag}", root, create, f"estimates={est_subject}")
    proc = spawn([*args, "idle=5"], root, env)

    async def until(check, what):
        deadline = time.monotonic() + WAIT
        while not check():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"latency: {what} did not happen:\n{proc.log.read_text()[-3000:]}")
            await asyncio.sleep(0.005)

    sent: dict[int, float] = {}
    async with await connect(url, stream=STREAM) as pub:
        for m in messages[:2]:  # warm-up: the consumer's first batches
            sent[m.seq] = time.monotonic()
            await pub.publish(subject, encode(m), msg_id=f"{tag}:{m.seq}")
            await until(lambda m=m: m.seq in arrived, f"the estimate of warm-up sample {m.seq}")
        start = time.monotonic()
        lag = 0.0
        for j, m in enumerate(messages[2:]):
            due = start + j / rate
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                lag = max(lag, now - due)
            sent[m.seq] = time.monotonic()
            await pub.publish(subject, encode(m), msg_id=f"{tag}:{m.seq}")
        publish_s = time.monotonic() - start
        await until(lambda: len(arrived) >= len(messages), "every estimate")
    await nc.drain()
    finish(proc, WAIT)
    summary = json.loads((root / "out" / "summary.json").read_text())
    measured = [m.seq for m in messages[2:]]
    ms = np.array([1e3 * (arrived[k][0] - sent[k]) for k in measured])
    out = {
        "rate_per_s": rate,
        "achieved_rate_per_s": (len(messages) - 2) / publish_s,
        "max_publish_lag_ms": 1e3 * lag,
        "count": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "warmup_ms": [1e3 * (arrived[m.seq][0] - sent[m.seq]) for m in messages[:2]],
        "batches": summary["batches"],
        "mean_batch": summary["delivered"] / summary["batches"],
    }
    return out, estimates


def kill_restart(url, ref, create, n, env, ref_state, y, score_ref, init) -> dict:
    """twin-stream drains the backlog and is killed with SIGKILL as soon as the store's last_seq
    has moved; restarted until idle. Estimates read back; the twin against the in-process one."""
    from twin_ml.stream.store import TwinNotFound, TwinStore, sqlite_url

    root = WORK / "kill"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    twin, est_subject = "tanks-kill", "plant.tanks.estimates.kill"
    store = TwinStore(sqlite_url(root / "twins.sqlite"))
    args = command(ref, url, SUBJECT, twin, root, create, f"estimates={est_subject}", "ack_wait=2")

    def last_seq():
        try:
            return store.get(twin).last_seq
        except TwinNotFound:
            return None

    proc = spawn(args, root, env)
    deadline = time.monotonic() + WAIT
    while last_seq() is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"kill: no batch was saved:\n{proc.log.read_text()[-3000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = last_seq()
    again = spawn([*args, "idle=5"], root, env)
    finish(again, 600)
    summary = json.loads((root / "out" / "summary.json").read_text())
    estimates = asyncio.run(read_all(url, est_subject, "read-kill"))
    same = stored_state(store, twin) == ref_state
    store.close()
    return {
        "killed_at_stream_sequence": killed_at,
        "restart": {k: summary[k] for k in ("delivered", "assimilated", "duplicates", "refused")},
        "state_equals_in_process": same,
        "assimilated_twice": 0 if same else None,
        "lost_assimilations": 0 if same else None,
        **counts(estimates, n),
        **stream_scores(estimates, y, score_ref, init),
    }


def profile(url, ref, create, n, env) -> dict:
    """py-spy attached to twin-stream draining the backlog once its first batch is saved (its
    start-up left out): a flame graph, then raw stacks in a second run; the share of the
    loop's sampled (on-CPU) time each part takes, inclusive."""
    from twin_ml.stream.store import TwinNotFound, TwinStore, sqlite_url

    spy = BIN / "py-spy"
    out = {}
    for fmt in ("flamegraph", "raw"):
        root = WORK / f"profile-{fmt}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        target = FLAME if fmt == "flamegraph" else root / "stacks.txt"
        twin = f"tanks-prof-{fmt}"
        args = command(ref, url, SUBJECT, twin, root, create, f"max_messages={n}")
        args.append(f"estimates=plant.tanks.estimates.prof-{fmt}")
        store = TwinStore(sqlite_url(root / "twins.sqlite"))
        proc = spawn(args, root, env)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                store.get(twin)
                break
            except TwinNotFound:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    log_tail = proc.log.read_text()[-3000:]
                    raise SystemExit(f"profile: no batch saved:\n{log_tail}") from None
                time.sleep(0.01)
        store.close()
        r = subprocess.run(
            [str(spy), "record", "-r", "250", "--nonblocking", "--pid", str(proc.pid),
             "--format", fmt, "-o", str(target)],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        finish(proc, WAIT)
        if r.returncode != 0:
            return {"error": r.stderr[-2000:]}
        summary = json.loads((root / "out" / "summary.json").read_text())
        out[fmt] = {"messages_per_s": summary["delivered"] / summary["wall_s"]}
    stacks = []  # (set of (function, file) in the stack, samples)
    for line in (WORK / "profile-raw" / "stacks.txt").read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if not frames or not count.isdigit():
            continue
        named = set()
        for frame in frames.split(";"):
            name, _, where = frame.partition(" (")
            named.add((name, where.rsplit(":", 1)[0]))
        stacks.append((named, int(count)))

    def has(named, name, suffix):
        return any(n == name and f.endswith(suffix) for n, f in named)

    loop = [
        (named, c)
        for named, c in stacks
        if any(has(named, name, suffix) for _, name, suffix in PROFILE_PARTS)
        or has(named, "consume", "twin_ml/stream/live.py")
    ]
    total = sum(c for _, c in loop)
    shares = {
        label: sum(c for named, c in loop if has(named, name, suffix)) / total
        if total
        else float("nan")
        for label, name, suffix in PROFILE_PARTS
    }
    top = ("LiveTwin.handle", "LiveTwin.save", "decode", "JetStreamBroker.publish_all")
    top += ("ack_all", "JetStreamSubscription.next")
    inside = sum(
        c
        for named, c in loop
        if any(has(named, name, suffix) for _, name, suffix in PROFILE_PARTS if name in top)
    )
    shares["rest of consume (JSON, asyncio, threads)"] = (
        1 - inside / total if total else float("nan")
    )
    return {
        "flame_graph": str(FLAME.relative_to(ROOT)),
        "runs": out,
        "loop_samples": total,
        "samples_all": sum(c for _, c in stacks),
        "share_of_loop_cpu": shares,
    }


# ---- the table, the run -------------------------------------------------------------------------


def row(label: str, value, goal: str = "") -> str:
    text = value if isinstance(value, str) else f"{value:.6g}"
    return f"{label:<46}{text:>16}{goal:>12}"


def table(res: dict) -> str:
    tp, lat, q = res["throughput"], res["latency"], res["quality"]
    rate = int(lat["rate_per_s"])
    lines = [
        row("measure", "value", "goal"),
        row("messages/s, consume in process (median)", f"{res['messages_per_s']:.1f}", ">= 2000"),
        row("  each run", ", ".join(f"{r:.1f}" for r in tp["runs_messages_per_s"])),
        row(
            "messages/s, Twin.assimilate alone (median)",
            f"{tp['assimilate_alone_messages_per_s_median']:.1f}",
        ),
        row(
            "stream / assimilate alone, side by side",
            f"{tp['ratio_to_assimilate_alone_median']:.3f}",
        ),
    ]
    if tp.get("command"):
        lines.append(
            row("messages/s, twin-stream process", f"{tp['command']['messages_per_s']:.1f}")
        )
    for f in res.get("fleet", []):
        lines.append(
            row(
                f"messages/s, a fleet of {f['twins']} twins (batch {f['batch']})",
                f"{f['messages_per_s']:.1f}",
                ">= 2000",
            )
        )
        lines.append(
            row(
                "  assimilate_many alone | max |state diff|",
                f"{f['assimilate_many_alone_messages_per_s']:.0f} | "
                f"{f['max_abs_state_diff_from_in_process']:.2g}",
            )
        )
    lines += [
        row(f"latency p50 ms at {rate}/s", f"{lat['p50_ms']:.1f}"),
        row(f"latency p99 ms ({lat['count']} samples)", f"{lat['p99_ms']:.1f}", "<= 50"),
        row("latency max ms", f"{lat['max_ms']:.1f}"),
        row("  mean batch at that rate", f"{lat['mean_batch']:.1f}"),
        *(
            row(
                f"  at {int(r['rate_per_s'])}/s: p50 / p99 ms (mean batch)",
                f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} ({r['mean_batch']:.1f})",
            )
            for r in lat.get("slower_rates", [])
        ),
        row("one-step RMSE / open loop: stream", q["stream"]["rmse_1step_ratio"]),
        row("one-step RMSE / open loop: in process", q["in_process"]["rmse_1step_ratio"]),
        row("90% coverage: stream", q["stream"]["coverage_90"]),
        row("90% coverage: in process", q["in_process"]["coverage_90"]),
        row("10-step RMSE V: stream", q["ten_step"]["stream"]["rmse_10step"]),
        row("10-step RMSE V: in process", q["ten_step"]["in_process"]["rmse_10step"]),
        row("10-step 90% coverage: stream", q["ten_step"]["stream"]["coverage_90"]),
        row("10-step 90% coverage: in process", q["ten_step"]["in_process"]["coverage_90"]),
        row(
            "max |10-step mean, stream - in process|", q["ten_step"]["max_abs_diff_mean"], "<= 1e-6"
        ),
        row(
            "max |predicted mean, stream - in process|", q["max_abs_diff_predicted_mean"], "<= 1e-6"
        ),
        row("lost / duplicated (clean streams)", f"{res['lost']} / {res['duplicated']}", "0 / 0"),
    ]
    kr = res.get("kill_restart")
    if kr:
        lines.append(
            row(
                "SIGKILL + restart: estimates lost / twice",
                f"{kr['lost']} / {kr['duplicated_estimates']}",
            )
        )
        lines.append(
            row("SIGKILL + restart: twin = in process", str(kr["state_equals_in_process"]))
        )
    timed = tp.get("parts") or []
    if timed:
        lines.append(
            "ms per message, timed runs (batch "
            + " | ".join(f"{r['batch']}: {r['messages']} messages" for r in timed)
            + "):"
        )
        for key in timed[0]["ms_per_message"]:
            values = " | ".join(f"{r['ms_per_message'][key]:.3f}" for r in timed)
            lines.append(row(f"  {key}", values))
    prof = res.get("profile", {}).get("share_of_loop_cpu")
    if prof:
        lines.append("share of the loop's on-CPU samples (py-spy, inclusive):")
        lines += [row(f"  {k}", f"{v:.1%}") for k, v in prof.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--tanks-run", type=Path, default=ROOT / "runs" / "tanks-real")
    ap.add_argument("--quick", action="store_true", help="one run; no command run, no profile")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument(
        "--fleet", type=int, nargs="*", default=[4, 8, 16, 32],
        help="fleet sizes (twins on one consumer, batch 64 per twin; --quick: 16)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.quick and args.fleet == ap.get_default("fleet"):
        args.fleet = [16]
    runs = 1 if args.quick else args.runs
    os.environ["BENTOML_HOME"] = str(WORK / "store")  # before the registry imports bentoml
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    env = dict(os.environ)

    from assimilation import arrays
    from brokers import running, start_nats

    from twin_ml import registry
    from twin_ml.data.real import records
    from twin_ml.stream.replay import load_messages, replay_to

    ref = stored_model(args.tanks_run)
    blob, card = registry.onnx_bytes(ref)
    frames = records("cascaded_tanks", REAL / "cascaded_tanks" / "dataBenchmark.csv")
    t, u, y = arrays(frames["test"], ("pump", "h2"))
    messages = load_messages("cascaded_tanks:test", data_dir=REAL)
    n = len(messages)
    assert n == len(t) == 1024
    create, fargs = settings(card, float(y[0, 0]))
    data = (t, u, y, fargs["init"])
    log("in-process filter (score_record) ...")
    score_ref = in_process(blob, card, t, u, y, fargs)
    ref_state, _ = reference_state(blob, card, create, t, u, y)

    shutil.rmtree(WORK / "nats", ignore_errors=True)
    with running(start_nats(WORK / "nats")) as server:
        url = server.url
        backlog = asyncio.run(
            replay_to(url, SUBJECT, messages, speed=0, stream=STREAM, progress=False)
        )
        log(f"backlog: {backlog.messages} messages in {backlog.wall_s:.2f} s")
        tp_runs = []
        for i in range(runs):
            tp_runs.append(throughput(url, blob, card, create, data, score_ref, ref_state, i))
            log(f"throughput run {i}: {tp_runs[-1]['messages_per_s']:.1f} messages/s")
        fleets = []
        for i, twins in enumerate(args.fleet):
            fleets.append(
                fleet(url, blob, card, create, data, messages, twins, BATCH * twins, i)
            )  # fmt: skip
            log(f"fleet of {twins}: {fleets[-1]['messages_per_s']:.1f} messages/s")
        timed = [parts(url, blob, card, create, BATCH, n), parts(url, blob, card, create, 1, 200)]
        rates = ", ".join(f"{r['messages_per_s']:.1f}" for r in timed)
        log(f"timed runs (batch 64, 1): {rates} messages/s")
        cmd = None if args.quick else throughput_command(url, ref, create, n, env)
        lat, lat_estimates = asyncio.run(paced(url, ref, create, messages, args.rate, env))
        log(f"latency at {args.rate:g}/s: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms")
        slower = []
        for rate in [] if args.quick else [r for r in (100.0, 50.0) if r < args.rate]:
            slower.append(asyncio.run(paced(url, ref, create, messages, rate, env))[0])
            log(f"latency at {rate:g}/s: p99 {slower[-1]['p99_ms']:.1f} ms")
        kr = kill_restart(
            url, ref, create, n, env, ref_state, y, score_ref, fargs["init"]
        )  # fmt: skip
        prof = {} if args.quick or args.no_profile else profile(url, ref, create, n, env)
        ahead = ten_step(url, blob, card, create, data)
        log(
            f"10-step through the stream: RMSE {ahead['stream']['rmse_10step']:.4g} V, coverage "
            f"{ahead['stream']['coverage_90']:.3f}, max |diff| {ahead['max_abs_diff_mean']:.2g}"
        )

    first = tp_runs[0]
    lat_counts = counts(lat_estimates, n)
    lat_scores = stream_scores(lat_estimates, y, score_ref, fargs["init"])
    diffs = [r["max_abs_diff_predicted_mean"] for r in tp_runs]
    diffs.append(lat_scores["max_abs_diff_predicted_mean"])
    quality = {
        "stream": {k: first[k] for k in ("rmse_1step", "rmse_1step_ratio", "coverage_90")},
        "in_process": {
            k: score_ref[k]
            for k in ("rmse_1step", "open_loop_rmse", "rmse_1step_ratio", "coverage_90")
        },
        "max_abs_diff_predicted_mean": max(diffs),
        "max_abs_diff_predicted_std": max(r["max_abs_diff_predicted_std"] for r in tp_runs),
        "latency_run": lat_scores,
        "ten_step": ahead,
    }
    clean = [*tp_runs, lat_counts]
    twice = [r.get("assimilated_twice") for r in tp_runs]
    res = {
        "messages_per_s": statistics.median(r["messages_per_s"] for r in tp_runs),
        "latency_p99_ms": lat["p99_ms"],
        "rmse_1step_ratio": first["rmse_1step_ratio"],
        "coverage_90": first["coverage_90"],
        "lost": max(r["lost"] for r in [*clean, *fleets]),
        "duplicated": max(r["duplicated_estimates"] for r in [*clean, *fleets])
        + (0 if all(v == 0 for v in twice) else 1),
        "goals": GOALS,
        "met": {},
        "setup": {
            "record": "cascaded_tanks:test",
            "samples": n,
            "model": ref,
            "members_networks": card.members,
            "filter_members": fargs["members"],
            "noise_V": float(fargs["noise"][0]),
            "process_per_state": PROCESS,
            "batch": BATCH,
            "store": "SQLite file (WAL, synchronous FULL)",
            "broker": "nats-server (JetStream, file storage) on 127.0.0.1",
            "cpus": os.cpu_count(),
            "score_record_s": score_ref["seconds"],  # the filter and its open loop
        },
        "throughput": {
            "runs_messages_per_s": [r["messages_per_s"] for r in tp_runs],
            "ratio_to_assimilate_alone_median": statistics.median(
                r["ratio_to_assimilate_alone"] for r in tp_runs
            ),
            "runs": tp_runs,
            "parts": timed,
            "command": cmd,
            "assimilate_alone_messages_per_s_median": statistics.median(
                r["assimilate_alone_messages_per_s"] for r in tp_runs
            ),
        },
        "fleet": fleets,
        "fleet_messages_per_s": {str(f["twins"]): f["messages_per_s"] for f in fleets},
        "latency": {**lat, **lat_counts, "slower_rates": slower},
        "quality": quality,
        "kill_restart": kr,
        "profile": prof,
    }
    res["met"] = {
        "messages_per_s": res["messages_per_s"] >= GOALS["messages_per_s"],
        "latency_p99_ms": res["latency_p99_ms"] <= GOALS["latency_p99_ms"],
        "agreement": quality["max_abs_diff_predicted_mean"] <= GOALS["agreement"]
        and abs(first["rmse_1step_ratio"] - score_ref["rmse_1step_ratio"]) <= GOALS["agreement"]
        and abs(first["coverage_90"] - score_ref["coverage_90"]) <= GOALS["agreement"],
        "nothing_lost_or_twice": res["lost"] == 0 and res["duplicated"] == 0,
    }
    from twin_ml._io import atomic_write_bytes

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, (json.dumps(res, indent=2) + "\n").encode())
    print(table(res))
    print(args.out)


if __name__ == "__main__":
    main()
