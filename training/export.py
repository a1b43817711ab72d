"""twin-export: a training run -> one parity-checked, self-describing ONNX file in the model store.

    twin-export run_dir=runs/pendulum-node-s0 name=pendulum_node [stage=production]

Writes out_dir/model.onnx + manifest.json, stores them with the run's report in the BentoML model
store (BENTOML_HOME) as NAME:VERSION, and prints the path of out_dir/summary.json last. A failed
parity check stores nothing and exits non-zero.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from training._common import CONFIG_DIR, fail, write_summary
from twin_ml._io import atomic_write_bytes, atomic_write_json

log = logging.getLogger("twin-export")


def export(cfg: DictConfig) -> dict:
    from twin_ml import registry
    from twin_ml.export.export import export_run
    from twin_ml.models import load_trained

    t0 = time.perf_counter()
    run = Path(cfg.run_dir)
    model, meta = load_trained(run / "model")
    name = registry.check_name(cfg.name or f"{model.system.name}_{model.kind}")
    version = (
        str(cfg.version)
        if cfg.version is not None
        else registry.new_version(meta["weights_sha256"])
    )
    registry.check_new(name, version, cfg.stage)  # before the export's minutes of work
    log.info(
        f"Exporting {run} as {name}:{version} (parity check on {cfg.parity_scenarios} scenarios)"
    )
    data, card = export_run(
        run,
        name=name,
        version=version,
        max_steps=cfg.max_steps,
        parity_scenarios=cfg.parity_scenarios,
        parity_steps=cfg.parity_steps,
        seed=cfg.seed,
    )
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "model.onnx", data)
    atomic_write_json(out / "manifest.json", card.to_json(store=True))
    extra = {p.name: p for p in sorted(run.glob("*.png"))}
    if (run / "report.html").exists():
        extra["report.html"] = run / "report.html"
    if (run / "metrics.json").exists():
        extra["metrics.json"] = run / "metrics.json"
    if "fmu" in card.system.options:  # the physics travels with the model (registry.SYSTEM_FMU)
        extra[registry.SYSTEM_FMU] = Path(str(card.system.options["fmu"]))
    tag = registry.save(
        name,
        version,
        data,
        card,
        extra_files=extra,
        labels={"system": model.system.name, "kind": model.kind, "stage": cfg.stage or "none"},
    )
    if cfg.stage:
        try:
            registry.promote(tag, cfg.stage)
        except (
            OSError,
            registry.RegistryError,
        ) as e:  # stored: a rerun would meet "already in the store"
            raise registry.RegistryError(
                f"{tag} is stored, but promoting it to {cfg.stage} failed ({e}); once that is "
                f"fixed: twin-models promote {tag} --stage {cfg.stage}"
            ) from None
    return {
        "tag": tag,
        "onnx": str(out / "model.onnx"),
        "manifest": str(out / "manifest.json"),
        "onnx_sha256": card.onnx_sha256,
        "stage": cfg.stage,
        "parity": card.parity,
        "integrator_error": card.integrator_error,
        "seconds": round(time.perf_counter() - t0, 1),
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def _main(cfg: DictConfig) -> None:
    from twin_ml.export.onnx_export import ExportError
    from twin_ml.registry import RegistryError

    try:
        summary = export(cfg)
        path = write_summary(Path(cfg.out_dir), summary)
    except (
        ValueError,
        KeyError,
        ExportError,
        RegistryError,
        OSError,
    ) as e:  # OSError: e.g. disk full
        fail(e)
    log.info(f"stored {summary['tag']}")
    print(path)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
