"""Independent references the sharded maths is checked against: written from the papers, not from trainer/."""

from __future__ import annotations

import math

import torch


def target_logit(cos: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """The combined margin ``cos(m1 * theta + m2) - m3`` on the target cosine, with insightface's fallback
    ``cos - 1 - cos(limit)`` past ``theta = (pi - m2) / m1`` where the margined cosine stops decreasing."""
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    limit = (math.pi - m2) / m1
    return torch.where(theta <= limit, torch.cos(m1 * theta + m2), cos - 1 - math.cos(limit)) - m3
