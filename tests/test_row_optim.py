"""The head's rows under the lazy SGD (and AdamW) against torch's dense optimizers, over long trajectories.

The sharded head runs on 2 real gloo ranks with class sampling and the
project's optimizer (``build_optimizer``): rows without a gradient are caught
up lazily.  The reference is one process with all C centres, autograd through
``F.normalize`` and the margin, and torch's own SGD/AdamW updating every row
every step (the unsampled ones with a zero gradient): what the head did
before rows stepped lazily.  The learning rate changes every step, some steps
accumulate two micro-batches (each drawing its own classes), and the losses,
the final rows and the optimizer state must agree (float64, so that any
difference in the maths shows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mfr.trainer.config import OptimConfig
from mfr.trainer.head import PartialFC
from mfr.trainer.optim import build_optimizer
from tests.support.distributed import run_distributed
from tests.support.references import target_logit

D, C, BATCH, STEPS, SCALE, RATE = 5, 40, 3, 60, 8.0, 0.25
MARGINS = (1.0, 0.5, 0.0)
OPTIMIZERS = {
    "sgd": OptimConfig(name="sgd", momentum=0.9, weight_decay=0.05),
    "sgd without momentum": OptimConfig(name="sgd", momentum=0.0, weight_decay=0.05),
    "adamw": OptimConfig(name="adamw", weight_decay=0.05),
}


def _lr(step: int) -> float:
    return 0.05 + 0.1 * (1 + math.sin(step))


def _micro_batches(step: int) -> int:
    return 2 if step % 7 == 3 else 1


def _batch(step: int):
    """The global batch of ``step``: embeddings and labels."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(2 * BATCH, D, generator=g, dtype=torch.float64), torch.randint(0, C, (2 * BATCH,), generator=g)


def _initial_centres() -> torch.Tensor:
    return torch.randn(C, D, generator=torch.Generator().manual_seed(99), dtype=torch.float64)


def _sharded(rank: int, world: int):
    runs = {}
    for name, cfg in OPTIMIZERS.items():
        head = PartialFC(D, C, margins=MARGINS, scale=SCALE, sample_rate=RATE).double()
        with torch.no_grad():
            head.weight.copy_(_initial_centres()[head.start : head.start + head.num_local])
        optimizer = build_optimizer(cfg, nn.Module(), head)
        draws, sample = [], head.sample_classes

        def recording(target, sample=sample, draws=draws, start=head.start):
            index, remapped = sample(target)
            draws.append(index + start)
            return index, remapped

        head.sample_classes = recording
        losses = []
        for step in range(STEPS):
            optimizer.param_groups[1]["lr"] = _lr(step)
            embeddings, labels = _batch(step)
            mine = slice(rank * BATCH, (rank + 1) * BATCH)
            micro = _micro_batches(step)
            loss = 0.0
            for x, y in zip(embeddings[mine].chunk(micro), labels[mine].chunk(micro)):
                part = head(x, y) / micro
                part.backward()
                loss += float(part.detach())
            losses.append(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        optimizer.catch_up()
        state = optimizer.state[head.weight]
        runs[name] = {
            "start": head.start,
            "weight": head.weight.detach().clone(),
            "state": {k: v.clone() for k, v in state.items() if v.dim() == 2},
            "losses": losses,
            "draws": draws,
        }
    return runs


def _reference(cfg: OptimConfig, draws: list[torch.Tensor]):
    """Dense: all centres, every row stepped by torch's optimizer every step."""
    centres = nn.Parameter(_initial_centres())
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD([centres], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW([centres], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    draws = iter(draws)
    losses = []
    for step in range(STEPS):
        optimizer.param_groups[0]["lr"] = _lr(step)
        embeddings, labels = _batch(step)
        micro = _micro_batches(step)
        loss = 0.0
        for i in range(micro):  # micro-batch i: chunk i of each rank's block
            rows = torch.cat([torch.arange(r * BATCH, (r + 1) * BATCH).chunk(micro)[i] for r in range(2)])
            classes = next(draws)
            x, y = embeddings[rows], torch.searchsorted(classes, labels[rows])
            cos = F.normalize(x) @ F.normalize(centres[classes]).T
            logits = cos.clone()
            logits[torch.arange(len(y)), y] = target_logit(cos[torch.arange(len(y)), y], *MARGINS)
            part = F.cross_entropy(SCALE * logits, y) / micro
            part.backward()
            loss += float(part.detach())
        losses.append(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = optimizer.state[centres]
    return centres.detach(), {k: v for k, v in state.items() if v.dim() == 2}, losses


def test_lazily_stepped_rows_follow_the_dense_trajectory():
    per_rank = run_distributed(_sharded, 2)
    for name, cfg in OPTIMIZERS.items():
        ranks = sorted((r[name] for r in per_rank), key=lambda r: r["start"])
        # each forward's classes: both ranks' draws (sorted global ids), in the order of the forwards
        draws = [torch.cat(pair) for pair in zip(*(r["draws"] for r in ranks))]
        assert len(draws) == sum(_micro_batches(s) for s in range(STEPS))
        last_drawn, longest_gap = torch.full((C,), -1), 0
        for i, classes in enumerate(draws):
            longest_gap = max(longest_gap, int((i - last_drawn[classes]).max()))
            last_drawn[classes] = i
        assert longest_gap >= 10, "some rows must stay behind for many steps, or laziness is not exercised"

        weight, state, losses = _reference(cfg, draws)
        torch.testing.assert_close(ranks[0]["losses"], losses, rtol=1e-10, atol=0, msg=name)
        torch.testing.assert_close(torch.cat([r["weight"] for r in ranks]), weight, rtol=1e-10, atol=1e-12, msg=name)
        assert ranks[0]["state"].keys() == state.keys(), name
        for key, value in state.items():
            torch.testing.assert_close(
                torch.cat([r["state"][key] for r in ranks]), value, rtol=1e-10, atol=1e-12, msg=f"{name} {key}"
            )
        assert not torch.allclose(weight, _initial_centres(), atol=0.05), "the rows did move"
