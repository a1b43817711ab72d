"""Server soak: a real twin-serve on 127.0.0.1 under a bounded, seeded loop of mixed requests.

    python benchmarks/soak.py [--seconds 120] [--concurrency 16] [--out FILE]
                              [--model NAME:REF (with BENTOML_HOME, or --bentoml-home DIR)]

Without --model it serves the serving benchmark's pendulum neural ODE (benchmarks/serving.py
`prepare_model`: trained 2 epochs and exported in about a minute, then reused from
runs/bench-serving/store). The server runs with a small body limit (--max-body, 64 KiB) and a
small scenario limit (--max-scenarios, 16), so the over-limit requests cost little.

The loop: --concurrency workers, each on its own keep-alive connection (benchmarks/serving.py's
raw asyncio client), take requests in one seeded order until the deadline. Every kind comes once
first (so a short run sends them all), then kinds drawn by weight:
  valid        /simulate with one scenario, and with a list of scenarios of different horizons
  invalid      unknown parameter name, wrong input length, a string for a number, t_end not a
               multiple of dt, a missing field, malformed JSON, /calibrate fitting an unknown name
  over-limit   more steps than the model's maximum, more scenarios than the server's limit, a
               body over the server's byte limit
  other        /calibrate (one start, no corrections) and GET /model
Each invalid or over-limit request knows the field it broke; a 4xx whose body does not name it is
counted in `status_4xx_unnamed` (a 4xx to a valid request too). A warm-up of the same loop runs
first (--warmup seconds); the server's resident memory, summed over its whole process tree
(BentoML runs its workers as child processes), is taken after the warm-up and at the end.

Bounds: zero 5xx, every 4xx names its field, and rss_growth = (end - after warm-up) / after
warm-up <= 0.10. Writes JSON (default benchmarks/results/soak.json; `requests`, `status_5xx`,
`rss_growth`, ...), prints a table and a verdict naming the bounds that failed; exits 1 when one
failed, 0 when all held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# run as a script, this folder is on the path first, and its serving.py would shadow the
# `serving` package: take it off, and reach the serving benchmark as benchmarks.serving
sys.path[:] = [str(ROOT)] + [
    p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")
]

from benchmarks.serving import (  # noqa: E402  (after the path fix above)
    WORK,
    _free_port,
    _request,
    make_bodies,
    prepare_model,
    start_server,
    stop,
)

OUT = ROOT / "benchmarks" / "results" / "soak.json"
RSS_BOUND = 0.10  # the bound on memory growth after warm-up
REQUEST_TIMEOUT_S = 120.0  # the server's own timeout: a request that hangs past it is an error
UNKNOWN = "no_such_parameter"  # the name the invalid requests use: unique in any answer


@dataclass(frozen=True)
class Sample:
    """One prepared request: what it is, the bytes on the wire, and what the answer must say."""

    kind: str
    wire: bytes
    expect: int  # the status a correct server answers
    field: str | None  # what a 4xx must name (None: a valid request, no 4xx expected)


# kind -> weight in the mix after the first pass; calibrations hold the server's one calibration
# thread for a fraction of a second each, so they stay rare
WEIGHTS = {
    "simulate_one": 40,
    "simulate_list": 15,
    "model": 3,
    "calibrate": 1,
    "bad_unknown_parameter": 4,
    "bad_input_length": 4,
    "bad_not_a_number": 4,
    "bad_t_end": 4,
    "bad_missing_field": 4,
    "bad_json": 4,
    "bad_calibrate_fit": 1,
    "over_steps": 3,
    "over_scenarios": 3,
    "over_body": 3,
}


def _wire(method: str, path: str, body: bytes | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body is None:
        return (head + "\r\n").encode()
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _trim(sc: dict, steps: int, dt: float) -> dict:
    """A scenario cut to `steps` steps (make_bodies' inputs are constant: any prefix is valid)."""
    return {
        **sc,
        "t_end": round(steps * dt, 9),
        "inputs": {k: v[: steps + 1] for k, v in sc["inputs"].items()},
    }


def build_samples(card, *, max_scenarios: int, max_body: int, seed: int) -> dict[str, list[Sample]]:
    """Every kind's prepared requests (several variants of the valid ones) for this model."""
    from twin_ml.calibrate.synthetic import synthetic_request

    dt, max_steps, fixed = card.time.dt, card.time.max_steps, card.time.fixed_steps
    steps = max_steps if fixed else min(100, max_steps)
    valid = [_trim(json.loads(b), steps, dt) for b in make_bodies(card, 16, seed)]
    params, inputs = card.system.parameter_names, card.system.input_names

    def sim(body) -> bytes:
        return _wire("POST", "/simulate", json.dumps({"scenarios": body}).encode())

    def broken(kind: str, field: str, change, status: int = 400) -> Sample:
        sc = json.loads(json.dumps(valid[0]))
        change(sc)
        return Sample(kind, sim(sc), status, field)

    out: dict[str, list[Sample]] = {
        "simulate_one": [Sample("simulate_one", sim(sc), 200, None) for sc in valid]
    }
    lists = []
    for i in range(8):  # 2..4 scenarios; horizons differ unless the model answers one grid only
        n = 2 + i % 3
        scs = [
            valid[(i + k) % len(valid)]
            if fixed
            else _trim(valid[(i + k) % len(valid)], max(1, steps // (k + 1)), dt)
            for k in range(n)
        ]
        lists.append(Sample("simulate_list", sim(scs), 200, None))
    out["simulate_list"] = lists
    out["model"] = [Sample("model", _wire("GET", "/model"), 200, None)]
    out["bad_unknown_parameter"] = [
        broken("bad_unknown_parameter", UNKNOWN, lambda s: s["parameters"].update({UNKNOWN: 1.0}))
    ]
    out["bad_not_a_number"] = [
        broken("bad_not_a_number", params[0], lambda s: s["parameters"].update({params[0]: "big"}))
    ]
    out["bad_t_end"] = [broken("bad_t_end", "t_end", lambda s: s.update(t_end=s["t_end"] - dt / 2))]
    out["bad_missing_field"] = [
        broken("bad_missing_field", "parameters", lambda s: s.pop("parameters"))
    ]
    if inputs:  # a model without inputs has no input length to get wrong
        out["bad_input_length"] = [
            broken(
                "bad_input_length",
                f"inputs.{inputs[0]}",
                lambda s: s["inputs"].update({inputs[0]: s["inputs"][inputs[0]][:2]}),
            )
        ]
    # a JSON document cut short: the answer names the body's JSON and where it broke
    cut = json.dumps({"scenarios": valid[0]}).encode()[:40]
    out["bad_json"] = [Sample("bad_json", _wire("POST", "/simulate", cut), 400, "Invalid JSON")]
    if not fixed:  # an emulator refuses any other horizon than its own: the same error, other words
        over = {
            **valid[0],
            "t_end": round((max_steps + 1) * dt, 9),
            "inputs": {k: v[:1] * (max_steps + 2) for k, v in valid[0]["inputs"].items()},
        }
        out["over_steps"] = [Sample("over_steps", sim(over), 400, "t_end")]
    short = _trim(valid[0], 1, dt) if not fixed else valid[0]
    many = sim([short] * (max_scenarios + 1))
    if len(many) > max_body:
        raise SystemExit(
            f"--max-body {max_body}: too small for {max_scenarios + 1} scenarios of this "
            f"model ({len(many)} bytes); raise it or lower --max-scenarios"
        )
    out["over_scenarios"] = [Sample("over_scenarios", many, 400, "scenarios")]
    # a valid request padded with whitespace past the byte limit: only the size is wrong
    body = json.dumps({"scenarios": valid[0]}).encode()
    out["over_body"] = [
        Sample(
            "over_body",
            _wire("POST", "/simulate", body + b" " * (max_body + 1 - len(body))),
            413,
            "body",
        )
    ]
    request, _ = synthetic_request(card, params[:2], seed=seed)
    fit = json.dumps({**request, "starts": 1, "corrections": 0}).encode()
    out["calibrate"] = [Sample("calibrate", _wire("POST", "/calibrate", fit), 200, None)]
    bad_fit = json.dumps({**request, "fit": [UNKNOWN]}).encode()
    out["bad_calibrate_fit"] = [
        Sample("bad_calibrate_fit", _wire("POST", "/calibrate", bad_fit), 400, UNKNOWN)
    ]
    return out


def schedule(samples: dict[str, list[Sample]], seed: int, length: int = 4096) -> list[Sample]:
    """The seeded order: every kind once (shuffled), then `length` draws by weight; the loop
    cycles through it."""
    rng = np.random.default_rng(seed)
    kinds = [k for k in WEIGHTS if k in samples]
    first = [kinds[i] for i in rng.permutation(len(kinds))]
    w = np.array([WEIGHTS[k] for k in kinds], dtype=float)
    drawn = rng.choice(len(kinds), size=length, p=w / w.sum())
    order = first + [kinds[i] for i in drawn]
    seen: dict[str, int] = {}
    out = []
    for k in order:  # variants of a kind in turn
        out.append(samples[k][seen.get(k, 0) % len(samples[k])])
        seen[k] = seen.get(k, 0) + 1
    return out


def process_tree(pid: int) -> dict[int, int]:
    """Resident memory (bytes) of a process and of each of its descendants (the server's
    workers), by pid."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for p in procs:
        try:
            out[p.pid] = p.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that went away between listing and reading
            pass
    return out


class Tally:
    """What the loop saw, per kind: statuses, latencies, unnamed 4xx, unexpected statuses."""

    def __init__(self) -> None:
        self.kinds: dict[str, dict] = {}
        self.errors: dict[str, int] = {}
        self.examples: list[dict] = []  # the first few answers that broke a bound, to read

    def record(self, s: Sample, status: int, payload: bytes, seconds: float) -> None:
        k = self.kinds.setdefault(s.kind, {"statuses": {}, "ms": [], "unnamed": 0, "unexpected": 0})
        k["statuses"][status] = k["statuses"].get(status, 0) + 1
        k["ms"].append(seconds * 1e3)
        bad = None
        if 400 <= status < 500 and (s.field is None or s.field.encode() not in payload):
            k["unnamed"] += 1
            bad = "4xx not naming its field"
        if status != s.expect:
            k["unexpected"] += 1
            bad = bad or f"expected {s.expect}"
        if status >= 500:
            bad = "5xx"
        if bad and len(self.examples) < 10:
            self.examples.append(
                {
                    "kind": s.kind,
                    "status": status,
                    "why": bad,
                    "field": s.field,
                    "body": payload[:300].decode("utf-8", "replace"),
                }
            )

    def error(self, s: Sample, e: BaseException) -> None:
        key = f"{s.kind}: {type(e).__name__}"
        self.errors[key] = self.errors.get(key, 0) + 1


async def run_loop(
    port: int,
    order: list[Sample],
    seconds: float,
    concurrency: int,
    start: int = 0,
) -> tuple[Tally, int]:
    """`concurrency` keep-alive workers send `order` (cyclically, from index `start`) until
    `seconds` have passed; a request already sent is always read to its end. Returns the tally
    and the next index."""
    tally = Tally()
    deadline = time.perf_counter() + seconds
    next_i = start

    async def worker() -> None:
        nonlocal next_i
        reader = writer = None
        while time.perf_counter() < deadline:
            s = order[next_i % len(order)]
            next_i += 1
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                # _request writes the head it is given, then the body: the wire holds both
                status, payload = await asyncio.wait_for(
                    _request(reader, writer, s.wire, b""), REQUEST_TIMEOUT_S
                )
            except (
                TimeoutError,
                OSError,
                ConnectionError,
                asyncio.IncompleteReadError,
                ValueError,
                IndexError,
            ) as e:
                tally.error(s, e)
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            tally.record(s, status, payload, time.perf_counter() - t0)
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally, next_i


async def soak(
    port: int, pid: int, order: list[Sample], *, seconds: float, warmup: float, concurrency: int
) -> dict:
    """Warm-up, then the soak proper, sampling the server's RSS once a second throughout."""
    samples: list[tuple[float, float]] = []
    t_start = time.perf_counter()
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            rss = sum((await asyncio.to_thread(process_tree, pid)).values())
            samples.append((round(time.perf_counter() - t_start, 2), round(rss / 2**20, 1)))
            try:
                await asyncio.wait_for(done.wait(), 1.0)
            except TimeoutError:
                pass

    first = await asyncio.to_thread(process_tree, pid)
    watcher = asyncio.create_task(sampler())
    warm, i = await run_loop(port, order, warmup, concurrency)
    warm_tree = await asyncio.to_thread(process_tree, pid)
    rss_warm = sum(warm_tree.values())
    t0 = time.perf_counter()
    tally, _ = await run_loop(port, order, seconds, concurrency, start=i)
    wall = time.perf_counter() - t0
    last = await asyncio.to_thread(process_tree, pid)
    rss_end = sum(last.values())
    done.set()
    await watcher
    return {
        "warm": warm,
        "tally": tally,
        "wall_s": wall,
        "rss_after_warmup": rss_warm,
        "rss_end": rss_end,
        "rss_samples": samples,
        # a worker that died (and was started again by BentoML) shows as a pid that changed
        "processes_replaced": len(set(first) - set(last)),
        # which process grew: pid -> [MB after warm-up, MB at the end]
        "rss_by_process_mb": {
            str(p): [round(warm_tree.get(p, 0) / 2**20, 1), round(last.get(p, 0) / 2**20, 1)]
            for p in sorted({*warm_tree, *last})
        },
    }


def _pct(ms: list[float], q: float) -> float | None:
    return round(float(np.percentile(ms, q)), 2) if ms else None


def summarize(run: dict, args, model: str, settings: dict, planned: list[str]) -> dict:
    warm, tally = run["warm"], run["tally"]
    statuses: dict[str, int] = {}
    per_kind = {}
    for both in (warm.kinds, tally.kinds):
        for k in both.values():
            for code, n in k["statuses"].items():
                statuses[str(code)] = statuses.get(str(code), 0) + n
    for name in WEIGHTS:
        k, w = tally.kinds.get(name), warm.kinds.get(name)
        if k is None and w is None:
            continue
        k = k or {"statuses": {}, "ms": [], "unnamed": 0, "unexpected": 0}
        w = w or {"statuses": {}, "ms": [], "unnamed": 0, "unexpected": 0}
        merged = {
            str(c): k["statuses"].get(c, 0) + w["statuses"].get(c, 0)
            for c in sorted({*k["statuses"], *w["statuses"]})
        }
        per_kind[name] = {
            "sent": sum(merged.values()),
            "statuses": merged,
            "p50_ms": _pct(k["ms"], 50),
            "p99_ms": _pct(k["ms"], 99),
            "status_4xx_unnamed": k["unnamed"] + w["unnamed"],
            "status_unexpected": k["unexpected"] + w["unexpected"],
        }
    errors: dict[str, int] = {}
    for t in (warm, tally):
        for key, n in t.errors.items():
            errors[key] = errors.get(key, 0) + n
    requests = sum(statuses.values())
    s5 = sum(n for code, n in statuses.items() if int(code) >= 500)
    s4 = sum(n for code, n in statuses.items() if 400 <= int(code) < 500)
    unnamed = sum(k["status_4xx_unnamed"] for k in per_kind.values())
    rss_w, rss_e = run["rss_after_warmup"] / 2**20, run["rss_end"] / 2**20
    growth = (rss_e - rss_w) / rss_w if rss_w else None
    bounds = {
        "zero_5xx": s5 == 0,
        "all_4xx_named": unnamed == 0,
        "rss_growth_within_10pct": growth is not None and growth <= RSS_BOUND,
    }
    failed = [name for name, ok in bounds.items() if not ok]
    soak_requests = sum(sum(k["statuses"].values()) for k in tally.kinds.values())
    return {
        "model": model,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "server": settings,
        # every answered request, warm-up included (the bounds on statuses hold for all of them)
        "requests": requests,
        "requests_after_warmup": soak_requests,
        "requests_per_s": round(soak_requests / run["wall_s"], 1),
        "statuses": dict(sorted(statuses.items())),
        "status_5xx": s5,
        "status_4xx": s4,
        "status_4xx_unnamed": unnamed,
        "status_unexpected": sum(k["status_unexpected"] for k in per_kind.values()),
        "connection_errors": sum(errors.values()),
        "connection_error_kinds": errors,
        # every kind of the mix, and those this model allows (no inputs: no input length to break)
        "kinds_all": list(WEIGHTS),
        "kinds_planned": planned,
        "kinds": per_kind,
        "rss_after_warmup_mb": round(rss_w, 1),
        "rss_end_mb": round(rss_e, 1),
        "rss_max_mb": max((mb for _, mb in run["rss_samples"]), default=None),
        "rss_growth": None if growth is None else round(growth, 4),
        "rss_samples_mb": run["rss_samples"],
        "bounds": bounds,
        "failed": failed,
        "examples": tally.examples or warm.examples,
    }


def verdict(r: dict) -> str:
    if not r["failed"]:
        return (
            f"PASS: zero 5xx, every 4xx names its field, rss_growth {r['rss_growth']:+.3f} "
            f"<= {RSS_BOUND:.2f}"
        )
    why = {
        "zero_5xx": f"{r['status_5xx']} 5xx (bound: zero)",
        "all_4xx_named": f"{r['status_4xx_unnamed']} 4xx not naming their field (bound: zero)",
        "rss_growth_within_10pct": f"rss_growth {r['rss_growth']} > {RSS_BOUND:.2f}",
    }
    return "FAIL: " + "; ".join(why[b] for b in r["failed"])


def print_table(r: dict) -> None:
    print(
        f"\nsoak of {r['model']}: {r['seconds']:g} s after a {r['warmup_s']:g} s warm-up, "
        f"concurrency {r['concurrency']}, {r['machine']}; server {r['server']}"
    )
    print("| kind | sent | statuses | p50 ms | p99 ms | 4xx unnamed | unexpected |")
    print("|---|---|---|---|---|---|---|")
    for name, k in r["kinds"].items():
        print(
            f"| {name} | {k['sent']} | {k['statuses']} | {k['p50_ms']} | {k['p99_ms']} | "
            f"{k['status_4xx_unnamed']} | {k['status_unexpected']} |"
        )
    print(
        f"requests {r['requests']} ({r['requests_per_s']}/s after warm-up); "
        f"statuses {r['statuses']}; 5xx {r['status_5xx']}; 4xx {r['status_4xx']} "
        f"({r['status_4xx_unnamed']} unnamed); connection errors {r['connection_errors']}"
    )
    print(
        f"server RSS (process tree): {r['rss_after_warmup_mb']} MB after warm-up, "
        f"{r['rss_end_mb']} MB at the end (max {r['rss_max_mb']} MB): growth {r['rss_growth']}"
    )
    print(
        "server processes replaced during the run (a worker died): "
        f"{r['server_processes_replaced']}"
    )
    print(f"verdict: {verdict(r)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=120.0, help="soak length after the warm-up")
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up seconds before the memory baseline (default: a quarter of --seconds, "
        "2 to 15 s)",
    )
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--model",
        default=None,
        help="NAME:REF in the store (BENTOML_HOME or --bentoml-home); "
        "default: the serving benchmark's pendulum neural ODE",
    )
    ap.add_argument("--bentoml-home", default=None)
    ap.add_argument(
        "--max-body", type=int, default=64 << 10, help="the server's body limit in bytes"
    )
    ap.add_argument(
        "--max-scenarios", type=int, default=16, help="the server's scenarios per request"
    )
    ap.add_argument("--workers", type=int, default=1, help="server processes (twin-serve workers=)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--kinds",
        default=None,
        help="only these kinds, comma-separated (to find which one a failure comes from); "
        f"default: all of {', '.join(WEIGHTS)}",
    )
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1:
        ap.error("--seconds must be > 0 and --concurrency >= 1")
    if args.warmup is None:
        args.warmup = min(15.0, max(2.0, args.seconds / 4))

    home = args.bentoml_home or (os.environ.get("BENTOML_HOME") if args.model else None)
    home = home or str(WORK / "store")
    env = {
        **os.environ,
        "BENTOML_HOME": home,
        "BENTOML_DO_NOT_TRACK": "True",
        "TWIN_ML_MAX_BODY_BYTES": str(args.max_body),
    }
    os.environ["BENTOML_HOME"] = home  # before the registry imports bentoml
    if args.model:
        model = args.model
    else:
        WORK.mkdir(parents=True, exist_ok=True)
        model = prepare_model(env, "node")
    from twin_ml import registry

    try:
        card = registry.verify(model)
    except registry.RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    samples = build_samples(
        card, max_scenarios=args.max_scenarios, max_body=args.max_body, seed=args.seed
    )
    if args.kinds:
        unknown = sorted(set(args.kinds.split(",")) - set(samples))
        if unknown:
            ap.error(f"--kinds: unknown {unknown}; this model's kinds: {', '.join(samples)}")
        samples = {k: v for k, v in samples.items() if k in args.kinds.split(",")}
    order = schedule(samples, args.seed)
    settings = {
        "workers": str(args.workers),
        "max_scenarios": str(args.max_scenarios),
        "access_log": "false",
    }
    port = _free_port()
    out = Path(args.out)
    # the server's log beside an --out of one's own; the default's under runs/ (not committed)
    log = (
        WORK.parent / "bench-soak" / "server.log"
        if out == OUT
        else out.with_name(f"{out.stem}-server.log")
    )
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = start_server(model, env, port, log, **settings)
    try:
        run = asyncio.run(
            soak(
                port,
                proc.pid,
                order,
                seconds=args.seconds,
                warmup=args.warmup,
                concurrency=args.concurrency,
            )
        )
        alive = proc.poll() is None
    finally:
        stop(proc)
    r = summarize(
        run,
        args,
        model,
        {**settings, "max_body_bytes": args.max_body},
        [k for k in WEIGHTS if k in samples],
    )
    r["server_alive_at_end"] = alive
    r["server_processes_replaced"] = run["processes_replaced"]
    r["rss_by_process_mb"] = run["rss_by_process_mb"]
    from twin_ml._io import atomic_write_json

    atomic_write_json(args.out, r)
    print_table(r)
    print(f"wrote {args.out}")
    return 1 if r["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
