"""Training on measured telemetry: records -> a state table from the physics -> multiple shooting
with `TelemetryModule` -> the conformal scale from the training records' free runs -> free-run
evaluation on the test records (initial state from their first samples).

    data = prepare(system, records, train=["estimation"], calibration_tail=0.2, ...)
    model = build_model(..., stats=data.stats(), ...)
    module = data.module(model, window=64, ...); trainer.fit(module, data.datamodule(50))
    result = evaluate(model, module, data, records, test=["test"], init_samples=25, ...)

Errors name the run's `telemetry.` setting at fault (they are what a user of twin-train changes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twin_ml.data.records import Records, record_inputs, record_outputs, state_table
from twin_ml.uq import ShiftFit


@dataclass
class TelemetryData:
    """The training records as arrays, on one grid: what the loss, the state table and the
    normalization see is the first `n_fit` samples; the rest (the calibration tail) is held out
    for the conformal scale."""

    names: list[str]  # the training records
    t: np.ndarray  # [T]
    u: np.ndarray  # [R, T, nu]
    y: np.ndarray  # [R, T, ny]
    mask: np.ndarray  # [R, T, ny]
    table: np.ndarray  # [R, n_fit, nx] the state table
    p: np.ndarray  # [np] the physics parameters to start from
    parameter_names: list[str]
    n_fit: int

    @property
    def fit(self) -> slice:
        return slice(0, self.n_fit)

    @property
    def held(self) -> np.ndarray:
        """[T] bool: the samples held out of training."""
        return np.arange(len(self.t)) >= self.n_fit

    @property
    def P(self) -> np.ndarray:
        """[R, np]: the parameters per record."""
        return np.repeat(self.p[None], len(self.names), axis=0)

    def stats(self) -> dict[str, list]:
        """The model's normalization statistics, from the fitted samples (masked outputs filled
        with the median of the measured ones)."""
        from twin_ml.models import compute_stats

        fit, mask, y = self.fit, self.mask, self.y
        fill = np.nan_to_num(np.nanmedian(np.where(mask[:, fit], y[:, fit], np.nan)))
        return compute_stats(
            self.table, self.u[:, fit], self.P, np.where(mask[:, fit], y[:, fit], fill), self.t[fit]
        )

    def module(self, model, **settings: Any):
        """The `TelemetryModule` for `model`, its state table started from this one; `settings`
        are TelemetryModule's (window, consistency, state_lr, ..., lr, weight_decay, ...)."""
        from twin_ml.models.module import TelemetryModule

        return TelemetryModule(model, init_states=self.table, **settings)

    def datamodule(self, iterations_per_epoch: int):
        """The fitted samples of every training record, as one batch repeated per epoch."""
        from twin_ml.data.torch_data import TelemetryDataModule

        fit = self.fit
        return TelemetryDataModule(
            self.t[fit],
            self.u[:, fit],
            self.P,
            self.y[:, fit],
            self.mask[:, fit],
            iterations_per_epoch=iterations_per_epoch,
        )


def prepare(
    system,
    loaded: Records,
    train: Sequence[str],
    *,
    parameters: Mapping[str, float] | None = None,
    calibration_tail: float = 0.0,
    initial_state: Mapping[str, float] | None = None,
    derivatives: Mapping[str, str] | None = None,
) -> TelemetryData:
    """The `train` records as arrays, with their state tables.

    parameters: the physics parameters to start from (default: the system's nominal values).
    calibration_tail: the fraction of each record's last samples held out of training for the
    conformal scale (0: calibrate in-sample), at most 0.5.
    initial_state: a guess for the hidden states at a record's start (default: the middle of
    the state's bounds), from which the physics fills the table's hidden columns.
    derivatives: {hidden state: measured output} for hidden states that are an output's time
    derivative (see `state_table`).
    """
    records, contract = loaded.records, loaded.contract
    names = list(train)
    lengths = {len(records[r].t) for r in names}
    if len(lengths) != 1:
        raise ValueError(f"telemetry.train records must have one length, got {sorted(lengths)}")
    nominal = {q.name: q.nominal for q in system.parameters}
    unknown = set(parameters or {}) - set(nominal)
    if unknown:
        raise ValueError(
            f"telemetry.parameters: unknown {sorted(unknown)}; parameters: {', '.join(nominal)}"
        )
    p = np.array([float((parameters or {}).get(k, v)) for k, v in nominal.items()])
    t = records[names[0]].t
    tail_fraction = float(calibration_tail or 0.0)
    if not 0.0 <= tail_fraction <= 0.5:
        raise ValueError(
            f"telemetry.calibration_tail must be a fraction in [0, 0.5], got {tail_fraction}"
        )
    # the records' last samples held out of training for the conformal scale (0: calibrate
    # in-sample): training (the loss, the state table, the normalization) sees the first n_fit
    # samples only
    n_fit = len(t) - int(round(tail_fraction * len(t)))
    fit = slice(0, n_fit)
    guess = dict(initial_state or {})
    us, ys, masks, tables = [], [], [], []
    for r in names:
        u = record_inputs(system, records[r])
        y, mask = record_outputs(system, contract, records[r])
        us.append(u), ys.append(y), masks.append(mask)
        tables.append(state_table(system, t[fit], u[fit], y[fit], mask[fit], p, guess, derivatives))
    u, y, mask, table = (np.stack(a) for a in (us, ys, masks, tables))
    held = np.arange(len(t)) >= n_fit
    in_tail = mask[:, held].sum(axis=(0, 1))[mask.any(axis=(0, 1))]  # per measured output
    if held.any() and in_tail.min() < 10:
        raise ValueError(
            f"telemetry.calibration_tail={tail_fraction} holds out {int(held.sum())} samples with "
            f"{in_tail.tolist()} measured points per output; the conformal scale needs at least 10 "
            f"of each (use a larger fraction, or 0 to calibrate in-sample)"
        )
    return TelemetryData(names, t, u, y, mask, table, p, list(nominal), n_fit)


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # "<split>/<record>": record metrics, learned_parameters, scale
    flat: dict[str, Any]  # "<split>/<record>/<metric>" numbers, plus test/rmse, test/coverage_90
    plots: dict[str, str]  # record -> free_run_<record>.png
    scale: np.ndarray  # the conformal scale per output, set in the model
    ranges: np.ndarray  # [nx, 2] the state ranges an initial state is searched in
    shift: ShiftFit  # no conformal shift (beta 0): records have no extrapolation split


def conformal_scale_from_free_runs(
    model, module, data: TelemetryData
) -> tuple[dict[str, dict], np.ndarray]:
    """Set the model's conformal scale from the training records' free runs (from the state
    table's first state): on their held-out tails (calibration_tail), else in-sample on every
    point. Each output on its own measured points (an unmeasured one keeps 1). Returns the free
    runs (their std scaled) and the scale."""
    from twin_ml.evaluate.telemetry import free_run
    from twin_ml.uq import conformal_scale

    names, t, p = data.names, data.t, data.p
    tt = torch.tensor(t, dtype=torch.float32)
    model.conformal_scale.fill_(1.0)
    runs = {}
    for i, r in enumerate(names):
        x0 = module.table[:, i, 0].detach()[:, None]
        runs[r] = free_run(
            model,
            x0,
            torch.tensor(data.u[i], dtype=torch.float32),
            torch.tensor(p, dtype=torch.float32),
            tt,
        )
    ys_all = np.concatenate(list(data.y))
    calib = data.held if data.held.any() else np.ones(len(t), dtype=bool)
    ms_all = np.concatenate([m & calib[:, None] for m in data.mask])
    mean_all = np.concatenate([runs[r]["mean"] for r in names])
    std_all = np.concatenate([runs[r]["std"] for r in names])
    scale = np.ones(data.y.shape[-1])
    for j in range(len(scale)):
        ok = ms_all[:, j]
        if ok.sum() >= 10:
            scale[j] = conformal_scale(
                ys_all[ok, j][None, :, None],
                mean_all[ok, j][None, :, None],
                std_all[ok, j][None, :, None],
            )[0]
    model.conformal_scale.copy_(torch.tensor(scale, dtype=torch.float32))
    for r in names:  # those runs had scale 1
        runs[r]["std"] = runs[r]["std"] * scale
    return runs, scale


def evaluate(
    model,
    module,
    data: TelemetryData,
    loaded: Records,
    test: Sequence[str],
    *,
    init_samples: int,
    out_dir: str | Path,
    title: str,
) -> Evaluation:
    """Calibrate the trained `model` (see `conformal_scale_from_free_runs`), then run it free over
    every training record (from the state table) and every `test` record (initial state from its
    first `init_samples` samples): metrics per record, the headline test/rmse (the root of the
    test records' mean MSE) and test/coverage_90, the learned physics parameters, and a plot per
    record in out_dir titled "<title>: <record> record, free run (...)"."""
    from twin_ml.evaluate.telemetry import free_run, initial_state, plot_record, record_metrics

    model.eval()
    system, records, contract = model.system, loaded.records, loaded.contract
    names, t, p = data.names, data.t, data.p
    tt = torch.tensor(t, dtype=torch.float32)
    runs, scale = conformal_scale_from_free_runs(model, module, data)
    table_np = module.table.detach().numpy()
    lo, hi = table_np.min(axis=(0, 1, 2)), table_np.max(axis=(0, 1, 2))
    ranges = np.stack([lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo)], axis=1)
    outs = system.output_names
    metrics: dict[str, Any] = {}
    plots = {}
    done: list[tuple[np.ndarray, ...]] = []  # (u, y, mask, t, pred, x0) of the test records run
    for split, recs in (("train", names), ("test", list(test))):
        for r in recs:
            tel = records[r]
            ur, (yr, mr) = record_inputs(system, tel), record_outputs(system, contract, tel)
            if split == "train":  # the free run the conformal scale came from: from the table
                x0 = module.table[:, names.index(r), 0].detach()[:, None]
                pred, how = runs[r], "initial state from the state table"
            else:
                pred, x0 = prefix_run(done, ur, yr, mr, tel.t, init_samples)
                if pred is None:
                    tr = (
                        tt
                        if len(tel.t) == len(t) and np.allclose(tel.t, t)
                        else torch.tensor(tel.t, dtype=torch.float32)
                    )
                    ut, pt = (
                        torch.tensor(ur, dtype=torch.float32),
                        torch.tensor(p, dtype=torch.float32),
                    )
                    x0 = initial_state(
                        model,
                        ut,
                        pt,
                        torch.tensor(yr, dtype=torch.float32),
                        torch.tensor(mr),
                        tr,
                        init_samples=init_samples,
                        ranges=ranges,
                    )
                    pred = free_run(model, x0, ut, pt, tr)
                how = f"initial state from the first {init_samples} samples"
                # test runs only: a train run started from the table
                done.append((ur, yr, mr, tel.t, pred, x0))
            m = record_metrics(yr, mr, pred["mean"], pred["std"], outs)
            m["initial_state"] = {
                s.name: [float(v) for v in x0[:, 0, i]] for i, s in enumerate(system.states)
            }
            metrics[f"{split}/{r}"] = m
            plots[r] = str(
                plot_record(
                    tel.t,
                    yr,
                    mr,
                    pred["mean"],
                    pred["std"],
                    outs,
                    f"{title}: {r} record, free run ({how})",
                    Path(out_dir) / f"free_run_{r}.png",
                    init_samples,
                )
            )
    flat: dict[str, Any] = {}
    for key, m in metrics.items():
        for k, v in m.items():
            if isinstance(v, (int, float)) or v is None:
                flat[f"{key}/{k}"] = v
    test_names = list(test)
    if test_names:  # the headline: free-run RMSE over the test records (the root of their mean MSE)
        # over the records that measure anything; None (null) when none does
        rmses = [metrics[f"test/{r}"]["rmse"] for r in test_names]
        rmses = [v for v in rmses if v is not None]
        flat["test/rmse"] = float(np.sqrt(np.mean(np.square(rmses)))) if rmses else None
        cov = [metrics[f"test/{r}"].get("coverage_90") for r in test_names]
        cov = [v for v in cov if v is not None]
        flat["test/coverage_90"] = float(np.mean(cov)) if cov else None
    # outputs a record does not measure: named once at the top, beside their null metrics
    notes = [f"{key}: {n}" for key, m in metrics.items() for n in m.get("notes", [])]
    if notes:
        metrics["notes"] = notes
    metrics["learned_parameters"] = learned_parameters(model, p)
    metrics["conformal_scale"] = scale.tolist()
    shift = ShiftFit.none(
        len(outs), "telemetry records have no extrapolation split: beta = 0 (intervals are not "
        "widened outside the training domain)"
    )  # fmt: skip
    metrics["conformal_shift"] = shift.summary()
    return Evaluation(metrics, flat, plots, scale, ranges, shift)


def learned_parameters(model, p: np.ndarray) -> dict[str, dict[str, Any]]:
    """{parameter: {"start": value, "members": [value per member]}} of the physics parameters a
    hybrid refined (`learn_parameters`); {} for none."""
    system = model.system
    factors = (
        torch.exp(model.log_factors).detach().numpy() if hasattr(model, "log_factors") else None
    )
    if factors is None or not factors.size:
        return {}
    names_p = [system.parameter_names[i] for i in model.learn_idx.tolist()]
    return {
        n: {
            "start": float(p[system.parameter_names.index(n)]),
            "members": (factors[:, j] * p[system.parameter_names.index(n)]).tolist(),
        }
        for j, n in enumerate(names_p)
    }


def model_metadata(
    data: TelemetryData, loaded: Records, test: Sequence[str], ranges: np.ndarray, init_samples: int
) -> dict[str, Any]:
    """model.json's `telemetry` entry: what monitoring and a later evaluation need (the contract,
    the parameters, the state and input ranges, init_samples) and which records trained it."""
    return {
        "contract": loaded.contract.model_dump(),
        "parameters": dict(zip(data.parameter_names, data.p.tolist())),
        "train": data.names,
        "test": list(test),
        "state_ranges": ranges.tolist(),
        "input_range": np.stack([data.u.min(axis=(0, 1)), data.u.max(axis=(0, 1))], 1).tolist(),
        "init_samples": int(init_samples),
    }


def prefix_run(done, u, y, mask, t, init_samples: int):
    """(pred, x0) of a record already run whose first len(t) samples are this record (the
    Silverbox's arrow without extrapolation is the full arrow's beginning): the initial state comes
    from the same first samples, so the free run is the same; (None, None) if there is none."""
    n = len(t)
    for du, dy, dm, dt_, pred, x0 in done:
        if (
            len(dt_) >= n >= init_samples
            and np.array_equal(dt_[:n] - dt_[0], t - t[0])
            and np.array_equal(du[:n], u)
            and np.array_equal(dm[:n], mask)
            and np.array_equal(np.where(mask, dy[:n], 0.0), np.where(mask, y, 0.0))
        ):
            return {k: v[:, :n] if v.ndim == 3 else v[:n] for k, v in pred.items()}, x0
    return None, None
