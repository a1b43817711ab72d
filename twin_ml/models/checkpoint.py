"""Checkpoints that are never half-written.

Lightning's own writer goes through fsspec, whose local "transaction" writes a temp file in the
system's temp folder and then moves it: across file systems that move is a copy, so a run killed
or out of space in the middle leaves a truncated `last.ckpt`, and `resume=true` then fails on it.
`AtomicCheckpointIO` serializes the checkpoint in memory and writes it with `atomic_write_bytes`
(temp file in the checkpoint's own folder, fsync, rename): a checkpoint on disk is either the old
one or the new one, whole.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from twin_ml._io import atomic_write_bytes


def atomic_torch_save(obj: Any, path) -> None:
    """torch.save, serialized in memory and written with `atomic_write_bytes`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO with an atomic save (loading is Lightning's own)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO takes no storage_options (checkpoints are local files)"
            )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)
