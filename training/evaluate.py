"""twin-evaluate: evaluate a trained run on its dataset (or another one) and write report.html.

twin-evaluate run_dir=runs/pendulum-node-s0 [data_dir=data/other-dataset] [out_dir=...]

Outside the run's training box the std widens by its conformal shift, as served. On the run's
own dataset the extrapolation split is scored cross-fitted, as twin-train scored it (the
run's seed splits it in the same halves); on another dataset every split is scored by the beta
the run deploys (fitted on none of its scenarios).
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
    from twin_ml.contract import ConformalShift, DomainBox
    from twin_ml.data.torch_data import ScenarioDataModule
    from twin_ml.evaluate.evaluate import (
        evaluate_splits,
        fit_conformal_shift,
        flat_metrics,
        speed,
    )
    from twin_ml.evaluate.report import write_report
    from twin_ml.models import load_trained
    from twin_ml.uq import ShiftFit

    run = Path(cfg.run_dir)
    model, meta = load_trained(run / "model")
    run_cfg = OmegaConf.load(run / "config.yaml")
    data_dir = cfg.data_dir or run_cfg.data_dir
    dm = ScenarioDataModule(str(data_dir), model.system, seed=0)
    t = dm.t_grid
    splits = {s: dm.numpy(s) for s in ("val", "test", "extrapolation")}
    # the run's training box (runs before it was recorded: none, and no widening)
    box = DomainBox.of_design(meta["design"]) if "design" in meta else None
    shift = ConformalShift.model_validate(meta.get("conformal_shift") or {})
    if box is not None and dm.dataset.sha256 == meta.get("dataset_sha256") and shift.n_fit:
        shift = fit_conformal_shift(
            model, model.system, box, splits["extrapolation"], t, level=shift.level,
            seed=int(run_cfg.get("seed", 0)),
        )  # fmt: skip
    metrics, preds = evaluate_splits(model, model.system, splits, t, box=box, shift=shift)
    metrics["conformal_shift"] = (
        shift.summary()
        if isinstance(shift, ShiftFit)
        else {**shift.model_dump(mode="json"), "scored": "every split by the run's deployed beta"}
    )
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
