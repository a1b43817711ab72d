"""twin-generate: a physics system + a scenario design -> a dataset directory.

    twin-generate system=pendulum n_scenarios=256 seed=0 out_dir=data/pendulum
    twin-generate system.name=my_pkg.my_module:MySystem      # a system by import path
    twin-generate system=heat_plate snapshot_stride=20       # the plate's fields every 20th step
    twin-generate --config-dir ~/my_twin experiment=my_setup  # your own system/, experiment/ ...

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


def generate(cfg: DictConfig) -> dict:
    """Build the system, design and solver from `cfg`, generate the dataset, return the summary."""
    from twin_ml.data import generate_dataset

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
    try:
        summary = generate(cfg)
        path = write_summary(Path(cfg.out_dir), summary)
    # bad input: one line, nothing written; OSError (e.g. a full disk): the shards written so far
    # stay, and a rerun resumes from them
    except (ValueError, KeyError, InstantiationException, OSError) as e:
        fail(e)
    c = summary["counts"] or {}
    if summary["complete"]:
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
