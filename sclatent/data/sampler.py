"""Mini-batches as index tensors: no per-cell Python, no collate, no workers.

Cells are drawn in blocks of contiguous indices so that a batch read from disk is a few
sequential reads (``block_size=1`` is full shuffling), and under distributed training
each process keeps the same shard of blocks for the whole run, so it only ever reads its
own cells.
"""

from __future__ import annotations

import torch

__all__ = ["IndexBatches"]


class IndexBatches:
    """Iterable of index tensors over a fixed set of cells.

    Parameters
    ----------
    indices
        Cell indices to draw from (ascending: blocks are runs of neighbouring entries).
    batch_size
        Cells per batch.
    shuffle
        Draw a fresh order every epoch (seeded by ``seed`` and the epoch, see
        :meth:`set_epoch`).
    seed
        Base seed of the orders and of the sharding.
    rank, world_size
        For distributed training: ``indices`` are cut into blocks that are dealt to the
        ranks once (seeded by ``seed``, the same on every rank); every rank draws from its
        own shard only, padded (by repeating its first cells) to the length of the largest
        shard, so that every rank runs the same number of batches.
    block_size
        Cells per block of neighbouring indices. Shuffling permutes the blocks and then
        the cells inside consecutive windows of ``window`` cells, so a batch is made of
        a few runs of contiguous cells. 1 (the default) shuffles cells freely.
    window
        Cells shuffled together after the blocks are permuted (default: ``4 * batch_size``).
    """

    def __init__(
        self,
        indices: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        block_size: int = 1,
        window: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}.")
        self.indices = torch.as_tensor(indices).long().cpu()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.block_size = block_size
        self.window = 4 * batch_size if window is None else int(window)
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {window}.")
        self.epoch = 0
        self._blocks = self._shard()

    def _shard(self) -> list[torch.Tensor]:
        """This rank's blocks (all blocks without distribution), in index order."""
        blocks = list(self.indices.split(self.block_size))
        if self.world_size == 1:
            return blocks
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(self.seed))
        shards = [[blocks[int(i)] for i in order[r :: self.world_size].sort().values] for r in range(self.world_size)]
        longest = max(sum(len(b) for b in s) for s in shards)
        mine = shards[self.rank]
        cells = torch.cat(mine) if mine else self.indices[:1]
        short = longest - len(cells)
        if short > 0:  # pad with this rank's own cells: no rank reads another's
            mine = mine + list(cells.repeat(-(-short // len(cells)))[:short].split(self.block_size))
        return mine

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` for the next iteration (the training plan calls it at
        every epoch start, so a resumed run draws the same batches as an uninterrupted one)."""
        self.epoch = int(epoch)

    def epoch_indices(self) -> torch.Tensor:
        """This rank's cells in the order of the current epoch."""
        if not self.shuffle:
            return torch.cat(self._blocks) if self._blocks else self.indices[:0]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + self.rank)
        blocks = [self._blocks[int(i)] for i in torch.randperm(len(self._blocks), generator=gen)]
        idx = torch.cat(blocks) if blocks else self.indices[:0]
        if self.block_size == 1:
            return idx
        out = []
        for start in range(0, len(idx), self.window):
            part = idx[start : start + self.window]
            out.append(part[torch.randperm(len(part), generator=gen)])
        return torch.cat(out) if out else idx

    def __len__(self) -> int:
        n = sum(len(b) for b in self._blocks)
        return -(-n // self.batch_size)

    def __iter__(self):
        # the order is drawn when the first batch is asked for, after set_epoch()
        yield from self.epoch_indices().split(self.batch_size)
