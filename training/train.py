"""twin-train: a dataset + a model config -> a trained, calibrated ensemble in a run directory.

    twin-train experiment=pendulum_node data_dir=data/pendulum-n256-s0 out_dir=runs/pendulum
    twin-train -m hparams_search=pendulum_node_optuna

The run directory holds config.yaml, checkpoints/ (best.ckpt, last.ckpt), model/ (model.pt +
model.json: everything to rebuild the calibrated model), metrics.json, report.html with PNGs and
summary.json, whose path is printed last. Returns `optimized_metric` for sweeps.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from training._common import (
    CONFIG_DIR,
    check_group_choices,
    fail,
    lightning_logs_once,
    write_summary,
)
from twin_ml._io import (
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temps,
    sha256_bytes,
    sha256_file,
)

log = logging.getLogger("twin-train")


def _loggers(cfg: DictConfig, out_dir: Path):
    if not cfg.get("logger"):
        return False
    if "wandb" in cfg.logger:
        for k, sub in (
            ("WANDB_DIR", ""),
            ("WANDB_CACHE_DIR", "wandb-cache"),
            ("WANDB_CONFIG_DIR", "wandb-config"),
        ):
            os.environ.setdefault(k, str(out_dir / sub) if sub else str(out_dir))
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
    return [hydra.utils.instantiate(c) for c in cfg.logger.values()]


def _stop_after(n: int):
    """A callback that ends this run after n epochs (checkpoints are written; resume=true continues)."""
    import lightning as L

    class StopAfter(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch + 1 >= n:
                trainer.should_stop = True

    return StopAfter()


def save_model(out_dir: Path, model, cfg: DictConfig, scale, t, system, **extra: Any) -> Path:
    """out_dir/model/: model.pt (temp file, then rename) and model.json (the config to rebuild it,
    the conformal scale, sha256 of weights and config, the time grid, plus `extra`)."""
    from twin_ml.models.checkpoint import atomic_torch_save

    model_dir = out_dir / "model"
    model_dir.mkdir(exist_ok=True)
    atomic_torch_save(model.state_dict(), model_dir / "model.pt")
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write_json(
        model_dir / "model.json",
        {
            "config": model.config,
            "conformal_scale": scale.tolist(),
            "weights_sha256": sha256_file(model_dir / "model.pt"),
            "config_sha256": sha256_bytes(config_text.encode()),
            "time": {
                "t0": float(t[0]),
                "dt": float(t[1] - t[0]),
                "n": len(t),
                "unit": system.time_unit,
            },
            **extra,
        },
    )
    return model_dir


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    if cfg.get("telemetry"):
        from training.train_telemetry import train_telemetry

        return train_telemetry(cfg)
    import lightning as L
    import torch

    from twin_ml.data.torch_data import ScenarioDataModule
    from twin_ml.evaluate.evaluate import evaluate_splits, fit_conformal_scale, flat_metrics, speed
    from twin_ml.evaluate.report import write_report
    from twin_ml.models import compute_stats
    from twin_ml.models.checkpoint import AtomicCheckpointIO

    t_start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    system = hydra.utils.instantiate(cfg.system, _convert_="all")
    log.info(f"Instantiating datamodule <{cfg.data_dir}>")
    dm = ScenarioDataModule(
        str(cfg.data_dir),
        system,
        batch_size=cfg.data.batch_size,
        horizon=cfg.data.horizon,
        seed=cfg.seed,
    )
    tr = dm.numpy("train")
    t = dm.t_grid
    stats = compute_stats(tr["x"], tr["u"], tr["p"], tr["y"], t)
    extra = {"n_times": len(t)} if cfg.model.net.kind == "emulator" else {}
    log.info(f"Instantiating model <{cfg.model.net.kind}> x {cfg.ensemble.size}")
    model = hydra.utils.instantiate(
        cfg.model.net,
        system=system,
        stats=stats,
        members=cfg.ensemble.size,
        seed=cfg.seed,
        _convert_="all",
        **extra,
    )
    module = hydra.utils.instantiate(cfg.model.optim, _convert_="all")(model=model, seed=cfg.seed)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    if cfg.stop_after_epochs:
        callbacks.append(_stop_after(int(cfg.stop_after_epochs)))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=_loggers(cfg, out_dir),
        default_root_dir=str(out_dir),
        enable_progress_bar=sys.stderr.isatty(),
        plugins=[AtomicCheckpointIO()],
    )
    remove_stale_temps(out_dir / "checkpoints")
    last = out_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if cfg.resume and last.exists() else None
    log.info("Resuming from last.ckpt" if ckpt_path else "Starting training")
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - t_fit
    if trainer.should_stop and cfg.stop_after_epochs and trainer.current_epoch < trainer.max_epochs:
        if not any(type(c).__name__ == "EarlyStopping" and c.stopped_epoch for c in callbacks):
            log.info(
                f"stopped after {trainer.current_epoch} epochs (stop_after_epochs); resume=true continues"
            )
            return {"stopped_at_epoch": trainer.current_epoch}, {}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)  # no pickled objects
        module.load_state_dict(state["state_dict"])
    model.eval()
    splits = {s: dm.numpy(s) for s in ("val", "test", "extrapolation")}
    scale = fit_conformal_scale(model, splits["val"], t)
    metrics, preds = evaluate_splits(model, system, splits, t)
    metrics["speed"] = speed(
        model,
        system,
        splits["test"] if len(splits["test"]["p"]) else splits["val"],
        t,
        n=cfg.speed_scenarios,
    )
    metrics["conformal_scale"] = scale.tolist()
    metrics["train"] = {
        "epochs": trainer.current_epoch,
        "fit_seconds": fit_seconds,
        "members": model.members,
        "best_checkpoint": Path(best).name if best else None,
    }
    flat = flat_metrics(metrics)

    model_dir = save_model(
        out_dir,
        model,
        cfg,
        scale,
        t,
        system,
        dataset_sha256=dm.dataset.sha256,
        design=dm.dataset.manifest["design"],  # the training domain, for export and serving
        metrics={
            k: flat[k]
            for k in sorted(flat)
            if k.startswith(("val/", "test/")) and "/regime/" not in k
        },
    )
    atomic_write_json(out_dir / "metrics.json", {**flat, "detail": metrics})
    report = write_report(out_dir, model, system, splits, preds, metrics, t)
    summary = {
        "run_dir": str(out_dir),
        "model": str(model_dir / "model.json"),
        "report": str(report),
        "metrics": str(out_dir / "metrics.json"),
        "dataset_sha256": dm.dataset.sha256,
        "headline": {
            k: flat[k]
            for k in (
                "test/rel_l2_median",
                "test/rel_l2_p95",
                "test/coverage_90",
                "extrapolation/rel_l2_median",
                "extrapolation/coverage_90",
            )
            if k in flat
        },
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return flat, summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from twin_ml.data.dataset import DatasetError

    lightning_logs_once()
    try:
        metrics, summary = train(cfg)
        if not summary:
            return None
        path = write_summary(Path(cfg.out_dir), summary)
    except (
        ValueError,
        KeyError,
        DatasetError,
        InstantiationException,
        OSError,
    ) as e:  # OSError: e.g. disk full
        fail(e)
    log.info(f"headline: {summary['headline']}")
    print(path)
    return metrics.get(cfg.optimized_metric)


def main() -> None:
    check_group_choices(
        sys.argv[1:],
        [
            "system",
            "data",
            "model",
            "ensemble",
            "trainer",
            "callbacks",
            "logger",
            "paths",
            "experiment",
            "hparams_search",
        ],
    )
    _main()


if __name__ == "__main__":
    main()
