"""twin-serve: serve a stored model over HTTP (the BentoML service in serving/service.py).

    twin-serve model=pendulum_node:production [port=3000] [host=127.0.0.1] [threads=1]
               [strict=false] [batching=true] [max_batch=256] [max_scenarios=256] [max_steps=...]
               [max_field_values=1048576]
               [max_concurrency=64] [timeout=120] [workers=1] [access_log=true]
               [metrics=true] [tracing=false] [hot_path=true]
               [twins_store=<BENTOML_HOME>/twin-ml/twins.sqlite] [max_twins=1000]

Settings are key=value like the other commands (not a Hydra app: `model` names a config group
there). Verifies the model in the store first (a tampered or missing model is one `error:` line
and exit code 2), then runs `bentoml serve` in this process, so signals reach the server.

Each server keeps its Prometheus files in a directory of its own, per host and port
(<BENTOML_HOME>/twin-ml/metrics/<host>-<port>): BentoML's default directory is shared by every
server of a BENTOML_HOME and emptied by each one that starts, so a second server (another model,
another port) would wipe the first one's /metrics.

The live twins' store (`twins_store`: a SQLAlchemy URL, or a SQLite file's path; by default a
SQLite file beside the model store) is opened before the server starts: a URL it cannot reach,
or a folder it cannot write, is one `error:` line and exit code 2, not a 503 at the first twin.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from training._common import Setting, defaults, fail, key_values

SETTINGS = {
    "model": Setting(None, "the stored model: NAME:VERSION, NAME:latest or NAME:<stage>", True),
    "host": Setting("127.0.0.1", "the address to listen on"),
    "port": Setting("3000", "the port to listen on"),
    "threads": Setting("1", "onnxruntime intra-op threads per worker"),
    "strict": Setting(
        "false", "refuse (400) scenarios outside the training domain instead of flagging them"
    ),
    "batching": Setting(
        "true", "adaptive batching across concurrent requests (false: one request per call)"
    ),
    "max_batch": Setting("256", "scenarios per model call when batching"),
    "max_scenarios": Setting("256", "scenarios per request (more: 400)"),
    "max_steps": Setting(
        "0", "longest horizon in steps (0: the model's declared maximum, also the upper bound)"
    ),
    "max_field_values": Setting(
        "1048576",
        "numbers of decoded fields per request (reduced models of field systems); more: 413",
    ),
    "max_concurrency": Setting("64", "requests in flight per server; more get 429 at once"),
    "timeout": Setting(
        "120", "seconds a request may take (a long /calibrate included) before a 504"
    ),
    "workers": Setting("1", "server processes (each loads the model and batches on its own)"),
    "access_log": Setting("true", "one log line per request (BentoML's access log)"),
    "metrics": Setting(
        "true", "/metrics: BentoML's request metrics and twin-ml's (false: no /metrics at all)"
    ),
    "tracing": Setting(
        "false", "an OpenTelemetry span per request (for an exporter set in BentoML's config)"
    ),
    "hot_path": Setting(
        "true", "POST /simulate by the lean route (false: through BentoML's API machinery)"
    ),
    "twins_store": Setting(
        "",
        "the live twins' store: a SQLAlchemy URL (sqlite:///..., postgresql+psycopg://...) or a "
        "SQLite file (empty: <BENTOML_HOME>/twin-ml/twins.sqlite)",
    ),
    "max_twins": Setting("1000", "twins the store may hold; POST /twins beyond it: 409"),
}
DEFAULTS = defaults(SETTINGS)
POSITIVE = (
    "threads",
    "max_batch",
    "max_scenarios",
    "max_field_values",
    "max_concurrency",
    "timeout",
    "workers",
    "max_twins",
)
FLAGS = ("strict", "batching", "access_log", "metrics", "tracing", "hot_path")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse(argv: list[str]) -> dict[str, str]:
    cfg = key_values(argv, SETTINGS, __doc__)
    if not cfg["model"]:
        raise ValueError("model=NAME:VERSION (or NAME:latest, NAME:production) is required")
    if not cfg["port"].isdigit() or not 0 < int(cfg["port"]) < 65536:
        raise ValueError(f"port must be an integer in 1..65535, got {cfg['port']!r}")
    for key in POSITIVE:
        if not cfg[key].isdigit() or int(cfg[key]) < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    if not cfg["max_steps"].isdigit():
        raise ValueError(
            f"max_steps must be an integer >= 1 (0: the model's maximum), got {cfg['max_steps']!r}"
        )
    for key in FLAGS:
        if cfg[key].lower() not in TRUE + FALSE:
            raise ValueError(f"{key} must be true or false, got {cfg[key]!r}")
        cfg[key] = "1" if cfg[key].lower() in TRUE else "0"
    return cfg


def main(argv: list[str] | None = None) -> None:
    # before anything imports bentoml: it reads this once, and the server never phones home
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    try:
        cfg = parse(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        fail(e)
    from twin_ml import registry

    try:
        registry.verify(cfg["model"])
    except (ValueError, registry.RegistryError) as e:
        fail(e)
    os.environ.update(
        {
            "TWIN_ML_MODEL": cfg["model"],
            **{
                f"TWIN_ML_{k.upper()}": cfg[k]
                for k in DEFAULTS
                if k not in ("model", "host", "port")
            },
        }
    )
    # BentoMLContainer is BentoML's internal configuration (bentoml is pinned): the Prometheus
    # directory is read from it when the server starts, and handed to the workers
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml_cli.cli import cli

    home = Path(BentoMLContainer.bentoml_home.get())
    try:
        os.environ["TWIN_ML_TWINS_STORE"] = _open_store(cfg["twins_store"], home)
    except Exception as e:  # SQLAlchemy's errors (a bad URL, a server not there) and the OS's
        fail(ValueError(f"twins_store={cfg['twins_store']!r}: {str(e).splitlines()[0]}"))
    slot = re.sub(r"[^A-Za-z0-9.-]", "_", f"{cfg['host']}-{cfg['port']}")
    BentoMLContainer.prometheus_multiproc_dir.set(str(home / "twin-ml" / "metrics" / slot))
    cli.main(
        args=["serve", "serving.service:TwinService", "--host", cfg["host"], "--port", cfg["port"]],
        prog_name="bentoml",
    )


def _open_store(given: str, home: Path) -> str:
    """The twins' store URL (a path: a SQLite file), opened once here (its table made)."""
    from twin_ml.stream.store import TwinStore, sqlite_url

    url = given if "://" in given else sqlite_url(given or home / "twin-ml" / "twins.sqlite")
    TwinStore(url).close()
    return url


if __name__ == "__main__":
    main()
