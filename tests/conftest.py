"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def single_process_group():
    """A real world-size-1 gloo process group for code that needs one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
