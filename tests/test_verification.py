"""Verification metrics against independent references.

TPR@FPR is checked against ``sklearn.metrics.roc_curve`` (all points kept):
the expected TPR is the best TPR among ROC points with FPR <= target, and
every reported threshold is re-applied by brute force (``score >= t``) to
confirm it really produces the reported TPR and FPR.  Protocol pairs are
checked against explicit Python loops over photo indices.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from mfr.trainer.verification import (
    DEFAULT_FPRS,
    PROTOCOLS,
    OperatingPoint,
    ProtocolResult,
    format_fpr,
    protocol_scores,
    tpr_at_fpr,
    verification_report,
)

TARGETS = DEFAULT_FPRS + (0.05, 0.3, 0.5, 1.0)


def _assert_matches_reference(scores: np.ndarray, is_genuine: np.ndarray, targets=TARGETS) -> None:
    fpr, tpr, _ = roc_curve(is_genuine, scores, drop_intermediate=False)
    n_impostor = int(np.count_nonzero(~is_genuine))
    points = tpr_at_fpr(scores, is_genuine, targets)
    assert [p.target_fpr for p in points] == list(targets)
    for point in points:
        assert point.supported == (n_impostor * point.target_fpr >= 1 - 1e-9)
        if not point.supported:
            assert (point.tpr, point.threshold, point.achieved_fpr) == (None, None, None)
            continue
        allowed = fpr <= point.target_fpr
        assert point.tpr == tpr[allowed].max()
        assert point.achieved_fpr == fpr[allowed].max()
        accepted = scores >= point.threshold
        assert np.count_nonzero(accepted & is_genuine) / np.count_nonzero(is_genuine) == point.tpr
        assert np.count_nonzero(accepted & ~is_genuine) / n_impostor == point.achieved_fpr


def _labelled_scores(seed: int, n: int, genuine_share: float = 0.2):
    rng = np.random.default_rng(seed)
    is_genuine = rng.random(n) < genuine_share
    scores = rng.normal(size=n) + 1.5 * is_genuine
    return scores, is_genuine


@pytest.mark.parametrize("seed, n", [(0, 50), (1, 1_000), (2, 20_000), (3, 200_000)])
def test_continuous_scores_match_sklearn(seed: int, n: int) -> None:
    _assert_matches_reference(*_labelled_scores(seed, n))


@pytest.mark.parametrize("decimals", [0, 1, 2])
@pytest.mark.parametrize("seed", [4, 5])
def test_tied_scores_match_sklearn(seed: int, decimals: int) -> None:
    scores, is_genuine = _labelled_scores(seed, 30_000)
    _assert_matches_reference(np.round(scores, decimals), is_genuine)


def test_integer_scores_match_sklearn() -> None:
    rng = np.random.default_rng(6)
    is_genuine = rng.random(5_000) < 0.3
    scores = rng.integers(0, 4, size=5_000) + 2 * is_genuine
    _assert_matches_reference(scores, is_genuine)


def test_all_equal_scores_accept_all_or_nothing() -> None:
    is_genuine = np.arange(200) % 4 == 0
    scores = np.full(200, 0.25)
    _assert_matches_reference(scores, is_genuine)
    below_one, at_one = tpr_at_fpr(scores, is_genuine, (0.5, 1.0))
    assert below_one.tpr == 0.0 and below_one.achieved_fpr == 0.0
    assert below_one.threshold > 0.25
    assert at_one.tpr == 1.0 and at_one.achieved_fpr == 1.0 and at_one.threshold == 0.25


def test_perfect_separation_gives_full_tpr_without_false_accepts() -> None:
    rng = np.random.default_rng(7)
    genuine_scores = rng.uniform(0.6, 1.0, size=300)
    impostor_scores = rng.uniform(-1.0, 0.4, size=10_000)
    scores = np.concatenate([genuine_scores, impostor_scores])
    is_genuine = np.arange(scores.size) < 300
    _assert_matches_reference(scores, is_genuine)
    points = [p for p in tpr_at_fpr(scores, is_genuine) if p.supported]
    assert [p.tpr for p in points] == [1.0] * 4  # 1e-1 .. 1e-4 with 10k impostors


def test_target_exactly_on_an_achievable_point_is_included() -> None:
    # Ten impostors with distinct scores: FPR 0.3 is reached exactly by
    # accepting the three highest, and "<= target" must include that point.
    # Thresholds 7.0 and 6.5 both give FPR 0.3; the lower one has more TPR.
    impostor_scores = np.arange(10, dtype=float)  # 0 .. 9
    genuine_scores = np.array([6.5, 7.5, 9.5, 2.5])
    scores = np.concatenate([impostor_scores, genuine_scores])
    is_genuine = np.arange(scores.size) >= 10
    (point,) = tpr_at_fpr(scores, is_genuine, (0.3,))
    assert point.achieved_fpr == 0.3
    assert point.threshold == 6.5
    assert point.tpr == 0.75  # 9.5, 7.5 and 6.5 accepted
    _assert_matches_reference(scores, is_genuine, (0.1, 0.2, 0.3, 0.35, 0.4))


def test_support_requires_one_impostor_per_fpr_step() -> None:
    rng = np.random.default_rng(8)
    for n_impostor, supported in [(1_000, True), (999, False)]:
        scores = rng.normal(size=n_impostor + 50)
        is_genuine = np.arange(scores.size) < 50
        (point,) = tpr_at_fpr(scores, is_genuine, (1e-3,))
        assert point.supported is supported
        assert (point.tpr is not None) is supported
        assert (point.threshold is not None) is supported
        assert (point.achieved_fpr is not None) is supported


@pytest.mark.parametrize(
    "scores, is_genuine, message",
    [
        (np.array([0.1, 0.2]), np.array([False, False]), "no genuine"),
        (np.array([0.1, 0.2]), np.array([True, True]), "no impostor"),
        (np.array([0.1, np.nan]), np.array([True, False]), "NaN"),
        (np.array([0.1, 0.2, 0.3]), np.array([True, False]), "shape"),
        (np.array([], dtype=float), np.array([], dtype=bool), "no genuine"),
        (np.array([0.1, 0.2]), np.array([2, 0]), "0/1"),
    ],
)
def test_invalid_inputs_raise(scores, is_genuine, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tpr_at_fpr(scores, is_genuine)


@pytest.mark.parametrize("fpr", [0.0, -0.1, 1.5])
def test_target_outside_unit_interval_raises(fpr: float) -> None:
    with pytest.raises(ValueError, match="target FPR"):
        tpr_at_fpr(np.array([0.1, 0.2]), np.array([True, False]), (fpr,))


def _brute_force_pairs(unmasked, masked, labels, protocol):
    """(score, genuine) for each pair, by explicit loops over photo indices."""

    def cosine(a, b):
        return float(a @ b / np.sqrt((a @ a) * (b @ b)))

    n = len(labels)
    if protocol == "masked-unmasked":
        index_pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        left, right = masked, unmasked
    else:
        index_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        left = right = masked if protocol == "masked-masked" else unmasked
    return [(cosine(left[i], right[j]), labels[i] == labels[j]) for i, j in index_pairs]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_protocol_pairs_match_explicit_enumeration(protocol: str) -> None:
    rng = np.random.default_rng(9)
    labels = np.array([3, 1, 3, 7, 1, 3, 9, 7, 7, 7, 2, 1])
    unmasked = rng.normal(size=(labels.size, 6))
    masked = unmasked + rng.normal(scale=0.7, size=unmasked.shape)
    scores, is_genuine = protocol_scores(unmasked, masked, labels, protocol)
    got = sorted(zip(scores.tolist(), is_genuine.tolist()))
    expected = sorted(_brute_force_pairs(unmasked, masked, labels, protocol))
    assert len(got) == len(expected)
    assert [g for _, g in got] == [g for _, g in expected]
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in expected], rtol=0, atol=1e-12)


def test_masked_unmasked_never_pairs_a_photo_with_itself() -> None:
    # Identical masked/unmasked one-hot rows: a self pair would score 1,
    # every other pair scores 0.
    n = 10
    photos = np.eye(n)
    labels = np.arange(n) // 2
    scores, is_genuine = protocol_scores(photos, photos, labels, "masked-unmasked")
    assert scores.size == n * (n - 1)
    assert np.all(scores == 0.0)
    assert np.count_nonzero(is_genuine) == n  # 5 identities x 2 ordered pairs


def test_pair_counts_follow_label_multiplicities() -> None:
    rng = np.random.default_rng(10)
    labels = rng.integers(0, 40, size=300)
    n = labels.size
    multiplicities = np.array(list(Counter(labels.tolist()).values()))
    same_identity_ordered = int(np.sum(multiplicities * (multiplicities - 1)))
    expected = {
        "unmasked-unmasked": (same_identity_ordered // 2, n * (n - 1) // 2),
        "masked-masked": (same_identity_ordered // 2, n * (n - 1) // 2),
        "masked-unmasked": (same_identity_ordered, n * (n - 1)),
    }
    embeddings = rng.normal(size=(n, 8))
    report = verification_report(embeddings, embeddings + 0.1, labels)
    assert list(report) == list(PROTOCOLS)
    for protocol, (n_genuine, n_pairs) in expected.items():
        result = report[protocol]
        assert result.protocol == protocol
        assert (result.n_genuine, result.n_impostor) == (n_genuine, n_pairs - n_genuine)
        _, is_genuine = protocol_scores(embeddings, embeddings + 0.1, labels, protocol)
        assert is_genuine.size == n_pairs


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_scores_are_cosine_so_row_scaling_changes_nothing(protocol: str) -> None:
    rng = np.random.default_rng(11)
    labels = np.arange(40) % 8
    unmasked = rng.normal(size=(40, 16))
    masked = rng.normal(size=(40, 16))
    scale = rng.uniform(0.01, 100.0, size=(40, 1))
    scores, _ = protocol_scores(unmasked, masked, labels, protocol)
    scaled, _ = protocol_scores(unmasked * scale, masked * scale[::-1], labels, protocol)
    np.testing.assert_allclose(scaled, scores, rtol=0, atol=1e-12)
    assert np.all(np.abs(scores) <= 1 + 1e-12)


def test_zero_embedding_row_raises() -> None:
    embeddings = np.ones((4, 3))
    embeddings[2] = 0.0
    with pytest.raises(ValueError, match="all-zero"):
        protocol_scores(embeddings, embeddings, np.arange(4), "unmasked-unmasked")


def test_protocol_input_errors() -> None:
    embeddings = np.ones((4, 3))
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_scores(embeddings, embeddings, np.arange(4), "masked-only")
    with pytest.raises(ValueError, match="equal shapes"):
        protocol_scores(embeddings, np.ones((5, 3)), np.arange(4), "masked-masked")
    with pytest.raises(ValueError, match="labels"):
        protocol_scores(embeddings, embeddings, np.arange(5), "masked-masked")


def _identity_embeddings(seed: int, noise: float):
    """20 identities x 10 photos; one-hot identity direction plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(20), 10)
    centres = np.eye(64)[labels]
    unmasked = centres + rng.normal(scale=noise, size=centres.shape)
    masked = centres + rng.normal(scale=2 * noise, size=centres.shape)
    return unmasked, masked, labels


def test_identity_embeddings_verify_perfectly() -> None:
    unmasked, masked, labels = _identity_embeddings(12, noise=0.02)
    report = verification_report(unmasked, masked, labels)
    for result in report.values():
        supported = [p for p in result.points if p.supported]
        assert [p.target_fpr for p in supported] == [1e-1, 1e-2, 1e-3, 1e-4]  # 19k-38k impostors
        assert all(p.tpr == 1.0 for p in supported)


def test_random_embeddings_verify_at_chance() -> None:
    rng = np.random.default_rng(13)
    labels = np.repeat(np.arange(20), 10)
    unmasked = rng.normal(size=(labels.size, 64))
    masked = rng.normal(size=(labels.size, 64))
    for result in verification_report(unmasked, masked, labels).values():
        by_target = {p.target_fpr: p for p in result.points}
        assert 0.04 < by_target[1e-1].tpr < 0.2
        assert by_target[1e-2].tpr < 0.04
        assert by_target[1e-3].tpr < 0.01


def test_report_serialises_to_strict_json() -> None:
    unmasked, masked, labels = _identity_embeddings(14, noise=0.3)
    report = verification_report(unmasked, masked, labels, fprs=(1e-2, 1e-6))
    text = json.dumps([result.to_dict() for result in report.values()], allow_nan=False)
    loaded = json.loads(text)
    assert [entry["protocol"] for entry in loaded] == list(PROTOCOLS)
    first = loaded[0]
    assert set(first) == {"protocol", "n_genuine", "n_impostor", "points"}
    supported, unsupported = first["points"]
    assert supported["supported"] is True and isinstance(supported["tpr"], float)
    assert unsupported == {
        "target_fpr": 1e-6,
        "tpr": None,
        "threshold": None,
        "achieved_fpr": None,
        "supported": False,
    }
    assert isinstance(report[PROTOCOLS[0]], ProtocolResult)
    assert isinstance(report[PROTOCOLS[0]].points[0], OperatingPoint)


@pytest.mark.parametrize(
    "fpr, label",
    [(1e-1, "1e-1"), (1e-3, "1e-3"), (1e-6, "1e-6"), (2.5e-4, "2.5e-4"), (1.0, "1e0")],
)
def test_format_fpr(fpr: float, label: str) -> None:
    assert format_fpr(fpr) == label


def _held_out_report(rank: int, world: int) -> dict:
    import torch
    from torch import nn

    from mfr.trainer.config import DataConfig, EvalConfig
    from mfr.trainer.dist import DistEnv
    from mfr.trainer.evaluate import HeldOutEvaluator

    torch.manual_seed(0)  # the same backbone on every rank
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 6))
    cfg = EvalConfig(num_identities=2, images_per_identity=2, fprs=[0.5], batch_size=3)
    env = DistEnv(rank, 0, world, world, 0, torch.device("cpu"))
    evaluator = HeldOutEvaluator(cfg, DataConfig(), num_train_classes=10, env=env)
    return {name: result.to_dict() for name, result in evaluator(backbone).items()}


def test_held_out_evaluation_is_the_same_on_any_world_size_even_with_more_ranks_than_photos():
    """4 photos on 5 ranks: the last rank holds none (it pads), and the gathered embeddings are the 4 in order."""
    from tests.support.distributed import run_distributed

    (alone,) = run_distributed(_held_out_report, 1)
    spread = run_distributed(_held_out_report, 5)
    assert all(report == spread[0] for report in spread)
    assert spread[0].keys() == alone.keys()
    assert _numbers(spread[0]) == pytest.approx(_numbers(alone))  # batches of other sizes round differently
    assert alone["unmasked-unmasked"]["n_genuine"] == 2 and alone["unmasked-unmasked"]["n_impostor"] == 4


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for key in sorted(tree) for x in _numbers(tree[key])]
    if isinstance(tree, list):
        return [x for item in tree for x in _numbers(item)]
    return [float(tree)] if isinstance(tree, (int, float)) else []
