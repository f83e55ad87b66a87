"""Data parallelism for the backbone: DDP (``optim.zero: 0``) or FSDP2 ZeRO (2, 3).

ZeRO shards the backbone over the data-parallel ranks with
``torch.distributed.fsdp.fully_shard``, one unit per iResNet block plus the
root (stem and embedding head).  Parameters, gradients and optimizer state
become ``DTensor``s sharded along dim 0, so each rank keeps 1/W of the
gradients and of the optimizer state; with ``zero: 3`` the parameters are
also freed again after each unit's forward (and re-gathered for backward).

FSDP's reduce-scatter averages gradients over the ranks as DDP does, which is
what the head's gradient convention expects (see ``head``).  It does not
synchronise buffers: BatchNorm running statistics are broadcast from rank 0
before every forward, as DDP does, so both layouts evaluate and checkpoint
the same statistics.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .config import check_world_size
from .dist import DistEnv
from .models import IResNet


def broadcast_buffers(module: nn.Module, *_) -> None:
    """Rank 0's buffers (BatchNorm statistics) to every rank, in one broadcast per dtype (a deep iResNet has
    thousands): before each forward under ZeRO (DDP does its own), and before a checkpoint is written."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = _flatten_dense_tensors(buffers)
        dist.broadcast(flat, src=0)
        for buffer, synced in zip(buffers, _unflatten_dense_tensors(flat, buffers)):
            buffer.copy_(synced)


def parallelize(backbone: IResNet, zero: int, env: DistEnv) -> nn.Module:
    """The module the training step calls: DDP around ``backbone``, or ``backbone`` itself sharded in place."""
    if zero == 0:
        device_ids = [env.device.index] if env.device.index is not None else None
        return DistributedDataParallel(backbone, device_ids=device_ids)
    check_world_size(env.world_size, zero=zero)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    reshard = zero == 3
    for unit in backbone.sharding_units():
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(backbone, mesh=mesh, reshard_after_forward=reshard)
    backbone.register_forward_pre_hook(broadcast_buffers)
    return backbone


def unwrap(model: nn.Module) -> nn.Module:
    """The backbone inside what ``parallelize`` returned."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, enabled: bool):
    """Context of one micro-batch's backward: reduce gradients over ranks only when ``enabled``
    (the last micro-batch); the others accumulate locally."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return _fsdp_no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit back in its sharded layout (parameters as DTensors).

    With ``zero: 2`` a forward without backward (evaluation) leaves the full
    parameters in place; state-dict and optimizer code expect the shards.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (itself unless it is a DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
