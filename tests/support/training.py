"""The real Trainer in this process, on a rank of a gloo group that is already up: trained a few steps, saved,
and its state taken as plain tensors to compare across ranks and world sizes."""

from __future__ import annotations

import json

import torch

from tests.support.configs import CHECKPOINTED


def make_trainer(rank: int, world: int, uri: str, overrides: list[str] = ()):
    """A Trainer of the CHECKPOINTED config that saves to and resumes from ``uri``."""
    from mfr.trainer.config import load_config
    from mfr.trainer.dist import DistEnv
    from mfr.trainer.loop import Trainer

    cfg = load_config(None, [*CHECKPOINTED, f"checkpoint.uri={json.dumps(uri)}", *overrides])
    return Trainer(cfg, DistEnv(rank, 0, world, world, 0, torch.device("cpu")))


def snapshot(trainer) -> dict:
    """This rank's head rows, optimizer state, backbone, step and data position, copied."""
    head, opt, model = trainer.head, trainer.optimizer, trainer.model.module
    opt.catch_up()  # the head's rows as a checkpoint holds them: up to date
    return {
        "start": head.start,
        "weight": head.weight.detach().clone(),
        "head_state": {k: v.clone() for k, v in opt.state[head.weight].items()},
        "backbone": {k: v.clone() for k, v in model.state_dict().items()},
        "backbone_state": {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()},
        "step": trainer.step,
        "data": trainer.data.state_dict(),
    }


def train(trainer, steps: int) -> None:
    """``steps`` training steps on the trainer's own data."""
    batches = iter(trainer.data)
    for _ in range(steps):
        trainer.train_step(*next(batches))


def train_and_save(rank, world, uri, overrides, steps):
    """Train ``steps`` steps, save asynchronously as in training, wait for the commit; the rank's snapshot."""
    trainer = make_trainer(rank, world, uri, overrides)
    train(trainer, steps)
    trainer.checkpointer.save(trainer.step, blocking=False)  # the async path, as in training
    trainer.checkpointer.close()
    return snapshot(trainer)


def full_matrix(rows: list[dict], key) -> torch.Tensor:
    """The global matrix assembled from every rank's block."""
    return torch.cat([key(r) for r in sorted(rows, key=lambda r: r["start"])])
