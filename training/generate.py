"""twin-generate: a physics system + a scenario design -> a dataset directory.

    twin-generate system=pendulum n_scenarios=256 seed=0 out_dir=data/pendulum
    twin-generate system.name=my_pkg.my_module:MySystem      # a system by import path
    twin-generate system=heat_plate snapshot_stride=20       # the plate's fields every 20th step
    twin-generate system=heat_plate executor=ray             # shards as Ray tasks (same dataset)
    twin-generate system=heat_plate executor=ray ray_address=auto  # on a running Ray cluster
    twin-generate --config-dir ~/my_twin experiment=my_setup  # your own system/, experiment/ ...

With n_new, one round of active learning instead: n_new more train scenarios in the dataset in
out_dir (its own system, design, solver and shard size), picked by the ensemble of a twin-train
run, or drawn by the design's sampler (acquisition=random); see twin_ml.active:

    twin-generate out_dir=data/tanks extend_from=runs/tanks n_new=16 acquisition=disagreement seed=1

Config groups (system, design, solver, paths, experiment) are looked up in every config directory
of the search path: --config-dir DIR or hydra.searchpath=[file://DIR], then the project's configs/.
Prints the path of summary.json last.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from training._common import CONFIG_DIR, check_group_choices, fail, write_summary
from twin_ml._io import atomic_write_bytes

log = logging.getLogger("twin-generate")


# what a round of extension takes from the dataset, not from the command line
_DATASET_OWN = ("system", "design", "solver", "experiment", "n_scenarios", "shard_size")
_DATASET_OWN += ("snapshot_stride", "plot")
_EXTENSION = ("extend_from", "acquisition", "pool_size", "min_distance")


def check_overrides(overrides: list[str], extending: bool) -> None:
    """Extending (n_new set) takes the dataset's own system, design and solver: an override of
    those would be ignored, so it is refused; the extension settings without n_new likewise."""
    keys = [o.lstrip("+~").partition("=")[0] for o in overrides]
    roots = {k.split(".")[0].split("@")[0] for k in keys}
    if extending:
        bad = sorted(roots & set(_DATASET_OWN))
        if bad:
            raise ValueError(
                f"n_new extends the dataset in out_dir with its own system, design, solver and "
                f"shard size; drop {', '.join(f'{b}=...' for b in bad)}"
            )
    else:
        bad = sorted(roots & set(_EXTENSION))
        if bad:
            raise ValueError(
                f"{', '.join(f'{b}=...' for b in bad)} extend a dataset: give n_new=<K> too "
                "(the scenarios to add to out_dir's train split)"
            )


def extend(cfg: DictConfig) -> dict:
    """One round of added train scenarios in the dataset cfg.out_dir; returns the summary."""
    from twin_ml.active import extend_dataset

    log.info(
        f"Extending {cfg.out_dir} by {cfg.n_new} scenarios (acquisition={cfg.acquisition}"
        + (f", model {cfg.extend_from}" if cfg.extend_from else "")
        + ")"
    )
    res = extend_dataset(
        cfg.out_dir,
        n_new=cfg.n_new,
        acquisition=cfg.acquisition,
        extend_from=cfg.extend_from,
        seed=cfg.seed,
        pool_size=cfg.pool_size,
        min_distance=cfg.min_distance,
        workers=cfg.workers,
        max_new_shards=cfg.max_new_shards,
        overwrite=cfg.overwrite,
        progress=cfg.progress,
        executor=cfg.executor,
        ray_address=cfg.ray_address,
    )
    return res.summary()


def generate(cfg: DictConfig) -> dict:
    """Build the system, design and solver from `cfg`, generate the dataset, return the summary
    (with n_new: extend the dataset in out_dir instead)."""
    from twin_ml.data import generate_dataset
    from twin_ml.data.generate import check_executor

    # before anything is built: a bad executor setting fails at once (whether something answers
    # at ray_address: generate_dataset and extend_dataset check it before they write anything)
    check_executor(cfg.executor, cfg.ray_address, cfg.workers)
    if cfg.get("n_new") is not None:
        return extend(cfg)

    log.info(f"Instantiating system <{cfg.system.name}>")
    system = hydra.utils.instantiate(cfg.system, _convert_="all")
    design = hydra.utils.instantiate(cfg.design, _convert_="all")
    solver = hydra.utils.instantiate(cfg.solver, _convert_="all")
    log.info(f"Generating {cfg.n_scenarios} scenarios of {system!r} into {cfg.out_dir}")
    res = generate_dataset(
        system,
        design,
        n_scenarios=cfg.n_scenarios,
        seed=cfg.seed,
        out_dir=cfg.out_dir,
        solver=solver,
        shard_size=cfg.shard_size,
        workers=cfg.workers,
        overwrite=cfg.overwrite,
        max_new_shards=cfg.max_new_shards,
        progress=cfg.progress,
        snapshot_stride=cfg.get("snapshot_stride"),
        executor=cfg.executor,
        ray_address=cfg.ray_address,
    )
    summary = res.summary()
    if res.complete:
        atomic_write_bytes(res.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
        if cfg.plot:
            from twin_ml.data import Dataset
            from twin_ml.data.plots import plot_dataset

            plot_dataset(Dataset.open(res.path), res.path / "overview.png")
            summary["plot"] = str(res.path / "overview.png")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from twin_ml.data.generate import ShardError

    try:
        check_overrides(list(HydraConfig.get().overrides.task), cfg.get("n_new") is not None)
        summary = generate(cfg)
        path = write_summary(Path(cfg.out_dir), summary)
    # bad input: one line, nothing written; OSError (e.g. a full disk): the shards written so far
    # stay, and a rerun resumes from them
    # ShardError: a shard's Ray task failed (its shard and error; the shards written stay)
    except (ValueError, KeyError, InstantiationException, OSError, ShardError) as e:
        fail(e)
    c = summary["counts"] or {}
    if "round" in summary:
        r = summary["round"]
        if summary["already_done"]:
            log.info(f"round {r['round']} of this request is in the dataset already: nothing to do")
        elif summary["complete"]:
            log.info(
                f"round {r['round']}: {r['n_new']} scenarios ({r['acquisition']}) as indices "
                f"{r['index'][0]}..{r['index'][1] - 1}; dataset {summary['dataset_sha256'][:16]}: "
                f"{c.get('train')} train / {c.get('total')} scenarios"
            )
        else:
            log.info("stopped before the round's last shard; run the same command to resume")
    elif summary["complete"]:
        log.info(
            f"dataset {summary['dataset_sha256'][:16]}: {c.get('ok')} ok / {c.get('total')} "
            f"scenarios ({c.get('failed')} failed) {summary['shape']}"
        )
    else:
        log.info(
            "stopped before the last shard (max_new_shards); run the same command again to resume"
        )
    print(path)


def main() -> None:
    check_group_choices(sys.argv[1:], ["system", "design", "solver", "paths", "experiment"])
    _main()


if __name__ == "__main__":
    main()
