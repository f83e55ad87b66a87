"""Held-out verification during training: TPR@FPR on identities never trained on.

Every held-out photo is embedded twice, without and with a mask drawn on the
same pose, so the three protocols of ``verification`` compare like with
like.  The photos are split over the ranks and the embeddings all-gathered.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import DataConfig, EvalConfig
from .data.synthetic import SyntheticFaces, to_tensor
from .dist import DistEnv
from .verification import ProtocolResult, verification_report


class HeldOutEvaluator:
    def __init__(self, cfg: EvalConfig, data: DataConfig, num_train_classes: int, env: DistEnv):
        self.cfg, self.env = cfg, env
        # Appearance ids from num_train_classes on: disjoint from training.
        self.faces = SyntheticFaces(
            num_identities=cfg.num_identities,
            images_per_identity=cfg.images_per_identity,
            seed=data.seed,
            identity_offset=num_train_classes,
        )
        self.labels = np.repeat(np.arange(cfg.num_identities), cfg.images_per_identity)

    def _photos(self, masked: bool) -> torch.Tensor:
        """This rank's share (every W-th photo, padded to an equal count)."""
        n, world = len(self.labels), self.env.world_size
        per_rank = -(-n // world)
        mine = range(self.env.rank, per_rank * world, world)
        per_id = self.cfg.images_per_identity
        images = [
            to_tensor(self.faces.render(i // per_id, i % per_id, masked=masked)) for i in mine if i < n
        ]
        images += [torch.zeros_like(images[0])] * (len(mine) - len(images))
        return torch.stack(images)

    @torch.no_grad()
    def _embed(self, backbone: nn.Module, masked: bool) -> np.ndarray:
        photos = self._photos(masked)
        local = torch.cat(
            [backbone(batch.to(self.env.device)).float() for batch in photos.split(self.cfg.batch_size)]
        )
        blocks = [torch.empty_like(local) for _ in range(self.env.world_size)]
        dist.all_gather(blocks, local)
        # Row j of block r is photo r + j*W: interleave the blocks back.
        ordered = torch.stack(blocks, dim=1).flatten(0, 1)[: len(self.labels)]
        return ordered.cpu().numpy()

    def __call__(self, backbone: nn.Module) -> dict[str, ProtocolResult]:
        was_training = backbone.training
        backbone.eval()
        try:
            unmasked = self._embed(backbone, masked=False)
            masked = self._embed(backbone, masked=True)
        finally:
            backbone.train(was_training)
        return verification_report(unmasked, masked, self.labels, fprs=tuple(self.cfg.fprs))
