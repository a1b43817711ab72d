"""What the benchmark scripts share: run a command (its failure ends the script with its stderr),
and train + export an experiment into the model store the script set up (BENTOML_HOME)."""

from __future__ import annotations

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


def train_and_export(
    experiment: str, data: Path, run: Path, env: dict, epochs: int | None
) -> float:
    """twin-train the experiment on `data` into `run`, twin-export it as bench_<experiment>:v1;
    the training's wall time (also saved beside the run as train_s-<experiment>.json)."""
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
    sh(BIN / "twin-export", f"run_dir={run}", f"name=bench_{experiment}", "version=v1", env=env)
    (run.parent / f"train_s-{experiment}.json").write_text(json.dumps({"train_s": train_s}))
    return train_s
