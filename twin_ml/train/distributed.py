"""Training on several processes (Lightning's DDP) with the batches one process would take.

One process takes `data.batch_size` scenarios a step, in the order `EpochSampler` draws them (a
shuffle fixed by seed and epoch). With W processes, each takes every W-th scenario of that same
batch (batch_size / W of them), its loss is the mean over its share, and DDP averages the W
gradients: with equal shares that average is the gradient of the one-process batch mean, up to the
order of the float sums. Every process validates on the whole validation split, so the val/loss
that checkpointing and early stopping watch is the same number on every process, and one
process's number.

Lightning's own DistributedSampler (`use_distributed_sampler`, which twin-train turns off) would
shuffle a second time, pad, and give every process `batch_size` scenarios: W times the batch, other
batches, and a validation loss per process over part of the split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch.utils.data import DataLoader, Sampler, TensorDataset

from twin_ml.data.torch_data import FIELDS, EpochSampler, ScenarioDataModule


def check_batch(batch_size: int, world_size: int) -> None:
    """A batch the processes can share equally."""
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(
            f"data.batch_size ({batch_size}) must be a multiple of the number of training "
            f"processes ({world_size}: trainer.devices x trainer.num_nodes): each process "
            "takes an equal share of every batch"
        )


class ShardedBatches(Sampler[list[int]]):
    """The batches of `batch_size` that one process draws from `sampler`, each split over
    `world_size` processes: this process (`rank`) takes positions rank, rank + W, ... of every
    batch. `batch_size` must be a multiple of `world_size`, so every full batch splits into equal
    shares. A last, shorter batch of k scenarios splits into shares that differ by one when W does
    not divide k (their means then weigh alike, not their scenarios); one of fewer than W
    scenarios is repeated round to W, since every process must take a step.

    `sampler` is kept as `.sampler`: Lightning calls its `set_epoch` there.
    """

    def __init__(self, sampler: Sampler[int], *, batch_size: int, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size}) (world_size {world_size})")
        check_batch(batch_size, world_size)
        self.sampler, self.batch_size, self.rank, self.world_size = (
            sampler,
            batch_size,
            rank,
            world_size,
        )

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.world_size:
                batch = [batch[i % len(batch)] for i in range(self.world_size)]
            yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]


class ShardedScenarioDataModule(ScenarioDataModule):
    """`ScenarioDataModule` whose training batches are split over the trainer's processes
    (`ShardedBatches`: the one-process batches, `data.batch_size` scenarios in all). On one
    process it is `ScenarioDataModule`; validation and test are never split."""

    def train_dataloader(self):
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        if world == 1:
            return super().train_dataloader()
        s = self.splits["train"]
        ds = TensorDataset(*(s[k] for k in FIELDS))
        batches = ShardedBatches(
            EpochSampler(len(ds), self.seed),
            batch_size=self.batch_size,
            rank=trainer.global_rank,
            world_size=world,
        )
        return DataLoader(ds, batch_sampler=batches)
