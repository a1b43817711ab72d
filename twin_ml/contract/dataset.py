"""The dataset card: a generated dataset's manifest.json (`twin-ml/dataset/v1`) as types.

`twin_ml.data.generate` writes it last (its presence means the dataset is complete); readers use
this type, never its keys. The README's "Dataset format" section documents every field, so a
user can read a dataset without twin-ml.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twin_ml.contract.card import CardError, DomainBox, SystemCard

DATASET_FORMAT = "twin-ml/dataset/v1"
_OPEN = ConfigDict(extra="allow")


class Shard(BaseModel):
    model_config = _OPEN
    file: str
    start: int
    stop: int
    sha256: str


class DatasetTime(BaseModel):
    model_config = _OPEN
    t0: float
    t_end: float
    dt: float
    n: int
    unit: str = "s"


class DatasetCard(BaseModel):
    """What a dataset holds, how it was made, and the hashes that identify it."""

    model_config = _OPEN
    format: Literal["twin-ml/dataset/v1"]
    dataset_sha256: str
    settings_sha256: str
    system: SystemCard
    design: dict[str, Any]  # the design's settings, with its sampled "box"
    time: DatasetTime
    counts: dict[str, int]
    shards: list[Shard]
    shapes: dict[str, int] = Field(default_factory=dict)
    splits: dict[str, list[int]] = Field(default_factory=dict)
    failures: list[dict[str, Any]] = Field(default_factory=list)
    # a field system's fields are stored at t[::snapshot_stride] (shapes.n_snapshots of them);
    # everything else, and an ordinary system's states, at every step (older manifests: 1)
    snapshot_stride: int = Field(1, ge=1)
    code_version: str | None = None
    created_at: str | None = None

    @property
    def domain(self) -> DomainBox:
        """The training domain the design sampled."""
        return DomainBox.of_design(self.design)

    @classmethod
    def read(cls, path: str | Path) -> DatasetCard:
        """The card in `path` (a manifest.json); CardError names what is wrong."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise CardError(f"{path}: unreadable manifest ({e})") from None
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt != DATASET_FORMAT:
            raise CardError(f"{path}: format {fmt!r} is not {DATASET_FORMAT!r}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise CardError(f"{path}: {where}: {first['msg']}") from None
