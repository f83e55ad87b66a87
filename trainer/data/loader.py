"""The training data stream: every rank reads a disjoint share of each epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..config import DataConfig
from .synthetic import SyntheticFaces


class EpochStream:
    """Endless batches over epochs, reshuffled per epoch from the seed.

    Batches are full-sized (``drop_last``), so every rank runs the same number
    of steps per epoch and the collectives of a step always pair up.
    """

    def __init__(self, cfg: DataConfig, num_classes: int, rank: int, world_size: int, pin_memory: bool = False):
        self.dataset = SyntheticFaces(
            num_identities=num_classes,
            images_per_identity=cfg.images_per_identity,
            seed=cfg.seed,
            mask_prob=cfg.mask_prob,
        )
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        if len(self.sampler) < cfg.batch_size:
            raise ValueError(
                f"each rank gets {len(self.sampler)} samples per epoch, fewer than data.batch_size "
                f"({cfg.batch_size}); add data or lower the batch size"
            )
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
            pin_memory=pin_memory,
            drop_last=True,
        )
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            self.sampler.set_epoch(self.epoch)
            yield from self.loader
            self.epoch += 1
