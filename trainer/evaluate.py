"""Embedding faces for verification: held-out identities during training, and the offline suite.

During training, every held-out photo is embedded twice, without and with a
mask drawn on the same pose, so the three protocols of ``verification``
compare like with like; the photos are split over the ranks and the
embeddings all-gathered.

The offline suite (``mfrctl eval``) loads a backbone from a committed
checkpoint or an exported state dict and embeds any images the same way,
with a mask drawn deterministically per image (seed, index) for the masked
protocols and, by default, insightface's test-time flip: the embedding of a
crop plus that of its mirror image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, DataConfig, EvalConfig
from .data.synthetic import SIZE, SyntheticFaces, to_tensor
from .dist import DistEnv
from .verification import (
    PROTOCOLS,
    FoldAccuracy,
    ProtocolResult,
    kfold_accuracy,
    pair_scores,
    protocol_result,
    roc_curve,
    thin_curve,
    verification_report,
)


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
        images = [to_tensor(self.faces.render(i // per_id, i % per_id, masked=masked)) for i in mine if i < n]
        # The share runs past the last photo (or past all of them: more ranks than photos): pad with blanks.
        images += [torch.zeros(3, SIZE, SIZE)] * (len(mine) - len(images))
        return torch.stack(images)

    @torch.no_grad()
    def _embed(self, backbone: nn.Module, masked: bool) -> np.ndarray:
        photos = self._photos(masked)
        local = torch.cat([backbone(batch.to(self.env.device)).float() for batch in photos.split(self.cfg.batch_size)])
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


class Embedder:
    """Embeddings (not normalised) of aligned uint8 112x112 RGB crops, in batches.

    With ``flip`` each embedding is that of the crop plus that of its mirror
    image (insightface's evaluation), which steadies scores against pose.
    """

    def __init__(self, backbone: nn.Module, device: torch.device, batch_size: int = 64, flip: bool = True):
        self.backbone, self.device, self.batch_size, self.flip = backbone.to(device).eval(), device, batch_size, flip

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        batch = torch.stack([to_tensor(image) for image in images]).to(self.device)
        embeddings = self.backbone(batch).float()
        if self.flip:
            embeddings += self.backbone(batch.flip(3)).float()
        return embeddings.cpu().numpy()

    def batches(
        self, count: int, load: Callable[[int], np.ndarray], masks: bool, mask_seed: int
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """``(start, embeddings, masked embeddings or None)`` of images ``0..count-1`` (``load(i)``), a batch at a time.

        Image ``i`` wears the mask ``apply_mask`` draws from ``(mask_seed, i)``
        at the template landmarks: the same mask on every run and machine.
        """
        from .data.masks import apply_mask

        for start in range(0, count, self.batch_size):
            images = [load(i) for i in range(start, min(start + self.batch_size, count))]
            if not masks:
                yield start, self(images), None
                continue
            covered = [apply_mask(im, np.random.default_rng([mask_seed, start + k])) for k, im in enumerate(images)]
            yield start, self(images), self(covered)

    def embed(
        self,
        count: int,
        load: Callable[[int], np.ndarray],
        masks: bool,
        mask_seed: int,
        advance: Callable[[int], None] = lambda n: None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings of images ``0..count-1`` and of the same images masked (see ``batches``), in memory."""
        unmasked, masked = [], []
        for _, plain, covered in self.batches(count, load, masks, mask_seed):
            unmasked.append(plain)
            masked.append(covered)
            advance(len(plain))
        return np.concatenate(unmasked), np.concatenate(masked) if masks else None

    def embed_to_shards(
        self,
        count: int,
        load: Callable[[int], tuple[np.ndarray, int]],
        masks: bool,
        mask_seed: int,
        url: str,
        meta: dict[str, Any],
        advance: Callable[[int], None] = lambda n: None,
        shard_rows: int = 65536,
    ) -> None:
        """Embed images ``0..count-1`` (``load(i)``: image and identity) into ``url/unmasked`` (and ``url/masked``).

        The embeddings are fp16 shards in the ``features`` format, ``meta`` under ``eval`` in each
        ``index.json``; ``python -m mfr.trainer.score`` scores them.
        """
        from .features import FeatureWriter

        labels = np.empty(count, dtype=np.int64)

        def image(i: int) -> np.ndarray:
            picture, labels[i] = load(i)
            return picture

        writers: dict[str, FeatureWriter] = {}
        for start, plain, covered in self.batches(count, image, masks, mask_seed):
            for condition, rows in (("unmasked", plain), ("masked", covered)):
                if rows is not None:
                    if condition not in writers:
                        writers[condition] = FeatureWriter(
                            f"{url.rstrip('/')}/{condition}", None, rows.shape[1], shard_rows
                        )
                    writers[condition].add(rows, labels[start : start + len(rows)])
            advance(len(plain))
        for condition, writer in writers.items():
            writer.close({"eval": {**meta, "condition": condition}})


def read_pairs(url: str, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(first, second, is_genuine)`` of a pair list for ``dataset``.

    One pair a line, ``A B`` or ``A B 0|1`` (space, tab or comma separated;
    ``#`` starts a comment).  ``A`` and ``B`` are sample indices in the data
    set's order, or for a folder paths relative to it (``alice/003.jpg``).
    Without the third column (``is_genuine`` None) identities decide.
    """
    from .storage import open_url

    fs, path = open_url(url, what="the pair list")
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        raise ConfigError(f"{url}: no such pair list") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{url}: not a text pair list (lines of 'A B' or 'A B 0|1')") from None
    by_path = {p: i for i, p in enumerate(getattr(dataset, "paths", ()))}

    def sample(token: str, line: int) -> int:
        index = int(token) if token.isdigit() else by_path.get(token, -1)
        if not 0 <= index < len(dataset):
            raise ConfigError(
                f"{url} line {line}: {token!r} is not a sample index below {len(dataset)} or a path in {dataset.url}"
            )
        return index

    rows, columns = [], None
    for line, raw in enumerate(text.splitlines(), 1):
        fields = raw.split("#", 1)[0].replace(",", " ").split()
        if not fields:
            continue
        if len(fields) not in (2, 3) or (columns is not None and len(fields) != columns):
            raise ConfigError(f"{url} line {line}: expected 'A B' or 'A B 0|1' on every line, got {raw.strip()!r}")
        if len(fields) == 3 and fields[2] not in ("0", "1"):
            raise ConfigError(f"{url} line {line}: the third column must be 0 or 1, got {fields[2]!r}")
        columns = len(fields)
        rows.append((sample(fields[0], line), sample(fields[1], line), fields[2] == "1" if columns == 3 else False))
    if not rows:
        raise ConfigError(f"{url}: no pairs")
    first, second, same = (np.array(column) for column in zip(*rows))
    return first, second, same.astype(bool) if columns == 3 else None


@dataclass
class SetResult:
    """One evaluated set: per-protocol operating points, k-fold accuracy (pair sets) and ROC curves."""

    name: str
    kind: str  # bin | pairs | gallery
    url: str
    images: int
    results: dict[str, ProtocolResult]
    accuracy: dict[str, FoldAccuracy] = field(default_factory=dict)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        protocols = []
        for protocol, result in self.results.items():
            entry = result.to_dict()
            if protocol in self.accuracy:
                entry["accuracy"] = self.accuracy[protocol].to_dict()
            fpr, tpr = thin_curve(*self.curves[protocol], [p.achieved_fpr for p in result.points if p.supported])
            entry["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
            protocols.append(entry)
        return {"name": self.name, "kind": self.kind, "url": self.url, "images": self.images, "protocols": protocols}


def evaluate_pairs(
    name: str,
    kind: str,
    url: str,
    unmasked: np.ndarray,
    masked: np.ndarray | None,
    first: np.ndarray,
    second: np.ndarray,
    is_genuine: np.ndarray,
    fprs: tuple[float, ...],
    folds: int,
) -> SetResult:
    """A pair list under each protocol (only unmasked-unmasked without ``masked``); k-fold accuracy if ``folds``."""
    result = SetResult(name, kind, url, len(unmasked), {})
    for protocol in PROTOCOLS if masked is not None else PROTOCOLS[:1]:
        scores = pair_scores(unmasked, unmasked if masked is None else masked, first, second, protocol)
        result.results[protocol] = protocol_result(protocol, scores, is_genuine, fprs)
        result.curves[protocol] = roc_curve(scores, is_genuine)[:2]
        if folds:
            # unit rows: squared L2 distance is 2 - 2 cos, the quantity insightface thresholds
            result.accuracy[protocol] = kfold_accuracy(2 - 2 * scores, is_genuine, folds)
    return result
