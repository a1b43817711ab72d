"""twin-serve: serve a stored model over HTTP (the BentoML service in serving/service.py).

    twin-serve model=pendulum_node:production [port=3000] [host=127.0.0.1] [threads=1]

Settings are key=value like the other commands (not a Hydra app: `model` names a config group
there). Verifies the model in the store first (a tampered or missing model is one `error:` line
and exit code 2), then replaces this process with `bentoml serve`, so signals reach the server.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from training._common import fail

DEFAULTS = {"model": None, "host": "127.0.0.1", "port": "3000", "threads": "1"}


def parse(argv: list[str]) -> dict[str, str]:
    cfg = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in DEFAULTS:
            raise ValueError(f"unknown setting {arg!r}; settings: {', '.join(f'{k}=...' for k in DEFAULTS)}")
        cfg[key] = value
    if not cfg["model"]:
        raise ValueError("model=NAME:VERSION (or NAME:latest, NAME:production) is required")
    if not cfg["port"].isdigit() or not 0 < int(cfg["port"]) < 65536:
        raise ValueError(f"port must be an integer in 1..65535, got {cfg['port']!r}")
    if not cfg["threads"].isdigit() or int(cfg["threads"]) < 1:
        raise ValueError(f"threads must be an integer >= 1, got {cfg['threads']!r}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    from twin_ml import registry

    try:
        cfg = parse(sys.argv[1:] if argv is None else argv)
        registry.verify(cfg["model"])
    except (ValueError, registry.RegistryError) as e:
        fail(e)
    env = {**os.environ, "TWIN_ML_MODEL": cfg["model"], "TWIN_ML_THREADS": cfg["threads"],
           "BENTOML_DO_NOT_TRACK": os.environ.get("BENTOML_DO_NOT_TRACK", "True")}
    bentoml = str(Path(sys.executable).parent / "bentoml")
    os.execve(bentoml, [bentoml, "serve", "serving.service:TwinService", "--host", cfg["host"], "--port", cfg["port"]],
              env)


if __name__ == "__main__":
    main()
