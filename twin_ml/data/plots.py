"""A picture of a dataset: what the scenarios look like, per split, before anyone reads numbers."""

from __future__ import annotations

import os

import numpy as np

from twin_ml._io import save_figure
from twin_ml.data.dataset import Dataset
from twin_ml.data.design import SPLITS

_COLORS = {
    "train": "tab:blue",
    "val": "tab:green",
    "test": "tab:orange",
    "extrapolation": "tab:red",
    "calibration": "tab:purple",
}


def plot_dataset(ds: Dataset, path: str | os.PathLike, *, per_split: int = 4) -> None:
    """Write a PNG: inputs (top row) and outputs (bottom row) of a few scenarios of each split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = ds.card.system
    d = ds.load()
    t = d["t"]
    rows = [("input", i, v) for i, v in enumerate(m.inputs)] + [
        ("output", i, v) for i, v in enumerate(m.outputs)
    ]
    cols = max(1, len(m.inputs), len(m.outputs))
    fig, axes = plt.subplots(
        2, cols, figsize=(max(7.0, 4.2 * cols), 6.0), squeeze=False, sharex=True
    )
    for ax in axes.ravel():
        ax.set_visible(False)
    for kind, i, var in rows:
        ax = axes[0 if kind == "input" else 1, i]
        ax.set_visible(True)
        arr = d["u"] if kind == "input" else d["y"]
        for k, split in enumerate(SPLITS):
            idx = np.flatnonzero(d["split"] == k)[:per_split]
            for j, n in enumerate(idx):
                ax.plot(
                    t,
                    arr[n, :, i],
                    color=_COLORS[split],
                    lw=1.0,
                    alpha=0.8,
                    label=split if j == 0 else None,
                )
        ax.set_title(f"{kind} {var.name}")
        ax.set_ylabel(var.unit)
        ax.set_xlabel(f"t [{ds.card.time.unit}]")
        ax.grid(alpha=0.3)
    axes[1, 0].legend(loc="best", fontsize=8)
    c = ds.card.counts
    fig.suptitle(
        f"{m.name}: {c['total']} scenarios ({c['failed']} failed), sha256 {ds.sha256[:12]}",
        fontsize=10,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
