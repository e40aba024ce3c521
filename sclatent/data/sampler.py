"""Mini-batches as index tensors: no per-cell Python, no collate, no workers."""

from __future__ import annotations

import torch

__all__ = ["IndexBatches"]


class IndexBatches:
    """Iterable of index tensors over a fixed set of cells.

    Parameters
    ----------
    indices
        Cell indices to draw from.
    batch_size
        Cells per batch.
    shuffle
        Draw a fresh permutation every epoch (seeded by ``seed + epoch``).
    seed
        Base seed of the permutations.
    rank, world_size
        For distributed training: every rank gets a disjoint shard of the same length.
    """

    def __init__(
        self,
        indices: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.indices = indices.long()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def _epoch_indices(self) -> torch.Tensor:
        idx = self.indices
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = idx[torch.randperm(len(idx), generator=gen)]
        if self.world_size > 1:
            per_rank = len(idx) // self.world_size
            idx = idx[self.rank * per_rank : (self.rank + 1) * per_rank]
        return idx

    def __len__(self) -> int:
        n = len(self.indices) // self.world_size if self.world_size > 1 else len(self.indices)
        return -(-n // self.batch_size)

    def __iter__(self):
        idx = self._epoch_indices()
        self.epoch += 1
        return iter(idx.split(self.batch_size))
