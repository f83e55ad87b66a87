"""The training data stream: every rank reads a disjoint share of each epoch.

The position in the data is kept as (epoch, global position in that epoch's
shuffled order), which does not depend on the world size: a job resumed on a
different number of ranks continues exactly after the last sample consumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import DataConfig
from .synthetic import SyntheticFaces


class GlobalOrderSampler(Sampler[int]):
    """Rank ``rank``'s share of one epoch's shuffled order, from ``position`` on.

    Global step ``k`` takes the next ``world_size * batch_size`` indices of
    the order, rank ``r`` every ``world_size``-th of them starting at ``r``.
    Only whole global batches are used (every rank runs the same number of
    steps, so the collectives of a step always pair up).
    """

    def __init__(self, size: int, rank: int, world_size: int, batch_size: int, seed: int):
        self.size, self.rank, self.world_size, self.batch_size, self.seed = size, rank, world_size, batch_size, seed
        self.epoch, self.position = 0, 0

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    def _usable(self) -> int:
        remaining = self.size - self.position
        return self.position + remaining // self.global_batch * self.global_batch

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        yield from order[self.position + self.rank : self._usable() : self.world_size].tolist()

    def __len__(self) -> int:
        return (self._usable() - self.position) // self.world_size


class EpochStream:
    """Endless batches over epochs, reshuffled per epoch from the seed; resumable."""

    def __init__(self, cfg: DataConfig, num_classes: int, rank: int, world_size: int, pin_memory: bool = False):
        self.dataset = SyntheticFaces(
            num_identities=num_classes,
            images_per_identity=cfg.images_per_identity,
            seed=cfg.seed,
            mask_prob=cfg.mask_prob,
        )
        self.sampler = GlobalOrderSampler(len(self.dataset), rank, world_size, cfg.batch_size, cfg.seed)
        if len(self.dataset) < self.sampler.global_batch:
            raise ValueError(
                f"an epoch of {len(self.dataset)} samples holds no global batch of {self.sampler.global_batch} "
                f"({world_size} ranks x data.batch_size {cfg.batch_size}); add data or lower the batch size"
            )
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
            pin_memory=pin_memory,
            drop_last=True,
            # its own generator: creating an iterator must not consume the global RNG (dropout's),
            # or a resumed run would diverge from an uninterrupted one
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.epoch, self.position = 0, 0  # of the next batch to hand out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            self.sampler.epoch, self.sampler.position = self.epoch, self.position
            for batch in self.loader:
                self.position += self.sampler.global_batch
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
