"""The training augmentation of real data sets: a face mask with probability p, a mirror half the time.

Randomness comes from ``(seed, epoch, index)`` only: nothing depends on the
DataLoader worker or the rank, so a resumed or resharded run augments every
sample exactly as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .masks import MASK_STYLES, apply_mask
from .synthetic import SIZE, to_tensor

MASK_BANK = 64  # pre-rendered masks per style and worker process


class Augment:
    """Mask with probability p, mirror half the time, normalise; randomness from (seed, epoch, index).

    Real data sets are aligned crops (the ArcFace 112x112 template), so a mask drawn at the template's
    landmarks fits every image: each worker renders ``MASK_BANK`` masks per style once (about 1 s), as
    premultiplied colour and 1 - alpha over their bounding box, and a masked sample costs one blend of
    that box instead of a full ``apply_mask`` (about 2 ms).
    """

    def __init__(self, mask_prob: float, flip: bool, seed: int):
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask probability must be in [0, 1], got {mask_prob}")
        self.mask_prob, self.flip, self.seed = mask_prob, flip, seed
        self._bank: list[tuple[int, int, int, int, np.ndarray, np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bank": None}

    def bank(self) -> list[tuple[int, int, int, int, np.ndarray, np.ndarray]]:
        if self._bank is None:
            black, white = np.zeros((SIZE, SIZE, 3), np.uint8), np.full((SIZE, SIZE, 3), 255, np.uint8)
            bank = []
            for s, style in enumerate(MASK_STYLES):
                for k in range(MASK_BANK):
                    on_black = apply_mask(black, np.random.default_rng([self.seed, s, k]), style).astype(np.float32)
                    on_white = apply_mask(white, np.random.default_rng([self.seed, s, k]), style).astype(np.float32)
                    keep = (on_white - on_black) / 255  # 1 - alpha, per pixel and channel
                    rows, cols = np.nonzero((keep < 1).any(axis=2))
                    if not len(rows):
                        continue
                    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
                    bank.append((y0, y1, x0, x1, keep[y0:y1, x0:x1].copy(), on_black[y0:y1, x0:x1].copy()))
            self._bank = bank
        return self._bank

    def masked(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        bank = self.bank()
        y0, y1, x0, x1, keep, colour = bank[rng.integers(len(bank))]
        out = image.copy()
        box = out[y0:y1, x0:x1].astype(np.float32)
        box *= keep
        box += colour
        out[y0:y1, x0:x1] = np.clip(box + 0.5, 0, 255).astype(np.uint8)
        return out

    def __call__(self, image: np.ndarray, epoch: int, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, epoch, index])
        mirrored = self.flip and rng.random() < 0.5
        if self.mask_prob and rng.random() < self.mask_prob:
            image = self.masked(image, rng)
        if mirrored:
            image = image[:, ::-1]
        return to_tensor(image)
