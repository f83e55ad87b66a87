"""Feature distillation: the student's embeddings are pulled towards a larger teacher's.

The loss is the seed's convex combination
``alpha * CE_margin + (1 - alpha) * weight * mean ||s^ - t^||^2`` on L2-normalised
embeddings (``||s^ - t^||^2 = 2 - 2 cos``, so this is cosine distillation).  When the
teacher's embedding size differs from the student's, a learned linear projection maps
the student's embedding into the teacher's space; it is trained with the student and
checkpointed with it, and never exported (the backbone's embedding is the product).

The teacher comes from one of two places:

- online: a backbone loaded from a committed checkpoint, frozen (eval mode, no grad,
  optionally in bf16/fp16), run on the same augmented batch as the student;
- offline: embeddings precomputed once by ``mfrctl distill extract`` (see
  ``extract``), read for each batch by sample index.  At WebFace260M scale a teacher
  forward per step costs more than the student's, so this is the affordable way.

Offline features are written from the *unaugmented* samples (no mask, no mirror): the
student learns to map a masked face to the teacher's embedding of the bare face.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ArchitectureConfig, ConfigError, DataConfig, TeacherConfig, TrainConfig
from .dist import DistEnv
from .features import Features, FeatureWriter
from .models import IResNet, build_backbone
from .saved_models import first_mismatch
from .storage import CheckpointInfo, find_checkpoint

_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean_i ||s_i/|s_i| - t_i/|t_i|||^2`` in fp32 (whatever precision the embeddings came in)."""
    s = F.normalize(student.float(), dim=1)
    t = F.normalize(teacher.float(), dim=1)
    return (s - t).pow(2).sum(dim=1).mean()


# -- the teacher checkpoint -------------------------------------------------------


def load_teacher(cfg: TeacherConfig, storage_options: dict[str, Any] | None = None) -> tuple[IResNet, CheckpointInfo]:
    """The configured teacher architecture with the checkpoint's backbone weights, frozen, on the CPU.

    The checkpoint's tensors are compared with the architecture first, so a mismatch is
    one line naming the tensor instead of a page of ``load_state_dict`` errors.
    """
    from .checkpoint_reader import load_tensors

    info = find_checkpoint(cfg.checkpoint or "", storage_options=storage_options)
    model = build_backbone(cfg.backbone, layers=cfg.layers, width=cfg.width, embedding_size=cfg.embedding_size)
    state = load_tensors(info.url, ("backbone",), storage_options).get("backbone", {})
    problem = first_mismatch(state, model, prefix="backbone.", here="the configured teacher")
    if problem:
        model_cfg = (info.config or {}).get("model")
        used = {k: model_cfg.get(k) for k in ArchitectureConfig.model_fields} if model_cfg else None
        hint = f" (that run's model: {json.dumps(used)})" if used else ""
        raise ConfigError(
            f"teacher checkpoint {info.url} does not match distill.teacher "
            f"(backbone {cfg.backbone}, layers {cfg.layers}, width {cfg.width}, embedding_size {cfg.embedding_size}): "
            f"{problem}; set distill.teacher to the architecture it was trained with{hint}"
        )
    model.load_state_dict(state)
    return model.eval().requires_grad_(False), info


class OnlineTeacher:
    """A frozen teacher backbone run on the student's (augmented) batch."""

    def __init__(self, cfg: TeacherConfig, storage_options: dict[str, Any], device: torch.device):
        if cfg.precision == "fp16" and device.type != "cuda":
            raise ConfigError("distill.teacher.precision fp16 needs a CUDA device; use bf16 or fp32 on cpu")
        model, self.info = load_teacher(cfg, storage_options)
        self.model, self.device, self.dtype = model.to(device), device, _PRECISION.get(cfg.precision)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.model(images).float()


# -- offline features -------------------------------------------------------------


def data_identity(data: DataConfig, num_classes: int) -> dict[str, Any]:
    """What the sample indices of a data source are indices into: features must match it."""
    if data.source == "synthetic":
        return {
            "source": "synthetic",
            "num_classes": num_classes,
            "images_per_identity": data.images_per_identity,
            "seed": data.seed,
        }
    return {"source": data.source, "uri": data.uri, "num_classes": num_classes}


class TeacherFeatures(Features):
    """An extraction's rows by sample index, checked against the data and teacher it must match."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        super().__init__(uri, storage_options, name="distill.features")

    def check(self, data: dict[str, Any], count: int, embedding_size: int) -> None:
        """Refuse features of other data, another sample count or another teacher size."""
        stored = self.index.get("data", {})
        differ = [f"{k} {stored.get(k)!r} there, {v!r} here" for k, v in data.items() if stored.get(k) != v]
        if differ or self.count != count:
            what = "; ".join(differ) if differ else f"{self.count} rows there, {count} samples in the data"
            raise ConfigError(
                f"distill.features {self.uri} were extracted from other data ({what}); "
                "run mfrctl distill extract with this config"
            )
        if self.embedding_size != embedding_size:
            raise ConfigError(
                f"distill.features {self.uri} hold {self.embedding_size}-d embeddings, distill.teacher.embedding_size "
                f"is {embedding_size}; set it to {self.embedding_size}"
            )


class OfflineTeacher:
    """Teacher embeddings read from an extraction, with each row's label checked against the batch."""

    def __init__(self, cfg: TrainConfig, dataset_size: int, device: torch.device):
        self.features = TeacherFeatures(cfg.distill.features or "", cfg.distill.storage_options)
        identity = data_identity(cfg.data, cfg.head.num_classes)
        self.features.check(identity, dataset_size, cfg.distill.teacher.embedding_size)
        self.device = device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        if indices is None:
            raise ValueError("offline distillation needs the batch's sample indices (EpochStream with_indices)")
        embeddings, stored = self.features.rows(indices.numpy())
        wrong = np.flatnonzero(stored != labels.numpy())
        if wrong.size:
            i = wrong[0]
            raise ConfigError(
                f"distill.features {self.features.uri}: sample {int(indices[i])} has label {int(stored[i])} there, "
                f"{int(labels[i])} in the data; the features were extracted from other data"
            )
        return torch.from_numpy(embeddings.astype(np.float32)).to(self.device)


# -- the loss term in training ------------------------------------------------------


class Distillation:
    """The teacher, the optional student->teacher projection, and the combined loss."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, dataset_size: int):
        self.alpha, self.weight, self.env = cfg.distill.alpha, cfg.distill.weight, env
        teacher_cfg = cfg.distill.teacher
        if cfg.distill.mode == "online":
            self.teacher: OnlineTeacher | OfflineTeacher = OnlineTeacher(
                teacher_cfg, cfg.distill.storage_options, env.device
            )
        else:
            self.teacher = OfflineTeacher(cfg, dataset_size, env.device)
        self.projection: nn.Linear | None = None
        if teacher_cfg.embedding_size != cfg.model.embedding_size:
            self.projection = nn.Linear(cfg.model.embedding_size, teacher_cfg.embedding_size, bias=False).to(env.device)
            for p in self.projection.parameters():  # one projection for all ranks, like DDP's start
                dist.broadcast(p.detach(), src=0)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.projection is None else list(self.projection.parameters())

    def targets(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        """The teacher's embeddings of the batch (fp32, on the device, no grad)."""
        return self.teacher(images, labels, indices)

    def combine(self, margin_loss: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``alpha * margin_loss + (1 - alpha) * weight * distillation_loss``."""
        student = embeddings if self.projection is None else self.projection(embeddings.float())
        return self.alpha * margin_loss + (1 - self.alpha) * self.weight * distillation_loss(student, targets)

    def sync_grads(self) -> None:
        """Average the projection's gradients over the ranks (what DDP does for the backbone)."""
        for p in self.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


# -- extraction (mfrctl distill extract) ----------------------------------------------


def unaugmented_dataset(cfg: TrainConfig) -> torch.utils.data.Dataset:
    """The training data source in sample-index order with no mask and no mirror."""
    clean = cfg.data.model_copy(update={"mask_prob": 0.0, "flip": False})
    if clean.source == "synthetic":
        from .data.synthetic import SyntheticFaces

        return SyntheticFaces(
            cfg.head.num_classes, clean.images_per_identity, seed=clean.seed, mask_prob=0.0, flip=False
        )
    from .data import sources

    return sources.build(clean, cfg.head.num_classes)


def extract(
    cfg: TrainConfig,
    out: str,
    batch_size: int,
    num_workers: int,
    shard_rows: int,
    device: torch.device,
    on_batch: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, Any]:
    """Embed every training sample once with the teacher into ``out``; returns the index."""
    from torch.utils.data import DataLoader

    teacher_cfg = cfg.distill.teacher
    teacher = OnlineTeacher(teacher_cfg, cfg.distill.storage_options, device)
    dataset = unaugmented_dataset(cfg)
    writer = FeatureWriter(out, cfg.distill.storage_options, teacher_cfg.embedding_size, shard_rows)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    done, total = 0, len(dataset)
    for images, labels, *_ in loader:
        writer.add(teacher(images.to(device), labels, None).cpu().numpy(), labels.numpy())
        done += len(labels)
        on_batch(done, total)
    return writer.close(
        {
            "data": data_identity(cfg.data, cfg.head.num_classes),
            "images": "unaugmented (no mask, no mirror)",
            "teacher": {
                "checkpoint": teacher.info.url,
                "step": teacher.info.step,
                **teacher_cfg.model_dump(include=set(ArchitectureConfig.model_fields)),
            },
        }
    )
