"""Temporaries kept from step to step.

The head's per-step temporaries are large (its gradient, copies of the sampled
rows: up to ``classes x D``).  A fresh block that large is mapped anew by
glibc, and page-faulted in, every step, which on CPU costs as much as the
arithmetic on it.  Kept, it is paid once; the peak is the same, since the
step needs the block anyway.  Whoever hands such a tensor out must be done
with it before asking again (autograd raises if a tensor saved for backward
is overwritten).
"""

from __future__ import annotations

import torch


class Scratch:
    """Named tensors of ``rows x like.shape[1:]``, grown when a larger one is asked for."""

    def __init__(self):
        self._kept: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        kept = self._kept.get(name)
        if (
            kept is None
            or len(kept) < rows
            or kept.shape[1:] != like.shape[1:]
            or kept.dtype != like.dtype
            or kept.device != like.device
        ):
            kept = self._kept[name] = like.new_empty((rows, *like.shape[1:]))
        return kept[:rows]
