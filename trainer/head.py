"""Partial FC: the model-parallel margin softmax head over millions of classes.

Each rank owns one contiguous block of class centres (rows
``[start, start + num_local)`` of the global ``num_classes x D`` matrix).  A
step all-gathers the embeddings of the whole global batch, computes cosine
logits against the local (optionally sampled) centres only, applies the
combined margin to the target logits, and evaluates the softmax
cross-entropy across ranks with an all-reduce of the row max and of the row
sum of exponentials.  No rank ever holds a ``batch x num_classes`` matrix.

Memory.  Besides the shard, its gradient and the optimizer state, a step
holds one ``global batch x local (sampled) classes`` buffer (cosines, then
logits, probabilities, their gradient) and, when sampling, one copy of the
sampled rows.  The normalised centres and their gradient are never formed
(see ``_MarginSoftmax``).  With sampling the shard's gradient is a sparse COO
tensor of the sampled rows, and an optimizer may step the other rows lazily
(``row_optim``): the head then reads its rows through ``read_rows``.

Gradient convention.  The loss is the mean over the *global* batch, identical
on every rank.  Its gradient w.r.t. the head shard is exact.  The backbone is
wrapped in DDP, which *averages* gradients over the W ranks, so the
all-gather hands each rank ``W x dL/d(its embeddings)``: after DDP's
averaging every backbone gradient equals that of the single-process loss.

ArcFace margin.  The target logit is ``cos(m1*theta + m2) - m3`` with the
exact gradient through ``acos`` (cosines clamped to ``+-(1 - 1e-7)``).  Where
``m1*theta + m2 > pi`` the curve would turn back up, so it continues as
``cos(theta) - (1 + cos(theta_max))`` with ``theta_max = (pi - m2)/m1``: the
same fallback idea as insightface's, made continuous and still monotonic.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, init_from_local_shards

from .config import check_world_size
from .partition import class_shard, sampled_classes
from .scratch import Scratch

_COS_EPS = 1e-7
_NORM_EPS = 1e-12  # F.normalize's floor on a norm
# The head's checkpoint blocks are ShardedTensors on purpose (see ``sharded``).
warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor")


def combined_margin(cos_target: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """Target logit ``cos(m1*theta + m2) - m3`` (before scaling), see module docs."""
    if m1 == 1.0 and m2 == 0.0:
        return cos_target - m3
    theta = torch.acos(cos_target.clamp(-1 + _COS_EPS, 1 - _COS_EPS))
    theta_max = (math.pi - m2) / m1
    margined = torch.cos(m1 * theta + m2)
    fallback = cos_target - (1 + math.cos(theta_max))
    return torch.where(theta <= theta_max, margined, fallback) - m3


class _GatherEmbeddings(torch.autograd.Function):
    """All-gather of equal-sized blocks; backward sums over ranks, times W (DDP)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        blocks = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(blocks, local.contiguous(), group=group)
        return torch.cat(blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        own = grad.chunk(world)[rank]
        return own * world, None


def _clamp_cosines_(cos: torch.Tensor) -> torch.Tensor:
    """Clamp rounding overshoot to [-1, 1] in place; returns where it did, as (row, column) pairs
    (there, as under ``torch.clamp``, the cosine gets no gradient)."""
    low, high = torch.aminmax(cos)
    if low >= -1 and high <= 1:
        return torch.empty(0, 2, dtype=torch.long, device=cos.device)
    overshoot = (cos.abs() > 1).nonzero()
    cos.clamp_(-1, 1)
    return overshoot


def _row_dots(a: torch.Tensor, b: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``(a * b).sum(1)`` a block of rows at a time: no ``a``-sized temporary (and faster than einsum's bmm)."""
    out = torch.empty(len(a), dtype=a.dtype, device=a.device)
    for start in range(0, len(a), block):
        rows = slice(start, start + block)
        torch.sum(a[rows] * b[rows], dim=1, out=out[rows])
    return out


class _MarginSoftmax(torch.autograd.Function):
    """Margin softmax cross-entropy of this rank's (sampled) class rows; the classes are split over ``group``.

    ``rows`` holds the current values of ``weight``'s rows ``index`` (all rows:
    None).  ``target`` holds each sample's target column among them, or -1
    when the target lives on another rank; samples where ``valid`` is False
    (padding) take no part in the loss.  One ``batch x rows`` buffer holds, in
    turn, the cosines, the logits, the probabilities and their gradient
    ``(softmax - onehot) / n_valid``.  The normalised rows are never formed:
    the cosines are ``(x W^T) / |w|``, and the normalisation's backward has
    the closed form ``dL/dw = (g - (w.g / |w|^2) w) / |w|`` with ``g`` the
    gradient w.r.t. the normalised row.  The rows' gradient goes straight to
    ``weight.grad`` (written into ``grad_buffer`` unless it accumulates there):
    dense for all rows, a sparse COO tensor of the sampled rows otherwise.
    """

    @staticmethod
    def forward(ctx, embeddings, weight, rows, index, target, valid, margins, scale, group, grad_buffer):
        rows = rows.to(embeddings.dtype)
        norms = torch.linalg.vector_norm(rows, dim=1).clamp_min_(_NORM_EPS)  # F.normalize's
        logits = torch.mm(embeddings, rows.T).div_(norms)
        clamped = _clamp_cosines_(logits)
        has_target = (target >= 0).nonzero().squeeze(1)
        cols = target[has_target]
        with torch.enable_grad():
            cos = logits[has_target, cols].requires_grad_()
            margined = combined_margin(cos, *margins)
            (slope,) = torch.autograd.grad(margined.sum(), cos)
        logits[has_target, cols] = margined.detach()
        logits *= scale

        row_max = logits.amax(dim=1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        target_logit = torch.zeros_like(row_max)
        target_logit[has_target] = logits[has_target, cols]
        dist.all_reduce(target_logit, group=group)
        probs = logits.sub_(row_max[:, None]).exp_()
        sum_exp = probs.sum(dim=1)
        dist.all_reduce(sum_exp, group=group)
        probs /= sum_exp[:, None]

        n_valid = valid.sum()
        loss = ((sum_exp.log() + row_max - target_logit) * valid).sum() / n_valid
        ctx.save_for_backward(
            embeddings, weight, rows, index, norms, probs, has_target, cols, slope, clamped, valid, n_valid
        )
        ctx.scale, ctx.grad_buffer = scale, grad_buffer
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        embeddings, weight, rows, index, norms, grad, has_target, cols, slope, clamped, valid, n_valid = (
            ctx.saved_tensors
        )
        grad[has_target, cols] -= 1
        grad *= (valid * (grad_loss * ctx.scale) / n_valid)[:, None]  # dL/d(margined cosine)
        grad[has_target, cols] *= slope
        grad[clamped[:, 0], clamped[:, 1]] = 0
        grad /= norms  # dL/d(x W^T)
        grad_embeddings = torch.mm(grad, rows)
        if ctx.needs_input_grad[1]:
            into = ctx.grad_buffer if weight.grad is None else None
            grad_rows = torch.mm(grad.T, embeddings, out=into)  # g / |w|
            radial = _row_dots(grad_rows, rows).div_(norms.square())
            grad_rows = grad_rows.addcmul_(rows, radial[:, None], value=-1).to(weight.dtype)
            if index is not None:
                grad_rows = torch.sparse_coo_tensor(
                    index[None], grad_rows, weight.shape, is_coalesced=True, check_invariants=False
                )
            if weight.grad is None:
                weight.grad = grad_rows
            else:  # micro-batches: sparse gradients concatenate here; the optimizer coalesces them
                weight.grad.add_(grad_rows)
        return grad_embeddings, None, None, None, None, None, None, None, None, None


class PartialFC(nn.Module):
    """Margin softmax head whose class centres are split across ranks.

    ``forward(embeddings, labels)`` takes this rank's batch (sizes may differ
    between ranks, e.g. a short last batch) and returns the mean loss over the
    global batch, the same value on every rank.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margins: tuple[float, float, float] = (1.0, 0.5, 0.0),
        scale: float = 64.0,
        sample_rate: float = 1.0,
        group: dist.ProcessGroup | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.group = group or dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        check_world_size(self.world_size, num_classes=num_classes)  # a ConfigError, which is a ValueError
        self.num_classes = num_classes
        self.start, self.num_local = class_shard(num_classes, self.world_size, self.rank)
        self.margins = tuple(float(m) for m in margins)
        self.scale = float(scale)
        self.sample_rate = float(sample_rate)
        init = torch.Generator().manual_seed(seed * 1_000_003 + self.rank)
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size), generator=init))
        self.sampler = torch.Generator().manual_seed(seed * 1_000_003 + self.rank + 7919)
        # What a step reads as the current values of the rows ``index`` (all rows: None).  An optimizer
        # that steps rows lazily installs its own reader, which brings them up to date (row_optim).
        self.read_rows: Callable[[torch.Tensor | None], torch.Tensor] = self._stored_rows
        self._scratch = Scratch()

    def _stored_rows(self, index: torch.Tensor | None) -> torch.Tensor:
        return self.weight if index is None else self.weight[index]

    def extra_repr(self) -> str:
        return (
            f"classes [{self.start}, {self.start + self.num_local}) of {self.num_classes}, "
            f"margins={self.margins}, scale={self.scale}, sample_rate={self.sample_rate}"
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        padded, labels, valid = self._pad_to_common_batch(embeddings, labels.to(embeddings.device).long())
        blocks = [torch.empty_like(labels) for _ in range(self.world_size)]
        dist.all_gather(blocks, labels, group=self.group)
        global_labels = torch.cat(blocks)
        self._check_labels(global_labels[valid])
        global_embeddings = _GatherEmbeddings.apply(padded, self.group)

        local = global_labels - self.start
        is_local = valid & (local >= 0) & (local < self.num_local)
        target = torch.where(is_local, local, -1)
        index = None
        if self.sample_rate < 1.0:
            index, target = self.sample_classes(target)

        # Logits in at least fp32 whatever the autocast dtype of the backbone.
        dtype = torch.promote_types(torch.promote_types(global_embeddings.dtype, self.weight.dtype), torch.float32)
        with torch.no_grad():
            rows = self.read_rows(index)
        grad_buffer = None  # where the backward writes the rows' gradient (see scratch)
        if dtype == self.weight.dtype:
            grad_buffer = self._scratch("grad", len(rows), self.weight)
        with torch.autocast(embeddings.device.type, enabled=False):
            normalised = F.normalize(global_embeddings.to(dtype))
            return _MarginSoftmax.apply(
                normalised, self.weight, rows, index, target, valid, self.margins, self.scale, self.group, grad_buffer
            )

    def sample_classes(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep every local positive class plus uniformly random negatives.

        Returns the sorted local rows kept and ``target`` remapped into them.
        """
        positives = torch.unique(target[target >= 0])
        num_sample = sampled_classes(self.num_local, self.sample_rate, positives.numel())
        priority = torch.rand(self.num_local, generator=self.sampler).to(target.device)
        priority[positives] = 2.0
        index = priority.topk(num_sample).indices.sort().values
        remap = torch.full((self.num_local,), -1, dtype=torch.long, device=target.device)
        remap[index] = torch.arange(num_sample, device=target.device)
        return index, torch.where(target >= 0, remap[target.clamp(min=0)], -1)

    def _pad_to_common_batch(self, embeddings, labels):
        """Pad this rank's batch to the largest in the group.

        Also returns which rows of the gathered global batch are real samples.
        """
        size = torch.tensor([labels.numel()], device=labels.device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        sizes = torch.cat(sizes)
        padded_size = int(sizes.max())
        missing = padded_size - labels.numel()
        if missing:
            embeddings = F.pad(embeddings, (0, 0, 0, missing))
            labels = F.pad(labels, (0, missing))
        valid = torch.arange(padded_size, device=labels.device)[None, :] < sizes[:, None]
        return embeddings, labels, valid.flatten()

    def _check_labels(self, global_labels: torch.Tensor) -> None:
        """Every rank sees the same global labels, so every rank raises together."""
        bad = global_labels[(global_labels < 0) | (global_labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(
                f"label {int(bad[0])} is outside [0, {self.num_classes}): "
                f"head.num_classes must cover every label in the data"
            )

    # -- checkpoint state ------------------------------------------------------
    def sharded(self, local: torch.Tensor) -> ShardedTensor:
        """``local``, this rank's rows of a ``num_classes``-row matrix (the centres, or their optimizer state),
        as its block of the whole at its global row offset: DCP then hands every rank of any world the rows
        it owns there."""
        meta = ShardMetadata(
            shard_offsets=[self.start] + [0] * (local.dim() - 1),
            shard_sizes=list(local.shape),
            placement=f"rank:{self.rank}/{local.device}",
        )
        return init_from_local_shards(
            [Shard(local, meta)], self.num_classes, *local.shape[1:], process_group=self.group
        )

    def sampler_state(self) -> torch.Tensor:
        """The negative-class sampler's stream (this rank's)."""
        return self.sampler.get_state()

    def load_sampler_state(self, state: torch.Tensor | None, seed: int, step: int) -> None:
        """The sampler's stream as saved, or (``None``: another world size saved it) a fresh, reproducible one
        for this rank at ``step``."""
        if state is not None:
            self.sampler.set_state(state)
        else:
            self.sampler.manual_seed(seed * 1_000_003 + self.rank + 7919 + 104_729 * step)
