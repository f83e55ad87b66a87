"""How the margin head's classes are split over the ranks, and how many a rank keeps per step.

Torch-free: ``trainer/head.py`` shards and samples its class centres by these
rules, and ``mfrctl plan``'s memory model (``ctl/memory_model.py``) counts
with them.
"""

from __future__ import annotations

import math


def class_shard(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, num_local)`` of ``rank``'s contiguous class block: ``num_classes // world_size`` each, the first
    ``num_classes % world_size`` ranks one more."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (rank < extra)


def sampled_classes(num_local: int, sample_rate: float, positives: int = 0) -> int:
    """Centres of a shard of ``num_local`` that one step uses with ``head.sample_rate``: every one of the
    ``positives`` (the batch's classes in the shard), topped up with random negatives to
    ``ceil(sample_rate * num_local)``."""
    return min(num_local, max(positives, math.ceil(sample_rate * num_local)))
