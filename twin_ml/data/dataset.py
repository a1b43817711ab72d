"""Read a generated dataset (see `twin_ml.data.generate` for the format), verifying its hashes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from twin_ml._io import sha256_file
from twin_ml.data.design import SPLITS
from twin_ml.data.generate import FORMAT, MANIFEST, SHARD_KEYS, dataset_sha256


class DatasetError(ValueError):
    """A dataset that is missing, incomplete, or does not match its manifest."""


@dataclass(frozen=True)
class Dataset:
    path: Path
    manifest: dict[str, Any]

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
            manifest = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(f"{mf}: unreadable manifest ({e})") from None
        if manifest.get("format") != FORMAT:
            raise DatasetError(f"{mf}: format {manifest.get('format')!r} is not {FORMAT!r}")
        ds = cls(path, manifest)
        if verify:
            ds.verify()
        return ds

    def verify(self) -> None:
        """Every shard's sha256, and dataset_sha256 from them; raises DatasetError on a mismatch."""
        expect = dataset_sha256(
            self.manifest["settings_sha256"], [s["sha256"] for s in self.manifest["shards"]]
        )
        if expect != self.manifest["dataset_sha256"]:
            raise DatasetError(
                f"{self.path}: dataset_sha256 does not match the shard hashes in the manifest"
            )
        for s in self.manifest["shards"]:
            f = self.path / s["file"]
            if not f.exists():
                raise DatasetError(f"{f}: shard missing")
            got = sha256_file(f)
            if got != s["sha256"]:
                raise DatasetError(
                    f"{f}: sha256 {got[:12]}... does not match the manifest ({s['sha256'][:12]}...)"
                )

    @property
    def sha256(self) -> str:
        return self.manifest["dataset_sha256"]

    def shards(self) -> Iterator[dict[str, np.ndarray]]:
        for s in self.manifest["shards"]:
            with np.load(self.path / s["file"], allow_pickle=False) as z:
                yield {k: z[k] for k in SHARD_KEYS}

    def load(
        self, split: str | None = None, *, include_failed: bool = False
    ) -> dict[str, np.ndarray]:
        """All scenarios of one split (None: all), concatenated; failed ones dropped unless asked."""
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
