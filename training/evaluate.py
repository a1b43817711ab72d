"""twin-evaluate: evaluate a trained run on its dataset (or another one) and write report.html.

twin-evaluate run_dir=runs/pendulum-node-s0 [data_dir=data/other-dataset] [out_dir=...]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from training._common import CONFIG_DIR, fail, write_json, write_summary

log = logging.getLogger("twin-evaluate")


def evaluate(cfg: DictConfig) -> dict:
    from twin_ml.data.torch_data import ScenarioDataModule
    from twin_ml.evaluate.evaluate import evaluate_splits, flat_metrics, speed
    from twin_ml.evaluate.report import write_report
    from twin_ml.models import load_trained

    run = Path(cfg.run_dir)
    model, _ = load_trained(run / "model")
    data_dir = cfg.data_dir or OmegaConf.load(run / "config.yaml").data_dir
    dm = ScenarioDataModule(str(data_dir), model.system, seed=0)
    t = dm.t_grid
    splits = {s: dm.numpy(s) for s in ("val", "test", "extrapolation")}
    metrics, preds = evaluate_splits(model, model.system, splits, t)
    metrics["speed"] = speed(
        model,
        model.system,
        splits["test"] if len(splits["test"]["p"]) else splits["val"],
        t,
        n=cfg.speed_scenarios,
    )
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = flat_metrics(metrics)
    write_json(out / "metrics.json", {**flat, "detail": metrics})
    report = write_report(out, model, model.system, splits, preds, metrics, t)
    return {
        "run_dir": str(run),
        "data_dir": str(data_dir),
        "dataset_sha256": dm.dataset.sha256,
        "report": str(report),
        "metrics": str(out / "metrics.json"),
        "headline": {
            k: flat[k]
            for k in (
                "test/rel_l2_median",
                "test/coverage_90",
                "extrapolation/rel_l2_median",
                "extrapolation/coverage_90",
            )
            if k in flat
        },
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def _main(cfg: DictConfig) -> None:
    from twin_ml.data.dataset import DatasetError

    try:
        summary = evaluate(cfg)
        path = write_summary(Path(cfg.out_dir), summary)
    except (ValueError, KeyError, DatasetError, OSError) as e:  # OSError: e.g. disk full
        fail(e)
    log.info(f"headline: {summary['headline']}")
    print(path)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
