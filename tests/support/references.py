"""Independent references the sharded maths is checked against: written from the papers, not from trainer/."""

from __future__ import annotations

import math

import numpy as np
import torch

from mfr.trainer import pairsets


def target_logit(cos: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """The combined margin ``cos(m1 * theta + m2) - m3`` on the target cosine, with insightface's fallback
    ``cos - 1 - cos(limit)`` past ``theta = (pi - m2) / m1`` where the margined cosine stops decreasing."""
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    limit = (math.pi - m2) / m1
    return torch.where(theta <= limit, torch.cos(m1 * theta + m2), cos - 1 - math.cos(limit)) - m3


def all_scores(pairs) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: every genuine and every impostor score of a pair set (``pairsets``), all kept."""
    buffer = np.empty(pairsets.TILE * pairsets.TILE, np.float32)
    genuine, impostor = [], []
    with pairsets.one_blas_thread():
        for unit in pairs.units():
            g, i = pairs.score(unit, buffer)
            genuine.append(np.array(g).ravel())
            impostor.append(np.array(i).ravel())
    return np.concatenate(genuine), np.concatenate(impostor)
