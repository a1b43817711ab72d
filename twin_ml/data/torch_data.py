"""A generated dataset as a LightningDataModule (imports torch and lightning: not re-exported by
`twin_ml.data`, which stays torch-free)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from twin_ml.data.dataset import Dataset, DatasetError
from twin_ml.data.design import SPLITS
from twin_ml.physics.system import PhysicsSystem

FIELDS = ("index", "x0", "u", "p", "x", "y")


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): a run resumed from a checkpoint sees the same
    batches as an uninterrupted one (Lightning calls set_epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ScenarioDataModule(L.LightningDataModule):
    """Train/val/test/extrapolation/calibration splits of a twin-generate dataset as float32
    tensors (a split the dataset lacks is empty).

    Checked before training starts: the dataset exists and its hashes match; it was made for
    `system` (name and options); train and val are not empty; no kept scenario holds a NaN;
    `horizon` (training window, steps) fits in the data.
    """

    def __init__(
        self,
        data_dir: str,
        system: PhysicsSystem,
        *,
        batch_size: int = 64,
        horizon: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.data_dir, self.system, self.batch_size, self.horizon, self.seed = (
            data_dir,
            system,
            batch_size,
            horizon,
            seed,
        )
        self.dataset = self._open()
        self.t_grid = self._t()  # float64, as generated (model.json records its dt exactly)
        self.t = torch.tensor(self.t_grid, dtype=torch.float32)
        # x's times: t_grid[::snapshot_stride] (a field system's fields; u and y: every step)
        self.snapshot_stride = self.dataset.snapshot_stride
        self.t_snapshots = self.t_grid[:: self.snapshot_stride]
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        for split in SPLITS:
            self.splits[split] = self._load(split)
        for split in ("train", "val"):
            if len(self.splits[split]["index"]) == 0:
                raise DatasetError(
                    f"{data_dir}: the {split} split is empty; generate more scenarios"
                )
        n_t = self.t.shape[0]
        dt = np.diff(self.t_grid)
        if n_t < 2 or not np.allclose(dt, dt[0], rtol=1e-6, atol=0.0):
            raise DatasetError(f"{data_dir}: training needs a uniform time grid of >= 2 points")
        if horizon is not None and not 1 <= horizon <= n_t - 1:
            raise ValueError(
                f"data.horizon ({horizon} steps) must be in [1, {n_t - 1}]: "
                f"the data has {n_t} time points"
            )

    def _open(self) -> Dataset:
        if not Path(self.data_dir).exists():
            raise DatasetError(
                f"data_dir {self.data_dir!r} does not exist; make it with twin-generate"
            )
        ds = Dataset.open(self.data_dir)
        got, want = ds.card.system, self.system
        if (got.name, got.options) != (want.name, want.options):
            raise DatasetError(
                f"{self.data_dir} was made for system {got.name} {got.options}, but the config "
                f"says {want.name} {want.options}; pick the matching system= or another data_dir"
            )
        return ds

    def _t(self) -> np.ndarray:
        return next(self.dataset.shards())["t"]

    def _load(self, split: str) -> dict[str, torch.Tensor]:
        d = self.dataset.load(split)
        bad = ~np.all(np.isfinite(d["x"]), axis=(1, 2)) | ~np.all(np.isfinite(d["y"]), axis=(1, 2))
        bad |= ~np.all(np.isfinite(d["u"]), axis=(1, 2)) | ~np.all(np.isfinite(d["p"]), axis=1)
        if bad.any():
            ids = d["index"][bad][:20].tolist()
            raise DatasetError(
                f"{self.data_dir}: NaN or inf in {split} scenarios {ids}; refusing to train"
            )
        return {
            k: torch.tensor(d[k], dtype=torch.long if k == "index" else torch.float32)
            for k in FIELDS
        }

    def numpy(self, split: str) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.splits[split].items()}

    @property
    def calibration_split(self) -> str:
        """The split the conformal scale is fitted on: "calibration" when the dataset has one
        (older datasets, and designs with calibration_fraction 0, have none), else "val"."""
        return "calibration" if len(self.splits["calibration"]["index"]) else "val"

    def _loader(self, split: str, *, shuffle: bool) -> DataLoader:
        s = self.splits[split]
        ds = TensorDataset(*(s[k] for k in FIELDS))
        if shuffle:
            return DataLoader(
                ds, batch_size=self.batch_size, sampler=EpochSampler(len(ds), self.seed)
            )
        return DataLoader(ds, batch_size=max(self.batch_size, 256), shuffle=False)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)


class _Repeat(torch.utils.data.Dataset):
    """One item, `n` times: an epoch of n steps over the same records."""

    def __init__(self, item: dict[str, torch.Tensor], n: int):
        self.item, self.n = item, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.item


class TelemetryDataModule(L.LightningDataModule):
    """Measured records on one uniform grid, for `TelemetryModule`: each batch holds all training
    records (u [R, T, nu], p [R, np], y [R, T, ny], mask [R, T, ny]); an epoch is
    `iterations_per_epoch` batches. Validation: the same records, as free runs."""

    def __init__(
        self,
        t: np.ndarray,
        u: np.ndarray,
        p: np.ndarray,
        y: np.ndarray,
        mask: np.ndarray,
        *,
        iterations_per_epoch: int = 50,
    ):
        super().__init__()
        if iterations_per_epoch < 1:
            raise ValueError(
                f"telemetry.iterations_per_epoch must be >= 1, got {iterations_per_epoch}"
            )
        dt = np.diff(t)
        if len(t) < 3 or not np.allclose(dt, dt[0], rtol=1e-6, atol=0.0):
            raise ValueError("telemetry records must share a uniform grid of >= 3 points")
        self.t_grid = np.asarray(t, dtype=np.float64)
        self.t = torch.tensor(self.t_grid, dtype=torch.float32)
        y = np.where(mask, y, 0.0)  # masked points carry no value (and no NaN into the graph)
        self.batch = {
            "u": torch.tensor(u, dtype=torch.float32),
            "p": torch.tensor(p, dtype=torch.float32),
            "y": torch.tensor(y, dtype=torch.float32),
            "mask": torch.tensor(mask, dtype=torch.bool),
        }
        self.iterations_per_epoch = iterations_per_epoch

    def train_dataloader(self):
        return DataLoader(
            _Repeat(self.batch, self.iterations_per_epoch), batch_size=None, shuffle=False
        )

    def val_dataloader(self):
        return DataLoader(_Repeat(self.batch, 1), batch_size=None, shuffle=False)
