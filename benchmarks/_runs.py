"""What the benchmark scripts share: run a command (its failure ends the script with its stderr),
and train + export an experiment into the model store the script set up (BENTOML_HOME)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def sh(*args, env=None) -> float:
    """Run a command; its wall time in seconds."""
    t0 = time.perf_counter()
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def generate(system: str, n: int, out_dir: Path, env=None, extra: tuple[str, ...] = ()) -> float:
    """twin-generate n scenarios of `system` (seed 0, in this process's worker) into out_dir (it
    resumes a dataset that is there), with `extra` overrides; the wall time in seconds."""
    return sh(
        BIN / "twin-generate",
        f"system={system}",
        f"n_scenarios={n}",
        "seed=0",
        f"out_dir={out_dir}",
        "workers=0",
        "progress=false",
        *extra,
        env=env,
    )


ROOT = Path(__file__).resolve().parent.parent
# the code that makes an exported graph: a change in it is a new graph to measure
GRAPH_CODE = ("twin_ml/export/onnx_export.py", "twin_ml/models/surrogates.py")


def graph_version() -> str:
    """The store version of a benchmark's exports: 'g' + a hash of the code that builds the graph,
    so that a benchmark measures the current graph, not one a stored model was exported with."""
    h = hashlib.sha256()
    for name in GRAPH_CODE:
        h.update((ROOT / name).read_bytes())
    return "g" + h.hexdigest()[:12]


def stored_model(
    experiment: str, data: Path, run: Path, env: dict, epochs: int | None
) -> tuple[str, float | None]:
    """(bench_<experiment>:<graph_version()>, the training's seconds or None when unknown): the
    trained run in `run` (trained on `data` when it is not there), exported by the current code
    into the store when that version is not there yet. Call with BENTOML_HOME set (env and
    os.environ alike)."""
    from twin_ml import registry

    version = graph_version()
    ref = f"bench_{experiment}:{version}"
    if not (run / "model" / "model.json").exists():
        return ref, train_and_export(experiment, data, run, env, epochs, version=version)
    try:
        registry.verify(ref)
    except registry.RegistryError:
        export(experiment, run, version, env)
    saved = run.parent / f"train_s-{experiment}.json"
    return ref, json.loads(saved.read_text())["train_s"] if saved.exists() else None


def export(experiment: str, run: Path, version: str, env: dict) -> float:
    """twin-export the run as bench_<experiment>:<version>; the wall time in seconds."""
    return sh(
        BIN / "twin-export",
        f"run_dir={run}",
        f"name=bench_{experiment}",
        f"version={version}",
        env=env,
    )


def train_and_export(
    experiment: str,
    data: Path,
    run: Path,
    env: dict,
    epochs: int | None,
    version: str,
) -> float:
    """twin-train the experiment on `data` into `run`, twin-export it as
    bench_<experiment>:<version>; the training's wall time (also saved beside the run as
    train_s-<experiment>.json)."""
    extra = [f"trainer.max_epochs={epochs}"] if epochs else []
    train_s = sh(
        BIN / "twin-train",
        f"experiment={experiment}",
        f"data_dir={data}",
        f"out_dir={run}",
        "logger=none",
        *extra,
        env=env,
    )
    export(experiment, run, version, env)
    (run.parent / f"train_s-{experiment}.json").write_text(json.dumps({"train_s": train_s}))
    return train_s
