"""Serving benchmark: the real server (twin-serve: BentoML + onnxruntime) against the HTTP floor
and a hello-world BentoML service, with the load client in its own process, everything in one run.

    python benchmarks/serving.py [--kinds node,flowmap,emulator | --model NAME:REF
                                  --bentoml-home DIR] [--requests 2000] [--quick] [--no-settings]

Without --model it trains and exports three pendulum models on 100-step scenarios, M=5 members,
the default networks, 2 epochs (latency does not depend on accuracy), into a store under
runs/bench-serving/: the neural ODE (an RK4 rollout: an ONNX Loop of 100 steps, 4 network
evaluations each), the plain flow map (the same Loop, one network evaluation per step) and the
one-shot emulator (one network pass for the whole trajectory). Every request carries one
in-domain scenario of 100 steps, drawn from 64 pre-built bodies.

The server runs with workers=2 (one per core) and its access log off (--workers, --access-log),
every other setting twin-serve's default (hot_path=true, metrics=true, tracing=false).

Phases (each a fresh client process; the server keeps running between phases of one config):
  hello     BentoML's own floor: benchmarks/hello_service.py (one float in, the same out, the same
            workers, access log off) at concurrency 1 and 32, once per run;
  floor     a minimal asyncio HTTP/1.1 server returning a fixed body of the size of a real answer,
            at concurrency 1: the cost of HTTP + this client alone;
  c1        the served model at concurrency 1, with adaptive batching off and on;
  c32       10,000 requests at concurrency 32 with batching on: throughput, p50/p99, errors;
  overload  4x the configured max concurrency: the status codes seen (only 200 and 429 allowed),
            then the time until /readyz answers and a valid request succeeds again;
  settings  (--settings, on the --settings-kinds models, the emulator by default) c=1 with one
            setting flipped from the default at a time: hot_path=false, metrics=false,
            tracing=true, access_log=true; the p50 change is that setting's cost.

The client is a raw asyncio HTTP/1.1 keep-alive client (one connection per concurrent worker), so
that the client's own cost stays small next to the server's on a 2-core machine; the floor and the
hello-world service use the same client. Writes benchmarks/results/serving.json (per model its
phases, a summary and which of the serving issue's goals it meets) and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# this file is benchmarks/serving.py: keep its folder off the path so `serving` is the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
BIN = Path(sys.executable).parent
OUT = ROOT / "benchmarks" / "results" / "serving.json"
WORK = ROOT / "runs" / "bench-serving"
STEPS = 100


# ---- the load client (runs in its own process: `serving.py client ...`) -----------------------
async def _request(reader, writer, head: bytes, body: bytes) -> tuple[int, bytes]:
    writer.write(head + body)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split()[1])
    length, close = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        key, _, value = line.decode("latin-1").partition(":")
        key = key.strip().lower()
        if key == "content-length":
            length = int(value.strip())
        elif key == "connection" and value.strip().lower() == "close":
            close = True
    payload = await reader.readexactly(length) if length else b""
    if close:
        raise ConnectionResetError("server asked to close")
    return status, payload


async def _load(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    n: int,
    concurrency: int,
    token: str | None,
) -> dict:
    heads = []
    for b in bodies:
        h = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(b)}\r\n"
        )
        if token:
            h += f"Authorization: Bearer {token}\r\n"
        heads.append((h + "\r\n").encode())
    lat, statuses, errors = [], {}, []
    counter = iter(range(n))

    async def worker():
        reader = writer = None
        for i in counter:
            k = i % len(bodies)
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                status, _ = await _request(reader, writer, heads[k], bodies[k])
            except (
                OSError,
                ConnectionError,
                asyncio.IncompleteReadError,
                ValueError,
                IndexError,
            ) as e:
                errors.append(type(e).__name__)
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            lat.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
        if writer is not None:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000 if lat else np.array([np.nan])
    ok = statuses.get(200, 0)
    return {
        "requests": n,
        "concurrency": concurrency,
        "wall_s": wall,
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "connection_errors": len(errors),
        "throughput_per_s": ok / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def client_main(args) -> int:
    bodies = [b.encode() for b in json.loads(Path(args.bodies).read_text())]
    if args.warmup:
        asyncio.run(
            _load(
                args.host,
                args.port,
                args.path,
                bodies,
                args.warmup,
                min(args.concurrency, 4),
                args.token,
            )
        )
    out = asyncio.run(
        _load(args.host, args.port, args.path, bodies, args.n, args.concurrency, args.token)
    )
    print(json.dumps(out))
    return 0


# ---- the HTTP floor (its own process: `serving.py floor PORT BODYFILE`) ------------------------
def floor_main(args) -> int:
    body = Path(args.body).read_bytes()
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )

    async def handle(reader, writer):
        try:
            while True:
                length = 0
                line = await reader.readline()
                if not line:
                    break
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                writer.write(response)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", args.port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())
    return 0


# ---- orchestration ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args, env=None) -> None:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")


# kind -> the experiment and its overrides: the flow map is the plain one (one network evaluation
# per interval), the experiment's own is a hybrid that also steps the physics by RK4; the
# emulator is the MLP (one small network pass: what measures the service's own overhead), not
# the experiment's causal convolution network (~35x the MLP's compute per query)
KINDS = {
    "node": ("pendulum_node", []),
    "flowmap": ("pendulum_flowmap", ["model=flowmap"]),
    "emulator": ("pendulum_emulator", ["model.net.arch=mlp"]),
}
ROLLOUT_GOAL = {"node": 5.0, "flowmap": 5.0}  # c=1 p50 ms of a 100-step rollout


def prepare_model(env: dict, kind: str) -> str:
    """A pendulum model (M=5, the default network) trained 2 epochs on 100-step scenarios, in a
    store under runs/bench-serving (reused when present and intact)."""
    from twin_ml import registry

    ref = f"bench_pendulum_{kind}:v1"
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    try:
        registry.verify(ref)
        return ref
    except registry.RegistryError:
        pass
    data, run = WORK / "data", WORK / f"run-{kind}"
    if not (data / "manifest.json").exists():
        sh(
            BIN / "twin-generate",
            "system=pendulum",
            "n_scenarios=32",
            "seed=0",
            f"out_dir={data}",
            "workers=0",
            f"design.t_end={STEPS * 0.05:g}",
            "design.dt=0.05",
            "progress=false",
            "overwrite=true",
            env=env,
        )
    experiment, overrides = KINDS[kind]
    sh(
        BIN / "twin-train",
        f"experiment={experiment}",
        *overrides,
        f"data_dir={data}",
        f"out_dir={run}",
        "ensemble.size=5",
        "trainer.max_epochs=2",
        "speed_scenarios=2",
        "logger=none",
        env=env,
    )
    sh(
        BIN / "twin-export",
        f"run_dir={run}",
        f"name=bench_pendulum_{kind}",
        "version=v1",
        "parity_scenarios=8",
        env=env,
    )
    return ref


def make_bodies(card, n: int, seed: int) -> list[str]:
    from serving.schemas import example_scenario

    rng = np.random.default_rng(seed)
    box = card.domain
    bodies = []
    for _ in range(n):
        sc = example_scenario(card, STEPS)
        for name in sc["parameters"]:
            lo, hi = box.parameters[name]
            sc["parameters"][name] = float(rng.uniform(lo, hi))
        for name in sc["initial_state"]:
            lo, hi = box.states.get(name, (0.0, 0.0))
            sc["initial_state"][name] = float(rng.uniform(lo, hi))
        for name, series in sc["inputs"].items():
            lo, hi = box.input_range(name) or (0.0, 0.0)
            sc["inputs"][name] = [float(rng.uniform(lo, hi))] * len(series)
        bodies.append(json.dumps(sc))
    return bodies


def wait_ready(url: str, seconds: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            if urllib.request.urlopen(f"{url}/readyz", timeout=1).status == 200:
                return time.perf_counter() - t0
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"no server ready at {url} after {seconds} s")


SERVER_SETTINGS: dict[str, str] = {}  # from the command line: workers, access_log


def start_server(model: str, env: dict, port: int, log: Path, **settings) -> subprocess.Popen:
    extra = [f"{k}={v}" for k, v in {**SERVER_SETTINGS, **settings}.items()]
    proc = subprocess.Popen(
        [str(BIN / "twin-serve"), f"model={model}", f"port={port}", *extra],
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_ready(f"http://127.0.0.1:{port}", 120)
    return proc


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run_client(
    port: int, path: str, bodies_file: Path, n: int, concurrency: int, warmup: int = 200
) -> dict:
    r = subprocess.run(
        [
            sys.executable,
            __file__,
            "client",
            "--port",
            str(port),
            "--path",
            path,
            "--bodies",
            str(bodies_file),
            "--n",
            str(n),
            "--concurrency",
            str(concurrency),
            "--warmup",
            str(warmup),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(f"load client failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def recovery(url: str, body: bytes, seconds: float = 30.0) -> float:
    """Seconds from now until /readyz is 200 and a valid /simulate answers 200."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            if urllib.request.urlopen(f"{url}/readyz", timeout=1).status == 200:
                req = urllib.request.Request(
                    f"{url}/simulate", data=body, headers={"Content-Type": "application/json"}
                )
                if urllib.request.urlopen(req, timeout=5).status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.02)
    return float("inf")


def bench_model(model: str, env: dict, args) -> dict:
    from twin_ml import registry

    _, card = registry.onnx_path(model)
    tag = model.replace(":", "-")
    bodies = make_bodies(card, 64, args.seed)
    wrapped = [json.dumps({"scenarios": json.loads(b)}) for b in bodies]
    wrapped_file = WORK / f"bodies-{tag}.json"
    wrapped_file.write_text(json.dumps(wrapped))
    n, big = (300, 1000) if args.quick else (args.requests, 10_000)
    out: dict = {
        "model": model,
        "kind": card.kind,
        "members": card.members,
        "steps": STEPS,
        "phases": {},
    }
    phases = out["phases"]

    port = _free_port()
    proc = start_server(model, env, port, WORK / f"server-{tag}-nobatch.log", batching="false")
    try:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/simulate",
            data=wrapped[0].encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = urllib.request.urlopen(req, timeout=30).read()
        print(f"[{model}] served c=1, batching off ({n} requests)...", flush=True)
        phases["c1_nobatch"] = run_client(port, "/simulate", wrapped_file, n, 1)
    finally:
        stop(proc)
    (WORK / f"answer-{tag}.json").write_bytes(answer)

    fport = _free_port()
    floor = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "floor",
            "--port",
            str(fport),
            "--body",
            str(WORK / f"answer-{tag}.json"),
        ],
        start_new_session=True,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", fport), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        print(f"[{model}] HTTP floor c=1 ({n} requests)...", flush=True)
        phases["floor_c1"] = run_client(fport, "/simulate", wrapped_file, n, 1)
    finally:
        stop(floor)

    port = _free_port()
    max_conc = args.max_concurrency
    proc = start_server(model, env, port, WORK / f"server-{tag}.log", max_concurrency=str(max_conc))
    url = f"http://127.0.0.1:{port}"
    try:
        print(f"[{model}] served c=1, batching on ({n} requests)...", flush=True)
        phases["c1"] = run_client(port, "/simulate", wrapped_file, n, 1)
        print(f"[{model}] served c=32, batching on ({big} requests)...", flush=True)
        phases["c32"] = run_client(port, "/simulate", wrapped_file, big, 32)
        if args.profile:
            out["profile"] = profile_worker(proc, port, wrapped_file, tag, big)
        over = 4 * max_conc
        print(
            f"[{model}] overload: concurrency {over} "
            f"(4x max_concurrency={max_conc}, {big // 2} requests)...",
            flush=True,
        )
        phases["overload"] = run_client(port, "/simulate", wrapped_file, big // 2, over, warmup=0)
        phases["overload"]["recovery_s"] = recovery(url, wrapped[0].encode())
    finally:
        stop(proc)

    if args.settings and card.kind in args.settings_kinds.split(","):
        # what each server setting costs: c=1 with one setting flipped from twin-serve's default
        for key, value in SWEEP:
            port = _free_port()
            proc = start_server(model, env, port, WORK / f"server-{tag}-{key}.log", **{key: value})
            try:
                print(f"[{model}] served c=1 with {key}={value} ({n} requests)...", flush=True)
                phases[f"c1_{key}_{value}"] = run_client(port, "/simulate", wrapped_file, n, 1)
            finally:
                stop(proc)

    c1, c1n, fl, c32, ov = (phases[k] for k in ("c1", "c1_nobatch", "floor_c1", "c32", "overload"))
    out["summary"] = {
        "c1_p50_ms": c1["p50_ms"],
        "c1_p99_ms": c1["p99_ms"],
        "floor_p50_ms": fl["p50_ms"],
        "served_over_floor_p50": c1["p50_ms"] / fl["p50_ms"],
        "c1_p99_batching_over_nobatch": c1["p99_ms"] / c1n["p99_ms"],
        "c32_scenarios_per_s": c32["throughput_per_s"],
        "c32_p99_ms": c32["p99_ms"],
        "c32_errors": c32["requests"] - c32["ok"],
        "overload_statuses": ov["statuses"],
        "overload_connection_errors": ov["connection_errors"],
        "overload_recovery_s": ov["recovery_s"],
        # a setting's cost: its c=1 p50 minus the default server's (negative: it saves)
        "setting_cost_p50_ms": {
            key[3:]: p["p50_ms"] - c1["p50_ms"]
            for key, p in phases.items()
            if key.startswith("c1_") and key != "c1_nobatch"
        },
    }
    out["goals"] = goals(card.kind, out["summary"])
    return out


def profile_worker(proc: subprocess.Popen, port: int, bodies: Path, tag: str, n: int) -> dict:
    """A py-spy flame of one server worker under the c=32 load (n requests): an SVG flame graph
    and a summary of where its threads spend their samples (the event loop's main thread, the
    model thread), in benchmarks/results/. py-spy (a dev dependency) must be allowed to attach
    to the worker (ptrace)."""
    import psutil

    workers = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "_bentoml_impl.worker.service" in " ".join(p.cmdline())
    ]
    if not workers:
        return {"error": "no worker process found"}
    raw = WORK / f"profile-{tag}.txt"
    svg = OUT.parent / f"serving-flame-{tag}.svg"
    spy = BIN / "py-spy"
    seconds = 10
    recorders = []
    for fmt, path in (("raw", raw), ("flamegraph", svg)):
        recorders.append(
            subprocess.Popen(
                [str(spy), "record", "-p", str(workers[0].pid), "-d", str(seconds), "-r", "200"]
                + ["--threads", "--format", fmt, "-o", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    print(f"  profiling worker {workers[0].pid} for {seconds} s under c=32...", flush=True)
    load = run_client(port, "/simulate", bodies, n, 32, warmup=0)
    errs = [r.communicate()[1] for r in recorders]
    if not raw.exists():
        return {"error": "py-spy recorded nothing: " + " ".join(errs)[-500:]}
    return {"flame_svg": str(svg.relative_to(ROOT)), "load": load, **summarize_profile(raw)}


# where a request's time goes, by frame (substring of py-spy's "function (file)" label)
PROFILE_PARTS = {
    "model (onnxruntime Session.run)": "Session.run (",
    "request checks (parse_scenario)": "parse_scenario (",
    "pydantic validation": "model_validate_json (",
    "answer building (Runtime.answer)": "Runtime.answer (",
    "BentoML request metrics middleware": "RunnerTrafficMetricsMiddleware.__call__ (",
    "uvicorn HTTP protocol": "HttpToolsProtocol.",
    "event loop select (idle)": "select (selectors.py)",
}


def summarize_profile(raw: Path) -> dict:
    """From py-spy's raw (collapsed) stacks: each thread's share of the samples, and the share of
    the samples whose stack passes through each part of PROFILE_PARTS."""
    threads: dict[str, int] = {}
    parts = dict.fromkeys(PROFILE_PARTS, 0)
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        name = frames[0].split(":")[-1].strip().rstrip(")").strip() or frames[0]
        threads[name] = threads.get(name, 0) + n
        for part, needle in PROFILE_PARTS.items():
            if needle in stack:
                parts[part] += n
    return {
        "samples": total,
        "threads": {k: v / total for k, v in threads.items()} if total else {},
        "parts": {k: v / total for k, v in parts.items()} if total else {},
    }


# twin-serve settings flipped one at a time from the default (hot_path=true, metrics=true,
# tracing=false; the benchmark's servers run with access_log=false)
SWEEP = [("hot_path", "false"), ("metrics", "false"), ("tracing", "true"), ("access_log", "true")]


def goals(kind: str, s: dict) -> dict[str, bool]:
    """The serving issue's numbers for this model (emulator: latency and overhead; rollout kinds:
    100-step latency; both: c=32 throughput at p99 <= 20 ms, no errors, batching's c=1 cost)."""
    out = {
        "c32_p99_le_20ms": s["c32_p99_ms"] <= 20,
        "c32_no_errors": s["c32_errors"] == 0,
        "c1_p99_batching_le_1.2x": s["c1_p99_batching_over_nobatch"] <= 1.2,
    }
    if kind == "emulator":
        out.update(
            {
                "c1_p50_le_2ms": s["c1_p50_ms"] <= 2,
                "c1_p99_le_5ms": s["c1_p99_ms"] <= 5,
                "served_over_floor_le_15": s["served_over_floor_p50"] <= 15,
                "c32_ge_1500_per_s": s["c32_scenarios_per_s"] >= 1500,
            }
        )
    else:
        out.update(
            {
                "c1_p50_le_5ms": s["c1_p50_ms"] <= ROLLOUT_GOAL.get(kind, 5.0),
                "c32_ge_600_per_s": s["c32_scenarios_per_s"] >= 600,
            }
        )
    return out


def bench_hello(env: dict, args) -> dict:
    """BentoML's own floor: the hello-world service (benchmarks/hello_service.py, one float in and
    out, BentoML's defaults but the access log off), same workers and client as twin-serve."""
    bodies = WORK / "bodies-hello.json"
    bodies.write_text(json.dumps([json.dumps({"x": float(i)}) for i in range(64)]))
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "bentoml"),
            "serve",
            "hello_service:Hello",
            "--working-dir",
            str(ROOT / "benchmarks"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**env, "HELLO_WORKERS": str(args.workers)},
        stdout=open(WORK / "server-hello.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    n, big = (300, 1000) if args.quick else (args.requests, 10_000)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 120)
        print(f"[hello-world BentoML] c=1 ({n} requests)...", flush=True)
        c1 = run_client(port, "/echo", bodies, n, 1)
        print(f"[hello-world BentoML] c=32 ({big} requests)...", flush=True)
        c32 = run_client(port, "/echo", bodies, big, 32)
    finally:
        stop(proc)
    return {"service": "hello_service:Hello", "workers": args.workers, "c1": c1, "c32": c32}


def main_bench(args) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "BENTOML_HOME": args.bentoml_home or str(WORK / "store"),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    models = [args.model] if args.model else [prepare_model(env, k) for k in args.kinds.split(",")]
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    SERVER_SETTINGS.update(workers=str(args.workers), access_log=args.access_log)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "max_concurrency": args.max_concurrency,
        "workers": args.workers,
        "access_log": args.access_log,
        "hello": bench_hello(env, args),
        "models": [bench_model(m, env, args) for m in models],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from twin_ml._io import atomic_write_json

    atomic_write_json(out, results)
    print(
        f"\none scenario per request, {STEPS}-step rollout, {results['machine']}; "
        f"twin-serve workers={args.workers} "
        f"access_log={args.access_log} max_concurrency={args.max_concurrency}"
    )
    print("| model | phase | requests | concurrency | p50 ms | p99 ms | scenarios/s | statuses |")
    print("|---|---|---|---|---|---|---|---|")
    h = results["hello"]
    for key in ("c1", "c32"):
        p = h[key]
        print(
            f"| hello-world BentoML (one float) | {key} | {p['requests']} | {p['concurrency']} | "
            f"{p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['throughput_per_s']:.0f} | "
            f"{p['statuses']} |"
        )
    for r in results["models"]:
        for key, p in r["phases"].items():
            errors = (
                f" + {p['connection_errors']} connection errors" if p["connection_errors"] else ""
            )
            print(
                f"| {r['model']} ({r['kind']}, M={r['members']}) | {key} | {p['requests']} | "
                f"{p['concurrency']} | "
                f"{p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['throughput_per_s']:.0f} | "
                f"{p['statuses']}{errors} |"
            )
    print(
        "\n| model | c1 p50 ms | c1 p99 ms | served/floor | served/hello | c1 p99 batching on/off "
        "| c32 scenarios/s | c32 p99 ms | goals missed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["models"]:
        s = r["summary"]
        missed = [k for k, ok in r["goals"].items() if not ok]
        print(
            f"| {r['model']} ({r['kind']}) | {s['c1_p50_ms']:.2f} | {s['c1_p99_ms']:.2f} | "
            f"{s['served_over_floor_p50']:.1f} | {s['c1_p50_ms'] / h['c1']['p50_ms']:.2f} | "
            f"{s['c1_p99_batching_over_nobatch']:.2f} | {s['c32_scenarios_per_s']:.0f} | "
            f"{s['c32_p99_ms']:.1f} | {', '.join(missed) or 'none'} |"
        )
        if s["setting_cost_p50_ms"]:
            costs = ", ".join(f"{k}: {v:+.2f} ms" for k, v in s["setting_cost_p50_ms"].items())
            print(f"  c=1 p50 change per setting (from the default server): {costs}")
        prof = r.get("profile") or {}
        if "parts" in prof:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof["parts"].items())
            print(f"  profile of one worker at c=32 ({prof['flame_svg']}): {shares}")
        elif prof:
            print(f"  profile: {prof.get('error')}")
        print(
            f"  overload: {s['overload_statuses']}, ready again after "
            f"{s['overload_recovery_s']:.2f} s"
        )
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("client", help="(internal) the load client")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--path", default="/simulate")
    c.add_argument("--bodies", required=True)
    c.add_argument("--n", type=int, default=1000)
    c.add_argument("--concurrency", type=int, default=1)
    c.add_argument("--warmup", type=int, default=0)
    c.add_argument("--token", default=None)
    f = sub.add_parser("floor", help="(internal) the HTTP floor server")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--body", required=True)
    ap.add_argument(
        "--model", default=None, help="NAME:REF in the store (default: train the --kinds below)"
    )
    ap.add_argument(
        "--kinds",
        default="node,flowmap,emulator",
        help="pendulum models to train and serve: node, flowmap, emulator",
    )
    ap.add_argument("--bentoml-home", default=None)
    ap.add_argument("--requests", type=int, default=2000, help="requests per concurrency-1 phase")
    ap.add_argument("--max-concurrency", type=int, default=64, help="the server's max_concurrency")
    ap.add_argument("--workers", type=int, default=2, help="server processes (twin-serve workers=)")
    ap.add_argument(
        "--access-log", default="false", choices=["true", "false"], help="twin-serve access_log="
    )
    ap.add_argument(
        "--settings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure each server setting's cost at c=1 (hot_path, metrics, tracing, access_log)",
    )
    ap.add_argument(
        "--settings-kinds", default="emulator", help="model kinds the settings are measured on"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="a py-spy flame of one worker under the c=32 load (benchmarks/results/)",
    )
    ap.add_argument("--out", default=str(OUT), help="where the results go (JSON)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="few requests (a smoke run)")
    args = ap.parse_args(argv)
    if args.cmd == "client":
        return client_main(args)
    if args.cmd == "floor":
        return floor_main(args)
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
