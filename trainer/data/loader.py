"""The training data stream: every rank reads a disjoint share of each epoch.

The position in the data is kept as (epoch, global position in that epoch's
shuffled order), which does not depend on the world size: a job resumed on a
different number of ranks continues exactly after the last sample consumed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import ConfigError, DataConfig
from .synthetic import SyntheticFaces

BLOCK_POSITIONS = 65536  # positions per rank drawn at a time from the epoch's permutation
LAYOUT_KEYS = ("layout_world_size", "layout_batch_size", "layout_workers")  # in a shard stream's state


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
        import numpy as np

        from .permutation import FeistelPermutation

        order = FeistelPermutation(self.size, self.seed, self.epoch)  # a few words, not a 2 GB randperm at 260M
        step = self.world_size * BLOCK_POSITIONS
        for start in range(self.position + self.rank, self._usable(), step):
            yield from order(np.arange(start, min(start + step, self._usable()), self.world_size)).tolist()

    def __len__(self) -> int:
        return (self._usable() - self.position) // self.world_size


class EpochIndexSampler(GlobalOrderSampler):
    """``GlobalOrderSampler`` whose items are ``epoch * size + index``: augmentation can depend on the epoch
    even in persistent workers, which never see the sampler's state."""

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.size
        return (base + i for i in super().__iter__())


class SpanOrderSampler(GlobalOrderSampler):
    """Shards: positions mapped through ``spans.SpanOrder``, so that each DataLoader worker reads whole spans.

    Each epoch is drawn for this job's layout, except the epoch of a checkpoint drawn for another one
    (``resumed``), which is finished in its own order.  Items are ``epoch * size + sample`` as in
    ``EpochIndexSampler``.
    """

    def __init__(self, size: int, span: int, rank: int, world_size: int, batch_size: int, workers: int, seed: int):
        from .spans import Layout

        super().__init__(size, rank, world_size, batch_size, seed)
        self.span = min(span, size)
        self.layout = Layout(world_size, batch_size, max(1, workers))
        self.resumed: tuple[int, Layout] | None = None  # (epoch, the layout it was drawn for) from a checkpoint

    def layout_for(self, epoch: int):
        return self.resumed[1] if self.resumed and self.resumed[0] == epoch else self.layout

    def __iter__(self) -> Iterator[int]:
        import numpy as np

        from .spans import SpanOrder

        order = SpanOrder(self.size, self.span, self.seed, self.epoch, self.layout_for(self.epoch))
        base = self.epoch * self.size
        mine = self.rank * self.batch_size + np.arange(self.batch_size)  # this rank's slots of a global batch
        block = self.global_batch * max(1, BLOCK_POSITIONS // self.batch_size)
        for start in range(self.position, self._usable(), block):
            steps = np.arange(start, min(start + block, self._usable()), self.global_batch)
            yield from (base + order.samples(order.stream_index((steps[:, None] + mine).ravel()))).tolist()


class _Issued(Sampler[int]):
    """Passes a sampler's items to the DataLoader and remembers them, in order, until
    their batch comes back (batches return in sampler order, even with workers)."""

    def __init__(self, sampler: GlobalOrderSampler):
        self.sampler, self.items = sampler, deque()

    def __iter__(self) -> Iterator[int]:
        self.items.clear()  # a new pass (epoch or resume): nothing of the old one is still to come
        for item in self.sampler:
            self.items.append(item)
            yield item

    def __len__(self) -> int:
        return len(self.sampler)

    def take(self, n: int) -> torch.Tensor:
        """The items of the next batch of ``n``."""
        return torch.tensor([self.items.popleft() for _ in range(n)])


class BadDataError(ConfigError):
    """Too many unreadable samples: permanent (exit 2, not retried), the data must be fixed."""


class EpochStream:
    """Endless batches over epochs, reshuffled per epoch from the seed; resumable."""

    def __init__(
        self,
        cfg: DataConfig,
        num_classes: int,
        rank: int,
        world_size: int,
        pin_memory: bool = False,
        with_indices: bool = False,
    ):
        """``with_indices``: batches are ``(images, labels, sample indices)`` (offline distillation reads by index)."""
        self.rank, self.bad_in_epoch, self.max_bad_fraction = rank, 0, cfg.max_bad_fraction
        if cfg.source == "synthetic":
            self.dataset = SyntheticFaces(
                num_identities=num_classes,
                images_per_identity=cfg.images_per_identity,
                seed=cfg.seed,
                mask_prob=cfg.mask_prob,
            )
            self.sampler = GlobalOrderSampler(len(self.dataset), rank, world_size, cfg.batch_size, cfg.seed)
        else:
            from . import sources

            self.dataset = sources.build(cfg, num_classes)
            if cfg.source == "shards":
                self.sampler = SpanOrderSampler(
                    len(self.dataset), cfg.shard_chunk, rank, world_size, cfg.batch_size, cfg.num_workers, cfg.seed
                )
                self.dataset.layout = self.sampler.layout  # before the workers copy the dataset
            else:
                self.sampler = EpochIndexSampler(len(self.dataset), rank, world_size, cfg.batch_size, cfg.seed)
        if len(self.dataset) < self.sampler.global_batch:
            raise ValueError(
                f"an epoch of {len(self.dataset)} samples holds no global batch of {self.sampler.global_batch} "
                f"({world_size} ranks x data.batch_size {cfg.batch_size}); add data or lower the batch size"
            )
        self.issued = _Issued(self.sampler) if with_indices else None
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler if self.issued is None else self.issued,
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
                skipped = 0
                if len(batch) == 3:  # real data: (images, labels, samples skipped to fill each slot)
                    skipped = batch[2]
                    self._count_bad(int(skipped.sum()))
                    batch = batch[:2]
                if self.issued is not None:  # the sample in each slot: a bad one was replaced by the next good one
                    batch = (*batch, (self.issued.take(len(batch[1])) + skipped) % self.sampler.size)
                yield batch
            self.epoch, self.position, self.bad_in_epoch = self.epoch + 1, 0, 0

    def _count_bad(self, bad: int) -> None:
        if not bad:
            return
        from ..metrics import BAD_SAMPLES

        BAD_SAMPLES.labels(rank=str(self.rank)).inc(bad)
        self.bad_in_epoch += bad
        share = self.sampler.size // self.sampler.world_size  # this rank's share of an epoch
        limit = self.max_bad_fraction * share
        if self.bad_in_epoch > limit:
            raise BadDataError(
                f"{self.bad_in_epoch} unreadable samples skipped on rank {self.rank} in epoch {self.epoch}, more "
                f"than data.max_bad_fraction {self.max_bad_fraction} of its {share} samples; fix the data "
                "(the skipped keys are logged) or raise data.max_bad_fraction"
            )

    def state_dict(self) -> dict[str, int]:
        state = {"epoch": self.epoch, "position": self.position}
        if isinstance(self.sampler, SpanOrderSampler):  # a shard epoch's order depends on the layout it was drawn for
            state.update(zip(LAYOUT_KEYS, self.sampler.layout_for(self.epoch)))
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if isinstance(self.sampler, SpanOrderSampler) and LAYOUT_KEYS[0] in state:
            from .spans import Layout

            resumed = (self.epoch, Layout(*(int(state[k]) for k in LAYOUT_KEYS)))
            self.sampler.resumed = self.dataset.resumed = resumed
