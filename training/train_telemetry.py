"""twin-train on measured telemetry (`telemetry:` in the config, e.g. experiment=cascaded_tanks_real):
records -> contract check and alignment -> a state table from the physics -> multiple shooting
with `TelemetryModule` -> free-run evaluation on the test records (initial state from their first
samples) -> metrics.json, model/, plots, summary.json.

The telemetry section:
  dataset     a real dataset under data/real/ (cascaded_tanks, silverbox), converted on the fly; or
  files       {record: telemetry file} (Parquet/CSV, see twin-ingest)
  contract    configs/contract/<name>.yaml (signals must match the system's inputs and outputs)
  train/test  record names; `train` records are fitted, `test` records are only evaluated
  parameters  the physics parameters to start from (default: the system's nominal values); the
              hybrid's `learn_parameters` refine them jointly with the residual
  initial_state  a guess for hidden states at a record's start (default: the middle of the state's
              bounds); the physics simulated from it fills the state table's hidden columns
  derivatives  {hidden state: measured output} for hidden states that are an output's time
              derivative (a velocity): their column starts as the output's central difference, and
              when every hidden state is covered no physics simulation is needed
  window, consistency, state_lr, iterations_per_epoch, windows_per_step, val_steps: see
              twin_ml.models.module.TelemetryModule
  init_samples  samples of a test record used to estimate its initial state
  max_seconds  a wall-clock budget for fitting (Lightning's max_time); evaluation follows
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from training._common import CONFIG_DIR
from twin_ml._io import (
    atomic_write_bytes,
    atomic_write_json,
    remove_stale_temps,
    sha256_bytes,
    sha256_file,
)

log = logging.getLogger("twin-train")
ROOT = Path(__file__).resolve().parent.parent


def load_records(tcfg: DictConfig, system) -> dict[str, Any]:
    """{record: Telemetry} for the train and test records, checked against the contract and the system."""
    from twin_ml.data import real
    from twin_ml.data.telemetry import Contract, ingest, read_telemetry

    contract = Contract.load(Path(CONFIG_DIR) / "contract" / f"{tcfg.contract}.yaml")
    if contract.names("input") != system.input_names:
        raise ValueError(
            f"telemetry.contract {tcfg.contract}: inputs {contract.names('input')} must be the "
            f"system's inputs {system.input_names}, in order"
        )
    unknown = set(contract.names("output")) - set(system.output_names)
    if unknown or not contract.names("output"):
        raise ValueError(
            f"telemetry.contract {tcfg.contract}: outputs {contract.names('output')} must be among "
            f"the system's outputs {system.output_names}"
        )
    wanted = list(tcfg.train) + list(tcfg.test)
    if tcfg.get("files"):
        frames = {r: read_telemetry(f) for r, f in tcfg.files.items() if r in wanted}
        source = {r: sha256_file(f) for r, f in tcfg.files.items() if r in wanted}
    elif tcfg.get("dataset"):
        name = tcfg.dataset
        if name not in real.SOURCES:
            raise ValueError(
                f"telemetry.dataset={name!r} is unknown; known: {', '.join(real.SOURCES)}"
            )
        frames = real.records(name, ROOT / "data" / "real" / name / real.SOURCES[name]["file"])
        source = {r: real.SOURCES[name]["sha256"] for r in frames}
    else:
        raise ValueError("telemetry: give dataset=<name> or files={record: path}")
    missing = [r for r in wanted if r not in frames]
    if missing:
        raise ValueError(f"telemetry: records {missing} not found; available: {', '.join(frames)}")
    if abs(contract.period_s - float(tcfg.dt)) > 1e-9 * contract.period_s:
        raise ValueError(
            f"telemetry.dt ({tcfg.dt}) must equal the contract's period ({contract.period_s})"
        )
    return {
        "records": {r: ingest(frames[r], contract) for r in wanted},
        "contract": contract,
        "sha256": source,
    }


def _full_outputs(system, contract, tel) -> tuple[np.ndarray, np.ndarray]:
    """y [T, ny], mask [T, ny] in the system's output order (outputs the contract lacks: masked)."""
    y = np.zeros((len(tel.t), len(system.output_names)))
    mask = np.zeros_like(y, dtype=bool)
    for j, name in enumerate(system.output_names):
        if name in contract.names():
            v, ok = tel.signal(name)
            y[:, j], mask[:, j] = np.where(ok, v, 0.0), ok
    return y, mask


def _inputs(system, tel) -> np.ndarray:
    """u [T, nu]; masked input points are filled by holding the last valid value (a model needs them)."""
    u = np.zeros((len(tel.t), len(system.input_names)))
    for j, name in enumerate(system.input_names):
        v, ok = tel.signal(name)
        if not ok.any():
            raise ValueError(f"telemetry: input {name!r} has no usable sample")
        s = np.where(ok, v, np.nan)
        idx = np.where(ok, np.arange(len(s)), 0)
        np.maximum.accumulate(idx, out=idx)
        filled = s[idx]
        filled[: np.argmax(ok)] = s[np.argmax(ok)]
        u[:, j] = filled
    return u


def state_table(
    system, t, u, y, mask, p, guess: dict[str, float], derivatives: dict[str, str] | None = None
) -> np.ndarray:
    """[T, nx]: the physics simulated along the record from a guessed start (hidden states), with
    the measured values in place for states that are measured outputs, and the central difference
    of a measured output for hidden states named in `derivatives` ({state: output})."""
    from twin_ml.physics import SolverSettings, solve_looped

    outs, states = system.output_names, system.state_names
    derivatives = dict(derivatives or {})
    for st, out in derivatives.items():
        if st not in states or out not in outs:
            raise ValueError(
                f"telemetry.derivatives: {st!r}: {out!r} must map a state ({', '.join(states)}) to a "
                f"measured output ({', '.join(outs)})"
            )
    x0 = np.array(
        [
            y[0, outs.index(s.name)]
            if s.name in outs and mask[0, outs.index(s.name)]
            else guess.get(s.name, 0.5 * (s.bounds[0] + s.bounds[1]))
            for s in system.states
        ]
    )
    if all(s.name in outs or s.name in derivatives for s in system.states):
        x = np.repeat(x0[None], len(t), axis=0)
        for i, s in enumerate(system.states):  # masked samples of a measured state: interpolated
            ok = mask[:, outs.index(s.name)] if s.name in outs else None
            if ok is not None and ok.sum() >= 2:
                x[:, i] = np.interp(t, t[ok], y[ok, outs.index(s.name)])
    else:  # an input interpolated between samples costs the adaptive solver steps at every sample
        res = solve_looped(
            system,
            t,
            u[None],
            p[None],
            x0[None],
            SolverSettings(max_rhs_evals=max(200_000, 200 * len(t))),
        )
        x = res.x[0] if res.status[0] == 0 else np.repeat(x0[None], len(t), axis=0)
        x = np.where(np.isfinite(x), x, x0[None])
    for st, out in derivatives.items():
        j = outs.index(out)
        ok = mask[:, j]
        filled = np.interp(t, t[ok], y[ok, j]) if ok.sum() >= 2 else np.zeros(len(t))
        x[:, states.index(st)] = np.gradient(filled, t)
    for i, s in enumerate(system.states):
        if s.name in outs:
            j = outs.index(s.name)
            x[:, i] = np.where(mask[:, j], y[:, j], x[:, i])
    return x


def train_telemetry(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    import lightning as L
    import torch

    from twin_ml.data.torch_data import TelemetryDataModule
    from twin_ml.evaluate.telemetry import free_run, initial_state, plot_record, record_metrics
    from twin_ml.models import compute_stats
    from twin_ml.models.checkpoint import AtomicCheckpointIO
    from twin_ml.models.module import TelemetryModule
    from twin_ml.uq import conformal_scale

    t_start = time.perf_counter()
    tcfg = cfg.telemetry
    out_dir = Path(cfg.out_dir)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.set_flush_denormal(True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    system = hydra.utils.instantiate(cfg.system, _convert_="all")
    loaded = load_records(tcfg, system)
    records, contract = loaded["records"], loaded["contract"]
    names = list(tcfg.train)
    lengths = {len(records[r].t) for r in names}
    if len(lengths) != 1:
        raise ValueError(f"telemetry.train records must have one length, got {sorted(lengths)}")
    nominal = {q.name: q.nominal for q in system.parameters}
    unknown = set(tcfg.get("parameters") or {}) - set(nominal)
    if unknown:
        raise ValueError(
            f"telemetry.parameters: unknown {sorted(unknown)}; parameters: {', '.join(nominal)}"
        )
    p = np.array([float((tcfg.get("parameters") or {}).get(k, v)) for k, v in nominal.items()])
    t = records[names[0]].t
    tail_fraction = float(tcfg.get("calibration_tail") or 0.0)
    if not 0.0 <= tail_fraction <= 0.5:
        raise ValueError(
            f"telemetry.calibration_tail must be a fraction in [0, 0.5], got {tail_fraction}"
        )
    # the records' last samples held out of training for the conformal scale (0: calibrate in-sample):
    # training (the loss, the state table, the normalization) sees the first n_fit samples only
    n_fit = len(t) - int(round(tail_fraction * len(t)))
    fit = slice(0, n_fit)
    guess = dict(tcfg.get("initial_state") or {})
    us, ys, masks, tables = [], [], [], []
    for r in names:
        u = _inputs(system, records[r])
        y, mask = _full_outputs(system, contract, records[r])
        us.append(u), ys.append(y), masks.append(mask)
        tables.append(
            state_table(
                system, t[fit], u[fit], y[fit], mask[fit], p, guess, tcfg.get("derivatives")
            )
        )
    u, y, mask, table = (np.stack(a) for a in (us, ys, masks, tables))
    held = np.arange(len(t)) >= n_fit
    in_tail = mask[:, held].sum(axis=(0, 1))[mask.any(axis=(0, 1))]  # per measured output
    if held.any() and in_tail.min() < 10:
        raise ValueError(
            f"telemetry.calibration_tail={tail_fraction} holds out {int(held.sum())} samples with "
            f"{in_tail.tolist()} measured points per output; the conformal scale needs at least 10 "
            f"of each (use a larger fraction, or 0 to calibrate in-sample)"
        )
    P = np.repeat(p[None], len(names), axis=0)
    fill = np.nan_to_num(np.nanmedian(np.where(mask[:, fit], y[:, fit], np.nan)))
    stats = compute_stats(table, u[:, fit], P, np.where(mask[:, fit], y[:, fit], fill), t[fit])
    log.info(
        f"Instantiating model <{cfg.model.net.kind}> x {cfg.ensemble.size} on telemetry records {names}"
    )
    model = hydra.utils.instantiate(
        cfg.model.net,
        system=system,
        stats=stats,
        members=cfg.ensemble.size,
        seed=cfg.seed,
        _convert_="all",
    )
    optim = OmegaConf.to_container(cfg.model.optim, resolve=True)
    optim = {k: v for k, v in optim.items() if k not in ("_target_", "_partial_")}
    module = TelemetryModule(
        model,
        init_states=table,
        window=int(tcfg.window),
        consistency=float(tcfg.consistency),
        state_lr=float(tcfg.state_lr),
        iterations_per_epoch=int(tcfg.iterations_per_epoch),
        windows_per_step=tcfg.get("windows_per_step"),
        val_steps=tcfg.get("val_steps"),
        seed=cfg.seed,
        **optim,
    )
    dm = TelemetryDataModule(
        t[fit],
        u[:, fit],
        P,
        y[:, fit],
        mask[:, fit],
        iterations_per_epoch=int(tcfg.iterations_per_epoch),
    )
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    max_time = {}
    if tcfg.get("max_seconds"):  # Lightning's "DD:HH:MM:SS"
        secs = int(tcfg.max_seconds)
        max_time["max_time"] = (
            f"{secs // 86400:02d}:{secs % 86400 // 3600:02d}:{secs % 3600 // 60:02d}:{secs % 60:02d}"
        )
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=_loggers(cfg, out_dir),
        default_root_dir=str(out_dir),
        enable_progress_bar=sys.stderr.isatty(),
        plugins=[AtomicCheckpointIO()],
        **max_time,
    )
    remove_stale_temps(out_dir / "checkpoints")
    last = out_dir / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if cfg.resume and last.exists() else None
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - t_fit
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best:
        module.load_state_dict(
            torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        )
    model.eval()

    tt = torch.tensor(t, dtype=torch.float32)
    # conformal scale from the training records' free runs (from the table's first state), on their
    # held-out tails (calibration_tail), else in-sample on every point (the test coverage shows the cost)
    model.conformal_scale.fill_(1.0)
    runs = {}
    for i, r in enumerate(names):
        x0 = module.table[:, i, 0].detach()[:, None]
        runs[r] = free_run(
            model,
            x0,
            torch.tensor(u[i], dtype=torch.float32),
            torch.tensor(p, dtype=torch.float32),
            tt,
        )
    ys_all = np.concatenate(ys)
    calib = held if held.any() else np.ones(len(t), dtype=bool)
    ms_all = np.concatenate([m & calib[:, None] for m in masks])
    mean_all = np.concatenate([runs[r]["mean"] for r in names])
    std_all = np.concatenate([runs[r]["std"] for r in names])
    scale = np.ones(len(system.output_names))
    for j in range(
        len(scale)
    ):  # each output on its own measured points (an unmeasured one keeps 1)
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
    table_np = module.table.detach().numpy()
    lo, hi = table_np.min(axis=(0, 1, 2)), table_np.max(axis=(0, 1, 2))
    ranges = np.stack([lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo)], axis=1)
    outs = system.output_names
    metrics: dict[str, Any] = {}
    plots = {}
    done: list[
        tuple[np.ndarray, ...]
    ] = []  # (u, y, mask, t, pred, x0) of the test records run so far
    for split, recs in (("train", names), ("test", list(tcfg.test))):
        for r in recs:
            tel = records[r]
            ur, (yr, mr) = _inputs(system, tel), _full_outputs(system, contract, tel)
            if (
                split == "train"
            ):  # the free run the conformal scale came from: from the table's first state
                x0 = module.table[:, names.index(r), 0].detach()[:, None]
                pred, how = runs[r], "initial state from the state table"
            else:
                pred, x0 = _prefix_run(done, ur, yr, mr, tel.t, int(tcfg.init_samples))
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
                        init_samples=int(tcfg.init_samples),
                        ranges=ranges,
                    )
                    pred = free_run(model, x0, ut, pt, tr)
                how = f"initial state from the first {tcfg.init_samples} samples"
                done.append(
                    (ur, yr, mr, tel.t, pred, x0)
                )  # test runs only: a train run started from the table
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
                    f"{cfg.get('name', system.name)}: {r} record, free run ({how})",
                    out_dir / f"free_run_{r}.png",
                    int(tcfg.init_samples),
                )
            )
    flat: dict[str, Any] = {}
    for key, m in metrics.items():
        for k, v in m.items():
            if isinstance(v, (int, float)) or v is None:
                flat[f"{key}/{k}"] = v
    test_names = list(tcfg.test)
    if test_names:  # the headline: free-run RMSE over the test records (the root of their mean MSE)
        flat["test/rmse"] = float(
            np.sqrt(np.mean([metrics[f"test/{r}"]["rmse"] ** 2 for r in test_names]))
        )
        cov = [
            metrics[f"test/{r}"]["coverage_90"]
            for r in test_names
            if "coverage_90" in metrics[f"test/{r}"]
        ]
        if cov:
            flat["test/coverage_90"] = float(np.mean(cov))
    factors = (
        torch.exp(model.log_factors).detach().numpy() if hasattr(model, "log_factors") else None
    )
    learned = {}
    if factors is not None and factors.size:
        names_p = [system.parameter_names[i] for i in model.learn_idx.tolist()]
        learned = {
            n: {
                "start": float(p[system.parameter_names.index(n)]),
                "members": (factors[:, j] * p[system.parameter_names.index(n)]).tolist(),
            }
            for j, n in enumerate(names_p)
        }
    metrics["learned_parameters"] = learned
    metrics["conformal_scale"] = scale.tolist()
    metrics["train_info"] = {
        "epochs": trainer.current_epoch,
        "fit_seconds": fit_seconds,
        "members": model.members,
        "iterations": trainer.global_step,
        "records": names,
    }
    metrics["quality"] = {r: records[r].report for r in records}

    from training.train import save_model

    model_dir = save_model(
        out_dir,
        model,
        cfg,
        scale,
        t,
        system,
        dataset_sha256=sha256_bytes("".join(sorted(loaded["sha256"].values())).encode()),
        telemetry={
            "contract": contract.model_dump(),
            "parameters": dict(zip(system.parameter_names, p.tolist())),
            "train": names,
            "test": test_names,
            "state_ranges": ranges.tolist(),
            "input_range": np.stack([u.min(axis=(0, 1)), u.max(axis=(0, 1))], 1).tolist(),
            "init_samples": int(tcfg.init_samples),
        },
        metrics={k: v for k, v in flat.items() if k.startswith("test/")},
    )
    atomic_write_json(out_dir / "metrics.json", {**flat, "detail": metrics})
    summary = {
        "run_dir": str(out_dir),
        "model": str(model_dir / "model.json"),
        "metrics": str(out_dir / "metrics.json"),
        "plots": plots,
        "headline": {k: flat[k] for k in ("test/rmse", "test/coverage_90") if k in flat},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return flat, summary


def _prefix_run(done, u, y, mask, t, init_samples: int):
    """(pred, x0) of a record already run whose first len(t) samples are this record (the Silverbox's
    arrow without extrapolation is the full arrow's beginning): the initial state comes from the
    same first samples, so the free run is the same; (None, None) if there is none."""
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


def _loggers(cfg, out_dir):
    from training.train import _loggers as loggers

    return loggers(cfg, out_dir)
