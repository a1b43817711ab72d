"""Lightning callbacks of a training run: a progress line per epoch, and a stop after N epochs."""

from __future__ import annotations

import logging
import math
import time

import lightning as L
from lightning.pytorch.callbacks import Timer

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class EpochProgress(L.Callback):
    """One log line per training epoch, readable in a log file (where Lightning's progress bar is
    off: it needs a terminal)::

        epoch 3/40: train loss 0.01234, val loss 0.04567, elapsed 12.3s, left ~2m40s

    The train loss is the mean over the epoch's steps, the val loss the last validation's
    (`monitor`, as the module logs it). Elapsed counts this fit (a resumed run starts again from
    0); the time left extrapolates the epochs so far to `max_epochs`, capped by the trainer's
    `max_time`, so it is an upper bound when early stopping ends the run first.

    every_n_epochs: a line every this many epochs (and always after the last one).
    with_progress_bar: also log while Lightning's progress bar is shown (it shows the same).
    """

    def __init__(
        self, every_n_epochs: int = 1, monitor: str = "val/loss", with_progress_bar: bool = False
    ):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.monitor = monitor
        self.with_progress_bar = with_progress_bar
        self._start = 0.0
        self._first_epoch = 0
        self._losses: list[float] = []
        self._val: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._first_epoch = trainer.current_epoch
        self._val = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(float(loss))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        self._val = None if value is None else float(value)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.progress_bar_callback is not None and not self.with_progress_bar:
            return
        epoch = trainer.current_epoch + 1
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        last = total is not None and epoch >= total
        if epoch % self.every_n_epochs and not (last or trainer.should_stop):
            return
        elapsed = time.perf_counter() - self._start
        left = math.inf
        if total is not None:
            left = elapsed / max(epoch - self._first_epoch, 1) * (total - epoch)
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is not None:
            left = min(left, max(remaining, 0.0))
        train = f"{sum(self._losses) / len(self._losses):.4g}" if self._losses else "-"
        val = f"{self._val:.4g}" if self._val is not None else "-"
        log.info(
            f"epoch {epoch}/{total or '?'}: train loss {train}, val loss {val}, "
            f"elapsed {duration(elapsed)}, left ~{duration(left) if math.isfinite(left) else '?'}"
        )


class StopAfter(L.Callback):
    """End the run after `epochs` epochs (checkpoints are written; a resumed run continues).

    `stopped` says whether it ended the run."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.stopped = False

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
            self.stopped = True
