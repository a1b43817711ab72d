"""twin-train: a dataset + a model config -> a trained, calibrated ensemble in a run directory.

    twin-train experiment=pendulum_node data_dir=data/pendulum-n256-s0 out_dir=runs/pendulum
    twin-train -m hparams_search=pendulum_node_optuna
    twin-train experiment=cascaded_tanks_real out_dir=runs/tanks-real logger=none   # telemetry
    twin-train -m hydra/launcher=joblib model.optim.lr=0.01,0.003   # a sweep, a process per job
    twin-train trainer=ddp experiment=pendulum_node   # Lightning's DDP on two CPU processes

The run directory holds config.yaml, checkpoints/ (best.ckpt, last.ckpt), model/ (model.pt +
model.json: everything to rebuild the calibrated model), metrics.json, report.html with PNGs and
summary.json, whose path is printed last. Returns `optimized_metric` for sweeps. Each epoch logs
one progress line (callbacks.progress, twin_ml.models.callbacks.EpochProgress).

Sweeps (-m, any Hydra launcher: joblib here, submitit_slurm on a cluster): each job's out_dir is
its own folder of the sweep (hydra.sweep.dir/<job number>) unless out_dir is set, and the sweep
ends by printing each job's summary.json path, one a line in job order (`SweepSummaries`). A job
is the very run of the same settings alone: the same metrics, to the bit, on the same machine.

Several processes (trainer=ddp, or trainer=gpu with trainer.devices=N): every process
runs twin-train, the first starts the others; each takes an equal share of every batch of
data.batch_size scenarios and validates on the whole split (twin_ml.train.distributed), so the run
is the one-process run up to the order of float sums. Only the first process writes the run
directory, the model, the report and the summary; it waits for the others and fails if one did.

On measured telemetry (`telemetry:` in the config, e.g. experiment=cascaded_tanks_real): records
-> contract check and alignment -> a state table from the physics -> multiple shooting with
`TelemetryModule` -> free-run evaluation on the test records (initial state from their first
samples) -> metrics.json, model/, plots, summary.json (twin_ml.train.telemetry). The section:
  dataset     a real dataset under data/real/ (cascaded_tanks, silverbox), converted on the fly; or
  files       {record: telemetry file} (Parquet/CSV, see twin-ingest)
  contract    a contract by name (<config dir>/contract/<name>.yaml, a --config-dir's first, then
              the project's configs/) or a .yaml file (signals must match the system's inputs,
              and be among its outputs: outputs a record does not measure are left out of its
              metrics, reported as null with a note)
  train/test  record names; `train` records are fitted, `test` records are only evaluated
  parameters  the physics parameters to start from (default: the system's nominal values); the
              hybrid's `learn_parameters` refine them jointly with the residual
  initial_state  a guess for hidden states at a record's start (default: the middle of the state's
              bounds); the physics simulated from it fills the state table's hidden columns
  derivatives  {hidden state: measured output} for hidden states that are an output's time
              derivative (a velocity): their column starts as the output's central difference, and
              when every hidden state is covered no physics simulation is needed
  calibration_tail  the fraction of each record's last samples held out of training, to fit the
              conformal scale on (0: in-sample)
  window, consistency, state_lr, iterations_per_epoch, windows_per_step, val_steps: see
              twin_ml.models.module.TelemetryModule
  init_samples  samples of a test record used to estimate its initial state
  max_seconds  a wall-clock budget for fitting (Lightning's max_time); evaluation follows
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from training._common import (
    CONFIG_DIR,
    REAL_DATA_DIR,
    check_group_choices,
    config_file,
    fail,
    json_safe,
    lightning_logs_once,
    loggers,
    write_json,
    write_summary,
)
from twin_ml._io import atomic_write_bytes

log = logging.getLogger("twin-train")


def _config_text(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def _trainer(cfg: DictConfig, out_dir: Path, callbacks: list, **kw: Any):
    """Lightning's Trainer from cfg.trainer, checked for the processes it will train on."""
    from twin_ml.models.checkpoint import AtomicCheckpointIO

    _check_accelerator(cfg)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers(cfg, out_dir),
        default_root_dir=str(out_dir),
        enable_progress_bar=sys.stderr.isatty(),  # a bar needs a terminal; else the progress lines
        plugins=[AtomicCheckpointIO()],
        # the data module shares the training batches out itself (twin_ml.train.distributed)
        use_distributed_sampler=False,
        **kw,
    )
    _check_processes(cfg, trainer)
    if trainer.world_size > 1:
        # every process validates on the whole split (twin_ml.train.distributed): its val/ metrics
        # are already every process's, so Lightning's advice to average them over processes is moot
        warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
    if not trainer.is_global_zero:  # the other processes say only what goes wrong
        logging.getLogger().setLevel(logging.WARNING)
    return trainer


def _check_accelerator(cfg: DictConfig) -> None:
    """trainer=gpu on a machine without one: say so, and what runs instead."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"trainer.accelerator={accelerator} (trainer=gpu) needs a CUDA GPU, and torch "
                f"{torch.__version__} sees none on this machine; train on CPUs with "
                "trainer=default (one process) or trainer=ddp (two processes)"
            )


def _check_processes(cfg: DictConfig, trainer) -> None:
    """A run on several processes must be one twin-train can start and finish: Lightning's DDP
    (every process runs twin-train; the first starts the others by running the command again),
    or processes a cluster started (Slurm's tasks, torchrun). Lightning's spawned processes
    (ddp_spawn, ddp_fork) train in children whose state (epochs, early stopping) the parent does
    not get back, so the run's records would be wrong."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if trainer.world_size > 1 and cfg.get("data"):
        from twin_ml.train.distributed import check_batch

        check_batch(cfg.data.batch_size, trainer.world_size)
    launcher = trainer.strategy.launcher
    kind = type(launcher).__name__
    if kind == "_MultiProcessingLauncher":
        raise ValueError(
            "trainer.strategy spawns or forks its processes (ddp_spawn, ddp_fork), whose epochs "
            "and early stopping the run does not get back; use trainer=ddp (every process runs "
            "twin-train)"
        )
    reruns = (
        kind == "_SubprocessScriptLauncher"
        and launcher.num_processes > 1
        and not launcher.cluster_environment.creates_processes_externally
    )
    if reruns and not (HydraConfig.initialized() and _runs_as_command()):
        raise ValueError(
            f"trainer=ddp on {launcher.num_processes} processes starts the others by running the "
            "twin-train command again: run it as the command, not as train() inside a Python "
            "session"
        )
    if reruns and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ValueError(
            f"trainer=ddp on {launcher.num_processes} processes in a sweep (-m): a sweep's job "
            "cannot run the command again for its other processes; run trainer=ddp one run at "
            "a time, or have Slurm start the processes (hydra/launcher=submitit_slurm "
            "hydra.launcher.tasks_per_node=<trainer.devices>)"
        )


def _runs_as_command() -> bool:
    """Whether this process is the twin-train command (its script, or python -m training.train):
    what Lightning's DDP runs again for the other processes."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name == "training.train":
        return True
    return Path(sys.argv[0]).name == "twin-train"


def _wait_for_processes(trainer, timeout: float = 600.0) -> None:
    """On the first process of a DDP run: wait for the processes it started, and fail when one
    did not end cleanly (Lightning watches them only every few seconds, and not past the end).
    A process still running `timeout` seconds after this one finished is killed (they all end
    the same fit, a hang guard)."""
    import subprocess

    for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(
                f"a training process (pid {proc.pid}) was still running {timeout:g} s after the "
                "first had finished; it was killed"
            ) from None
        if code != 0:
            raise RuntimeError(
                f"a training process (pid {proc.pid}) ended with exit status {code}; "
                "its error is above"
            )


def _stop_processes(trainer) -> None:
    """On the first process of a DDP run that failed: kill the processes it started (Lightning
    kills them only on an interrupt)."""
    for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train as `cfg` says; returns (flat metrics, summary) ({stopped_at_epoch}, {} for a run that
    stop_after_epochs ended early)."""
    if cfg.get("telemetry"):
        return train_telemetry(cfg)
    import lightning as L
    import torch

    from twin_ml.evaluate.evaluate import flat_metrics
    from twin_ml.evaluate.report import write_report
    from twin_ml.models import compute_stats, field_stats, save_model
    from twin_ml.models.callbacks import StopAfter
    from twin_ml.train.dataset import HEADLINE, evaluate_trained
    from twin_ml.train.distributed import ShardedScenarioDataModule
    from twin_ml.train.fitting import fit, load_best, resume_from

    t_start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    system = hydra.utils.instantiate(cfg.system, _convert_="all")
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    stop = StopAfter(int(cfg.stop_after_epochs)) if cfg.stop_after_epochs else None
    if stop:
        callbacks.append(stop)
    trainer = _trainer(cfg, out_dir, callbacks)  # first: its checks need no data
    log.info(f"Instantiating datamodule <{cfg.data_dir}>")
    dm = ShardedScenarioDataModule(
        str(cfg.data_dir),
        system,
        batch_size=cfg.data.batch_size,
        horizon=cfg.data.horizon,
        seed=cfg.seed,
    )
    tr = dm.numpy("train")
    t = dm.t_grid
    kind = cfg.model.net.kind
    extra: dict[str, Any] = {"n_times": len(t)} if kind == "emulator" else {}
    if system.state_size != len(system.states):  # a field system: its states are snapshots
        stats = field_stats(tr["x0"], tr["u"], tr["p"], tr["y"], t)
        if kind in ("latent", "rom"):
            extra.update(snapshots=tr["x"], snapshot_stride=dm.dataset.card.snapshot_stride)
        elif kind != "emulator":
            raise ValueError(
                f"model.net.kind={kind!r} integrates every state; {system.name!r} is a field "
                "system: use model=latent, model=rom or model=emulator"
            )
    else:
        stats = compute_stats(tr["x"], tr["u"], tr["p"], tr["y"], t)
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
    if trainer.is_global_zero:  # only the first process writes (on one process: it)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "config.yaml", _config_text(cfg).encode())
    ckpt_path = resume_from(out_dir, cfg.resume)
    log.info("Resuming from last.ckpt" if ckpt_path else "Starting training")
    try:
        fit_seconds = fit(trainer, module, dm, ckpt_path)
    except BaseException:
        _stop_processes(trainer)  # the others would wait in a collective until gloo's timeout
        raise
    if not trainer.is_global_zero:  # DDP: the first process evaluates and writes the run
        return {}, {}
    if stop and trainer.should_stop and trainer.current_epoch < trainer.max_epochs:
        if not any(type(c).__name__ == "EarlyStopping" and c.stopped_epoch for c in callbacks):
            log.info(
                f"stopped after {trainer.current_epoch} epochs (stop_after_epochs); "
                "resume=true continues"
            )
            _wait_for_processes(trainer)
            return {"stopped_at_epoch": trainer.current_epoch}, {}

    best = load_best(trainer, module)
    closures = None
    if kind == "rom":  # each member's closure stays only where it helps its validation rollouts
        va = dm.numpy("val")
        closures = model.prune_closures(va["x0"], va["u"], va["p"], t, va["y"])
        log.info(
            f"closures kept by {sum(closures['kept'])} of {model.members} members (validation "
            "RMSE with / without: "
            + ", ".join(
                f"{a:.2e}/{b:.2e}"
                for a, b in zip(closures["rmse_with_closure"], closures["rmse_without_closure"])
            )
            + ")"
        )
    ev = evaluate_trained(model, system, dm, speed_scenarios=cfg.speed_scenarios, seed=cfg.seed)
    metrics = ev.metrics
    metrics["train"] = {
        "epochs": trainer.current_epoch,
        "fit_seconds": fit_seconds,
        "members": model.members,
        "best_checkpoint": Path(best).name if best else None,
    }
    if closures is not None:
        metrics["train"]["closures"] = closures
    flat = flat_metrics(metrics)

    model_dir = save_model(
        out_dir,
        model,
        ev.scale,
        t,
        _config_text(cfg),
        dataset_sha256=dm.dataset.sha256,
        design=dm.dataset.card.design,  # the training domain, for export and serving
        conformal_shift=ev.shift.card().model_dump(mode="json"),  # the widening outside it
        metrics={
            k: v
            for k, v in sorted(json_safe(flat)[0].items())
            if k.startswith(("val/", "test/")) and "/regime/" not in k
        },
    )
    write_json(out_dir / "metrics.json", {**flat, "detail": metrics})
    report = write_report(out_dir, model, system, ev.splits, ev.preds, metrics, t)
    summary = {
        "run_dir": str(out_dir),
        "model": str(model_dir / "model.json"),
        "report": str(report),
        "metrics": str(out_dir / "metrics.json"),
        "dataset_sha256": dm.dataset.sha256,
        "headline": {k: flat[k] for k in HEADLINE if k in flat},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if trainer.world_size > 1:
        summary["processes"] = trainer.world_size
    _wait_for_processes(trainer)
    return flat, summary


def _max_time(seconds) -> dict[str, str]:
    """Lightning's max_time ("DD:HH:MM:SS") for a budget in seconds ({} for none)."""
    if not seconds:
        return {}
    s = int(seconds)
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    return {"max_time": f"{days:02d}:{hours:02d}:{minutes:02d}:{s % 60:02d}"}


def train_telemetry(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train on measured records (the `telemetry:` section, see the module's docstring)."""
    import lightning as L
    import torch

    from twin_ml.data.records import load_records
    from twin_ml.data.telemetry import Contract
    from twin_ml.models import save_model
    from twin_ml.train import telemetry
    from twin_ml.train.fitting import fit, load_best, resume_from

    t_start = time.perf_counter()
    tcfg = cfg.telemetry
    out_dir = Path(cfg.out_dir)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.set_flush_denormal(True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    system = hydra.utils.instantiate(cfg.system, _convert_="all")
    contract = Contract.load(
        config_file("contract", str(tcfg.contract), setting="telemetry.contract")
    )
    plain = OmegaConf.to_container(tcfg, resolve=True)
    loaded = load_records(
        system,
        contract,
        list(tcfg.train) + list(tcfg.test),
        dt=float(tcfg.dt),
        files=plain.get("files"),
        dataset=plain.get("dataset"),
        real_dir=REAL_DATA_DIR,
        contract_name=str(tcfg.contract),
    )
    data = telemetry.prepare(
        system,
        loaded,
        list(tcfg.train),
        parameters=plain.get("parameters"),
        calibration_tail=plain.get("calibration_tail") or 0.0,
        initial_state=plain.get("initial_state"),
        derivatives=plain.get("derivatives"),
    )
    log.info(
        f"Instantiating model <{cfg.model.net.kind}> x {cfg.ensemble.size} "
        f"on telemetry records {data.names}"
    )
    model = hydra.utils.instantiate(
        cfg.model.net,
        system=system,
        stats=data.stats(),
        members=cfg.ensemble.size,
        seed=cfg.seed,
        _convert_="all",
    )
    optim = OmegaConf.to_container(cfg.model.optim, resolve=True)
    optim = {k: v for k, v in optim.items() if k not in ("_target_", "_partial_")}
    module = data.module(
        model,
        window=int(tcfg.window),
        consistency=float(tcfg.consistency),
        state_lr=float(tcfg.state_lr),
        iterations_per_epoch=int(tcfg.iterations_per_epoch),
        windows_per_step=tcfg.get("windows_per_step"),
        val_steps=tcfg.get("val_steps"),
        seed=cfg.seed,
        **optim,
    )
    dm = data.datamodule(int(tcfg.iterations_per_epoch))
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    trainer = _trainer(cfg, out_dir, callbacks, **_max_time(tcfg.get("max_seconds")))
    if trainer.world_size > 1:
        raise ValueError(
            f"telemetry training takes every record in every step: there is no batch to share "
            f"out over {trainer.world_size} processes (trainer.devices x trainer.num_nodes); "
            "use trainer=default"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "config.yaml", _config_text(cfg).encode())
    fit_seconds = fit(trainer, module, dm, resume_from(out_dir, cfg.resume))
    load_best(trainer, module)

    ev = telemetry.evaluate(
        model,
        module,
        data,
        loaded,
        list(tcfg.test),
        init_samples=int(tcfg.init_samples),
        out_dir=out_dir,
        title=str(cfg.get("name", system.name)),
    )
    metrics, flat = ev.metrics, ev.flat
    metrics["train_info"] = {
        "epochs": trainer.current_epoch,
        "fit_seconds": fit_seconds,
        "members": model.members,
        "iterations": trainer.global_step,
        "records": data.names,
    }
    metrics["quality"] = {r: tel.report for r, tel in loaded.records.items()}
    model_dir = save_model(
        out_dir,
        model,
        ev.scale,
        data.t,
        _config_text(cfg),
        dataset_sha256=loaded.sha256,
        telemetry=telemetry.model_metadata(
            data, loaded, list(tcfg.test), ev.ranges, int(tcfg.init_samples)
        ),
        conformal_shift=ev.shift.card().model_dump(mode="json"),  # beta 0: no extrapolation
        metrics=json_safe({k: v for k, v in flat.items() if k.startswith("test/")})[0],
    )
    write_json(out_dir / "metrics.json", {**flat, "detail": metrics})
    summary = {
        "run_dir": str(out_dir),
        "model": str(model_dir / "model.json"),
        "metrics": str(out_dir / "metrics.json"),
        "plots": ev.plots,
        "headline": {k: flat[k] for k in ("test/rmse", "test/coverage_90") if k in flat},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    return flat, summary


def _sweep_job_dir() -> Path | None:
    """The job's own folder in a sweep (-m): hydra.sweep.dir/hydra.sweep.subdir; else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from twin_ml.data.dataset import DatasetError

    lightning_logs_once()
    try:
        metrics, summary = train(cfg)
        if not summary:  # stopped early (stop_after_epochs), or not the first of DDP's processes
            return None
        path = write_summary(Path(cfg.out_dir), summary)
        job = _sweep_job_dir()
        if job is not None and job.resolve() != Path(cfg.out_dir).resolve():
            write_summary(job, summary)  # a copy where the sweep's end looks (SweepSummaries)
    except (
        ValueError,
        KeyError,
        DatasetError,
        InstantiationException,
        OSError,
    ) as e:  # OSError: e.g. disk full
        fail(e)
    log.info(f"headline: {summary['headline']}")
    if job is None:
        print(path)
    else:  # the sweep prints every job's, in job order, when it ends
        log.info(f"summary: {path}")
    return metrics.get(cfg.optimized_metric)


class SweepSummaries(Callback):
    """At the end of a sweep (-m), print each job's summary.json path, one a line in job order
    (the sweep's last output, as one run prints its summary's path last). Each job leaves its
    summary.json in its own folder of the sweep (hydra.sweep.dir/<job>: its out_dir by default,
    else a copy there). A job that wrote none (it failed, or stop_after_epochs ended it) is
    named on stderr."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        jobs = (
            sorted(
                (p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: (
                    not p.name.isdigit(),
                    int(p.name) if p.name.isdigit() else 0,
                    p.name,
                ),
            )
            if sweep.is_dir()
            else []
        )
        for job in jobs:
            summary = job / "summary.json"
            if summary.is_file():
                print(summary, flush=True)
            else:
                print(f"warning: sweep job {job} wrote no summary.json", file=sys.stderr)


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
