"""Optimizer, learning-rate schedule and global gradient clipping.

One optimizer holds two parameter groups: the data-parallel backbone (whose
gradients DDP has already made identical on every rank) and this rank's
head shard (whose gradients are different on every rank).  The global
gradient norm therefore sums the backbone once and the head over all ranks.
Under ZeRO (``optim.zero`` 2/3) the backbone's parameters and gradients are
DTensor shards: they count as sharded, each rank summing its local part.
Each group holds one kind of tensor (DTensor or plain), so the optimizers'
foreach kernels never mix them.  The head's group is marked ``rows``: its
class rows step in ``row_optim`` (lazily and exactly under SGD when only
sampled rows have a gradient), the rest in torch's own SGD/AdamW.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .config import OptimConfig
from .head import PartialFC
from .parallel import local
from .row_optim import DenseAdamW, LazySGD


def build_optimizer(cfg: OptimConfig, backbone: nn.Module, head: PartialFC) -> torch.optim.Optimizer:
    groups = [
        {"params": list(backbone.parameters()), "name": "backbone"},
        {"params": list(head.parameters()), "name": "head", "rows": True},
    ]
    if cfg.name == "sgd":
        optimizer = LazySGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        head.read_rows = functools.partial(optimizer.rows, head.weight)  # the head reads its rows up to date
        return optimizer
    return DenseAdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def state_slots(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors of ``param``; zero-filled ones before its first step
    (so a fresh optimizer has something for a checkpoint to load into)."""
    state = optimizer.state[param]
    if state:
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if isinstance(optimizer, torch.optim.SGD):
        momentum = optimizer.param_groups[0]["momentum"]
        return {"momentum_buffer": torch.zeros_like(param)} if momentum else {}
    if isinstance(optimizer, torch.optim.AdamW):
        return {
            "step": torch.zeros((), dtype=torch.float32),
            "exp_avg": torch.zeros_like(param),
            "exp_avg_sq": torch.zeros_like(param),
        }
    raise TypeError(f"no checkpoint layout for {type(optimizer).__name__}")


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warm-up, then the decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "poly":
        return (1 - progress) ** cfg.poly_power
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def set_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Set every group's learning rate for ``step``; a pure function of the step
    (nothing to checkpoint, and a skipped step cannot shift the schedule)."""
    lr = cfg.lr * lr_factor(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _sum_of_squares(params: Iterable[nn.Parameter], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        if p.grad is not None:
            grad = local(p.grad.detach())
            if grad.is_sparse:  # the head's sampled rows; coalescing sums rows repeated by micro-batches
                grad = grad.coalesce().values()
            total += torch.linalg.vector_norm(grad, dtype=torch.float32).square()  # no squared copy
    return total


def clip_global_grad_norm(
    replicated: list[nn.Parameter],
    sharded: list[nn.Parameter],
    max_norm: float | None,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Clip to ``max_norm`` over the whole model; returns the norm before clipping.

    ``replicated`` gradients are equal on all ranks, ``sharded`` ones are
    this rank's share (plain tensors or DTensors).  The result is the same on every rank, so every rank
    takes the same decision about a non-finite step.
    """
    sharded_sq = _sum_of_squares(sharded, device)
    dist.all_reduce(sharded_sq, group=group)
    norm = (_sum_of_squares(replicated, device) + sharded_sq).sqrt()
    if max_norm is not None and torch.isfinite(norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in (*replicated, *sharded):
            if p.grad is not None:
                local(p.grad).mul_(coef)
    return norm
