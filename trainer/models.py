"""The iResNet backbone family (the insightface "arcface_torch" architecture).

An iResNet maps a 3x112x112 aligned face to an embedding.  Compared with the
ImageNet ResNet it keeps full resolution in the stem (3x3 conv, stride 1, no
max-pool), uses a pre-activation-like basic block with BN at its input and
PReLU inside, strides in the block's *second* conv, and ends in
BN -> dropout -> flatten -> FC -> BatchNorm1d instead of global pooling, so
the embedding keeps the spatial layout of the 7x7 final map.

Each of the four stages is its own module in ``IResNet.stages``, so that
activation checkpointing can recompute them one at a time (``"stage"``), or
segments of ``checkpoint_every`` consecutive blocks (``"block"``), during
backward.  Recomputation runs BatchNorm forward a second time; the running
statistics it would update again are put back (see ``_keep_running_stats``),
so a checkpointed run's statistics equal those of a plain run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DEFAULT_WIDTHS, INPUT_SIZE, STAGE_WIDTHS, backbone_layers

FINAL_MAP_SIZE = INPUT_SIZE // 2 ** len(STAGE_WIDTHS)  # 7: every stage halves the map
ACTIVATION_CHECKPOINTING = ("none", "stage", "block")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the shortcut.

    The shortcut is the identity, or conv1x1(stride) + BN when the block
    changes the resolution or the channel count.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            _conv3x3(in_channels, out_channels),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
            _conv3x3(out_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
        )
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.downsample(x)


@contextlib.contextmanager
def _keep_running_stats(segment: nn.Module) -> Iterator[None]:
    """Undo the BatchNorm running-statistics updates made inside the block.

    Used around recomputation: the original forward already counted this
    batch once.  The outputs do not depend on it (training-mode BN normalises
    with the batch's own statistics).
    """
    norms = [m for m in segment.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


class IResNet(nn.Module):
    """iResNet for 3x112x112 inputs; ``forward`` returns ``(N, embedding_size)``.

    ``layers`` holds the number of ``IBasicBlock`` per stage; ``width``
    multiplies the base stage widths (64, 128, 256, 512).
    ``activation_checkpointing`` is ``"none"``, ``"stage"`` or ``"block"``
    (segments of ``checkpoint_every`` blocks, counted through the stages).
    """

    def __init__(
        self,
        layers: Sequence[int],
        width: float = 1.0,
        embedding_size: int = 512,
        dropout: float = 0.0,
        activation_checkpointing: str = "none",
        checkpoint_every: int = 1,
    ):
        super().__init__()
        layers = tuple(layers)
        if len(layers) != len(STAGE_WIDTHS) or any(
            isinstance(depth, bool) or not isinstance(depth, int) or depth < 1 for depth in layers
        ):
            raise ValueError(f"layers must be {len(STAGE_WIDTHS)} positive integers (blocks per stage), got {layers}")
        if not (width > 0 and math.isfinite(width)):
            raise ValueError(f"width must be a finite number > 0, got {width}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(
                f"activation_checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)}, "
                f"got {activation_checkpointing!r}"
            )
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")

        self.layers = layers
        self.channels = tuple(max(1, round(base * width)) for base in STAGE_WIDTHS)
        self.embedding_size = embedding_size

        stem_channels = self.channels[0]
        self.stem = nn.Sequential(_conv3x3(3, stem_channels), nn.BatchNorm2d(stem_channels), nn.PReLU(stem_channels))
        stages = []
        in_channels = stem_channels
        for depth, out_channels in zip(layers, self.channels):
            blocks = [IBasicBlock(in_channels, out_channels, stride=2)]
            blocks += [IBasicBlock(out_channels, out_channels) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)
        self.activation_checkpointing = activation_checkpointing
        self.segments = self._segments(checkpoint_every)
        self.head = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(in_channels * FINAL_MAP_SIZE**2, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convs and unit BN: the usual iResNet start.

        No-ops on the meta device, where there are no values to set.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _segments(self, checkpoint_every: int) -> list[nn.Sequential]:
        """The units run (and, when checkpointing, recomputed) one after another.

        Plain ``nn.Sequential`` views over the blocks: they own no parameters
        of their own, so state-dict names stay ``stages.S.B....``.
        """
        if self.activation_checkpointing != "block":
            return list(self.stages)
        blocks = [block for stage in self.stages for block in stage]
        return [nn.Sequential(*blocks[i : i + checkpoint_every]) for i in range(0, len(blocks), checkpoint_every)]

    def _run_segment(self, segment: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing == "none" or not torch.is_grad_enabled():
            return segment(x)
        return checkpoint(
            segment,
            x,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _keep_running_stats(segment)),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for segment in self.segments:
            x = self._run_segment(segment, x)
        return self.head(x)

    def sharding_units(self) -> list[nn.Module]:
        """The blocks, each gathered on its own under ZeRO-3 (``optim.zero``)."""
        return [block for stage in self.stages for block in stage]


def build_backbone(
    name: str,
    layers: Sequence[int] | None = None,
    width: float | None = None,
    embedding_size: int = 512,
    dropout: float = 0.0,
    activation_checkpointing: str = "none",
    checkpoint_every: int = 1,
) -> IResNet:
    """The backbone named in the config: a ``BACKBONE_DEPTHS`` key, or "custom" with ``layers``.

    ``width=None`` takes the name's default (1.0 for all but "tiny").
    """
    layers = backbone_layers(name, layers)
    if width is None:
        width = DEFAULT_WIDTHS.get(name, 1.0)
    return IResNet(
        layers,
        width=width,
        embedding_size=embedding_size,
        dropout=dropout,
        activation_checkpointing=activation_checkpointing,
        checkpoint_every=checkpoint_every,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter values, for run logs and model cards."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
