"""Residual-based drift detection (torch-free: the server and clients use it too).

A model predicts a telemetry stream window by window (short horizons from re-estimated states, so
the model's own long-horizon error does not pile up); the measured outputs' residuals are
normalized by the predicted std, z = (y - mean) / std. Per window of `window` steps the detector
takes two statistics per output, standardized by a clean reference record (the same procedure on
data known to be healthy, e.g. the training record):

    level  = mean of z over the window             (a bias or gain change shifts it)
    spread = log of the RMS of z over the window    (a time skew or noise inflates it; the log
                                                     makes its skewed distribution near-symmetric)

and runs a two-sided CUSUM on each standardized level and a one-sided CUSUM on each standardized
spread (slack `slack`, alarm at `threshold`; both in reference standard deviations). Window
statistics are what make the reference meaningful: consecutive residuals of a dynamical model are
strongly correlated, so a per-sample CUSUM tuned for independent noise alarms on healthy data.
Input-domain drift: the share of input samples outside the training range (plus `margin` of its
width) per window; a window above `max_outside` raises an input alarm.

An output the stream (or the reference) does not measure at all is not monitored: the report says
so in a note, with null statistics; a window without a measured point has null statistics and
leaves the CUSUM as it was. The report holds no NaN (it is written as strict JSON).

`Fault` / `inject` put known sensor faults into a clean record (to test a monitor on real data):
a bias (added), a gain change (multiplied) or a time skew (the signal arrives `size` samples late),
each from an onset time on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DriftSettings:
    window: int = 32  # steps per monitoring window
    slack: float = 1.0  # CUSUM allowance k (reference stds)
    threshold: float = 6.0  # CUSUM alarm level h (reference stds)
    margin: float = 0.05  # input range margin, as a share of the training range's width
    max_outside: float = (
        0.2  # share of a window's inputs outside the range that raises an input alarm
    )

    def check(self) -> DriftSettings:
        if self.window < 2:
            raise ValueError(f"drift.window must be >= 2 steps, got {self.window}")
        for name in ("slack", "threshold", "margin"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"drift.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.max_outside <= 1:
            raise ValueError(f"drift.max_outside must be in [0, 1], got {self.max_outside}")
        return self


FAULT_KINDS = ("bias", "gain", "skew")
REFERENCE_WINDOWS = (
    25  # windows of a stream's own start taken as its clean reference (SPC's 20-25 subgroups)
)


@dataclass(frozen=True)
class Fault:
    """A sensor fault from `onset_s` (seconds after the record's start) on: bias adds `size` (in the
    signal's unit), gain multiplies by `size`, skew delays the signal by `size` samples."""

    kind: str
    signal: str
    size: float
    onset_s: float

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """'KIND:SIGNAL:SIZE@ONSET_S', e.g. 'bias:h2:0.5@2000' or 'skew:y:3@10.0'."""
        head, at, onset = spec.partition("@")
        parts = head.split(":")
        if not at or len(parts) != 3:
            raise ValueError(
                f"inject: {spec!r} must be KIND:SIGNAL:SIZE@ONSET_S "
                f"(kinds: {', '.join(FAULT_KINDS)})"
            )
        try:
            fault = cls(parts[0], parts[1], float(parts[2]), float(onset))
        except ValueError:
            raise ValueError(f"inject: {spec!r}: SIZE and ONSET_S must be numbers") from None
        if fault.kind not in FAULT_KINDS:
            raise ValueError(
                f"inject: kind {fault.kind!r} is unknown; kinds: {', '.join(FAULT_KINDS)}"
            )
        if fault.kind == "skew" and (fault.size != int(fault.size) or fault.size < 1):
            raise ValueError(
                f"inject: a skew's SIZE is a whole number of samples >= 1, got {parts[2]}"
            )
        if fault.onset_s < 0:
            raise ValueError(f"inject: ONSET_S must be >= 0, got {onset}")
        return fault


def inject(
    y: np.ndarray, mask: np.ndarray, t: np.ndarray, names: list[str], faults: list[Fault]
) -> tuple[np.ndarray, np.ndarray]:
    """(y, mask) [T, ny] with the faults applied to the named outputs (copies; the input is kept).
    A skewed sample takes the value and the mask of the sample `size` steps earlier."""
    y, mask = y.copy(), mask.copy()
    for f in faults:
        if f.signal not in names:
            raise ValueError(
                f"inject: signal {f.signal!r} is not a monitored output; "
                f"outputs: {', '.join(names)}"
            )
        j, k = (
            names.index(f.signal),
            int(np.searchsorted(t - t[0], f.onset_s - 1e-9 * max(1.0, abs(f.onset_s)))),
        )
        if k >= len(t):
            raise ValueError(
                f"inject: onset {f.onset_s} s is after the record's end ({t[-1] - t[0]:.6g} s)"
            )
        if f.kind == "bias":
            y[k:, j] += f.size
        elif f.kind == "gain":
            y[k:, j] *= f.size
        else:
            d = int(f.size)
            src = np.maximum(np.arange(k, len(t)) - d, 0)
            y[k:, j], mask[k:, j] = y[src, j], mask[src, j]
    return y, mask


def window_statistics(
    y: np.ndarray, mask: np.ndarray, mean: np.ndarray, std: np.ndarray, window: int
) -> dict[str, np.ndarray]:
    """Per window (full windows only) and output: level = mean z, spread = log RMS z, n = points
    used (measured: mask, and finite y). y, mask, mean, std: [T, ny]. A window without a measured
    point has NaN statistics (n = 0)."""
    ok = np.asarray(mask, dtype=bool) & np.isfinite(y)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(ok, (y - mean) / np.maximum(std, 1e-12), np.nan)
    n_w = len(z) // window
    zw = z[: n_w * window].reshape(n_w, window, -1)
    n = np.sum(~np.isnan(zw), axis=1)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a window without a measured point
        level = np.nanmean(zw, axis=1) if n_w else np.zeros((0, z.shape[1]))
        spread = (
            0.5 * np.log(np.maximum(np.nanmean(zw**2, axis=1), 1e-24))
            if n_w
            else np.zeros((0, z.shape[1]))
        )
    return {"level": level, "spread": spread, "n": n}


def reference(stats: dict[str, np.ndarray]) -> dict[str, list[float | None]]:
    """Location and scale of the window statistics on clean data (per output; None for an output
    without a measured point in any of the reference's windows)."""
    level, spread = stats["level"], stats["spread"]
    if len(level) < 3:
        raise ValueError(f"the reference needs >= 3 full windows, got {len(level)}")
    seen = np.isfinite(level).any(axis=0)

    def per_output(values: np.ndarray) -> list[float | None]:
        return [float(v) if ok else None for v, ok in zip(values, seen)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an output without a measured point
        return {
            "level_mean": per_output(np.nanmean(level, axis=0)),
            "level_std": per_output(np.maximum(np.nanstd(level, axis=0), 1e-6)),
            "spread_mean": per_output(np.nanmean(spread, axis=0)),
            "spread_std": per_output(np.maximum(np.nanstd(spread, axis=0), 1e-6)),
            "windows": int(len(level)),
        }


def _listed(values: np.ndarray) -> list[float | None]:
    """A series for the report: NaN (a window without a measured point) as None."""
    return [float(v) if np.isfinite(v) else None for v in values]


def cusum(
    x: np.ndarray, slack: float, threshold: float, two_sided: bool = True
) -> tuple[np.ndarray, int | None]:
    """CUSUM of a standardized series x [n]: the statistic max(S+, S-) per step (not reset by an
    alarm) and the index of the first alarm (None if none). NaN steps leave the sums unchanged."""
    s_hi = s_lo = 0.0
    out = np.zeros(len(x))
    first = None
    for i, v in enumerate(x):
        s_hi, s_lo = cusum_step(s_hi, s_lo, v, slack, two_sided)
        out[i] = max(s_hi, s_lo)
        if out[i] > threshold and first is None:
            first = i
    return out, first


def cusum_step(
    s_hi: float, s_lo: float, v: float, slack: float, two_sided: bool = True
) -> tuple[float, float]:
    """One step of `cusum`: the upper and lower sums after the standardized value v (NaN: kept),
    for a monitor that sees its series one value at a time (a live twin's innovations)."""
    if not np.isfinite(v):
        return s_hi, s_lo
    return max(0.0, s_hi + v - slack), (max(0.0, s_lo - v - slack) if two_sided else 0.0)


def detect(
    y: np.ndarray,
    mask: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    ref: dict[str, Any],
    names: list[str],
    settings: DriftSettings = DriftSettings(),
    *,
    u: np.ndarray | None = None,
    input_range: np.ndarray | None = None,
    input_names: list[str] | None = None,
    period: float = 1.0,
) -> dict[str, Any]:
    """The drift report of one stream: per output the CUSUM statistics per window and the first
    alarm (window index and time), plus the input-domain check. `ref` from `reference`."""
    settings.check()
    w = settings.window
    stats = window_statistics(y, mask, mean, std, w)
    report: dict[str, Any] = {
        "window": w,
        "windows": int(len(stats["level"])),
        "settings": settings.__dict__,
        "outputs": {},
        "alarms": [],
    }
    notes = []
    for j, name in enumerate(names):
        absent = (
            "the stream"
            if not (stats["n"][:, j] > 0).any()
            else "the reference"
            if any(_missing(ref[k][j]) for k in ("level_mean", "level_std"))
            else None
        )
        if absent:  # nothing to compare: the output is not monitored, and the report says so
            note = f"{name}: not monitored: {absent} has no measured point of it"
            notes.append(note)
            report["outputs"][name] = {
                "monitored": False,
                "note": note,
                "level": [None] * len(stats["level"]),
                "spread": [None] * len(stats["level"]),
                "cusum_level": [None] * len(stats["level"]),
                "cusum_spread": [None] * len(stats["level"]),
                "first_alarm_window": None,
            }
            continue
        lvl = (stats["level"][:, j] - ref["level_mean"][j]) / ref["level_std"][j]
        spr = (stats["spread"][:, j] - ref["spread_mean"][j]) / ref["spread_std"][j]
        c_lvl, a_lvl = cusum(lvl, settings.slack, settings.threshold, two_sided=True)
        c_spr, a_spr = cusum(spr, settings.slack, settings.threshold, two_sided=False)
        report["outputs"][name] = {
            "monitored": True,
            "level": _listed(lvl),
            "spread": _listed(spr),
            "cusum_level": c_lvl.tolist(),
            "cusum_spread": c_spr.tolist(),
            "first_alarm_window": None,
        }
        firsts = [(a, kind) for a, kind in ((a_lvl, "level"), (a_spr, "spread")) if a is not None]
        if firsts:
            a, kind = min(firsts)
            report["outputs"][name]["first_alarm_window"] = int(a)
            report["alarms"].append(
                {
                    "signal": name,
                    "kind": kind,
                    "window": int(a),
                    "time_s": float((a + 1) * w * period),
                }
            )
    if u is not None and input_range is not None:
        lo, hi = input_range[:, 0], input_range[:, 1]
        pad = settings.margin * (hi - lo)
        outside = (u < lo - pad) | (u > hi + pad)  # [T, nu]
        n_w = len(u) // w
        share = outside[: n_w * w].reshape(n_w, w, -1).mean(axis=1)  # [W, nu]
        report["inputs"] = {}
        for j, name in enumerate(input_names or [f"u{j}" for j in range(u.shape[1])]):
            bad = np.flatnonzero(share[:, j] > settings.max_outside)
            report["inputs"][name] = {
                "outside_share": share[:, j].tolist(),
                "first_alarm_window": int(bad[0]) if len(bad) else None,
            }
            if len(bad):
                report["alarms"].append(
                    {
                        "signal": name,
                        "kind": "input_domain",
                        "window": int(bad[0]),
                        "time_s": float((bad[0] + 1) * w * period),
                    }
                )
    report["alarms"].sort(key=lambda a: a["window"])
    report["drift"] = bool(report["alarms"])
    if notes:
        report["notes"] = notes
    return report


def _missing(v) -> bool:
    return v is None or not np.isfinite(v)


def band_panel(
    ax, t: np.ndarray, y: np.ndarray, ok: np.ndarray, mean: np.ndarray, std: np.ndarray, label: str
) -> None:
    """One output on a matplotlib axis: measured points (where `ok`), the prediction and its 90%
    band."""
    ax.plot(t[ok], y[ok], ".", ms=2.5, color="k", label="measured")
    ax.plot(t, mean, color="C0", lw=1.2, label=label)
    ax.fill_between(
        t, mean - 1.645 * std, mean + 1.645 * std, color="C0", alpha=0.25, lw=0, label="90% band"
    )


def plot_report(
    report: dict[str, Any],
    t: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    names: list[str],
    path: str | Path,
    *,
    title: str = "",
    onsets: list[float] | None = None,
) -> Path:
    """Per output: measured against predicted (90% band), and the CUSUM statistics per window
    against the threshold, alarms marked; `onsets` (s) marks injected faults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, thr = report["window"], report["settings"]["threshold"]
    tw = t[0] + (np.arange(report["windows"]) + 1) * w * (t[1] - t[0])  # each window's end
    fig, axes = plt.subplots(
        2 * len(names), 1, figsize=(10, 2.6 * 2 * len(names)), squeeze=False, sharex=True
    )
    for j, name in enumerate(names):
        ax, axc = axes[2 * j, 0], axes[2 * j + 1, 0]
        ok = np.asarray(mask[:, j], dtype=bool) & np.isfinite(y[:, j])
        band_panel(ax, t, y[:, j], ok, mean[:, j], std[:, j], "predicted")
        ax.set_ylabel(name)
        out = report["outputs"][name]
        if out.get("monitored", True):
            axc.step(tw, out["cusum_level"], where="post", color="C1", label="CUSUM level")
            axc.step(tw, out["cusum_spread"], where="post", color="C2", label="CUSUM spread")
            axc.axhline(thr, color="r", ls="--", lw=1, label="threshold")
            axc.set_yscale("symlog", linthresh=thr)
        else:
            ax.set_title(f"{name}: not measured (prediction only)", fontsize=9)
            axc.text(0.5, 0.5, "not monitored", transform=axc.transAxes, ha="center", va="center")
        axc.set_ylabel("CUSUM [ref. std]")
        for a in (ax, axc):
            for o in onsets or []:
                a.axvline(t[0] + o, color="m", lw=1, ls=":", label="injected fault")
            for alarm in report["alarms"]:
                if alarm["signal"] == name:
                    a.axvline(
                        t[0] + alarm["time_s"], color="r", lw=1.5, alpha=0.6, label="first alarm"
                    )
                    break
            if a.get_legend_handles_labels()[0]:
                a.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("time [s]")
    fig.suptitle(
        title
        or (
            "drift: "
            + (", ".join(f"{a['signal']} {a['kind']}" for a in report["alarms"]) or "none")
        ),
        fontsize=10,
    )
    fig.tight_layout()
    from twin_ml._io import save_figure

    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return Path(path)
