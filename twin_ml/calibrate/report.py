"""The calibration plot: observations against the calibrated prediction with its band and the
solver's re-simulation, and the posterior marginals."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from twin_ml._io import save_figure
from twin_ml.calibrate.fit import CalibrationResult
from twin_ml.calibrate.problem import Problem


def plot(
    problem: Problem,
    result: CalibrationResult,
    path: str | Path,
    truth: dict[str, float] | None = None,
) -> Path:
    """PNG at `path`: per observed output the calibrated prediction at the estimate
    (`result.mean`: the surrogate's, or the solver's with the solver backend) with its 90% band,
    +-1.645 x sqrt(std^2 + noise^2), the solver at the estimate (`result.y_solver`, with the
    surrogate backend) and the observations; with MCMC, below them each fitted value's posterior
    (`result.samples`) with the estimate, the 90% credible interval and the `truth` when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std, samples = result.mean, result.std, result.samples
    observed = [j for j in range(problem.y.shape[1]) if not np.all(np.isnan(problem.y[:, j]))]
    n_top, n_bottom = len(observed), (problem.n_fit if samples is not None and len(samples) else 0)
    cols = max(n_top, n_bottom, 1)
    fig, axes = plt.subplots(
        2 if n_bottom else 1, cols, figsize=(4.2 * cols, 6.4 if n_bottom else 3.4), squeeze=False
    )
    t = problem.times
    y_solver = result.y_solver
    for c, j in enumerate(observed):
        ax = axes[0][c]
        name = problem.outputs[j]
        sigma = result.noise.get(name, 0.0)
        half = 1.645 * np.sqrt(std[:, j] ** 2 + sigma**2)
        ax.fill_between(
            t, mean[:, j] - half, mean[:, j] + half, color="C0", alpha=0.25, label="90% band"
        )
        ax.plot(t, mean[:, j], color="C0", label=f"{result.backend} at estimate")
        if y_solver is not None:
            ax.plot(t, y_solver[:, j], "--", color="C3", lw=1, label="solver at estimate")
        ax.plot(t, problem.y[:, j], ".", color="k", ms=3, label="observations")
        ax.set_title(name)
        ax.set_xlabel("t")
        if c == 0:
            ax.legend(fontsize=7)
    for c in range(n_top, cols):
        axes[0][c].axis("off")
    if n_bottom:
        for k, name in enumerate(problem.fit):
            ax = axes[1][k]
            ax.hist(samples[:, k], bins=40, color="C2", alpha=0.7, density=True)
            estimate = result.estimates[name]
            ax.axvline(estimate.value, color="C0", label="estimate")
            if truth and name in truth:
                ax.axvline(truth[name], color="k", ls="--", label="true")
            post = estimate.posterior
            if post is not None:
                ax.axvspan(post.q05, post.q95, color="C2", alpha=0.15, label="90% credible")
            ax.set_title(f"posterior {name}")
            if k == 0:
                ax.legend(fontsize=7)
        for c in range(n_bottom, cols):
            axes[1][c].axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)
