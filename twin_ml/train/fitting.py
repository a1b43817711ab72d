"""Fitting with Lightning, resumable: from the run's last checkpoint, then back to its best one."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from twin_ml._io import remove_stale_temps


def resume_from(out_dir: str | Path, resume: bool) -> str | None:
    """out_dir/checkpoints/last.ckpt when `resume` and it exists, else None (start afresh). Temp
    files an interrupted checkpoint write left behind are removed first."""
    checkpoints = Path(out_dir) / "checkpoints"
    remove_stale_temps(checkpoints)
    last = checkpoints / "last.ckpt"
    return str(last) if resume and last.exists() else None


def fit(trainer, module, datamodule, ckpt_path: str | None = None) -> float:
    """`trainer.fit` (from `ckpt_path` when given); returns its wall-clock seconds. Training that
    diverged (no finite validation loss at any epoch) raises ValueError saying what to change,
    instead of evaluating a model of NaNs."""
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    check_finite(trainer)
    return time.perf_counter() - t0


def check_finite(trainer) -> None:
    """Raise when the run never reached a finite val/loss (Lightning's early stopping ends such a
    run after its first non-finite validation)."""
    cb = trainer.checkpoint_callback
    best = getattr(cb, "best_model_score", None) if cb else None
    last = trainer.callback_metrics.get("val/loss")
    finite = best is not None and bool(torch.isfinite(torch.as_tensor(best)))
    if finite or (best is None and (last is None or bool(torch.isfinite(last)))):
        return
    model = getattr(getattr(trainer.lightning_module, "model", None), "config", {}) or {}
    hint = (
        "the vector field's fixed step blows up on a stiff system (model.net.solver "
        f"{model.get('solver')!r}, model.net.step_fraction {model.get('step_fraction')}): "
        "train a flow map (model=flowmap) or an emulator, or lower model.net.step_fraction"
        if model.get("solver") in ("rk4", "euler", "midpoint")
        else "lower model.optim.lr"
    )
    raise ValueError(
        f"training diverged: val/loss is {float(last) if last is not None else 'nan'} after "
        f"epoch {trainer.current_epoch} and no epoch reached a finite one; likely {hint}"
    )


def load_best(trainer, module) -> str:
    """Load the best checkpoint's weights (the checkpoint callback's) into `module`; returns its
    path ("" when there is none and the module keeps its last weights)."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)  # no pickled objects
        module.load_state_dict(state["state_dict"])
    return best
