"""Evaluate an ODE surrogate on a measured record: the benchmark's free-run simulation.

The initial state is estimated from the first `init_samples` samples only (what the Cascaded Tanks
benchmark allows): states that are outputs start at their measured value; the others (hidden) are
searched per member, on a grid for one hidden state, by Adam for more. Then every member runs
free over the whole record; the metric is the RMSE of the ensemble mean over all (unmasked)
points of the record, beside the 90% interval coverage and width.

A record may measure only some of the model's outputs (the contract leaves one out, or a signal is
masked or NaN throughout): every metric is taken over the measured points only, and an output
without any is reported as null with a note (never NaN), and plotted as "not measured".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from twin_ml.uq import interval_report


def _x0_with(
    model,
    y0: torch.Tensor,
    hidden_values: torch.Tensor,
    hidden: list[int],
    observed: dict[int, int],
):
    """x0 [M, B, nx]: observed states from y0 [ny], hidden ones from hidden_values
    [M, B, n_hidden]."""
    m, b = hidden_values.shape[0], hidden_values.shape[1]
    cols = []
    for i in range(model.nx):
        if i in observed:
            cols.append(y0[observed[i]].expand(m, b))
        else:
            cols.append(hidden_values[..., hidden.index(i)])
    return torch.stack(cols, dim=-1)


def state_layout(model) -> tuple[list[int], dict[int, int]]:
    """(hidden state indices, {state index: output index} for states measured as outputs)."""
    outs = model.system.output_names
    observed = {i: outs.index(s.name) for i, s in enumerate(model.system.states) if s.name in outs}
    return [i for i in range(model.nx) if i not in observed], observed


@torch.no_grad()
def _first_errors(model, x0, u, p, t, y, mask):
    _, ym = model(x0, u.expand(x0.shape[1], -1, -1), p.expand(x0.shape[1], -1), t)
    ok = mask.to(ym.dtype)
    return (((ym - y) ** 2) * ok).sum(dim=(2, 3)) / ok.sum().clamp_min(1.0)  # [M, B]


def initial_state(
    model,
    u: torch.Tensor,
    p: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    t: torch.Tensor,
    *,
    init_samples: int,
    ranges: np.ndarray,
    grid: int = 121,
) -> torch.Tensor:
    """x0 [M, 1, nx] per member from the record's first `init_samples` samples (u [T, nu], p [np],
    y [T, ny], mask [T, ny]); `ranges` [nx, 2] bound the hidden states' search."""
    hidden, observed = state_layout(model)
    # a measured state whose first sample is masked is searched for like a hidden one
    observed = {i: j for i, j in observed.items() if bool(mask[0, j])}
    hidden = [i for i in range(model.nx) if i not in observed]
    n = min(init_samples, len(t))
    uu, yy, mm, tt = u[None, :n], y[:n], mask[:n], t[:n]
    if not hidden:
        return _x0_with(model, y[0], torch.zeros(model.members, 1, 0), hidden, observed)
    if len(hidden) == 1:
        lo, hi = ranges[hidden[0]]
        cand = torch.linspace(float(lo), float(hi), grid, dtype=torch.float32)
        x0 = _x0_with(
            model, y[0], cand[None, :, None].expand(model.members, -1, 1), hidden, observed
        )
        err = _first_errors(model, x0, uu, p[None], tt, yy, mm)  # [M, grid]
        best = cand[err.argmin(dim=1)]
        return _x0_with(model, y[0], best[:, None, None], hidden, observed)
    start = torch.tensor([(ranges[i][0] + ranges[i][1]) / 2 for i in hidden], dtype=torch.float32)
    h = torch.nn.Parameter(start[None, None].repeat(model.members, 1, 1))
    opt = torch.optim.Adam([h], lr=0.05 * float(np.max(ranges[:, 1] - ranges[:, 0])))
    with torch.enable_grad():  # callers may run under no_grad
        for _ in range(150):
            opt.zero_grad()
            x0 = _x0_with(model, y[0], h, hidden, observed)
            _, ym = model(x0, uu, p[None], tt)
            ((((ym - yy) ** 2) * mm).sum()).backward()
            opt.step()
    return _x0_with(model, y[0], h.detach(), hidden, observed)


@torch.no_grad()
def free_run(
    model, x0: torch.Tensor, u: torch.Tensor, p: torch.Tensor, t: torch.Tensor
) -> dict[str, np.ndarray]:
    """Mean, calibrated std [T, ny] and members [M, T, ny] of per-member free runs from
    x0 [M, 1, nx]."""
    pred = model.predict(x0, u[None], p[None], t)
    return {
        k: v[..., 0, :, :].numpy().astype(np.float64)
        if k in ("members", "states")
        else v[0].numpy().astype(np.float64)
        for k, v in pred.items()
    }


@torch.no_grad()
def windowed_run(
    model,
    u: torch.Tensor,
    p: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    t: torch.Tensor,
    *,
    window: int,
    init_samples: int,
    ranges: np.ndarray,
) -> dict[str, np.ndarray]:
    """Predictions window by window, as a monitor makes them: each window starts from the measured
    values of the measured states (where not masked) and, for the hidden ones, each member's own
    prediction carried over from the previous window (the first window: `initial_state`). Short
    horizons keep the model's long-run error from piling up, while a sensor fault still shows:
    the prediction runs from the (faulty) measurement at the window's start towards what the
    inputs and the physics imply. Returns mean and std [T, ny]."""
    hidden, observed = state_layout(model)
    n_t = len(t)
    x0 = initial_state(model, u, p, y, mask, t, init_samples=init_samples, ranges=ranges)
    mean = np.zeros((n_t, model.ny))
    std = np.zeros((n_t, model.ny))
    for s in range(0, n_t - 1, window):
        e = min(s + window, n_t - 1)
        if s > 0:
            x0 = x0.clone()
            for i, j in observed.items():
                if bool(mask[s, j]):
                    x0[:, 0, i] = y[s, j]
        pred = model.predict(x0, u[None, s : e + 1], p[None], t[s : e + 1] - t[s])
        mean[s : e + 1] = pred["mean"][0].numpy()
        std[s : e + 1] = pred["std"][0].numpy()
        x0 = pred["states"][:, :, -1:].reshape(model.members, 1, model.nx)
    return {"mean": mean, "std": std}


def monitor(
    model,
    u: np.ndarray,
    p: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray,
    t: np.ndarray,
    *,
    settings,
    horizon: int | None,
    init_samples: int,
    ranges: np.ndarray,
    input_range: np.ndarray | None = None,
    reference_record: dict[str, np.ndarray] | None = None,
    reference_windows: int | None = None,
) -> dict[str, Any]:
    """Replay a record (u [T, nu], y/mask [T, ny], t [T]) against a model and detect drift.

    Predictions: `windowed_run` with the measured states reset every `horizon` steps (None: one
    free run over the record). The detector's reference (`twin_ml.drift.reference`) comes from
    `reference_record` (a clean record: {"u", "y", "mask", "t"}, predicted the same way) or, without
    one, from the stream's own first `reference_windows` windows (default `REFERENCE_WINDOWS`),
    which are then assumed healthy.
    Returns the drift report with the predictions (mean, std [T, ny])."""
    from twin_ml.drift import REFERENCE_WINDOWS, detect, reference, window_statistics

    settings = settings.check()
    reference_windows = REFERENCE_WINDOWS if reference_windows is None else reference_windows
    names = model.system.output_names

    def predict(uu, yy, mm, tt):
        n = len(tt) if horizon is None else int(horizon)
        return windowed_run(
            model,
            *(torch.tensor(a, dtype=torch.float32) for a in (uu, p, yy)),
            torch.tensor(mm),
            torch.tensor(tt, dtype=torch.float32),
            window=max(1, min(n, len(tt) - 1)),
            init_samples=init_samples,
            ranges=ranges,
        )

    pred = predict(u, y, mask, t)
    if reference_record is not None:
        r = reference_record
        rp = predict(r["u"], r["y"], r["mask"], r["t"])
        ref = reference(
            window_statistics(r["y"], r["mask"], rp["mean"], rp["std"], settings.window)
        )
        ref["source"] = "reference record"
    else:
        stats = window_statistics(y, mask, pred["mean"], pred["std"], settings.window)
        if len(stats["level"]) <= reference_windows:
            raise ValueError(
                f"reference_windows={reference_windows}: the stream has only {len(stats['level'])} "
                f"full windows of {settings.window} steps; give a reference record or fewer windows"
            )
        ref = reference({k: v[:reference_windows] for k, v in stats.items()})
        ref["source"] = f"the stream's first {reference_windows} windows"
    report = detect(
        y,
        mask,
        pred["mean"],
        pred["std"],
        ref,
        names,
        settings,
        u=u,
        input_range=input_range,
        input_names=model.system.input_names,
        period=float(t[1] - t[0]),
    )
    report["reference"] = ref
    report["horizon"] = horizon
    return {"report": report, "mean": pred["mean"], "std": pred["std"]}


def not_measured_note(name: str) -> str:
    return f"{name}: not measured in this record (no usable point); its metrics are null"


def record_metrics(
    y: np.ndarray, mask: np.ndarray, mean: np.ndarray, std: np.ndarray, names: list[str]
) -> dict[str, Any]:
    """Over the measured points (mask, and finite y) of y [T, ny]: the RMSE per output and overall,
    the interval report (coverage_50/90/95, widths, NLL, CRPS) over all measured points, and per
    output under "outputs" ({name: {"points", "rmse", coverage, ...}}) with rmse_<name> and
    coverage_90_<name> also at the top. An output with no measured point has null metrics and a
    line in "notes"."""
    ok = np.asarray(mask, dtype=bool) & np.isfinite(y)
    out: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    sq = []
    for j, name in enumerate(names):
        okj = ok[:, j]
        e2 = (mean[okj, j] - y[okj, j]) ** 2
        rmse = float(np.sqrt(e2.mean())) if okj.any() else None
        per[name] = {
            "points": int(okj.sum()),
            "rmse": rmse,
            **interval_report(y[:, j], mean[:, j], std[:, j], mask=okj),
        }
        if not okj.any():
            per[name]["note"] = not_measured_note(name)
            notes.append(per[name]["note"])
        out[f"rmse_{name}"] = rmse
        out[f"coverage_90_{name}"] = per[name]["coverage_90"]
        sq.append(e2)
    all_sq = np.concatenate(sq)
    out["rmse"] = float(np.sqrt(all_sq.mean())) if all_sq.size else None
    out["points"] = int(ok.sum())
    out.update(interval_report(y, mean, std, mask=ok))
    out["outputs"] = per
    if notes:
        out["notes"] = notes
    return out


def plot_record(
    t: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    names: list[str],
    title: str,
    path: str | Path,
    init_samples: int = 0,
) -> Path:
    """Measured outputs against the free run's mean and 90% band (the initial-state window
    shaded); an output with no measured point shows its prediction, titled "not measured"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from twin_ml.drift import band_panel

    fig, axes = plt.subplots(
        2 * len(names),
        1,
        figsize=(10, 4.6 * len(names)),
        squeeze=False,
        sharex=True,
        gridspec_kw={"height_ratios": [3, 2] * len(names)},
    )
    for j, name in enumerate(names):
        ax, axr = axes[2 * j, 0], axes[2 * j + 1, 0]
        ok = np.asarray(mask[:, j], dtype=bool) & np.isfinite(y[:, j])
        band_panel(ax, t, y[:, j], ok, mean[:, j], std[:, j], "free run (ensemble mean)")
        # the error against the band's half-width: what a long, dense record hides in the top panel
        axr.fill_between(
            t, -1.645 * std[:, j], 1.645 * std[:, j], color="C0", alpha=0.25, lw=0, label="90% band"
        )
        axr.plot(t[ok], y[ok, j] - mean[ok, j], lw=0.6, color="C3", label="measured - mean")
        axr.axhline(0.0, color="0.5", lw=0.6)
        axr.set_ylabel(f"{name} error")
        if init_samples:
            for a in (ax, axr):
                a.axvspan(
                    t[0],
                    t[min(init_samples, len(t)) - 1],
                    color="0.85",
                    lw=0,
                    label="initial-state window" if a is ax else None,
                )
        if ok.any():
            rmse = float(np.sqrt(np.mean((mean[ok, j] - y[ok, j]) ** 2)))
            ax.set_title(f"{name}: RMSE {rmse:.3g}", fontsize=9)
        else:
            ax.set_title(f"{name}: not measured in this record (prediction only)", fontsize=9)
            axr.text(0.5, 0.5, "not measured", transform=axr.transAxes, ha="center", va="center")
        ax.legend(loc="upper right", fontsize=7)
        axr.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("time [s]")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    from twin_ml._io import save_figure

    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)
