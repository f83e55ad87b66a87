"""The sharded margin head against a single-process full-softmax reference.

The reference is plain autograd on one process: the backbone applied to the
whole global batch, cosine logits against all C centres, the combined margin
on the target logit, ``F.cross_entropy`` (mean).  The sharded version runs on
W real gloo processes with the backbone in DDP.  Compared: the loss, every
backbone parameter gradient after DDP's averaging, every head-shard gradient,
and the embedding gradient under the documented convention (W x the
reference's, which DDP's average turns into exact parameter gradients).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mfr.trainer.head import PartialFC, class_shard, combined_margin
from tests.support.distributed import run_distributed
from tests.support.references import target_logit

D, IN = 5, 6
NUM_CLASSES = 11  # divisible by none of 2, 3
BATCH_PER_RANK = {1: [7], 2: [4, 3], 3: [4, 3, 4]}  # a short last batch on some ranks
MARGINS = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.35),
    "combined": (1.3, 0.3, 0.2),
}
SCALE = 16.0


def _problem(world_size: int):
    g = torch.Generator().manual_seed(1234)
    backbone = nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, D)).double()
    with torch.no_grad():
        for p in backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    sizes = BATCH_PER_RANK[world_size]
    inputs = torch.randn(sum(sizes), IN, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (sum(sizes),), generator=g)
    centres = torch.randn(NUM_CLASSES, D, generator=g, dtype=torch.float64)
    return backbone, inputs, labels, centres, sizes


def _reference(world_size: int, margins, classes: torch.Tensor | None = None):
    """Full softmax on one process; ``classes`` restricts it to a subset (sampling)."""
    backbone, inputs, labels, centres, _ = _problem(world_size)
    centres.requires_grad_(True)
    emb = backbone(inputs)
    emb.retain_grad()
    cos = F.normalize(emb) @ F.normalize(centres).T
    if classes is not None:
        cos = cos[:, classes]
        labels = torch.searchsorted(classes, labels)
    rows = torch.arange(len(labels))
    logits = cos.clone()
    if margins[1] or margins[0] != 1.0:
        logits[rows, labels] = target_logit(cos[rows, labels], *margins)
    else:
        logits[rows, labels] = cos[rows, labels] - margins[2]
    loss = F.cross_entropy(SCALE * logits, labels)
    loss.backward()
    return {
        "loss": loss.detach(),
        "emb_grad": emb.grad,
        "centres_grad": centres.grad,
        "backbone_grads": [p.grad for p in backbone.parameters()],
    }


def _sharded(rank: int, world_size: int, margins, sample_rate: float):
    backbone, inputs, labels, centres, sizes = _problem(world_size)
    lo = sum(sizes[:rank])
    x, y = inputs[lo : lo + sizes[rank]], labels[lo : lo + sizes[rank]]
    model = DistributedDataParallel(backbone)
    head = PartialFC(D, NUM_CLASSES, margins=margins, scale=SCALE, sample_rate=sample_rate).double()
    with torch.no_grad():
        head.weight.copy_(centres[head.start : head.start + head.num_local])
    sampler_state = head.sampler.get_state()
    emb = model(x)
    emb.retain_grad()
    loss = head(emb, y)
    loss.backward()

    sampled, grad = None, head.weight.grad
    if sample_rate < 1:  # replay the head's draw to learn which classes it kept
        head.sampler.set_state(sampler_state)
        local = labels - head.start
        target = torch.where((local >= 0) & (local < head.num_local), local, -1)
        index, _ = head.sample_classes(target)
        sampled = index + head.start
        assert grad.is_sparse and torch.equal(grad.coalesce().indices()[0], index), "a gradient row per sampled class"
        grad = grad.to_dense()
    return {
        "loss": loss.detach(),
        "emb_grad": emb.grad,
        "head_grad": grad,
        "start": head.start,
        "num_local": head.num_local,
        "sampled": sampled,
        "backbone_grads": [p.grad for p in model.parameters()],
    }


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().clamp(min=1e-12)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(scale), msg=what)


def _sharded_all_margins(rank: int, world_size: int):
    return {name: _sharded(rank, world_size, margins, 1.0) for name, margins in MARGINS.items()}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_head_equals_full_softmax(world_size):
    per_rank = run_distributed(_sharded_all_margins, world_size)
    for name, margins in MARGINS.items():
        ref = _reference(world_size, margins)
        results = [r[name] for r in per_rank]
        sizes = BATCH_PER_RANK[world_size]
        for rank, res in enumerate(results):
            what = f"{name} world={world_size} rank={rank}"
            _close(res["loss"], ref["loss"], f"loss {what}")
            lo = sum(sizes[:rank])
            _close(res["emb_grad"], world_size * ref["emb_grad"][lo : lo + sizes[rank]], f"emb grad {what}")
            rows = slice(res["start"], res["start"] + res["num_local"])
            _close(res["head_grad"], ref["centres_grad"][rows], f"head grad {what}")
            for got, want in zip(res["backbone_grads"], ref["backbone_grads"]):
                _close(got, want, f"backbone grad {what}")
        covered = sorted((r["start"], r["num_local"]) for r in results)
        assert covered == [class_shard(NUM_CLASSES, world_size, r) for r in range(world_size)]


def test_sampled_head_equals_softmax_over_the_sampled_classes():
    world_size, margins = 2, MARGINS["arcface"]
    results = run_distributed(_sharded, world_size, margins, 0.4)
    classes = torch.cat([r["sampled"] for r in results])
    _, _, labels, _, _ = _problem(world_size)
    assert set(labels.tolist()) <= set(classes.tolist()), "a positive class was not sampled"
    for r in results:
        positives = {c for c in labels.tolist() if r["start"] <= c < r["start"] + r["num_local"]}
        assert len(r["sampled"]) == min(r["num_local"], max(len(positives), math.ceil(0.4 * r["num_local"])))
    ref = _reference(world_size, margins, classes=classes)
    for rank, res in enumerate(results):
        _close(res["loss"], ref["loss"], f"loss rank={rank}")
        local_rows = res["sampled"] - res["start"]
        ref_rows = ref["centres_grad"][res["sampled"]]
        _close(res["head_grad"][local_rows], ref_rows, f"sampled rows rank={rank}")
        untouched = torch.ones(res["num_local"], dtype=torch.bool)
        untouched[local_rows] = False
        assert torch.count_nonzero(res["head_grad"][untouched]) == 0
        for got, want in zip(res["backbone_grads"], ref["backbone_grads"]):
            _close(got, want, f"backbone grad rank={rank}")


def test_class_shard_covers_every_class_once():
    for num_classes in (1, 7, 11, 100, 2_000_003):
        for world_size in (1, 2, 3, 8, 64):
            if num_classes < world_size:
                continue
            blocks = [class_shard(num_classes, world_size, r) for r in range(world_size)]
            assert blocks[0][0] == 0
            for (start, n), (next_start, _) in itertools.pairwise(blocks):
                assert start + n == next_start
            assert sum(n for _, n in blocks) == num_classes
            assert max(n for _, n in blocks) - min(n for _, n in blocks) <= 1


def test_sample_classes_keeps_all_positives(single_process_group):
    head = PartialFC(4, 1000, sample_rate=0.1)
    target = torch.tensor([3, 999, 3, 500, -1, 17])
    index, remapped = head.sample_classes(target)
    assert len(index) == 100
    assert torch.equal(index, index.sort().values)
    assert {3, 999, 500, 17} <= set(index.tolist())
    assert torch.equal(index[remapped[target >= 0]], target[target >= 0])
    assert remapped[4] == -1
    many = torch.arange(0, 1000, 5)  # 200 positives > 10% of 1000
    index, _ = head.sample_classes(many)
    assert len(index) == 200 and torch.equal(index, many)


def test_labels_out_of_range_are_a_clear_error(single_process_group):
    head = PartialFC(4, 10)
    emb = torch.randn(3, 4)
    for bad in (10, -2):
        with pytest.raises(ValueError, match=rf"label {bad} is outside \[0, 10\)"):
            head(emb, torch.tensor([1, bad, 2]))


def _raise_on_bad_label(rank, world_size):
    head = PartialFC(4, 10)
    labels = torch.tensor([1, 2]) if rank == 0 else torch.tensor([12, 3])
    try:
        head(torch.randn(2, 4), labels)
    except ValueError as err:
        return str(err)
    return None


def test_bad_label_on_one_rank_raises_on_every_rank():
    messages = run_distributed(_raise_on_bad_label, 2)
    assert all(m is not None and "label 12" in m for m in messages)


def test_too_few_classes_for_the_world(single_process_group):
    with pytest.raises(ValueError, match="num_classes"):
        PartialFC(4, 0)


class TestCombinedMargin:
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)

    def test_cosface_is_a_cosine_shift(self):
        cos = torch.cos(self.theta)
        torch.testing.assert_close(combined_margin(cos, 1.0, 0.0, 0.4), cos - 0.4)

    def test_arcface_adds_the_angle_below_the_limit(self):
        m = 0.5
        below = self.theta[(self.theta > 1e-3) & (self.theta < math.pi - m)]
        got = combined_margin(torch.cos(below), 1.0, m, 0.0)
        torch.testing.assert_close(got, torch.cos(below + m))

    @pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.0, 1.2, 0.1), (1.35, 0.2, 0.0), (2.0, 0.0, 0.0)])
    def test_continuous_and_monotonic_over_all_angles(self, m1, m2, m3):
        logits = combined_margin(torch.cos(self.theta), m1, m2, m3)
        steps = logits.diff()
        assert (steps <= 1e-12).all(), "target logit must not increase with the angle"
        assert steps.abs().max() < 0.01, "target logit must not jump"
        assert (logits <= torch.cos(self.theta) - m3 + 1e-9).all(), "a margin never helps the target"

    def test_gradient_is_exact_and_finite(self):
        cos = torch.tensor([-1.0, -0.9, -0.2, 0.3, 0.95, 1.0], dtype=torch.float64, requires_grad=True)
        combined_margin(cos, 1.0, 0.5, 0.0).sum().backward()
        assert torch.isfinite(cos.grad).all()
        inner = cos.detach()[1:-1]
        theta = torch.acos(inner)
        expected = torch.where(
            theta + 0.5 <= math.pi, torch.sin(theta + 0.5) / torch.sin(theta), torch.ones_like(inner)
        )
        torch.testing.assert_close(cos.grad[1:-1], expected)
