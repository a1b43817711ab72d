"""report.html with PNGs: trajectories with bands over the solver truth, parity, calibration,
error vs horizon, per-regime table. Points not measured (NaN in y) are left out of every panel and
number; a metric without any measured point shows as "-"."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from scipy.stats import norm

from twin_ml._io import atomic_write_bytes, save_figure

MAX_TRAJECTORY_OUTPUTS = 4


def _num(value, fmt: str) -> str:
    """A metric for the table ("-" when absent or not finite)."""
    if value is None or not np.isfinite(value):
        return "-"
    return format(value, fmt)


def _curve(values) -> np.ndarray:
    """A list of metrics (None where absent) as floats for a plot (NaN: a gap)."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _save(fig, path: Path) -> str:
    save_figure(fig, path, dpi=100)
    return path.name


def write_report(out_dir, model, system, splits, preds, metrics, t) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, units = system.output_names, [o.unit for o in system.outputs]
    imgs = []

    # trajectories with 90% bands: the first MAX_TRAJECTORY_OUTPUTS outputs (a field model's
    # probes would make a figure of dozens of panels; the parity and the table show them all)
    shown = [
        (s, i)
        for s in ("test", "extrapolation")
        if s in preds
        for i in range(min(3, len(preds[s][0])))
    ]
    drawn = names[:MAX_TRAJECTORY_OUTPUTS]
    fig, axes = plt.subplots(
        len(shown), len(drawn), figsize=(5 * len(drawn), 2.3 * len(shown)), squeeze=False
    )
    z = norm.ppf(0.95)
    for r, (split, i) in enumerate(shown):
        mean, std = preds[split]
        for j, name in enumerate(drawn):
            ax = axes[r, j]
            ax.fill_between(
                t,
                mean[i, :, j] - z * std[i, :, j],
                mean[i, :, j] + z * std[i, :, j],
                alpha=0.3,
                color="tab:blue",
                label="90% interval",
            )
            ax.plot(t, splits[split]["y"][i, :, j], "k", lw=1.2, label="solver")
            ax.plot(t, mean[i, :, j], "tab:blue", lw=1.0, ls="--", label="surrogate mean")
            ax.set_title(
                f"{split} #{int(splits[split]['index'][i])}: {name} [{units[j]}]", fontsize=9
            )
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    some = f" (the first {len(drawn)} of {len(names)} outputs)" if len(drawn) < len(names) else ""
    imgs.append(
        (
            f"Trajectories with 90% intervals over the solver truth{some}",
            _save(fig, out_dir / "trajectories.png"),
        )
    )
    plt.close(fig)

    # parity
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for j, name in enumerate(names):
        ax = axes[0, j]
        for split, color in (("test", "tab:blue"), ("extrapolation", "tab:red")):
            if split in preds:
                ax.scatter(
                    splits[split]["y"][..., j].ravel()[::7],
                    preds[split][0][..., j].ravel()[::7],
                    s=2,
                    alpha=0.3,
                    color=color,
                    label=split,
                )
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k", lw=0.8)
        ax.set_xlabel(f"solver {name}")
        ax.set_ylabel(f"surrogate {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    imgs.append(("Parity", _save(fig, out_dir / "parity.png")))
    plt.close(fig)

    # calibration curve
    levels = np.linspace(0.05, 0.99, 30)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for split, color in (("test", "tab:blue"), ("extrapolation", "tab:red")):
        if split in preds:
            mean, std = preds[split]
            y = splits[split]["y"]
            ok = np.isfinite(y)
            if not ok.any():
                continue
            cov = [np.mean((np.abs(y - mean) <= norm.ppf(0.5 + lv / 2) * std)[ok]) for lv in levels]
            ax.plot(levels, cov, color=color, label=split)
    ax.plot([0, 1], [0, 1], "k", lw=0.8)
    ax.set_xlabel("nominal interval level")
    ax.set_ylabel("empirical coverage")
    ax.legend()
    fig.tight_layout()
    imgs.append(("Coverage calibration", _save(fig, out_dir / "calibration.png")))
    plt.close(fig)

    # error vs horizon
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split, color in (("test", "tab:blue"), ("extrapolation", "tab:red")):
        if split in metrics:
            ax.plot(t, _curve(metrics[split]["error_vs_horizon"]), color=color, label=split)
    ax.set_xlabel(f"t [{system.time_unit}]")
    ax.set_ylabel("normalized RMSE")
    ax.legend()
    fig.tight_layout()
    imgs.append(("Error vs horizon", _save(fig, out_dir / "error_vs_horizon.png")))
    plt.close(fig)

    rows = []
    for split, m in metrics.items():
        if not isinstance(m, dict) or "rel_l2_median" not in m:
            continue
        rows.append(
            f"<tr><td>{split}</td><td>all</td><td>{m['n_scenarios']}</td>"
            f"<td>{_num(m['rel_l2_median'], '.4f')}</td><td>{_num(m['rel_l2_p95'], '.4f')}</td>"
            f"<td>{_num(m.get('coverage_90'), '.3f')}</td></tr>"
        )
        for r, rm in m.get("regimes", {}).items():
            rows.append(
                f"<tr><td>{split}</td><td>{html.escape(r)}</td><td>{rm['n_scenarios']}</td>"
                f"<td>{_num(rm['rel_l2_median'], '.4f')}</td>"
                f"<td>{_num(rm['rel_l2_p95'], '.4f')}</td><td></td></tr>"
            )
    speed = metrics.get("speed", {})
    body = [
        f"<h1>{html.escape(system.name)}: {html.escape(model.kind)} ensemble of "
        f"{model.members}</h1>",
        "<table border=1 cellpadding=4><tr><th>split</th><th>regime</th><th>n</th>"
        "<th>rel L2 median</th><th>rel L2 p95</th><th>90% coverage</th></tr>",
        *rows,
        "</table>",
    ]
    if speed:
        body.append(
            f"<p>Rollout of {speed['n_scenarios']} scenarios: "
            f"surrogate {speed['surrogate_s']:.3f} s, solver "
            f"looped {speed['solver_looped_s']:.3f} s ({speed['speedup_vs_looped']:.1f}x), stacked "
            f"{speed['solver_stacked_s']:.3f} s ({speed['speedup_vs_stacked']:.1f}x).</p>"
        )
    shift = metrics.get("conformal_shift")
    if shift and shift.get("n_fit"):
        scored = (
            "cross-fitted: each scenario is scored by the beta of the half it did not help fit"
            if "cross_fit" in shift
            else "scored by the deployed beta"
        )
        beta = ", ".join(f"{b:.3g}" for b in shift["beta"])
        body.append(
            f"<p>Outside the training box the std widens by 1 + beta d (d: the distance to the "
            f"box in box widths; beta per output [{beta}], fitted on {shift['n_fit']} "
            f"extrapolation scenarios). The extrapolation intervals are {scored}.</p>"
        )
    for title, img in imgs:
        body.append(f"<h2>{html.escape(title)}</h2><img src='{img}'>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>twin-ml report</title></head>"
        "<body>" + "\n".join(body) + "</body></html>"
    )
    path = out_dir / "report.html"
    atomic_write_bytes(path, page.encode())
    return path
