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
    """`trainer.fit` (from `ckpt_path` when given); returns its wall-clock seconds."""
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return time.perf_counter() - t0


def load_best(trainer, module) -> str:
    """Load the best checkpoint's weights (the checkpoint callback's) into `module`; returns its
    path ("" when there is none and the module keeps its last weights)."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)  # no pickled objects
        module.load_state_dict(state["state_dict"])
    return best
