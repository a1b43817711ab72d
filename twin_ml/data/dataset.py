"""Read a generated dataset (see `twin_ml.data.generate` for the format), verifying its hashes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twin_ml._io import sha256_file
from twin_ml.contract.card import CardError
from twin_ml.contract.dataset import DatasetCard
from twin_ml.data.design import SPLITS
from twin_ml.data.generate import MANIFEST, SHARD_KEYS, dataset_sha256


class DatasetError(ValueError):
    """A dataset that is missing, incomplete, or does not match its manifest."""


@dataclass(frozen=True)
class Dataset:
    path: Path
    card: DatasetCard

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> Dataset:
        """Open the dataset in `path`; `verify` checks every shard's sha256 against the manifest."""
        path = Path(path)
        mf = path / MANIFEST
        if not mf.exists():
            hint = (
                " (generation did not finish: run twin-generate again to resume)"
                if (path / ".generating.json").exists()
                else ""
            )
            raise DatasetError(f"{path}: no {MANIFEST}; not a complete twin-ml dataset{hint}")
        try:
            card = DatasetCard.read(mf)
        except CardError as e:
            raise DatasetError(str(e)) from None
        ds = cls(path, card)
        if verify:
            ds.verify()
        return ds

    def verify(self) -> None:
        """Every shard's sha256, and dataset_sha256 from them; raises DatasetError on a mismatch."""
        card = self.card
        expect = dataset_sha256(card.settings_sha256, [s.sha256 for s in card.shards])
        if expect != card.dataset_sha256:
            raise DatasetError(
                f"{self.path}: dataset_sha256 does not match the shard hashes in the manifest"
            )
        for s in card.shards:
            f = self.path / s.file
            if not f.exists():
                raise DatasetError(f"{f}: shard missing")
            got = sha256_file(f)
            if got != s.sha256:
                raise DatasetError(
                    f"{f}: sha256 {got[:12]}... does not match the manifest ({s.sha256[:12]}...)"
                )

    @property
    def sha256(self) -> str:
        return self.card.dataset_sha256

    @property
    def snapshot_stride(self) -> int:
        """x holds the states at every `snapshot_stride`-th time of t (1: every step; a field
        system's dataset: its fields at t[::snapshot_stride]); u and y are at every step."""
        return self.card.snapshot_stride

    def snapshot_times(self) -> np.ndarray:
        """The times of x's time axis: t[::snapshot_stride] (t itself where the stride is 1)."""
        return self.times()[:: self.snapshot_stride]

    def times(self) -> np.ndarray:
        """The grid t [T] of u and y (read from the first shard: the exact floats stored)."""
        s = self.card.shards[0]
        with np.load(self.path / s.file, allow_pickle=False) as z:
            return z["t"]

    def shards(self) -> Iterator[dict[str, np.ndarray]]:
        for s in self.card.shards:
            with np.load(self.path / s.file, allow_pickle=False) as z:
                yield {k: z[k] for k in SHARD_KEYS}

    def load(
        self, split: str | None = None, *, include_failed: bool = False
    ) -> dict[str, np.ndarray]:
        """All scenarios of one split (None: all), concatenated; failed ones dropped unless
        asked. x is at `snapshot_times()` (fewer times than t when snapshot_stride > 1)."""
        if split is not None and split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; splits: {SPLITS}")
        parts = []
        for z in self.shards():
            keep = np.ones(len(z["index"]), dtype=bool)
            if split is not None:
                keep &= z["split"] == SPLITS.index(split)
            if not include_failed:
                keep &= z["status"] == 0
            parts.append({k: (v if k == "t" else v[keep]) for k, v in z.items()})
        out = {k: np.concatenate([p[k] for p in parts]) for k in SHARD_KEYS if k != "t"}
        out["t"] = parts[0]["t"]
        return out
