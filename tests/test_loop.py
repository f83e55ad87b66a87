"""The training loop in one process: schedule, clipping, the non-finite guard."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mfr.trainer.config import load_config
from mfr.trainer.dist import init_distributed
from mfr.trainer.loop import Trainer, TrainingAborted
from mfr.trainer.optim import clip_global_grad_norm, lr_factor
from tests.support import configs

SMALL = [*configs.SMALL, "run.steps=20", "optim.warmup_steps=2"]  # steps for the schedule to matter


@pytest.fixture
def trainer(tmp_path):
    import torch.distributed as dist

    cfg = load_config(None, [*SMALL, f"run.output_dir={tmp_path}", "run.max_nonfinite_steps=3"])
    env = init_distributed("cpu")
    yield Trainer(cfg, env)
    dist.destroy_process_group()


def test_a_step_updates_the_model_and_returns_the_loss(trainer):
    images, labels = next(iter(trainer.data))
    before = [p.detach().clone() for p in (*trainer.model.parameters(), *trainer.head.parameters())]
    loss = trainer.train_step(images, labels)
    assert loss is not None and math.isfinite(loss)
    after = [*trainer.model.parameters(), *trainer.head.parameters()]
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    assert trainer.step == 1


def test_non_finite_steps_are_skipped_then_abort(trainer):
    images, labels = next(iter(trainer.data))
    poisoned = torch.full_like(images, float("nan"))
    params = [p.detach().clone() for p in trainer.model.parameters()]
    for _ in range(2):
        assert trainer.train_step(poisoned, labels) is None
    assert all(torch.equal(b, a) for b, a in zip(params, trainer.model.parameters())), "a skipped step changed weights"
    assert trainer.train_step(images, labels) is not None, "a good step resets the count"
    assert trainer.nonfinite_in_a_row == 0
    for _ in range(2):
        trainer.train_step(poisoned, labels)
    with pytest.raises(TrainingAborted, match="non-finite for 3 steps in a row"):
        trainer.train_step(poisoned, labels)


def test_micro_batches_run_the_head_per_micro_batch(tmp_path):
    import torch.distributed as dist

    cfg = load_config(None, [*SMALL, f"run.output_dir={tmp_path}", "optim.micro_batches=4"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    try:
        calls = []
        trainer.head.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
        images, labels = next(iter(trainer.data))
        assert trainer.train_step(images, labels) is not None
        assert calls == [2, 2, 2, 2]
    finally:
        dist.destroy_process_group()


def test_lr_schedule_warms_up_then_decays():
    cfg = load_config(None, ["optim.warmup_steps=10", "optim.schedule=poly", "run.steps=110"]).optim
    factors = [lr_factor(s, 110, cfg) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.25)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    cosine = cfg.model_copy(update={"schedule": "cosine"})
    assert lr_factor(60, 110, cosine) == pytest.approx(0.5)


def test_global_grad_norm_counts_the_replicated_part_once(single_process_group):
    replicated = torch.nn.Parameter(torch.zeros(3))
    replicated.grad = torch.tensor([3.0, 0.0, 0.0])
    sharded = torch.nn.Parameter(torch.zeros(2))
    sharded.grad = torch.tensor([0.0, 4.0])
    norm = clip_global_grad_norm([replicated], [sharded], max_norm=1.0, device=torch.device("cpu"))
    assert float(norm) == pytest.approx(5.0)
    clipped = torch.cat([replicated.grad, sharded.grad]).norm()
    assert float(clipped) == pytest.approx(1.0, rel=1e-5)


def test_global_grad_norm_of_a_row_sparse_gradient(single_process_group):
    """The head's sampled rows: a sparse gradient, its rows repeated when micro-batches accumulate."""
    dense = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    sharded = torch.nn.Parameter(torch.zeros(4, 2))
    sharded.grad = torch.sparse_coo_tensor(  # row 1 in two parts, as two micro-batches give it
        torch.tensor([[1, 3, 1]]), torch.tensor([[0.5, 2.0], [3.0, -1.0], [0.5, 0.0]]), (4, 2)
    )
    norm = clip_global_grad_norm([], [sharded], max_norm=1.0, device=torch.device("cpu"))
    assert float(norm) == pytest.approx(float(dense.norm()))
    torch.testing.assert_close(sharded.grad.to_dense(), dense / dense.norm(), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_step_is_finite(tmp_path):
    import torch.distributed as dist

    cfg = load_config(None, [*SMALL, f"run.output_dir={tmp_path}", "run.amp=bf16"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    try:
        images, labels = next(iter(trainer.data))
        loss = trainer.train_step(images, labels)
        assert loss is not None and math.isfinite(loss)
        assert all(p.dtype == torch.float32 for p in trainer.head.parameters())
    finally:
        dist.destroy_process_group()
