"""Face datasets whose every image says which it is: tagged images, written as InsightFace RecordIO or as an
identity-folder tree, and the data config that reads them unaugmented."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mfr.trainer.config import DataConfig
from mfr.trainer.data import recordio


def tagged_image(i: int, fmt: str = "PNG", size: int = 112) -> bytes:
    """An image whose top-left pixel spells ``i`` (exact in PNG), the rest noise."""
    pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[:4, :4] = (i % 256, i // 256, 7)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def tag_of(image: torch.Tensor) -> int:
    """The ``i`` of a tagged image after normalisation to [-1, 1] (no mask, no flip)."""
    r, g = ((image[:2, 0, 0] + 1) * 127.5).round().int().tolist()
    return r + 256 * g


def samples(n: int, classes: int, fmt: str = "PNG") -> list[tuple[int, bytes]]:
    """``n`` (label, encoded image) pairs, image ``i`` tagged ``i`` and of identity ``i % classes``."""
    return [(i % classes, tagged_image(i, fmt)) for i in range(n)]


def write_recordio(folder: Path, items: list[tuple[int, bytes]]) -> Path:
    """``items`` as InsightFace's train.rec and train.idx in ``folder``; the .rec's path."""
    writer = recordio.insightface_records(items)
    (folder / "train.rec").write_bytes(bytes(writer.rec))
    (folder / "train.idx").write_text(writer.idx_text())
    return folder / "train.rec"


def write_folder(folder: Path, items: list[tuple[int, bytes]], ext: str = "png") -> Path:
    """``items`` as one sub-folder per identity (``id000``, ...) under ``folder``."""
    for i, (label, data) in enumerate(items):
        (folder / f"id{label:03d}").mkdir(parents=True, exist_ok=True)
        (folder / f"id{label:03d}" / f"{i:05d}.{ext}").write_bytes(data)
    return folder


def data_config(source: str, uri: str, **kw) -> DataConfig:
    """A data section that delivers images as stored (no mask, no flip), read in the calling process."""
    return DataConfig(source=source, uri=uri, **{"mask_prob": 0.0, "flip": False, "num_workers": 0, **kw})
